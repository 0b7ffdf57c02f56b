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
from tether.clock import Clock
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
from tether.policy import Decision, DecisionRequest, PolicySet, Verdict
from tether.principal import Principal
from tether.record import Outcome, OutcomeStatus
from tether.store import Claim, Committed, KeyId, KeyRecord, KeyState, KeyUpdate, Store

__all__ = [
    "Execute",
    "Executed",
    "Flow",
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
    ) -> StoreOp:
        """Return the effect that appends `events` to the run's record."""
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

    # limits: reserve; breaker -- hooks for the limits issue; nothing to check yet

    # claim key + record intent (fenced by the run's lease epoch)
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
    needs_intent = not dry_run and (cap.effect is not Effect.READ or key_id is not None)
    if needs_intent:
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
        intent = record.Intent(
            at=now,
            step=number,
            capability=cap.name,
            version=cap.version,
            key=key,
            cost_estimate=cost,
        )
        committed: Committed = yield run.commit([*events, intent], claim=claim)
        if committed.conflict is not None:
            assert fingerprint is not None
            assert key is not None
            settled = yield from _settle_by_key(
                run, cap, committed.conflict, fingerprint, key, events, now, number
            )
            assert settled is not None, "the store refused a claim it may replace"
            return settled
        taken = committed.took_over
        if taken is not None and taken.state is not KeyState.FAILED:
            took_over_state = taken.state  # a failed call's retry expires nothing
        events = []

    # execute (real, or dry-run), with timeout
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
            error = InvalidOutput(f"{cap.name}: output has no exact JSON form: {exc}")
    else:
        error = _execution_error(cap, args, done)

    # limits: settle; breaker: record outcome -- hooks for the limits issue

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
        yield run.commit(events, key_update=update, keep_on_failure=needs_intent)
        status = OutcomeStatus.DRY_RUN if dry_run else OutcomeStatus.EXECUTED
        return Outcome(
            status=status,
            step=number,
            capability=cap.name,
            output=output,
            idempotency_key=key,
        )

    in_doubt = (
        not dry_run
        and done.started
        and cap.effect is not Effect.READ
        and cap.idempotency is Idempotency.NONE
    )
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
                error_type=type(done.error or error).__name__,
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
    yield run.commit(events, key_update=update, keep_on_failure=needs_intent)
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
