"""Where a capture stands: the watermark state (low, high, gaps, fences) or, in logical mode,
an LSN in ``low``/``high``. Pure data with its JSON form; how the watermark state moves is in
``capture.watermark.fence``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INT64_MIN = -(2**63)


Range = tuple[int, int]  # inclusive [first, last]


@dataclass(frozen=True)
class Fence:
    high: int
    holders: frozenset[str]


@dataclass(frozen=True)
class CaptureState:
    low: int = INT64_MIN  # every row with id <= low is exported and final
    high: int = INT64_MIN  # every row with id <= high that was visible has been exported
    gaps: tuple[Range, ...] = ()  # ids in (low, high] absent when exported; may still appear
    fences: tuple[Fence, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "gaps": [list(g) for g in self.gaps],
            "fences": [[f.high, sorted(f.holders)] for f in self.fences],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CaptureState:
        if not data:
            return cls()
        return cls(
            low=int(data["low"]),
            high=int(data["high"]),
            gaps=tuple((int(a), int(b)) for a, b in data["gaps"]),
            fences=tuple(Fence(int(h), frozenset(v)) for h, v in data["fences"]),
        )

    @property
    def holders(self) -> frozenset[str]:
        out: set[str] = set()
        for fence in self.fences:
            out |= fence.holders
        return frozenset(out)
