{#- The daemon's columns of a change and where it was loaded from (landing and work tables). -#}
{%- macro change_columns(t) %}
  _CDC_OP VARCHAR(1),
  _CDC_SEQ NUMBER(38, 0),
  _CDC_TS TIMESTAMP_TZ,
  _CDC_UNCHANGED VARCHAR,
  _CDC_QUARANTINED VARCHAR,
  _FILE VARCHAR,
  _FILE_ROW NUMBER(19, 0),
  _LOADED_AT TIMESTAMP_LTZ
{%- if t.keyless %},
  _CDC_NTH NUMBER(19, 0),
  _CDC_ROW VARCHAR(32)
{%- endif %}
{%- endmacro -%}
{%- for t in tables %}
{%- set n = t.names %}
-- ---- {{ n.source }} -> {{ n.name }} ----
-- {{ n.landing }}: every change of {{ n.source }} as it arrived, append-only (the pipe's
-- target, the stream's source). The source's columns under their own names in upper case
-- (JSON, arrays and bytea as their text; the merge converts them), then the daemon's.
CREATE TABLE IF NOT EXISTS {{ n.landing }} (
{%- for c in t.columns %}
  {{ c.q }} {{ c.type.landing }},
{%- endfor %}
{{- change_columns(t) }}
);

{%- if t.keyless %}

-- {{ n.name }} (keyless): one row per copy of each source row, exact duplicates included. A
-- row is known by _CDC_ROW (the BLAKE2b-128 digest of its values as the objects carry them);
-- each copy by the change (or snapshot row) that made it: its commit LSN (_CDC_SEQ; for a
-- snapshot row the snapshot's consistent point) and its number there (_CDC_NTH). A value
-- Snowflake cannot hold exactly is NULL and named in _CDC_QUARANTINED
-- (docs/logical.md#keyless-tables).
CREATE TABLE IF NOT EXISTS {{ n.name }} (
{%- for c in t.columns %}
  {{ c.q }} {{ c.type.final }},
{%- endfor %}
  _CDC_ROW VARCHAR(32) NOT NULL,
  _CDC_SEQ NUMBER(38, 0) NOT NULL,
  _CDC_NTH NUMBER(19, 0) NOT NULL,
  _CDC_TS TIMESTAMP_TZ,
  _CDC_QUARANTINED VARCHAR,
  _MERGED_AT TIMESTAMP_LTZ,
{%- for name, type in t.own_columns(n.name) %}
  {{ name }} {{ type }},
{%- endfor %}
  PRIMARY KEY (_CDC_SEQ, _CDC_NTH)
);

-- {{ n.rows }}: every change of a keyless table counted once (by _CDC_SEQ, _CDC_NTH): a copy
-- more (S, I, U) or less (D) of the row _CDC_ROW. The merge counts the S rows of the latest
-- snapshot (the highest _CDC_SEQ of an S row) and the changes committed after it.
CREATE TABLE IF NOT EXISTS {{ n.rows }} (
  _CDC_ROW VARCHAR(32) NOT NULL,
  _CDC_SEQ NUMBER(38, 0) NOT NULL,
  _CDC_NTH NUMBER(19, 0) NOT NULL,
  _CDC_OP VARCHAR(1) NOT NULL,
  _CDC_TS TIMESTAMP_TZ,
  PRIMARY KEY (_CDC_SEQ, _CDC_NTH)
);
{%- else %}

-- {{ n.name }}: one row per source key, the change with the highest _CDC_SEQ. A value
-- Snowflake cannot hold exactly is NULL and named in _CDC_QUARANTINED (column:reason;...),
-- the original in the quarantine prefix (docs/design.md, "Quarantine").
CREATE TABLE IF NOT EXISTS {{ n.name }} (
{%- for c in t.columns %}
  {{ c.q }} {{ c.type.final }}{% if c.key %} NOT NULL{% endif %},
{%- endfor %}
  _CDC_SEQ NUMBER(38, 0) NOT NULL,
  _CDC_TS TIMESTAMP_TZ,
  _CDC_QUARANTINED VARCHAR,
  _MERGED_AT TIMESTAMP_LTZ,
{%- for name, type in t.own_columns(n.name) %}
  {{ name }} {{ type }},
{%- endfor %}
  PRIMARY KEY ({% for c in t.key %}{{ c.q }}{{ ", " if not loop.last }}{% endfor %})
);

{%- endif %}

-- Keys deleted at _CDC_SEQ: an older change of a deleted key that arrives later (a redelivered
-- object, a backfill) must not bring the row back.
CREATE TABLE IF NOT EXISTS {{ n.tombstones }} (
{%- for c in t.key %}
  {{ c.q }} {{ c.type.final }} NOT NULL,
{%- endfor %}
  _CDC_SEQ NUMBER(38, 0) NOT NULL,
  _DELETED_AT TIMESTAMP_LTZ
);

-- Work tables of the merge task (filled and read inside its transaction; DDL in a task body
-- would commit the transaction early, so they are created here, once): one change per key,
-- converted to the current-state types; and the rows a merge touched, before and after.
CREATE TABLE IF NOT EXISTS {{ n.changes }} (
{%- for c in t.columns %}
  {{ c.q }} {{ c.type.final }},
{%- endfor %}
{{- change_columns(t) }}
);
{%- if t.models %}
CREATE TABLE IF NOT EXISTS {{ n.touched }} LIKE {{ n.name }};
{%- endif %}
{%- if t.history %}

-- {{ n.history }} (history = true): one row per version of each row, in the current-state
-- types. A version is valid from its change's source commit time (_CDC_VALID_FROM) until the
-- next version's or its delete's (_CDC_VALID_TO, NULL while it is current); a delete is a row
-- of its own (_CDC_OP = 'D', the key only) whose validity is empty (_CDC_VALID_TO =
-- _CDC_VALID_FROM). The rows as of time X:
--   _CDC_VALID_FROM <= X AND (_CDC_VALID_TO IS NULL OR X < _CDC_VALID_TO)
-- The merge task writes it in the transaction that merges the same changes into {{ n.name }}.
CREATE TABLE IF NOT EXISTS {{ n.history }} (
{%- for c in t.columns %}
  {{ c.q }} {{ c.type.final }}{% if c.key %} NOT NULL{% endif %},
{%- endfor %}
{%- for name, type in history_columns %}
  {{ name }} {{ type }}{{ "," if not loop.last }}
{%- endfor %}
);
-- Run with the CREATE only (snowflake apply): the rows merged before the history existed are
-- each a first version, valid from their last change's commit time.
INSERT INTO {{ n.history }} (
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  _CDC_OP, _CDC_SEQ, _CDC_QUARANTINED, _CDC_VALID_FROM, _CDC_VALID_TO, _CDC_IS_CURRENT,
  _CDC_SYNCED_AT
)
SELECT
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  COALESCE(_CDC_OP, 'I'), _CDC_SEQ, _CDC_QUARANTINED, COALESCE(_CDC_TS, _MERGED_AT::TIMESTAMP_TZ), NULL, TRUE,
  CURRENT_TIMESTAMP()
FROM {{ n.name }}
WHERE {{ t.live }};
{%- endif %}

-- One row per merge run: the cleanup task only deletes landing rows loaded well before one.
CREATE TABLE IF NOT EXISTS {{ n.merge_log }} (
  MERGED_AT TIMESTAMP_LTZ NOT NULL,
  CHANGES NUMBER(19, 0) NOT NULL
);
{%- for ddl in model_ddl[n.name] %}

{{ ddl }}
{%- endfor %}
{% endfor %}
