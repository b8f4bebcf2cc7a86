"""``cdc-daemon status``: what an operator asks first, from the ledger (and the source).

Per captured table (a logical group: per group; a watermark group's tables under the group's
name): is a daemon running (a session holds the group's advisory lock), how far behind it is
(rows above the exported position and seconds since the position last moved; in logical mode
the WAL bytes the slot has not confirmed and, while the daemon is connected, the walsender's
flush lag in seconds), every delivery by status whoever produced it (stream batches, snapshot
and backfill chunks) with the rows, objects and bytes in S3 in total, per producer and per
table, the last uploaded and last loaded delivery, those that need attention (pending with
attempts, failed, missing) with their reasons, the oldest not yet confirmed loaded, and the
warehouse as the reconciler last saw it. ``--json`` prints the same as one JSON object.

A failed table of a group (either mode) comes first, before anything else: its lines lead the
output, each with the table, the reason and the fix (``failed_tables`` in the JSON). The
daemon keeps the group's other tables flowing, so nothing else in the report looks wrong.
``status`` exits 0 whatever it reports, as before: it reads; ``run`` exits 9 for this.
"""

from __future__ import annotations

import asyncio
import shlex
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from cdc_daemon.config import Settings
from cdc_daemon.errors import CdcError, from_psycopg, table_fix
from cdc_daemon.names import TableName
from cdc_daemon.source.session import connect as connect_source
from cdc_daemon.source.table import describe_configured
from cdc_daemon.state.ledger import Status
from cdc_daemon.state.position import INT64_MIN
from cdc_daemon.state.report import PRODUCER_NAMES, LedgerReader, group_ledgers
from cdc_daemon.state.store import Store
from cdc_daemon.state.verify import VerifyState, verify_states


