-- The warehouse the tasks and the reconciler's counts run on, unless it is managed elsewhere
-- (snowflake.create_warehouse = false): the smallest size, suspended after 60 s idle (a
-- running warehouse bills per second, with a 60 s minimum each time it resumes: Snowflake,
-- "Warehouse considerations"), resumed by the first statement that needs it.
{% if create_warehouse %}
CREATE WAREHOUSE IF NOT EXISTS {{ warehouse }}
  WAREHOUSE_SIZE = XSMALL
  AUTO_SUSPEND = 60
  AUTO_RESUME = TRUE
  INITIALLY_SUSPENDED = TRUE;
{% endif %}
-- The database and schema that hold the landing table and the final tables.
CREATE DATABASE IF NOT EXISTS {{ database }};
CREATE SCHEMA IF NOT EXISTS {{ database }}.{{ schema }};
USE SCHEMA {{ database }}.{{ schema }};
