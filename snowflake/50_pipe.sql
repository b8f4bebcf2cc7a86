-- One AUTO_INGEST pipe per table: S3 event notifications (SQS, see the pipe's
-- notification_channel in SHOW PIPES) load each new object of the table's folder once.
-- By column name, never by position: MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE maps the
-- header's lower-case names onto the landing table's columns, so no change of the column list
-- can shift a value into another column; a column the file lacks is NULL, a file column the
-- table lacks is not loaded (which is why the daemon adds a new source column to the landing
-- table before the first object holding it is uploaded). Snowpipe takes every COPY option but
-- FILES, ON_ERROR = ABORT_STATEMENT, SIZE_LIMIT, PURGE, FORCE, RETURN_FAILED_ONLY and
-- VALIDATION_MODE (https://docs.snowflake.com/en/sql-reference/sql/create-pipe);
-- MATCH_BY_COLUMN_NAME takes no SELECT transformation, so the file name, row number and scan
-- time come through INCLUDE_METADATA.
-- dt=unknown/ holds deletes whose day is not known (logical mode, key-only replica identity).
-- IF NOT EXISTS here: a pipe's COPY cannot be altered (CREATE OR ALTER PIPE does not change
-- it), and recreating a pipe loses the files queued for it. `cdc-daemon snowflake apply`
-- compares the pipe with this definition and, when its COPY differs, follows Snowflake's
-- procedure for recreating a pipe ("Manage Snowpipe", Recreating pipes:
-- https://docs.snowflake.com/en/user-guide/data-load-snowpipe-manage): pause, wait until
-- PAUSED and no load is in progress, CREATE OR REPLACE, pause, resume, then ALTER PIPE ...
-- REFRESH each object staged within 7 days that COPY_HISTORY does not show loaded (so none is
-- lost, and none loaded twice). Names inside the COPY are fully qualified: the pipe runs them
-- outside any session's current schema. A table folder that is not plain (a space, a quote,
-- a percent sign: docs/design.md#object-names) is named as a quoted stage path.
{%- for t in tables %}
{%- set n = t.names %}
CREATE PIPE IF NOT EXISTS {{ n.pipe }}
  AUTO_INGEST = TRUE
  COMMENT = 'cdc-daemon: {{ n.source | replace("'", "") | replace("\\", "") }} objects into {{ n.landing }}'
  AS
COPY INTO {{ database }}.{{ schema }}.{{ n.landing }}
FROM {{ stage_path(n.folder) }}
FILE_FORMAT = (FORMAT_NAME = '{{ database }}.{{ schema }}.{{ file_format }}')
MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE
INCLUDE_METADATA = (
  _FILE = METADATA$FILENAME, _FILE_ROW = METADATA$FILE_ROW_NUMBER,
  _LOADED_AT = METADATA$START_SCAN_TIME
)
PATTERN = '.*dt=([0-9]{4}-[0-9]{2}-[0-9]{2}|unknown)/[^/]+[.]csv([.](gz|zst))?';
{%- endfor %}
