"""The one call path: every step takes it, in DESIGN.md's order.

`step()` is a generator that reads top to bottom like the design's list. Each
stage decides with a small function and records one event; what touches the
world (the store, the handler) is *yielded* as an effect and its result sent
back in. `drive` and `adrive` perform the effects, for sync and async callers:
one pipeline, two ten-line loops.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from tether import _canonical, record
from tether._effects import (
    Execute,
    Executed,
    Flow,
    GatewayEffect,
    Sleep,
    StoreOp,
    adrive,
    drive,
)
from tether.capability import (
    CallContext,
    Capability,
    Effect,
    Idempotency,
    check_key,
    one_line_error,
)
from tether.clock import Clock, Rng
from tether.errors import (
    ApprovalRequired,
    BreakerOpen,
    CapabilityFailed,
    Denied,
    IdempotencyConflict,
    InDoubt,
    InvalidOutput,
    KeyInUse,
    LimitExceeded,
    PreconditionFailed,
    StepTimeout,
    TetherError,
    UsageError,
    ValidationFailed,
)
from tether.limits import LimitSet, Reserved
from tether.policy import Decision, DecisionRequest, PolicySet, Verdict
from tether.policy.cel import CelError
from tether.principal import Principal
from tether.record import Outcome, OutcomeStatus
from tether.resilience import Breaker, BreakerSet, RetryBudget, ratio_id
from tether.store import Claim, Committed, KeyId, KeyRecord, KeyState, KeyUpdate, Store
from tether.store._limits import (
    Blocked,
    BreakerAdmit,
    BreakerBlocked,
    BreakerNote,
    BreakerOutcome,
    BreakerSpec,
    BreakerState,
    LimitBlocked,
    LimitKind,
    Reserve,
    RetryCharge,
    Settle,
    Throttled,
    breaker_view,
    to_us,
)

__all__ = [
    "Execute",
    "Executed",
    "Flow",
    "Guards",
    "RunPort",
    "StoreOp",
    "adrive",
    "drive",
    "step",
]

MAX_MESSAGE = 2000


# -- what the flow needs from its run --------------------------------------------


class RunPort(Protocol):
    """The run a step belongs to, as the gateway sees it."""

    run_id: str
    principal: Principal
    context: Mapping[str, Any]
    steps: int
    clock: Clock
    store: Store

    @property
    def policy(self) -> PolicySet:
        """The policy in force for the next decision."""
        ...

    retention: timedelta
    claim_ttl: timedelta

    @property
    def guards(self) -> Guards | None:
        """The limits, breakers and retry budget in force; None when there are none."""
        ...

    random: Rng
    """Where retry backoff draws its jitter."""
    charges_before_claim: bool
    """True when limits or a breaker act between the key lookup and the claim."""
    cost: Decimal
    """Sum of the run's executed step costs; the gateway adds each step's."""
    pool: Callable[[], ThreadPoolExecutor]

    def next_step(self) -> int:
        """Return the next step number."""
        ...

    def has_pending(self) -> bool:
        """Tell whether a result write failed and waits to be retried."""
        ...

    def flush_pending(self) -> None:
        """Write the results kept after failed writes (raises `StoreError` if it fails)."""
        ...

    def commit(
        self,
        events: Sequence[record.Event],
        *,
        claim: Claim | None = None,
        key_update: KeyUpdate | None = None,
        keep_on_failure: bool = False,
        reserve: Sequence[Reserve] = (),
        breaker: BreakerAdmit | None = None,
        throttle: bool = True,
        settle: Sequence[Settle] = (),
        breaker_outcome: BreakerOutcome | None = None,
        retry: RetryCharge | None = None,
        step: int = 0,
    ) -> StoreOp:
        """Return the effect that appends `events` (and limit commands) to the run's record."""
        ...


# -- the call path ---------------------------------------------------------------


