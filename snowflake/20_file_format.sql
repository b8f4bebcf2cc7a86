-- Exactly the objects cdc-daemon writes: RFC 4180 CSV as PostgreSQL's COPY writes it, one
-- header row naming the columns. The pipes load by column name (MATCH_BY_COLUMN_NAME), so the
-- header is parsed (PARSE_HEADER; SKIP_HEADER "is not supported with PARSE_HEADER = TRUE"),
-- and INCLUDE_METADATA needs ERROR_ON_COLUMN_COUNT_MISMATCH = FALSE for CSV (Snowflake,
-- "COPY INTO <table>": https://docs.snowflake.com/en/sql-reference/sql/copy-into-table).
-- An unquoted empty field is NULL, a quoted empty field ("") is an empty string; backslashes
-- are data (COPY never escapes with them); gzip or zstd is detected.
-- Snowflake's defaults already match the rest, and are relied on: RECORD_DELIMITER = '\n'
-- (LF line ends), ESCAPE = NONE (a quote inside a quoted field is doubled), TRIM_SPACE = FALSE,
-- TIMESTAMP_FORMAT = AUTO (ISO-8601: timestamptz as 2011-03-27T00:30:00+00:00 or with a fraction
-- as .25+00:00, timestamp without the offset; _CDC_TS in UTC with a Z), ENCODING = UTF8.
-- CREATE OR ALTER: applied again, an older definition is brought to this one (an option not
-- named here goes back to its default); TYPE cannot change (Snowflake, "CREATE FILE FORMAT",
-- CREATE OR ALTER FILE FORMAT: https://docs.snowflake.com/en/sql-reference/sql/create-file-format).
CREATE OR ALTER FILE FORMAT {{ file_format }}
  TYPE = CSV
  FIELD_DELIMITER = ','
  PARSE_HEADER = TRUE
  ERROR_ON_COLUMN_COUNT_MISMATCH = FALSE
  FIELD_OPTIONALLY_ENCLOSED_BY = '"'
  ESCAPE_UNENCLOSED_FIELD = NONE
  NULL_IF = ()
  EMPTY_FIELD_AS_NULL = TRUE
  COMPRESSION = AUTO;
