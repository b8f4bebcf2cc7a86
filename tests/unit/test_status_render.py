"""``status``'s human form (``ops.status.render``) on reports the ledger gives before anything
is exported, in logical mode without its slot, and for a watermark group."""

from __future__ import annotations

from typing import Any

from cdc_daemon.ops.status import render


def entry(mode: str = "watermark", group: str | None = None, **over: Any) -> dict[str, Any]:
    """A report entry as ``collect`` makes it, for a ledger with nothing exported yet."""
    return {
        "mode": mode,
        "running": None,
        "group": group,
        "tables": [],
        "failed_tables": [],
        "watermark": None,
        "exported_high": None,
        "position_updated_at": "2026-01-01T00:00:00+00:00",
        "behind": {"rows": 0, "seconds": 0.0, "slot_lag_bytes": None},
        "batches": {},
        "rows": 0,
        "objects": 0,
        "bytes": 0,
        "producers": {},
        "exported_tables": {},
        "last_batch": None,
        "last_uploaded": None,
        "last_loaded": None,
        "oldest_unreconciled": None,
        "unfinished": [],
        "failed": [],
        "missing": [],
        "backfill_runs": [],
        "warehouse": None,
        "warehouse_configured": True,
        **over,
    }


def test_nothing_exported_yet_reads_as_words_not_none() -> None:
    """A table with no position yet: ``none yet``, never ``None`` or ``?``; a warehouse that
    is configured but not checked says how to check it, one that is not configured says so."""
    text = render({"public.t": entry()})
    assert "None" not in text
    assert "?" not in text
    assert "watermark            none yet (exported up to none yet)" in text
    assert "cdc-daemon reconcile --once" in text
    quiet = render({"public.t": entry(warehouse_configured=False)})
    assert "snowflake.account is not set" in quiet


def test_logical_mode_says_why_it_cannot_tell_how_far_behind() -> None:
    """Logical mode without its slot: the reason in words; with it, the WAL the slot has
    not confirmed in bytes and the walsender's lag in seconds, never ``? rows``."""
    gone = entry(
        "logical",
        behind={
            "rows": None,
            "seconds": 3.0,
            "slot_lag_bytes": None,
            "error": "the slot cdc_shop does not exist",
        },
    )
    text = render({"shop": gone})
    assert "unknown: the slot cdc_shop does not exist" in text
    lagging = entry(
        "logical",
        behind={"rows": None, "seconds": 12.0, "slot_lag_bytes": 2_500_000, "slot_lag_s": 0.4},
    )
    text = render({"shop": lagging})
    assert "2.5 MB of WAL the slot has not confirmed, 0.4 s behind" in text
    assert "the position last moved 12 s ago" in text
    assert "?" not in text


def test_a_watermark_group_is_headed_by_its_own_name() -> None:
    """A watermark group's tables (a position each) come under one heading with the group's
    name, its running line, its deliveries and rows added up and its warehouse once."""
    a = entry(group="shop", rows=12, objects=1, bytes=100, batches={"uploaded": 1})
    b = entry(group="shop", rows=30, objects=3, bytes=300, batches={"loaded": 2})
    text = render({"shop.customers": a, "shop.orders": b})
    lines = text.splitlines()
    assert lines[0] == "shop  (watermark mode, 2 tables)"
    assert "no (no session holds the group's lock)" in lines[1]
    assert "pending 0  uploaded 1  loaded 2  failed 0  missing 0" in text
    assert "42 rows, 4 objects, 400 B" in text
    assert text.count("  warehouse ") == 1
    assert "  shop.customers  (watermark mode)" in lines
    assert "  shop.orders  (watermark mode)" in lines