def step(  # the design's list, in order
    run: RunPort,
    cap: Capability[Any, Any],
    raw_args: object,
    *,
    key: str | None = None,
    dry_run: bool = False,
) -> Flow:
    """Take one step through the call path and return its outcome.

    Args:
        run: the run the step belongs to.
        cap: the resolved capability.
        raw_args: the args as the caller gave them (a mapping, a model, JSON text).
        key: the caller's idempotency key, if any.
        dry_run: run the dry-run handler instead of the real one.
    """
    number = run.next_step()
    now = run.clock.now()
    events: list[record.Event] = []

    # validate args against the input schema
    try:
        if key is not None:
            check_key(key)
        args = cap.validate_args(raw_args)
        args_json, args_bytes = cap.dump_args(args)
    except ValidationFailed as exc:
        return (
            yield from _refuse(
                run, cap, events, now, number, "validate", exc, OutcomeStatus.INVALID
            )
        )
    events.append(
        record.Validated(
            at=now,
            step=number,
            capability=cap.name,
            version=cap.version,
            effect=cap.effect,  # a StrEnum: encodes as its value
            args=args_json,
        )
    )

    # preconditions
    if cap.preconditions:
        failed = _preconditions(cap, args, events, now, number)
        if failed is not None:
            return (
                yield from _refuse(
                    run,
                    cap,
                    events,
                    now,
                    number,
                    "precondition",
                    failed,
                    OutcomeStatus.REFUSED,
                )
            )

    # policy decision (deny stops; require_approval parks the step)
    policy = run.policy
    if cap.scopes or cap.effect not in policy.trivial:
        decision = policy.decide(
            DecisionRequest(
                principal=run.principal,
                capability=cap.name,
                version=cap.version,
                effect=cap.effect,
                scopes=cap.scopes,
                args=args_json,
                context=run.context,
                steps_so_far=number - 1,
                cost_so_far=run.cost,
                at=now,
            )
        )
    else:  # no policy and an allow default: nothing to ask
        decision = policy.default(cap.effect)
    verdict = decision.verdict
    events.append(
        record.Decided(
            at=now,
            step=number,
            verdict=verdict,  # a StrEnum: encodes as its value
            rule_ids=decision.rule_ids,
            reasons=decision.reasons,
            policy_version=decision.policy_version,
            principal=run.principal.id,
            on_behalf_of=run.principal.on_behalf_of,
        )
    )
    dry_run = dry_run or verdict is Verdict.DRY_RUN_ONLY
    handler = cap.dry_run_handler if dry_run else cap.handler
    refusal: TetherError | None = None
    if verdict is Verdict.DENY or verdict is Verdict.REQUIRE_APPROVAL:
        refusal = _policy_error(cap, decision)
    elif handler is None and cap.effect is not Effect.READ:
        refusal = Denied(
            f"{cap.name}: a dry run was required but the capability has no "
            "dry-run handler; add dry_run=... to its declaration"
        )
    if refusal is not None:
        return (
            yield from _refuse(
                run, cap, events, now, number, "policy", refusal, OutcomeStatus.REFUSED
            )
        )
    if handler is None:
        handler = cap.handler  # a read acts on nothing: running it is its own dry run

    # idempotency lookup (completed: stored result, no charge; in progress: refused)
    if key is None and cap.idempotency is Idempotency.KEYED:
        key = f"{run.run_id}/{number}"
    key_id = fingerprint = None
    took_over_state: KeyState | None = None
    if key is not None and not dry_run:
        key_id = KeyId(
            tenant=run.principal.tenant,
            principal_id=run.principal.id,
            capability=cap.name,
            key=key,
        )
        fingerprint = _fingerprint(
            run.store.record_key,
            args_bytes,
            record.secret_values(args) if cap.has_secrets else (),
        )
        if run.has_pending():  # a result kept after a failed write answers first
            yield StoreOp(run.flush_pending)
        # The lookup answers a finished call before limits and the breaker can
        # charge or refuse it (DESIGN). While nothing between here and the claim
        # charges, the claim's own conflict check answers the same, atomically and
        # one statement cheaper, so the lookup is skipped.
        existing = None
        if run.charges_before_claim:
            existing = yield StoreOp(run.store.lookup_key, key_id)
        if existing is not None:
            settled = yield from _settle_by_key(
                run, cap, existing, fingerprint, key, events, now, number
            )
            if settled is not None:
                return settled

    # limits: reserve (quota, budget, concurrency, rate); breaker
    try:
        cost = cap.estimate_cost(args)
    except Exception as exc:  # noqa: BLE001  # a user cost function may raise anything
        broken = UsageError(
            f"{cap.name}: its cost function raised {type(exc).__name__}: {exc}; "
            "fix the capability's cost"
        )
        return (
            yield from _refuse(
                run, cap, events, now, number, "cost", broken, OutcomeStatus.REFUSED
            )
        )
    guards = run.guards
    reserved: Sequence[Reserved] = ()
    watch: tuple[Breaker, BreakerSpec] | None = None
    generation: int | None = None  # the breaker generation that let the call through
    if guards is not None and not dry_run:
        if guards.limits:
            try:
                reserved = _reservations(guards.limits, run, cap, args_json, cost, now)
            except CelError as exc:
                broken = UsageError(
                    f"{cap.name}: a limit's cost expression failed ({exc}); fix it "
                    "in tether.yaml (guard optional fields with has(...))"
                )
                return (
                    yield from _refuse(
                        run,
                        cap,
                        events,
                        now,
                        number,
                        "limits",
                        broken,
                        OutcomeStatus.REFUSED,
                    )
                )
        watch = guards.breakers.for_resource(cap.resource)
    needs_intent = not dry_run and (
        cap.effect is not Effect.READ or key_id is not None or bool(reserved)
    )
    if watch is not None and not needs_intent:
        # A read with nothing to reserve writes nothing before it runs: one look
        # at the breaker, and a write only when it is not plainly closed.
        row = yield StoreOp(run.store.breaker_row, watch[1].id)
        view, moves = breaker_view(row, watch[1], to_us(now))
        if view.state is BreakerState.CLOSED and not moves:
            generation = view.generation
        else:
            needs_intent = True
    probe = False
    throttled_us = 0
    if needs_intent:
        admit = None
        if watch is not None and generation is None:
            admit = BreakerAdmit(
                spec=watch[1],
                read_only_pass=watch[0].on_open == "read_only"
                and cap.effect is Effect.READ,
                note=_breaker_event(number),
            )
        while True:  # at most twice: once more after a throttle's wait
            claim = None
            if key_id is not None and fingerprint is not None:
                claim = Claim(
                    id=key_id,
                    fingerprint=fingerprint,
                    run_id=run.run_id,
                    step=number,
                    now=now,
                    lease_until=now + run.claim_ttl,
                    retention=run.retention,
                    take_over_stale=cap.idempotency is not Idempotency.NONE,
                )
            intent: list[record.Event] = []
            if reserved:
                intent.append(
                    record.LimitReserved(
                        at=now,
                        step=number,
                        limits=tuple(
                            {
                                "id": r.reserve.limit_id,
                                "scope": r.reserve.scope,
                                # text, as the record encodes a Decimal, without
                                # the encoder's slow path
                                "amount": str(r.reserve.amount),
                            }
                            for r in reserved
                        ),
                        throttled_us=throttled_us,
                    )
                )
            intent.append(
                record.Intent(
                    at=now,
                    step=number,
                    capability=cap.name,
                    version=cap.version,
                    key=key,
                    cost_estimate=cost,
                )
            )
            committed: Committed = yield run.commit(
                [*events, *intent],
                claim=claim,
                reserve=[r.reserve for r in reserved],
                breaker=admit,
                throttle=throttled_us == 0,
                step=number,
            )
            if committed.conflict is not None:
                assert fingerprint is not None
                assert key is not None
                settled = yield from _settle_by_key(
                    run, cap, committed.conflict, fingerprint, key, events, now, number
                )
                assert settled is not None, "the store refused a claim it may replace"
                return settled
            blocked = committed.blocked
            if isinstance(blocked, Throttled) and throttled_us == 0:
                throttled_us = blocked.delay_us
                yield Sleep(blocked.delay_us / 1e6, run.clock)
                now = run.clock.now()
                if guards is not None and guards.limits and reserved:
                    # the window may have turned while the step waited
                    reserved = _reservations(
                        guards.limits, run, cap, args_json, cost, now
                    )
                continue
            if blocked is not None:
                assert not isinstance(blocked, Throttled)  # reserved without throttle
                return (
                    yield from _blocked(run, cap, events, now, number, blocked, watch)
                )
            break
        if watch is not None and generation is None:
            generation = committed.breaker_generation
            probe = committed.probe
        taken = committed.took_over
        if taken is not None and taken.state is not KeyState.FAILED:
            took_over_state = taken.state  # a failed call's retry expires nothing
        events = []

    # execute (real, or dry-run), with timeout; retries under the same key
    ctx_args: tuple[object, ...] = (args,)
    if handler.wants_ctx:
        ctx_args = (
            args,
            CallContext(
                run_id=run.run_id,
                step=number,
                capability=cap.name,
                idempotency_key=key,
                dry_run=dry_run,
            ),
        )
    retry = None if guards is None or dry_run or probe else guards.retry
    if retry is not None and not _retryable(cap):
        retry = None
    attempt = 1
    while True:
        done: Executed = yield Execute(
            fn=handler.fn,
            is_async=handler.is_async,
            call_args=ctx_args,
            timeout=cap.timeout,
            clock=run.clock,
            pool=run.pool,
        )
        end = run.clock.now()

        # validate output
        output: BaseModel | None = None
        error: TetherError | None = None
        if done.error is None and not done.timed_out:
            try:
                output, out_json = _validate_output(cap, done.value)
                # Encoded here even without a key: a value JSON cannot hold exactly
                # must fail the step now, not the store's write later.
                out_bytes = _canonical.dumps(out_json)
            except InvalidOutput as exc:
                error = exc
            except _canonical.CanonicalError as exc:
                error = InvalidOutput(
                    f"{cap.name}: output has no exact JSON form: {exc}"
                )
        else:
            error = _execution_error(cap, args, done)
        outcome_cmd = None
        if watch is not None and generation is not None:
            outcome_cmd = BreakerOutcome(
                spec=watch[1],
                generation=generation,
                probe=probe,
                failed=error is not None,
                slow=bool(watch[1].slow_us) and done.duration_us >= watch[1].slow_us,
                note=_breaker_event(number),
            )
        if (
            error is None
            or retry is None
            or attempt >= retry.max_attempts
            or done.still_running
            or isinstance(error, UsageError)
        ):
            break
        # retry budget: spend one, or hand the failure back
        assert run.guards is not None
        delay = retry.delay(attempt, run.random)
        window_us = retry.window // _MICROSECOND
        committed = yield run.commit(
            [
                *events,
                record.RetryScheduled(
                    at=end,
                    step=number,
                    attempt=attempt,
                    delay_us=delay // _MICROSECOND,
                    duration_us=done.duration_us,
                    error_code=error.code,
                    message=error.message,
                ),
            ],
            retry=retry.charge(
                capability=cap.name,
                run_id=run.run_id,
                context=run.context,
                window=to_us(end) - to_us(end) % window_us,
                breaker=None if outcome_cmd is None else outcome_cmd.spec,
                generation=generation,
            ),
            breaker_outcome=outcome_cmd,
            step=number,
            keep_on_failure=needs_intent,
        )
        if committed.blocked is not None:
            break  # no retry left, or the breaker moved: the failure goes back
        events = []
        outcome_cmd = None  # recorded with the retry
        yield Sleep(delay.total_seconds(), run.clock)
        attempt += 1

    # limits: settle; breaker: record outcome
    in_doubt = (
        error is not None
        and not dry_run
        and done.started
        and cap.effect is not Effect.READ
        and cap.idempotency is Idempotency.NONE
    )
    if error is None and output is not None and cap.actual_cost is not None:
        try:
            cost = cap.settled_cost(output, cost)
        except UsageError as exc:
            output, error = None, exc
    settles, settled_events = _settlements(
        run, reserved, number, end, cost if error is None else None, in_doubt
    )
    if retry is not None:
        window_us = retry.window // _MICROSECOND
        settles.append(
            Settle(
                limit_id=ratio_id(cap.name) + ":calls",
                kind=LimitKind.COUNT,
                scope="*",
                window=to_us(end) - to_us(end) % window_us,
                run_id=run.run_id,
                step=number,
                actual=Decimal(1),
            )
        )
    events.extend(settled_events)

    # record result
    if took_over_state is not None:
        assert key is not None
        events.append(
            record.KeyExpired(
                at=now, step=number, key=key, previous_state=took_over_state.value
            )
        )
    update = None
    if error is None:
        assert output is not None
        events.append(
            record.Executed(
                at=end,
                step=number,
                output=out_json,
                duration_us=done.duration_us,
                cost=cost,
                dry_run=dry_run,
            )
        )
        if cost and not dry_run:
            run.cost += cost
        if key_id is not None and needs_intent:
            update = KeyUpdate(
                id=key_id,
                run_id=run.run_id,
                step=number,
                state=KeyState.COMPLETED,
                output=out_bytes,
                now=end,
            )
        yield run.commit(
            events,
            key_update=update,
            keep_on_failure=needs_intent,
            settle=settles,
            breaker_outcome=outcome_cmd,
            step=number,
        )
        status = OutcomeStatus.DRY_RUN if dry_run else OutcomeStatus.EXECUTED
        return Outcome(
            status=status,
            step=number,
            capability=cap.name,
            output=output,
            idempotency_key=key,
        )

    error_type = type(done.error or error).__name__  # what went wrong, before InDoubt
    if in_doubt:
        message = (
            f"{cap.name} step {number} started and did not finish cleanly "
            f"({error.message}); its effect is unknown, so it is not retried: "
            "check the upstream and resolve it by hand"
        )
        error = InDoubt(message)
        events.append(
            record.InDoubtRecorded(
                at=end,
                step=number,
                error_type=error_type,
                message=error.message,
                duration_us=done.duration_us,
            )
        )
    else:
        events.append(
            record.Failed(
                at=end,
                step=number,
                stage="output" if isinstance(error, InvalidOutput) else "execute",
                error_code=error.code,
                error_type=type(done.error or error).__name__,
                message=error.message,
                duration_us=done.duration_us,
            )
        )
    # A handler that may still be acting keeps its key claimed: retries get
    # KeyInUse until the claim expires, never a second concurrent run.
    if key_id is not None and needs_intent and (in_doubt or not done.still_running):
        update = KeyUpdate(
            id=key_id,
            run_id=run.run_id,
            step=number,
            state=KeyState.IN_DOUBT if in_doubt else KeyState.FAILED,
            now=end,
        )
    yield run.commit(
        events,
        key_update=update,
        keep_on_failure=needs_intent,
        settle=settles,
        breaker_outcome=outcome_cmd,
        step=number,
    )
    status = OutcomeStatus.IN_DOUBT if in_doubt else OutcomeStatus.FAILED
    outcome = Outcome(
        status=status,
        step=number,
        capability=cap.name,
        error=error,
        idempotency_key=key,
    )
    error.outcome = outcome
    return outcome


