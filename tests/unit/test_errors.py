"""Driver errors -> the ``CdcError`` they mean (``cdc_daemon.errors``): which failures a retry can
fix, which exit code each kind ends the process with, what the message says, and which error a
failed TaskGroup reports. Every driver error here is a real object of psycopg, botocore or
snowflake-connector, built as the driver builds it where that needs no server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import psycopg
import pytest
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from psycopg import errors as pg
from psycopg.conninfo import conninfo_to_dict
from snowflake.connector import errors as sf

from cdc_daemon.errors import (
    AlreadyRunningError,
    CdcError,
    ConfigError,
    SourceError,
    StateError,
    StorageError,
    TableFailedError,
    TransientError,
    WarehouseError,
    first_error,
    from_botocore,
    from_psycopg,
    from_snowflake,
)

# The exit codes of docs/operations.md ("Signals and exit codes"); systemd's unit refuses to
# restart on 2, 3 and 4, so a renumbering is an operational change, not a refactoring.
EXIT_CODES: list[tuple[type[CdcError], int, bool]] = [
    (CdcError, 1, False),
    (ConfigError, 2, False),
    (SourceError, 3, False),
    (StateError, 4, False),
    (AlreadyRunningError, 5, False),
    (TransientError, 6, True),
    (StorageError, 7, False),
    (WarehouseError, 8, False),
    (TableFailedError, 9, False),
]


# -- the hierarchy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code", "retriable"), EXIT_CODES, ids=[c.__name__ for c, _, _ in EXIT_CODES]
)
def test_each_kind_has_its_documented_exit_code_and_retriability(
    cls: type[CdcError], code: int, retriable: bool
) -> None:
    """Each kind of error exits with the code docs/operations.md gives it, and only a
    ``TransientError`` says a retry can fix it; both are readable on an instance."""
    err = cls("doing something: failed")
    assert err.exit_code == code
    assert err.retriable is retriable
    assert isinstance(err, CdcError)


def test_exit_codes_tell_the_kinds_apart() -> None:
    """No two kinds of error share an exit code: the code alone says what went wrong."""
    codes = [cls.exit_code for cls, _, _ in EXIT_CODES]
    assert len(set(codes)) == len(codes)


def test_every_exit_code_is_in_the_operations_table() -> None:
    """docs/operations.md's exit-code table lists each kind's code, so a new kind cannot be
    added without documenting what its code means."""
    page = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    table = page.split("## Signals and exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert {cls.exit_code for cls, _, _ in EXIT_CODES} <= documented


def test_a_failed_table_names_the_table_the_group_the_reason_and_the_fix() -> None:
    """``TableFailedError.of``: one sentence naming the table, its group and the reason; a
    reason that does not name the fix (a table that could not be read) gets ``resync --table``
    appended, one that does (TRUNCATE, a retyped column) is not told twice; several tables are
    listed in name order, each with its own fix."""
    truncated = (
        "bank.tellers was truncated: a TRUNCATE cannot be exported as row changes; empty its "
        "warehouse table, then export it again (cdc-daemon resync --table bank.tellers)"
    )
    one = TableFailedError.of("ledgers", {"bank.tellers": truncated})
    assert one.exit_code == 9
    assert str(one) == f"table bank.tellers of group ledgers is failed: {truncated}"
    gone = "reading bank.branches: relation does not exist"
    two = TableFailedError.of("ledgers", {"bank.tellers": truncated, "bank.branches": gone})
    text = str(two)
    assert text.startswith("2 tables of group ledgers are failed: bank.branches: " + gone)
    assert "`cdc-daemon resync --table bank.branches`" in text
    assert text.count("resync --table bank.tellers") == 1
    assert "\n" not in text


def test_at_names_the_boundary_on_the_instance_only() -> None:
    """``at(boundary)`` returns the same error with ``boundary`` set, so it can be chained in a
    ``raise``; it marks that one instance, not its class nor other errors."""
    err = TransientError("uploading x: timed out")
    assert err.boundary is None
    assert err.at("s3") is err
    assert err.boundary == "s3"
    assert TransientError.boundary is None
    assert CdcError.boundary is None
    assert TransientError("another").boundary is None


# -- psycopg ------------------------------------------------------------------------------------

TRANSIENT_SQLSTATES = [
    "08000",  # connection_exception
    "08001",  # sqlclient_unable_to_establish_sqlconnection
    "08003",  # connection_does_not_exist
    "08006",  # connection_failure
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "57014",  # query_canceled
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (the server is starting)
    "53000",  # insufficient_resources
    "53100",  # disk_full
    "53200",  # out_of_memory
    "53300",  # too_many_connections
]


@pytest.mark.parametrize("sqlstate", TRANSIENT_SQLSTATES)
def test_psycopg_transient_sqlstate_classes_are_retriable(sqlstate: str) -> None:
    """SQLSTATE classes 08 (connection), 40 (serialization, deadlock), 57 (operator
    intervention) and 53 (insufficient resources) become a ``TransientError`` at the
    ``postgres`` boundary, whatever psycopg class carries them."""
    exc = pg.lookup(sqlstate)("terminating connection due to administrator command")
    assert exc.sqlstate == sqlstate
    err = from_psycopg(exc, "committing a batch")
    assert type(err) is TransientError
    assert err.retriable
    assert err.exit_code == 6
    assert err.boundary == "postgres"
    assert str(err) == "committing a batch: terminating connection due to administrator command"


@pytest.mark.parametrize("sqlstate", ["42P01", "42703", "42501", "3F000"])
def test_psycopg_missing_table_column_privilege_or_schema_is_a_source_error(
    sqlstate: str,
) -> None:
    """An undefined table (42P01), undefined column (42703), insufficient privilege (42501) or
    invalid schema name (3F000) is a ``SourceError`` (exit 3): the table cannot be captured as
    configured, and no retry changes that."""
    exc = pg.lookup(sqlstate)('relation "public.nope" does not exist')
    err = from_psycopg(exc, "cannot read public.nope")
    assert type(err) is SourceError
    assert not err.retriable
    assert err.exit_code == 3
    assert err.boundary == "postgres"
    assert str(err) == 'cannot read public.nope: relation "public.nope" does not exist'


@pytest.mark.parametrize(
    "sqlstate",
    [
        "42601",  # syntax_error
        "42P07",  # duplicate_table
        "23505",  # unique_violation
        "22P02",  # invalid_text_representation
        "28P01",  # invalid_password: an OperationalError subclass, but not retriable
        "3D000",  # invalid_catalog_name: the database does not exist
        "25006",  # read_only_sql_transaction
        "55006",  # object_in_use
        "0A000",  # feature_not_supported
        "58030",  # io_error
        "XX000",  # internal_error
    ],
)
def test_psycopg_other_sqlstates_are_plain_non_retriable_errors(sqlstate: str) -> None:
    """Any other SQLSTATE is a plain ``CdcError`` (exit 1, not retriable) -- also when psycopg
    raises it as an ``OperationalError``: the SQLSTATE decides, not the class."""
    exc = pg.lookup(sqlstate)("it went wrong")
    err = from_psycopg(exc, "recording a backfill run")
    assert type(err) is CdcError
    assert not err.retriable
    assert err.exit_code == 1
    assert err.boundary == "postgres"
    assert str(err) == "recording a backfill run: it went wrong"


def test_psycopg_operational_error_without_sqlstate_is_transient() -> None:
    """A connection that failed before the server answered (psycopg raises a bare
    ``OperationalError``, no SQLSTATE) is transient: the server may come back."""
    exc = psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed:'
        " Connection refused\n\tIs the server running on that host and accepting TCP/IP"
        " connections?"
    )
    assert exc.sqlstate is None
    err = from_psycopg(exc, "cannot connect to the source database")
    assert type(err) is TransientError
    assert err.boundary == "postgres"
    # Only the first line: the hint after it is libpq's, not ours.
    assert str(err) == (
        "cannot connect to the source database: connection failed: connection to server at"
        ' "127.0.0.1", port 5432 failed: Connection refused'
    )


def test_psycopg_error_without_sqlstate_nor_connection_failure_is_plain() -> None:
    """A psycopg error that carries no SQLSTATE and is not an ``OperationalError`` (a DSN
    libpq cannot parse) is a plain, non-retriable ``CdcError``; the parts libpq quotes (which
    may be the password) are left out."""
    with pytest.raises(psycopg.ProgrammingError) as caught:
        conninfo_to_dict("host=db.internal port=5432 bogus")
    err = from_psycopg(caught.value, "cannot connect to the source database")
    assert type(err) is CdcError
    assert not err.retriable
    assert str(err) == (
        'cannot connect to the source database: missing "..." after "..." in connection info string'
    )


def test_psycopg_message_keeps_only_the_first_line() -> None:
    """The server's message is cut at its first line: the ``LINE 1:`` excerpt of the statement
    and its caret do not reach the one-sentence message."""
    exc = pg.UndefinedTable(
        'relation "public.sales" does not exist\n'
        "LINE 1: SELECT id FROM public.sales\n"
        "                       ^"
    )
    err = from_psycopg(exc, "cannot read public.sales")
    assert str(err) == 'cannot read public.sales: relation "public.sales" does not exist'


def test_psycopg_error_without_message_is_named_by_its_class() -> None:
    """A driver error with an empty message still gives a sentence: what was being done and
    the driver's class name."""
    err = from_psycopg(psycopg.OperationalError(""), "moving the position")
    assert type(err) is TransientError
    assert str(err) == "moving the position: OperationalError"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://cdc:s3cret pw@db.internal:5432/sales",  # a space in the password
        "postgresql://cdc:s3cret%zz@db.internal:5432/sales",  # a stray % in the password
        "postgresql://cdc:s3cret@[db.internal:5432/sales",  # quotes the whole URI
    ],
)
def test_psycopg_message_never_contains_the_dsn_password(dsn: str) -> None:
    """A malformed DSN's password never appears in the translated message."""
    with pytest.raises(psycopg.ProgrammingError) as caught:
        conninfo_to_dict(dsn)
    assert "s3cret" in str(caught.value)  # the driver's message does quote it
    err = from_psycopg(caught.value, "cannot connect to the source database")
    assert "s3cret" not in str(err)


