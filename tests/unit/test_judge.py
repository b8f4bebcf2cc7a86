"""How the reconciler decides a batch's load status from Snowflake's load history (pure):
``judge`` in ``reconcile/reconciler.py``, the choice of one history record per file (``_best``)
and the helpers of ``warehouse/client.py`` that read Snowflake's answers (``stage_relative``,
``normalize_status``, ``parse_pipe_status``)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from cdc_daemon.reconcile.reconciler import Reconciler, _best, judge
from cdc_daemon.sink.keys import object_key, quarantine_key
from cdc_daemon.state.ledger import BatchRecord, Delivery, ObjectRecord, Status
from cdc_daemon.warehouse.client import (
    LoadRecord,
    normalize_status,
    parse_pipe_status,
    stage_relative,
)
from tests.helpers import seed_settings

PREFIX = "raw/"
TABLE = "public.ecommerce_sales"
BATCH = "00000000000000000100-00000000000000000200"
UPLOADED_AT = datetime(2011, 1, 4, 12, 0, tzinfo=UTC)


def obj(day: str, rows: int, *, quarantine: str | None = None) -> ObjectRecord:
    """One object of the batch, keyed as the sink keys it."""
    if quarantine is None:
        key = object_key(PREFIX, TABLE, day, BATCH, "gzip")
    else:
        key = quarantine_key(PREFIX, TABLE, quarantine, BATCH, "gzip")
    return ObjectRecord(key, day, rows, rows * 100, rows * 30, "ab" * 32, quarantine=quarantine)


def name(day: str) -> str:
    """The object's name as the warehouse client gives the load history's files (relative to
    the bucket's prefix: the table's folder, the day, the object)."""
    return f"{TABLE}/dt={day}/{BATCH}.csv.gz"


def item(*objects: ObjectRecord, status: Status = Status.UPLOADED) -> Delivery:
    """A stream batch's delivery of ``objects``, uploaded at ``UPLOADED_AT``."""
    batch = BatchRecord(TABLE, BATCH, 100, 200, "ts", objects=objects)
    return replace(batch.delivery, status=status, uploaded_at=UPLOADED_AT)


def record(
    day: str,
    status: str = "loaded",
    rows: int = 10,
    error: str | None = None,
    at: datetime | None = UPLOADED_AT,
) -> LoadRecord:
    return LoadRecord(name(day), status, rows, rows, error, at)


def history(*records: LoadRecord) -> dict[str, LoadRecord]:
    return {r.file: r for r in records}


def test_every_object_loaded_with_its_row_count_is_loaded() -> None:
    """Each object in the history as ``loaded`` with exactly the ledger's row count -> the
    batch is ``loaded``, with no reason and nothing left unseen."""
    batch = item(obj("2011-01-04", 10), obj("2011-01-05", 3))
    seen = history(record("2011-01-04", rows=10), record("2011-01-05", rows=3))
    assert judge(batch, seen, PREFIX) == (Status.LOADED, None, [])


@pytest.mark.parametrize("loaded", [9, 11, 0])
def test_a_row_count_mismatch_fails_the_batch_with_both_counts(loaded: int) -> None:
    """``loaded`` with another row count than the ledger's (fewer or more) -> ``failed``, the
    reason giving the object and both counts."""
    batch = item(obj("2011-01-04", 10))
    new, reason, unseen = judge(batch, history(record("2011-01-04", rows=loaded)), PREFIX)
    assert new is Status.FAILED
    assert reason == (
        f"{TABLE}/dt=2011-01-04/{BATCH}.csv.gz: Snowflake loaded {loaded} rows, the ledger says 10"
    )
    assert unseen == []


@pytest.mark.parametrize("status", ["load_failed", "partially_loaded", "failed"])
def test_a_failed_load_fails_the_batch_with_snowflakes_first_error(status: str) -> None:
    """An object that failed or loaded partially -> ``failed``, the reason giving the object,
    the status and Snowflake's first error."""
    batch = item(obj("2011-01-04", 10))
    seen = history(
        record("2011-01-04", status, rows=4, error="Numeric value 'x' is not recognized")
    )
    assert judge(batch, seen, PREFIX) == (
        Status.FAILED,
        f"{TABLE}/dt=2011-01-04/{BATCH}.csv.gz: {status}: Numeric value 'x' is not recognized",
        [],
    )


