"""The run lifecycle: one table of legal transitions, enforced."""

from __future__ import annotations

import itertools

import pytest

import tether
from tether.run import FINAL_STATES, TRANSITIONS, RunState, check_transition

S = RunState
DESIGN = {
    (S.PENDING, S.PLANNING),
    (S.PENDING, S.EXECUTING),
    (S.PLANNING, S.EXECUTING),
    (S.PLANNING, S.AWAITING_APPROVAL),
    (S.PLANNING, S.SUCCEEDED),
    (S.PLANNING, S.FAILED),
    (S.PLANNING, S.ABORTED),
    (S.EXECUTING, S.PLANNING),
    (S.EXECUTING, S.AWAITING_APPROVAL),
    (S.EXECUTING, S.SUCCEEDED),
    (S.EXECUTING, S.FAILED),
    (S.EXECUTING, S.ABORTED),
    (S.EXECUTING, S.DEGRADED),
    (S.AWAITING_APPROVAL, S.EXECUTING),
    (S.AWAITING_APPROVAL, S.PLANNING),
    (S.AWAITING_APPROVAL, S.ABORTED),
    (S.DEGRADED, S.EXECUTING),
    (S.DEGRADED, S.ABORTED),  # beyond DESIGN.md: a stashed run can be stopped
}
"""DESIGN.md's lifecycle, written out pair by pair."""


@pytest.mark.parametrize(("current", "target"), list(itertools.product(S, S)))
def test_transition_is_legal_exactly_when_design_lists_it(
    current: RunState, target: RunState
) -> None:
    """Every (from, to) pair is allowed exactly when DESIGN.md's lifecycle lists it."""
    legal = (current, target) in DESIGN

    if legal:
        check_transition(current, target)
    else:
        with pytest.raises(tether.IllegalTransition) as caught:
            check_transition(current, target)
        assert current.value in caught.value.message

    assert (target in TRANSITIONS[current]) is legal


def test_final_states_lead_nowhere() -> None:
    """Succeeded, failed and aborted runs cannot move again."""
    assert all(not TRANSITIONS[s] for s in FINAL_STATES)


def test_run_cannot_be_ended_by_transition(
    app: tether.Tether, principal: tether.Principal
) -> None:
    """Ending a run goes through its `with` block, so its final event is always written."""
    with (
        app.run(principal=principal, request="x") as run,
        pytest.raises(tether.UsageError),
    ):
        run.transition(RunState.SUCCEEDED)
