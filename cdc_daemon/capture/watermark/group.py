"""Several tables in watermark mode: one ``WatermarkPipeline`` per table (each with its own
position, source session and batch limits), served in turn by one daemon under one lock.

Fairness: each step serves the table after the one served last, and moves on after one batch,
so a table with a large backlog gets one batch per round while the others keep theirs fresh
(``batch.max_rows`` / ``max_bytes`` bound how long a turn takes). An idle table costs one
cheap pass per round.
"""

from __future__ import annotations

from cdc_daemon.capture.watermark.pipeline import WatermarkPipeline
from cdc_daemon.state.store import Store


class WatermarkGroup:
    """The tables of a group, round robin, as one ``capture.Pipeline``."""

    def __init__(self, group: str, pipelines: list[WatermarkPipeline]) -> None:
        assert pipelines
        self._group = group
        self._pipelines = pipelines
        self._next = 0
        self._last: WatermarkPipeline | None = None

    @property
    def table(self) -> str:
        return self._group

    @property
    def ledger_names(self) -> tuple[str, ...]:
        return tuple(p.table for p in self._pipelines)

    @property
    def position(self) -> int | None:
        return None  # one per table (``status`` shows them)

    def replace_store(self, store: Store) -> None:
        for pipeline in self._pipelines:
            pipeline.replace_store(store)

    async def step(self, draining: bool) -> bool:
        """One batch of the next table with something to do, in turn; False when none has.
        The tables share one ledger session: a table's batch still uploading in the
        background (``WatermarkPipeline``'s overlap) is committed before another table's
        pass uses the session."""
        count = len(self._pipelines)
        for _ in range(count):
            pipeline = self._pipelines[self._next]
            self._next = (self._next + 1) % count
            if self._last is not None and self._last is not pipeline:
                await self._last.drain()
            self._last = pipeline
            if await pipeline.step(draining):
                return True
        return False

    async def drain(self) -> None:
        for pipeline in self._pipelines:
            await pipeline.drain()