def test_a_failed_load_without_error_text_says_so() -> None:
    """A failed load whose history row has no first error still explains itself."""
    batch = item(obj("2011-01-04", 10))
    new, reason, _ = judge(batch, history(record("2011-01-04", "load_failed", rows=0)), PREFIX)
    assert new is Status.FAILED
    assert reason == f"{TABLE}/dt=2011-01-04/{BATCH}.csv.gz: load_failed: no error given"


def test_a_partial_load_fails_even_with_the_ledgers_row_count() -> None:
    """The failed status decides before the count: ``partially_loaded`` fails the batch even
    when the rows loaded equal the ledger's."""
    batch = item(obj("2011-01-04", 10))
    seen = history(record("2011-01-04", "partially_loaded", rows=10, error="row 3: bad date"))
    assert judge(batch, seen, PREFIX) == (
        Status.FAILED,
        f"{TABLE}/dt=2011-01-04/{BATCH}.csv.gz: partially_loaded: row 3: bad date",
        [],
    )


def test_problems_of_several_objects_are_all_given_in_object_order() -> None:
    """Every object's problem is in the reason, in the batch's object order, joined by
    ``; ``; a fine object between them adds nothing."""
    batch = item(obj("2011-01-04", 10), obj("2011-01-05", 5), obj("2011-01-06", 7))
    seen = history(
        record("2011-01-06", "load_failed", rows=0, error="bad"),
        record("2011-01-05", rows=5),
        record("2011-01-04", rows=8),
    )
    assert judge(batch, seen, PREFIX) == (
        Status.FAILED,
        f"{TABLE}/dt=2011-01-04/{BATCH}.csv.gz: Snowflake loaded 8 rows, the ledger says 10; "
        f"{TABLE}/dt=2011-01-06/{BATCH}.csv.gz: load_failed: bad",
        [],
    )


def test_objects_not_in_the_history_keep_the_batch_waiting() -> None:
    """Some objects loaded, others not seen yet -> no new status (keep waiting), and the
    unseen objects' stage-relative names, in object order."""
    batch = item(obj("2011-01-04", 10), obj("2011-01-05", 5), obj("2011-01-06", 7))
    seen = history(record("2011-01-05", rows=5))
    assert judge(batch, seen, PREFIX) == (None, None, [name("2011-01-04"), name("2011-01-06")])


def test_nothing_in_the_history_keeps_the_batch_waiting() -> None:
    """An empty history -> keep waiting, every object unseen."""
    batch = item(obj("2011-01-04", 10), obj("2011-01-05", 5))
    assert judge(batch, {}, PREFIX) == (None, None, [name("2011-01-04"), name("2011-01-05")])


def test_a_problem_fails_the_batch_without_waiting_for_unseen_objects() -> None:
    """One object failed while another is not seen yet -> ``failed`` at once (it cannot become
    loaded), still listing the unseen object."""
    batch = item(obj("2011-01-04", 10), obj("2011-01-05", 5))
    seen = history(record("2011-01-04", "load_failed", rows=0, error="bad"))
    assert judge(batch, seen, PREFIX) == (
        Status.FAILED,
        f"{TABLE}/dt=2011-01-04/{BATCH}.csv.gz: load_failed: bad",
        [name("2011-01-05")],
    )


def test_quarantined_objects_are_not_expected_in_the_history() -> None:
    """A quarantined object (outside the pipe's folder) is neither waited for nor judged: the
    batch is ``loaded`` once its other objects are."""
    quarantined = obj("2011-01-04", 2, quarantine="unreadable")
    batch = item(obj("2011-01-04", 10), quarantined)
    seen = history(record("2011-01-04", rows=10))
    assert judge(batch, seen, PREFIX) == (Status.LOADED, None, [])
    # Even a history row under the quarantined object's name does not count against it.
    odd = LoadRecord(quarantined.key.removeprefix(PREFIX), "load_failed", 0, 2, "bad", UPLOADED_AT)
    assert odd.file != name("2011-01-04")
    assert judge(batch, {**seen, odd.file: odd}, PREFIX) == (Status.LOADED, None, [])


def test_a_batch_of_quarantined_objects_only_is_loaded_at_once() -> None:
    """A batch whose every object is quarantined has nothing to wait for: ``loaded``."""
    batch = item(obj("2011-01-04", 2, quarantine="unreadable"))
    assert judge(batch, {}, PREFIX) == (Status.LOADED, None, [])