# -- botocore -----------------------------------------------------------------------------------

RETRIABLE_S3_CODES = [
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
]


def client_error(
    code: str, message: str | None = None, operation: str = "PutObject"
) -> ClientError:
    error: dict[str, str] = {"Code": code}
    if message is not None:
        error["Message"] = message
    return ClientError({"Error": error}, operation)  # type: ignore[typeddict-item]


@pytest.mark.parametrize("code", RETRIABLE_S3_CODES)
def test_s3_server_failures_and_throttling_are_transient(code: str) -> None:
    """5xx answers, throttling (SlowDown, Throttling), request timeouts and clock skew are a
    ``TransientError`` at the ``s3`` boundary, naming the code and S3's message."""
    err = from_botocore(client_error(code, "Please reduce your request rate."), "uploading k")
    assert type(err) is TransientError
    assert err.retriable
    assert err.boundary == "s3"
    assert str(err) == f"uploading k: S3 answered {code}: Please reduce your request rate."


def test_s3_missing_bucket_is_a_storage_error() -> None:
    """NoSuchBucket is a ``StorageError`` (exit 7) saying the bucket does not exist."""
    err = from_botocore(
        client_error("NoSuchBucket", "The specified bucket does not exist", "HeadBucket"),
        "checking bucket 'cdc'",
    )
    assert type(err) is StorageError
    assert not err.retriable
    assert err.exit_code == 7
    assert err.boundary == "s3"
    assert str(err) == "checking bucket 'cdc': the bucket does not exist"


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_s3_denied_access_names_the_code_only(code: str) -> None:
    """A refused credential or signature is a ``StorageError`` that names the code and leaves
    out S3's message and the rest of the response (where key ids and signing details live)."""
    exc = ClientError(
        {
            "Error": {  # type: ignore[typeddict-unknown-key]
                "Code": code,
                "Message": "The AWS Access Key Id AKIAEXAMPLEKEY you provided does not exist",
                "AWSAccessKeyId": "AKIAEXAMPLEKEY",
                "StringToSign": "AWS4-HMAC-SHA256\n20240101T000000Z",
            }
        },
        "PutObject",
    )
    err = from_botocore(exc, "uploading s3://cdc/k")
    assert type(err) is StorageError
    assert not err.retriable
    assert str(err) == f"uploading s3://cdc/k: S3 denied access ({code})"


