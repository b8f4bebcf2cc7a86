"""A fault-injecting HTTP proxy in front of the S3 server, with the knobs a test needs:
answer the next N requests with an S3 error, or hold them for a while (timeouts)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from cdc_daemon.local.services import LocalS3, free_port

_HOP = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass
class FaultyProxy:
    upstream: str
    port: int = field(default_factory=free_port)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (status, S3 error code)
    delays: list[float] = field(default_factory=list)
    requests: int = 0
    injected: int = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        self.failures.extend([(status, code)] * count)

    def delay_next(self, count: int, seconds: float) -> None:
        self.delays.extend([seconds] * count)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        if self.failures:
            status, code = self.failures.pop(0)
            self.injected += 1
            xml = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
            return web.Response(status=status, body=xml.encode(), content_type="application/xml")
        if self.delays:
            self.injected += 1
            await asyncio.sleep(self.delays.pop(0))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=body
            ) as answer,
        ):
            payload = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            return web.Response(status=answer.status, body=payload, headers=out)

    def run(self, ready: threading.Event, stop: threading.Event) -> None:
        async def main() -> None:
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            # The payloads are gzip objects with Content-Encoding: gzip; pass them on as is.
            runner = web.AppRunner(app, auto_decompress=False)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            ready.set()
            await asyncio.to_thread(stop.wait)
            await runner.cleanup()

        asyncio.run(main())


@pytest.fixture
def s3_proxy(s3_server: LocalS3) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(s3_server.endpoint_url)
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=proxy.run, args=(ready, stop), daemon=True)
    thread.start()
    ready.wait(10)
    yield proxy
    stop.set()
    thread.join(10)
