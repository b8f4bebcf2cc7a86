"""Batch names, state transitions and flush decisions (pure)."""

from __future__ import annotations

from cdc_daemon.batch.policy import BatchPolicy
from cdc_daemon.sink.keys import object_key
from cdc_daemon.state.ledger import BatchRecord, ObjectRecord, Status, batch_id, can_move
from cdc_daemon.state.position import INT64_MIN


def test_batch_id_is_derived_from_the_rows() -> None:
    """Same range -> same name; different ranges or late-only batches -> different names."""
    assert batch_id(100, 200) == batch_id(100, 200) == "00000000000000000100-00000000000000000200"
    assert batch_id(INT64_MIN, 5) == "start-00000000000000000005"
    assert batch_id(200, 200, [(150, 151)]) != batch_id(200, 200, [(152, 152)])
    assert batch_id(100, 200) < batch_id(200, 300)  # names sort in watermark order


def test_object_key_layout() -> None:
    """An object's key is <prefix><table>/dt=<day>/<batch id> with the compression's suffix
    (.csv.zst for zstd)."""
    key = object_key("raw/", "public.ecommerce_sales", "2011-01-02", "b", "zstd")
    assert key == "raw/public.ecommerce_sales/dt=2011-01-02/b.csv.zst"


def test_transitions() -> None:
    """The ledger allows only its named moves: pending -> uploaded and uploaded -> failed, never
    pending -> loaded nor loaded back to pending."""
    assert can_move(Status.PENDING, Status.UPLOADED)
    assert not can_move(Status.PENDING, Status.LOADED)
    assert can_move(Status.UPLOADED, Status.FAILED)
    assert not can_move(Status.LOADED, Status.PENDING)


def test_checksum_covers_keys_and_contents() -> None:
    """A batch's checksum changes when an object's content digest does; its rows, raw bytes and
    size are its objects' figures."""
    obj = ObjectRecord("k1", "2011-01-01", 1, 10, 5, "aa")
    one = BatchRecord("t", "b", 0, 1, "ts", objects=(obj,))
    two = BatchRecord(
        "t", "b", 0, 1, "ts", objects=(ObjectRecord("k1", "2011-01-01", 1, 10, 5, "ab"),)
    )
    assert one.checksum != two.checksum
    assert one.rows == 1
    assert one.raw_bytes == 10
    assert one.size == 5


def test_flush_reasons() -> None:
    """A batch closes by rows, (estimated) bytes or age, whichever comes first."""
    policy = BatchPolicy(max_rows=100, max_bytes=1000, max_age_s=5, row_bytes=10)
    assert policy.flush_reason(0, 99, draining=True) is None
    assert policy.flush_reason(100, 0, draining=False) == "max_rows"
    assert policy.flush_reason(99, 0, draining=False) is None
    policy.learn(rows=10, raw_bytes=200)
    assert policy.flush_reason(50, 0, draining=False) == "max_bytes"
    assert policy.flush_reason(1, 5, draining=False) == "max_age"
    assert policy.flush_reason(1, 0, draining=True) == "drain"