# -- limits and breakers ---------------------------------------------------------------

_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Guards:
    """The limits, breakers and retry budget of one config version."""

    limits: LimitSet
    breakers: BreakerSet
    retry: RetryBudget | None

    def __bool__(self) -> bool:
        return bool(self.limits or self.breakers or self.retry)


def _reservations(
    limits: LimitSet,
    run: RunPort,
    cap: Capability[Any, Any],
    args: Mapping[str, Any],
    cost: Decimal,
    now: datetime,
) -> list[Reserved]:
    """Return the room one step takes in the limits that apply to it."""
    return limits.reserve(
        capability=cap.name,
        effect=cap.effect,
        resource=cap.resource,
        timeout=cap.timeout,
        args=args,
        cost=cost,
        principal=run.principal,
        run_id=run.run_id,
        context=run.context,
        now=now,
    )


def _retryable(cap: Capability[Any, Any]) -> bool:
    """Tell whether a failed call may run again: it has a key, or it only reads."""
    return cap.idempotency is not Idempotency.NONE or cap.effect is Effect.READ


def _breaker_event(number: int) -> Callable[[BreakerNote], record.Event]:
    def note(n: BreakerNote) -> record.Event:
        if n.previous is None:
            return record.BreakerChecked(
                at=n.at,
                step=number,
                breaker=n.breaker_id,
                state=n.state,
                admitted=True,
                reason=n.reason,
            )
        return record.BreakerTransition(
            at=n.at,
            step=number,
            breaker=n.breaker_id,
            previous=n.previous,
            state=n.state,
            reason=n.reason,
        )

    return note


