-- A schema-3 ledger (cdc-daemon at 1eb4f5c) written by that version's own Store and BackfillLedger,
-- then dumped with pg_dump --schema=cdc --inserts: stream batches (loaded, uploaded, missing, pending
-- with a redo and a failed attempt), a group's snapshot chunks (loaded, uploaded, pending) and a
-- backfill run (chunks loaded, uploaded, pending, planned). Read by test_ledger_upgrade.py.
--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: cdc; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA cdc;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: backfill_chunks; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.backfill_chunks (
    run_id text NOT NULL,
    day date NOT NULL,
    status text NOT NULL,
    rows_estimate bigint NOT NULL,
    rows bigint,
    raw_bytes bigint,
    size bigint,
    objects jsonb,
    checksum text,
    read_ts text,
    seq_basis bigint,
    attempts integer DEFAULT 0 NOT NULL,
    error text,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    uploaded_at timestamp with time zone,
    load_status text,
    load_error text,
    loaded_at timestamp with time zone,
    refreshed_at timestamp with time zone,
    CONSTRAINT backfill_chunks_status_check CHECK ((status = ANY (ARRAY['planned'::text, 'pending'::text, 'uploaded'::text])))
);


--
-- Name: backfill_runs; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.backfill_runs (
    run_id text NOT NULL,
    table_name text NOT NULL,
    day_from date NOT NULL,
    day_to date NOT NULL,
    fingerprint text NOT NULL,
    config jsonb NOT NULL,
    status text NOT NULL,
    jobs integer NOT NULL,
    error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone,
    CONSTRAINT backfill_runs_check CHECK ((day_to > day_from)),
    CONSTRAINT backfill_runs_status_check CHECK ((status = ANY (ARRAY['running'::text, 'done'::text, 'failed'::text])))
);


--
-- Name: batches; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.batches (
    table_name text NOT NULL,
    batch_id text NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    status text NOT NULL,
    rows bigint NOT NULL,
    raw_bytes bigint NOT NULL,
    size bigint NOT NULL,
    objects jsonb NOT NULL,
    checksum text NOT NULL,
    read_ts text NOT NULL,
    spec jsonb NOT NULL,
    attempts integer DEFAULT 1 NOT NULL,
    error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    uploaded_at timestamp with time zone,
    loaded_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    refreshed_at timestamp with time zone,
    CONSTRAINT batches_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'uploaded'::text, 'loaded'::text, 'failed'::text, 'missing'::text])))
);


--
-- Name: group_tables; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.group_tables (
    group_name text NOT NULL,
    table_name text NOT NULL,
    status text NOT NULL,
    error text,
    since bigint,
    seq bigint,
    floor bigint,
    ranges jsonb DEFAULT '[]'::jsonb NOT NULL,
    chunks integer DEFAULT 0 NOT NULL,
    rows bigint DEFAULT 0 NOT NULL,
    joined_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT group_tables_status_check CHECK ((status = ANY (ARRAY['joining'::text, 'streaming'::text, 'left'::text, 'failed'::text])))
);


--
-- Name: join_chunks; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.join_chunks (
    group_name text NOT NULL,
    table_name text NOT NULL,
    seq bigint NOT NULL,
    part integer NOT NULL,
    chunk integer NOT NULL,
    attempt integer NOT NULL,
    status text NOT NULL,
    after_key jsonb,
    last_key jsonb,
    rows bigint NOT NULL,
    raw_bytes bigint NOT NULL,
    size bigint NOT NULL,
    objects jsonb NOT NULL,
    checksum text NOT NULL,
    read_ts text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    uploaded_at timestamp with time zone,
    load_status text,
    load_error text,
    loaded_at timestamp with time zone,
    refreshed_at timestamp with time zone,
    CONSTRAINT join_chunks_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'uploaded'::text])))
);


--
-- Name: meta; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.meta (
    key text NOT NULL,
    value text NOT NULL
);


