"""Planners: what decides the next step, given the request and what happened so far.

A planner never holds a capability's function, only its name and tool schema:
it proposes, and the gateway decides and acts. `ScriptedPlanner` is the
deterministic one, for demos, tests and recorded regressions; LLM planners
implement the same `Planner` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, TypeAlias, runtime_checkable

from tether.errors import UsageError
from tether.plan import Admission, PlanStep, StepLike, as_step, check_token_count
from tether.record import OutcomeStatus

__all__ = [
    "Observation",
    "Planner",
    "PlannerInput",
    "Proposal",
    "ProposedStep",
    "ScriptedPlanner",
    "ScriptedStep",
    "Usage",
]

_OK = frozenset(
    {OutcomeStatus.EXECUTED, OutcomeStatus.DRY_RUN, OutcomeStatus.IDEMPOTENT_HIT}
)


ProposedStep = PlanStep
"""One step a planner wants taken: a capability, its args and why (a `tether.plan.PlanStep`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What one planner turn cost in model usage; charged to the run's budgets."""

    cost: Decimal = Decimal(0)
    """In the capabilities' cost unit (cents, say); an int or a Decimal, >= 0."""
    input_tokens: int = 0
    """Tokens the model read this turn, >= 0."""
    output_tokens: int = 0
    """Tokens the model wrote this turn, >= 0."""
    model: str | None = None
    """The model's name, when the planner knows it."""

    def __post_init__(self) -> None:
        # Checked at run time: planners (LLM clients above all) are not type-checked,
        # and what is charged is recorded, where a wrong type would damage the record.
        cost: object = self.cost
        if isinstance(cost, bool) or not isinstance(cost, (int, Decimal)):
            raise UsageError(
                f"a turn's usage cost must be an int or a Decimal (money is never "
                f"a float), got {cost!r:.80}; write Decimal('{cost!s:.40}')"
            )
        if not Decimal(cost).is_finite() or cost < 0:
            raise UsageError(f"a turn's usage cost must be >= 0, got {cost!r}")
        object.__setattr__(self, "cost", Decimal(cost))
        for name in ("input_tokens", "output_tokens"):
            check_token_count(getattr(self, name), name)
        model: object = self.model
        if model is not None and not isinstance(model, str):
            raise UsageError(f"a turn's usage model must be text, got {model!r:.80}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposal:
    """A planner's answer for one turn: steps to take, and/or that the task is done.

    Steps and `finish` together mean: take these steps, then end the run. If
    a step does not produce an output (it fails, or waits for a person), the
    steps after it are not taken and the planner is asked again.

    Example:
        ```python
        Proposal(steps=(ProposedStep(capability="metrics.query", args={...}),))
        Proposal(finish=True, answer="checkout rolled back to v2.4.0")
        ```
    """

    steps: tuple[ProposedStep, ...] = ()
    """The next steps: a plan, admitted as a whole, then taken in order; each
    taken step's outcome (or the plan's refusal) becomes an observation."""
    finish: bool = False
    """True when the task is done (after `steps`, if any, all produced an output)."""
    answer: str | None = None
    """The final answer for the person who asked, when finishing."""
    gave_up: bool = False
    """With `finish`: the planner could not do the task; the run ends `failed`."""
    usage: Usage | None = None
    """What this turn cost in model usage (tokens, cost), when the planner knows."""

    def __post_init__(self) -> None:
        finish: object = self.finish
        gave_up: object = self.gave_up
        answer: object = self.answer
        usage: object = self.usage
        if not isinstance(finish, bool) or not isinstance(gave_up, bool):
            raise UsageError(
                f"a proposal's finish and gave_up must be True or False, got "
                f"finish={finish!r:.40}, gave_up={gave_up!r:.40}"
            )
        if answer is not None and not isinstance(answer, str):
            raise UsageError(f"a proposal's answer must be text, got {answer!r:.80}")
        if usage is not None and not isinstance(usage, Usage):
            raise UsageError(
                f"a proposal's usage must be a tether.agent.Usage, got {usage!r:.80}"
            )
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
    """The step's number in the run, from 1; 0 for a refused plan, which took none."""
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
    admission: Admission | None = None
    """Set when admission refused a whole plan: then nothing ran, `step` is 0,
    `capability` and `args` are the first refused step's, and `error_message`
    gives every refused step's reason (also in `admission.steps`)."""

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


ScriptedStep: TypeAlias = StepLike
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
        self.steps: tuple[ProposedStep, ...] = tuple(
            as_step(s, what="scripted step") for s in steps
        )
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
                what = (
                    "the plan"
                    if last.admission is not None
                    else f"step {last.step} ({last.capability})"
                )
                return Proposal(
                    finish=True,
                    gave_up=True,
                    answer=(
                        f"{what} was {last.status.value}: "
                        f"{last.error_code}: {last.error_message}"
                    ),
                )
        if done < len(self.steps):
            return Proposal(steps=(self.steps[done],))
        return Proposal(
            finish=True,
            answer=self.answer if self.answer is not None else f"done: {done} steps",
        )
