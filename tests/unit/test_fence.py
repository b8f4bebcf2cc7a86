"""The capture state: fences, gaps, retirement (pure logic, see capture.watermark.fence)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cdc_daemon.capture.watermark.fence import MAX_FENCES, advance, retire, subtract, to_ranges
from cdc_daemon.state.position import INT64_MIN, CaptureState, Fence


def test_quiet_pass_becomes_final_one_pass_later() -> None:
    """With no transaction open, a pass's range is final only after the next pass's retire:
    a transaction may have committed between the snapshot and the pg_locks read."""
    state = advance(CaptureState(), 10, [], [], [])
    assert (state.low, state.high) == (INT64_MIN, 10)
    assert retire(state, alive=[]).low == 10


def test_open_transaction_holds_low_and_keeps_the_gap() -> None:
    """A gap stays tracked until every transaction open at its fence has ended."""
    state = advance(CaptureState(), 20, [(11, 11)], [], ["3/7"])
    assert retire(state, alive=["3/7", "4/1"]).low == INT64_MIN
    done = retire(state, alive=["4/1"])
    assert done.low == 20
    after = advance(done, 20, [], [], ["4/1"])
    assert after.gaps == ()  # below low: it was a rollback, forgotten


def test_caught_ids_leave_the_gaps() -> None:
    """Ids of a tracked gap that a pass finds are taken out of it (splitting the range), ids
    absent from the new rows become gaps, and high moves to the pass's end."""
    state = CaptureState(INT64_MIN, 20, ((11, 15),), (Fence(20, frozenset({"1/1"})),))
    after = advance(state, 25, [(22, 22)], [(12, 13)], ["1/1"])
    assert after.gaps == ((11, 11), (14, 15), (22, 22))
    assert after.high == 25


def test_fences_are_merged_beyond_the_limit() -> None:
    """Merging the newest fences unions their transactions: never retires anything sooner."""
    state = CaptureState()
    for n in range(MAX_FENCES + 5):
        state = advance(state, n + 1, [], [], [f"1/{n}"])
    assert len(state.fences) == MAX_FENCES
    assert state.fences[-1].holders >= {f"1/{MAX_FENCES + 4}", f"1/{MAX_FENCES - 1}"}
    assert retire(state, alive=[f"1/{MAX_FENCES + 4}"]).low == MAX_FENCES - 1


def test_no_new_fence_without_new_rows() -> None:
    """A pass that read nothing new adds no fence (it could only retire later)."""
    state = advance(CaptureState(), 10, [], [], ["1/1"])
    again = advance(state, 10, [], [], ["2/2"])
    assert again.fences == state.fences


def test_state_round_trips_through_json() -> None:
    """A capture state (low, high, gaps, fences with their holders, a prepared transaction among
    them) reads back from its JSON unchanged; no stored state is the initial state."""
    state = CaptureState(5, 20, ((7, 9),), (Fence(20, frozenset({"1/2", "prepared:x"})),))
    assert CaptureState.from_json(state.to_json()) == state
    assert CaptureState.from_json(None) == CaptureState()


@given(st.sets(st.integers(-50, 50)), st.sets(st.integers(-50, 50)))
def test_subtract_and_to_ranges_are_set_difference(gaps: set[int], taken: set[int]) -> None:
    """For any two sets of ids, subtracting their ranges gives the set difference, already in the
    sorted, merged form to_ranges gives."""
    result = subtract(to_ranges(gaps), to_ranges(taken))
    flat = {i for a, b in result for i in range(a, b + 1)}
    assert flat == gaps - taken
    assert to_ranges(flat) == sorted(result)
