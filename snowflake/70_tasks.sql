-- MERGE_SALES: every {{ merge_schedule }}, when the stream holds changes, one transaction:
--   1. the stream's changes, one per key (highest _CDC_SEQ, then the latest read _CDC_TS: a
--      backfill re-reads a row at the same _CDC_SEQ in watermark mode; a duplicate of a change
--      is the same change), into SALES_CHANGES: reading the stream in a committed DML moves
--      its offset;
--   2. the invoices and stock codes those keys had before (from SALES) and have now;
--   3. MERGE into SALES: a newer change wins, D deletes, a change older than the row or than
--      the key's tombstone is ignored; one source row per key, so never "Duplicate row
--      detected during DML action";
--   4. tombstones for deletes;
--   5. INVOICES and PRODUCTS recomputed from SALES for the touched keys only.
-- snowflake.serverless_tasks: the tasks run on Snowflake-managed compute (no WAREHOUSE; the
-- owner needs EXECUTE MANAGED TASK), billed per second of work, not per warehouse minute.
-- The statements between BEGIN TRANSACTION and COMMIT are what the local task runner runs. A
-- failure rolls the transaction back and re-raises (Snowflake Scripting: "EXCEPTION", "RAISE"
-- without a name raises the same exception again), so the run fails as a whole.
ALTER TASK IF EXISTS {{ merge_task }} SUSPEND;
CREATE OR ALTER TASK {{ merge_task }}
{%- if serverless_tasks %}
  USER_TASK_MANAGED_INITIAL_WAREHOUSE_SIZE = 'XSMALL'
{%- else %}
  WAREHOUSE = {{ warehouse }}
{%- endif %}
  SCHEDULE = '{{ merge_schedule }}'
  WHEN SYSTEM$STREAM_HAS_DATA('{{ database }}.{{ schema }}.{{ stream }}')
AS
EXECUTE IMMEDIATE $$
BEGIN
BEGIN TRANSACTION;
DELETE FROM SALES_CHANGES;
INSERT INTO SALES_CHANGES
SELECT ID, INVOICE_NO, STOCK_CODE, DESCRIPTION, QUANTITY, INVOICE_DATE, UNIT_PRICE, CUSTOMER_ID,
  COUNTRY, _CDC_OP, _CDC_SEQ, _CDC_TS, _FILE, _FILE_ROW, _LOADED_AT
FROM {{ stream }}
QUALIFY ROW_NUMBER() OVER (
  PARTITION BY ID ORDER BY _CDC_SEQ DESC, _CDC_TS DESC, _LOADED_AT DESC, _FILE DESC, _FILE_ROW DESC
) = 1;
DELETE FROM SALES_TOUCHED;
INSERT INTO SALES_TOUCHED (INVOICE_NO, STOCK_CODE)
SELECT s.INVOICE_NO, s.STOCK_CODE FROM SALES AS s INNER JOIN SALES_CHANGES AS c ON s.ID = c.ID
UNION
SELECT c.INVOICE_NO, c.STOCK_CODE FROM SALES_CHANGES AS c WHERE c._CDC_OP <> 'D';
MERGE INTO SALES AS t
USING (
  SELECT c.* FROM SALES_CHANGES AS c
  LEFT JOIN SALES_TOMBSTONES AS d ON d.ID = c.ID
  WHERE d.ID IS NULL OR c._CDC_SEQ > d._CDC_SEQ
) AS s
ON t.ID = s.ID
WHEN MATCHED AND s._CDC_OP = 'D' AND s._CDC_SEQ >= t._CDC_SEQ THEN DELETE
WHEN MATCHED AND s._CDC_OP <> 'D'
  AND (s._CDC_SEQ > t._CDC_SEQ OR (s._CDC_SEQ = t._CDC_SEQ AND s._CDC_TS > t._CDC_TS))
  THEN UPDATE SET
  INVOICE_NO = s.INVOICE_NO, STOCK_CODE = s.STOCK_CODE, DESCRIPTION = s.DESCRIPTION,
  QUANTITY = s.QUANTITY, INVOICE_DATE = s.INVOICE_DATE, UNIT_PRICE = s.UNIT_PRICE,
  CUSTOMER_ID = s.CUSTOMER_ID, COUNTRY = s.COUNTRY, _CDC_SEQ = s._CDC_SEQ, _CDC_TS = s._CDC_TS,
  _MERGED_AT = CURRENT_TIMESTAMP()
WHEN NOT MATCHED AND s._CDC_OP <> 'D' THEN INSERT (
  ID, INVOICE_NO, STOCK_CODE, DESCRIPTION, QUANTITY, INVOICE_DATE, UNIT_PRICE, CUSTOMER_ID,
  COUNTRY, _CDC_SEQ, _CDC_TS, _MERGED_AT
) VALUES (
  s.ID, s.INVOICE_NO, s.STOCK_CODE, s.DESCRIPTION, s.QUANTITY, s.INVOICE_DATE, s.UNIT_PRICE,
  s.CUSTOMER_ID, s.COUNTRY, s._CDC_SEQ, s._CDC_TS, CURRENT_TIMESTAMP()
);
MERGE INTO SALES_TOMBSTONES AS t
USING (SELECT ID, _CDC_SEQ FROM SALES_CHANGES WHERE _CDC_OP = 'D') AS s
ON t.ID = s.ID
WHEN MATCHED AND s._CDC_SEQ > t._CDC_SEQ THEN UPDATE SET
  _CDC_SEQ = s._CDC_SEQ, _DELETED_AT = CURRENT_TIMESTAMP()