def _blocked(
    run: RunPort,
    cap: Capability[Any, Any],
    events: list[record.Event],
    now: datetime,
    number: int,
    blocked: Blocked,
    watch: tuple[Breaker, BreakerSpec] | None,
) -> Flow:
    """Record a limit's or a breaker's refusal and return the step's outcome."""
    if isinstance(blocked, BreakerBlocked):
        assert watch is not None
        mode = watch[0].on_open
        wait = blocked.retry_after_us / 1e6
        state = (
            "open"
            if blocked.state is BreakerState.OPEN
            else "half-open with its trial calls taken"
        )
        why = f"the breaker {blocked.breaker_id!r} of {cap.resource} is {state}"
        events.append(
            record.BreakerChecked(
                at=now,
                step=number,
                breaker=blocked.breaker_id,
                state=blocked.state.value,
                admitted=False,
                mode=mode,
                reason=why,
            )
        )
        error: TetherError
        if mode == "escalate":
            error = ApprovalRequired(
                f"{cap.name}: {why}; a person must decide whether to go ahead "
                f"(breaker {blocked.breaker_id}, retry {_after(wait)})"
            )
        else:
            then = (
                "the run is parked degraded with its remaining plan"
                if mode == "stash"
                else "only reads may run until it closes"
            )
            error = BreakerOpen(
                f"{cap.name}: {why}; {then} (retry {_after(wait)})",
                breaker_id=blocked.breaker_id,
                mode=mode,
                retry_after=wait,
            )
        return (
            yield from _refuse(
                run, cap, events, now, number, "breaker", error, OutcomeStatus.REFUSED
            )
        )
    assert isinstance(blocked, LimitBlocked)
    left = blocked.left
    events.append(
        record.LimitRefused(
            at=now,
            step=number,
            limit=blocked.limit_id,
            limit_kind=blocked.kind.value,
            scope=blocked.scope,
            cap=blocked.cap,
            used=blocked.used,
            held=blocked.held,
            requested=blocked.requested,
            left=left,
            retry_after_us=blocked.retry_after_us,
        )
    )
    after_s = blocked.retry_after_us / 1e6 if blocked.retry_after_us else None
    what = {
        LimitKind.BUDGET: f"needs {blocked.requested}, {left} of {blocked.cap} left",
        LimitKind.QUOTA: f"{blocked.used} of {blocked.cap} calls used",
        LimitKind.CONCURRENCY: f"{blocked.used} of {blocked.cap} calls in flight",
        LimitKind.RATE: f"over {blocked.cap} at once at its rate",
    }.get(blocked.kind, f"{left} left")
    after = f"; retry {_after(after_s)}" if after_s else ""
    error = LimitExceeded(
        f"{cap.name}: limit {blocked.limit_id!r} ({blocked.kind.value}, scope "
        f"{blocked.scope}) refused the call: {what}{after}",
        limit_id=blocked.limit_id,
        left=left,
        retry_after=after_s,
    )
    return (
        yield from _refuse(
            run, cap, events, now, number, "limits", error, OutcomeStatus.REFUSED
        )
    )


