"""The snapshot of a table, copied in chunks by key as ``I`` rows (``copy_chunk``, used by
``capture.logical.join``): the same COPY, and so the same bytes, as the watermark export.
Why chunks read at different times rebuild the table exactly: ``capture.logical.join`` and
docs/logical.md."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

from cdc_daemon.batch.spool import DaySpool
from cdc_daemon.capture.logical.tables import LogicalTable
from cdc_daemon.source.copyread import CopyRows, snapshot_query
from cdc_daemon.source.session import read_snapshot, translated
from cdc_daemon.source.table import TableInfo
from cdc_daemon.state.joins import Key


def copy_snapshot(
    conn: psycopg.Connection[tuple[object, ...]],
    table: TableInfo,
    spool: DaySpool,
    seq: int,
    read_ts: str,
    where: sql.Composable | None = None,
    op: str = "I",
    source: sql.Composable | None = None,
) -> None:
    rewrite = table.copy_hasher()
    query = snapshot_query(table, seq, read_ts, where, op, source)
    with conn.cursor() as cur, cur.copy(query) as copy:
        rows = CopyRows(copy).batch
        while batch := rows():
            for data in map(bytes, batch) if rewrite is None else map(rewrite, batch):
                spool.add(data)


def _key_sql(table: LogicalTable) -> tuple[sql.Composable, Callable[[Key], sql.Composable]]:
    """The key as a row expression, and a key's values as one (cast to the key's types)."""
    types = {c.name: c.type_name for c in table.info.columns}
    key = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)

    def bound(values: Key) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(types[k]))
            for k, v in zip(table.key, values, strict=True)
        )

    return key, bound


def _key_texts(table: LogicalTable) -> sql.Composable:
    """The key's values as text, under names of their own: an output column named like the
    key column would make ``ORDER BY`` sort by the text (PostgreSQL matches output names
    first), not by the key's type and index."""
    return sql.SQL(", ").join(
        sql.SQL("{}::text AS {}").format(sql.Identifier(k), sql.Identifier(f"_cdc_key_{n}"))
        for n, k in enumerate(table.key)
    )


def split_keys(
    conn: psycopg.Connection[tuple[object, ...]], table: LogicalTable, parts: int
) -> list[Key]:
    """Up to ``parts - 1`` keys that cut the table into parts of about equal rows (from the
    planner's row estimate; exact cuts are not needed, only disjoint ranges)."""
    if parts <= 1:
        return []
    info = table.info
    row = conn.execute(
        "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = %s", (table.oid,)
    ).fetchone()
    if table.partitioned:
        # A partitioned table has no rows of its own (its reltuples is -1): its leaves' count.
        row = conn.execute(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8 FROM pg_partition_tree(%s)"
            " p JOIN pg_class c ON c.oid = p.relid WHERE p.isleaf",
            (table.oid,),
        ).fetchone()
    estimate = int(str(row[0])) if row else 0
    if estimate < parts * 2:
        return []
    key, _ = _key_sql(table)
    cuts: list[Key] = []
    for n in range(1, parts):
        found = conn.execute(
            sql.SQL("SELECT {texts} FROM {t} ORDER BY {k} OFFSET %s LIMIT 1").format(
                texts=_key_texts(table), t=info.ident(), k=key
            ),
            (estimate * n // parts,),
        ).fetchone()
        if found is None:
            break
        cut = tuple(None if v is None else str(v) for v in found)
        if not cuts or cut != cuts[-1]:
            cuts.append(cut)
    return cuts


def copy_chunk(
    conn: psycopg.Connection[tuple[object, ...]],
    table: LogicalTable,
    start: Key | None,
    upper: Key | None,
    limit: int,
    seq: int,
    read_ts: str,
    spool: DaySpool,
    partition: str | None = None,
    delete: bool = False,
    within: int | None = None,
) -> Key | None:
    """Copy the next ``limit`` rows of ``table`` by key, those above ``start`` and at most
    ``upper`` (None: unbounded), into ``spool`` as ``I`` rows with ``_cdc_seq`` ``seq``, in
    one transaction. Returns the chunk's last key, or None when it reached ``upper``.

    ``partition`` (its regclass text): read that partition of ``table`` instead (one attached
    with its rows). With ``delete`` it is a partition detached from ``table``: its rows whose
    key ``table`` no longer holds are written as ``D`` rows (``capture.logical.partitions``).
    ``within``: the oid of the one partition of ``table`` whose rows are read, through
    ``table`` (slower: every partition's index is walked)."""
    info = table.info
    key, bound = _key_sql(table)
    source = None if partition is None else sql.SQL(partition)
    conditions: list[sql.Composable] = []
    if within is not None:
        conditions.append(sql.SQL("t.tableoid = {}::oid").format(sql.Literal(within)))
    if delete:
        assert source is not None, "a detached partition is read for its deletes"
        pairs = sql.SQL(" AND ").join(
            sql.SQL("r.{k} = t.{k}").format(k=sql.Identifier(k)) for k in table.key
        )
        conditions.append(
            sql.SQL("NOT EXISTS (SELECT 1 FROM {} r WHERE {})").format(info.ident(), pairs)
        )
    if start is not None:
        conditions.append(sql.SQL("({}) > ({})").format(key, bound(start)))
    if upper is not None:
        conditions.append(sql.SQL("({}) <= ({})").format(key, bound(upper)))
    where: sql.Composable = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
    with translated(f"copying the snapshot of {info.qualified}"), read_snapshot(conn):
        row = conn.execute(
            sql.SQL("SELECT {texts} FROM {t} t WHERE {w} ORDER BY {k} OFFSET %s LIMIT 1").format(
                texts=_key_texts(table),
                t=info.ident() if source is None else source,
                w=where,
                k=key,
            ),
            (limit - 1,),
        ).fetchone()
        last = None if row is None else tuple(None if v is None else str(v) for v in row)
        if last is not None:
            where = sql.SQL("{} AND ({}) <= ({})").format(where, key, bound(last))
        copy_snapshot(conn, info, spool, seq, read_ts, where, "D" if delete else "I", source)
    return None if last == upper else last
