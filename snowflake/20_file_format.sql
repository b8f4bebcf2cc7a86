-- Exactly the objects cdc-daemon writes: RFC 4180 CSV as PostgreSQL's COPY writes it, one
-- header row. An unquoted empty field is NULL, a quoted empty field ("") is an empty string;
-- backslashes are data (COPY never escapes with them); gzip or zstd is detected.
-- Snowflake's defaults already match the rest, and are relied on: RECORD_DELIMITER = '\n'
-- (LF line ends), ESCAPE = NONE (a quote inside a quoted field is doubled), TRIM_SPACE = FALSE,
-- ERROR_ON_COLUMN_COUNT_MISMATCH = TRUE, BINARY_FORMAT = HEX (bytea is written as hex),
-- TIMESTAMP_FORMAT = AUTO (ISO-8601: timestamptz as 2011-03-27T00:30:00+00:00 or with a fraction
-- as .25+00:00, timestamp without the offset; _CDC_TS in UTC with a Z), ENCODING = UTF8.
CREATE FILE FORMAT IF NOT EXISTS {{ file_format }}
  TYPE = CSV
  FIELD_DELIMITER = ','
  SKIP_HEADER = 1
  FIELD_OPTIONALLY_ENCLOSED_BY = '"'
  ESCAPE_UNENCLOSED_FIELD = NONE
  NULL_IF = ()
  EMPTY_FIELD_AS_NULL = TRUE
  COMPRESSION = AUTO;
