"""``cdc-daemon status``: what an operator asks first, from the ledger (and the source).

Per captured table: is a daemon running (a session holds the table's advisory lock), how far
behind it is (rows above the exported position and seconds since the position last moved; WAL
bytes of the slot in logical mode), batches by status, the last uploaded and last loaded batch,
batches that need attention (pending with attempts, failed, missing) with their reasons, and
the oldest batch not yet confirmed loaded. ``--json`` prints the same as one JSON object.

A failed table of a logical group comes first, before anything else: its lines lead the
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
from cdc_daemon.state.report import LedgerReader
from cdc_daemon.state.store import Store


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


def _source_figures(
    settings: Settings, highs: dict[str, int | None], slot: str | None
) -> dict[str, tuple[int | None, int | None]]:
    """By ledger name: (rows above its exported high, slot lag bytes), in a thread. Watermark
    mode: each configured table; logical mode: the group (the slot's lag)."""
    conn = connect_source(settings.postgres)
    try:
        if settings.capture.mode == "logical":
            return {settings.group: (None, slot_lag_bytes(conn, slot) if slot else None)}
        out: dict[str, tuple[int | None, int | None]] = {}
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
            out[table.qualified] = (rows, None)
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
        source: dict[str, tuple[int | None, int | None]] = {}
        try:
            source = await asyncio.to_thread(_source_figures, settings, highs, slot)
        except CdcError as exc:
            source_error = str(exc)
        now = datetime.now(UTC)
        configured = {settings.group, *(t.qualified for t in settings.table_specs)}
        report: dict[str, Any] = {}
        for position in positions:
            name = position["table_name"]
            counts = await reader.counts(name)
            troubled = await reader.troubled(name)
            behind: dict[str, Any] = {"rows": None, "seconds": None, "slot_lag_bytes": None}
            if name in source:
                rows, lag = source[name]
                behind["rows"] = rows
                behind["seconds"] = (
                    round((now - position["updated_at"]).total_seconds(), 3) if rows != 0 else 0.0
                )
                behind["slot_lag_bytes"] = lag
            elif source_error is not None:
                behind["error"] = source_error
            members = await reader.group_tables(name)
            totals = await reader.totals(name)
            last_uploaded = await reader.last(name, "uploaded_at")
            report[name] = {
                "mode": position["mode"],
                # The tables of this configuration's group share the group's lock.
                "running": await reader.lock_holder(settings.group if name in configured else name),
                "group": settings.group if name in configured else None,
                "tables": members,
                "failed_tables": [
                    # The command; the reason says what to do before it (e.g. empty the
                    # warehouse table after a TRUNCATE).
                    {
                        "table": m["table"],
                        "error": m["error"],
                        "fix": f"cdc-daemon resync --table {shlex.quote(shown(m['table']))}",
                    }
                    for m in members
                    if m["status"] == "failed"
                ],
                "watermark": None if position["low"] in (None, INT64_MIN) else position["low"],
                "exported_high": (
                    None if position["high"] in (None, INT64_MIN) else position["high"]
                ),
                "position_updated_at": position["updated_at"].isoformat(),
                "behind": behind,
                "batches": counts,
                **totals,
                "last_batch": last_uploaded["batch_id"] if last_uploaded else None,
                "last_uploaded": last_uploaded,
                "last_loaded": await reader.last(name, "loaded_at"),
                "oldest_unreconciled": await reader.oldest_unreconciled(name),
                # Not (yet) in S3: pending, or failed with the reason the retries gave up on.
                "unfinished": [b for b in troubled if not b["in_s3"]],
                "failed": [b for b in troubled if b["status"] == Status.FAILED],
                "missing": [b for b in troubled if b["status"] == Status.MISSING],
                "backfill_runs": await reader.backfill_runs(name),
                "warehouse": await reader.warehouse_health(name),
            }
        return report
    finally:
        await reader.close()


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{n:,} B" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def _batch(b: dict[str, Any] | None) -> str:
    if b is None:
        return "none"
    return f"{b['batch_id']} ({_count(b['rows'])} rows) at {b['at']}"


def _warehouse_rows(health: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The pipes, the tasks and the streams, as the reconciler last saw them."""
    if health is None:
        return [
            ("warehouse", "not checked yet (the reconciler runs when snowflake.account is set)")
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


def render(report: dict[str, Any]) -> str:
    """The report as a readable table for a terminal."""
    if not report:
        return "no table captured yet (run the daemon first)"
    lines: list[str] = []
    for name, t in report.items():
        # First: the rest of a degraded group looks healthy (its other tables still flow).
        for failed in t.get("failed_tables", []):
            lines.append(
                f"FAILED: table {shown(failed['table'])} of group {name} exports nothing: "
                f"{failed['error'] or 'no reason recorded'}"
                + table_fix(failed["table"], failed["error"] or "")
            )
    if lines:
        lines.append("")
    for name, t in report.items():
        lines.append(f"{shown(name)}  ({t['mode']} mode)")
        running = t["running"]
        if running:
            who = f"{running['application_name'] or 'a session'}"
            if running["client_addr"]:
                who += f" from {running['client_addr']}"
            since = f", since {running['since']}" if running["since"] else ""
            rows = [
                ("running", f"yes: {who} holds the lock (Postgres pid {running['pid']}{since})")
            ]
        else:
            rows = [("running", "no (no session holds the table's lock)")]
        behind = t["behind"]
        if "error" in behind:
            lag = f"unknown: {behind['error']}"
        else:
            lag = (
                f"{_count(behind['rows'])} rows; the position last moved {behind['seconds']} s ago"
                if behind["rows"] != 0
                else "nothing (caught up)"
            )
            if behind["slot_lag_bytes"] is not None:
                lag += f", slot {_size(behind['slot_lag_bytes'])} of WAL"
        counts = t["batches"]
        rows += [
            (
                "position" if t["mode"] == "logical" else "watermark",
                f"{t['watermark']} (exported up to {t['exported_high']})"
                + (" (LSNs)" if t["mode"] == "logical" else ""),
            ),
            ("behind", lag),
            ("batches", "  ".join(f"{s.value} {counts.get(s.value, 0)}" for s in Status)),
            (
                "exported",
                f"{_count(t['rows'])} rows, {_count(t['objects'])} objects, {_size(t['bytes'])}",
            ),
            ("last uploaded", _batch(t["last_uploaded"])),
            ("last loaded", _batch(t["last_loaded"])),
        ]
        oldest = t["oldest_unreconciled"]
        rows.append(
            (
                "oldest unreconciled",
                "none"
                if oldest is None
                else f"{oldest['batch_id']} ({oldest['status']}, uploaded {oldest['age_s']:.0f} s"
                " ago)",
            )
        )
        for member in t.get("tables", []):
            text = member["status"]
            if member["status"] != "streaming" or member["chunks"]:
                text += f", snapshot {member['chunks']} chunk(s), {_count(member['rows'])} rows"
            if member.get("error"):
                text += f": {member['error']} (cdc-daemon resync --table {member['table']})"
            rows.append((f"  table {member['table']}", text))
        rows += _warehouse_rows(t.get("warehouse"))
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        attention = t["unfinished"] + [
            b for b in t["failed"] + t["missing"] if b not in t["unfinished"]
        ]
        if attention:
            lines.append("  needs attention:")
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
                    "    " + "  ".join(f"{r[i]:<{widths[i]}}" for i in range(4)) + "  " + r[4]
                )
        for run in t.get("backfill_runs", []):
            lines.append(
                f"  backfill {run['run_id']}  [{run['day_from']}, {run['day_to']})  {run['status']}"
                f"  {run['days_done']}/{run['days']} days in S3, {run['days_loaded']} loaded,"
                f" {_count(run['rows'])} rows" + (f"  {run['error']}" if run["error"] else "")
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n")
