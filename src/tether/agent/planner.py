"""Planners: what decides the next step, given the request and what happened so far.

A planner never holds a capability's function, only its name and tool schema:
it proposes, and the gateway decides and acts. `ScriptedPlanner` is the
deterministic one, for demos, tests and recorded regressions; LLM planners
implement the same `Planner` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, runtime_checkable

from tether.errors import UsageError
from tether.record import OutcomeStatus

__all__ = [
    "Observation",
    "Planner",
    "PlannerInput",
    "Proposal",
    "ProposedStep",
    "ScriptedPlanner",
    "ScriptedStep",
]

_OK = frozenset(
    {OutcomeStatus.EXECUTED, OutcomeStatus.DRY_RUN, OutcomeStatus.IDEMPOTENT_HIT}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposedStep:
    """One step a planner wants taken: a capability, its args and why.

    Example:
        ```python
        ProposedStep(
            capability="deploy.rollback",
            args={"service": "checkout", "reason": "bad deploy"},
            rationale="preview the rollback target",
            dry_run=True,
        )
        ```
    """

    capability: str
    """The capability's name, as in its tool schema."""
    args: Mapping[str, Any] = field(default_factory=dict)
    """The arguments, as JSON data; the gateway validates them."""
    rationale: str = ""
    """Why the planner wants this step; recorded with the plan."""
    idempotency_key: str | None = None
    """A key of the planner's own, so a retry of the step is deduplicated."""
    dry_run: bool = False
    """Ask for the capability's dry-run handler instead of the real one."""

    def __post_init__(self) -> None:
        # Checked at run time too: planners (LLM output above all) are not type-checked.
        name: object = self.capability
        args: object = self.args
        if not isinstance(name, str) or not name:
            raise UsageError(f"a proposed step needs a capability name, got {name!r}")
        if not isinstance(args, Mapping):
            raise UsageError(
                f"{self.capability}: proposed args must be a mapping, got "
                f"{type(self.args).__name__}"
            )
        # A read-only view, so a planner cannot change a step after it was recorded.
        object.__setattr__(self, "args", MappingProxyType(dict(self.args)))

    def describe(self) -> dict[str, Any]:
        """Return the step as JSON-ready data (as a `plan_proposed` event holds it)."""
        return {
            "capability": self.capability,
            "args": dict(self.args),
            "rationale": self.rationale,
            "idempotency_key": self.idempotency_key,
            "dry_run": self.dry_run,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposal:
    """A planner's answer for one turn: steps to take, and/or that the task is done.

    Steps and `finish` together mean: take these steps, then end the run.

    Example:
        ```python
        Proposal(steps=(ProposedStep(capability="metrics.query", args={...}),))
        Proposal(finish=True, answer="checkout rolled back to v2.4.0")
        ```
    """

    steps: tuple[ProposedStep, ...] = ()
    """The next steps, taken in order; each one's outcome becomes an observation."""
    finish: bool = False
    """True when the task is done (after `steps`, if any)."""
    answer: str | None = None
    """The final answer for the person who asked, when finishing."""
    gave_up: bool = False
    """With `finish`: the planner could not do the task; the run ends `failed`."""

    def __post_init__(self) -> None:
        steps: tuple[object, ...] = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        bad = [s for s in steps if not isinstance(s, ProposedStep)]
        if bad:
            raise UsageError(
                f"a proposal's steps must be ProposedStep objects, got {bad[0]!r}"
            )
        if not steps and not self.finish:
            raise UsageError(
                "a proposal needs at least one step or finish=True; an empty turn "
                "would loop forever"
            )
        if self.gave_up and not self.finish:
            raise UsageError("gave_up=True needs finish=True: giving up ends the run")


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """What happened to one past step, as the planner sees it."""

    step: int
    """The step's number in the run, from 1."""
    capability: str
    args: Mapping[str, Any]
    """The args as the planner proposed them."""
    status: OutcomeStatus
    """`executed`, `dry_run`, `idempotent_hit`, `refused`, `invalid`, `failed` or `in_doubt`."""
    output: Mapping[str, Any] | None = None
    """The output as JSON data (secrets masked), when the step produced one."""
    error_code: str | None = None
    """The error's stable code (`policy_denied`, `precondition_failed`, ...), if any."""
    error_message: str | None = None
    """The error's one-line message, if any."""

    @property
    def ok(self) -> bool:
        """True when the step produced an output (executed, dry run or idempotent hit)."""
        return self.status in _OK


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannerInput:
    """Everything a planner is told for one turn."""

    request: str
    """The task, as the person or system asked it."""
    tools: tuple[Mapping[str, object], ...]
    """The app's capabilities as MCP tool schemas, sorted by name."""
    observations: tuple[Observation, ...] = ()
    """Every past step of this run, in order, refusals and failures included."""
    context: Mapping[str, Any] = field(default_factory=dict)
    """The run's context (ticket, environment, ...)."""
    steps_left: int = 0
    """How many more steps the run may take before it is stopped (`max_steps`)."""


@runtime_checkable
class Planner(Protocol):
    """Decides the next steps of a run; see `run_agent`."""

    def propose(self, state: PlannerInput) -> Proposal:
        """Return the next steps, or finish, given the request and the observations."""
        ...


ScriptedStep: TypeAlias = (
    ProposedStep | tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], str]
)
"""A scripted step: `(capability, args)`, `(capability, args, rationale)` or a
`ProposedStep` (for an idempotency key or a dry run)."""


