"""The one call path: every step takes it, in DESIGN.md's order.

`step()` is a generator that reads top to bottom like the design's list. Each
stage decides with a small function and records one event; what touches the
world (the store, the handler) is *yielded* as an effect and its result sent
back in. `drive` and `adrive` perform the effects, for sync and async callers:
one pipeline, two ten-line loops.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from decimal import Decimal
from typing import Any

from tether import _canonical, _guards, record
from tether._approval_stage import ask_approval
from tether._effects import (
    Execute,
    Executed,
    Flow,
    StoreOp,
    adrive,
    drive,
)
from tether._guards import Guards
from tether._limit_stage import (
    Room,
    Tried,
    attempts,
    charged,
    refused_after,
    reserve,
    take_room,
)
from tether._stages import (
    RunPort,
    args_fingerprint,
    call_secrets,
    check_preconditions,
    handler_args,
    policy_error,
    quoted_secrets_masked,
    refuse,
    settle_by_key,
)
from tether.capability import (
    Capability,
    Effect,
    Idempotency,
    check_key,
)
from tether.errors import (
    Denied,
    InDoubt,
    InvalidOutput,
    TetherError,
    UsageError,
    ValidationFailed,
)
from tether.policy import Decision, DecisionRequest, Verdict
from tether.policy.cel import CelError
from tether.record import Outcome, OutcomeStatus
from tether.resilience import ratio_id
from tether.store import (
    ApprovalRow,
    KeyId,
    KeyState,
    KeyUpdate,
)
from tether.store._breakers import BreakerState, breaker_view
from tether.store._limits import LimitKind, Settle, to_us

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

logger = logging.getLogger(__name__)


# -- the call path ---------------------------------------------------------------


def step(  # the design's list, in order
    run: RunPort,
    cap: Capability[Any, Any],
    raw_args: object,
    *,
    key: str | None = None,
    dry_run: bool = False,
    deadline: timedelta | None = None,
) -> Flow:
    """Take one step through the call path and return its outcome.

    Args:
        run: the run the step belongs to.
        cap: the resolved capability.
        raw_args: the args as the caller gave them (a mapping, a model, JSON text).
        key: the caller's idempotency key, if any.
        dry_run: run the dry-run handler instead of the real one.
        deadline: the most the caller waits for the handler; it shortens the
            capability's own timeout for this call (RELIABILITY D.32).
    """
    number = run.next_step()
    now = run.clock.now()
    events: list[record.Event] = []
    if deadline is not None:
        cap = cap.within(deadline)

    # validate args against the input schema
    try:
        if key is not None:
            check_key(key)
        args = cap.validate_args(raw_args)
        args_json, args_bytes = cap.dump_args(args)
    except ValidationFailed as exc:
        return (
            yield from refuse(
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
            key=key,
            dry_run=dry_run,
            timeout=None if deadline is None else deadline.total_seconds(),
        )
    )

    # preconditions
    if cap.preconditions:
        failed = check_preconditions(cap, args, events, now, number)
        if failed is not None:
            return (
                yield from refuse(
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
    if cap.requires_approval and decision.verdict is not Verdict.DENY:
        # The capability always needs a person: the strictest verdict but deny.
        decision = Decision(
            verdict=Verdict.REQUIRE_APPROVAL,
            rule_ids=(*decision.rule_ids, f"capability:{cap.name}"),
            reasons=(*decision.reasons, f"{cap.name} always needs a person's approval"),
            policy_version=decision.policy_version,
        )
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
        asked = yield from ask_approval(
            run, cap, args, args_json, args_bytes, decision, events, now, number
        )
        if isinstance(asked, Outcome):
            return asked  # parked: the request waits for a person (or was denied)
        grant = asked  # an approved request for exactly this call: it runs under it
    elif verdict is Verdict.DENY:
        refusal = policy_error(cap, decision)
    elif handler is None and cap.effect is not Effect.READ:
        refusal = Denied(
            f"{cap.name}: a dry run was required but the capability has no "
            "dry-run handler; add dry_run=... to its declaration"
        )
    if refusal is not None:
        return (
            yield from refuse(
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
        fingerprint = args_fingerprint(
            run.store.record_key, args_bytes, call_secrets(cap, args, args_bytes)
        )
        for_whom = run.principal.on_behalf_of
        if for_whom is not None:
            # The same args for another person are another call: under the same
            # key, a conflict, not the first person's result. (Left as it was
            # for nobody, so keys stored before still match.)
            fingerprint = hashlib.sha256(
                b"tether-key-for-v1" + fingerprint + for_whom.encode()
            ).digest()
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
            settled = yield from settle_by_key(
                run, cap, existing, fingerprint, key, events, now, number
            )
            if settled is not None:
                return settled

    # limits: reserve (quota, budget, concurrency, rate); breaker
    try:
        cost = cap.estimate_cost(args)
    except Exception as exc:  # noqa: BLE001  # a user cost function may raise anything
        why = f"{type(exc).__name__}: {exc}"
        secrets = call_secrets(cap, args, args_bytes)
        if secrets:  # its message may quote the args it read
            why = record.redact_text(why, secrets)
        broken = UsageError(
            f"{cap.name}: its cost function raised {why}; fix the capability's cost"
        )
        return (
            yield from refuse(
                run, cap, events, now, number, "cost", broken, OutcomeStatus.REFUSED
            )
        )
    guards = None if dry_run else run.guards
    room = Room(now=now)
    if guards is not None:
        room.watch = guards.breakers.for_resource(cap.resource)
        if guards.limits:
            try:
                room.reserved = reserve(guards.limits, run, cap, args_json, cost, now)
            except CelError as exc:
                broken = UsageError(
                    f"{cap.name}: a limit's cost expression failed ({exc}); fix it "
                    "in tether.yaml (guard optional fields with has(...))"
                )
                return (
                    yield from refuse(
                        run, cap, events, now, number, "limits", broken,
                        OutcomeStatus.REFUSED,
                    )
                )  # fmt: skip
    room.grant = grant
    # A read whose limits only count (quotas, budgets without a throttle) is
    # charged after it answers, in the one write that records it: it acts on
    # nothing, so running it before the check spends nothing a refusal must undo.
    # Once such a read found a counter full, the next ones check first (until
    # one fits): a refused read must not keep calling the upstream.
    room.after = (
        not dry_run
        and cap.effect is Effect.READ
        and key_id is None
        and grant is None
        and bool(room.reserved)
        and all(_guards.charged_after(r.reserve) for r in room.reserved)
        and not run.full_counters.found(room.reserved)
    )
    needs_intent = (
        not dry_run
        and not room.after
        and (
            cap.effect is not Effect.READ
            or key_id is not None
            or bool(room.reserved)
            or grant is not None
        )
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
            needs_intent, room.after = True, False
    # What a refusal after the answer records (copied only when one can come).
    before = list(events) if room.after else []

    # claim key + record intent (fenced by the run's lease epoch), with the room
    if needs_intent:
        taken = yield from take_room(
            run,
            cap,
            room,
            events,
            number,
            (args, args_json, args_bytes),
            cost,
            key,
            key_id,
            fingerprint,
        )
        if isinstance(taken, Outcome):
            return taken
        events = []

    # execute (real, or dry-run), with timeout; retries under the same key
    ctx_args = handler_args(handler, run, cap, args, number, key, dry_run=dry_run)
    # A person approved one call: no automatic retry runs it again.
    no_retry = room.probe or room.grant is not None
    retry = None if guards is None or no_retry else guards.retry
    if retry is not None and not _guards.retryable(cap):
        retry = None
    tried: Tried = yield from attempts(
        run, cap, handler, ctx_args, args, room, retry, events, number, needs_intent
    )
    done, end, output, error = tried.done, tried.end, tried.output, tried.error
    out_json, out_bytes, outcome_cmd = tried.out_json, tried.out_bytes, tried.outcome
    if output is not None:
        # The record and the key keep quoted secrets masked; the caller gets
        # the output as the handler made it.
        masked = quoted_secrets_masked(cap, args, out_json, args_bytes)
        if masked is not None:
            out_json, out_bytes = masked, _canonical.dumps(masked)
    events = tried.events
    if tried.retried:  # a retry's write recorded the checks: they are not repeated
        before = list(events) if room.after else []

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
            secrets = [*call_secrets(cap, args), *record.secret_values(output)]
            logger.warning(
                "limits.actual_cost_failed",
                extra={
                    "tether.run_id": run.run_id,
                    "tether.error": record.redact_text(exc.message, secrets),
                },
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
        committed = yield run.commit(
            charged(room, events, len(before), number),
            key_update=update,
            keep_on_failure=needs_intent,
            reserve=[r.reserve for r in room.reserved] if room.after else (),
            settle=settles,
            breaker_outcome=outcome_cmd,
            step=number,
        )
        if committed.blocked is not None:
            if cost and not dry_run:
                run.cost -= cost
            return (yield from refused_after(run, cap, room, before, committed, number))
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
            ends_claim=not done.still_running,  # else: held until it lapses
        )
    committed = yield run.commit(
        charged(room, events, len(before), number),
        key_update=update,
        keep_on_failure=needs_intent,
        reserve=[r.reserve for r in room.reserved] if room.after else (),
        settle=settles,
        breaker_outcome=outcome_cmd,
        step=number,
    )
    if committed.blocked is not None:
        return (yield from refused_after(run, cap, room, before, committed, number))
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
