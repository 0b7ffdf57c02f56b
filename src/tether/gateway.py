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
import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from tether import _canonical, _guards, record
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
from tether._guards import Guards
from tether.capability import (
    CallContext,
    Capability,
    Effect,
    Handler,
    Idempotency,
    check_key,
    one_line_error,
)
from tether.clock import Clock, Rng
from tether.errors import (
    ApprovalRequired,
    CapabilityFailed,
    Denied,
    IdempotencyConflict,
    InDoubt,
    InvalidOutput,
    KeyInUse,
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
from tether.resilience import Breaker, RetryBudget, ratio_id
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Claim,
    Committed,
    GrantGone,
    KeyId,
    KeyRecord,
    KeyState,
    KeyUpdate,
    PendingExists,
    Store,
)
from tether.store._limits import (
    BreakerAdmit,
    BreakerOutcome,
    BreakerSpec,
    BreakerState,
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

logger = logging.getLogger(__name__)


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

    approval_ttl: timedelta
    """How long an approval request waits for a decision before it expires."""

    def next_step(self) -> int:
        """Return the next step number."""
        ...

    def new_id(self, prefix: str) -> str:
        """Return a new unique id (an approval request's, say)."""
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
        approval: ApprovalRow | None = None,
        use_grant: str | None = None,
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
    grant: ApprovalRow | None = None
    if verdict is Verdict.REQUIRE_APPROVAL:
        asked = yield from _ask_approval(
            run, cap, args, args_json, args_bytes, decision, events, now, number
        )
        if isinstance(asked, Outcome):
            return asked  # parked: the request waits for a person (or was denied)
        grant = asked  # an approved request for exactly this call: it runs under it
    elif verdict is Verdict.DENY:
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
    guards = None if dry_run else run.guards
    room = _Room(now=now)
    if guards is not None:
        room.watch = guards.breakers.for_resource(cap.resource)
        if guards.limits:
            try:
                room.reserved = _reserve(guards.limits, run, cap, args_json, cost, now)
            except CelError as exc:
                broken = UsageError(
                    f"{cap.name}: a limit's cost expression failed ({exc}); fix it "
                    "in tether.yaml (guard optional fields with has(...))"
                )
                return (
                    yield from _refuse(
                        run, cap, events, now, number, "limits", broken,
                        OutcomeStatus.REFUSED,
                    )
                )  # fmt: skip
    room.grant = grant
    needs_intent = not dry_run and (
        cap.effect is not Effect.READ
        or key_id is not None
        or bool(room.reserved)
        or grant is not None
    )
    if room.watch is not None and not needs_intent:
        # A read with nothing to reserve writes nothing before it runs: one look
        # at the breaker, and a write only when it is not plainly closed.
        spec = room.watch[1]
        row = yield StoreOp(run.store.breaker_row, spec.id)
        view, moves = breaker_view(row, spec, to_us(now))
        if view.state is BreakerState.CLOSED and not moves:
            room.generation = view.generation
        else:
            needs_intent = True

    # claim key + record intent (fenced by the run's lease epoch), with the room
    if needs_intent:
        taken = yield from _take_room(
            run, cap, room, events, number, args_json, cost, key, key_id, fingerprint
        )
        if isinstance(taken, Outcome):
            return taken
        events = []

    # execute (real, or dry-run), with timeout; retries under the same key
    ctx_args = _call_args(handler, run, cap, args, number, key, dry_run=dry_run)
    # A person approved one call: no automatic retry runs it again.
    no_retry = room.probe or room.grant is not None
    retry = None if guards is None or no_retry else guards.retry
    if retry is not None and not _guards.retryable(cap):
        retry = None
    tried: _Tried = yield from _attempts(
        run, cap, handler, ctx_args, args, room, retry, events, number, needs_intent
    )
    done, end, output, error = tried.done, tried.end, tried.output, tried.error
    out_json, out_bytes, outcome_cmd = tried.out_json, tried.out_bytes, tried.outcome
    events = tried.events

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
            # The call acted and its output is valid: it is executed, settled at
            # its estimate. Failing it now would free its key to run it again.
            logger.warning(
                "limits.actual_cost_failed",
                extra={"tether.run_id": run.run_id, "tether.error": exc.message},
            )
    # A call that may still be acting (a timed-out thread) may still spend:
    # its budgets keep their estimate and its leases stay held until they lapse.
    acting = done.still_running
    settles, settled_events = _guards.settlements(
        run.run_id,
        room.reserved,
        number,
        end,
        cost if error is None else None,
        in_doubt or acting,
        keep_leases=acting,
    )
    if retry is not None:  # the calls a retry ratio divides by
        settles.append(
            Settle(
                limit_id=ratio_id(cap.name) + ":calls",
                kind=LimitKind.COUNT,
                scope="*",
                window=_guards.window_start(to_us(end), retry.window),
                run_id=run.run_id,
                step=number,
                actual=Decimal(1),
            )
        )
    events.extend(settled_events)

    # record result
    if room.took_over is not None:
        assert key is not None
        events.append(
            record.KeyExpired(
                at=room.now, step=number, key=key, previous_state=room.took_over.value
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


# -- the limit, breaker and retry stages ------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Room:
    """What the limits and the breaker gave a step before it acts."""

    now: datetime
    """When the step took its room (later than its start after a throttle's wait)."""
    reserved: Sequence[Reserved] = ()
    watch: tuple[Breaker, BreakerSpec] | None = None
    """The breaker on the capability's resource, if any."""
    generation: int | None = None
    """The breaker generation that let the call through (None: not watched)."""
    probe: bool = False
    """The call is a half-open breaker's trial call."""
    took_over: KeyState | None = None
    """The state of a stale or expired key record the claim replaced."""
    grant: ApprovalRow | None = None
    """The approved request the step runs under, spent with its intent."""


def _reserve(
    limits: LimitSet,
    run: RunPort,
    cap: Capability[Any, Any],
    args_json: Mapping[str, Any],
    cost: Decimal,
    now: datetime,
) -> list[Reserved]:
    guards = run.guards
    return _guards.reservations(
        limits,
        cap,
        args_json,
        cost,
        principal=run.principal,
        run_id=run.run_id,
        context=run.context,
        now=now,
        retry=None if guards is None else guards.retry,
    )


def _take_room(
    run: RunPort,
    cap: Capability[Any, Any],
    room: _Room,
    events: list[record.Event],
    number: int,
    args_json: Mapping[str, Any],
    cost: Decimal,
    key: str | None,
    key_id: KeyId | None,
    fingerprint: bytes | None,
) -> Generator[GatewayEffect, Any, Outcome | None]:
    """Claim the key, take room in the limits, pass the breaker, record the intent.

    All in one write; returns the step's outcome if any of them says no.
    """
    admit = None
    if room.watch is not None and room.generation is None:
        admit = BreakerAdmit(
            spec=room.watch[1],
            read_only_pass=room.watch[0].on_open == "read_only"
            and cap.effect is Effect.READ,
            note=_guards.breaker_note(number),
        )
    throttled_us = 0
    while True:  # at most twice: once more after a throttle's wait
        now = room.now
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
        if room.reserved:
            intent.append(
                record.LimitReserved(
                    at=now,
                    step=number,
                    limits=tuple(
                        {
                            "id": r.reserve.limit_id,
                            "scope": r.reserve.scope,
                            # text, as the record encodes a Decimal, without the
                            # encoder's slow path
                            "amount": str(r.reserve.amount),
                        }
                        for r in room.reserved
                    ),
                    throttled_us=throttled_us,
                )
            )
        if room.grant is not None:
            intent.append(
                record.ApprovalUsed(
                    at=now,
                    step=number,
                    approval_id=room.grant.id,
                    decided_by=room.grant.decided_by or "",
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
            reserve=[r.reserve for r in room.reserved],
            breaker=admit,
            throttle=throttled_us == 0,
            step=number,
            use_grant=None if room.grant is None else room.grant.id,
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
            room.now = run.clock.now()
            guards = run.guards
            if guards is not None and guards.limits and room.reserved:
                # the window may have turned while the step waited
                room.reserved = _reserve(
                    guards.limits, run, cap, args_json, cost, room.now
                )
            continue
        if isinstance(blocked, GrantGone):
            gone = ApprovalRequired(
                f"{cap.name}: approval {blocked.approval_id} was spent by another "
                "call (or expired) meanwhile; a grant runs one call: ask again",
                approval_id=blocked.approval_id,
            )
            return (
                yield from _refuse(
                    run, cap, events, now, number, "policy", gone, OutcomeStatus.REFUSED
                )
            )
        if blocked is not None:
            assert not isinstance(blocked, (Throttled, PendingExists))  # not asked for
            stage, error = _guards.refusal(
                cap, events, now, number, blocked, room.watch
            )
            return (
                yield from _refuse(
                    run, cap, events, now, number, stage, error, OutcomeStatus.REFUSED
                )
            )
        break
    if admit is not None:
        room.generation = committed.breaker_generation
        room.probe = committed.probe
    taken = committed.took_over
    if taken is not None and taken.state is not KeyState.FAILED:
        room.took_over = taken.state  # a failed call's retry expires nothing
    return None


@dataclass(slots=True, kw_only=True)
class _Tried:
    """How a step's last attempt went."""

    done: Executed
    end: datetime
    output: BaseModel | None = None
    out_json: dict[str, Any]
    out_bytes: bytes = b""
    error: TetherError | None = None
    outcome: BreakerOutcome | None = None
    """The breaker's sample of the last attempt, not yet recorded."""
    events: list[record.Event]
    """The step's events not yet written."""


def _attempts(
    run: RunPort,
    cap: Capability[Any, Any],
    handler: Handler,
    ctx_args: tuple[object, ...],
    args: BaseModel,
    room: _Room,
    retry: RetryBudget | None,
    events: list[record.Event],
    number: int,
    needs_intent: bool,
) -> Generator[GatewayEffect, Any, _Tried]:
    """Run the handler and validate its output, retrying while the budget allows.

    Retries run under the same key, each recorded, after a jittered backoff.
    """
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
        tried = _Tried(done=done, end=run.clock.now(), out_json={}, events=events)

        # validate output
        if done.error is None and not done.timed_out:
            try:
                tried.output, tried.out_json = _validate_output(cap, done.value)
                # Encoded here even without a key: a value JSON cannot hold exactly
                # must fail the step now, not the store's write later.
                tried.out_bytes = _canonical.dumps(tried.out_json)
            except InvalidOutput as exc:
                tried.error = exc
            except _canonical.CanonicalError as exc:
                tried.error = InvalidOutput(
                    f"{cap.name}: output has no exact JSON form: {exc}"
                )
        else:
            tried.error = _execution_error(cap, args, done)
        error = tried.error
        if room.watch is not None and room.generation is not None:
            spec = room.watch[1]
            tried.outcome = BreakerOutcome(
                spec=spec,
                generation=room.generation,
                probe=room.probe,
                failed=error is not None,
                slow=bool(spec.slow_us) and done.duration_us >= spec.slow_us,
                note=_guards.breaker_note(number),
            )
        if (
            error is None
            or retry is None
            or attempt >= retry.max_attempts
            or done.still_running
            or isinstance(error, UsageError)
        ):
            return tried

        # retry budget: spend one, or hand the failure back
        delay = retry.delay(attempt, run.random)
        committed = yield run.commit(
            [
                *events,
                record.RetryScheduled(
                    at=tried.end,
                    step=number,
                    attempt=attempt,
                    delay_us=delay // _guards.MICROSECOND,
                    duration_us=done.duration_us,
                    error_code=error.code,
                    message=error.message,
                ),
            ],
            retry=retry.charge(
                capability=cap.name,
                run_id=run.run_id,
                context=run.context,
                window=_guards.window_start(to_us(tried.end), retry.window),
                breaker=None if tried.outcome is None else tried.outcome.spec,
                generation=room.generation,
            ),
            breaker_outcome=tried.outcome,
            step=number,
        )
        if committed.blocked is not None:
            return tried  # no retry left, or the breaker moved: the failure goes back
        events = []  # written with the retry, the attempt's breaker sample too
        yield Sleep(delay.total_seconds(), run.clock)
        attempt += 1


# -- approvals ---------------------------------------------------------------------------


def _ask_approval(
    run: RunPort,
    cap: Capability[Any, Any],
    args: BaseModel,
    args_json: dict[str, Any],
    args_bytes: bytes,
    decision: Decision,
    events: list[record.Event],
    now: datetime,
    number: int,
) -> Generator[GatewayEffect, Any, Outcome | ApprovalRow]:
    """Find or make the approval request for this exact call.

    Returns the approved request to run under, or the step's outcome: parked
    on a new (or still pending) request, or refused by a person's denial. A
    request is for exactly this call: its digest binds the capability and
    version, the args (secrets through an HMAC), the policy version and the
    dry run's preview; if any of them changes, it is another request.
    """
    preview = yield from _preview(run, cap, args, number)
    preview_bytes = None if preview is None else _canonical.dumps(preview)
    digest = _approval_digest(run, cap, args, args_bytes, decision, preview_bytes)
    principal = run.principal
    latest: ApprovalRow | None = yield StoreOp(
        run.store.latest_approval, principal.tenant, principal.id, digest
    )
    if latest is not None:
        live = latest.expires_at > now
        if latest.status is ApprovalStatus.APPROVED and live:
            return latest
        if latest.status is ApprovalStatus.PENDING and live:
            waiting = ApprovalRequired(
                f"{cap.name}: waiting for a person's decision on approval request "
                f"{latest.id} (`tether approvals show {latest.id}`)",
                approval_id=latest.id,
            )
            return (
                yield from _refuse(
                    run,
                    cap,
                    events,
                    now,
                    number,
                    "policy",
                    waiting,
                    OutcomeStatus.REFUSED,
                )
            )
        if latest.status is ApprovalStatus.DENIED:
            why = f": {latest.note}" if latest.note else ""
            denied = Denied(
                f"{cap.name}: {latest.decided_by} denied approval request {latest.id}{why}; "
                "a changed call (other args) asks again",
                rule_ids=decision.rule_ids,
                reasons=(latest.note or "denied by a person",),
            )
            return (
                yield from _refuse(
                    run,
                    cap,
                    events,
                    now,
                    number,
                    "policy",
                    denied,
                    OutcomeStatus.REFUSED,
                )
            )
        if (
            latest.status is ApprovalStatus.PENDING
        ):  # expired undecided: denied, recorded
            events.append(
                record.ApprovalDecided(
                    at=now,
                    step=number,
                    approval_id=latest.id,
                    by="tether",
                    outcome="expired",
                    reason=f"no decision by {latest.expires_at.isoformat()}",
                )
            )
    request = ApprovalRow(
        id=run.new_id("apr_"),
        run_id=run.run_id,
        step=number,
        tenant=principal.tenant,
        principal_id=principal.id,
        on_behalf_of=principal.on_behalf_of,
        capability=cap.name,
        version=cap.version,
        args=_canonical.dumps(args_json),
        preview=preview_bytes,
        digest=digest,
        policy_version=decision.policy_version,
        rule_ids=decision.rule_ids,
        reasons=decision.reasons,
        approvers=run.policy.approvers(decision.rule_ids),
        status=ApprovalStatus.PENDING,
        created_at=now,
        expires_at=now + run.approval_ttl,
    )
    events.append(
        record.ApprovalRequested(
            at=now,
            step=number,
            approval_id=request.id,
            capability=cap.name,
            version=cap.version,
            args=args_json,
            preview=preview,
            digest=digest.hex(),
            reasons=decision.reasons,
            rule_ids=decision.rule_ids,
            approvers=request.approvers,
            expires_at=request.expires_at,
        )
    )
    error = _policy_error(cap, decision)
    parked = ApprovalRequired(
        f"{error.message}; approval request {request.id} waits for a person "
        f"(`tether approvals show {request.id}`)",
        approval_id=request.id,
    )
    committed: Committed = yield run.commit(
        [*events, _failed(parked, now, number, "policy")], approval=request
    )
    if isinstance(committed.blocked, PendingExists):
        # Another call asked for the same thing at the same moment: wait on its request.
        pending = committed.blocked.approval_id
        waiting = ApprovalRequired(
            f"{cap.name}: waiting for a person's decision on approval request "
            f"{pending} (`tether approvals show {pending}`)",
            approval_id=pending,
        )
        del events[-1]  # the request this call would have made
        return (
            yield from _refuse(
                run, cap, events, now, number, "policy", waiting, OutcomeStatus.REFUSED
            )
        )
    outcome = Outcome(
        status=OutcomeStatus.REFUSED, step=number, capability=cap.name, error=parked
    )
    parked.outcome = outcome
    return outcome


def _call_args(
    handler: Handler,
    run: RunPort,
    cap: Capability[Any, Any],
    args: BaseModel,
    number: int,
    key: str | None,
    *,
    dry_run: bool,
) -> tuple[object, ...]:
    """Return what the handler is called with: the args, and its `CallContext` if it wants one."""
    if not handler.wants_ctx:
        return (args,)
    return (
        args,
        CallContext(
            run_id=run.run_id,
            step=number,
            capability=cap.name,
            idempotency_key=key,
            dry_run=dry_run,
        ),
    )


def _preview(
    run: RunPort, cap: Capability[Any, Any], args: BaseModel, number: int
) -> Generator[GatewayEffect, Any, dict[str, Any] | None]:
    """Return what the dry-run handler says the call would do (None without one)."""
    dry = cap.dry_run_handler
    if dry is None:
        return None
    done: Executed = yield Execute(
        fn=dry.fn,
        is_async=dry.is_async,
        call_args=_call_args(dry, run, cap, args, number, None, dry_run=True),
        timeout=cap.timeout,
        clock=run.clock,
        pool=run.pool,
    )
    if done.error is not None or done.timed_out:
        failed = _execution_error(cap, args, done)
        return {"error": failed.code, "message": failed.message}
    try:
        _, out_json = _validate_output(cap, done.value)
    except InvalidOutput as exc:
        return {"error": exc.code, "message": exc.message}
    if cap.secret_output:
        return {"output": "the dry run's output holds secrets; not shown"}
    return {"output": out_json}


def _approval_digest(
    run: RunPort,
    cap: Capability[Any, Any],
    args: BaseModel,
    args_bytes: bytes,
    decision: Decision,
    preview: bytes | None,
) -> bytes:
    """Bind a grant to the capability and version, args, policy version and preview."""
    fingerprint = _fingerprint(
        run.store.record_key,
        args_bytes,
        record.secret_values(args) if cap.has_secrets else (),
    )
    digest = hashlib.sha256(b"tether-approval-v1")
    for part in (
        cap.name.encode(),
        cap.version.encode(),
        fingerprint,
        decision.policy_version.encode(),
        preview or b"",
    ):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


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
    events.append(_failed(error, now, number, stage))
    yield run.commit(events)
    outcome = Outcome(status=status, step=number, capability=cap.name, error=error)
    error.outcome = outcome
    return outcome


def _failed(
    error: TetherError, now: datetime, number: int, stage: str
) -> record.Failed:
    return record.Failed(
        at=now,
        step=number,
        stage=stage,
        error_code=error.code,
        error_type=type(error).__name__,
        message=error.message,
    )


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
