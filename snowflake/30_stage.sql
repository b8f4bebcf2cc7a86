-- The table's folder in the staging bucket: s3://<bucket>/<prefix><table>/dt=YYYY-MM-DD/...
-- (the _quarantine/ prefix beside it is never loaded).
CREATE STAGE IF NOT EXISTS {{ stage }}
  URL = '{{ stage_url }}'
{%- if integration %}
  STORAGE_INTEGRATION = {{ integration }}
{%- endif %}
  FILE_FORMAT = (FORMAT_NAME = '{{ file_format }}');
