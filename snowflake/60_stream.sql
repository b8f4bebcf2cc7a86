-- The changes not merged yet. APPEND_ONLY: the cleanup task's deletes are not changes.
-- IF NOT EXISTS: recreating a stream would lose its offset.
CREATE STREAM IF NOT EXISTS {{ stream }}
  ON TABLE {{ database }}.{{ schema }}.RAW_SALES
  APPEND_ONLY = TRUE;
