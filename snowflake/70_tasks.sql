{#- Key equality between two aliases, the key's columns, and "the change carries column c". -#}
{%- macro on(t, a, b) -%}
{%- for c in t.key %}{{ a }}.{{ c.q }} = {{ b }}.{{ c.q }}{{ " AND " if not loop.last }}{% endfor -%}
{%- endmacro -%}
{%- macro keys(t) -%}
{%- for c in t.key %}{{ c.q }}{{ ", " if not loop.last }}{% endfor -%}
{%- endmacro -%}
{%- macro carried(c) -%}
IFF(POSITION('{{ c.needle }}' IN ',' || COALESCE(_CDC_UNCHANGED, '') || ',') = 0, 1, 0)
{%- endmacro -%}
-- One merge task per table, every {{ merge_schedule }}, when its stream holds changes; one
-- transaction:
--   1. the stream's changes, one per key (highest _CDC_SEQ, then the latest read _CDC_TS: a
--      backfill re-reads a row at the same _CDC_SEQ in watermark mode; a duplicate of a change
--      is the same change), converted to the current-state types, into <T>_CHANGES. A value an
--      update left unchanged (TOASTed, named in _cdc_unchanged) is taken from the latest change
--      that carries it; a column no change carries is named in the work row's _CDC_UNCHANGED
--      and keeps its current value. Reading the stream in a committed DML moves its offset;
--   2. the rows the changes touch, as they were (for the models);
--   3. MERGE into <T>: a newer change wins, D deletes (deletes = "soft": keeps the row with
--      _CDC_DELETED_AT, the delete's commit time, which a newer change of the key clears), a
--      change older than the row or than the key's tombstone is ignored; one source row per key, so never "Duplicate row detected
--      during DML action"; a change whose values Snowflake cannot hold carries them as NULL
--      and names them in _CDC_QUARANTINED (a later change clears it), a delete deletes;
--   4. tombstones for deletes;
--   5. the rows as they are now, and the models on <T> (snowflake/models/<T>/) recomputed for
--      the touched keys only;
--   with history = true, before 3: every change as a version in <T>_HISTORY, and the validity
--   of the touched keys' versions.
-- snowflake.serverless_tasks: the tasks run on Snowflake-managed compute (no WAREHOUSE; the
-- owner needs EXECUTE MANAGED TASK), billed per second of work, not per warehouse minute.
-- The statements between BEGIN TRANSACTION and COMMIT are what the local task runner runs. A
-- failure rolls the transaction back and re-raises (Snowflake Scripting: "EXCEPTION", "RAISE"
-- without a name raises the same exception again), so the run fails as a whole.
{%- for t in tables %}
{%- set n = t.names %}
{#- Names in a task body are fully qualified: nothing depends on the session's schema. #}
{%- set p = database ~ "." ~ schema ~ "." %}
{#- The value columns an update can leave unchanged: each has a window in the changes' SELECT. #}
{%- set toastable = t.values | selectattr("toastable") | list %}

-- ---- {{ n.merge_task }}: {{ n.stream }} -> {{ n.name }}{% for m in model_names[n.name] %}, {{ m }}{% endfor %} ----
ALTER TASK IF EXISTS {{ n.merge_task }} SUSPEND;
CREATE OR ALTER TASK {{ n.merge_task }}
{%- if serverless_tasks %}
  USER_TASK_MANAGED_INITIAL_WAREHOUSE_SIZE = 'XSMALL'
{%- else %}
  WAREHOUSE = {{ warehouse }}
{%- endif %}
  SCHEDULE = '{{ merge_schedule }}'
  WHEN SYSTEM$STREAM_HAS_DATA('{{ database }}.{{ schema }}.{{ n.stream }}')
AS
EXECUTE IMMEDIATE $$
BEGIN
BEGIN TRANSACTION;
{%- if t.keyless %}
{#- A keyless table (capture.logical.keyless, docs/logical.md#keyless-tables): every change
    counted once into n.rows (by _CDC_SEQ, its commit LSN or its snapshot's consistent point,
    and _CDC_NTH, its number there), then each touched row's copies written again from the
    count: the S rows of the latest snapshot (the highest _CDC_SEQ of an S row) plus the I and
    U rows minus the D rows committed after it. A copy is one positive change, the newest ones
    kept; its values come from this run's changes or from the row's current copies (equal
    values, equal _CDC_ROW). A newer snapshot's rows replace the earlier snapshot whole: every
    row is then written again, and what the count no longer needs is dropped from n.rows. #}
DELETE FROM {{ p }}{{ n.changes }};
INSERT INTO {{ p }}{{ n.changes }} (
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  _CDC_OP, _CDC_SEQ, _CDC_TS, _CDC_UNCHANGED, _CDC_QUARANTINED, _FILE, _FILE_ROW, _LOADED_AT,
  _CDC_NTH, _CDC_ROW
)
SELECT
{%- for c in t.columns %}
  {{ c.type.converted(c.q) }},
{%- endfor %}
  _CDC_OP, _CDC_SEQ, _CDC_TS, _CDC_UNCHANGED, _CDC_QUARANTINED, _FILE, _FILE_ROW, _LOADED_AT,
  _CDC_NTH, _CDC_ROW
FROM (
  SELECT *, ROW_NUMBER() OVER (
    PARTITION BY _CDC_SEQ, _CDC_NTH ORDER BY _LOADED_AT DESC, _FILE DESC, _FILE_ROW DESC
  ) AS _RN
  FROM {{ p }}{{ n.stream }}
)
WHERE _RN = 1;
INSERT INTO {{ p }}{{ n.rows }} (_CDC_ROW, _CDC_SEQ, _CDC_NTH, _CDC_OP, _CDC_TS)
SELECT c._CDC_ROW, c._CDC_SEQ, c._CDC_NTH, c._CDC_OP, c._CDC_TS
FROM {{ p }}{{ n.changes }} AS c
WHERE NOT EXISTS (
  SELECT 1 FROM {{ p }}{{ n.rows }} AS r
  WHERE r._CDC_SEQ = c._CDC_SEQ AND r._CDC_NTH = c._CDC_NTH
);
{#- The touched rows' current values; every row's when this run brought rows of the latest
    snapshot (then every row is counted again). #}
INSERT INTO {{ p }}{{ n.changes }} (
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  _CDC_OP, _CDC_SEQ, _CDC_NTH, _CDC_TS, _CDC_QUARANTINED, _CDC_ROW
)
SELECT
{%- for c in t.columns %}
  o.{{ c.q }},
{%- endfor %}
  'T', o._CDC_SEQ, o._CDC_NTH, o._CDC_TS, o._CDC_QUARANTINED, o._CDC_ROW
FROM (
  SELECT *, ROW_NUMBER() OVER (
    PARTITION BY _CDC_ROW ORDER BY _CDC_SEQ DESC, _CDC_NTH DESC
  ) AS _RN
  FROM {{ p }}{{ n.name }}
) AS o
WHERE o._RN = 1 AND (
  EXISTS (
    SELECT 1 FROM {{ p }}{{ n.changes }} AS c
    WHERE c._CDC_OP = 'S' AND c._CDC_SEQ = (
      SELECT MAX(_CDC_SEQ) FROM {{ p }}{{ n.rows }} WHERE _CDC_OP = 'S'
    )
  )
  OR o._CDC_ROW IN (SELECT _CDC_ROW FROM {{ p }}{{ n.changes }})
);
DELETE FROM {{ p }}{{ n.name }}
WHERE _CDC_ROW IN (SELECT _CDC_ROW FROM {{ p }}{{ n.changes }});
INSERT INTO {{ p }}{{ n.name }} (
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  _CDC_ROW, _CDC_SEQ, _CDC_NTH, _CDC_TS, _CDC_QUARANTINED, _MERGED_AT, _CDC_OP,
  _CDC_SYNCED_AT
)
SELECT
{%- for c in t.columns %}
  v.{{ c.q }},
{%- endfor %}
  k._CDC_ROW, k._CDC_SEQ, k._CDC_NTH, k._CDC_TS, v._CDC_QUARANTINED, CURRENT_TIMESTAMP(),
  k._CDC_OP, CURRENT_TIMESTAMP()
FROM (
  SELECT
    r._CDC_ROW, r._CDC_SEQ, r._CDC_NTH, r._CDC_OP, r._CDC_TS,
    ROW_NUMBER() OVER (
      PARTITION BY r._CDC_ROW, IFF(r._CDC_OP = 'D', 1, 0)
      ORDER BY r._CDC_SEQ DESC, r._CDC_NTH DESC
    ) AS _N,
    SUM(IFF(r._CDC_OP = 'D', -1, 1)) OVER (PARTITION BY r._CDC_ROW) AS _COPIES
  FROM {{ p }}{{ n.rows }} AS r
  CROSS JOIN (
    SELECT COALESCE(MAX(_CDC_SEQ), -1) AS _AT FROM {{ p }}{{ n.rows }} WHERE _CDC_OP = 'S'
  ) AS s
  WHERE r._CDC_ROW IN (SELECT _CDC_ROW FROM {{ p }}{{ n.changes }})
    AND ((r._CDC_OP = 'S' AND r._CDC_SEQ = s._AT) OR (r._CDC_OP <> 'S' AND r._CDC_SEQ > s._AT))
) AS k
INNER JOIN (
  SELECT *, ROW_NUMBER() OVER (
    PARTITION BY _CDC_ROW ORDER BY _CDC_SEQ DESC, _CDC_NTH DESC
  ) AS _VN
  FROM {{ p }}{{ n.changes }}
) AS v ON v._CDC_ROW = k._CDC_ROW AND v._VN = 1
WHERE k._CDC_OP <> 'D' AND k._N <= k._COPIES;
DELETE FROM {{ p }}{{ n.rows }}
WHERE _CDC_SEQ < (SELECT MAX(_CDC_SEQ) FROM {{ p }}{{ n.rows }} WHERE _CDC_OP = 'S');
{%- else %}
DELETE FROM {{ p }}{{ n.changes }};
INSERT INTO {{ p }}{{ n.changes }} (
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  _CDC_OP, _CDC_SEQ, _CDC_TS, _CDC_UNCHANGED, _CDC_QUARANTINED, _FILE, _FILE_ROW, _LOADED_AT
)
SELECT
{%- for c in t.columns %}
{%- if c.toastable and not c.key %}
  FIRST_VALUE({{ c.type.converted(c.q) }}) OVER (
    PARTITION BY {{ keys(t) }} ORDER BY {{ carried(c) }} DESC, _RN
    ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING
  ),
{%- else %}
  {{ c.type.converted(c.q) }},
{%- endif %}
{%- endfor %}
  _CDC_OP, _CDC_SEQ, _CDC_TS,
  ','
{%- for c in toastable %}
    || IFF(MAX({{ carried(c) }}) OVER (PARTITION BY {{ keys(t) }}) = 0, '{{ c.needle[1:] }}', '')
{%- endfor %},
  _CDC_QUARANTINED, _FILE, _FILE_ROW, _LOADED_AT
FROM (
  SELECT *, ROW_NUMBER() OVER (
    PARTITION BY {{ keys(t) }}
    ORDER BY _CDC_SEQ DESC, _CDC_TS DESC, _LOADED_AT DESC, _FILE DESC, _FILE_ROW DESC
  ) AS _RN
  FROM {{ p }}{{ n.stream }}
)
{#- QUALIFY filters after the windows above, which read every change of the key; it needs a
    window in this SELECT ("The QUALIFY clause requires at least one window function",
    https://docs.snowflake.com/en/sql-reference/constructs/qualify), and a table whose value
    columns are all fixed-width (or that is all key) has none: there WHERE keeps the same row. #}
{%- if toastable %}
QUALIFY _RN = 1;
{%- else %}
WHERE _RN = 1;
{%- endif %}
{%- if t.models %}
DELETE FROM {{ p }}{{ n.touched }};
INSERT INTO {{ p }}{{ n.touched }}
SELECT t.* FROM {{ p }}{{ n.name }} AS t INNER JOIN {{ p }}{{ n.changes }} AS c ON {{ on(t, "t", "c") }};
{%- endif %}
{%- if t.history %}
{#- history = true. Every change of the stream is a version (a change delivered twice, same
    key, _CDC_SEQ and _CDC_TS, once; one already in the history is not added again, so a run
    redone adds nothing). A value an update left unchanged is the key's latest earlier change
    that carries it (_Gi counts the changes carrying column i so far: a group starts at each),
    else the row's current value. Then the validity of every version of the touched keys,
    recomputed in source order (_CDC_SEQ): a version ends where the next one starts, a delete
    at once, the last one that is no delete is current; a version read after a later commit
    (a snapshot's or backfill's row) ends where it starts rather than before. Both statements
    read the stream in this transaction, so they see the changes the MERGE below consumes
    ("surround them with an explicit transaction statement":
    https://docs.snowflake.com/en/user-guide/streams-intro). #}
INSERT INTO {{ p }}{{ n.history }} (
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  _CDC_OP, _CDC_SEQ, _CDC_QUARANTINED, _CDC_VALID_FROM, _CDC_VALID_TO, _CDC_IS_CURRENT,
  _CDC_SYNCED_AT
)
SELECT
{%- for c in t.columns %}
  v.{{ c.q }},
{%- endfor %}
  v._CDC_OP, v._CDC_SEQ, v._CDC_QUARANTINED, v._CDC_TS, NULL, FALSE, CURRENT_TIMESTAMP()
FROM (
  SELECT
{%- for c in t.columns %}
{%- if c.toastable and not c.key %}
    IFF(w._G{{ loop.index }} = 0, o.{{ c.q }}, FIRST_VALUE(w.{{ c.q }}) OVER (
      PARTITION BY {% for k in t.key %}w.{{ k.q }}, {% endfor %}w._G{{ loop.index }}
      ORDER BY w._CDC_SEQ, w._CDC_TS
    )) AS {{ c.q }},
{%- else %}
    w.{{ c.q }},
{%- endif %}
{%- endfor %}
    w._CDC_OP, w._CDC_SEQ, w._CDC_TS, w._CDC_QUARANTINED
  FROM (
    SELECT
{%- for c in t.columns %}
      {{ c.type.converted(c.q) }} AS {{ c.q }},
{%- if c.toastable and not c.key %}
      SUM({{ carried(c) }}) OVER (
        PARTITION BY {{ keys(t) }} ORDER BY _CDC_SEQ, _CDC_TS
        ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
      ) AS _G{{ loop.index }},
{%- endif %}
{%- endfor %}
      _CDC_OP, _CDC_SEQ, _CDC_TS, _CDC_QUARANTINED
    FROM (
      SELECT *, ROW_NUMBER() OVER (
        PARTITION BY {{ keys(t) }}, _CDC_SEQ, _CDC_TS
        ORDER BY _LOADED_AT DESC, _FILE DESC, _FILE_ROW DESC
      ) AS _ONCE
      FROM {{ p }}{{ n.stream }}
    ) AS d
    WHERE _ONCE = 1
  ) AS w
  LEFT JOIN {{ p }}{{ n.name }} AS o ON {{ on(t, "o", "w") }}
) AS v
WHERE NOT EXISTS (
  SELECT 1 FROM {{ p }}{{ n.history }} AS h
  WHERE {{ on(t, "h", "v") }} AND h._CDC_SEQ = v._CDC_SEQ AND h._CDC_VALID_FROM = v._CDC_TS
);
MERGE INTO {{ p }}{{ n.history }} AS h
USING (
  SELECT
{%- for c in t.key %}
    x.{{ c.q }},
{%- endfor %}
    x._CDC_SEQ, x._CDC_VALID_FROM,
    IFF(x._CDC_OP = 'D', x._CDC_VALID_FROM, IFF(
      LEAD(x._CDC_VALID_FROM) OVER (PARTITION BY {% for k in t.key %}x.{{ k.q }}{{ ", " if not loop.last }}{% endfor %} ORDER BY x._CDC_SEQ, x._CDC_VALID_FROM)
        < x._CDC_VALID_FROM,
      x._CDC_VALID_FROM,
      LEAD(x._CDC_VALID_FROM) OVER (PARTITION BY {% for k in t.key %}x.{{ k.q }}{{ ", " if not loop.last }}{% endfor %} ORDER BY x._CDC_SEQ, x._CDC_VALID_FROM)
    )) AS _VALID_TO,
    x._CDC_OP <> 'D' AND ROW_NUMBER() OVER (
      PARTITION BY {% for k in t.key %}x.{{ k.q }}{{ ", " if not loop.last }}{% endfor %} ORDER BY x._CDC_SEQ DESC, x._CDC_VALID_FROM DESC
    ) = 1 AS _IS_CURRENT
  FROM {{ p }}{{ n.history }} AS x
  INNER JOIN {{ p }}{{ n.changes }} AS c ON {{ on(t, "x", "c") }}
) AS s
ON {{ on(t, "h", "s") }} AND h._CDC_SEQ = s._CDC_SEQ AND h._CDC_VALID_FROM = s._CDC_VALID_FROM
WHEN MATCHED AND (h._CDC_VALID_TO IS DISTINCT FROM s._VALID_TO OR h._CDC_IS_CURRENT <> s._IS_CURRENT)
  THEN UPDATE SET _CDC_VALID_TO = s._VALID_TO, _CDC_IS_CURRENT = s._IS_CURRENT;
{%- endif %}
MERGE INTO {{ p }}{{ n.name }} AS t
USING (
  -- A column the changes left unchanged keeps the row's current value.
  SELECT
{%- for c in t.columns %}
{%- if c.toastable and not c.key %}
    IFF(POSITION('{{ c.needle }}' IN c._CDC_UNCHANGED) > 0, o.{{ c.q }}, c.{{ c.q }}) AS {{ c.q }},
{%- else %}
    c.{{ c.q }},
{%- endif %}
{%- endfor %}
    c._CDC_OP, c._CDC_SEQ, c._CDC_TS, c._CDC_QUARANTINED
  FROM {{ p }}{{ n.changes }} AS c
  LEFT JOIN {{ p }}{{ n.name }} AS o ON {{ on(t, "o", "c") }}
  LEFT JOIN {{ p }}{{ n.tombstones }} AS d ON {{ on(t, "d", "c") }}
  WHERE d.{{ t.key[0].q }} IS NULL OR c._CDC_SEQ > d._CDC_SEQ
) AS s
ON {{ on(t, "t", "s") }}
{%- if t.soft_deletes %}
{#- A delete carries the key only (its other values are the replica identity's): the row keeps
    the values it had. #}
WHEN MATCHED AND s._CDC_OP = 'D' AND s._CDC_SEQ >= t._CDC_SEQ THEN UPDATE SET
  _CDC_DELETED_AT = s._CDC_TS, _CDC_SEQ = s._CDC_SEQ, _CDC_TS = s._CDC_TS,
  _CDC_OP = s._CDC_OP, _CDC_SYNCED_AT = CURRENT_TIMESTAMP(), _MERGED_AT = CURRENT_TIMESTAMP()
{%- else %}
WHEN MATCHED AND s._CDC_OP = 'D' AND s._CDC_SEQ >= t._CDC_SEQ THEN DELETE
{%- endif %}
WHEN MATCHED AND s._CDC_OP <> 'D'
  AND (s._CDC_SEQ > t._CDC_SEQ OR (s._CDC_SEQ = t._CDC_SEQ AND s._CDC_TS > t._CDC_TS))
  THEN UPDATE SET
{%- for c in t.values %}
  {{ c.q }} = s.{{ c.q }},
{%- endfor %}
  _CDC_SEQ = s._CDC_SEQ, _CDC_TS = s._CDC_TS, _CDC_QUARANTINED = s._CDC_QUARANTINED,
{%- if t.soft_deletes %}
  _CDC_DELETED_AT = NULL,
{%- endif %}
  _CDC_OP = s._CDC_OP, _CDC_SYNCED_AT = CURRENT_TIMESTAMP(), _MERGED_AT = CURRENT_TIMESTAMP()
WHEN NOT MATCHED AND s._CDC_OP <> 'D' THEN INSERT (
{%- for c in t.columns %}
  {{ c.q }},
{%- endfor %}
  _CDC_SEQ, _CDC_TS, _CDC_QUARANTINED, _MERGED_AT, _CDC_OP, _CDC_SYNCED_AT
) VALUES (
{%- for c in t.columns %}
  s.{{ c.q }},
{%- endfor %}
  s._CDC_SEQ, s._CDC_TS, s._CDC_QUARANTINED, CURRENT_TIMESTAMP(), s._CDC_OP, CURRENT_TIMESTAMP()
);
MERGE INTO {{ p }}{{ n.tombstones }} AS t
USING (SELECT {{ keys(t) }}, _CDC_SEQ FROM {{ p }}{{ n.changes }} WHERE _CDC_OP = 'D') AS s
ON {{ on(t, "t", "s") }}
WHEN MATCHED AND s._CDC_SEQ > t._CDC_SEQ THEN UPDATE SET
  _CDC_SEQ = s._CDC_SEQ, _DELETED_AT = CURRENT_TIMESTAMP()
WHEN NOT MATCHED THEN INSERT ({{ keys(t) }}, _CDC_SEQ, _DELETED_AT)
  VALUES ({% for c in t.key %}s.{{ c.q }}, {% endfor %}s._CDC_SEQ, CURRENT_TIMESTAMP());
{%- if t.models %}
INSERT INTO {{ p }}{{ n.touched }}
SELECT t.* FROM {{ p }}{{ n.name }} AS t INNER JOIN {{ p }}{{ n.changes }} AS c ON {{ on(t, "t", "c") }};
{%- for refresh in model_refresh[n.name] %}
{{ refresh }}
{%- endfor %}
{%- endif %}
{%- endif %}
INSERT INTO {{ p }}{{ n.merge_log }} (MERGED_AT, CHANGES)
SELECT CURRENT_TIMESTAMP(), COUNT(*) FROM {{ p }}{{ n.changes }};
COMMIT;
EXCEPTION
  -- Any failure: undo the whole transaction and fail the task run (TASK_HISTORY shows it).
  WHEN OTHER THEN
    ROLLBACK;
    RAISE;
END;
$$;
ALTER TASK {{ n.merge_task }} RESUME;

-- {{ n.cleanup_task }}: daily, landing rows older than {{ retention_days }} days and loaded at
-- least a day before the last merge (so merged: the stream hands a row to the next merge after
-- its load commits), and tombstones older than {{ tombstone_days }} days. It never reads the
-- stream (that would move its offset).
ALTER TASK IF EXISTS {{ n.cleanup_task }} SUSPEND;
CREATE OR ALTER TASK {{ n.cleanup_task }}
{%- if serverless_tasks %}
  USER_TASK_MANAGED_INITIAL_WAREHOUSE_SIZE = 'XSMALL'
{%- else %}
  WAREHOUSE = {{ warehouse }}
{%- endif %}
  SCHEDULE = '{{ cleanup_schedule }}'
AS
EXECUTE IMMEDIATE $$
BEGIN
BEGIN TRANSACTION;
DELETE FROM {{ p }}{{ n.landing }}
WHERE _LOADED_AT < DATEADD(DAY, -{{ retention_days }}, CURRENT_TIMESTAMP())
  AND _LOADED_AT < (SELECT DATEADD(DAY, -1, MAX(MERGED_AT)) FROM {{ p }}{{ n.merge_log }});
DELETE FROM {{ p }}{{ n.tombstones }}
WHERE _DELETED_AT < DATEADD(DAY, -{{ tombstone_days }}, CURRENT_TIMESTAMP());
DELETE FROM {{ p }}{{ n.merge_log }}
WHERE MERGED_AT < DATEADD(DAY, -{{ retention_days }}, CURRENT_TIMESTAMP())
  AND MERGED_AT < (SELECT MAX(MERGED_AT) FROM {{ p }}{{ n.merge_log }});
COMMIT;
EXCEPTION
  -- Any failure: undo the whole transaction and fail the task run (TASK_HISTORY shows it).
  WHEN OTHER THEN
    ROLLBACK;
    RAISE;
END;
$$;
ALTER TASK {{ n.cleanup_task }} RESUME;
{%- endfor %}
