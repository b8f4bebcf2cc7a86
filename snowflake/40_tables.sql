-- RAW_SALES: every change as it arrived, append-only (the pipe's target, the stream's source).
CREATE TABLE IF NOT EXISTS RAW_SALES (
  ID NUMBER(19, 0),
  INVOICE_NO VARCHAR,
  STOCK_CODE VARCHAR,
  DESCRIPTION VARCHAR,
  QUANTITY NUMBER(10, 0),
  INVOICE_DATE TIMESTAMP_TZ,
  UNIT_PRICE NUMBER(12, 3),
  CUSTOMER_ID NUMBER(10, 0),
  COUNTRY VARCHAR,
  _CDC_OP VARCHAR(1),
  _CDC_SEQ NUMBER(38, 0),
  _CDC_TS TIMESTAMP_TZ,
  _FILE VARCHAR,
  _FILE_ROW NUMBER(19, 0),
  _LOADED_AT TIMESTAMP_LTZ
);

-- SALES: one row per source key, the change with the highest _CDC_SEQ.
CREATE TABLE IF NOT EXISTS SALES (
  ID NUMBER(19, 0) NOT NULL PRIMARY KEY,
  INVOICE_NO VARCHAR,
  STOCK_CODE VARCHAR,
  DESCRIPTION VARCHAR,
  QUANTITY NUMBER(10, 0),
  INVOICE_DATE TIMESTAMP_TZ,
  UNIT_PRICE NUMBER(12, 3),
  CUSTOMER_ID NUMBER(10, 0),
  COUNTRY VARCHAR,
  _CDC_SEQ NUMBER(38, 0) NOT NULL,
  _CDC_TS TIMESTAMP_TZ,
  _MERGED_AT TIMESTAMP_LTZ
);

-- Keys deleted at _CDC_SEQ: an older change of a deleted key that arrives later (a redelivered
-- object, a backfill) must not bring the row back.
CREATE TABLE IF NOT EXISTS SALES_TOMBSTONES (
  ID NUMBER(19, 0) NOT NULL PRIMARY KEY,
  _CDC_SEQ NUMBER(38, 0) NOT NULL,
  _DELETED_AT TIMESTAMP_LTZ
);

-- One row per invoice, recomputed from SALES for the invoices a merge touched.
CREATE TABLE IF NOT EXISTS INVOICES (
  INVOICE_NO VARCHAR NOT NULL PRIMARY KEY,
  INVOICE_DATE TIMESTAMP_TZ,
  CUSTOMER_ID NUMBER(10, 0),
  COUNTRY VARCHAR,
  LINES NUMBER(19, 0),
  QUANTITY NUMBER(19, 0),
  AMOUNT NUMBER(38, 3),
  IS_CANCELLATION BOOLEAN,
  _UPDATED_AT TIMESTAMP_LTZ
);

-- One row per stock code: the latest description and price (latest invoice date, then id),
-- first and last sold, quantity and number of invoices.
CREATE TABLE IF NOT EXISTS PRODUCTS (
  STOCK_CODE VARCHAR NOT NULL PRIMARY KEY,
  DESCRIPTION VARCHAR,
  UNIT_PRICE NUMBER(12, 3),
  FIRST_SOLD TIMESTAMP_TZ,
  LAST_SOLD TIMESTAMP_TZ,
  QUANTITY NUMBER(19, 0),
  INVOICES NUMBER(19, 0),
  _UPDATED_AT TIMESTAMP_LTZ
);

-- Work tables of the merge task (filled and read inside its transaction; DDL in a task body
-- would commit the transaction early, so they are created here, once).
CREATE TABLE IF NOT EXISTS SALES_CHANGES LIKE RAW_SALES;
CREATE TABLE IF NOT EXISTS SALES_TOUCHED (
  INVOICE_NO VARCHAR,
  STOCK_CODE VARCHAR
);

-- One row per merge run: the cleanup task only deletes landing rows loaded well before one.
CREATE TABLE IF NOT EXISTS SALES_MERGE_LOG (
  MERGED_AT TIMESTAMP_LTZ NOT NULL,
  CHANGES NUMBER(19, 0) NOT NULL
);
