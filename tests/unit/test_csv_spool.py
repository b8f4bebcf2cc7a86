"""Object encoding: compression codecs, header, per-day spooling (no Postgres involved)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_daemon.sink.csv import decompress, header_line, make_compressor, seq_of_row
from cdc_daemon.sink.spool import DaySpool


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
@given(chunks=st.lists(st.binary(max_size=5000), max_size=20))
def test_codecs_round_trip(codec: str, chunks: list[bytes]) -> None:
    compressor = make_compressor(codec, 1)  # type: ignore[arg-type]
    out = b"".join(compressor.compress(c) for c in chunks) + compressor.flush()
    assert decompress(codec, out) == b"".join(chunks)  # type: ignore[arg-type]


def test_gzip_output_is_deterministic() -> None:
    """Equal input gives equal bytes (no timestamp in the gzip header): a redone batch is
    byte-identical."""
    one, two = make_compressor("gzip", 1), make_compressor("gzip", 1)
    assert one.compress(b"x" * 1000) + one.flush() == two.compress(b"x" * 1000) + two.flush()


def test_header_quotes_odd_column_names() -> None:
    assert header_line(["id", "a,b", 'q"']) == b'id,"a,b","q"""\n'


def test_seq_of_row_reads_the_second_to_last_field() -> None:
    assert seq_of_row(b'5,"a,b\nc",I,123,2011-01-01T00:00:00.000000Z\n') == 123


def test_spool_splits_by_day(tmp_path: Path) -> None:
    spool = DaySpool(tmp_path, "gzip", 1, b"h\n")
    spool.add(b"2011-01-02,b1\n")
    spool.add(b"2011-01-01,a1\n")
    spool.add(b",n1\n")  # a NULL partition value
    spool.add(b"2011-01-02,b2\n")
    days = spool.finish()
    assert [(d.day, d.rows) for d in days] == [
        ("unknown", 1),
        ("2011-01-01", 1),
        ("2011-01-02", 2),
    ]
    assert decompress("gzip", days[2].path.read_bytes()) == b"h\nb1\nb2\n"
    assert days[2].raw_bytes == len(b"h\nb1\nb2\n")
    spool.discard()
    assert not any(tmp_path.iterdir())
