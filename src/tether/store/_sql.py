"""What the two SQL backends share: columns, row codecs, two queries, refusals.

`tether.store.sqlite` and `tether.store.postgres` keep the same tables, and
each writes its own SQL (placeholders and dialects differ). What is the same in
both is here: the column lists; the values a row is written with, and the
decoding of a row read back, from either driver (a limit amount is text in
SQLite and `numeric` in PostgreSQL; a run's timestamps are ISO text in SQLite
and `timestamptz` in PostgreSQL, and the caller decodes them); the listing
queries, which differ only in their placeholder; how a commit refuses a
batch or reports a failed fence; and what an abort does to its run's limit
holds (`aborted_holds`, which the memory store applies too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from tether import _canonical
from tether.errors import HeadMoved, LeaseLost, NotFound, UsageError
from tether.store import _limits
from tether.store._base import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Committed,
    GrantGone,
    KeyRecord,
    KeyState,
    KeyUpdate,
    LimitRow,
    PendingExists,
    RunRow,
)
from tether.store._breakers import BREAKER_RULE, BreakerRow, BreakerState

__all__ = [
    "APPROVAL_COLUMNS",
    "RUN_COLUMNS",
    "KeyConflict",
    "Refused",
    "WriteBlocked",
    "aborted_holds",
    "answered_since",
    "approval_row",
    "approval_values",
    "approvals_query",
    "breaker_row",
    "breaker_values",
    "events_of",
    "fence_error",
    "key_record",
    "key_settle",
    "key_update",
    "limit_summary",
    "not_one",
    "not_resumable",
    "return_grant",
    "run_row",
    "runs_page",
    "text_list",
]

_us = _limits.to_us
_from_us = _limits.from_us

RUN_COLUMNS = (
    "run_id, status, tenant, principal_id, request, created_at, updated_at, "
    "epoch, head_seq, head_hash, head_sig, error_code, lease_until"
)
APPROVAL_COLUMNS = (
    "id, run_id, step, tenant, principal_id, on_behalf_of, capability, version, args, "
    "preview, digest, policy_version, rule_ids, reasons, approvers, status, created_at, "
    "expires_at, decided_by, decided_at, note"
)
_NOTHING = (Decimal(0), Decimal(0), 0)

H = TypeVar("H")
"""A hold's key in one backend's rows (its `holder` text, or the memory store's tuple)."""


class Refused(Exception):  # control flow, never escapes a backend's commit: rolls back
    """The batch is answered without being written."""

    def answer(self, batch: Batch) -> Committed:
        """Return what `commit` says: nothing written, the head where it was."""
        raise NotImplementedError


class KeyConflict(Refused):
    """The batch's idempotency key is held by a record it may not replace."""

    def __init__(self, existing: KeyRecord) -> None:
        self.record = existing

    def answer(self, batch: Batch) -> Committed:
        return Committed(
            head_seq=batch.base_seq, head_hash=batch.base_hash, conflict=self.record
        )


class WriteBlocked(Refused):
    """A limit, a breaker, a spent grant or a pending request holds the batch back."""

    def __init__(self, why: _limits.Blocked | GrantGone | PendingExists) -> None:
        self.why = why

    def answer(self, batch: Batch) -> Committed:
        return Committed(
            head_seq=batch.base_seq, head_hash=batch.base_hash, blocked=self.why
        )


def fence_error(batch: Batch, epoch: int, head_seq: int) -> LeaseLost | HeadMoved:
    """Return why `batch`'s fence failed on a run now at `epoch` and `head_seq`."""
    if epoch != batch.epoch:
        return LeaseLost(
            f"run {batch.run_id} is held by lease epoch {epoch}, not {batch.epoch}; "
            "this worker's writes are refused"
        )
    return HeadMoved(
        f"run {batch.run_id}: the record moved to event {head_seq} while this "
        f"writer expected {batch.base_seq}; two writers hold the run"
    )


def aborted_holds(
    holds: Iterable[tuple[tuple[str, str, int], H, Decimal, int, bool]],
    *,
    lease_until: datetime | None,
    at: datetime,
) -> tuple[dict[tuple[str, str, int], Decimal], list[tuple[tuple[str, str, int], H]]]:
    """Say what `Store.abort_run` does to its run's limit holds, in its transaction.

    Args:
        holds: each hold of the run as `(group, holder, amount, until,
            charged)`, a group being `(limit_id, scope, window)`.
        lease_until: the run's lease as the abort found it (None: never set).
        at: when the run is aborted.

    Returns:
        What each group's counter gains, and the holds to drop.

    Nothing of an aborted run settles any more (its writer is fenced), so its
    holds end here rather than wait out their TTL. A hold is only ever written
    together with its step's intent: it belongs to a call that started and
    whose outcome the abort records as unknown (`in_doubt`), or to a timed-out
    call whose thread may still run. So:

    - A budget's hold (`charged`) is charged at its reservation, as the call
      path settles a call in doubt and as a lapsed hold is charged: the call
      may have spent it upstream, and giving it back could let the budget be
      overspent. It leaves the holds at once, counted as spent.
    - A concurrency lease is freed at once only if no live process can still
      be in the call: the run's lease had run out (its holder stopped
      renewing it; the same test a take-over, and `runs resolve --not-acted`
      through the key claim, rely on). Else a live process may still be
      running the handler: the abort fences its record, not its upstream, and
      freeing the slot now would let `max` + 1 calls run there, which is what
      the limit forbids. The lease then stays until its own TTL, which is
      never shorter than the capability's timeout. This is the trade-off: a
      stuck run's slot comes back within its TTL, not at once.
    """
    writer_gone = lease_until is None or lease_until <= at
    now = _us(at)
    charges: dict[tuple[str, str, int], Decimal] = {}
    drops: list[tuple[tuple[str, str, int], H]] = []
    for group, holder, amount, until, charged in holds:
        if charged:
            charges[group] = charges.get(group, Decimal(0)) + amount
        elif not writer_gone and until > now:
            continue  # its handler may still run: it keeps its slot (see above)
        drops.append((group, holder))
    return charges, drops


def not_one(
    rows: Sequence[object], what: str, given: str, where: str, listing: str
) -> NotFound:
    """Say why a look-up of `what` by id or prefix found `rows`, not one.

    None: no such `what` (or a prefix too short to look by). Several: the
    prefix is ambiguous, which is not the same as missing (a longer prefix
    finds it). The look-up reads at most two rows, so it cannot say how many.
    """
    if rows:
        return NotFound(
            f"{what} id prefix {given!r} is ambiguous{where}: it matches more "
            f"than one; give more of it (see `{listing}`)"
        )
    if len(given) < MIN_PREFIX:
        return NotFound(
            f"no {what} {given!r}{where}; an id prefix needs at least "
            f"{MIN_PREFIX} characters (see `{listing}`)"
        )
    return NotFound(f"no {what} {given!r}{where}; see `{listing}`")


MIN_PREFIX = 6
"""The shortest id prefix a look-up by prefix takes."""


def not_resumable(now_row: RunRow) -> UsageError:
    """Return why `take_over` refused a run (`now_row`: the run as it is now)."""
    return UsageError(
        f"run {now_row.run_id} is {now_row.status} (epoch {now_row.epoch}), not parked "
        "and not orphaned: only a parked run, or one whose writer's lease ran "
        "out, can be resumed"
    )


def limit_summary(rows: Iterable[Sequence[Any]], at: int) -> list[LimitRow]:
    """Fold `limit_state` rows (but the `~` ones), in key order, into `LimitRow`s."""
    summed: dict[tuple[str, str, int], tuple[Decimal, Decimal, int]] = {}
    for lid, scope, window, holder, amount, until, charged in rows:
        if holder != "" and until <= at and not charged:
            continue  # a lapsed lease: gone
        used, held, count = summed.get((lid, scope, window), _NOTHING)
        if holder == "":
            used += Decimal(amount)
        elif until > at:
            held, count = held + Decimal(amount), count + 1
        elif charged:  # lapsed and spent: folded in at the next reservation
            used += Decimal(amount)
        summed[(lid, scope, window)] = (used, held, count)
    return [
        LimitRow(
            limit_id=lid,
            scope=scope,
            window=_from_us(window) if window else None,
            used=used,
            held=held,
            holds=count,
        )
        for (lid, scope, window), (used, held, count) in summed.items()
    ]


def key_update(mark: str, u: KeyUpdate) -> tuple[str, tuple[object, ...]]:
    """Return the statement that records a claimed key's outcome; `mark` is the placeholder."""
    return _KEY_UPDATE[mark], (
        u.state.value,
        u.output,
        _us(u.now),
        _us(u.now) if u.ends_claim else None,
        u.id.tenant,
        u.id.principal_id,
        u.id.capability,
        u.id.key,
        u.run_id,
        u.step,
    )


def key_settle(mark: str, u: KeyUpdate) -> tuple[str, tuple[object, ...]]:
    """Return the statement that settles a step's key while it is still open.

    As `key_update`, but only a key still `in_doubt` or `in_progress`: a
    person's answer to a step in doubt (`Store.resolve_step`) must not settle
    a key a later call has finished since.
    """
    sql, params = key_update(mark, u)
    return f"{sql} AND state IN ('in_doubt', 'in_progress')", params


def answered_since(mark: str) -> str:
    """Return the query for an answer to a step recorded after a seq (run pk, seq, step)."""
    return (
        f"SELECT 1 FROM events WHERE run={mark} AND seq>{mark} AND "  # noqa: S608  # placeholders only
        f"kind='in_doubt_resolved' AND step={mark} LIMIT 1"
    )


def events_of(mark: str) -> str:
    """Return the query for a run's stored events in order (seq, body, hash), by run id."""
    return (
        "SELECT e.seq, e.body, e.hash FROM events e JOIN runs r ON r.id = e.run "  # noqa: S608  # a placeholder only
        f"WHERE r.run_id={mark} ORDER BY e.seq"
    )


def return_grant(mark: str, approval_id: str) -> tuple[str, tuple[object, ...]]:
    """Return the statement that gives a spent request back (see `Batch.return_grant`).

    A request whose run was aborted comes back `expired`, not approved: the
    abort withdrew its run's unspent grants, and this one was only spared
    because a step was spending it then. So does an escalating breaker's
    request once the outage it was made in is over: the breaker's closing
    withdrew that outage's unspent grants (`_breakers.closing_requests`). The
    breaker has closed since the request was made, whether it is closed now
    or open again in another outage (`closed_at`; a row from before that
    column says only whether it is closed now). On PostgreSQL, a closing that
    commits while this statement runs is not seen by it (a statement reads as
    of its start): the grant then comes back approved. Rare: it takes a
    given-back grant and a trial call's closing in the same instant.
    """
    return (
        "UPDATE approvals SET status=CASE WHEN EXISTS (SELECT 1 FROM runs WHERE "  # noqa: S608  # a placeholder only
        "runs.run_id=approvals.run_id AND runs.status='aborted') OR EXISTS "
        "(SELECT 1 FROM breakers b WHERE (b.state='closed' OR b.closed_at > "
        f"approvals.created_at) AND approvals.rule_ids='[\"{BREAKER_RULE}' || b.id "
        "|| '\"]') THEN 'expired' "
        f"ELSE 'approved' END WHERE id={mark} AND status='used'",
        (approval_id,),
    )


_KEY_UPDATE = {
    mark: (
        f"UPDATE idempotency_keys SET state={mark}, output={mark}, completed_at={mark}, "  # noqa: S608  # placeholders only
        f"lease_until=COALESCE({mark}, lease_until) "
        f"WHERE tenant={mark} AND principal_id={mark} AND capability={mark} "
        f"AND key={mark} AND run_id={mark} AND step={mark}"
    )
    for mark in ("?", "%s")  # SQLite's and psycopg's placeholders
}


def runs_page(
    mark: str,
    *,
    status: str | None,
    after: tuple[object, str] | None,
    oldest_first: bool,
    limit: int,
) -> tuple[str, tuple[object, ...]]:
    """Return `list_runs`' query and parameters: a keyset page, in index order.

    `mark` is the placeholder; `after` is the previous page's last row as
    `(created_at as the backend stores it, run_id)`. Each page is one range of
    `runs_by_status` (or `runs_by_created`), however deep it starts.
    """
    where = []
    params: list[object] = []
    if status is not None:
        where.append(f"status={mark}")
        params.append(status)
    if after is not None:
        where.append(
            f"(created_at, run_id) {'>' if oldest_first else '<'} ({mark}, {mark})"
        )
        params += after
    way = "ASC" if oldest_first else "DESC"
    sql = (
        f"SELECT {RUN_COLUMNS} FROM runs"  # noqa: S608  # constant columns and clauses
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY created_at {way}, run_id {way} LIMIT {mark}"
    )
    return sql, (*params, limit)


def approvals_query(
    mark: str,
    *,
    status: ApprovalStatus | None,
    now: datetime | None,
    run_id: str | None,
    limit: int,
) -> tuple[str, tuple[object, ...]]:
    """Return `list_approvals`' query and parameters; `mark` is the placeholder."""
    sql = f"SELECT {APPROVAL_COLUMNS} FROM approvals"  # noqa: S608  # constant column list
    params: tuple[object, ...] = ()
    at = None if now is None else _us(now)
    if status is ApprovalStatus.PENDING and at is not None:
        sql += f" WHERE status='pending' AND expires_at > {mark}"
        params = (at,)
    elif status is ApprovalStatus.EXPIRED and at is not None:
        sql += (
            f" WHERE (status='expired' OR (status='pending' AND expires_at <= {mark}))"
        )
        params = (at,)
    elif status is not None:
        sql += f" WHERE status={mark}"
        params = (status.value,)
    if run_id is not None:
        sql += (" AND" if params else " WHERE") + f" run_id={mark}"
        params = (*params, run_id)
    sql += f" ORDER BY created_at DESC, id DESC LIMIT {mark}"
    return sql, (*params, limit)


def text_list(values: tuple[str, ...]) -> str:
    """Return how an `approvals` row stores a list of names (its lookups compare it)."""
    return _canonical.dumps(list(values)).decode()


def approval_values(a: ApprovalRow) -> tuple[object, ...]:
    """Return the values of an `approvals` row, in `APPROVAL_COLUMNS` order."""
    return (
        a.id,
        a.run_id,
        a.step,
        a.tenant,
        a.principal_id,
        a.on_behalf_of,
        a.capability,
        a.version,
        a.args,
        a.preview,
        a.digest,
        a.policy_version,
        text_list(a.rule_ids),
        text_list(a.reasons),
        text_list(a.approvers),
        a.status.value,
        _us(a.created_at),
        _us(a.expires_at),
        a.decided_by,
        None if a.decided_at is None else _us(a.decided_at),
        a.note,
    )


def approval_row(row: Sequence[Any]) -> ApprovalRow:
    """Decode an `approvals` row read in `APPROVAL_COLUMNS` order."""
    (
        id_, run_id, step, tenant, principal_id, on_behalf_of, capability, version,
        args, preview, digest, policy_version, rule_ids, reasons, approvers, status,
        created_at, expires_at, decided_by, decided_at, note,
    ) = row  # fmt: skip
    return ApprovalRow(
        id=id_,
        run_id=run_id,
        step=step,
        tenant=tenant,
        principal_id=principal_id,
        on_behalf_of=on_behalf_of,
        capability=capability,
        version=version,
        args=bytes(args),
        preview=None if preview is None else bytes(preview),
        digest=bytes(digest),
        policy_version=policy_version,
        rule_ids=tuple(_canonical.loads(rule_ids)),
        reasons=tuple(_canonical.loads(reasons)),
        approvers=tuple(_canonical.loads(approvers)),
        status=ApprovalStatus(status),
        created_at=_from_us(created_at),
        expires_at=_from_us(expires_at),
        decided_by=decided_by,
        decided_at=None if decided_at is None else _from_us(decided_at),
        note=note,
    )


def breaker_row(row: Sequence[Any]) -> BreakerRow:
    """Decode a `breakers` row without its id (state, since, ..., probe_deadline)."""
    state, since, generation, outcomes, probes, deadline = row
    return BreakerRow(
        state=BreakerState(state),
        since=since,
        generation=generation,
        outcomes=outcomes,
        probes=probes,
        probe_deadline=deadline,
    )


def breaker_values(breaker_id: str, row: BreakerRow) -> tuple[object, ...]:
    """Return the values of a `breakers` row: id, state, ..., probe_deadline."""
    return (
        breaker_id,
        row.state.value,
        row.since,
        row.generation,
        row.outcomes,
        row.probes,
        row.probe_deadline,
    )


def key_record(row: Sequence[Any]) -> KeyRecord:
    """Decode an `idempotency_keys` row: state, fingerprint, ..., completed_at."""
    state, fp, run_id, step, output, claimed, lease, completed = row
    return KeyRecord(
        state=KeyState(state),
        fingerprint=bytes(fp),
        run_id=run_id,
        step=step,
        output=None if output is None else bytes(output),
        claimed_at=_from_us(claimed),
        lease_until=_from_us(lease),
        completed_at=None if completed is None else _from_us(completed),
    )


def run_row(row: Sequence[Any], timestamp: Callable[[Any], datetime]) -> RunRow:
    """Decode a `runs` row read in `RUN_COLUMNS` order; `timestamp` reads its times."""
    (
        run_id,
        status,
        tenant,
        principal_id,
        request,
        created,
        updated,
        epoch,
        head_seq,
        head_hash,
        head_sig,
        error_code,
        lease_until,
    ) = row
    return RunRow(
        run_id=run_id,
        status=status,
        tenant=tenant,
        principal_id=principal_id,
        request=request,
        created_at=timestamp(created),
        updated_at=timestamp(updated),
        epoch=epoch,
        head_seq=head_seq,
        head_hash=bytes(head_hash),
        head_sig=None if head_sig is None else bytes(head_sig),
        error_code=error_code,
        lease_until=_from_us(lease_until) if lease_until else None,
    )
