-- The least a cdc-daemon role needs in watermark mode. Run as an administrator, with psql:
--   psql -v role=cdc_daemon -v table=public.ecommerce_sales -v schema=cdc -f cdc_role.sql
-- then set the role's password (ALTER ROLE ... PASSWORD) outside of any file.
--
-- * SELECT on the captured table (and USAGE on its schema);
-- * the ledger schema, owned by the role, so that `cdc-daemon init` can create its tables;
-- * nothing else: no superuser, no replication, no write access to the source table.
--   pg_locks (the late-commit fence) and pg_stat_activity (database and backend type of other
--   sessions) are readable by every role.

CREATE ROLE :"role" LOGIN;
GRANT CONNECT ON DATABASE :"DBNAME" TO :"role";
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', split_part(:'table', '.', 1), :'role') \gexec
SELECT format('GRANT SELECT ON %s TO %I', :'table', :'role') \gexec
CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION :"role";

-- Logical mode (capture.mode = "logical") needs, on top:
-- * REPLICATION, to create, read and advance its slot:
--     ALTER ROLE cdc_daemon REPLICATION;
-- * the publication, made by the table's owner (the role does not own the table), before
--   `cdc-daemon init`, with the name the daemon derives (cdc_<schema>_<table>) or the one in
--   capture.publication_name:
--     CREATE PUBLICATION cdc_public_ecommerce_sales FOR TABLE public.ecommerce_sales;
-- * REPLICA IDENTITY FULL on a table with TOASTable columns (see README, "TOAST"):
--     ALTER TABLE public.ecommerce_sales REPLICA IDENTITY FULL;
