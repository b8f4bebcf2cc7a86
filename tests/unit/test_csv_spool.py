"""Object encoding: compression codecs, header, per-day spooling (no Postgres involved)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_daemon.batch.csv import Codec, decompress, header_line, make_compressor, seq_of_row
from cdc_daemon.batch.spool import BLOCK_ROWS, QUEUE_BLOCKS, DaySpool


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
@given(chunks=st.lists(st.binary(max_size=5000), max_size=20))
def test_codecs_round_trip(codec: Codec, chunks: list[bytes]) -> None:
    """For gzip, zstd and no compression, any chunks fed to the compressor decompress to their
    concatenation."""
    compressor = make_compressor(codec, 1)
    out = b"".join(compressor.compress(c) for c in chunks) + compressor.flush()
    assert decompress(codec, out) == b"".join(chunks)


def test_gzip_output_is_deterministic() -> None:
    """Equal input gives equal bytes (no timestamp in the gzip header): a redone batch is
    byte-identical."""
    one, two = make_compressor("gzip", 1), make_compressor("gzip", 1)
    assert one.compress(b"x" * 1000) + one.flush() == two.compress(b"x" * 1000) + two.flush()


def test_header_quotes_odd_column_names() -> None:
    """The header quotes a column name holding a comma or a quote (quotes doubled), as rows quote
    their values."""
    assert header_line(["id", "a,b", 'q"']) == b'id,"a,b","q"""\n'


def test_seq_of_row_reads_the_second_to_last_field() -> None:
    """seq_of_row reads _cdc_seq as the second-to-last field, past an earlier quoted field that
    holds a comma and a line break."""
    assert seq_of_row(b'5,"a,b\nc",I,123,2011-01-01T00:00:00.000000Z\n') == 123


def test_spool_splits_by_day(tmp_path: Path) -> None:
    """Rows go to one object per day (an empty partition value to 'unknown'), listed in day
    order, each with the header and its rows in the order added, its row count and its
    uncompressed size; discard() leaves no file behind."""
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


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_blocks_compressed_in_a_thread_stay_in_order(tmp_path: Path, codec: Codec) -> None:
    """Many blocks of several days, interleaved, handed to the compressing thread: each day's
    object holds its rows in the order they were added, and the counts add up."""
    spool = DaySpool(tmp_path, codec, 1, b"h\n")
    expected: dict[str, list[bytes]] = {"2011-01-01": [], "2011-01-02": []}
    for n in range(3 * BLOCK_ROWS + 7):
        day = "2011-01-01" if n % 3 else "2011-01-02"
        row = b"%d,%s\n" % (n, b"x" * (n % 50))
        expected[day].append(row)
        spool.add(day.encode() + b"," + row)
        if n % 1000 == 0:
            spool.day(day.encode()).drain()
    assert spool.row_total() == 3 * BLOCK_ROWS + 7
    days = spool.finish()
    for d in days:
        assert decompress(codec, d.path.read_bytes()) == b"h\n" + b"".join(expected[d.day])
        assert d.rows == len(expected[d.day])
    spool.discard()


def test_a_compression_failure_reaches_the_reader(tmp_path: Path) -> None:
    """An error in the compressing thread (here: the disk is full) is raised to the thread
    that reads rows, on its next block or when the batch finishes; never lost."""

    class DiskFull:
        def compress(self, data: bytes) -> bytes:
            raise OSError(28, "No space left on device")

        def flush(self) -> bytes:
            return b""

    spool = DaySpool(tmp_path, "gzip", 1, b"h\n")
    spool.add(b"2011-01-01,a\n")
    target = spool.day(b"2011-01-01")
    target.compressor = DiskFull()

    def keep_reading() -> None:
        for _ in range(QUEUE_BLOCKS + 2):
            target.pending.append(b"b\n")
            target.drain()

    with pytest.raises(OSError, match="No space left"):
        keep_reading()
    with pytest.raises(OSError, match="No space left"):
        spool.finish()
    spool.discard()
    assert not any(tmp_path.iterdir())
