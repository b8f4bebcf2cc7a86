"""Which errors fail one table of a watermark group (the table is set aside, the others go on)
and which do not (an outage is waited out, a failure of the whole source stops the daemon)."""

from __future__ import annotations

import pytest

from cdc_daemon.capture.watermark.pipeline import TableUnreadableError, table_failure
from cdc_daemon.errors import (
    CdcError,
    ConfigError,
    SourceError,
    StateError,
    StorageError,
    TransientError,
)


def translated(error: CdcError, sqlstate: str | None) -> CdcError:
    error.sqlstate = sqlstate
    return error


@pytest.mark.parametrize(
    ("error", "fails_the_table"),
    [
        # The table's own: dropped, privilege revoked, a column gone, a value unreadable.
        (translated(SourceError("relation does not exist"), "42P01"), True),
        (translated(SourceError("permission denied for table beta"), "42501"), True),
        (translated(SourceError("column does not exist"), "42703"), True),
        (translated(CdcError("operator does not exist: text > bigint"), "42883"), True),
        (translated(CdcError("invalid byte sequence for encoding"), "22021"), True),
        (SourceError("table 'beta' does not exist (or is not visible to this user)"), True),
        (TableUnreadableError("exporting public.beta: permission denied"), True),
        # Not the table's: an outage or a retriable error, the whole source, the ledger, S3.
        (translated(TransientError("connection refused").outage(), None), False),
        (translated(TransientError("deadlock detected"), "40P01"), False),
        (translated(CdcError("password authentication failed"), "28P01"), False),
        (translated(CdcError("database does not exist"), "3D000"), False),
        (translated(CdcError("disk full"), "53100"), False),
        (StateError("the position of public.beta is no longer 5"), False),
        (StorageError("S3 denied access (AccessDenied)"), False),
        (ConfigError("bad setting"), False),
        (ValueError("not a CdcError"), False),
    ],
)
def test_which_errors_fail_one_table(error: BaseException, fails_the_table: bool) -> None:
    """A non-retriable error of the table read (SQLSTATE class 42 or 22, or the capture's own
    refusal of the table) fails that table; an outage, any retriable error, an authentication
    or missing-database error (every table alike), the ledger's and S3's errors do not."""
    assert table_failure(error) is fails_the_table
