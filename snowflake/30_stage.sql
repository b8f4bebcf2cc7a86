-- The staging bucket's prefix: s3://<bucket>/<prefix>; each table's objects are in its folder
-- <schema>.<table>/dt=YYYY-MM-DD/... (the _quarantine/ folder beside them is never loaded).
CREATE STAGE IF NOT EXISTS {{ stage }}
  URL = '{{ stage_url }}'
{%- if integration %}
  STORAGE_INTEGRATION = {{ integration }}
{%- endif %}
  FILE_FORMAT = (FORMAT_NAME = '{{ file_format }}');
