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
-- 10_integration.sql: CREATE STORAGE INTEGRATION IF NOT EXISTS {{ integration }}; as its owner,
-- snowflake apply also runs DESC INTEGRATION and ALTER STORAGE INTEGRATION ... SET on it
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
{%- for t in tables %}
{%- set n = t.names %}
{%- set at = database ~ "." ~ schema ~ "." %}
-- ---- {{ n.source }} -> {{ n.name }} ----
-- {{ n.merge_task }}: SELECT ... FROM {{ n.stream }} (reading a stream needs the stream and its
-- table)
GRANT SELECT ON STREAM {{ at }}{{ n.stream }} TO ROLE {{ tasks_role }};
-- {{ n.merge_task }}: the stream's table; {{ n.cleanup_task }}: DELETE FROM {{ n.landing }}
GRANT SELECT, DELETE ON TABLE {{ at }}{{ n.landing }} TO ROLE {{ tasks_role }};
-- {{ n.merge_task }}: MERGE INTO {{ n.name }} (update, delete, insert branches), SELECT ... FROM
-- {{ n.name }}
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {{ at }}{{ n.name }} TO ROLE {{ tasks_role }};
-- {{ n.merge_task }}: MERGE INTO {{ n.tombstones }}; {{ n.cleanup_task }}: DELETE FROM it
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {{ at }}{{ n.tombstones }}
  TO ROLE {{ tasks_role }};
-- {{ n.merge_task }}: DELETE FROM / INSERT INTO the work tables, and reads them
GRANT SELECT, INSERT, DELETE ON TABLE {{ at }}{{ n.changes }} TO ROLE {{ tasks_role }};
{%- if t.models %}
GRANT SELECT, INSERT, DELETE ON TABLE {{ at }}{{ n.touched }} TO ROLE {{ tasks_role }};
{%- endif %}
{%- if t.keyless %}
-- {{ n.merge_task }}: INSERT INTO {{ n.rows }} (each change counted once), DELETE FROM it (the
-- changes an earlier snapshot no longer needs)
GRANT SELECT, INSERT, DELETE ON TABLE {{ at }}{{ n.rows }} TO ROLE {{ tasks_role }};
{%- endif %}
{%- if t.history %}
-- {{ n.merge_task }}: INSERT INTO {{ n.history }} and MERGE INTO it (validity updates)
GRANT SELECT, INSERT, UPDATE ON TABLE {{ at }}{{ n.history }} TO ROLE {{ tasks_role }};
{%- endif %}
{%- for m in model_names[n.name] %}
-- {{ n.merge_task }}: the model {{ m }} recomputed (DELETE, then INSERT)
GRANT INSERT, DELETE ON TABLE {{ at }}{{ m }} TO ROLE {{ tasks_role }};
{%- endfor %}
-- {{ n.merge_task }}: INSERT INTO {{ n.merge_log }}; {{ n.cleanup_task }}: reads and trims it
GRANT SELECT, INSERT, DELETE ON TABLE {{ at }}{{ n.merge_log }} TO ROLE {{ tasks_role }};
-- the reconciler: COPY_HISTORY(TABLE_NAME => {{ n.landing }}) needs USAGE on the database and
-- the schema of the pipe and any privilege on the table (Snowflake: "COPY_HISTORY", usage notes)
GRANT SELECT ON TABLE {{ at }}{{ n.landing }} TO ROLE {{ reconciler_role }};
-- the reconciler: SYSTEM$PIPE_STATUS('{{ n.pipe }}') (the pipe's owner or MONITOR on it)
GRANT MONITOR ON PIPE {{ at }}{{ n.pipe }} TO ROLE {{ reconciler_role }};
-- the reconciler: ALTER PIPE {{ n.pipe }} REFRESH PREFIX = ... (OPERATE on the pipe)
GRANT OPERATE ON PIPE {{ at }}{{ n.pipe }} TO ROLE {{ reconciler_role }};
-- the reconciler: SHOW TASKS and TASK_HISTORY(TASK_NAME => ...) show a task to a role with
-- MONITOR on it (Snowflake: "TASK_HISTORY", usage notes)
GRANT MONITOR ON TASK {{ at }}{{ n.merge_task }} TO ROLE {{ reconciler_role }};
GRANT MONITOR ON TASK {{ at }}{{ n.cleanup_task }} TO ROLE {{ reconciler_role }};
-- the reconciler: SHOW STREAMS shows a stream to a role with a privilege on it (SELECT is the
-- only one a stream has; reading it outside DML does not move its offset)
GRANT SELECT ON STREAM {{ at }}{{ n.stream }} TO ROLE {{ reconciler_role }};
{%- endfor %}
-- the reconciler: the rows of each current-state table (counts), and the completeness
-- check's SELECT ... FROM SALES
{%- for t in tables %}
GRANT SELECT ON TABLE {{ database }}.{{ schema }}.{{ t.names.name }} TO ROLE {{ reconciler_role }};
{%- endfor %}
