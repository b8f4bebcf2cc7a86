"""One error hierarchy. ``retriable`` says whether trying the same work again can fix it.

Driver errors (psycopg SQLSTATEs, botocore codes) are translated once, at the boundary that saw
them, with ``raise ... from exc``; everything above deals in these classes only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping

import aiohttp
import psycopg
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError


class CdcError(Exception):
    """Base class. The message is one sentence a user can act on, with no secret in it."""

    retriable: bool = False
    exit_code: int = 1
    # Which service failed ("postgres", "s3", "snowflake"), set where a driver error is
    # translated; retries are counted per boundary (metrics).
    boundary: str | None = None
    # The SQLSTATE of the PostgreSQL error it translates, if any: which failures belong to one
    # table (an undefined column, a revoked privilege, a value that cannot be read) and which
    # to the whole source.
    sqlstate: str | None = None

    def at(self, boundary: str) -> CdcError:
        self.boundary = boundary
        return self


class ConfigError(CdcError):
    exit_code = 2


class SourceError(CdcError):
    """The source table cannot be captured as configured (missing table, column, privilege)."""

    exit_code = 3


class StateError(CdcError):
    """The ledger is missing, or disagrees with what this process expected."""

    exit_code = 4


class AlreadyRunningError(CdcError):
    exit_code = 5


class TransientError(CdcError):
    """A server was unreachable or failed in a way that a retry can fix. An outage
    (``unavailable``) is waited out without an attempt limit (``daemon.outage_max_s``); any
    other is retried ``daemon.retry_attempts`` times at most, since it may be a mistake that
    only looks transient (a statement timeout too short, missing credentials)."""

    retriable = True
    exit_code = 6
    # The service did not answer, or answered that it cannot serve now: connection refused or
    # lost, a timeout, 5xx, throttling, a server shutting down or starting. Only its return
    # fixes that, and nothing is lost meanwhile.
    unavailable: bool = False

    def outage(self) -> TransientError:
        """This error as an outage (``unavailable``)."""
        self.unavailable = True
        return self


class StorageError(CdcError):
    """S3 refused the request for a reason a retry will not fix (no bucket, access denied)."""

    exit_code = 7


class WarehouseError(CdcError):
    """Snowflake refused a statement for a reason a retry will not fix (SQL, privileges)."""

    exit_code = 8


class TableFailedError(CdcError):
    """A table of a logical group is failed (TRUNCATE, a retyped column, dropped...): the group's
    other tables went on, this one exports nothing until it is resynced. Raised when the daemon
    stops, so that a cron job or a supervisor sees it; retrying the same run cannot fix it."""

    exit_code = 9

    @classmethod
    def of(cls, group: str, failed: Mapping[str, str]) -> TableFailedError:
        """The error naming each failed table (name -> reason) with its fix."""
        tables = sorted(failed.items())
        if len(tables) == 1:
            ((table, reason),) = tables
            return cls(
                f"table {table} of group {group} is failed: {reason}{table_fix(table, reason)}"
            )
        listed = "; ".join(f"{t}: {r}{table_fix(t, r)}" for t, r in tables)
        return cls(f"{len(tables)} tables of group {group} are failed: {listed}")


def table_fix(table: str, reason: str) -> str:
    """What to append to a failed table's reason so that it names the fix: the capture's
    reasons for a TRUNCATE or a retyped column already say it; a table that could not be read
    (dropped, no privilege) does not."""
    if "resync --table" in reason:
        return ""
    return (
        f" (fix the cause; then stop the daemon, run `cdc-daemon resync --table {table}` and "
        "start it again)"
    )


def from_snowflake(exc: Exception, doing: str) -> CdcError:
    """Translate a snowflake-connector error. Network trouble, timeouts and the server's own
    failures are transient; a rejected statement is not."""
    # Imported here: the connector costs ~40 MB of RSS, paid only where a warehouse is used.
    from snowflake.connector import errors as sf

    # Snowflake's refusals come in two lines ("SQL compilation error:" / what is wrong).
    lines = [s.strip() for s in (getattr(exc, "raw_msg", None) or str(exc)).splitlines()]
    detail = " ".join(s for s in lines if s) or type(exc).__name__
    message = f"{doing}: {detail}"
    # A statement Snowflake refused: its SQL (ProgrammingError), or the data it met (a NOT
    # NULL violation is IntegrityError 100072, a bad value DataError): no retry fixes either.
    refused = (sf.ProgrammingError, sf.IntegrityError, sf.DataError)
    if isinstance(exc, refused) and not isinstance(exc, sf.NotSupportedError):
        return WarehouseError(message).at("snowflake")
    if isinstance(exc, sf.DatabaseError) and str(getattr(exc, "sqlstate", "")).startswith("28"):
        # SQLSTATE class 28, invalid authorization: a wrong password or key; no retry fixes it.
        return ConfigError(message).at("snowflake")
    unavailable = (
        sf.OperationalError,
        sf.InterfaceError,
        sf.InternalServerError,
        sf.ServiceUnavailableError,
        sf.GatewayTimeoutError,
        sf.BadGatewayError,
        sf.RequestTimeoutError,
        sf.TooManyRequests,
        sf.OtherHTTPRetryableError,
        sf.RequestExceedMaxRetryError,
        OSError,
        TimeoutError,
    )
    if isinstance(exc, unavailable):
        return TransientError(message).outage().at("snowflake")
    if isinstance(exc, sf.Error):
        return TransientError(message).at("snowflake")
    return CdcError(message).at("snowflake")


# SQLSTATE classes that a later attempt can succeed at: connection exceptions, a serialization
# failure or deadlock, operator intervention (admin shutdown, query canceled), insufficient
# resources.
_RETRIABLE_SQLSTATE_CLASSES = ("08", "40", "57", "53")
# Of those, the server being away or out of something: connection exceptions, a shutdown
# (admin, crash) or a start-up still under way, too many connections, out of disk or memory.
# A query canceled (a statement timeout) or a deadlock is not: it may recur on every attempt.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53000", "53100", "53200", "53300")


def from_psycopg(exc: psycopg.Error, doing: str) -> CdcError:
    """Translate a psycopg error raised while ``doing`` something."""
    translated = _from_psycopg(exc, doing)
    translated.sqlstate = exc.sqlstate or None
    return translated


def _from_psycopg(exc: psycopg.Error, doing: str) -> CdcError:
    sqlstate = exc.sqlstate or ""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.ProgrammingError) and not sqlstate:
        # A client-side error, e.g. libpq's DSN parser, which quotes the part it cannot
        # parse: that part may be the password, so quoted parts are left out.
        detail = re.sub(r'"[^"]*"', '"..."', detail)
    if isinstance(exc, psycopg.OperationalError) and not sqlstate:
        # No SQLSTATE: libpq's own (connection refused, lost, timed out).
        return TransientError(f"{doing}: {detail}").outage().at("postgres")
    if sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
        return TransientError(f"{doing}: {detail}").outage().at("postgres")
    if sqlstate.startswith(_RETRIABLE_SQLSTATE_CLASSES):
        return TransientError(f"{doing}: {detail}").at("postgres")
    if sqlstate in ("42P01", "42703", "42501", "3F000"):
        return SourceError(f"{doing}: {detail}").at("postgres")
    return CdcError(f"{doing}: {detail}").at("postgres")


# S3 error codes that mean "not now": the service is failing or throttling (an outage).
_UNAVAILABLE_S3_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
    }
)
# Worth a few attempts, not an outage: this host's clock must be fixed.
_RETRIABLE_S3_CODES = frozenset({"RequestTimeTooSkewed"})


def from_botocore(exc: BotoCoreError | ClientError, doing: str) -> CdcError:
    return _from_botocore(exc, doing).at("s3")


def _from_botocore(exc: BotoCoreError | ClientError, doing: str) -> CdcError:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or code
        if code in _UNAVAILABLE_S3_CODES:
            return TransientError(f"{doing}: S3 answered {code}: {message}").outage()
        if code in _RETRIABLE_S3_CODES:
            return TransientError(f"{doing}: S3 answered {code}: {message}")
        if code == "NoSuchBucket":
            return StorageError(f"{doing}: the bucket does not exist")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{doing}: S3 denied access ({code})")
        return StorageError(f"{doing}: S3 answered {code}: {message}")
    if isinstance(exc, (HTTPClientError, BotoConnectionError, IncompleteReadError)):
        # Connection refused or lost, timeouts, DNS: the endpoint may come back.
        return TransientError(f"{doing}: {exc}").outage()
    # The client's own (no credentials found, a parameter refused): worth a few attempts
    # (credentials from instance metadata may come late), not an outage.
    return TransientError(f"{doing}: {exc}")


def from_aiohttp(exc: aiohttp.ClientError | TimeoutError, doing: str) -> CdcError:
    """An HTTP client error that aiobotocore let through untranslated (a connection lost
    while a body was streamed): the endpoint went away."""
    return TransientError(f"{doing}: {type(exc).__name__}: {exc}").outage().at("s3")


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that made a TaskGroup fail (the rest are usually its cancellations), so that
    callers and retries see a ``CdcError``, not a group."""
    for exc in group.exceptions:
        found = first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if not isinstance(found, asyncio.CancelledError):
            return found
    first = group.exceptions[0]
    return first_error(first) if isinstance(first, BaseExceptionGroup) else first
