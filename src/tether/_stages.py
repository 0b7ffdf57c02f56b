"""The call path's small stages: refusals, preconditions, keys, output, errors.

`gateway.step` runs them in DESIGN's order; they live here so that the path
itself reads as the design's list.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, cast

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from tether import _canonical, record
from tether._effects import (
    Executed,
    Flow,
    GatewayEffect,
    StoreOp,
)
from tether._guards import FullCounters, Guards
from tether._redact import redact_json
from tether.capability import (
    CallContext,
    Capability,
    Handler,
    Idempotency,
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
)
from tether.policy import Decision, PolicySet, Verdict
from tether.principal import Principal
from tether.record import Outcome, OutcomeStatus
from tether.store import (
    ApprovalRow,
    Claim,
    KeyRecord,
    KeyState,
    KeyUpdate,
    Store,
)
from tether.store._breakers import BreakerAdmit, BreakerOutcome
from tether.store._limits import Reserve, RetryCharge, Settle

__all__ = [
    "MAX_MESSAGE",
    "RunPort",
    "args_fingerprint",
    "as_model",
    "call_secrets",
    "check_preconditions",
    "classify",
    "execution_error",
    "failed_event",
    "handler_args",
    "may_hold_secrets",
    "policy_error",
    "refuse",
    "settle_by_key",
    "status_of",
    "stored_result",
    "validate_output",
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
    full_counters: FullCounters
    """Counters reads found full in this process (which path a read takes)."""
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
        """Settle what failed writes owe (raises `StoreError` if the store still fails)."""
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


def handler_args(
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


# -- stages ------------------------------------------------------------------------


def refuse(
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
    events.append(failed_event(error, now, number, stage))
    yield run.commit(events)
    outcome = Outcome(status=status, step=number, capability=cap.name, error=error)
    error.outcome = outcome
    return outcome


def failed_event(
    error: TetherError, now: datetime, number: int, stage: str
) -> record.Failed:
    return record.Failed(
        at=now,
        step=number,
        stage=stage,
        error_code=error.code,
        error_type=type(error).__name__,
        message=error.message,
        approval_id=error.approval_id if isinstance(error, ApprovalRequired) else None,
    )


def check_preconditions(
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
        secrets = call_secrets(cap, args)
        if secrets:
            reason = record.redact_text(reason, secrets)
        events.append(
            record.PreconditionChecked(
                at=now, step=number, checks=tuple(names), failed=name, reason=reason
            )
        )
        return PreconditionFailed(f"{cap.name}: precondition {name!r} failed: {reason}")
    events.append(record.PreconditionChecked(at=now, step=number, checks=tuple(names)))
    return None


def policy_error(cap: Capability[Any, Any], decision: Decision) -> TetherError:
    why = "; ".join(decision.reasons) or "no reason given"
    rules = ", ".join(decision.rule_ids) or "the default"
    if decision.verdict is Verdict.DENY:
        return Denied(
            f"{cap.name}: denied by {rules}: {why}",
            rule_ids=decision.rule_ids,
            reasons=decision.reasons,
        )
    return ApprovalRequired(f"{cap.name}: needs a person's approval ({rules}: {why})")


def call_secrets(
    cap: Capability[Any, Any], args: BaseModel, args_bytes: bytes | None = None
) -> list[str]:
    """Return the clear values of the secrets in a call's args (nested included).

    A free-form field (`Any`, `dict[str, Any]`) may carry a `SecretStr` that no
    schema declares: it is looked for too, when the canonical args
    (`args_bytes`, if given) show a masked value.
    """
    if may_hold_secrets(cap, args_bytes):
        return record.secret_values(args)
    return []


def quoted_secrets_masked(
    cap: Capability[Any, Any],
    args: BaseModel,
    data: dict[str, Any],
    args_bytes: bytes | None = None,
) -> dict[str, Any] | None:
    """Return a handler's JSON `data` with the call's secret args masked, or None.

    None when nothing in it quotes one. For what a handler made from its args
    (an output, a dry run's preview): a plain text field may quote a secret arg
    its own type does not mark (RELIABILITY H.53).
    """
    if not may_hold_secrets(cap, args_bytes):
        return None
    secrets = call_secrets(cap, args, args_bytes)
    if not secrets:
        return None
    masked = redact_json(data, secrets)
    return None if masked == data else cast("dict[str, Any]", masked)


def may_hold_secrets(cap: Capability[Any, Any], args_bytes: bytes | None) -> bool:
    """Tell whether a call's args may hold secrets.

    Declared ones, or a masked value in a free-form field (`args_bytes`: the
    canonical, masked args; None when not at hand).
    """
    return cap.has_secrets or (
        cap.free_form and (args_bytes is None or _MASK_BYTES in args_bytes)
    )


_MASK_BYTES = record.SECRET_MASK.encode()


def args_fingerprint(
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


def classify(
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
            f"{cap.name}: idempotency key {key!r:.80} was first used for a different "
            f"call (other arguments, or on behalf of another person; run "
            f"{existing.run_id}, step {existing.step}); use a new key for a new call"
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


def status_of(error: TetherError) -> OutcomeStatus:
    return (
        OutcomeStatus.IN_DOUBT if isinstance(error, InDoubt) else OutcomeStatus.REFUSED
    )


def settle_by_key(
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
    answer = classify(existing, fingerprint, cap, key, now, run.retention)
    if answer == "proceed":
        return None
    output = None
    refusal = answer if isinstance(answer, TetherError) else None
    if refusal is None:  # a hit: replay the stored result, if it can be
        output, refusal = stored_result(cap, existing, key)
    if refusal is not None:
        status = status_of(refusal)
        return (
            yield from refuse(
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


def stored_result(
    cap: Capability[Any, Any], existing: KeyRecord, key: str
) -> tuple[BaseModel | None, TetherError | None]:
    """Return a key's stored result as the capability's output, or why it cannot be."""
    assert existing.output is not None
    # A free-form field (Any) may have held a SecretStr no schema declares, and
    # a plain field may have quoted a secret arg (masked when recorded): its
    # stored form is the mask, which must not come back as the result.
    masked = _MASK_BYTES in existing.output
    if cap.secret_output or (
        masked and (cap.free_form_output or may_hold_secrets(cap, None))
    ):
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


def validate_output(
    cap: Capability[Any, Any], value: object
) -> tuple[BaseModel, dict[str, Any]]:
    """Return the output and its JSON form, both checked against the output schema.

    The JSON form is what the record keeps, so it is what is validated: an
    instance made with `model_construct()` or changed by attribute assignment
    skipped pydantic's checks, and is caught here. The output returned is a
    validated one too, never the handler's unchecked instance: the one
    validated from that JSON form (which costs nothing more: the validation
    ran anyway), so the first caller gets what a keyed retry later reads back
    from the record (a field the handler set to `"5"` reaches both as the int
    5). An output whose JSON form may mask a secret (a secret field, or an
    open one, `Any` or extra keys, that may hold a `SecretStr`) is validated
    again from its Python form instead, so the first caller still gets the
    clear value.
    """
    model = cap.output_model
    try:
        output = value if type(value) is model else as_model(model, value)
        assert isinstance(output, BaseModel)
        # Serializer and validator directly: their Python wrappers would double
        # the cost. A wrongly typed field serializes as is, and validation fails.
        data: dict[str, Any] = model.__pydantic_serializer__.to_python(
            output, mode="json", warnings=False
        )
        if output is value:
            validator = model.__pydantic_validator__
            checked = validator.validate_python(data)
            output = (
                validator.validate_python(
                    model.__pydantic_serializer__.to_python(value, warnings=False)
                )
                if cap.secret_output or cap.open_output
                else checked
            )
        # JSON mode writes NaN and Infinity as null: the record would not hold
        # what the caller got, nor a retry get what the first call did.
        problem = cap.inexact_output(output)
    except ValidationError as exc:
        raise InvalidOutput(one_line_error(cap.name, "output", exc)) from exc
    except (PydanticSerializationError, ValueError) as exc:
        raise InvalidOutput(
            f"{cap.name}: output does not fit its schema: {exc}"
        ) from exc
    if problem:
        raise InvalidOutput(
            f"{cap.name}: output holds {problem}, which a record cannot keep "
            "exactly; return finite numbers"
        )
    return output, data


def as_model(model: type[BaseModel], value: object) -> BaseModel:
    if isinstance(value, BaseModel):
        value = value.model_dump(warnings=False)
    return model.model_validate(value)


def execution_error(
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
    secrets = call_secrets(cap, args)
    if isinstance(exc, UsageError):  # tether's own error, raised inside a handler
        if secrets:  # kept as it is, but its message may quote the args
            exc.message = record.redact_text(exc.message, secrets)
            exc.args = (exc.message,)
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, Exception):
        text = f"{type(exc).__name__}: the caller was cancelled while the handler ran"
    if secrets:
        text = record.redact_text(text, secrets)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + "..."
    failed = CapabilityFailed(f"{cap.name}: {text}")
    if secrets or cap.has_secrets:
        failed.__suppress_context__ = True  # the raw error may quote a secret
    else:
        failed.__cause__ = exc
    return failed
