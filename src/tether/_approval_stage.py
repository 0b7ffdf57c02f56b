"""The approval stage: find or make the durable request for a call, or its grant."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Generator
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from tether import _canonical, record
from tether._effects import (
    Execute,
    Executed,
    GatewayEffect,
    StoreOp,
)
from tether._stages import (
    RunPort,
    args_fingerprint,
    call_secrets,
    execution_error,
    failed_event,
    handler_args,
    policy_error,
    quoted_secrets_masked,
    refuse,
    validate_output,
)
from tether.capability import (
    Capability,
)
from tether.errors import (
    ApprovalRequired,
    Denied,
    InvalidOutput,
)
from tether.policy import Decision
from tether.record import Outcome, OutcomeStatus
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Committed,
    PendingExists,
)

__all__ = ["ask_approval", "requested_event"]


# -- approvals ---------------------------------------------------------------------------


def ask_approval(
    run: RunPort,
    cap: Capability[Any, Any],
    args: BaseModel,
    args_json: dict[str, Any],
    args_bytes: bytes,
    decision: Decision,
    events: list[record.Event],
    now: datetime,
    number: int,
    stage: str = "policy",
) -> Generator[GatewayEffect, Any, Outcome | ApprovalRow]:
    """Find or make the approval request for this exact call.

    Returns the approved request to run under, or the step's outcome: parked
    on a new (or still pending) request, or refused by a person's denial. A
    request is for exactly this call: its digest binds the capability and
    version, the args (secrets through an HMAC), the policy version and the
    dry run's preview; if any of them changes, it is another request. A grant
    is also for the rules that asked (and so their approvers): the same call
    asked for by other rules asks again.
    """
    preview = yield from _preview(run, cap, args, number)
    preview_bytes = None if preview is None else _canonical.dumps(preview)
    digest = _approval_digest(run, cap, args, args_bytes, decision, preview_bytes)
    principal = run.principal
    # A failed write is settled first: an intent that landed unseen may have
    # spent this call's grant, and closing it gives the grant back.
    yield StoreOp(run.flush_pending)
    # A request is also the rules' (a breaker's escalation is a rule of its
    # own): the same call asked for by other rules is another request, or an
    # approver for one rule's call would approve it where another rule wants
    # someone else. The rules and the policy version (in the digest) settle
    # who may approve. And it is the person's the call is made for: the same
    # call made for someone else is another call, with its own requests,
    # grants and denials, or a person could approve the call an agent makes
    # for them by approving it for another (whom the call acts for may not
    # decide it). The store matches both, and coalesces a new request only
    # onto one for the same person. (Neither is in the digest: records
    # written before would no longer replay.)
    latest: ApprovalRow | None = yield StoreOp(
        functools.partial(
            run.store.latest_approval, on_behalf_of=principal.on_behalf_of
        ),
        principal.tenant,
        principal.id,
        digest,
        decision.rule_ids,
    )
    if latest is not None:
        live = latest.expires_at > now
        if latest.status is ApprovalStatus.APPROVED and live:
            return latest
        if latest.status is ApprovalStatus.PENDING and live:
            waiting = ApprovalRequired(
                f"{cap.name}: waiting for a person's decision on approval request "
                f"{latest.id} ({_why(decision)}; `tether approvals show {latest.id}`)",
                approval_id=latest.id,
            )
            return (
                yield from refuse(
                    run,
                    cap,
                    events,
                    now,
                    number,
                    stage,
                    waiting,
                    OutcomeStatus.REFUSED,
                )
            )
        # A denial stands against the call for good; a breaker's, for its
        # outage: the breaker's closing closes it (`expired`, see
        # `store._breakers.closing_requests`), so a later outage asks anew.
        if latest.status is ApprovalStatus.DENIED:
            why = f": {latest.note}" if latest.note else ""
            denied = Denied(
                f"{cap.name}: {latest.decided_by} denied approval request {latest.id}{why}; "
                "a changed call (other args) asks again",
                rule_ids=decision.rule_ids,
                reasons=(latest.note or "denied by a person",),
            )
            return (
                yield from refuse(
                    run,
                    cap,
                    events,
                    now,
                    number,
                    stage,
                    denied,
                    OutcomeStatus.REFUSED,
                )
            )
        if latest.status is ApprovalStatus.PENDING:
            # Expired undecided: that is a no, for the call that waited on it,
            # recorded; a later call asks again.
            yield StoreOp(run.store.expire_approval, latest.id, now)
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
            lapsed = Denied(
                f"{cap.name}: approval request {latest.id} expired undecided at "
                f"{latest.expires_at.isoformat()}, which is a no; calling again asks anew",
                rule_ids=decision.rule_ids,
                reasons=("the approval request expired undecided",),
            )
            return (
                yield from refuse(
                    run, cap, events, now, number, stage, lapsed, OutcomeStatus.REFUSED
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
    events.append(requested_event(request, args_json, preview))
    error = policy_error(cap, decision)
    parked = ApprovalRequired(
        f"{error.message}; approval request {request.id} waits for a person "
        f"(`tether approvals show {request.id}`)",
        approval_id=request.id,
        created=True,
    )
    committed: Committed = yield run.commit(
        [*events, failed_event(parked, now, number, stage)], approval=request
    )
    if isinstance(committed.blocked, PendingExists):
        # Another call asked for the same thing at the same moment: wait on its request.
        pending = committed.blocked.approval_id
        waiting = ApprovalRequired(
            f"{cap.name}: waiting for a person's decision on approval request "
            f"{pending} ({_why(decision)}; `tether approvals show {pending}`)",
            approval_id=pending,
        )
        del events[-1]  # the request this call would have made
        return (
            yield from refuse(
                run, cap, events, now, number, stage, waiting, OutcomeStatus.REFUSED
            )
        )
    outcome = Outcome(
        status=OutcomeStatus.REFUSED, step=number, capability=cap.name, error=parked
    )
    parked.outcome = outcome
    return outcome


def requested_event(
    request: ApprovalRow, args: dict[str, Any], preview: dict[str, Any] | None
) -> record.ApprovalRequested:
    """Return the record's `approval_requested` event for a new request."""
    return record.ApprovalRequested(
        at=request.created_at,
        step=request.step,
        approval_id=request.id,
        capability=request.capability,
        version=request.version,
        args=args,
        preview=preview,
        digest=request.digest.hex(),
        reasons=request.reasons,
        rule_ids=request.rule_ids,
        approvers=request.approvers,
        expires_at=request.expires_at,
    )


