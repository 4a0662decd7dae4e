"""Phase transitions: every allowed edge walks, every other event is refused."""

import itertools

import pytest

from opie.raid5.phases import TRANSITIONS, Phase, PhaseError, PhaseEvent, PhaseKind, PhaseState


def test_walk_start_pause_resume_finish():
    p = Phase(PhaseKind.REBUILD, total=10)
    for event, state in [(PhaseEvent.START, PhaseState.RUNNING), (PhaseEvent.PAUSE, PhaseState.PAUSED),
                         (PhaseEvent.RESUME, PhaseState.RUNNING), (PhaseEvent.FINISH, PhaseState.DONE)]:
        assert p.fire(event) is state
    assert p.history == [PhaseState.IDLE, PhaseState.RUNNING, PhaseState.PAUSED, PhaseState.RUNNING]


@pytest.mark.parametrize("state,event", list(itertools.product(PhaseState, PhaseEvent)))
def test_table_is_the_only_way(state, event):
    p = Phase(PhaseKind.SCRUB, total=1, state=state)
    if (state, event) in TRANSITIONS:
        assert p.fire(event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(PhaseError, match=f"{event.value} not allowed when {state.value}"):
            p.fire(event)


def test_progress_text():
    p = Phase(PhaseKind.RESYNC, total=4, done=1)
    assert p.describe() == "resync idle 25.0% (1/4)"
