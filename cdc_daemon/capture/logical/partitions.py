"""A partitioned table of a logical group: captured through its root, its partitions followed.

The publication publishes through the root (``publish_via_partition_root``): every change of
every partition, one created or attached later included, arrives under the root's oid and
column list, so the warehouse has one table. Two catalog changes move rows without a change
in the WAL, and the daemon notices them by comparing the root's leaf partitions
(``pg_partition_tree``) with the ones the ledger last saw (``GroupTable.partitions``), before
every round of the group's snapshot chunks:

- ``ATTACH PARTITION`` of a table that holds rows: the rows join the root with no insert. The
  partition gets a snapshot range of its own (``KeyRange.partition``), read like a joining
  table's chunks.
- ``DETACH PARTITION`` (or a partition dropped): its rows leave the root with no delete. The
  detached table's rows whose key the root no longer holds are written as ``D`` rows
  (``KeyRange.delete``); a dropped one cannot be read, and is reported (``resync --table``).

Both are the joining table's argument (``capture.logical.join``) with a new ``seq``: the table
goes back to ``joining`` with ``floor`` = the WAL insert position read with the leaves (after
the attach or detach committed), and its seq is the slot's restart_lsn once that is past the
floor. So every change of those keys streamed before the attach or detach has a lower
``_cdc_seq`` than the range's rows, and every change committing after a range is read has one
at least as high (see ``Joiner._choose_seq``). A partition created empty gets a range too: it
is read once, and its rows, streamed as well, rebuild the same table. The leaves and the new
ranges are recorded in one statement, so a restart (even after SIGKILL) finds either neither
or both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import psycopg

from cdc_daemon.capture.logical.pgoutput import parse_lsn
from cdc_daemon.state.joins import GroupTable, KeyRange


@dataclass(frozen=True)
class Leaves:
    """A partitioned table's leaf partitions, read with the WAL insert position."""

    wal_lsn: int
    names: dict[int, str]  # oid -> the partition's name as a statement takes it (regclass)


def read_leaves(conn: psycopg.Connection[tuple[object, ...]], root: int) -> Leaves:
    """The leaves of ``root`` now, and ``pg_current_wal_lsn()`` read after them: an attach or
    detach that the leaves show committed before it."""
    rows = conn.execute(
        "SELECT relid::int8, relid::regclass::text FROM pg_partition_tree(%s)"
        " WHERE isleaf AND relid <> %s::oid ORDER BY 1",
        (root, root),
    ).fetchall()
    lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert lsn is not None
    return Leaves(parse_lsn(str(lsn[0])), {int(str(o)): str(n) for o, n in rows})


def table_name(conn: psycopg.Connection[tuple[object, ...]], oid: int) -> tuple[str, bool] | None:
    """A table's name by oid (renamed since: its new name) and whether this role may read it
    directly, None once it is dropped."""
    row = conn.execute(
        "SELECT oid::regclass::text, has_table_privilege(oid, 'SELECT') FROM pg_class"
        " WHERE oid = %s AND relkind IN ('r', 'p')",
        (oid,),
    ).fetchone()
    return None if row is None else (str(row[0]), bool(row[1]))


@dataclass(frozen=True)
class Followed:
    """What ``follow`` made of a change of the leaves."""

    table: GroupTable  # the table's new ledger state
    attached: tuple[int, ...] = ()
    detached: tuple[int, ...] = ()


def follow(state: GroupTable, leaves: Leaves) -> Followed | None:
    """The table's new state when its leaves differ from the ledger's (None: no change).

    The first look only records the leaves: the table's own snapshot (split by key over the
    root) reads every partition it has. Likewise while that snapshot is not split yet. Else
    each new leaf gets a range read from it, each leaf gone a range of deletes read from the
    detached table, and the table joins again with a seq chosen past ``leaves.wal_lsn``."""
    now = tuple(sorted(leaves.names))
    if state.partitions is None or not state.ranges:
        if state.partitions == now:
            return None
        return Followed(replace(state, partitions=now))
    seen = set(state.partitions)
    attached = tuple(o for o in now if o not in seen)
    detached = tuple(o for o in state.partitions if o not in leaves.names)
    if not attached and not detached:
        return None
    ranges = (
        *state.ranges,
        *(KeyRange(partition=o) for o in attached),
        *(KeyRange(partition=o, delete=True) for o in detached),
    )
    floor = max(leaves.wal_lsn, state.floor or 0)
    table = replace(
        state,
        status="joining",
        seq=None,
        floor=floor,
        ranges=ranges,
        partitions=now,
    )
    return Followed(table, attached, detached)
