"""The limit, breaker and retry stages of the call path (see `gateway.step`).

Before a step acts it takes room in its limits (quotas, budgets, concurrency
leases, rate limits) and passes its resource's breaker, claiming its key and
recording its intent in the same write (`take_room`); a read whose limits only
count is charged after it answers instead (`charged`, `refused_after`). Then
the handler runs, and a failure is retried while the run's retry budget
allows (`attempts`). Like `gateway.step`, each is a generator that yields its
effects.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from tether import _canonical, _guards, record
from tether._approval_stage import ask_approval
from tether._effects import Execute, Executed, Flow, GatewayEffect, Sleep, StoreOp
from tether._stages import (
    RunPort,
    execution_error,
    refuse,
    settle_by_key,
    validate_output,
)
from tether.capability import Capability, Effect, Handler, Idempotency
from tether.errors import ApprovalRequired, InvalidOutput, TetherError, UsageError
from tether.limits import LimitSet, Reserved
from tether.policy import Decision, Verdict
from tether.record import Outcome, OutcomeStatus
from tether.resilience import Breaker, RetryBudget
from tether.store import (
    ApprovalRow,
    Claim,
    Committed,
    GrantGone,
    KeyId,
    KeyState,
    PendingExists,
)
from tether.store._breakers import (
    BreakerAdmit,
    BreakerBlocked,
    BreakerOutcome,
    BreakerSpec,
    breaker_rule,
    breaker_view,
)
from tether.store._limits import Throttled, to_us

__all__ = [
    "Room",
    "Tried",
    "attempts",
    "charged",
    "refused_after",
    "reserve",
    "take_room",
]


@dataclass(slots=True, kw_only=True)
class Room:
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
    probe_at: int = 0
    """A trial call: when the breaker let it through, µs."""
    took_over: KeyState | None = None
    """The state of a stale or expired key record the claim replaced."""
    grant: ApprovalRow | None = None
    """The approved request the step runs under, spent with its intent."""
    after: bool = False
    """The read is charged after it answers, in the write that records it."""


def charged(
    room: Room, events: list[record.Event], before: int, number: int
) -> list[record.Event]:
    """The step's events, with its reservation after the checks when it is charged now."""
    if not room.after:
        return events
    reserved = _guards.reserved_event(room.reserved, room.now, number)
    return [*events[:before], reserved, *events[before:]]


def refused_after(
    run: RunPort,
    cap: Capability[Any, Any],
    room: Room,
    before: list[record.Event],
    committed: Committed,
    number: int,
) -> Flow:
    """A read charged after it answered found no room: refused, its answer dropped."""
    blocked = committed.blocked
    assert blocked is not None
    assert not isinstance(
        blocked, (Throttled, PendingExists, GrantGone)
    )  # not asked for
    # Until a call fits again, reads under this counter take their room before
    # they run: past a full limit, they stop reaching the upstream.
    run.full_counters.note_full(blocked, room.reserved)
    now = room.now
    stage, error = _guards.refusal(cap, before, now, number, blocked, room.watch)
    return (
        yield from refuse(run, cap, before, now, number, stage, error,
                          OutcomeStatus.REFUSED)
    )  # fmt: skip


def reserve(
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


def take_room(
    run: RunPort,
    cap: Capability[Any, Any],
    room: Room,
    events: list[record.Event],
    number: int,
    call: tuple[BaseModel, dict[str, Any], bytes],
    cost: Decimal,
    key: str | None,
    key_id: KeyId | None,
    fingerprint: bytes | None,
) -> Generator[GatewayEffect, Any, Outcome | None]:
    """Claim the key, take room in the limits, pass the breaker, record the intent.

    All in one write; returns the step's outcome if any of them says no. An
    open breaker in `escalate` mode asks a person (a durable approval
    request): once they approve, the call goes ahead despite the breaker,
    under that single-use grant.
    """
    args, args_json, args_bytes = call
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
                _guards.reserved_event(room.reserved, now, number, throttled_us)
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
            settled = yield from settle_by_key(
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
                room.reserved = reserve(
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
                yield from refuse(
                    run, cap, events, now, number, "policy", gone, OutcomeStatus.REFUSED
                )
            )
        if (
            isinstance(blocked, BreakerBlocked)
            and room.watch is not None
            and room.watch[0].on_open == "escalate"
        ):
            why = _guards.breaker_refused(cap, blocked, "escalate", events, now, number)
            escalated = Decision(
                verdict=Verdict.REQUIRE_APPROVAL,
                rule_ids=(breaker_rule(blocked.breaker_id),),
                reasons=(f"{why}: go ahead anyway?",),
                policy_version=run.policy.version,
            )
            asked = yield from ask_approval(
                run,
                cap,
                args,
                args_json,
                args_bytes,
                escalated,
                events,
                now,
                number,
                stage="breaker",
            )
            if isinstance(asked, Outcome):
                return asked  # parked: a person decides whether to go ahead
            room.grant, admit = asked, None  # approved: past the breaker, once
            continue
        if blocked is not None:
            assert not isinstance(blocked, (Throttled, PendingExists))  # not asked for
            stage, error = _guards.refusal(
                cap, events, now, number, blocked, room.watch
            )
            return (
                yield from refuse(
                    run, cap, events, now, number, stage, error, OutcomeStatus.REFUSED
                )
            )
        break
    if room.reserved:
        run.full_counters.note_room(room.reserved)
    if admit is not None:
        room.generation = committed.breaker_generation
        room.probe = committed.probe
        room.probe_at = committed.probe_at
    taken = committed.took_over
    if taken is not None and taken.state is not KeyState.FAILED:
        room.took_over = taken.state  # a failed call's retry expires nothing
    return None


@dataclass(slots=True, kw_only=True)
class Tried:
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
    retried: bool = False
    """A retry's write recorded the step's events before it: none is written again."""


def attempts(
    run: RunPort,
    cap: Capability[Any, Any],
    handler: Handler,
    ctx_args: tuple[object, ...],
    args: BaseModel,
    room: Room,
    retry: RetryBudget | None,
    events: list[record.Event],
    number: int,
    needs_intent: bool,
) -> Generator[GatewayEffect, Any, Tried]:
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
        tried = Tried(
            done=done,
            end=run.clock.now(),
            out_json={},
            events=events,
            retried=attempt > 1,
        )

        # validate output
        if done.error is None and not done.timed_out:
            try:
                tried.output, tried.out_json = validate_output(cap, done.value)
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
            tried.error = execution_error(cap, args, done)
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
                probe_at=room.probe_at,
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
        tried.outcome, tried.retried = None, True
        yield Sleep(delay.total_seconds(), run.clock)
        attempt += 1
        if room.watch is not None and room.generation is not None:
            # Another call may have moved the breaker during the backoff: the
            # next attempt runs only under the generation that let the call in.
            moved = yield from _breaker_moved(run, cap, room, number)
            if moved is not None:
                tried.events, tried.end = [moved], moved.at
                return tried  # the failure goes back, its sample already written


def _breaker_moved(
    run: RunPort, cap: Capability[Any, Any], room: Room, number: int
) -> Generator[GatewayEffect, Any, record.BreakerChecked | None]:
    """Look at the breaker before a retry; say why not to retry, if it moved (one read)."""
    assert room.watch is not None
    breaker, spec = room.watch
    row = yield StoreOp(run.store.breaker_row, spec.id)
    now = run.clock.now()
    view, _ = breaker_view(row, spec, to_us(now))
    if view.generation == room.generation:
        return None
    return _guards.retry_refused(cap, spec.id, view.state, breaker.on_open, now, number)