@pytest.mark.parametrize(
    ("code", "message", "shown"),
    [
        ("InvalidBucketName", "The specified bucket is not valid.", None),
        ("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", None),
        ("404", "Not Found", None),
        ("403", None, "403"),  # HEAD answers carry no body: the code stands in for a message
    ],
)
def test_s3_other_refusals_are_storage_errors(
    code: str, message: str | None, shown: str | None
) -> None:
    """Any other error code is a non-retriable ``StorageError`` naming the code and S3's
    message, or the code again when S3 sent no message."""
    err = from_botocore(client_error(code, message), "uploading k")
    assert type(err) is StorageError
    assert not err.retriable
    assert err.boundary == "s3"
    assert str(err) == f"uploading k: S3 answered {code}: {shown or message}"


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9000/cdc"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:9000/cdc"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:9000/cdc"),
        ConnectionClosedError(endpoint_url="http://127.0.0.1:9000/cdc"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_s3_unreachable_endpoint_is_transient(exc: BotoCoreError) -> None:
    """No answer at all (connection refused, timeouts, a dropped connection) is a
    ``TransientError`` with botocore's sentence: the endpoint may come back."""
    err = from_botocore(exc, "uploading k")
    assert type(err) is TransientError
    assert err.retriable
    assert err.boundary == "s3"
    assert str(err) == f"uploading k: {exc}"
    assert "http://127.0.0.1:9000/cdc" in str(err)


# -- snowflake-connector ------------------------------------------------------------------------


def test_snowflake_rejected_statement_is_a_warehouse_error() -> None:
    """A ``ProgrammingError`` (Snowflake refused the statement) is a ``WarehouseError`` (exit
    8, not retriable); the message is the driver's raw message, without the connector's
    ``errno (sqlstate):`` prefix."""
    exc = sf.ProgrammingError(
        msg="Insufficient privileges to operate on pipe 'RAW_SALES_PIPE'",
        errno=3001,
        sqlstate="42501",
    )
    assert str(exc).startswith("003001 (42501): ")
    err = from_snowflake(exc, "Snowflake failed SELECT SYSTEM$PIPE_STATUS(%(pipe)s) AS")
    assert type(err) is WarehouseError
    assert not err.retriable
    assert err.exit_code == 8
    assert str(err) == (
        "Snowflake failed SELECT SYSTEM$PIPE_STATUS(%(pipe)s) AS:"
        " Insufficient privileges to operate on pipe 'RAW_SALES_PIPE'"
    )


def test_snowflake_refused_data_is_a_warehouse_error_not_retried() -> None:
    """A NOT NULL violation (the connector's ``IntegrityError``, Snowflake error 100072) and a
    value Snowflake cannot take (``DataError``) fail at once as ``WarehouseError``: a retry
    would meet the same data."""
    for exc in (
        sf.IntegrityError(msg="NULL result in a non-nullable column", errno=100072),
        sf.DataError(msg="Numeric value 'x' is not recognized", errno=100038),
    ):
        err = from_snowflake(exc, "merging")
        assert type(err) is WarehouseError
        assert not err.retriable


def test_snowflake_compilation_error_keeps_the_reason() -> None:
    """A two-line Snowflake refusal keeps its reason (which object, which privilege)."""
    exc = sf.ProgrammingError(
        msg="SQL compilation error:\nObject 'CDC.RAW.RAW_SALES' does not exist or not authorized.",
        errno=2003,
        sqlstate="42S02",
    )
    err = from_snowflake(exc, "Snowflake failed SELECT FILE_NAME, STATUS,")
    assert type(err) is WarehouseError
    assert "does not exist or not authorized" in str(err)


def test_snowflake_message_leaves_out_the_statement() -> None:
    """The statement the connector attaches to its error (which may hold credentials, e.g. a
    stage's) is not part of the message."""
    exc = sf.ProgrammingError(
        msg="Invalid credentials for the stage",
        errno=2003,
        sqlstate="42000",
        query="CREATE STAGE s URL='s3://cdc' CREDENTIALS=(AWS_SECRET_KEY='s3cretkey')",
    )
    err = from_snowflake(exc, "Snowflake failed CREATE STAGE s")
    assert str(err) == "Snowflake failed CREATE STAGE s: Invalid credentials for the stage"


@pytest.mark.parametrize(
    "exc",
    [
        sf.OperationalError(
            msg="Could not connect to Snowflake backend after 2 attempt(s).Aborting",
            errno=250001,
            sqlstate="08001",
        ),
        sf.DatabaseError(
            msg="Failed to connect to DB. Service is unavailable: acme.snowflakecomputing.com:443.",
            errno=250001,
            sqlstate="08001",
        ),
        sf.InterfaceError(msg="Failed to execute request: Connection aborted.", errno=251001),
        sf.InternalServerError(),
        sf.ServiceUnavailableError(),
        sf.BadGatewayError(),
        sf.GatewayTimeoutError(),
        sf.RequestTimeoutError(),
        sf.TooManyRequests(),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_snowflake_network_and_server_failures_are_transient(exc: Exception) -> None:
    """Network trouble, timeouts and Snowflake's own failures (HTTP 5xx, 429, 408) are a
    ``TransientError``, with the driver's raw message after what was being done."""
    err = from_snowflake(exc, "cannot connect to Snowflake")
    assert type(err) is TransientError
    assert err.retriable
    raw = getattr(exc, "raw_msg", None) or str(exc)
    assert str(err) == f"cannot connect to Snowflake: {raw}"


def test_snowflake_not_supported_is_not_a_warehouse_error() -> None:
    """``NotSupportedError`` (the connector's or fakesnow's "not supported") is carved out of
    the refused-statement branch and ends up transient, like any other connector error."""
    exc = sf.NotSupportedError(msg="scroll is not supported.", errno=252001, sqlstate="0A000")
    err = from_snowflake(exc, "Snowflake failed SELECT 1")
    assert type(err) is TransientError
    assert str(err) == "Snowflake failed SELECT 1: scroll is not supported."


def test_snowflake_rejected_credentials_are_not_retriable() -> None:
    """A wrong password or key, as the connector reports it, is not retried."""
    exc = sf.DatabaseError(
        msg=(
            "Failed to connect to DB: acme.snowflakecomputing.com:443."
            " Incorrect username or password was specified."
        ),
        errno=390100,
        sqlstate="28000",
    )
    err = from_snowflake(exc, "cannot connect to Snowflake")
    assert not err.retriable


def test_snowflake_error_without_message() -> None:
    """A connector error with no message reads the connector's "Unknown error"; an exception
    with an empty message is named by its class."""
    assert str(from_snowflake(sf.Error(), "doing x")) == "doing x: Unknown error"
    assert str(from_snowflake(TimeoutError(), "doing x")) == "doing x: TimeoutError"


@pytest.mark.parametrize("exc", [ValueError("bad value"), KeyError("S")], ids=repr)
def test_snowflake_unexpected_exception_is_plain_and_not_retriable(exc: Exception) -> None:
    """An exception that is neither the connector's nor the network's (a bug, a surprising
    row) is a plain ``CdcError``: not retried."""
    err = from_snowflake(exc, "Snowflake failed SELECT 1")
    assert type(err) is CdcError
    assert not err.retriable
    assert str(err) == f"Snowflake failed SELECT 1: {exc}"


def test_snowflake_errors_name_their_boundary() -> None:
    """A translated Snowflake error names the ``snowflake`` boundary."""
    err = from_snowflake(sf.ServiceUnavailableError(), "cannot connect to Snowflake")
    assert err.boundary == "snowflake"


# -- first_error ---------------------------------------------------------------------------------


def test_first_error_skips_the_cancellations() -> None:
    """The error that made a TaskGroup fail is reported, not the cancellations of its siblings
    listed before it."""
    cause = TransientError("uploading k: timed out")
    group = BaseExceptionGroup("unhandled errors", [asyncio.CancelledError(), cause])
    assert first_error(group) is cause


def test_first_error_picks_the_first_of_several_failures() -> None:
    """Of several real failures, the first listed is reported."""
    first, second = SourceError("a"), StorageError("b")
    assert first_error(ExceptionGroup("two failed", [first, second])) is first


def test_first_error_looks_into_nested_groups() -> None:
    """A group inside the group (a TaskGroup inside a task) is searched for its own failure."""
    cause = StateError("the ledger moved")
    inner = BaseExceptionGroup("inner", [asyncio.CancelledError(), cause])
    outer = BaseExceptionGroup("outer", [inner, asyncio.CancelledError()])
    assert first_error(outer) is cause


def test_first_error_of_only_cancellations_is_a_cancellation() -> None:
    """When every member is a cancellation, the first one is returned (so the caller re-raises
    a cancellation, never swallows it)."""
    first = asyncio.CancelledError("first")
    group = BaseExceptionGroup("cancelled", [first, asyncio.CancelledError("second")])
    assert first_error(group) is first


def test_first_error_skips_a_nested_group_of_cancellations() -> None:
    """A real failure after a nested group of cancellations is still the one reported."""
    cause = TransientError("uploading k: timed out")
    inner = BaseExceptionGroup("inner", [asyncio.CancelledError()])
    group = BaseExceptionGroup("outer", [inner, cause])
    assert first_error(group) is cause
