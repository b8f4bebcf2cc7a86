"""Throwaway local services for the demo and the tests: a PostgreSQL cluster and an S3 server.

The cluster is made with the server's own ``initdb``/``pg_ctl``. Those refuse to run as root, so
when this process is root only the server commands run as the ``postgres`` user, in a data
directory that user owns; everything else (the venv, the tests) stays with the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLUSTER_PREFIX = "cdc-pg-"


@contextlib.contextmanager
def noise_to(path: Path) -> Iterator[None]:
    """Everything written on stderr until the block ends goes to the end of ``path``: the
    local services' log lines (fakesnow's, uvicorn's, moto's), Python's warnings and the
    output of the programs they start. At the file descriptor, not ``sys.stderr``: threads and
    libraries hold on to the stream they found when they started."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("a") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bindir() -> Path:
    for candidate in (shutil.which("pg_config"),):
        if candidate:
            out = subprocess.run([candidate, "--bindir"], capture_output=True, text=True)
            bindir = Path(out.stdout.strip())
            if (bindir / "initdb").exists():
                return bindir
    for version in ("17", "16", "15", "14"):
        bindir = Path(f"/usr/lib/postgresql/{version}/bin")
        if (bindir / "initdb").exists():
            return bindir
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in a temporary directory, with ``wal_level=logical``, trust auth."""

    port: int = field(default_factory=free_port)
    base: Path | None = None
    _dir: Path | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        assert self._dir is not None, "start() first"
        return self._dir / "data"

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def start(self) -> LocalPostgres:
        bindir = _pg_bindir()
        self._dir = Path(tempfile.mkdtemp(prefix=CLUSTER_PREFIX, dir=self.base))
        data, sock = self._dir / "data", self._dir / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self._dir, "postgres")
            shutil.chown(sock, "postgres")
            self._dir.chmod(0o755)
        subprocess.run(
            self._as_server_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        options = (
            f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c wal_level=logical "
            "-c max_replication_slots=10 -c max_wal_senders=10 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        subprocess.run(
            self._as_server_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(self._dir / "server.log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        return self

    def _pg_ctl(self, *args: str) -> None:
        assert self._dir is not None
        subprocess.run(
            self._as_server_user(
                [str(_pg_bindir() / "pg_ctl"), "-D", str(self._dir / "data"), *args]
            ),
            check=True,
            capture_output=True,
        )

    def restart(self) -> None:
        assert self._dir is not None
        # The log file, or the server would keep pg_ctl's output pipe open.
        self._pg_ctl("-m", "fast", "-l", str(self._dir / "server.log"), "-w", "restart")

    @property
    def folder(self) -> Path:
        """The cluster's own folder (data, socket, log), what ``existing`` takes back."""
        assert self._dir is not None, "start() first"
        return self._dir

    @classmethod
    def existing(cls, folder: Path, port: int) -> LocalPostgres:
        """A cluster another process started in ``folder`` (``local down`` stopping the cluster
        of a serving process that could not stop it itself). Only a folder ``start`` made is
        taken: ``stop`` removes it."""
        if not folder.name.startswith(CLUSTER_PREFIX):
            raise ValueError(f"{folder} is not a cluster folder of LocalPostgres")
        return cls(port=port, _dir=folder)

    def stop(self) -> None:
        if self._dir is None:
            return
        if (self._dir / "data" / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None


@dataclass
class LocalS3:
    """moto's S3 server on 127.0.0.1, in a thread of this process."""

    port: int = field(default_factory=free_port)
    _server: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalS3:
        # moto signs nothing, but botocore insists on some credentials in the chain.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        from moto.server import ThreadedMotoServer

        # werkzeug logs every request on stdout, where the daemon's JSON lines go.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.stop()
            self._server = None
