"""Settings: one TOML file plus ``CDC_<SECTION>__<KEY>`` environment overrides.

This is the only module that reads environment variables or configuration files. The key names
are a public interface (deployments and checks outside the repository use them): rename nothing.
AWS credentials are deliberately absent: they come from botocore's standard chain.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cdc_daemon.errors import ConfigError
from cdc_daemon.names import TableName

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# The port of /healthz, /readyz and /metrics when ``http.address`` names only a host; the
# manifests in deploy/ use it (9187: next to postgres_exporter's 9187-9188 range, unassigned).
DEFAULT_HTTP_PORT = 9187
_SF_IDENT = r"^[A-Za-z_][A-Za-z0-9_$]{0,254}$"
NO_TABLE = "no table to capture: name the tables in [[tables]] (or one table in postgres.table)"
# The environment variable that holds the salt of ``hash_columns`` (or capture.hash_salt_file).
HASH_SALT_VARIABLE = "CDC_HASH_SALT"
_MIN_SALT_BYTES = 16
SALT_IN_FILE = (
    "the salt of hash_columns is never read from the configuration file (it would sit in clear "
    f"text next to the settings): set the environment variable {HASH_SALT_VARIABLE}, or name a "
    "file holding it in capture.hash_salt_file"
)


def _refuse_salt(data: Any) -> Any:
    """A ``mode="before"`` check: a key named like the salt is refused with its own sentence
    rather than as an unknown key, so that nobody tries again under another name."""
    if isinstance(data, dict) and any(str(k).lower() in ("hash_salt", "salt") for k in data):
        raise ValueError(SALT_IN_FILE)
    return data


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresSettings(_Section):
    """The source database."""

    dsn: SecretStr = Field(
        default=SecretStr(DEFAULT_DSN),
        description="Source database, as a libpq URI or key=value string (secret).",
    )
    table: str | None = Field(
        default=None,
        description="One-table shorthand for a single `[[tables]]` entry: `schema.table` "
        "(resolved as an identifier), with `capture.watermark_column` and "
        "`capture.partition_column`. A configuration names its tables here or in "
        "`[[tables]]`; there is no default table.",
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Connect timeout.")
    statement_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="Statement timeout of the extract and ledger sessions; 0: no limit.",
    )

    @field_validator("table")
    @classmethod
    def _table_has_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must name a table, e.g. public.orders")
        if value is not None:
            TableName.parse(value)
        return value


class CaptureSettings(_Section):
    """How changes are captured: by high-watermark or through a logical replication slot."""

    mode: Literal["watermark", "logical"] = Field(
        default="watermark",
        description="`watermark` (new rows by an increasing column) or `logical` (inserts, "
        "updates and deletes from a pgoutput slot; see docs/logical.md).",
    )
    watermark_column: str | None = Field(
        default=None,
        description="Watermark mode: an integer column filled by a sequence; default: the "
        "table's key when it is one integer column (docs/logical.md#which-key).",
    )
    partition_column: str | None = Field(
        default=None,
        description="With the `postgres.table` shorthand: a `date`, `timestamp` or "
        "`timestamptz` column whose UTC day names the object's `dt=` folder; none: the UTC day "
        "of the change's commit (logical) or of the read (watermark). `[[tables]]` name theirs "
        "in `tables.partition_column`.",
    )
    group: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_]{1,40}$",
        description="The name of the group of tables one daemon captures (its lock, ledger "
        "position, and in logical mode its slot `cdc_<group>` and publication); required with "
        "several `[[tables]]`, default for one table: the table's name.",
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="Pause between passes while there is nothing new."
    )
    slot_name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_]{1,63}$",
        description="Logical mode: the replication slot; default `cdc_<schema>_<table>`.",
    )
    publication_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="Logical mode: the publication; default `cdc_<schema>_<table>`.",
    )
    snapshot_chunk_rows: int = Field(
        default=100_000,
        gt=0,
        description="Logical mode: a table that joins a running group is exported in chunks "
        "of this many rows by key, between the stream's batches (see docs/logical.md).",
    )
    snapshot_jobs: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Logical mode: chunks of the snapshot copied at once, each on its own "
        "source session (a table's keys are cut into this many ranges).",
    )
    initial_snapshot: bool = Field(
        default=True,
        description="Logical mode: export the rows present when the slot is created (from the "
        "slot's exported snapshot).",
    )
    max_read_wal_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Unused since logical capture streams (it bounded the WAL one peek "
        "decoded); kept so that existing files still load.",
    )
    heartbeat_s: float = Field(
        default=10.0,
        gt=0,
        description="Logical mode: an idle table on a busy server moves the slot at least "
        "this often, so that WAL does not pile up.",
    )
    max_lag_bytes: int = Field(
        default=1024 * 1024 * 1024,
        gt=0,
        description="Logical mode: warn (`slot_lag_high`) when the slot holds back more WAL.",
    )
    schema_change: Literal["stop", "follow"] = Field(
        default="stop",
        description="Logical mode: a retyped column other than a widening stops its table "
        "(`stop`) or is followed with a new column list (`follow`); added, dropped and widened "
        "columns are always followed (docs/snowflake.md#schema-evolution).",
    )
    hash_salt_file: Path | None = Field(
        default=None,
        description="A file holding the salt of every table's `hash_columns` (its bytes, one "
        f"trailing newline dropped; {_MIN_SALT_BYTES} bytes at least); else the environment "
        f"variable `{HASH_SALT_VARIABLE}`. Never read from the configuration file itself, never "
        "logged; a table's salt cannot change unless the table is exported again (resync).",
    )

    _no_salt = model_validator(mode="before")(_refuse_salt)


class TableSettings(_Section):
    """One table of the group (`[[tables]]`); `postgres.table` is the one-table shorthand."""

    name: str = Field(description="`schema.table` (resolved as an identifier).")
    key: tuple[str, ...] | None = Field(
        default=None,
        description="The key columns the warehouse merges by: NOT NULL, with a unique index on "
        "exactly them (in logical mode also what the replica identity sends); default: the "
        "primary key, else a unique index on NOT NULL columns (docs/logical.md#which-key).",
    )
    watermark_column: str | None = Field(
        default=None,
        description="Watermark mode: an integer column filled by a sequence; default: the "
        "table's key when it is one integer column (docs/logical.md#which-key).",
    )
    partition_column: str | None = Field(
        default=None,
        description="A `date`, `timestamp` or `timestamptz` column whose UTC day names the "
        "`dt=` folder; none: the UTC day of the change's commit (logical) or of the read "
        "(watermark).",
    )
    warehouse_table: str | None = Field(
        default=None,
        pattern=_SF_IDENT,
        description="The current-state table in Snowflake (its landing table, pipe, stream "
        "and tasks are named after it); default: the table's name as a plain Snowflake "
        "identifier (docs/design.md#snowflake-names).",
    )
    max_rows: int | None = Field(
        default=None, gt=0, description="Watermark mode: this table's `batch.max_rows`."
    )
    max_bytes: int | None = Field(
        default=None, gt=0, description="Watermark mode: this table's `batch.max_bytes`."
    )
    max_age_s: float | None = Field(
        default=None, ge=0, description="Watermark mode: this table's `batch.max_age_s`."
    )
    columns: tuple[str, ...] | None = Field(
        default=None,
        description="The only columns captured (with the key columns among them); the others "
        "are never read from the source, so they are in no object and no Snowflake table. "
        "Default: every column but `exclude_columns`.",
    )
    exclude_columns: tuple[str, ...] = Field(
        default=(),
        description="Columns never read from the source (not in the export's or snapshot's "
        "`SELECT`, dropped from logical changes before they are spooled), so in no object and "
        "no Snowflake table. A key, watermark or partition column cannot be left out.",
    )
    hash_columns: tuple[str, ...] = Field(
        default=(),
        description="Columns whose values leave the daemon only as the lower-case hex of "
        "HMAC-SHA256(salt, the value's text in the object), NULL staying NULL: the same value "
        "hashes the same in every table and run. Key columns may be hashed (the merge keys on "
        "the hash), the watermark and partition columns not. Snowflake types them "
        "`VARCHAR(64)`; the salt: `capture.hash_salt_file`.",
    )
    deletes: Literal["hard", "soft"] = Field(
        default="hard",
        description="`hard`: a deleted row leaves the current-state table; `soft`: it stays "
        "with `_CDC_DELETED_AT` set to the delete's commit time, and a later insert of its key "
        "makes it live again (`_CDC_DELETED_AT` NULL).",
    )
    history: bool = Field(
        default=False,
        strict=True,  # [[tables]] is TOML (or JSON): "yes" is a typo, not a boolean
        description="Also keep `<T>_HISTORY` in Snowflake: one row per version of each row, "
        "valid from its source commit time (`_CDC_VALID_FROM`) until the next version's or the "
        "delete's (`_CDC_VALID_TO`, NULL while current), with `_CDC_IS_CURRENT` and `_CDC_OP`, "
        "built by the merge task in the transaction that updates the current-state table "
        "(docs/snowflake.md#history-tables). Logical mode only: the watermark mode knows no "
        "commit times and sees no deletes.",
    )

    _no_salt = model_validator(mode="before")(_refuse_salt)

    @model_validator(mode="after")
    def _columns_agree(self) -> TableSettings:
        named = {
            "columns": self.columns or (),
            "exclude_columns": self.exclude_columns,
            "hash_columns": self.hash_columns,
        }
        for setting, names in named.items():
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{setting} names {', '.join(twice)} twice")
        if self.columns is not None and self.exclude_columns:
            raise ValueError(
                "columns and exclude_columns are both set: name the columns to capture in one "
                "of them"
            )
        if self.columns is not None and not self.columns:
            raise ValueError("columns is empty: name the columns to capture, key included")
        pinned = [
            (c, what)
            for what, names in (
                ("key", self.key or ()),
                ("watermark_column", (self.watermark_column,)),
                ("partition_column", (self.partition_column,)),
            )
            for c in names
            if c is not None and not self.captures(c)
        ]
        if pinned:
            column, what = pinned[0]
            raise ValueError(
                f"column {column!r} is the table's {what}, so it cannot be left out of the "
                "capture (a key can be hashed instead: hash_columns)"
            )
        if self.partition_column in self.hash_columns:
            raise ValueError(
                f"column {self.partition_column!r} is the table's partition_column, whose day "
                "names the objects' dt= folders, so it cannot be hashed"
            )
        hashed_out = [c for c in self.hash_columns if not self.captures(c)]
        if hashed_out:
            raise ValueError(
                f"column {hashed_out[0]!r} is both hashed and left out of the capture: keep it "
                "in hash_columns or leave it out, not both"
            )
        return self

    def captures(self, column: str) -> bool:
        """Whether ``column`` is read from the source (``columns`` / ``exclude_columns``)."""
        if self.columns is not None:
            return column in self.columns
        return column not in self.exclude_columns

    @field_validator("name")
    @classmethod
    def _has_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a table, e.g. public.orders")
        TableName.parse(value)
        return value

    @property
    def table(self) -> TableName:
        return TableName.parse(self.name)

    @property
    def qualified(self) -> str:
        """The table's ledger key (``TableName.key``): ``schema.table`` for a plain name."""
        return self.table.key

    @property
    def warehouse_name(self) -> str:
        if self.warehouse_table is not None:
            return self.warehouse_table
        return self.table.warehouse_default