class ScriptedPlanner:
    """A planner that proposes a fixed list of steps, one per turn, then finishes.

    It reads its place from the number of observations, not from its own state,
    so one instance can drive any number of runs and replays the same way.

    Args:
        steps: the steps, in order.
        answer: the final answer (default: a count of the steps taken).
        stop_on_error: give up (the run ends `failed`) as soon as a step is
            refused or fails; by default such a step is an observation and the
            script goes on.

    Raises:
        UsageError: a step is not a `(capability, args[, rationale])` tuple or a
            `ProposedStep`.

    Example:
        ```python
        planner = tether.ScriptedPlanner(
            [
                ("metrics.query", {"service": "checkout"}),
                ("service.restart", {"service": "checkout", "reason": "stuck pool"}),
            ]
        )
        ```
    """

    __slots__ = ("answer", "steps", "stop_on_error")

    def __init__(
        self,
        steps: Sequence[ScriptedStep],
        *,
        answer: str | None = None,
        stop_on_error: bool = False,
    ) -> None:
        self.steps: tuple[ProposedStep, ...] = tuple(_to_step(s) for s in steps)
        self.answer = answer
        self.stop_on_error = stop_on_error

    def __repr__(self) -> str:
        return f"<ScriptedPlanner {len(self.steps)} steps>"

    def propose(self, state: PlannerInput) -> Proposal:
        """Return the next scripted step, or finish when the script is done."""
        done = len(state.observations)
        if self.stop_on_error and state.observations:
            last = state.observations[-1]
            if not last.ok:
                return Proposal(
                    finish=True,
                    gave_up=True,
                    answer=(
                        f"step {last.step} ({last.capability}) was {last.status.value}: "
                        f"{last.error_code}: {last.error_message}"
                    ),
                )
        if done < len(self.steps):
            return Proposal(steps=(self.steps[done],))
        return Proposal(
            finish=True,
            answer=self.answer if self.answer is not None else f"done: {done} steps",
        )


def _to_step(raw: object) -> ProposedStep:
    if isinstance(raw, ProposedStep):
        return raw
    if isinstance(raw, tuple) and len(raw) in (2, 3):
        name, args, *rest = raw
        rationale = rest[0] if rest else ""
        if isinstance(name, str) and isinstance(args, Mapping):
            if not isinstance(rationale, str):
                raise UsageError(
                    f"scripted step {name!r}: the rationale must be text, got "
                    f"{rationale!r}"
                )
            return ProposedStep(capability=name, args=args, rationale=rationale)
    raise UsageError(
        f"a scripted step is (capability, args[, rationale]) or a ProposedStep, "
        f"got {raw!r:.120}"
    )
