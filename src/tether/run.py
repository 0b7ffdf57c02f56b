"""The run lifecycle: its states and the one table of legal transitions."""

from __future__ import annotations

from enum import StrEnum

from tether.errors import IllegalTransition

__all__ = [
    "ABORTABLE_STATES",
    "FINAL_STATES",
    "TRANSITIONS",
    "RunState",
    "check_transition",
]


class RunState(StrEnum):
    """Where a run is in its lifecycle (DESIGN.md, "Run lifecycle")."""

    PENDING = "pending"
    PLANNING = "planning"
    EXECUTING = "executing"
    AWAITING_APPROVAL = "awaiting_approval"
    DEGRADED = "degraded"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


_S = RunState
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _S.PENDING: frozenset({_S.PLANNING, _S.EXECUTING}),
    _S.PLANNING: frozenset(
        {_S.EXECUTING, _S.AWAITING_APPROVAL, _S.SUCCEEDED, _S.FAILED, _S.ABORTED}
    ),
    _S.EXECUTING: frozenset(
        {
            _S.PLANNING,
            _S.AWAITING_APPROVAL,
            _S.SUCCEEDED,
            _S.FAILED,
            _S.ABORTED,
            _S.DEGRADED,
        }
    ),
    _S.AWAITING_APPROVAL: frozenset({_S.EXECUTING, _S.PLANNING, _S.ABORTED}),
    # A degraded run waits for a breaker, maybe for long: a person may stop it.
    _S.DEGRADED: frozenset({_S.EXECUTING, _S.ABORTED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.ABORTED: frozenset(),
}
"""Every legal move; a state missing from a set cannot be reached from its key."""

FINAL_STATES = frozenset({_S.SUCCEEDED, _S.FAILED, _S.ABORTED})

ABORTABLE_STATES = tuple(s.value for s in RunState if _S.ABORTED in TRANSITIONS[s])
"""States a person may stop a run in (`Tether.abort`): every state a stored
run can be in but the final ones (a run is stored from `executing` on)."""


def check_transition(current: RunState, target: RunState) -> None:
    """Raise unless a run may move from `current` to `target`.

    Raises:
        IllegalTransition: the lifecycle forbids the move.
    """
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (final)"
        raise IllegalTransition(
            f"a run cannot go from {current.value!r} to {target.value!r}; "
            f"from {current.value!r} it may go to: {allowed}"
        )