class BatchSettings(_Section):
    """When a micro-batch closes (rows, bytes or age, whichever comes first) and how it is
    written."""

    max_rows: int = Field(default=500_000, gt=0, description="Rows per batch at most.")
    max_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="Uncompressed CSV bytes per batch at most."
    )
    max_age_s: float = Field(
        default=10.0, ge=0, description="How long a change waits for more before it is sent."
    )
    max_days: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="Days (objects) in one batch: each open day holds a compressor and a file.",
    )
    compression: Literal["gzip", "zstd", "none"] = Field(
        default="gzip", description="Compression of the objects."
    )
    compression_level: int = Field(
        default=1,
        ge=1,
        le=19,
        description="Level 1 is what `gzip -1` / `zstd -1` use: cheap for the daemon, fine "
        "for Snowflake.",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="Where a batch is spooled (split per day) before it is uploaded; default: "
        "the system's temporary directory.",
    )


class S3Settings(_Section):
    """The staging bucket. Credentials come from botocore's standard chain (environment,
    profile, instance or IRSA role), never from this file."""

    bucket: str = Field(default="cdc-local", description="The bucket.")
    prefix: str = Field(default="", description="Key prefix; a `/` is appended when missing.")
    region: str = Field(default="us-east-1", description="The bucket's region.")
    endpoint_url: str | None = Field(
        default=None, description="An S3-compatible server instead of AWS."
    )
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="`AES256` or `aws:kms` (with `sse_kms_key_id`)."
    )
    sse_kms_key_id: str | None = Field(default=None, description="The KMS key for `aws:kms`.")
    part_size: int = Field(
        default=8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        description="Multipart part size, and the largest object sent in one PUT.",
    )
    max_concurrency: int = Field(default=4, ge=1, le=64, description="Uploads in flight.")
    timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Per request: an endpoint that stops answering is a transient (retried) "
        "error after this long.",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix_is_folder(cls, value: str) -> str:
        value = value.lstrip("/")
        return value if not value or value.endswith("/") else value + "/"