WHEN NOT MATCHED THEN INSERT (ID, _CDC_SEQ, _DELETED_AT)
  VALUES (s.ID, s._CDC_SEQ, CURRENT_TIMESTAMP());
DELETE FROM INVOICES WHERE INVOICE_NO IN (SELECT INVOICE_NO FROM SALES_TOUCHED);
INSERT INTO INVOICES (
  INVOICE_NO, INVOICE_DATE, CUSTOMER_ID, COUNTRY, LINES, QUANTITY, AMOUNT, IS_CANCELLATION,
  _UPDATED_AT
)
SELECT INVOICE_NO, MIN(INVOICE_DATE), MAX(CUSTOMER_ID), MAX(COUNTRY), COUNT(*), SUM(QUANTITY),
  SUM(QUANTITY * UNIT_PRICE), STARTSWITH(INVOICE_NO, 'C'), CURRENT_TIMESTAMP()
FROM SALES
WHERE INVOICE_NO IN (SELECT INVOICE_NO FROM SALES_TOUCHED)
GROUP BY INVOICE_NO;
DELETE FROM PRODUCTS WHERE STOCK_CODE IN (SELECT STOCK_CODE FROM SALES_TOUCHED);
INSERT INTO PRODUCTS (
  STOCK_CODE, DESCRIPTION, UNIT_PRICE, FIRST_SOLD, LAST_SOLD, QUANTITY, INVOICES, _UPDATED_AT
)
SELECT a.STOCK_CODE, l.DESCRIPTION, l.UNIT_PRICE, a.FIRST_SOLD, a.LAST_SOLD, a.QUANTITY,
  a.INVOICES, CURRENT_TIMESTAMP()
FROM (
  SELECT STOCK_CODE, MIN(INVOICE_DATE) AS FIRST_SOLD, MAX(INVOICE_DATE) AS LAST_SOLD,
    SUM(QUANTITY) AS QUANTITY, COUNT(DISTINCT INVOICE_NO) AS INVOICES
  FROM SALES
  WHERE STOCK_CODE IN (SELECT STOCK_CODE FROM SALES_TOUCHED)
  GROUP BY STOCK_CODE
) AS a
INNER JOIN (
  SELECT STOCK_CODE, DESCRIPTION, UNIT_PRICE
  FROM SALES
  WHERE STOCK_CODE IN (SELECT STOCK_CODE FROM SALES_TOUCHED)
  QUALIFY ROW_NUMBER() OVER (PARTITION BY STOCK_CODE ORDER BY INVOICE_DATE DESC, ID DESC) = 1
) AS l ON l.STOCK_CODE = a.STOCK_CODE;
INSERT INTO SALES_MERGE_LOG (MERGED_AT, CHANGES)
SELECT CURRENT_TIMESTAMP(), COUNT(*) FROM SALES_CHANGES;
COMMIT;
EXCEPTION
  -- Any failure: undo the whole transaction and fail the task run (TASK_HISTORY shows it).
  WHEN OTHER THEN
    ROLLBACK;
    RAISE;
END;
$$;
ALTER TASK {{ merge_task }} RESUME;

-- CLEANUP_RAW_SALES: daily, landing rows older than {{ retention_days }} days and loaded at
-- least a day before the last merge (so merged: the stream hands a row to the next merge after
-- its load commits), and tombstones older than {{ tombstone_days }} days. It never reads the
-- stream (that would move its offset).
ALTER TASK IF EXISTS {{ cleanup_task }} SUSPEND;
CREATE OR ALTER TASK {{ cleanup_task }}
{%- if serverless_tasks %}
  USER_TASK_MANAGED_INITIAL_WAREHOUSE_SIZE = 'XSMALL'
{%- else %}
  WAREHOUSE = {{ warehouse }}
{%- endif %}
  SCHEDULE = '{{ cleanup_schedule }}'
AS
EXECUTE IMMEDIATE $$
BEGIN
BEGIN TRANSACTION;
DELETE FROM RAW_SALES
WHERE _LOADED_AT < DATEADD(DAY, -{{ retention_days }}, CURRENT_TIMESTAMP())
  AND _LOADED_AT < (SELECT DATEADD(DAY, -1, MAX(MERGED_AT)) FROM SALES_MERGE_LOG);
DELETE FROM SALES_TOMBSTONES
WHERE _DELETED_AT < DATEADD(DAY, -{{ tombstone_days }}, CURRENT_TIMESTAMP());
DELETE FROM SALES_MERGE_LOG
WHERE MERGED_AT < DATEADD(DAY, -{{ retention_days }}, CURRENT_TIMESTAMP())
  AND MERGED_AT < (SELECT MAX(MERGED_AT) FROM SALES_MERGE_LOG);
COMMIT;
EXCEPTION
  -- Any failure: undo the whole transaction and fail the task run (TASK_HISTORY shows it).
  WHEN OTHER THEN
    ROLLBACK;
    RAISE;
END;
$$;
ALTER TASK {{ cleanup_task }} RESUME;
