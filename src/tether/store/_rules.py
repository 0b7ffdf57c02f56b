"""The rules every backend applies alike to what it stores, written once.

Which claim may take a key that already has a record (`may_replace`); how a
batch's limit and breaker commands are applied to a backend's rows
(`apply_limits`, over `tether.store._limits` and `tether.store._breakers`);
and why an approval request can no longer be decided (`closed_reason`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from tether.store._batch import Batch, Claim
from tether.store._breakers import BreakerBlocked, breaker_view
from tether.store._limits import (
    Admitted,
    LimitTables,
    apply_admission,
    apply_results,
    charge_retry,
    to_us,
)
from tether.store._rows import ApprovalRow, ApprovalStatus, KeyRecord, KeyState

if TYPE_CHECKING:
    from tether.record import Event

__all__ = ["apply_limits", "closed_reason", "may_replace"]


def closed_reason(row: ApprovalRow, now: datetime) -> str:
    """Say why a request can no longer be decided, in one line."""
    if row.status is ApprovalStatus.PENDING and row.expires_at <= now:
        return (
            f"approval request {row.id} expired at {row.expires_at.isoformat()}; "
            "the step asks again when it is retried"
        )
    who = f" by {row.decided_by}" if row.decided_by else ""
    return f"approval request {row.id} is {row.status.value}{who}; a decision is final"


def apply_limits(tables: LimitTables, batch: Batch) -> tuple[list[Event], Admitted]:
    """Apply a batch's limit and breaker commands to a backend's rows.

    Returns:
        The batch's events with the ones the breaker adds, and what was
        admitted. When `Admitted.blocked` is set the caller must write nothing
        of the batch (roll back what this wrote).
    """
    retry = batch.retry
    if retry is not None:  # the failed attempt's outcome first: it may open the breaker
        events = [*batch.events]
        events += apply_results(
            tables, batch.settle, batch.breaker_outcome, now=batch.at
        )
        if retry.breaker is not None and retry.generation is not None:
            view, _ = breaker_view(
                tables.breaker(retry.breaker.id), retry.breaker, to_us(batch.at)
            )
            if view.generation != retry.generation:
                return [], Admitted(
                    blocked=BreakerBlocked(
                        breaker_id=retry.breaker.id, state=view.state, retry_after_us=0
                    )
                )
        refused = charge_retry(tables, retry, now=batch.at)
        if refused is not None:
            return [], Admitted(blocked=refused)
        return events, Admitted()
    admitted = apply_admission(
        tables,
        batch.reserve,
        batch.breaker,
        run_id=batch.run_id,
        step=batch.step,
        now=batch.at,
        throttle=batch.throttle,
    )
    if admitted.blocked is not None:
        return [], admitted
    events = [*batch.events, *admitted.events]
    events += apply_results(tables, batch.settle, batch.breaker_outcome, now=batch.at)
    return events, admitted


def may_replace(existing: KeyRecord, claim: Claim) -> bool:
    """Tell whether a new claim may take a key that already has a record.

    An in-progress claim of the same run and step is the step's own, left by
    a writer that died or was fenced off when the run was taken over: its new
    writer retries it under the key, as a `keyed` retry does.
    """
    if (
        existing.state is KeyState.IN_PROGRESS
        and claim.take_over_stale
        and (existing.run_id, existing.step) == (claim.run_id, claim.step)
    ):
        return existing.fingerprint == claim.fingerprint
    if existing.state is KeyState.COMPLETED:
        assert existing.completed_at is not None
        return existing.completed_at + claim.retention <= claim.now
    if existing.state is KeyState.IN_PROGRESS:
        return claim.take_over_stale and existing.lease_until <= claim.now
    if existing.state is KeyState.FAILED:
        return existing.fingerprint == claim.fingerprint
    return False  # in doubt: only a person clears it