class StateSettings(_Section):
    """The ledger: positions, batches and their states, in PostgreSQL."""

    dsn: SecretStr | None = Field(
        default=None, description="Where the ledger lives (secret); default: `postgres.dsn`."
    )
    schema_: str = Field(default="cdc", alias="schema", description="The ledger's schema.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DaemonSettings(_Section):
    """The daemon's lifecycle: shutdown, retries, stall detection, the single-instance lock."""

    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="Time the batch in flight gets to finish after SIGTERM; keep it below "
        "systemd's TimeoutStopSec and the pod's terminationGracePeriodSeconds.",
    )
    retry_attempts: int = Field(
        default=8,
        ge=1,
        description="Attempts of one step against a transient error that is not an outage (a "
        "statement timeout, a deadlock, S3 refusing this host's clock, missing credentials), "
        "with exponential backoff and jitter, before the daemon marks the batch failed and "
        "exits 6. An outage (a service refusing connections, not answering, answering 5xx or "
        "throttling, shutting down) is retried without this limit: see `outage_max_s`.",
    )
    retry_max_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="The longest wait between two attempts (the backoff doubles up to it, "
        "with jitter): also how long after a service's return the daemon resumes, at most.",
    )
    outage_max_s: float = Field(
        default=0.0,
        ge=0,
        description="How long an outage of S3, PostgreSQL or Snowflake is waited out (and at "
        "least `retry_attempts` attempts) before the daemon marks the batch failed and exits "
        "6; 0: without end, as long as it lasts (/healthz and /readyz name the service down "
        "and since when, and the pending batch's reason in `status` says so).",
    )
    stall_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A loop silent this long is stalled: /healthz fails and the systemd "
        "watchdog is no longer fed. Above the longest legitimate attempt of a step (one "
        "batch; the retry loop beats before each attempt, so an outage waited out is no "
        "stall).",
    )
    wait_for_lock: bool = Field(
        default=False,
        description="Another daemon holds the table's lock: wait for it (a standby) instead "
        "of exiting 5.",
    )
    lock_poll_s: float = Field(default=5.0, gt=0, description="How often a standby tries.")


