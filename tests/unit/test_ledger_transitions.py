"""The batch-state machine of ``state/ledger.py`` against the diagram in its module docstring:
over every (old, new) pair of statuses, ``can_move`` (and ``TRANSITIONS``) allow exactly the
diagram's edges -- an edge in the code but not the diagram fails, and the reverse."""

from __future__ import annotations

import re

import pytest

from cdc_daemon.state import ledger
from cdc_daemon.state.ledger import TRANSITIONS, Status, can_move

# One edge per line: ``old[, condition] --label--> new [remark]``.
_EDGE = re.compile(r"^\s*(?P<old>[a-z]+)(?:,[^-]*)?\s--(?P<label>.+?)-->\s*(?P<new>[a-z]+)\b")


def diagram_lines() -> list[str]:
    """The docstring's lines that draw an arrow."""
    return [line for line in (ledger.__doc__ or "").splitlines() if "-->" in line]


def parse_edge(line: str) -> tuple[str, str, str] | None:
    """(old, new, label) of one arrow line, or None if it is not drawn as an edge."""
    match = _EDGE.match(line)
    if match is None:
        return None
    return match["old"], match["new"], match["label"].strip()


def diagram_edges() -> dict[tuple[str, str], str]:
    """(old, new) -> label, for every arrow of the docstring's diagram that parses."""
    edges = (parse_edge(line) for line in diagram_lines())
    return {(old, new): label for old, new, label in filter(None, edges)}


DIAGRAM = diagram_edges()

# Edges where code and diagram are known to differ (none today): each is listed with why, so
# that fixing either side turns its test into an XPASS.
DISAGREEMENTS: dict[tuple[Status, Status], str] = {}


def _pair(old: Status, new: Status) -> object:
    """One (old, new) case; xfail (strict) only where code and diagram are known to differ."""
    marks: list[pytest.MarkDecorator] = []
    if (old, new) in DISAGREEMENTS:
        marks.append(
            pytest.mark.xfail(
                strict=True, reason=f"code and diagram disagree: {DISAGREEMENTS[old, new]}"
            )
        )
    return pytest.param(old, new, id=f"{old}->{new}", marks=marks)


def test_every_arrow_of_the_diagram_is_an_edge_between_statuses() -> None:
    """The diagram parses: each arrow line is ``a --label--> b`` between two ``Status`` values
    and has a label, so a misdrawn or misspelled edge fails rather than being skipped."""
    lines = diagram_lines()
    assert lines, "the ledger docstring has no diagram"
    for line in lines:
        assert parse_edge(line) is not None, f"not an edge `a --label--> b`: {line!r}"
    assert len(DIAGRAM) == len(lines), "an edge is drawn twice"
    values = {s.value for s in Status}
    for (old, new), label in DIAGRAM.items():
        assert old in values, f"{old!r} is not a Status"
        assert new in values, f"{new!r} is not a Status"
        assert label


def test_every_status_is_in_the_diagram_and_in_transitions() -> None:
    """No status is left out: each appears in the diagram and has an entry in ``TRANSITIONS``
    (so ``can_move`` answers for it instead of raising)."""
    drawn = {s for edge in DIAGRAM for s in edge}
    assert drawn == {s.value for s in Status}
    assert set(TRANSITIONS) == set(Status)
    assert all(targets <= set(Status) for targets in TRANSITIONS.values())


@pytest.mark.parametrize(("old", "new"), [_pair(old, new) for old in Status for new in Status])
def test_a_move_is_allowed_exactly_when_the_diagram_draws_it(old: Status, new: Status) -> None:
    """``can_move(old, new)`` and ``TRANSITIONS`` allow the move if and only if the diagram
    has the edge ``old --...--> new`` (no status moves to itself; ``loaded`` is final)."""
    drawn = (old.value, new.value) in DIAGRAM
    assert (new in TRANSITIONS[old]) is drawn
    assert can_move(old, new) is drawn
