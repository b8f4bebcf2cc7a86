-- The changes not merged yet, one stream per landing table. APPEND_ONLY: the cleanup task's
-- deletes are not changes. IF NOT EXISTS: recreating a stream would lose its offset. A stream
-- follows a column added to its table ("Streams use the current table schema":
-- https://docs.snowflake.com/en/user-guide/streams-intro).
{%- for t in tables %}
CREATE STREAM IF NOT EXISTS {{ t.names.stream }}
  ON TABLE {{ database }}.{{ schema }}.{{ t.names.landing }}
  APPEND_ONLY = TRUE;
{%- endfor %}