class HttpSettings(_Section):
    """Health and metrics endpoint."""

    address: str = Field(
        default="",
        description="`host[:port]` for /healthz, /readyz and /metrics (port default "
        f"{DEFAULT_HTTP_PORT}); empty: no endpoint.",
    )

    @field_validator("address")
    @classmethod
    def _address_parses(cls, value: str) -> str:
        value = value.strip()
        if value:
            split_address(value)
        return value

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        return split_address(self.address)[1]


def _ident(default: str, what: str) -> Any:
    return Field(default=default, pattern=_SF_IDENT, description=what)


class SnowflakeSettings(_Section):
    """The warehouse side (the `snowflake/` SQL) and the reconciler, which runs in the daemon
    when `account` is set. Identifiers are checked (letters, digits, `_`, `$`)."""

    account: str | None = Field(
        default=None, description="The account; set it to run the reconciler in the daemon."
    )
    user: str | None = Field(default=None, description="The user.")
    password: SecretStr | None = Field(
        default=None, description="Password (secret); key-pair authentication is preferred."
    )
    private_key_file: Path | None = Field(
        default=None, description="Key-pair authentication: the private key (PEM)."
    )
    private_key_passphrase: SecretStr | None = Field(
        default=None, description="The private key's passphrase (secret)."
    )
    role: str | None = Field(
        default=None, pattern=_SF_IDENT, description="The role the daemon's session uses."
    )
    deployer_role: str = _ident(
        "CDC_DEPLOYER", "`snowflake render --grants`: the role that runs `snowflake apply`."
    )
    tasks_role: str = _ident(
        "CDC_TASKS", "`snowflake render --grants`: the role that owns and runs the tasks."
    )
    reconciler_role: str = _ident(
        "CDC_RECONCILER", "`snowflake render --grants`: the reconciler's role."
    )
    warehouse: str = _ident("CDC_WH", "The virtual warehouse.")
    create_warehouse: bool = Field(
        default=True,
        description="`snowflake apply` creates the warehouse if it does not exist (XSMALL, "
        "auto-suspend 60 s); false when it is managed elsewhere.",
    )
    database: str = _ident("CDC", "The database.")
    schema_: str = Field(
        default="SALES", alias="schema", pattern=_SF_IDENT, description="The schema."
    )
    serverless_tasks: bool = Field(
        default=False,
        description="The merge and cleanup tasks run on Snowflake-managed compute (serverless; "
        "the task owner needs EXECUTE MANAGED TASK) instead of on `warehouse`.",
    )
    integration: str = _ident("CDC_S3", "The storage integration.")
    aws_role_arn: str = Field(
        default="arn:aws:iam::123456789012:role/cdc-snowflake",
        pattern=r"^arn:aws[-a-z]*:iam::",
        description="The IAM role the storage integration assumes.",
    )
    stage: str = _ident(
        "CDC_STAGE", "The external stage (the bucket's prefix: every table's folder under it)."
    )
    file_format: str = _ident("CDC_CSV", "The file format.")
    models_dir: Path | None = Field(
        default=None,
        description="The models: `<dir>/<TABLE>/NN_*.sql` are refreshed for the touched keys "
        "inside `<TABLE>`'s merge; none: no models (the demo and `local up` use "
        "`snowflake/models/`, the sample's `INVOICES` and `PRODUCTS` on `SALES`).",
    )
    merge_schedule: str = Field(
        default="1 MINUTE",
        pattern=r"^[0-9]{1,5} (MINUTE|MINUTES)$",
        description="The merge task's schedule.",
    )
    cleanup_schedule: str = Field(
        default="USING CRON 0 3 * * * UTC",
        pattern=r"^[A-Za-z0-9 *]+$",
        description="The cleanup task's schedule.",
    )
    retention_days: int = Field(default=7, ge=1, le=365, description="Days landing rows are kept.")
    tombstone_days: int = Field(
        default=14, ge=1, le=365, description="Days delete tombstones are kept."
    )
    host: str | None = Field(
        default=None,
        description="Connector endpoint override (a private-link host, or a server that "
        "speaks Snowflake's protocol on another address).",
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="Endpoint port override.")
    protocol: Literal["https", "http"] = Field(default="https", description="Endpoint protocol.")
    dialect: str = Field(
        default="snowflake",
        pattern=r"^[a-z][a-z0-9_]{0,40}$",
        description="`snowflake`, or another warehouse's answers to what differs (load "
        "history, pipe status and refresh, tasks, streams, DDL, the stage's location): the "
        "name of the dialect an installed extension registers as the entry point "
        "`<name>_dialect` of group `cdc_daemon` (the local warehouse's is `emulator`).",
    )
    login_timeout_s: float = Field(default=30.0, gt=0, description="Login timeout.")
    query_timeout_s: float = Field(default=120.0, gt=0, description="Statement timeout.")
    socket_timeout_s: int = Field(
        default=60,
        ge=1,
        description="Every socket connect and read: a server that accepts and never answers is "
        "a timeout, not a hang. Above 45 s: Snowflake holds a query request that long before "
        "answering 'still running'.",
    )
    reconcile_interval_s: float = Field(
        default=60.0, gt=0, description="How often the reconciler reads the load history."
    )
    missing_after_s: float = Field(
        default=900.0,
        gt=0,
        description="An uploaded batch not in the load history after this long is refreshed "
        "once (ALTER PIPE ... REFRESH) and, as long again after that, marked `missing`.",
    )
    stream_stale_warn_days: float = Field(
        default=2.0,
        ge=0,
        description="Warn (`stream_stale_soon`) when the stream goes stale in less than this "
        "many days unless something reads it.",
    )
    completeness_interval_s: float = Field(
        default=86_400.0,
        gt=0,
        description="How often the per-day completeness check runs (each table with a "
        "partition column against its current-state table).",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def enabled(self) -> bool:
        return self.account is not None


class VerifySettings(_Section):
    """Continuous verification: while the daemon runs (with a warehouse), each table is
    compared with its warehouse table value by value, a slice of keys at a time
    (docs/snowflake.md, "Verification")."""

    interval_s: float = Field(
        default=600.0,
        ge=0,
        description="Seconds between two slices of each table; 0: no continuous verification "
        "(`cdc-daemon verify` still runs on demand).",
    )
    rows_per_slice: int = Field(
        default=100_000,
        gt=0,
        description="Rows of each table compared per slice: a table of N rows is verified whole "
        "every N / rows_per_slice slices. A slice costs one aggregate query over its rows on "
        "each side (Snowflake: one scan of those rows by the virtual warehouse), more where a "
        "range differs.",
    )
    settle_s: float = Field(
        default=180.0,
        ge=0,
        description="A key a slice finds differing is compared again after this long (a change "
        "still in flight through Snowpipe and the merge) and reported only if it still differs.",
    )


class LogSettings(_Section):
    """Logging (structlog)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The lowest level written."
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="`auto`: JSON lines when stdout is not a terminal, console otherwise.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    postgres: PostgresSettings = PostgresSettings()
    tables: tuple[TableSettings, ...] = Field(
        default=(),
        description="The group's tables; empty: the one table of `postgres.table`.",
    )
    capture: CaptureSettings = CaptureSettings()
    batch: BatchSettings = BatchSettings()
    s3: S3Settings = S3Settings()
    state: StateSettings = StateSettings()
    daemon: DaemonSettings = DaemonSettings()
    log: LogSettings = LogSettings()
    snowflake: SnowflakeSettings = SnowflakeSettings()
    verify: VerifySettings = VerifySettings()
    http: HttpSettings = HttpSettings()

    _no_salt = model_validator(mode="before")(_refuse_salt)

    @property
    def state_dsn(self) -> SecretStr:
        return self.state.dsn or self.postgres.dsn

    def hash_salt(self) -> SecretBytes | None:
        """The salt of ``hash_columns``: ``capture.hash_salt_file``'s bytes (one trailing
        newline dropped), else the environment variable ``CDC_HASH_SALT``; None when no table
        hashes a column. A missing or short salt is a ConfigError with one sentence."""
        if not any(t.hash_columns for t in self.table_specs):
            return None
        path = self.capture.hash_salt_file
        if path is not None:
            try:
                salt = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read capture.hash_salt_file {path}: {exc.strerror}"
                ) from None
            salt = salt[:-1] if salt.endswith(b"\n") else salt
            where = f"capture.hash_salt_file {path}"
        else:
            salt = os.environ.get(HASH_SALT_VARIABLE, "").encode()
            where = f"the environment variable {HASH_SALT_VARIABLE}"
            if not salt:
                raise ConfigError(
                    "hash_columns need a salt: set the environment variable "
                    f"{HASH_SALT_VARIABLE}, or name a file holding it in capture.hash_salt_file"
                )
        if len(salt) < _MIN_SALT_BYTES:
            raise ConfigError(
                f"the salt of hash_columns in {where} is shorter than {_MIN_SALT_BYTES} bytes: "
                "a short salt lets anyone guess the hashed values back"
            )
        return SecretBytes(salt)

    @model_validator(mode="after")
    def _one_group(self) -> Settings:
        shorthand = self.postgres.table
        if not self.tables and shorthand is None:
            raise ValueError(NO_TABLE)
        # (``for_table`` narrows a group to one table and sets both to it.)
        if (
            self.tables
            and shorthand is not None
            and (len(self.tables) > 1 or TableName.parse(shorthand) != self.tables[0].table)
        ):
            raise ValueError(
                "postgres.table and [[tables]] are both set: name the tables in [[tables]] "
                "(postgres.table is the shorthand for one table)"
            )
        names = [t.table for t in self.tables]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tables: {', '.join(twice)} listed twice")
        historied = [str(t.table) for t in self.tables if t.history]
        if historied and self.capture.mode != "logical":
            raise ValueError(
                f"tables: {historied[0]} has history = true, which needs capture.mode = "
                '"logical" (a history is valid from each commit time, and the watermark mode '
                "knows no commit times and sees no deletes)"
            )
        if len(names) > 1 and self.capture.group is None:
            raise ValueError(
                "several [[tables]] need capture.group, the name of their group (its lock, "
                "ledger position, slot and publication are named after it)"
            )
        return self

    @property
    def table_specs(self) -> tuple[TableSettings, ...]:
        """The group's tables: ``[[tables]]``, or ``postgres.table`` with ``capture``'s
        watermark and partition columns (the validator makes sure there is one)."""
        if self.tables:
            return self.tables
        assert self.postgres.table is not None
        return (
            TableSettings(
                name=self.postgres.table,
                watermark_column=self.capture.watermark_column,
                partition_column=self.capture.partition_column,
            ),
        )

    @property
    def table(self) -> str:
        """The group's first table, ``schema.table``, before connecting: the name its
        objects and warehouse stage use (``TableInfo.qualified`` is the catalog's)."""
        return self.table_specs[0].qualified

    @property
    def group(self) -> str:
        """The group's name: its lock and its ledger records (positions, batches). One table
        without ``capture.group``: the table's name."""
        if self.capture.group is not None:
            return self.capture.group
        return self.table

    @property
    def ledger_name(self) -> str:
        """The name the first table's batches are recorded under: in logical mode the
        group's (one position for the group), in watermark mode the table's own."""
        return self.group if self.capture.mode == "logical" else self.table

    @property
    def slot_name(self) -> str:
        """Logical mode: the replication slot."""
        return self.capture.slot_name or self._default_name()

    @property
    def publication_name(self) -> str:
        """Logical mode: the publication."""
        return self.capture.publication_name or self._default_name()

    def _default_name(self) -> str:
        if self.capture.group is not None:
            return default_name(self.capture.group)
        table = self.table_specs[0].table
        return default_name(table.schema, table.name)

    def for_table(self, spec: TableSettings) -> Settings:
        """These settings narrowed to one table of the group (watermark mode runs one
        pipeline per table): ``postgres.table``, its columns and its batch limits."""
        batch = {
            k: v
            for k, v in (
                ("max_rows", spec.max_rows),
                ("max_bytes", spec.max_bytes),
                ("max_age_s", spec.max_age_s),
            )
            if v is not None
        }
        update: dict[str, Any] = {"batch": self.batch.model_copy(update=batch)}
        if self.tables:  # (the shorthand postgres.table keeps its capture.* columns)
            update["postgres"] = self.postgres.model_copy(update={"table": spec.name})
            update["tables"] = (spec,)
        return self.model_copy(update=update)


def default_name(*parts: str) -> str:
    """cdc_<schema>_<table> (or cdc_<group>), as a valid slot name (lower case, digits,
    underscores, 63 max)."""
    return ("cdc_" + re.sub(r"[^a-z0-9_]", "_", "_".join(parts).lower()))[:63]


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), then the environment; raise ConfigError with one sentence."""
    if path is not None:
        try:
            with path.open("rb") as handle:
                tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    env = _setting_variables(os.environ)
    _refuse_unknown_sections(env)

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    try:
        return _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path, env)) from None
    except ValueError as exc:  # pydantic-settings' own parse errors (e.g. bad JSON in env)
        field = re.search(r'field "(\w+)" from source "EnvSettingsSource"', str(exc))
        if field is not None:
            name = f"CDC_{field[1].upper()}"
            raise ConfigError(
                f"invalid configuration: environment variable {name} is not valid JSON "
                "(a section set as a whole takes a JSON object, [[tables]] a JSON list)"
            ) from None
        raise ConfigError(f"invalid configuration: {exc}") from None


def _setting_variables(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """The environment variables shaped like settings, ``CDC_<SECTION>[__<KEY>]``, by the key
    path they set (lower case, as ``case_sensitive=False`` reads them) -> the variable's name."""
    found = {}
    for name in environ:
        if name.upper().startswith("CDC_"):
            found[_variable_path(name)] = name
    return found