--
-- Name: positions; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.positions (
    table_name text NOT NULL,
    mode text NOT NULL,
    low bigint,
    high bigint,
    state jsonb DEFAULT '{}'::jsonb NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Name: relations; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.relations (
    table_name text NOT NULL,
    columns jsonb NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Name: warehouse_columns; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.warehouse_columns (
    table_name text NOT NULL,
    columns text[] NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Name: warehouse_health; Type: TABLE; Schema: cdc; Owner: -
--

CREATE TABLE cdc.warehouse_health (
    table_name text NOT NULL,
    checked_at timestamp with time zone NOT NULL,
    health jsonb NOT NULL
);


--
-- Data for Name: backfill_chunks; Type: TABLE DATA; Schema: cdc; Owner: -
--

INSERT INTO cdc.backfill_chunks VALUES ('r1', '2011-01-04', 'planned', 10, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, '2026-12-07 16:42:39.581838+00', NULL, NULL, NULL, NULL, NULL);
INSERT INTO cdc.backfill_chunks VALUES ('r1', '2011-01-02', 'uploaded', 10, 10, 400, 120, '[{"day": "2011-01-02", "key": "raw/public.ecommerce_sales/dt=2011-01-02/backfill-r1-2011-01-02.csv.gz", "rows": 10, "size": 120, "sha256": "6261636b66696c6c2d72312d323031312d30312d3032323031312d30312d3032", "columns": ["id", "quantity"], "raw_bytes": 400, "quarantine": null}]', 'ac7e16db06325432716cc5b1dbc6fffd65b206411fc008a3c40567ce1d057fca', '2024-03-01T00:00:00.000000Z', NULL, 1, NULL, '2026-12-07 16:42:39.587866+00', '2026-12-07 16:42:39.587866+00', NULL, NULL, NULL, NULL);
INSERT INTO cdc.backfill_chunks VALUES ('r1', '2011-01-03', 'pending', 10, 10, 400, 120, '[{"day": "2011-01-03", "key": "raw/public.ecommerce_sales/dt=2011-01-03/backfill-r1-2011-01-03.csv.gz", "rows": 10, "size": 120, "sha256": "6261636b66696c6c2d72312d323031312d30312d3033323031312d30312d3033", "columns": ["id", "quantity"], "raw_bytes": 400, "quarantine": null}]', '412f43caffcf460c565b7a8660fdf5b763f78b15b0b2a99e2f5fcdae59c45130', '2024-03-01T00:00:00.000000Z', NULL, 1, 'SlowDown', '2026-12-07 16:42:39.588711+00', NULL, NULL, NULL, NULL, NULL);
INSERT INTO cdc.backfill_chunks VALUES ('r1', '2011-01-01', 'uploaded', 10, 10, 400, 120, '[{"day": "2011-01-01", "key": "raw/public.ecommerce_sales/dt=2011-01-01/backfill-r1-2011-01-01.csv.gz", "rows": 10, "size": 120, "sha256": "6261636b66696c6c2d72312d323031312d30312d3031323031312d30312d3031", "columns": ["id", "quantity"], "raw_bytes": 400, "quarantine": null}]', 'bc85afa0f0eb59704d484f34e8461359547e89ea61c23044bbf02e5c6796edfa', '2024-03-01T00:00:00.000000Z', NULL, 1, NULL, '2026-12-07 16:42:39.586737+00', '2026-12-07 16:42:39.586737+00', 'loaded', NULL, '2026-12-07 16:42:39.594449+00', NULL);


--
-- Data for Name: backfill_runs; Type: TABLE DATA; Schema: cdc; Owner: -
--

INSERT INTO cdc.backfill_runs VALUES ('r1', 'public.ecommerce_sales', '2011-01-01', '2011-01-05', 'fp', '{"jobs": 2}', 'running', 2, NULL, '2026-12-07 16:42:39.581838+00', '2026-12-07 16:42:39.581838+00', NULL);


--
-- Data for Name: batches; Type: TABLE DATA; Schema: cdc; Owner: -
--

INSERT INTO cdc.batches VALUES ('public.ecommerce_sales', '00000000000000000100-00000000000000000200', 100, 200, 'uploaded', 90, 3640, 1092, '[{"day": "2024-01-02", "key": "raw/public.ecommerce_sales/dt=2024-01-02/b2.csv.gz", "rows": 90, "size": 1080, "sha256": "6232323032342d30312d30320000000000000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 3600, "quarantine": null}, {"day": "2024-01-02", "key": "raw/public.ecommerce_sales/dt=2024-01-02/b2-q.csv.gz", "rows": 1, "size": 12, "sha256": "62322d71323032342d30312d3032000000000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 40, "quarantine": "2024-01-02"}]', '9d0bd65cc34501db08eb83f7c5d9b357ca1ba1d05957bdf2378699af336dd349', '2024-01-03T00:00:00.000000Z', '{"gaps": [[101, 101]], "caught": [], "state_after": {"low": 200, "gaps": [], "high": 200, "fences": []}}', 1, NULL, '2026-12-07 16:42:39.552935+00', '2026-12-07 16:42:39.553413+00', NULL, '2026-12-07 16:42:39.553413+00', NULL);
INSERT INTO cdc.batches VALUES ('public.ecommerce_sales', 'start-00000000000000000100', -9223372036854775808, 100, 'loaded', 100, 4000, 1200, '[{"day": "2024-01-01", "key": "raw/public.ecommerce_sales/dt=2024-01-01/b1.csv.gz", "rows": 60, "size": 720, "sha256": "6231323032342d30312d30310000000000000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 2400, "quarantine": null}, {"day": "2024-01-02", "key": "raw/public.ecommerce_sales/dt=2024-01-02/b1.csv.gz", "rows": 40, "size": 480, "sha256": "6231323032342d30312d30320000000000000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 1600, "quarantine": null}]', '70706b2422dc086ccdf91af1b15bf4f377fceb018616b0e337759a4230f14038', '2024-01-02T00:00:00.000000Z', '{"gaps": [[-9223372036854775807, -9223372036854775807]], "caught": [], "state_after": {"low": 100, "gaps": [], "high": 100, "fences": []}}', 1, NULL, '2026-12-07 16:42:39.549536+00', '2026-12-07 16:42:39.551372+00', '2026-12-07 16:42:39.556202+00', '2026-12-07 16:42:39.556202+00', NULL);
INSERT INTO cdc.batches VALUES ('public.ecommerce_sales', '00000000000000000200-00000000000000000300', 200, 300, 'missing', 100, 4000, 1200, '[{"day": "2024-01-03", "key": "raw/public.ecommerce_sales/dt=2024-01-03/b3.csv.gz", "rows": 100, "size": 1200, "sha256": "6233323032342d30312d30330000000000000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 4000, "quarantine": null}]', 'd18e2e25305f374462bb9efb8e15f30c9bd56e0c7628151995115dadaeee98e4', '2024-01-04T00:00:00.000000Z', '{"gaps": [[201, 201]], "caught": [], "state_after": {"low": 300, "gaps": [], "high": 300, "fences": []}}', 1, 'not in COPY_HISTORY', '2026-12-07 16:42:39.554776+00', '2026-12-07 16:42:39.555193+00', NULL, '2026-12-07 16:42:39.561812+00', '2026-12-07 16:42:39.556808+00');
INSERT INTO cdc.batches VALUES ('public.ecommerce_sales', '00000000000000000300-00000000000000000400', 300, 400, 'pending', 100, 4000, 1200, '[{"day": "2024-01-04", "key": "raw/public.ecommerce_sales/dt=2024-01-04/b4.csv.gz", "rows": 100, "size": 1200, "sha256": "6234323032342d30312d30340000000000000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 4000, "quarantine": null}]', '1c576bd98b4120fa30d806817460f7e9747b66cbb751be30c4e26a23d6172299', '2024-01-05T00:00:00.000000Z', '{"gaps": [[301, 301]], "caught": [], "state_after": {"low": 400, "gaps": [], "high": 400, "fences": []}}', 3, 'SlowDown', '2026-12-07 16:42:39.562352+00', NULL, NULL, '2026-12-07 16:42:39.563165+00', NULL);


--
-- Data for Name: group_tables; Type: TABLE DATA; Schema: cdc; Owner: -
--

INSERT INTO cdc.group_tables VALUES ('shop', 'public.items', 'joining', NULL, 5, 7, NULL, '[{"done": true, "after": ["100"], "lower": null, "upper": null, "chunks": 2}, {"done": false, "after": null, "lower": ["100"], "upper": null, "chunks": 0}]', 2, 100, '2026-12-07 16:42:39.563539+00', '2026-12-07 16:42:39.570548+00');


--
-- Data for Name: join_chunks; Type: TABLE DATA; Schema: cdc; Owner: -
--

INSERT INTO cdc.join_chunks VALUES ('shop', 'public.items', 7, 0, 1, 1, 'uploaded', '["50"]', '["100"]', 50, 2000, 600, '[{"day": "2024-02-01", "key": "raw/public.ecommerce_sales/dt=2024-02-01/join-2.csv.gz", "rows": 50, "size": 600, "sha256": "6a6f696e2d32323032342d30322d303100000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 2000, "quarantine": null}]', 'e314ee3e6f9fcc5ee203875093e207df0cd106bae7a59ab5910021f0dce026ab', '2024-02-01T00:00:00.000000Z', '2026-12-07 16:42:39.570107+00', '2026-12-07 16:42:39.570548+00', NULL, NULL, NULL, NULL);
INSERT INTO cdc.join_chunks VALUES ('shop', 'public.items', 7, 0, 0, 1, 'uploaded', NULL, '["50"]', 50, 2000, 600, '[{"day": "2024-02-01", "key": "raw/public.ecommerce_sales/dt=2024-02-01/join-1.csv.gz", "rows": 50, "size": 600, "sha256": "6a6f696e2d31323032342d30322d303100000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 2000, "quarantine": null}]', '4c423de713b59cfaa713936b949f1f35c32e107b6bd4eac17d25cc43d9b72f2c', '2024-02-01T00:00:00.000000Z', '2026-12-07 16:42:39.564201+00', '2026-12-07 16:42:39.564973+00', 'loaded', NULL, '2026-12-07 16:42:39.572646+00', NULL);
INSERT INTO cdc.join_chunks VALUES ('shop', 'public.items', 7, 1, 0, 2, 'pending', '["100"]', '["150"]', 50, 2000, 600, '[{"day": "2024-02-02", "key": "raw/public.ecommerce_sales/dt=2024-02-02/join-3.csv.gz", "rows": 50, "size": 600, "sha256": "6a6f696e2d33323032342d30322d303200000000000000000000000000000000", "columns": ["id", "quantity"], "raw_bytes": 2000, "quarantine": null}]', '081ea8b2361b544f4cd42a56c7ee1d8ad8f293ba3a5de883670276be4f65e5f7', '2024-02-01T00:00:00.000000Z', '2026-12-07 16:42:39.574128+00', NULL, NULL, NULL, NULL, NULL);


--
-- Data for Name: meta; Type: TABLE DATA; Schema: cdc; Owner: -
--

INSERT INTO cdc.meta VALUES ('schema_version', '3');


--
-- Data for Name: positions; Type: TABLE DATA; Schema: cdc; Owner: -
--

INSERT INTO cdc.positions VALUES ('public.ecommerce_sales', 'watermark', 300, 300, '{"low": 300, "gaps": [], "high": 300, "fences": []}', '2026-12-07 16:42:39.555193+00');


--
-- Data for Name: relations; Type: TABLE DATA; Schema: cdc; Owner: -
--



--
-- Data for Name: warehouse_columns; Type: TABLE DATA; Schema: cdc; Owner: -
--



--
-- Data for Name: warehouse_health; Type: TABLE DATA; Schema: cdc; Owner: -
--



--
-- Name: backfill_chunks backfill_chunks_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.backfill_chunks
    ADD CONSTRAINT backfill_chunks_pkey PRIMARY KEY (run_id, day);


--
-- Name: backfill_runs backfill_runs_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.backfill_runs
    ADD CONSTRAINT backfill_runs_pkey PRIMARY KEY (run_id);


--
-- Name: batches batches_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.batches
    ADD CONSTRAINT batches_pkey PRIMARY KEY (table_name, batch_id);


--
-- Name: group_tables group_tables_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.group_tables
    ADD CONSTRAINT group_tables_pkey PRIMARY KEY (group_name, table_name);


--
-- Name: join_chunks join_chunks_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.join_chunks
    ADD CONSTRAINT join_chunks_pkey PRIMARY KEY (group_name, table_name, seq, part, chunk);


--
-- Name: meta meta_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.meta
    ADD CONSTRAINT meta_pkey PRIMARY KEY (key);


--
-- Name: positions positions_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.positions
    ADD CONSTRAINT positions_pkey PRIMARY KEY (table_name);


--
-- Name: relations relations_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.relations
    ADD CONSTRAINT relations_pkey PRIMARY KEY (table_name);


--
-- Name: warehouse_columns warehouse_columns_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.warehouse_columns
    ADD CONSTRAINT warehouse_columns_pkey PRIMARY KEY (table_name);


--
-- Name: warehouse_health warehouse_health_pkey; Type: CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.warehouse_health
    ADD CONSTRAINT warehouse_health_pkey PRIMARY KEY (table_name);


--
-- Name: backfill_runs_range; Type: INDEX; Schema: cdc; Owner: -
--

CREATE INDEX backfill_runs_range ON cdc.backfill_runs USING btree (table_name, day_from, day_to, fingerprint);


--
-- Name: batches_status; Type: INDEX; Schema: cdc; Owner: -
--

CREATE INDEX batches_status ON cdc.batches USING btree (table_name, status);


--
-- Name: backfill_chunks backfill_chunks_run_id_fkey; Type: FK CONSTRAINT; Schema: cdc; Owner: -
--

ALTER TABLE ONLY cdc.backfill_chunks
    ADD CONSTRAINT backfill_chunks_run_id_fkey FOREIGN KEY (run_id) REFERENCES cdc.backfill_runs(run_id) ON DELETE CASCADE;


--
-- PostgreSQL database dump complete
--