def _after(seconds: float) -> str:
    """Say when, in words: `in 30s`, `in 2h 5m`, `in 250ms`."""
    if seconds < 1:
        return f"in {max(seconds * 1000, 1):.0f}ms"
    whole = round(seconds)
    parts = [(whole // 3600, "h"), (whole % 3600 // 60, "m"), (whole % 60, "s")]
    return "in " + " ".join(f"{n}{unit}" for n, unit in parts if n)[:8].strip()


def _settlements(
    run: RunPort,
    reserved: Sequence[Reserved],
    number: int,
    end: datetime,
    actual: Decimal | None,
    in_doubt: bool,
) -> tuple[list[Settle], list[record.Event]]:
    """Return how each reservation settles, and the event that says so.

    A budget settles at the call's actual cost (its own cost expression's
    amount when it has one); a failed call releases it, but a call in doubt
    keeps its estimate charged, since the upstream may have acted. Leases are
    released either way; quotas and rates have nothing to settle. The
    `limit_settled` event is written only when a budget settles at other
    than its reservation (another actual cost, or released) or the call is in
    doubt: otherwise the record's `limit_reserved` and `executed` say it.
    """
    settles: list[Settle] = []
    lines: list[dict[str, Any]] = []
    plain = not in_doubt  # every line settled as reserved: the record says so already
    for r in reserved:
        res = r.reserve
        if res.kind is LimitKind.BUDGET:
            if in_doubt:
                amount: Decimal | None = res.amount
            elif actual is None:
                amount = None
            else:
                amount = res.amount if r.own_cost else actual
        elif res.kind is LimitKind.CONCURRENCY:
            amount = None
        else:
            continue
        settles.append(
            Settle(
                limit_id=res.limit_id,
                kind=res.kind,
                scope=res.scope,
                window=res.window,
                run_id=run.run_id,
                step=number,
                actual=amount,
                reserved=res.amount,
            )
        )
        if res.kind is LimitKind.BUDGET and amount != res.amount:
            plain = False
        lines.append(
            {
                "id": res.limit_id,
                "scope": res.scope,
                "reserved": str(res.amount),
                "actual": None if amount is None else str(amount),
            }
        )
    if plain:
        # Budgets settled at their reservation and leases given back at the end
        # of the step: `limit_reserved` and `executed` already say all of it.
        return settles, []
    return settles, [record.LimitSettled(at=end, step=number, limits=tuple(lines))]


# -- stages ------------------------------------------------------------------------


def _refuse(
    run: RunPort,
    cap: Capability[Any, Any],
    events: list[record.Event],
    now: datetime,
    number: int,
    stage: str,
    error: TetherError,
    status: OutcomeStatus,
) -> Flow:
    """Record why the step stopped at `stage` and return its outcome."""
    events.append(
        record.Failed(
            at=now,
            step=number,
            stage=stage,
            error_code=error.code,
            error_type=type(error).__name__,
            message=error.message,
        )
    )
    yield run.commit(events)
    outcome = Outcome(status=status, step=number, capability=cap.name, error=error)
    error.outcome = outcome
    return outcome


def _preconditions(
    cap: Capability[Any, Any],
    args: BaseModel,
    events: list[record.Event],
    now: datetime,
    number: int,
) -> PreconditionFailed | None:
    names: list[str] = []
    for check in cap.preconditions:
        name = getattr(check, "__name__", type(check).__name__)
        names.append(name)
        try:
            held = check(args)
        except Exception as exc:  # noqa: BLE001  # a user check may raise anything
            held = f"{type(exc).__name__}: {exc}"
        if held is True or held is None:
            continue
        reason = held if isinstance(held, str) and held else f"{name} does not hold"
        if cap.has_secrets:
            reason = record.redact_text(reason, record.secret_values(args))
        events.append(
            record.PreconditionChecked(
                at=now, step=number, checks=tuple(names), failed=name, reason=reason
            )
        )
        return PreconditionFailed(f"{cap.name}: precondition {name!r} failed: {reason}")
    events.append(record.PreconditionChecked(at=now, step=number, checks=tuple(names)))
    return None


def _policy_error(cap: Capability[Any, Any], decision: Decision) -> TetherError:
    why = "; ".join(decision.reasons) or "no reason given"
    rules = ", ".join(decision.rule_ids) or "the default"
    if decision.verdict is Verdict.DENY:
        return Denied(
            f"{cap.name}: denied by {rules}: {why}",
            rule_ids=decision.rule_ids,
            reasons=decision.reasons,
        )
    return ApprovalRequired(f"{cap.name}: needs a person's approval ({rules}: {why})")


def _fingerprint(
    key: bytes | None, args_bytes: bytes, secrets: Sequence[str] = ()
) -> bytes:
    """Hash the canonical args, secrets included, so a changed secret is other args.

    The record holds the args in clear but secrets masked: the secrets enter the
    fingerprint through an HMAC under a key derived from the record key, so the
    stored fingerprint cannot be used to guess them offline.
    """
    digest = hashlib.sha256(args_bytes)
    if secrets:
        derived = hmac.digest(key or b"", b"tether-fingerprint-v1", "sha256")
        digest.update(hmac.digest(derived, "\x00".join(secrets).encode(), "sha256"))
    return digest.digest()


def _classify(
    existing: KeyRecord,
    fingerprint: bytes,
    cap: Capability[Any, Any],
    key: str,
    now: datetime,
    retention: timedelta,
) -> TetherError | str:
    """Say what a key's record means for a new call: an error, "hit" or "proceed"."""
    state = existing.state
    if state is KeyState.COMPLETED:
        assert existing.completed_at is not None
        if existing.completed_at + retention <= now:
            return "proceed"
    if existing.fingerprint != fingerprint:
        return IdempotencyConflict(
            f"{cap.name}: idempotency key {key!r:.80} was first used with other arguments "
            f"(run {existing.run_id}, step {existing.step}); use a new key for new arguments"
        )
    if state is KeyState.COMPLETED:
        return "hit"
    if state is KeyState.IN_PROGRESS:
        if existing.lease_until > now:
            return KeyInUse(
                f"{cap.name}: a call under this idempotency key is in progress "
                f"(run {existing.run_id}, step {existing.step}); retry after it finishes"
            )
        if cap.idempotency is Idempotency.NONE:
            return InDoubt(
                f"{cap.name}: an earlier call under this key (run {existing.run_id}, step "
                f"{existing.step}) stopped mid-call; its effect is unknown: resolve it by hand"
            )
        return "proceed"
    if state is KeyState.IN_DOUBT:
        return InDoubt(
            f"{cap.name}: the call under this key (run {existing.run_id}, step "
            f"{existing.step}) is in doubt; resolve it by hand before retrying"
        )
    return "proceed"  # failed: a retry under the same key may run again


def _status_of(error: TetherError) -> OutcomeStatus:
    return (
        OutcomeStatus.IN_DOUBT if isinstance(error, InDoubt) else OutcomeStatus.REFUSED
    )


def _settle_by_key(
    run: RunPort,
    cap: Capability[Any, Any],
    existing: KeyRecord,
    fingerprint: bytes,
    key: str,
    events: list[record.Event],
    now: datetime,
    number: int,
) -> Generator[GatewayEffect, Any, Outcome | None]:
    """Answer a call from its key's record: a refusal, the stored result, or None."""
    answer = _classify(existing, fingerprint, cap, key, now, run.retention)
    if answer == "proceed":
        return None
    output = None
    refusal = answer if isinstance(answer, TetherError) else None
    if refusal is None:  # a hit: replay the stored result, if it can be
        output, refusal = _stored_result(cap, existing, key)
    if refusal is not None:
        status = _status_of(refusal)
        return (
            yield from _refuse(
                run, cap, events, now, number, "idempotency", refusal, status
            )
        )
    assert existing.output is not None
    events.append(
        record.IdempotentHit(
            at=now,
            step=number,
            key=key,
            original_run=existing.run_id,
            original_step=existing.step,
            output=_canonical.loads(existing.output),
        )
    )
    yield run.commit(events)
    return Outcome(
        status=OutcomeStatus.IDEMPOTENT_HIT,
        step=number,
        capability=cap.name,
        output=output,
        idempotency_key=key,
    )


def _stored_result(
    cap: Capability[Any, Any], existing: KeyRecord, key: str
) -> tuple[BaseModel | None, TetherError | None]:
    """Return a key's stored result as the capability's output, or why it cannot be."""
    assert existing.output is not None
    if cap.secret_output:
        return None, IdempotencyConflict(
            f"{cap.name}: the call under idempotency key {key!r:.80} completed (run "
            f"{existing.run_id}, step {existing.step}), but its result holds secrets, "
            "which are never stored, so it cannot be returned again; use the first "
            "call's result"
        )
    try:
        return cap.output_model.model_validate_json(existing.output), None
    except ValidationError:
        return None, IdempotencyConflict(
            f"{cap.name}: the result stored under idempotency key {key!r:.80} does "
            f"not fit version {cap.version}'s output schema; use a new key"
        )


def _validate_output(
    cap: Capability[Any, Any], value: object
) -> tuple[BaseModel, dict[str, Any]]:
    """Return the output and its JSON form, both checked against the output schema.

    The JSON form is what the record keeps, so it is what is validated: an
    instance made with `model_construct()` or changed by attribute assignment
    skipped pydantic's checks, and is caught here.
    """
    model = cap.output_model
    try:
        output = value if type(value) is model else _as_model(model, value)
        assert isinstance(output, BaseModel)
        # Serializer and validator directly: their Python wrappers would double
        # the cost. A wrongly typed field serializes as is, and validation fails.
        data: dict[str, Any] = model.__pydantic_serializer__.to_python(
            output, mode="json", warnings=False
        )
        if output is value:
            model.__pydantic_validator__.validate_python(data)
    except ValidationError as exc:
        raise InvalidOutput(one_line_error(cap.name, "output", exc)) from exc
    except (PydanticSerializationError, ValueError) as exc:
        raise InvalidOutput(
            f"{cap.name}: output does not fit its schema: {exc}"
        ) from exc
    return output, data


def _as_model(model: type[BaseModel], value: object) -> BaseModel:
    if isinstance(value, BaseModel):
        value = value.model_dump(warnings=False)
    return model.model_validate(value)


def _execution_error(
    cap: Capability[Any, Any], args: BaseModel, done: Executed
) -> TetherError:
    if done.timed_out:
        limit = cap.timeout.total_seconds() if cap.timeout else 0
        if not done.started:
            return StepTimeout(
                f"{cap.name}: did not start within its {limit:g}s timeout (every "
                "handler thread was busy); nothing ran"
            )
        if done.still_running:
            return StepTimeout(
                f"{cap.name}: did not finish within its {limit:g}s timeout and may "
                "still be running; retries under its key wait until the claim expires"
            )
        return StepTimeout(f"{cap.name}: did not finish within its {limit:g}s timeout")
    exc = done.error
    assert exc is not None
    if isinstance(exc, UsageError):
        return exc  # tether's own misuse error, raised inside a handler
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, Exception):
        text = f"{type(exc).__name__}: the caller was cancelled while the handler ran"
    if cap.has_secrets:
        text = record.redact_text(text, record.secret_values(args))
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + "..."
    failed = CapabilityFailed(f"{cap.name}: {text}")
    if cap.has_secrets:
        failed.__suppress_context__ = True  # the raw error may quote a secret
    else:
        failed.__cause__ = exc
    return failed