def _refuse_unknown_sections(env: dict[tuple[str, ...], str]) -> None:
    """pydantic-settings ignores a variable whose section is not one (``CDC_POSTGRE__DSN``), so
    a typo there would silently leave the setting at its default. Only the two-part shape is
    refused: other ``CDC_*`` variables (``CDC_TEST_PG_DSN``) are not settings at all."""
    sections = list(Settings.model_fields)
    for path, name in sorted(env.items()):
        if len(path) > 1 and path[0] not in sections:
            close = _closest(path[0], sections)
            hint = f" (did you mean CDC_{'__'.join((close, *path[1:])).upper()}?)" if close else ""
            raise ConfigError(
                f"invalid configuration: environment variable {name}: there is no section "
                f"{path[0]!r}{hint}"
            )


def _keys_at(loc: tuple[str | int, ...]) -> list[str]:
    """The keys a configuration accepts at ``loc`` (a section, ``tables.<n>``), as written in the
    file (a field's alias where it has one); none when ``loc`` is not a section."""
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            continue  # an entry of [[tables]]: the element's model was taken with the field
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part)
        if field is None:
            return []
        model = field.annotation
        if getattr(model, "__origin__", None) is tuple:
            model = model.__args__[0]
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _closest(word: str, choices: list[str]) -> str | None:
    """The choice a typo most likely meant (difflib's ratio 0.6 or more), for "did you mean"."""
    close = difflib.get_close_matches(word.lower(), choices, n=1)
    return close[0] if close else None


