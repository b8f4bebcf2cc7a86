-- dt=unknown/ holds deletes whose day is not known (logical mode, key-only replica identity).
-- Snowpipe: S3 event notifications (SQS, see the pipe's notification_channel in SHOW PIPES) load
-- each new object once. IF NOT EXISTS, never OR REPLACE: recreating a pipe drops its load
-- history, and Snowpipe would load every object in the stage again. Names inside the COPY are
-- fully qualified: the pipe runs them outside any session's current schema.
CREATE PIPE IF NOT EXISTS {{ pipe }}
  AUTO_INGEST = TRUE
  COMMENT = 'cdc-daemon: {{ table }} objects into RAW_SALES'
  AS
COPY INTO {{ database }}.{{ schema }}.RAW_SALES (
  ID, INVOICE_NO, STOCK_CODE, DESCRIPTION, QUANTITY, INVOICE_DATE, UNIT_PRICE, CUSTOMER_ID,
  COUNTRY, _CDC_OP, _CDC_SEQ, _CDC_TS, _FILE, _FILE_ROW, _LOADED_AT
)
FROM (
  SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
    METADATA$FILENAME, METADATA$FILE_ROW_NUMBER, METADATA$START_SCAN_TIME
  FROM @{{ database }}.{{ schema }}.{{ stage }}
)
FILE_FORMAT = (FORMAT_NAME = '{{ database }}.{{ schema }}.{{ file_format }}')
PATTERN = '.*dt=([0-9]{4}-[0-9]{2}-[0-9]{2}|unknown)/[^/]+[.]csv([.](gz|zst))?';
