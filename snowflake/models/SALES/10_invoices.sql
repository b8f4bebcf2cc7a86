{#- A model on {{ source }}: rendered twice, with ddl = true (its tables, created by
    snowflake apply with the rest of 40_tables.sql) and ddl = false (the statements the merge
    task runs after each merge, inside its transaction). {{ touched }} holds the rows of
    {{ source }} the merge changed, as they were and as they are: recompute what they touch. -#}
{%- if ddl -%}
-- INVOICES: one row per invoice, recomputed from {{ source }} for the invoices a merge touched.
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
{%- else -%}
DELETE FROM {{ database }}.{{ schema }}.INVOICES
WHERE INVOICE_NO IN (SELECT INVOICE_NO FROM {{ touched }});
INSERT INTO {{ database }}.{{ schema }}.INVOICES (
  INVOICE_NO, INVOICE_DATE, CUSTOMER_ID, COUNTRY, LINES, QUANTITY, AMOUNT, IS_CANCELLATION,
  _UPDATED_AT
)
SELECT INVOICE_NO, MIN(INVOICE_DATE), MAX(CUSTOMER_ID), MAX(COUNTRY), COUNT(*), SUM(QUANTITY),
  SUM(QUANTITY * UNIT_PRICE), STARTSWITH(INVOICE_NO, 'C'), CURRENT_TIMESTAMP()
FROM {{ source }}
WHERE INVOICE_NO IN (SELECT INVOICE_NO FROM {{ touched }})
GROUP BY INVOICE_NO;
{%- endif %}