def _variable_path(name: str) -> tuple[str, ...]:
    return tuple(name[4:].lower().split("__"))


def _where(loc: tuple[str | int, ...]) -> str:
    """A key as the user wrote it: ``batch.max_rows``, or ``[[tables]] entry 2: key`` for a
    table (an entry of an array of tables has no dotted name)."""
    if len(loc) >= 2 and loc[0] == "tables" and isinstance(loc[1], int):
        rest = ".".join(str(p) for p in loc[2:])
        return f"[[tables]] entry {loc[1] + 1}" + (f": {rest}" if rest else "")
    return ".".join(str(part) for part in loc)


def _variable(loc: tuple[str | int, ...], env: dict[tuple[str, ...], str]) -> str | None:
    """The environment variable that set ``loc`` (or a section or list holding it), if one did:
    the environment comes before the file, so a value under a variable's key is the variable's."""
    path = tuple(str(p) for p in loc)
    for depth in range(len(path), 0, -1):
        if path[:depth] in env:
            return env[path[:depth]]
    return None


def describe_validation_error(
    exc: ValidationError,
    path: Path | None,
    env: dict[tuple[str, ...], str] | None = None,
) -> str:
    """One sentence for every problem pydantic found, each named where the user must change it:
    the key in the file, or the environment variable (``env``: ``_setting_variables``)."""
    env = env or {}
    problems: list[tuple[bool, str]] = []  # (set by the environment, the sentence)
    for error in exc.errors():
        loc = tuple(error["loc"])
        variable = _variable(loc, env)
        where = _where(loc)
        # The variable names the key itself (CDC_BATCH__MAX_ROWS), not a section or list of
        # JSON holding it (CDC_TABLES).
        exact = variable is not None and len(_variable_path(variable)) == len(loc)
        if error["type"] == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            choices = _keys_at(parent)
            if exact:
                prefix = "".join(f"{p}__".upper() for p in parent)
                close = _closest(key, choices)
                hint = f" (did you mean CDC_{prefix}{close.upper()}?)" if close else ""
                problems.append((True, f"environment variable {variable} is not a setting{hint}"))
                continue
            elif parent[:1] == ("tables",) and len(parent) == 2:
                close = _closest(key, choices)
                hint = f" (did you mean {close!r}?)" if close else ""
                problem = f"unknown key {key!r} in {_where(parent)}{hint}"
            else:
                section = _where(parent)
                close = _closest(key, choices)
                dotted = f"{section}.{close}" if section else close
                hint = f" (did you mean {dotted!r}?)" if close else ""
                problem = f"unknown key {where!r}{hint}"
            problems.append((variable is not None, _from(variable, problem)))
            continue
        # Never echo the offending input: it may be a DSN with a password in it. A validator's
        # own sentence is given without pydantic's "Value error, " in front of it.
        ctx = error.get("ctx") or {}
        own = error["type"] == "value_error" and "error" in ctx
        msg = str(ctx["error"]) if own else error["msg"]
        if error["type"] == "string_pattern_mismatch" and ctx.get("pattern") == _SF_IDENT:
            msg = (
                "must be a plain Snowflake identifier: a letter or _, then letters, digits, _ "
                "or $ (255 characters at most)"
            )
        if exact:  # the key too: the file's name of what the variable sets
            problems.append((True, f"environment variable {variable} ({where}): {msg}"))
            continue
        problems.append(
            (variable is not None, _from(variable, f"{where}: {msg}" if where else msg))
        )
    if path is not None and not any(env_set for env_set, _ in problems):
        return f"invalid configuration in {path}: " + "; ".join(p for _, p in problems)
    # Some came from the environment: each problem says where it is.
    file = f"{path}: " if path is not None else ""
    return "invalid configuration: " + "; ".join(
        p if env_set else file + p for env_set, p in problems
    )