def test_a_batch_without_objects_is_loaded_at_once() -> None:
    """A batch with no objects has nothing to wait for: ``loaded``."""
    assert judge(item(), {}, PREFIX) == (Status.LOADED, None, [])


def test_history_is_matched_by_day_folder_and_name() -> None:
    """An object is found under its day folder and name: the same batch's object of another
    day does not stand in for it."""
    batch = item(obj("2011-01-04", 10))
    assert judge(batch, history(record("2011-01-05", rows=10)), PREFIX) == (
        None,
        None,
        [name("2011-01-04")],
    )


def test_a_missing_batch_that_shows_up_is_loaded() -> None:
    """A batch already ``missing`` is judged like an uploaded one: it becomes ``loaded`` when
    its objects show up with their counts."""
    batch = item(obj("2011-01-04", 10), status=Status.MISSING)
    assert judge(batch, history(record("2011-01-04", rows=10)), PREFIX) == (Status.LOADED, None, [])


def test_a_status_that_is_no_verdict_keeps_the_batch_waiting() -> None:
    """A status the reconciler does not know (neither ``loaded`` nor a failed one) is no
    verdict, whatever its row count: the batch keeps waiting with the file unseen."""
    batch = item(obj("2011-01-04", 10))
    for rows in (10, 3):
        found = history(record("2011-01-04", "some_new_status", rows=rows))
        assert judge(batch, found, PREFIX) == (None, None, [name("2011-01-04")])


def test_a_load_in_progress_keeps_the_batch_waiting() -> None:
    """A file Snowflake is still loading is not a verdict: the batch keeps waiting."""
    batch = item(obj("2011-01-04", 10))
    in_progress = LoadRecord(
        name("2011-01-04"), normalize_status("Load in progress"), 0, 0, None, None
    )
    new, _, _ = judge(batch, history(in_progress), PREFIX)
    assert new is None


# -- one record per file --------------------------------------------------------------------


def test_a_successful_load_wins_over_failed_attempts_before_and_after_it() -> None:
    """Of several history rows for one file, a ``loaded`` one is kept whether the failed
    attempts came before or after it."""
    t = UPLOADED_AT
    loaded = record("2011-01-04", "loaded", rows=10, at=t + timedelta(minutes=5))
    before = record("2011-01-04", "load_failed", rows=0, error="early", at=t)
    after = record("2011-01-04", "load_failed", rows=0, error="late", at=t + timedelta(hours=1))
    assert _best([after, loaded, before]) == {name("2011-01-04"): loaded}


def test_without_a_successful_load_the_latest_attempt_is_kept() -> None:
    """Without a ``loaded`` row, the latest attempt is the file's record, whatever the order
    the history listed them in."""
    t = UPLOADED_AT
    first = record("2011-01-04", "load_failed", rows=0, error="first", at=t)
    last = record("2011-01-04", "partially_loaded", rows=3, error="last", at=t + timedelta(1))
    assert _best([last, first]) == {name("2011-01-04"): last}
    assert _best([first, last]) == {name("2011-01-04"): last}


def test_a_record_without_load_time_counts_as_the_oldest() -> None:
    """A history row without ``LAST_LOAD_TIME`` sorts before every dated row (never after)."""
    undated = record("2011-01-04", "load_failed", rows=0, error="undated", at=None)
    dated = record("2011-01-04", "load_failed", rows=0, error="dated", at=UPLOADED_AT)
    assert _best([dated, undated]) == {name("2011-01-04"): dated}


def test_skipped_loads_are_ignored() -> None:
    """``load_skipped`` rows are dropped: alone they leave the file unseen (the batch waits),
    beside another row they do not replace it."""
    skipped = record("2011-01-04", "load_skipped", rows=0, at=UPLOADED_AT + timedelta(hours=1))
    failed = record("2011-01-04", "load_failed", rows=0, error="bad", at=UPLOADED_AT)
    assert _best([skipped]) == {}
    assert _best([failed, skipped]) == {name("2011-01-04"): failed}