def _why(decision: Decision) -> str:
    """Say which rules asked for a person, and why, in a few words."""
    rules = ", ".join(decision.rule_ids) or "the default"
    return f"{rules}: {'; '.join(decision.reasons) or 'no reason given'}"


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
        call_args=handler_args(dry, run, cap, args, number, None, dry_run=True),
        timeout=cap.timeout,
        clock=run.clock,
        pool=run.pool,
        preview=True,
    )
    if done.error is not None or done.timed_out:
        failed = execution_error(cap, args, done)
        return {"error": failed.code, "message": failed.message}
    try:
        _, out_json = validate_output(cap, done.value)
    except InvalidOutput as exc:
        return {"error": exc.code, "message": exc.message}
    if cap.secret_output:
        return {"output": "the dry run's output holds secrets; not shown"}
    masked = quoted_secrets_masked(cap, args, out_json)
    return {"output": out_json if masked is None else masked}


def _approval_digest(
    run: RunPort,
    cap: Capability[Any, Any],
    args: BaseModel,
    args_bytes: bytes,
    decision: Decision,
    preview: bytes | None,
) -> bytes:
    """Bind a grant to the capability and version, args, policy version and preview."""
    fingerprint = args_fingerprint(
        run.store.record_key, args_bytes, call_secrets(cap, args, args_bytes)
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
