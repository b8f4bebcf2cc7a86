-- Least-privilege roles for cdc-daemon (`cdc-daemon snowflake render --grants`). Three roles:
-- - {{ deployer_role }} runs `cdc-daemon snowflake apply` (it owns the database objects);
-- - {{ tasks_role }} owns the merge and cleanup tasks and runs them;
-- - {{ reconciler_role }} is the daemon's reconciler: it reads the load history, the pipe's
--   status and SALES's counts, and refreshes the pipe. Nothing else.
-- Part 1 runs before the first apply, part 2 after it (the objects must exist). Run both as
-- a role with MANAGE GRANTS and the account privileges (SECURITYADMIN with ACCOUNTADMIN's help,
-- or ACCOUNTADMIN). Each grant names the statement that needs it.

-- ==== part 1: before the first `snowflake apply` ====
CREATE ROLE IF NOT EXISTS {{ deployer_role }};
CREATE ROLE IF NOT EXISTS {{ tasks_role }};
CREATE ROLE IF NOT EXISTS {{ reconciler_role }};
-- The deployer creates the tasks; part 2 gives them to {{ tasks_role }} (and the future grant
-- keeps it so). Holding that role, the deployer keeps the owner's privileges for the next
-- apply (ALTER TASK ... SUSPEND/RESUME, CREATE OR ALTER TASK) and its EXECUTE TASK.
GRANT ROLE {{ tasks_role }} TO ROLE {{ deployer_role }};
{%- if create_warehouse %}
-- 00_database.sql: CREATE WAREHOUSE IF NOT EXISTS {{ warehouse }}
GRANT CREATE WAREHOUSE ON ACCOUNT TO ROLE {{ deployer_role }};
{%- endif %}
-- 00_database.sql: CREATE DATABASE IF NOT EXISTS {{ database }}
GRANT CREATE DATABASE ON ACCOUNT TO ROLE {{ deployer_role }};
{%- if integration %}
-- 10_integration.sql: CREATE STORAGE INTEGRATION IF NOT EXISTS {{ integration }}
GRANT CREATE INTEGRATION ON ACCOUNT TO ROLE {{ deployer_role }};
{%- endif %}
-- 70_tasks.sql: ALTER TASK ... RESUME, and every scheduled run of a task it owns
GRANT EXECUTE TASK ON ACCOUNT TO ROLE {{ tasks_role }};
{%- if serverless_tasks %}
-- 70_tasks.sql: tasks without a WAREHOUSE (snowflake.serverless_tasks)
GRANT EXECUTE MANAGED TASK ON ACCOUNT TO ROLE {{ tasks_role }};
{%- endif %}