def test_files_are_kept_apart() -> None:
    """Rows of different files never replace each other."""
    a = record("2011-01-04", rows=10)
    b = record("2011-01-05", "load_failed", rows=0, error="bad")
    assert _best([a, b]) == {name("2011-01-04"): a, name("2011-01-05"): b}


@pytest.mark.parametrize(
    ("raw", "new"),
    [
        ("Loaded", Status.LOADED),
        ("LOADED", Status.LOADED),
        ("Load failed", Status.FAILED),
        ("LOAD FAILED", Status.FAILED),
        ("Partially loaded", Status.FAILED),
        ("PARTIALLY_LOADED", Status.FAILED),
        ("Load skipped", None),
    ],
)
def test_snowflakes_spellings_of_a_status_reach_the_same_verdict(
    raw: str, new: Status | None
) -> None:
    """COPY_HISTORY's statuses, in Snowflake's spellings (``Load failed``, ``LOAD FAILED``,
    fakesnow's ``PARTIALLY_LOADED``), pass through ``normalize_status`` and ``_best`` to the
    verdict their meaning asks for; a skipped file leaves the batch waiting. (The rows are
    loaded with the ledger's count, so only the status can fail the batch.)"""
    batch = item(obj("2011-01-04", 10))
    row = LoadRecord(name("2011-01-04"), normalize_status(raw), 10, 10, None, UPLOADED_AT)
    assert judge(batch, _best([row]), PREFIX)[0] is new


# -- reading Snowflake's answers ------------------------------------------------------------


@pytest.mark.parametrize(
    "file_name",
    [
        f"dt=2011-01-04/{BATCH}.csv.gz",
        f"raw/public.ecommerce_sales/dt=2011-01-04/{BATCH}.csv.gz",
        f"s3://cdc-bucket/raw/public.ecommerce_sales/dt=2011-01-04/{BATCH}.csv.gz",
        f"https://cdc-bucket.s3.eu-west-1.amazonaws.com/raw/dt=2011-01-04/{BATCH}.csv.gz",
        f"raw//public.ecommerce_sales/dt=2011-01-04/./{BATCH}.csv.gz",
    ],
)
def test_stage_relative_keeps_the_day_folder_and_name(file_name: str) -> None:
    """Whatever form the history gives a file in (relative, under the stage, a full URL, with
    doubled slashes or ``./``), it names ``dt=<day>/<name>``, as the ledger's key does."""
    assert stage_relative(file_name) == f"dt=2011-01-04/{BATCH}.csv.gz"
    assert stage_relative(object_key(PREFIX, TABLE, "2011-01-04", BATCH, "gzip")) == (
        stage_relative(file_name)
    )


def test_stage_relative_of_a_bare_name_is_the_name() -> None:
    """A name without a folder stays as it is."""
    assert stage_relative("x.csv.gz") == "x.csv.gz"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Loaded", "loaded"),
        ("LOAD FAILED", "load_failed"),
        ("Load failed", "load_failed"),
        ("Partially loaded", "partially_loaded"),
        ("PARTIALLY_LOADED", "partially_loaded"),
        ("  Load skipped \n", "load_skipped"),
        ("Load in progress", "load_in_progress"),
    ],
)
def test_normalize_status(raw: str, normal: str) -> None:
    """A history status becomes lower snake case, surrounding blanks dropped."""
    assert normalize_status(raw) == normal


def test_parse_pipe_status_reads_snowflakes_json() -> None:
    """SYSTEM$PIPE_STATUS's JSON gives the state, pending files, last ingestion and error; a
    running pipe is healthy."""
    text = json.dumps(
        {
            "executionState": "RUNNING",
            "pendingFileCount": 3,
            "lastIngestedTimestamp": "2011-01-04T12:00:00.000Z",
            "notificationChannelName": "arn:aws:sqs:eu-west-1:1:sf-snowpipe",
        }
    )
    status = parse_pipe_status("P", text)
    assert status.execution_state == "RUNNING"
    assert status.pending_file_count == 3
    assert status.last_ingested_at == "2011-01-04T12:00:00.000Z"
    assert status.error is None
    assert status.healthy


@pytest.mark.parametrize("state", ["PAUSED", "STOPPED_STAGE_DROPPED", "running", "UNKNOWN"])
def test_only_a_running_pipe_is_healthy(state: str) -> None:
    """Any state but ``RUNNING`` (exactly: Snowflake's spelling) is unhealthy."""
    assert not parse_pipe_status("P", json.dumps({"executionState": state})).healthy