def slot_lag_bytes(conn: psycopg.Connection[Any], slot: str) -> int | None:
    """WAL the slot still holds back: the server's current insert LSN (the write LSN lags it
    while commits are not flushed, e.g. with synchronous_commit off) minus what the slot's
    consumer confirmed. None when there is no such slot. (For logical mode; the caller passes
    the slot's name from its settings.)"""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::int8 "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def slot_lag_seconds(conn: psycopg.Connection[Any], slot: str) -> float | None:
    """How long the slot's consumer takes to confirm what the server sends it, as the
    walsender measures it (``pg_stat_replication.flush_lag``): None when no consumer is
    connected, or when it has been caught up for a while (PostgreSQL then shows NULL)."""
    row = conn.execute(
        "SELECT extract(epoch FROM r.flush_lag)::float8 FROM pg_replication_slots s"
        " JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None or row[0] is None else round(float(row[0]), 3)


Figures = tuple[int | None, int | None, float | None]


def _source_figures(
    settings: Settings, highs: dict[str, int | None], slot: str | None
) -> dict[str, Figures]:
    """By ledger name: (rows above its exported high, slot lag bytes, slot lag seconds), in a
    thread. Watermark mode: each configured table; logical mode: the group (the slot's lag)."""
    conn = connect_source(settings.postgres)
    try:
        if settings.capture.mode == "logical":
            if not slot:
                return {settings.group: (None, None, None)}
            return {
                settings.group: (None, slot_lag_bytes(conn, slot), slot_lag_seconds(conn, slot))
            }
        out: dict[str, Figures] = {}
        for spec in settings.table_specs:
            table = describe_configured(conn, settings.for_table(spec), spec, hashing=False)
            if table.qualified not in highs:
                continue
            high = highs[table.qualified]
            cur = conn.execute(
                sql.SQL("SELECT count(*) FROM {t} WHERE {c} > %s").format(
                    t=table.ident(), c=table.watermark.ident()
                ),
                (INT64_MIN if high is None else high,),
            )
            found = cur.fetchone()
            rows = int(found[0]) if found is not None else 0  # type: ignore[call-overload]
            out[table.qualified] = (rows, None, None)
        return out
    except psycopg.Error as exc:
        raise from_psycopg(exc, f"reading {settings.postgres.table}") from None
    finally:
        conn.close()


def shown(name: str) -> str:
    """A ledger name as a user writes it: a table's quoted where needed (``"Odd.Schema"."Order
    Lines"``, not its folder's encoding), a group's as it is."""
    table = TableName.from_key(name)
    return name if table is None else str(table)


async def collect(
    settings: Settings, table: str | None = None, slot: str | None = None
) -> dict[str, Any]:
    """The report for every table in the ledger (or one); see the module docstring."""
    store = await Store.from_settings(settings)
    try:
        await store.check_schema()
    finally:
        await store.close()
    reader = await LedgerReader.connect(settings, "cdc-daemon-status")
    try:
        positions = [p for p in await reader.positions() if table in (None, p["table_name"])]
        highs = {p["table_name"]: p["high"] for p in positions}
        source_error = None
        source: dict[str, Figures] = {}
        try:
            source = await asyncio.to_thread(_source_figures, settings, highs, slot)
        except CdcError as exc:
            source_error = str(exc)
        now = datetime.now(UTC)
        configured = {settings.group, *(t.qualified for t in settings.table_specs)}
        verified = {v.table: v for v in await verify_states(settings)}
        report: dict[str, Any] = {}
        for position in positions:
            name = position["table_name"]
            members = await reader.group_tables(name)
            # Its deliveries, whoever produced them: a logical group's are under the group's
            # name, a table's backfill chunks under the table's.
            ledgers = [name, *(m["table"] for m in members)]
            if name == settings.group:
                ledgers += group_ledgers(settings)
            troubled = await reader.troubled(ledgers)
            exported = await reader.exported(ledgers, settings.s3.prefix)
            moved = round((now - position["updated_at"]).total_seconds(), 3)
            behind: dict[str, Any] = {"rows": None, "seconds": moved, "slot_lag_bytes": None}
            logical = position["mode"] == "logical"
            if name in source and not (logical and source[name][1] is None):
                rows, lag, lag_s = source[name]
                behind["rows"] = rows
                behind["slot_lag_bytes"] = lag
                if (lag if logical else rows) == 0:
                    behind["seconds"] = 0.0
                if logical:
                    # The walsender's measure while the daemon is connected; else the time
                    # since the position last moved bounds the age of what is not confirmed.
                    behind["slot_lag_s"] = lag_s
            elif source_error is not None:
                behind["error"] = source_error
            elif logical:
                behind["error"] = f"the slot {slot} does not exist" if slot else "no slot given"
            else:
                behind["error"] = "not a table of this configuration (its source is not read)"
            last_uploaded = await reader.last(ledgers, "uploaded_at")
            group = settings.group if name in configured else None
            failing = members
            if not logical and group is not None and group != name:
                # A watermark group's table: its own row among the group's members.
                failing = [m for m in await reader.group_tables(group) if m["table"] == name]
            report[name] = {
                "mode": position["mode"],
                # The tables of this configuration's group share the group's lock.
                "running": await reader.lock_holder(settings.group if name in configured else name),
                "group": group,
                "tables": members,
                "failed_tables": [
                    # The command; the reason says what to do before it (e.g. empty the
                    # warehouse table after a TRUNCATE).
                    {
                        "table": m["table"],
                        "error": m["error"],
                        "fix": f"cdc-daemon resync --table {shlex.quote(shown(m['table']))}",
                    }
                    for m in failing
                    if m["status"] == "failed"
                ],
                "watermark": None if position["low"] in (None, INT64_MIN) else position["low"],
                "exported_high": (
                    None if position["high"] in (None, INT64_MIN) else position["high"]
                ),
                "position_updated_at": position["updated_at"].isoformat(),
                "behind": behind,
                # Every delivery (stream batches, snapshot and backfill chunks) by status, and
                # the rows, objects and bytes in S3: in total, per producer and per table.
                "batches": exported["deliveries"],
                "rows": exported["rows"],
                "objects": exported["objects"],
                "bytes": exported["bytes"],
                "producers": exported["producers"],
                "exported_tables": exported["tables"],
                "last_batch": last_uploaded["batch_id"] if last_uploaded else None,
                "last_uploaded": last_uploaded,
                "last_loaded": await reader.last(ledgers, "loaded_at"),
                "oldest_unreconciled": await reader.oldest_unreconciled(ledgers),
                # Not (yet) in S3: pending, or failed with the reason the retries gave up on.
                "unfinished": [b for b in troubled if not b["in_s3"]],
                "failed": [b for b in troubled if b["status"] == Status.FAILED],
                "missing": [b for b in troubled if b["status"] == Status.MISSING],
                "backfill_runs": await reader.backfill_runs(name),
                # The reconciler keeps it under the group's name (a watermark group's too).
                "warehouse": await reader.warehouse_health(group or name),
                "warehouse_configured": settings.snowflake.enabled,
                # The continuous verification of each of its tables (``state.verify``).
                "verification": {
                    t: _verification(verified.get(t))
                    for t in ([m["table"] for m in members] or [name])
                },
            }
        return report
    finally:
        await reader.close()


def _verification(state: VerifyState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {
        "last_full_pass": state.last_pass_at.isoformat() if state.last_pass_at else None,
        "rows_this_pass": state.rows_verified,
        "last_slice": state.checked_at.isoformat() if state.checked_at else None,
        "differing_keys": list(state.differing),
    }


def _verified(v: dict[str, Any] | None, table: str) -> str:
    if v is None:
        return "not yet (the daemon verifies a slice every verify.interval_s; `verify` now)"
    text = (
        f"last full pass {v['last_full_pass']}" if v["last_full_pass"] else "no full pass yet"
    ) + f", {_count(v['rows_this_pass'])} rows of this pass"
    if v["differing_keys"]:
        keys = v["differing_keys"]
        text += (
            f"; {len(keys)} key(s) DIFFER ({keys[0]}{', ...' if len(keys) > 1 else ''}): "
            f"cdc-daemon verify --table {shlex.quote(shown(table))} --repair"
        )
    return text


def _verified_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    found = t.get("verification") or {}
    if len(found) == 1:
        ((table, v),) = found.items()
        return [("verified", _verified(v, table))]
    return [(f"  verified {shown(table)}", _verified(v, table)) for table, v in found.items()]


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{n:,} B" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def _position(n: int | None) -> str:
    return "none yet" if n is None else str(n)


def _batch(b: dict[str, Any] | None) -> str:
    if b is None:
        return "none"
    of = f" of {shown(b['table'])}" if b.get("table") else ""
    return f"{b['batch_id']}{of} ({_count(b['rows'])} rows) at {b['at']}"


def _warehouse_rows(
    health: dict[str, Any] | None, configured: bool = True
) -> list[tuple[str, str]]:
    """The pipes, the tasks and the streams, as the reconciler last saw them."""
    if health is None and not configured:
        return [("warehouse", "not checked (snowflake.account is not set: nothing reconciles)")]
    if health is None:
        return [
            (
                "warehouse",
                "not checked yet: no reconciler round has run (the daemon runs one every "
                "snowflake.reconcile_interval_s; or cdc-daemon reconcile --once)",
            )
        ]
    rows = [("warehouse", f"checked at {health['checked_at']}")]
    for pipe in health.get("pipes", []):
        text = f"{pipe['state']}, {pipe['pending_files']} file(s) pending"
        rows.append(
            (f"  pipe {pipe['name']}", text + (f": {pipe['error']}" if pipe["error"] else ""))
        )
    for task in health.get("tasks", []):
        text = task["state"]
        if task["consecutive_failures"]:
            text += f", {task['consecutive_failures']} failed run(s) in a row: {task['last_error']}"
        rows.append((f"  task {task['name']}", text))
    for stream in health.get("streams", []):
        text = "STALE" if stream["stale"] else f"goes stale after {stream['stale_after']}"
        rows.append((f"  stream {stream['name']}", text))
    return rows


def _running(running: dict[str, Any] | None, whose: str = "table") -> str:
    if not running:
        return f"no (no session holds the {whose}'s lock)"
    who = f"{running['application_name'] or 'a session'}"
    if running["client_addr"]:
        who += f" from {running['client_addr']}"
    since = f", since {running['since']}" if running["since"] else ""
    return f"yes: {who} holds the lock (Postgres pid {running['pid']}{since})"


def _behind(t: dict[str, Any]) -> str:
    behind = t["behind"]
    if "error" in behind:
        return f"unknown: {behind['error']}"
    if t["mode"] == "logical":
        lag = behind["slot_lag_bytes"]
        if lag == 0:
            return "nothing (caught up)"
        text = f"{_size(lag)} of WAL the slot has not confirmed"
        if behind.get("slot_lag_s") is not None:
            text += f", {behind['slot_lag_s']} s behind (the walsender's flush lag)"
        return text + f"; the position last moved {behind['seconds']:.0f} s ago"
    if behind["rows"] == 0:
        return "nothing (caught up)"
    return f"{_count(behind['rows'])} rows; the position last moved {behind['seconds']:.0f} s ago"


def _statuses(counts: dict[str, int]) -> str:
    return "  ".join(f"{s.value} {counts.get(s.value, 0)}" for s in Status)


def _figures(f: dict[str, Any]) -> str:
    rows = f"{_count(f['rows'])} row" + ("" if f["rows"] == 1 else "s")
    objects = f"{_count(f['objects'])} object" + ("" if f["objects"] == 1 else "s")
    return f"{rows}, {objects}, {_size(f['bytes'])}"


def _exported(t: dict[str, Any]) -> list[tuple[str, str]]:
    """Every delivery by status, what reached S3 in total, per producer and per table."""
    rows = [("batches", _statuses(t["batches"])), ("exported", _figures(t))]
    producers = t.get("producers", {})
    if len(producers) > 1:
        for producer, f in producers.items():
            label = PRODUCER_NAMES.get(producer, producer)
            rows.append((f"  {label}", f"{_figures(f)}; {_statuses(f['deliveries'])}"))
    tables = t.get("exported_tables", {})
    if len(tables) > 1:
        for table, f in tables.items():
            rows.append((f"  into {shown(table)}", _figures(f)))
    return rows


def _table_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    oldest = t["oldest_unreconciled"]
    return [
        (
            "position" if t["mode"] == "logical" else "watermark",
            f"{_position(t['watermark'])} (exported up to {_position(t['exported_high'])})"
            + (" (LSNs)" if t["mode"] == "logical" else ""),
        ),
        ("behind", _behind(t)),
        *_exported(t),
        ("last uploaded", _batch(t["last_uploaded"])),
        ("last loaded", _batch(t["last_loaded"])),
        (
            "oldest unreconciled",
            "none"
            if oldest is None
            else f"{oldest['batch_id']}"
            + (f" of {shown(oldest['table'])}" if oldest.get("table") else "")
            + f" ({oldest['status']}, uploaded {oldest['age_s']:.0f} s ago)",
        ),
    ]


def _attention(t: dict[str, Any], indent: str) -> list[str]:
    attention = t["unfinished"] + [
        b for b in t["failed"] + t["missing"] if b not in t["unfinished"]
    ]
    if not attention:
        return []
    lines = [f"{indent}needs attention:"]
    header = ("batch", "status", "attempts", "in S3", "reason")
    table = [header] + [
        (
            b["batch_id"],
            b["status"],
            str(b["attempts"]),
            "yes" if b["in_s3"] else "no",
            b["error"] or "",
        )
        for b in attention
    ]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        lines.append(
            f"{indent}  " + "  ".join(f"{r[i]:<{widths[i]}}" for i in range(4)) + "  " + r[4]
        )
    return lines


def _backfills(t: dict[str, Any], indent: str) -> list[str]:
    return [
        f"{indent}backfill {run['run_id']}  [{run['day_from']}, {run['day_to']})  {run['status']}"
        f"  {run['days_done']}/{run['days']} days in S3, {run['days_loaded']} loaded,"
        f" {_count(run['rows'])} rows" + (f"  {run['error']}" if run["error"] else "")
        for run in t.get("backfill_runs", [])
    ]


def _aligned(rows: list[tuple[str, str]], indent: str) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def _sum(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """A watermark group's figures: its tables' added up."""
    out: dict[str, Any] = {"rows": 0, "objects": 0, "bytes": 0, "batches": {}}
    for t in tables:
        for k in ("rows", "objects", "bytes"):
            out[k] += t[k]
        for status, n in t["batches"].items():
            out["batches"][status] = out["batches"].get(status, 0) + n
    return out


def render(report: dict[str, Any]) -> str:
    """The report as a readable table for a terminal: a group under its own name (a
    watermark group's tables, each with its own position, under it)."""
    if not report:
        return "no table captured yet (run the daemon first)"
    lines: list[str] = []
    for name, t in report.items():
        # First: the rest of a degraded group looks healthy (its other tables still flow).
        for failed in t.get("failed_tables", []):
            lines.append(
                f"FAILED: table {shown(failed['table'])} of group {t.get('group') or name} "
                "exports nothing: "
                f"{failed['error'] or 'no reason recorded'}"
                + table_fix(failed["table"], failed["error"] or "")
            )
    if lines:
        lines.append("")
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, t in report.items():
        groups.setdefault(t.get("group") or name, []).append((name, t))
    for group, entries in groups.items():
        if len(entries) == 1:
            name, t = entries[0]
            lines.append(f"{shown(name)}  ({t['mode']} mode)")
            # A one-table configuration's group is the table's name.
            whose = "group" if t["group"] and TableName.from_key(t["group"]) is None else "table"
            rows = [("running", _running(t["running"], whose)), *_table_rows(t)]
            for member in t.get("tables", []):
                text = member["status"]
                if member["status"] != "streaming" or member["chunks"]:
                    text += f", snapshot {member['chunks']} chunk(s), {_count(member['rows'])} rows"
                if member.get("error"):
                    text += f": {member['error']} (cdc-daemon resync --table {member['table']})"
                rows.append((f"  table {member['table']}", text))
            rows += _warehouse_rows(t.get("warehouse"), t.get("warehouse_configured", True))
            if t.get("warehouse_configured", True):
                rows += _verified_rows(t)
            lines += _aligned(rows, "  ")
            lines += _attention(t, "  ")
            lines += _backfills(t, "  ")
            lines.append("")
            continue
        # A watermark group: one lock and one warehouse, a position per table.
        first = entries[0][1]
        lines.append(f"{group}  ({first['mode']} mode, {len(entries)} tables)")
        total = _sum([t for _, t in entries])
        rows = [
            ("running", _running(first["running"], "group")),
            ("batches", _statuses(total["batches"])),
            ("exported", _figures(total)),
            *_warehouse_rows(first.get("warehouse"), first.get("warehouse_configured", True)),
        ]
        lines += _aligned(rows, "  ")
        for name, t in entries:
            lines.append(f"  {shown(name)}  ({t['mode']} mode)")
            table_rows = _table_rows(t)
            if t.get("warehouse_configured", True):
                table_rows += _verified_rows(t)
            lines += _aligned(table_rows, "    ")
            lines += _attention(t, "    ")
            lines += _backfills(t, "    ")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
