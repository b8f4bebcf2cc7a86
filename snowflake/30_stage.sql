-- The staging bucket's prefix: s3://<bucket>/<prefix>; each table's objects are in its folder
-- <schema>.<table>/dt=YYYY-MM-DD/... (the _quarantine/ folder beside them is never loaded).
-- CREATE OR ALTER: a changed URL, integration or file format is applied in place
-- (https://docs.snowflake.com/en/sql-reference/sql/create-or-alter).
CREATE OR ALTER STAGE {{ stage }}
  URL = '{{ stage_url }}'
{%- if integration %}
  STORAGE_INTEGRATION = {{ integration }}
{%- endif %}
  FILE_FORMAT = (FORMAT_NAME = '{{ file_format }}');
