"""Who may decide an approval request, and how a request reads at a given time.

The rules `Tether.approve` and `Tether.deny` apply before a decision is
written (`Tether.resolve_in_doubt` before a person's answer to a step in
doubt, and `Tether.abort` before a run is stopped); `Tether.approvals` and the
worker read requests through `as_of`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from tether.store import ApprovalRow, ApprovalStatus

__all__ = ["Approver", "as_of", "why_not", "why_not_abort", "why_not_resolve"]


class Approver(Protocol):
    """A person named under `approvers:` in tether.yaml (`config.Approver`)."""

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles they hold; a request naming roles needs one of them."""
        ...

    @property
    def tenants(self) -> tuple[str, ...]:
        """The tenants whose requests they may decide; empty: every tenant."""
        ...


def as_of(row: ApprovalRow, now: datetime) -> ApprovalRow:
    """Show a pending request past its expiry as expired (it can no longer be decided)."""
    if row.status is ApprovalStatus.PENDING and row.expires_at <= now:
        return dataclasses.replace(row, status=ApprovalStatus.EXPIRED)
    return row


def why_not(
    request: ApprovalRow, by: str, approvers: Mapping[str, Approver]
) -> str | None:
    """Say why `by` may not decide `request`, or None when they may."""
    if by in (request.principal_id, request.on_behalf_of):
        return (
            f"{by} asked for approval request {request.id} (or acts for who did); "
            "nobody approves their own request"
        )
    refused = _outside(by, approvers, request.tenant, f"approval request {request.id}")
    if refused is None and request.approvers:
        approver = approvers[by]
        if set(request.approvers).isdisjoint(approver.roles):
            return (
                f"{by} holds none of the roles that may decide approval request "
                f"{request.id} ({', '.join(request.approvers)})"
            )
    return refused


def why_not_resolve(
    by: str,
    approvers: Mapping[str, Approver],
    *,
    run_id: str,
    tenant: str,
    callers: tuple[str | None, ...],
) -> str | None:
    """Say why `by` may not answer for a step in doubt of run `run_id`, or None.

    Whoever may decide approval requests for the run's tenant may say what a
    step in doubt did; the run's principal, and whom it acts for (`callers`),
    may not: their answer would let their own call run again.
    """
    if by in callers:
        return (
            f"{by} made the call in run {run_id} (or it acts for them); nobody "
            "answers for their own call: a person under `approvers:` checks it"
        )
    return _outside(by, approvers, tenant, f"run {run_id}")


def why_not_abort(
    by: str, approvers: Mapping[str, Approver], *, run_id: str, tenant: str
) -> str | None:
    """Say why `by` may not abort run `run_id` of `tenant`, or None when they may.

    Whoever may decide approval requests for the run's tenant may stop its
    runs. Unlike an answer to a step in doubt, the run's own principal and
    whom it acts for are not refused as such: stopping a run can only keep a
    call from happening, never make one. They may abort when they are
    approvers for the tenant too.
    """
    return _outside(by, approvers, tenant, f"run {run_id}")


def _outside(
    by: str, approvers: Mapping[str, Approver], tenant: str, subject: str
) -> str | None:
    """Say why `by` is no approver for `tenant`'s `subject`, or None when they are."""
    approver = approvers.get(by)
    if approver is None:
        return (
            f"{by} is not an approver: name them under `approvers:` in "
            "tether.yaml with their roles"
        )
    if approver.tenants and tenant not in approver.tenants:
        return (
            f"{by} decides for {', '.join(approver.tenants)}, not for tenant "
            f"{tenant} ({subject})"
        )
    return None
