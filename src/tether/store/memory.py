"""A store in process memory, for unit tests and for measuring the call path alone.

Nothing survives the process. Events are kept as objects and encoded, hashed
and chained only when read, so a call costs no encoding at all. The limit and
breaker rows are kept in `tether.store._memory_tables`.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from tether import _canonical, _chain
from tether.errors import (
    ApprovalClosed,
    HeadMoved,
    LeaseLost,
    NotFound,
    StoreError,
    UsageError,
)
from tether.store._base import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Committed,
    GrantGone,
    KeyId,
    KeyRecord,
    KeyState,
    KeyUpdate,
    LimitRow,
    NewRun,
    PendingExists,
    RunRow,
    Store,
    apply_limits,
    check_withdrawal,
    decision_refused,
    may_replace,
    not_abortable,
    resolved_meanwhile,
)
from tether.store._breakers import (
    BREAKER_RULE,
    BreakerRow,
    BreakerState,
    closed_by,
    closed_request,
)
from tether.store._limits import to_us
from tether.store._memory_tables import MemoryTables
from tether.store._sql import aborted_holds

if TYPE_CHECKING:
    from tether.record import Event

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Run:
    row: RunRow
    """The run's row, but for `lease_until` (renewed by every write: kept apart,
    as a new frozen row per write costs a tenth of a memory step)."""
    events: list[Event] = field(default_factory=list)
    lease_until: datetime | None = None

    def extend_lease(self, until: datetime | None) -> None:
        """Hold the run until `until` at least (a lease never moves back)."""
        if until is not None and (self.lease_until is None or self.lease_until < until):
            self.lease_until = until


class MemoryStore(Store):
    """Runs, records and keys in a dict; thread-safe, not shared between processes."""

    signs_heads = False

    def __init__(self) -> None:
        self.url = "memory://"
        self.record_key = None
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._keys: dict[KeyId, KeyRecord] = {}
        self._tables = MemoryTables()
        self._approvals: dict[str, ApprovalRow] = {}

    def commit(self, batch: Batch) -> Committed:
        """Apply `batch` under a lock: every check first, then every change."""
        with self._lock:
            run = self._runs.get(batch.run_id)
            if batch.new_run is not None:
                if run is not None:
                    raise StoreError(f"run {batch.run_id} exists already")
            elif run is None:
                raise NotFound(f"no run {batch.run_id!r} in memory")
            elif run.row.epoch != batch.epoch:
                raise LeaseLost(
                    f"run {batch.run_id} is held by lease epoch {run.row.epoch}"
                )
            elif len(run.events) != batch.base_seq:
                raise HeadMoved(f"run {batch.run_id}: the record moved; two writers")
            grant = None
            if batch.use_grant is not None:
                grant = self._approvals.get(batch.use_grant)
                if (
                    grant is None
                    or grant.status is not ApprovalStatus.APPROVED
                    or grant.expires_at <= batch.at
                ):
                    return Committed(
                        head_seq=batch.base_seq,
                        head_hash=batch.base_hash,
                        blocked=GrantGone(approval_id=batch.use_grant),
                    )
            claim = batch.claim
            existing = None
            if claim is not None:
                existing = self._keys.get(claim.id)
                if existing is not None and not may_replace(existing, claim):
                    return Committed(
                        head_seq=batch.base_seq,
                        head_hash=batch.base_hash,
                        conflict=existing,
                    )
            events = batch.events
            admitted = None
            if batch.limited:
                saved = self._tables.snapshot()
                events, admitted = apply_limits(self._tables, batch)
                if admitted.blocked is not None:
                    self._tables = saved
                    return Committed(
                        head_seq=batch.base_seq,
                        head_hash=batch.base_hash,
                        blocked=admitted.blocked,
                    )
            # -- nothing below can fail --
            closed = closed_by(self._tables, batch.breaker_outcome)
            if closed is not None:
                self._close_breaker_requests(closed, to_us(batch.at))
            if grant is not None:
                self._approvals[grant.id] = replace(grant, status=ApprovalStatus.USED)
            spent = self._approvals.get(batch.return_grant or "")
            if spent is not None and spent.status is ApprovalStatus.USED:
                # As `_sql.return_grant`: its run aborted, or its breaker closed.
                asker = self._runs.get(spent.run_id)
                aborted = asker is not None and asker.row.status == "aborted"
                (rule, *more) = spent.rule_ids or ("",)
                breaker = self._tables.breakers.get(rule.removeprefix(BREAKER_RULE))
                over = (
                    not more
                    and rule.startswith(BREAKER_RULE)
                    and breaker is not None
                    and (
                        breaker.state is BreakerState.CLOSED
                        or breaker.closed_at > to_us(spent.created_at)
                    )
                )
                self._approvals[spent.id] = replace(
                    spent,
                    status=ApprovalStatus.EXPIRED
                    if aborted or over
                    else ApprovalStatus.APPROVED,
                )
            if batch.approval is not None:
                new = batch.approval
                for a in list(self._approvals.values()):
                    if (a.tenant, a.principal_id, a.on_behalf_of, a.digest) != (
                        new.tenant,
                        new.principal_id,
                        new.on_behalf_of,
                        new.digest,
                    ) or a.status is not ApprovalStatus.PENDING:
                        continue
                    if a.expires_at > new.created_at:
                        pending = a.id
                        break
                    self._approvals[a.id] = replace(a, status=ApprovalStatus.EXPIRED)
                else:
                    pending = None
                if pending is not None:
                    return Committed(
                        head_seq=batch.base_seq,
                        head_hash=batch.base_hash,
                        blocked=PendingExists(approval_id=pending),
                    )
                self._approvals[new.id] = new
            if claim is not None:
                self._keys[claim.id] = KeyRecord(
                    state=KeyState.IN_PROGRESS,
                    fingerprint=claim.fingerprint,
                    run_id=claim.run_id,
                    step=claim.step,
                    output=None,
                    claimed_at=claim.now,
                    lease_until=claim.lease_until,
                    completed_at=None,
                )
            if run is None:
                assert batch.new_run is not None
                run = self._runs[batch.run_id] = _Run(_new_row(batch, batch.new_run))
            run.events.extend(events)
            if batch.status is not None or batch.error_code is not None:
                run.row = _replace_status(run.row, batch)
            run.extend_lease(batch.lease_until)
            if batch.key_update is not None:
                self._update_key(batch.key_update)
            return Committed(
                head_seq=len(run.events),
                head_hash=b"",
                took_over=existing,
                breaker_generation=None
                if admitted is None
                else admitted.breaker_generation,
                probe=admitted is not None and admitted.probe,
                probe_at=0 if admitted is None else admitted.probe_at,
            )

    def _update_key(self, u: KeyUpdate) -> None:
        old = self._keys.get(u.id)
        if old is not None and old.run_id == u.run_id and old.step == u.step:
            self._keys[u.id] = KeyRecord(
                state=u.state,
                fingerprint=old.fingerprint,
                run_id=old.run_id,
                step=old.step,
                output=u.output,
                claimed_at=old.claimed_at,
                lease_until=u.now if u.ends_claim else old.lease_until,
                completed_at=u.now,
            )

    def renew_lease(
        self,
        run_id: str,
        *,
        epoch: int,
        until: datetime,
        claim: tuple[KeyId, int] | None = None,
    ) -> bool:
        """Extend a live run's lease and its step's claim (see `Store.renew_lease`)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.row.epoch != epoch:
                return False
            run.extend_lease(until)
            if claim is not None:
                key, step = claim
                old = self._keys.get(key)
                if (
                    old is not None
                    and old.state is KeyState.IN_PROGRESS
                    and (old.run_id, old.step) == (run_id, step)
                    and old.lease_until < until
                ):
                    self._keys[key] = replace(old, lease_until=until)
            return True

    def take_over(
        self,
        run_id: str,
        *,
        parked: Sequence[str],
        orphaned: Sequence[str] = (),
        now: datetime | None = None,
        lease_until: datetime | None = None,
    ) -> RunRow:
        """Bump a parked or orphaned run's lease epoch (see `Store.take_over`)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r} in memory")
            row = run.row
            lapsed = now is not None and (
                run.lease_until is None or run.lease_until <= now
            )
            if not (row.status in parked or (row.status in orphaned and lapsed)):
                raise UsageError(
                    f"run {run_id} is {row.status}, not parked and not orphaned: only a "
                    "parked run, or one whose writer's lease ran out, can be resumed"
                )
            run.row = replace(row, epoch=row.epoch + 1)
            run.extend_lease(lease_until)
        return self.get_run(run_id)

    # -- approvals ----------------------------------------------------------------

    def latest_approval(
        self,
        tenant: str,
        principal_id: str,
        digest: bytes,
        rule_ids: tuple[str, ...],
        *,
        on_behalf_of: str | None,
    ) -> ApprovalRow | None:
        """Return the newest approval request for this call asked by these rules, if any."""
        call = (tenant, principal_id, on_behalf_of, digest, rule_ids)
        with self._lock:
            found = [
                a
                for a in self._approvals.values()
                if (a.tenant, a.principal_id, a.on_behalf_of, a.digest, a.rule_ids)
                == call
            ]
        return max(found, key=lambda a: (a.created_at, a.id), default=None)

    def get_approval(self, approval_id: str) -> ApprovalRow:
        """Return one approval request (a unique prefix of 6+ characters works too)."""
        with self._lock:
            row = self._approvals.get(approval_id)
            if row is None and len(approval_id) >= 6:
                found = [
                    a for i, a in self._approvals.items() if i.startswith(approval_id)
                ]
                row = found[0] if len(found) == 1 else None
        if row is None:
            raise NotFound(
                f"no approval request {approval_id!r}; see `tether approvals list`"
            )
        return row

    def list_approvals(
        self,
        *,
        status: ApprovalStatus | None = None,
        limit: int = 50,
        now: datetime | None = None,
        run_id: str | None = None,
    ) -> list[ApprovalRow]:
        """Return approval requests, newest first (see `Store.list_approvals`)."""

        def shown(a: ApprovalRow) -> ApprovalStatus:
            lapsed = now is not None and a.expires_at <= now
            if a.status is ApprovalStatus.PENDING and lapsed:
                return ApprovalStatus.EXPIRED
            return a.status

        with self._lock:
            rows = [
                a
                for a in self._approvals.values()
                if status in (None, shown(a)) and run_id in (None, a.run_id)
            ]
        rows.sort(key=lambda a: (a.created_at, a.id), reverse=True)
        return rows[:limit]

    def _close_breaker_requests(self, breaker_id: str, at: int) -> None:
        """Close the requests of a breaker this write closed (`_breakers.closing_requests`)."""
        for row in list(self._approvals.values()):
            closed = closed_request(row, breaker_id, at)
            if closed is not None:
                self._approvals[row.id] = closed

    def expire_approval(self, approval_id: str, now: datetime) -> bool:
        """Mark a pending request past its expiry `expired` (see `Store.expire_approval`)."""
        with self._lock:
            row = self._approvals.get(approval_id)
            if row is None or row.status is not ApprovalStatus.PENDING:
                return False
            if row.expires_at > now:
                return False
            self._approvals[approval_id] = replace(row, status=ApprovalStatus.EXPIRED)
            return True

    def decide_approval(
        self,
        approval_id: str,
        *,
        status: ApprovalStatus | None,
        by: str,
        note: str | None,
        now: datetime,
        event: Callable[[ApprovalRow, str | None], Event],
        withdraw: bool = False,
    ) -> ApprovalRow:
        """Decide a pending request and record the event in its run, atomically.

        With `withdraw`, close an approved, unspent request instead (see
        `Store.decide_approval`).
        """
        check_withdrawal(status, withdraw=withdraw)
        with self._lock:
            current = self._approvals.get(approval_id)
            if current is None:
                raise NotFound(f"no approval request {approval_id!r}")
            run = self._runs.get(current.run_id)
            if run is None:
                raise NotFound(f"no run {current.run_id!r}")
            refused = decision_refused(current, now, status, withdraw=withdraw)
            if status is not None and refused is None:
                current = self._approvals[approval_id] = replace(
                    current, status=status, decided_by=by, decided_at=now, note=note
                )
            run.events.append(event(current, refused))
        if refused is not None:
            raise ApprovalClosed(refused)
        return current

    def abort_run(
        self,
        run_id: str,
        *,
        abortable: Sequence[str],
        end: Callable[[RunRow, list[_chain.StoredEvent]], list[Event]],
        at: datetime,
    ) -> RunRow:
        """Take a run and end it `aborted`, atomically (see `Store.abort_run`)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r} in memory")
            stored = self._stored(run_id, run.events)
            row = self._row(run_id, run, stored)
            if row.status not in abortable:
                raise not_abortable(row)
            self._end_holds(run_id, row, at)
            run.events.extend(end(row, stored))
            run.row = replace(
                run.row,
                epoch=run.row.epoch + 1,
                status="aborted",
                error_code="aborted",
                updated_at=at,
            )
            return self._row(run_id, run, self._stored(run_id, run.events))

    def _end_holds(self, run_id: str, row: RunRow, at: datetime) -> None:
        """End an aborted run's limit holds (see `aborted_holds`), under the lock."""
        tables = self._tables
        holds = [
            (key[:3], key, amount, until, charged)
            for key, (amount, until, charged) in tables.holds_.items()
            if key[3] == run_id
        ]
        charges, drops = aborted_holds(holds, lease_until=row.lease_until, at=at)
        for (limit_id, scope, window), amount in charges.items():
            tables.add_to_counter(limit_id, scope, window, amount, to_us(at))
        for _group, key in drops:
            del tables.holds_[key]

    def resolve_step(
        self,
        run_id: str,
        *,
        step: int,
        seen_seq: int,
        key: KeyUpdate | None,
        event: Callable[[bool], Event],
        at: datetime,
    ) -> int:
        """Settle a step in doubt and record the answer, atomically (see `Store.resolve_step`)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r} in memory")
            if any(
                e.kind == "in_doubt_resolved" and e.step == step
                for e in run.events[seen_seq:]
            ):
                raise resolved_meanwhile(run_id, step)
            old = None if key is None else self._keys.get(key.id)
            settled = (
                key is not None
                and old is not None
                and old.state in (KeyState.IN_DOUBT, KeyState.IN_PROGRESS)
            )
            if settled:
                assert key is not None
                self._update_key(key)
                settled = self._keys[key.id] is not old  # still this step's
            run.events.append(event(settled))
            return len(run.events)

    def limit_rows(self, now: datetime) -> list[LimitRow]:
        """Return every limit counter and live lease set (for `tether status`)."""
        at = to_us(now)
        with self._lock:
            return self._tables.limit_rows(at)

    def breaker_row(self, breaker_id: str) -> BreakerRow:
        """Return one breaker's stored row (a closed one when it has none)."""
        with self._lock:
            return self._tables.breaker(breaker_id)

    def breaker_rows(self) -> dict[str, BreakerRow]:
        """Return every breaker's stored row, by id."""
        with self._lock:
            return dict(sorted(copy.deepcopy(self._tables.breakers).items()))

    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the record of `key`, if any."""
        return self._keys.get(key)

    def get_run(self, run_id: str) -> RunRow:
        """Return one run, with its chain head computed now."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None and len(run_id) >= 6:
                found = [rid for rid in self._runs if rid.startswith(run_id)]
                if len(found) == 1:
                    run_id = found[0]
                    run = self._runs[run_id]
            if run is None:
                raise NotFound(f"no run {run_id!r} in memory; see `tether runs list`")
            return self._row(run_id, run, self._stored(run_id, run.events))

    @staticmethod
    def _row(run_id: str, run: _Run, events: list[_chain.StoredEvent]) -> RunRow:
        """Return `run`'s row, its head from its `events` as stored."""
        head = events[-1].hash if events else _chain.genesis(run_id)
        r = run.row
        return RunRow(
            run_id=r.run_id,
            status=r.status,
            tenant=r.tenant,
            principal_id=r.principal_id,
            request=r.request,
            created_at=r.created_at,
            updated_at=r.updated_at,
            epoch=r.epoch,
            head_seq=len(events),
            head_hash=head,
            head_sig=None,
            error_code=r.error_code,
            lease_until=run.lease_until,
        )

    def list_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        after: RunRow | None = None,
        oldest_first: bool = False,
    ) -> list[RunRow]:
        """Return up to `limit` runs in `(created_at, run_id)` order, from after `after`.

        Newest first unless `oldest_first`; see `Store.list_runs`.
        """
        with self._lock:
            keys = sorted(
                (r.row.created_at, rid)
                for rid, r in self._runs.items()
                if status is None or r.row.status == status
            )
        if not oldest_first:
            keys.reverse()
        if after is not None:
            cursor = (after.created_at, after.run_id)
            keys = [k for k in keys if (k > cursor if oldest_first else k < cursor)]
        # Only the page's rows: each computes its chain head from its events.
        return [self.get_run(rid) for _, rid in keys[: max(limit, 0)]]

    def events(self, run_id: str) -> list[_chain.StoredEvent]:
        """Return a run's events, encoded and chained now."""
        with self._lock:
            run = self._runs.get(run_id)
            return [] if run is None else self._stored(run_id, run.events)

    @staticmethod
    def _stored(run_id: str, events: list[Event]) -> list[_chain.StoredEvent]:
        head = _chain.genesis(run_id)
        out = []
        for seq, event in enumerate(events, 1):
            body = _canonical.dumps_fields(event)
            head = _chain.chain_hash(head, seq, body)
            out.append(_chain.StoredEvent(seq=seq, body=body, hash=head))
        return out


def _new_row(batch: Batch, new: NewRun) -> RunRow:
    return RunRow(
        run_id=batch.run_id,
        status=new.status,
        tenant=new.tenant,
        principal_id=new.principal_id,
        request=new.request,
        created_at=new.created_at,
        updated_at=batch.at,
        epoch=batch.epoch,
        head_seq=0,
        head_hash=batch.base_hash,
        head_sig=None,
        error_code=None,
    )


def _replace_status(row: RunRow, batch: Batch) -> RunRow:
    return RunRow(
        run_id=row.run_id,
        status=batch.status or row.status,
        tenant=row.tenant,
        principal_id=row.principal_id,
        request=row.request,
        created_at=row.created_at,
        updated_at=batch.at,
        epoch=row.epoch,
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        error_code=batch.error_code or row.error_code,
    )