def test_parse_pipe_status_defaults() -> None:
    """Missing fields read as an unknown (unhealthy) state, no pending files, no ingestion and
    no error."""
    status = parse_pipe_status("P", "{}")
    assert (status.execution_state, status.pending_file_count) == ("UNKNOWN", 0)
    assert (status.last_ingested_at, status.error) == (None, None)
    assert not status.healthy


def test_parse_pipe_status_reports_error_and_fault() -> None:
    """The pipe's problems come from the documented ``error`` and ``fault`` fields, both kept;
    ``lastForwardedMessage`` (not a field of SYSTEM$PIPE_STATUS) is not read."""
    both = parse_pipe_status(
        "P", json.dumps({"executionState": "RUNNING", "error": "bad file", "fault": "queue gone"})
    )
    assert both.error == "bad file; queue gone"
    fault = parse_pipe_status("P", json.dumps({"executionState": "RUNNING", "fault": "queue gone"}))
    assert fault.error == "queue gone"
    other = parse_pipe_status("P", json.dumps({"lastForwardedMessage": "x"}))
    assert other.error is None


def test_a_null_row_parsed_keeps_the_batch_waiting() -> None:
    """A history row whose ROW_PARSED is NULL (a load in progress, whatever its status says)
    is no verdict yet: the file stays unseen."""
    batch = item(obj("2011-01-04", 10))
    running = LoadRecord(name("2011-01-04"), "loaded", 4, None, None, UPLOADED_AT)
    assert judge(batch, history(running), PREFIX) == (None, None, [name("2011-01-04")])


def test_an_unknown_history_status_is_logged_once() -> None:
    """A status outside the known ones is logged (``load_status_unknown``) the first time it is
    seen, and not again; known statuses, in progress included, are not logged."""
    reconciler = Reconciler(seed_settings())
    records = [
        record("2011-01-04", "some_new_status"),
        record("2011-01-05", "some_new_status"),
        record("2011-01-06", "load_in_progress"),
        record("2011-01-07", "loaded"),
    ]
    with capture_logs() as logs:
        reconciler._note_unknown_statuses(records)
        reconciler._note_unknown_statuses(records)
    assert [(e["event"], e["status"]) for e in logs] == [("load_status_unknown", "some_new_status")]


def test_a_loaded_object_naming_a_column_the_landing_table_lacks_is_failed() -> None:
    """Snowflake's by-name load leaves a file column the landing table lacks out, and still
    says ``Loaded`` with the full row count: the batch is ``failed`` with a
    ``header_mismatch`` naming the table and the column, not confirmed."""
    columns = ("id", "invoice", "gift_note", "_cdc_op")
    batch = item(replace(obj("2011-01-04", 10), columns=columns))
    landing = {f"{TABLE}/": ("RAW_SALES", frozenset({"ID", "INVOICE", "_CDC_OP"}))}
    new, reason, unseen = judge(batch, history(record("2011-01-04", rows=10)), PREFIX, landing)
    assert new is Status.FAILED
    assert reason is not None
    assert "header_mismatch: RAW_SALES has no column gift_note" in reason
    assert unseen == []
    # The same object against a landing table that has every column is confirmed, whatever
    # the case of the names (CASE_INSENSITIVE).
    full = {f"{TABLE}/": ("RAW_SALES", frozenset({"ID", "INVOICE", "GIFT_NOTE", "_CDC_OP"}))}
    assert judge(batch, history(record("2011-01-04", rows=10)), PREFIX, full)[0] is Status.LOADED


def test_an_object_header_survives_the_ledger_round_trip() -> None:
    """The header kept with an object is written to the ledger's JSON and read back as the
    same tuple; an object recorded before headers were kept reads back with none (and is
    judged on its row count alone)."""
    record_ = ObjectRecord(
        **json.loads(json.dumps({**obj("2011-01-04", 3).as_json(), "columns": ["a", "b"]}))
    )
    assert record_.columns == ("a", "b")
    again = ObjectRecord(**json.loads(json.dumps(record_.as_json())))
    assert again.columns == ("a", "b")
    old: dict[str, Any] = {k: v for k, v in record_.as_json().items() if k != "columns"}
    assert ObjectRecord(**old).columns == ()