-- ==== part 2: after the first `snowflake apply` ====
-- Every role: the database, the schema and the warehouse its statements run in.
GRANT USAGE ON DATABASE {{ database }} TO ROLE {{ tasks_role }};
GRANT USAGE ON SCHEMA {{ database }}.{{ schema }} TO ROLE {{ tasks_role }};
GRANT USAGE ON DATABASE {{ database }} TO ROLE {{ reconciler_role }};
GRANT USAGE ON SCHEMA {{ database }}.{{ schema }} TO ROLE {{ reconciler_role }};
{%- if not serverless_tasks %}
-- 70_tasks.sql: WAREHOUSE = {{ warehouse }} (the tasks' runs)
GRANT USAGE ON WAREHOUSE {{ warehouse }} TO ROLE {{ tasks_role }};
{%- endif %}
-- the reconciler's completeness check: SELECT ... FROM SALES
GRANT USAGE ON WAREHOUSE {{ warehouse }} TO ROLE {{ reconciler_role }};
-- 70_tasks.sql: CREATE OR ALTER TASK (made by the deployer, owned by {{ tasks_role }})
GRANT OWNERSHIP ON FUTURE TASKS IN SCHEMA {{ database }}.{{ schema }} TO ROLE {{ tasks_role }};
GRANT OWNERSHIP ON ALL TASKS IN SCHEMA {{ database }}.{{ schema }} TO ROLE {{ tasks_role }}
  COPY CURRENT GRANTS;
-- MERGE_SALES: SELECT ... FROM {{ stream }} (reading a stream needs the stream and its table)
GRANT SELECT ON STREAM {{ database }}.{{ schema }}.{{ stream }} TO ROLE {{ tasks_role }};
-- MERGE_SALES: the stream's table; CLEANUP_RAW_SALES: DELETE FROM RAW_SALES
GRANT SELECT, DELETE ON TABLE {{ database }}.{{ schema }}.RAW_SALES TO ROLE {{ tasks_role }};
-- MERGE_SALES: MERGE INTO SALES (update, delete, insert branches), SELECT ... FROM SALES
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {{ database }}.{{ schema }}.SALES
  TO ROLE {{ tasks_role }};
-- MERGE_SALES: MERGE INTO SALES_TOMBSTONES; CLEANUP_RAW_SALES: DELETE FROM SALES_TOMBSTONES
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {{ database }}.{{ schema }}.SALES_TOMBSTONES
  TO ROLE {{ tasks_role }};
-- MERGE_SALES: DELETE FROM / INSERT INTO the work tables, and reads them
GRANT SELECT, INSERT, DELETE ON TABLE {{ database }}.{{ schema }}.SALES_CHANGES
  TO ROLE {{ tasks_role }};
GRANT SELECT, INSERT, DELETE ON TABLE {{ database }}.{{ schema }}.SALES_TOUCHED
  TO ROLE {{ tasks_role }};
-- MERGE_SALES: INVOICES and PRODUCTS recomputed (DELETE, then INSERT)
GRANT INSERT, DELETE ON TABLE {{ database }}.{{ schema }}.INVOICES TO ROLE {{ tasks_role }};
GRANT INSERT, DELETE ON TABLE {{ database }}.{{ schema }}.PRODUCTS TO ROLE {{ tasks_role }};
-- MERGE_SALES: INSERT INTO SALES_MERGE_LOG; CLEANUP_RAW_SALES: reads and trims it
GRANT SELECT, INSERT, DELETE ON TABLE {{ database }}.{{ schema }}.SALES_MERGE_LOG
  TO ROLE {{ tasks_role }};
-- the reconciler: COPY_HISTORY(TABLE_NAME => RAW_SALES) needs USAGE on the database and the
-- schema of the pipe and any privilege on the table (Snowflake: "COPY_HISTORY", usage notes)
GRANT SELECT ON TABLE {{ database }}.{{ schema }}.RAW_SALES TO ROLE {{ reconciler_role }};
-- the reconciler: SYSTEM$PIPE_STATUS('{{ pipe }}') (the pipe's owner or MONITOR on it)
GRANT MONITOR ON PIPE {{ database }}.{{ schema }}.{{ pipe }} TO ROLE {{ reconciler_role }};
-- the reconciler: ALTER PIPE {{ pipe }} REFRESH PREFIX = ... (OPERATE on the pipe)
GRANT OPERATE ON PIPE {{ database }}.{{ schema }}.{{ pipe }} TO ROLE {{ reconciler_role }};
-- the reconciler's completeness check: SELECT ... FROM SALES
GRANT SELECT ON TABLE {{ database }}.{{ schema }}.SALES TO ROLE {{ reconciler_role }};
-- the reconciler: SHOW TASKS and TASK_HISTORY(TASK_NAME => ...) show a task to a role with
-- MONITOR on it (Snowflake: "TASK_HISTORY", usage notes)
GRANT MONITOR ON TASK {{ database }}.{{ schema }}.{{ merge_task }} TO ROLE {{ reconciler_role }};
GRANT MONITOR ON TASK {{ database }}.{{ schema }}.{{ cleanup_task }}
  TO ROLE {{ reconciler_role }};
-- the reconciler: SHOW STREAMS shows a stream to a role with a privilege on it (SELECT is the
-- only one a stream has; reading it outside DML does not move its offset)
GRANT SELECT ON STREAM {{ database }}.{{ schema }}.{{ stream }} TO ROLE {{ reconciler_role }};
