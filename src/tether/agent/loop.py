"""The reasoning loop: ask the planner, record and admit its plan, take the steps, repeat.

The loop owns no rule: each plan is admitted as a whole (`Run.admit`) before
its first step, every step goes through `Run.step` (the gateway), and a
refused plan, a refusal or a failure comes back as an observation the planner
sees on its next turn. The run passes through `planning` between plans, so its
record shows when the agent thought and when it acted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from tether import _canonical, record
from tether._chain import StoredEvent
from tether.agent.planner import (
    Observation,
    Planner,
    PlannerInput,
    Proposal,
    ProposedStep,
)
from tether.app import Run, Tether
from tether.capability import Capability
from tether.errors import (
    LimitExceeded,
    NotFound,
    PlannerFailed,
    PlannerGaveUp,
    StepLimitReached,
    TetherError,
    UsageError,
    ValidationFailed,
)
from tether.handle import IN_DOUBT_RULE
from tether.plan import Admission, AdmissionStatus, StepAdmission
from tether.policy import Verdict
from tether.principal import Principal
from tether.record import OutcomeStatus
from tether.run import RunState

__all__ = [
    "PlannerFailed",
    "PlannerGaveUp",
    "StepLimitReached",
    "observations_from",
    "resume_agent",
    "run_agent",
]


def run_agent(
    app: Tether,
    planner: Planner,
    *,
    principal: Principal,
    request: str,
    context: Mapping[str, Any] | None = None,
    budget: Decimal | int | None = None,
    max_steps: int = 50,
    planner_name: str = "scripted",
    park_on_approval: bool = False,
) -> Run:
    """Drive one run with `planner` until it finishes or runs out of steps.

    Each turn moves the run to `planning`, asks the planner, records its
    proposal (`plan_proposed`) and admits its steps as a whole
    (`plan_admitted`, see `Run.admit`). A refused plan runs no step: the
    refusal is the planner's next observation (one for the plan, with every
    refused step's reason), and the planner is asked again even if it meant to
    finish. An admitted plan moves the run to `executing` and its steps go
    through the gateway in order, until one does not produce an output (a
    step that needs approval, say): the steps after it are not taken, and
    the planner sees what happened (and is asked again, even if the plan
    said `finish`). The run ends `succeeded` when the planner finishes, and
    `failed` when it gives up, would pass `max_steps`, or a budget its model
    usage is charged to (or the run's own) is spent before a turn (see
    `Run.check_turn_room`: made before the first turn, and before each turn
    once one cost something, so a free planner still finishes a run its steps
    spent; the record's `run_finished` event says which, by error code); each
    observation, a refused plan's included, counts as a step.

    Args:
        app: the app whose capabilities, policy and store the run uses.
        planner: decides the steps; sees every outcome, refusals included.
        principal: who the run acts as.
        request: the task, in words.
        context: recorded with the run and shown to policies and the planner.
        budget: the most the run's plans may cost (see `Tether.run`); None
            (the default) is no budget.
        max_steps: the most steps the run may take (default 50).
        planner_name: recorded in every `plan_proposed` event.
        park_on_approval: when a step needs a person's approval, park the run
            in `awaiting_approval` and return (the request waits durably)
            instead of telling the planner and going on.

    Returns:
        The finished run; read `run.status` (`succeeded` or `failed`).

    Raises:
        UsageError: `planner` has no `propose` method, returned something that
            is not a `Proposal`, or `max_steps` is below 1.
        StoreError: the record could not be written (the run is left as far as
            the store has it).

    Example:
        ```python
        planner = tether.ScriptedPlanner([("net.ping", {"host": "db-1"})])
        run = run_agent(app, planner, principal=bot, request="is db-1 up?")
        print(run.status)
        #> succeeded
        ```
    """
    if not isinstance(planner, Planner):
        raise UsageError(
            f"{planner!r} is not a planner; give it a "
            "`propose(state: PlannerInput) -> Proposal` method"
        )
    if max_steps < 1:
        raise UsageError(f"max_steps must be at least 1, got {max_steps}")
    run = app.run(principal=principal, request=request, context=context, budget=budget)
    run.planner = planner_name  # recorded in run_started: a resume finds it there
    run.max_steps = max_steps  # and its step limit
    try:
        with run:
            _drive(
                app,
                run,
                planner,
                max_steps=max_steps,
                planner_name=planner_name,
                park=park_on_approval,
            )
    except (StepLimitReached, PlannerGaveUp, LimitExceeded):
        pass  # recorded as the run's failure; the caller reads `run.status`
    return run


def _drive(
    app: Tether,
    run: Run,
    planner: Planner,
    *,
    max_steps: int,
    planner_name: str,
    park: bool = False,
    observations: list[Observation] | None = None,
    turned: bool = False,
    paid: bool = False,
) -> None:
    tools = tuple(app.capabilities.tool_schemas())
    observations = [] if observations is None else observations
    while True:
        if run.status is not RunState.PLANNING:  # still planning after a refused plan
            run.transition(RunState.PLANNING)
        steps_left = max_steps - len(observations)
        # A turn costs model usage: none is taken once a budget it is charged
        # to is spent (a refused step would otherwise come back to the planner,
        # turn after turn, each charged past the budget). A planner whose turns
        # have cost nothing so far is free: once its first turn is taken, a
        # budget its steps spent leaves it its last turn (`finish`, say).
        if paid or not turned:
            run.check_turn_room()
        turned = True
        try:
            proposal = planner.propose(
                PlannerInput(
                    request=run.request,
                    tools=tools,
                    observations=tuple(observations),
                    context=dict(run.context),
                    steps_left=steps_left,
                )
            )
        except TetherError:
            raise  # tether's own (a refused call the planner made, say)
        except Exception as exc:  # a user planner may raise anything
            raise PlannerFailed(
                f"{type(planner).__name__}.propose raised {type(exc).__name__}; "
                "the run ended failed (fix the planner, then start the task again)"
            ) from exc
        if not isinstance(proposal, Proposal):
            raise UsageError(
                f"{type(planner).__name__}.propose returned {proposal!r:.80}; "
                "return a tether.agent.Proposal"
            )
        if proposal.usage is not None:
            u = proposal.usage
            paid = paid or u.cost > 0
            run.charge_usage(
                u.cost,
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                model=u.model,
            )
        run.append(
            record.PlanProposed(
                at=run.clock.now(),
                planner=planner_name,
                steps=tuple(_recordable(app, s) for s in proposal.steps),
                finish=proposal.finish,
                answer=proposal.answer,
            )
        )
        if len(proposal.steps) > steps_left:
            raise StepLimitReached(
                f"the planner proposed {len(proposal.steps)} more step(s) after "
                f"{len(observations)}, over max_steps={max_steps}; raise max_steps "
                "or check the planner for a loop"
            )
        # Steps plus `finish` end the run only once every step produced its output:
        # a step that failed or waits for a person goes back to the planner.
        finished = proposal.finish and not proposal.steps
        if proposal.steps:
            admission = run.admit(proposal.steps)
            if not admission.admitted:
                observations.append(_refused(admission, proposal.steps))
                if proposal.gave_up:
                    raise PlannerGaveUp(proposal.answer or "the planner gave up")
                continue  # nothing ran: the planner re-plans, even if it meant to finish
            run.transition(RunState.EXECUTING)
            for index, proposed in enumerate(proposal.steps):
                run._upcoming = proposal.steps[
                    index + 1 :
                ]  # stashed if a breaker parks the run
                seen = _take(run, proposed)
                run._upcoming = ()
                observations.append(seen)
                if run.status is RunState.DEGRADED:
                    return  # parked with the rest of its plan, to resume later
                if park and seen.error_code == "approval_required":
                    run.transition(RunState.AWAITING_APPROVAL)
                    return  # parked: the approval request waits for a person
                if not seen.ok:
                    break  # the rest of the plan counted on this step's output
            else:
                finished = proposal.finish
        if proposal.gave_up:
            raise PlannerGaveUp(proposal.answer or "the planner gave up")
        if finished:
            return


def resume_agent(
    app: Tether,
    run: Run,
    planner: Planner,
    *,
    planner_name: str,
    max_steps: int | None = None,
) -> Run:
    """Continue a parked (or orphaned) planner-driven run from its record.

    It keeps the budget and the `max_steps` it was started with (`max_steps`
    given here overrides the recorded one; a record older than the field
    gives 50), counting the steps it already took.

    The planner sees every past step's outcome, read back from the record
    (no step is taken again), except the step the run parked on: it is the
    planner's to propose again, and the same call now runs under its grant.
    A run parked because a person denied, or whose request expired, tells
    the planner so instead. A `degraded` run first takes its stashed plan, in
    order, then the planner goes on.
    """
    try:
        before = run.status
        with run:  # entering records a cut-off `none` step in doubt: read after it
            if run.status is not before:
                return run  # parked on entering: a person decides the in-doubt step
            events = app.store.events(run.id)
            seen = observations_from(events)
            turned, paid = _turns_of(events)
            if run.status is RunState.AWAITING_APPROVAL:
                run.transition(RunState.EXECUTING)  # answered: the step goes ahead
            elif run.status is RunState.DEGRADED:
                run.transition(RunState.EXECUTING)  # the breaker closed: take the stash
                if not _take_stash(run, _stashed(events), seen):
                    return run  # still open: stashed again
            _drive(
                app,
                run,
                planner,
                max_steps=max_steps or run.max_steps or 50,
                planner_name=planner_name,
                park=True,
                observations=seen,
                turned=turned,
                paid=paid,
            )
    except (StepLimitReached, PlannerGaveUp, LimitExceeded):
        pass  # recorded as the run's failure; the caller reads `run.status`
    return run


def _turns_of(events: Sequence[StoredEvent]) -> tuple[bool, bool]:
    """Tell whether the record shows a planner turn, and one that cost something.

    The check before a turn (`Run.check_turn_room`) is made before a run's
    first turn and, once a turn cost something, before every turn (replay
    makes it by the same reading of the record).
    """
    turned = paid = False
    for ev in events:
        data = ev.data()
        kind = data["kind"]
        if kind in ("plan_proposed", "usage_charged"):
            turned = True
        if kind == "usage_charged" and Decimal(str(data.get("cost") or 0)) > 0:
            paid = True
    return turned, paid


def _stashed(events: Sequence[StoredEvent]) -> list[ProposedStep]:
    """Return the steps of the run's last `plan_stashed` event.

    The stash ends before a step whose args hold secrets: the record keeps
    them masked, so the planner, which sees every outcome so far, proposes
    that step again with its real args.
    """
    steps: list[ProposedStep] = []
    for ev in events:
        data = ev.data()
        if data["kind"] == "plan_stashed":
            steps = []
            for s in data["steps"]:
                if s.get("secrets"):
                    break
                steps.append(
                    ProposedStep(
                        capability=s["capability"],
                        args=s["args"],
                        idempotency_key=s.get("idempotency_key"),
                    )
                )
    return steps


def _take_stash(
    run: Run, stash: Sequence[ProposedStep], seen: list[Observation]
) -> bool:
    """Take a stashed plan's steps in order; False if the breaker stashed it again."""
    for index, proposed in enumerate(stash):
        run._upcoming = tuple(stash[index + 1 :])
        observation = _take(run, proposed)
        run._upcoming = ()
        seen.append(observation)
        if run.status is RunState.DEGRADED:
            return False
        if not observation.ok:
            break  # the rest of the plan counted on this step's output
    return True


_STAGE_STATUS = {
    "validate": OutcomeStatus.INVALID,
    "execute": OutcomeStatus.FAILED,
    "output": OutcomeStatus.FAILED,
}


def observations_from(events: Sequence[StoredEvent]) -> list[Observation]:
    """Rebuild what a planner saw of each past step from a run's record.

    A step the run parked on (awaiting a person) is left out: the planner did
    not see its outcome, and proposes it again when the run resumes.
    """
    found: list[Observation] = []
    pending: dict[str, Any] = {}
    proposed: list[dict[str, Any]] = []  # the steps of the last plan_proposed
    doubt_requests: dict[str, int] = {}  # in-doubt approval request -> its step
    for ev in events:
        data = ev.data()
        kind = data["kind"]
        if kind == "approval_requested" and IN_DOUBT_RULE in data.get("rule_ids", ()):
            doubt_requests[data["approval_id"]] = int(data.get("step") or 0)
        elif kind == "approval_decided" and data.get("outcome") == "approved":
            step = doubt_requests.pop(data["approval_id"], None)
            if step is not None:  # a person checked: the planner proposes it again
                found = [
                    o
                    for o in found
                    if not (o.step == step and o.status is OutcomeStatus.IN_DOUBT)
                ]
        if kind == "run_status" and data["status"] == RunState.AWAITING_APPROVAL:
            if found and found[-1].error_code == "approval_required":
                found.pop()
        elif kind == "run_status" and data["status"] == RunState.DEGRADED:
            if found and found[-1].error_code == "breaker_open":
                found.pop()  # the stashed step: taken again from the stash
        elif kind == "validated":
            pending = {"capability": data["capability"], "args": data["args"]}
        elif kind == "plan_proposed":
            proposed = list(data.get("steps") or ())
        elif kind == "plan_admitted" and data["status"] == "refused":
            # As the planner saw it live (`_refused`): a planner may tell a
            # refused plan from a step taken by its `admission`.
            admission = _admission_from(data)
            first = next(s for s in admission.steps if s.refused)
            step_args = (
                proposed[first.index - 1].get("args")
                if first.index <= len(proposed)
                else None
            )
            found.append(
                Observation(
                    step=0,
                    capability=first.capability,
                    args=step_args or {},
                    status=OutcomeStatus.REFUSED,
                    error_code=first.error_code,
                    error_message=admission.message,
                    admission=admission,
                )
            )
        elif kind in ("executed", "idempotent_hit", "failed", "in_doubt"):
            step = int(data.get("step") or 0)
            if kind == "failed" and data["stage"] == "validate":
                pending = {"capability": "", "args": {}}
            status = {
                "executed": OutcomeStatus.DRY_RUN
                if data.get("dry_run")
                else OutcomeStatus.EXECUTED,
                "idempotent_hit": OutcomeStatus.IDEMPOTENT_HIT,
                "in_doubt": OutcomeStatus.IN_DOUBT,
            }.get(kind) or _STAGE_STATUS.get(
                data.get("stage", ""), OutcomeStatus.REFUSED
            )
            found.append(
                Observation(
                    step=step,
                    capability=str(pending.get("capability", "")),
                    args=pending.get("args") or {},
                    status=status,
                    output=data.get("output"),
                    error_code=data.get("error_code")
                    or ("in_doubt" if kind == "in_doubt" else None),
                    error_message=data.get("message"),
                )
            )
    return found


def _admission_from(data: Mapping[str, Any]) -> Admission:
    """Rebuild an `Admission` from its `plan_admitted` event."""
    left = data.get("budget_left")
    return Admission(
        status=AdmissionStatus(data["status"]),
        steps=tuple(
            StepAdmission(
                index=int(s["index"]),
                capability=str(s["capability"]),
                version=s.get("version"),
                verdict=None if s.get("verdict") is None else Verdict(s["verdict"]),
                rule_ids=tuple(s.get("rule_ids") or ()),
                reasons=tuple(s.get("reasons") or ()),
                cost=Decimal(str(s.get("cost") or 0)),
                dry_run=bool(s.get("dry_run")),
                error_code=s.get("error_code"),
                error_message=s.get("error_message"),
            )
            for s in data["steps"]
        ),
        total_cost=Decimal(str(data["total_cost"])),
        budget_left=None if left is None else Decimal(str(left)),
        policy_version=str(data.get("policy_version") or ""),
        at=datetime.fromisoformat(data["at"]),
    )


def _take(run: Run, proposed: ProposedStep) -> Observation:
    """Take one step of an admitted plan through the gateway and say what happened."""
    outcome = run.step(
        proposed.capability,
        dict(proposed.args),
        idempotency_key=proposed.idempotency_key,
        dry_run=proposed.dry_run,
    )
    return Observation(
        step=outcome.step,
        capability=outcome.capability,
        args=proposed.args,
        status=outcome.status,
        output=None
        if outcome.output is None
        else outcome.output.model_dump(mode="json"),
        error_code=None if outcome.error is None else outcome.error.code,
        error_message=None if outcome.error is None else outcome.error.message,
    )


def _refused(admission: Admission, steps: Sequence[ProposedStep]) -> Observation:
    """Return the one observation of a plan that admission refused."""
    first = next(s for s in admission.steps if s.refused)
    return Observation(
        step=0,
        capability=first.capability,
        args=steps[first.index - 1].args,
        status=OutcomeStatus.REFUSED,
        error_code=first.error_code,
        error_message=admission.message,
        admission=admission,
    )


def _recordable(app: Tether, proposed: ProposedStep) -> dict[str, Any]:
    """Return the step as the record may hold it: secrets masked, JSON only."""
    data = proposed.describe()
    try:
        cap: Capability[Any, Any] | None = app.capabilities.get(proposed.capability)
    except NotFound:
        cap = None
    # A free-form field (Any) may carry a SecretStr no schema declares.
    if cap is not None and (cap.has_secrets or cap.free_form):
        try:
            data["args"] = cap.validate_args(data["args"]).model_dump(mode="json")
        except ValidationFailed:
            # Invalid args of a capability with secrets may hold one in clear.
            data["args"] = {"_redacted": record.SECRET_MASK}
    try:
        _canonical.dumps(data)
    except (_canonical.CanonicalError, TypeError):
        data["args"] = {"_unrecordable": "the args are not JSON data"}
    return data
