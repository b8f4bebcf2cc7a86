{#- The daemon's columns of a change and where it was loaded from (landing and work tables). -#}
{%- macro change_columns() %}
  _CDC_OP VARCHAR(1),
  _CDC_SEQ NUMBER(38, 0),
  _CDC_TS TIMESTAMP_TZ,
  _CDC_UNCHANGED VARCHAR,
  _CDC_QUARANTINED VARCHAR,
  _FILE VARCHAR,
  _FILE_ROW NUMBER(19, 0),
  _LOADED_AT TIMESTAMP_LTZ
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
{{- change_columns() }}
);

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
{{- change_columns() }}
);
{%- if t.models %}
CREATE TABLE IF NOT EXISTS {{ n.touched }} LIKE {{ n.name }};
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