def _from(variable: str | None, problem: str) -> str:
    return problem if variable is None else f"environment variable {variable}: {problem}"


def split_address(address: str) -> tuple[str, int]:
    """``host:port``, ``host``, ``:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:
        host, port = address, ""
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. [::]:9187")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an empty host means every interface
    if not port:
        return host, DEFAULT_HTTP_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port with a port from 1 to 65535")
    return host, int(port)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and error messages."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - an unparsable DSN is shown as nothing at all
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"  # noqa: S105 - the mask, not a password
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


def crash_point_from_env() -> str | None:
    """The test seam of ``unit.CRASH_POINTS``: inert unless a test sets CDCTEST_CRASH_AT.
    (Deliberately outside the CDC_ prefix: it is not configuration.)"""
    return os.environ.get("CDCTEST_CRASH_AT") or None


def reference_markdown() -> str:
    """docs/configuration.md, rendered from the settings' field descriptions (the one source of
    truth; ``python -m cdc_daemon.config > docs/configuration.md`` writes it, and a test fails
    when the file and the settings drift)."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated from cdc_daemon/config.py by `python -m cdc_daemon.config`: "
        "do not edit. -->",
        "",
        "One TOML file (`cdc-daemon --config PATH`); every key can be overridden by an "
        "environment variable `CDC_<SECTION>__<KEY>` (for example `CDC_POSTGRES__DSN`). "
        "Unknown keys and wrong types are refused with one sentence that never echoes a value. "
        "Secrets are never logged. An example for production: "
        "[deploy/systemd/cdc.toml.example](../deploy/systemd/cdc.toml.example).",
        "",
    ]
    for section, field in Settings.model_fields.items():
        model = field.annotation
        heading = f"## `[{section}]`"
        if section == "tables":
            model, heading = TableSettings, "## `[[tables]]`"
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        doc = " ".join((model.__doc__ or "").split())
        out += [heading, "", doc, "", "| key | default | meaning |", "|---|---|---|"]
        for name, info in model.model_fields.items():
            key = info.alias or name
            default = "required" if info.is_required() else _default_text(info.default)
            out.append(f"| `{section}.{key}` | {default} | {info.description} |")
        out.append("")
    return "\n".join(out)


def _default_text(value: object) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return f"`{secret}`" if secret == DEFAULT_DSN else "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    return f"`{value}`"


if __name__ == "__main__":
    print(reference_markdown(), end="")
