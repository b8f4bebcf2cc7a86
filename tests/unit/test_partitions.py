"""What the daemon makes of a partitioned table's leaves changing (``capture.logical.partitions``
``follow``), and how the ledger keeps a partition's range (``state.joins.KeyRange``)."""

from __future__ import annotations

from cdc_daemon.capture.logical.partitions import Leaves, follow
from cdc_daemon.state.joins import GroupTable, KeyRange

DONE = (KeyRange(None, None, ("9", "2026-01-01"), 3, True),)


def test_the_first_look_only_records_the_leaves() -> None:
    """A table whose leaves were never looked at (just joined: its own snapshot reads every
    partition through the root) gets its leaves recorded and no range of its own."""
    state = GroupTable("s.t", "joining", since=10, seq=5)
    followed = follow(state, Leaves(100, {2: "s.a", 1: "s.b"}))
    assert followed is not None
    assert followed.table == GroupTable("s.t", "joining", since=10, seq=5, partitions=(1, 2))
    assert follow(followed.table, Leaves(200, {1: "s.b", 2: "s.a"})) is None


def test_before_the_snapshot_is_split_a_new_leaf_is_only_recorded() -> None:
    """While the table's snapshot has no ranges yet, a partition attached meanwhile is read by
    that snapshot (over the root): only the leaves move."""
    state = GroupTable("s.t", "joining", seq=5, partitions=(1,))
    followed = follow(state, Leaves(100, {1: "s.a", 2: "s.b"}))
    assert followed is not None
    assert followed.table.ranges == ()
    assert followed.table.partitions == (1, 2)


def test_attached_and_detached_leaves_get_ranges_and_a_new_seq() -> None:
    """A streaming table whose leaves changed: a range reading each new leaf, a range of
    deletes from each leaf gone, after its done ranges; it joins again, its seq to be chosen
    past the WAL position read with the leaves (never below an earlier floor)."""
    state = GroupTable("s.t", "streaming", since=10, seq=5, floor=7, ranges=DONE, partitions=(1, 2))
    followed = follow(state, Leaves(300, {1: "s.a", 3: "s.c"}))
    assert followed is not None
    assert (followed.attached, followed.detached) == ((3,), (2,))
    table = followed.table
    assert (table.status, table.seq, table.floor, table.since) == ("joining", None, 300, 10)
    assert table.ranges == (*DONE, KeyRange(partition=3), KeyRange(partition=2, delete=True))
    assert table.partitions == (1, 3)
    assert follow(table, Leaves(400, {1: "s.a", 3: "s.c"})) is None
    lower = follow(state, Leaves(3, {1: "s.a"}))
    assert lower is not None
    assert lower.table.floor == 7


def test_a_partition_range_survives_the_ledger() -> None:
    """A range's partition and delete flag go through the ledger's JSON; a table's range
    (no partition) is written as before, without the new keys."""
    for r in (KeyRange(partition=42), KeyRange(("1",), None, ("2",), 1, False, 43, True)):
        assert KeyRange.from_json(r.as_json()) == r
    assert set(KeyRange().as_json()) == {"lower", "upper", "after", "chunks", "done"}
