"""Where the watermark capture stands, and why it never skips a row that commits late. Pure.

The problem: transaction A takes id 5, transaction B takes id 6 and commits, the daemon exports
6; a plain ``WHERE id > 6`` on the next pass never sees 5 when A commits. The daemon neither
waits for A (later rows keep flowing) nor guesses a lag window:

* Every export reads in one REPEATABLE READ snapshot. Ids in the exported range that are absent
  from that snapshot are remembered as **gaps**: they may belong to a transaction still open, or
  to one that rolled back.
* With every export the daemon records a **fence**: the highest id it read and the virtual
  transaction ids of every transaction open in the database at that moment (``pg_locks``,
  lock type ``virtualxid``: every transaction holds one from its first statement, before it
  takes any id). Ids are handed out increasingly, so a row with an id at or below the fence's
  high that was not visible yet can only come from one of those transactions.
* Each pass re-reads the rows now present in the gaps (**catch-up**) along with new rows.
* A fence **retires** once all its transactions have ended, checked before the pass's snapshot
  is taken: from then on everything at or below its high is final, so ``low`` moves there and
  gaps below ``low`` are forgotten (they were rollbacks).

A long-open transaction delays only the forgetting, never the export of other rows. The
assumption (stated in the README): ids are assigned increasingly at insert time, as a sequence
with CACHE 1 (serial, identity) does, and nobody inserts an old id by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cdc_daemon.state.position import CaptureState, Fence, Range

# Fences kept per table. Beyond this the newest two are merged: their union of transactions
# retires no sooner than either, so merging is always safe, only slower to forget gaps.
MAX_FENCES = 64


def retire(state: CaptureState, alive: Iterable[str]) -> CaptureState:
    """Drop ended transactions from the fences; fences left with none retire, in order, and move
    ``low`` to their high. Must be given the transactions alive *before* the snapshot that the
    next catch-up reads in, so that the catch-up sees every row they committed."""
    alive_set = frozenset(alive)
    fences = [Fence(f.high, f.holders & alive_set) for f in state.fences]
    low = state.low
    while fences and not fences[0].holders:
        low = max(low, min(fences.pop(0).high, state.high))
    return CaptureState(low, state.high, state.gaps, tuple(fences))


def advance(
    state: CaptureState,
    high: int,
    new_gaps: Sequence[Range],
    caught: Sequence[Range],
    holders: Iterable[str],
) -> CaptureState:
    """The state after a pass that exported up to ``high``, found ``new_gaps`` in its new
    range, caught up the ids in ``caught``, and saw ``holders`` open just after its snapshot.

    The new fence is recorded even with no holders: a transaction can end between the snapshot
    and the ``pg_locks`` read, its rows invisible to this pass yet committed. Only a later pass,
    whose snapshot follows the fence's retirement, can call the fence's range final."""
    gaps = subtract(state.gaps, caught) + list(new_gaps)
    fences = list(state.fences)
    new_high = max(state.high, high)
    holder_set = frozenset(holders)
    # Nothing new above the last fence: it already covers every id up to its high, and a fence
    # added with the same high could only retire later.
    if new_high > state.low and not (fences and fences[-1].high >= new_high):
        fences.append(Fence(new_high, holder_set))
    while len(fences) > MAX_FENCES:
        last = fences.pop()
        before = fences.pop()
        fences.append(Fence(last.high, before.holders | last.holders))
    low = state.low
    return CaptureState(low, new_high, tuple(g for g in gaps if g[1] > low), tuple(fences))


def subtract(gaps: Sequence[Range], taken: Sequence[Range]) -> list[Range]:
    """``gaps`` minus the ids in ``taken`` (both sorted, inclusive ranges)."""
    out: list[Range] = []
    for first, last in gaps:
        pieces = [(first, last)]
        for t_first, t_last in taken:
            next_pieces = []
            for a, b in pieces:
                if t_last < a or t_first > b:
                    next_pieces.append((a, b))
                    continue
                if a < t_first:
                    next_pieces.append((a, t_first - 1))
                if t_last < b:
                    next_pieces.append((t_last + 1, b))
            pieces = next_pieces
        out.extend(pieces)
    return out


def to_ranges(ids: Iterable[int]) -> list[Range]:
    """Sorted ids as inclusive ranges: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[Range] = []
    for value in sorted(ids):
        if out and value == out[-1][1] + 1:
            out[-1] = (out[-1][0], value)
        elif not out or value > out[-1][1]:
            out.append((value, value))
    return out
