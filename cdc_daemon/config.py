"""Settings: one TOML file plus ``CDC_<SECTION>__<KEY>`` environment overrides.

This is the only module that reads environment variables or configuration files. The key names
are a public interface (deployments and checks outside the repository use them): rename nothing.
AWS credentials are deliberately absent: they come from botocore's standard chain.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cdc_daemon.errors import ConfigError

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# The port of /healthz, /readyz and /metrics when ``http.address`` names only a host; the
# manifests in deploy/ use it (9187: next to postgres_exporter's 9187-9188 range, unassigned).
DEFAULT_HTTP_PORT = 9187


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresSettings(_Section):
    dsn: SecretStr = SecretStr(DEFAULT_DSN)
    table: str = "public.ecommerce_sales"
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Applies to the extract and ledger sessions; 0 means no limit (Postgres's default).
    statement_timeout_s: float = Field(default=0.0, ge=0)

    @field_validator("table")
    @classmethod
    def _table_has_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a table, e.g. public.ecommerce_sales")
        return value


class CaptureSettings(_Section):
    mode: Literal["watermark", "logical"] = "watermark"
    watermark_column: str | None = None
    partition_column: str = "invoice_date"
    poll_interval_s: float = Field(default=1.0, gt=0)
    # Logical mode only (see source.logical). Names default to cdc_<schema>_<table>.
    slot_name: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,63}$")
    publication_name: str | None = Field(default=None, min_length=1, max_length=63)
    # Export the rows present when the slot is created (from the slot's exported snapshot).
    initial_snapshot: bool = True
    # WAL read by one peek at most: one call never decodes the whole backlog.
    max_read_wal_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    # Idle table, busy server: move the slot at least this often, so WAL does not pile up.
    heartbeat_s: float = Field(default=10.0, gt=0)
    # Warn when the slot holds back more WAL than this.
    max_lag_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)
    # A dropped or retyped column: stop (default), or follow the new column list.
    schema_change: Literal["stop", "follow"] = "stop"


class BatchSettings(_Section):
    max_rows: int = Field(default=500_000, gt=0)
    max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_age_s: float = Field(default=10.0, ge=0)
    # Days (objects) in one batch: each open day holds a compressor and a file.
    max_days: int = Field(default=64, ge=1, le=1000)
    compression: Literal["gzip", "zstd", "none"] = "gzip"
    # Level 1 is what `gzip -1` / `zstd -1` use: cheap for the daemon, fine for Snowflake.
    compression_level: int = Field(default=1, ge=1, le=19)
    # Where batches are spooled (split per day) before they are named and uploaded.
    spool_dir: Path | None = None


class S3Settings(_Section):
    bucket: str = "cdc-local"
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    # Per request: an S3 endpoint that stops answering is a transient error after this long.
    timeout_s: float = Field(default=60.0, gt=0)

    @field_validator("prefix")
    @classmethod
    def _prefix_is_folder(cls, value: str) -> str:
        value = value.lstrip("/")
        return value if not value or value.endswith("/") else value + "/"


class StateSettings(_Section):
    dsn: SecretStr | None = None
    schema_: str = Field(default="cdc", alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DaemonSettings(_Section):
    # Below systemd's TimeoutStopSec and the pod's terminationGracePeriodSeconds.
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    # Attempts of one batch against transient errors (S3, Postgres) before the daemon gives up.
    retry_attempts: int = Field(default=8, ge=1)
    retry_max_wait_s: float = Field(default=30.0, gt=0)
    # A loop that has not reported progress for this long is stalled: /healthz fails and the
    # systemd watchdog is no longer fed. Above the longest legitimate step (a batch with its
    # retries: retry_max_wait_s per attempt, s3.timeout_s per request).
    stall_timeout_s: float = Field(default=300.0, gt=0)
    # Another daemon holds the table's lock: wait for it (a standby pod) instead of exiting 5.
    wait_for_lock: bool = False
    lock_poll_s: float = Field(default=5.0, gt=0)


class HttpSettings(_Section):
    # ``host[:port]`` for /healthz, /readyz and /metrics; empty (the default): no endpoint.
    address: str = ""

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


_SF_IDENT = r"^[A-Za-z_][A-Za-z0-9_$]{0,254}$"


class SnowflakeSettings(_Section):
    """The warehouse side (``snowflake/`` SQL) and the reconciler. The reconciler runs in the
    daemon when ``account`` is set. ``emulator = true`` talks to the local warehouse (fakesnow
    behind the same connector), whose missing PIPE/STREAM/TASK/COPY_HISTORY features are
    emulated in ``cdc_daemon/warehouse/local.py``."""

    account: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    private_key_file: Path | None = None
    private_key_passphrase: SecretStr | None = None
    role: str | None = Field(default=None, pattern=_SF_IDENT)
    warehouse: str = Field(default="CDC_WH", pattern=_SF_IDENT)
    database: str = Field(default="CDC", pattern=_SF_IDENT)
    schema_: str = Field(default="SALES", alias="schema", pattern=_SF_IDENT)
    integration: str = Field(default="CDC_S3", pattern=_SF_IDENT)
    aws_role_arn: str = Field(
        default="arn:aws:iam::123456789012:role/cdc-snowflake", pattern=r"^arn:aws[-a-z]*:iam::"
    )
    stage: str = Field(default="CDC_SALES_STAGE", pattern=_SF_IDENT)
    file_format: str = Field(default="CDC_CSV", pattern=_SF_IDENT)
    pipe: str = Field(default="RAW_SALES_PIPE", pattern=_SF_IDENT)
    stream: str = Field(default="RAW_SALES_STREAM", pattern=_SF_IDENT)
    merge_task: str = Field(default="MERGE_SALES", pattern=_SF_IDENT)
    cleanup_task: str = Field(default="CLEANUP_RAW_SALES", pattern=_SF_IDENT)
    merge_schedule: str = Field(default="1 MINUTE", pattern=r"^[0-9]{1,5} (MINUTE|MINUTES)$")
    cleanup_schedule: str = Field(default="USING CRON 0 3 * * * UTC", pattern=r"^[A-Za-z0-9 *]+$")
    retention_days: int = Field(default=7, ge=1, le=365)
    tombstone_days: int = Field(default=14, ge=1, le=365)
    # Connector endpoint overrides (the local emulator serves plain HTTP on 127.0.0.1).
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    protocol: Literal["https", "http"] = "https"
    emulator: bool = False
    login_timeout_s: float = Field(default=30.0, gt=0)
    query_timeout_s: float = Field(default=120.0, gt=0)
    # Every socket connect and read: a server that accepts and never answers is a timeout, not
    # a hang (the connector's login_timeout cannot interrupt a request in flight). Above 45 s:
    # Snowflake holds a query request that long before answering "still running".
    socket_timeout_s: int = Field(default=60, ge=1)
    # Reconciler: how often it reads the load history; after how long an uploaded batch not in
    # it is refreshed once (ALTER PIPE ... REFRESH) and, as long again after that, `missing`.
    reconcile_interval_s: float = Field(default=60.0, gt=0)
    missing_after_s: float = Field(default=900.0, gt=0)
    # The per-day completeness check (Postgres vs SALES) runs this often.
    completeness_interval_s: float = Field(default=86_400.0, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def enabled(self) -> bool:
        return self.account is not None


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    postgres: PostgresSettings = PostgresSettings()
    capture: CaptureSettings = CaptureSettings()
    batch: BatchSettings = BatchSettings()
    s3: S3Settings = S3Settings()
    state: StateSettings = StateSettings()
    daemon: DaemonSettings = DaemonSettings()
    log: LogSettings = LogSettings()
    snowflake: SnowflakeSettings = SnowflakeSettings()
    http: HttpSettings = HttpSettings()

    @property
    def state_dsn(self) -> SecretStr:
        return self.state.dsn or self.postgres.dsn


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
        raise ConfigError(describe_validation_error(exc, path)) from None
    except ValueError as exc:  # pydantic-settings' own parse errors (e.g. bad JSON in env)
        raise ConfigError(f"invalid configuration: {exc}") from None


def describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key {loc!r}")
        else:
            # Never echo the offending input: it may be a DSN with a password in it.
            problems.append(f"{loc}: {error['msg']}")
    return f"invalid configuration{where}: " + "; ".join(problems)


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
    """The test seam of ``pipeline.CRASH_POINTS``: inert unless a test sets CDCTEST_CRASH_AT.
    (Deliberately outside the CDC_ prefix: it is not configuration.)"""
    return os.environ.get("CDCTEST_CRASH_AT") or None
