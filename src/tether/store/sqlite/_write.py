"""The writes of a SQLite store: a batch, in one `BEGIN IMMEDIATE` transaction.

The file lock makes the transaction the only writer, so every check is exact
as it runs: the idempotency claim, the grant, a pending approval request, the
limit and breaker rules (on `Tables`), then the run's fence and its events.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime

from tether import _canonical, _chain
from tether.errors import NotFound, StoreError
from tether.store import _limits
from tether.store._base import (
    ApprovalRow,
    Batch,
    Claim,
    Committed,
    GrantGone,
    KeyId,
    KeyRecord,
    KeyState,
    PendingExists,
    apply_limits,
    may_replace,
)
from tether.store._breakers import closed_by, closing_requests
from tether.store._sql import (
    APPROVAL_COLUMNS,
    RUN_COLUMNS,
    KeyConflict,
    Refused,
    WriteBlocked,
    approval_values,
    fence_error,
    key_record,
    key_update,
    return_grant,
)
from tether.store.sqlite._connection import Connected, rollback
from tether.store.sqlite._tables import Tables

__all__ = ["Writes", "read_key"]


def _ts(value: datetime) -> str:
    return value.isoformat()


# Key and limit timestamps are integers (microseconds since the epoch): a key is
# claimed and settled on every keyed step, and formatting text costs more.
_us = _limits.to_us


class Writes(Connected):
    """The writes of `SQLiteStore`: `commit`, and the checks it makes."""

    def commit(self, batch: Batch) -> Committed:
        """Write `batch` in one transaction (one fsync with `synchronous=full`)."""
        # The transaction is spelled out rather than taken from `_write()`: a
        # generator-based context manager costs a microsecond per step.
        try:
            with self._lock:
                con = self._con
                con.execute("BEGIN IMMEDIATE")  # see Connected._write
                try:
                    committed = self._commit(con, batch)
                    con.execute("COMMIT")
                except BaseException:
                    rollback(con)
                    raise
                return committed
        except Refused as refused:
            return refused.answer(batch)
        except sqlite3.Error as exc:
            if batch.new_run is not None:
                self._pks.pop(batch.run_id, None)  # its creation was rolled back
            raise StoreError(
                f"cannot write run {batch.run_id} to {str(self.path)!r}: {exc}"
            ) from exc

    def _commit(self, con: sqlite3.Connection, batch: Batch) -> Committed:
        took_over = None
        if batch.claim is not None:
            took_over = self._claim(con, batch.claim)
        if batch.use_grant is not None:
            cur = con.execute(
                "UPDATE approvals SET status='used' WHERE id=? AND status='approved' "
                "AND expires_at > ?",
                (batch.use_grant, _us(batch.at)),
            )
            if cur.rowcount != 1:
                raise WriteBlocked(GrantGone(approval_id=batch.use_grant))
        if batch.return_grant is not None:
            con.execute(*return_grant("?", batch.return_grant))
        if batch.approval is not None:
            pending = _coalesce(con, batch.approval)
            if pending is not None:
                raise WriteBlocked(PendingExists(approval_id=pending))
            _insert_approval(con, batch.approval)
        events = batch.events
        admitted = None
        if batch.limited:
            tables = Tables(con)
            events, admitted = apply_limits(tables, batch)
            if admitted.blocked is not None:
                raise WriteBlocked(admitted.blocked)
            closed = closed_by(tables, batch.breaker_outcome)
            if closed is not None:
                con.execute(*closing_requests("?", closed, _us(batch.at)))
        # A run this store wrote has its key cached; a new run's comes with its insert.
        pk = 0 if batch.new_run is not None else self._pks.get(batch.run_id)
        if pk is None:
            pk = self._pk(con, batch.run_id)
        seq, head = batch.base_seq, batch.base_hash
        rows = []
        for event in events:
            seq += 1
            body = _canonical.dumps_fields(event)
            head = _chain.chain_hash(head, seq, body)
            rows.append([pk, seq, event.kind, event.step, body, head])
        sig = (
            None
            if self.record_key is None
            else self._mac(self.record_key).head(batch.run_id, seq, head)
        )
        # updated_at is when the status last changed: steps leave it (and the
        # cost of formatting a timestamp) alone.
        now = None if batch.status is None else _ts(batch.at)
        lease = 0 if batch.lease_until is None else _us(batch.lease_until)
        if batch.new_run is not None:
            new = batch.new_run
            pk = con.execute(
                f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608  # constant column list
                (
                    batch.run_id,
                    new.status,
                    new.tenant,
                    new.principal_id,
                    new.request,
                    _ts(new.created_at),
                    _ts(batch.at),
                    batch.epoch,
                    seq,
                    head,
                    sig,
                    None,
                    lease,
                ),
            ).lastrowid
            assert isinstance(pk, int)
            for row in rows:
                row[0] = pk
        elif now is None:  # a step: the head moves, nothing else (a simpler statement)
            cur = con.execute(
                "UPDATE runs SET head_seq=?, head_hash=?, head_sig=?, "
                "lease_until=MAX(lease_until, ?) WHERE id=? AND epoch=? AND head_seq=?",
                (seq, head, sig, lease, pk, batch.epoch, batch.base_seq),
            )
            if cur.rowcount != 1:
                self._fence_failure(con, batch)
        else:
            cur = con.execute(
                "UPDATE runs SET head_seq=?, head_hash=?, head_sig=?, updated_at=?, "
                "status=?, error_code=COALESCE(?, error_code), "
                "lease_until=MAX(lease_until, ?) WHERE id=? AND epoch=? AND head_seq=?",
                (
                    seq,
                    head,
                    sig,
                    now,
                    batch.status,
                    batch.error_code,
                    lease,
                    pk,
                    batch.epoch,
                    batch.base_seq,
                ),
            )
            if cur.rowcount != 1:
                self._fence_failure(con, batch)
        con.executemany(
            "INSERT INTO events (run, seq, kind, step, body, hash) VALUES (?,?,?,?,?,?)",
            rows,
        )
        self._pks[batch.run_id] = pk
        if batch.key_update is not None:
            con.execute(*key_update("?", batch.key_update))
        if admitted is None:
            return Committed(head_seq=seq, head_hash=head, took_over=took_over)
        return Committed(
            head_seq=seq,
            head_hash=head,
            took_over=took_over,
            breaker_generation=admitted.breaker_generation,
            probe=admitted.probe,
            probe_at=admitted.probe_at,
        )

    def _mac(self, key: bytes) -> _chain.Mac:
        # record_key may be set after opening (Tether does); build the pads once per key.
        mac = self._macs.get(key)
        if mac is None:
            mac = self._macs[key] = _chain.Mac(key)
        return mac

    def _pk(self, con: sqlite3.Connection, run_id: str) -> int:
        row = con.execute("SELECT id FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"no run {run_id!r} in {str(self.path)!r}")
        return int(row[0])

    def _fence_failure(self, con: sqlite3.Connection, batch: Batch) -> None:
        row = con.execute(
            "SELECT epoch, head_seq FROM runs WHERE run_id=?", (batch.run_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no run {batch.run_id!r} in {str(self.path)!r}")
        epoch, head_seq = row
        raise fence_error(batch, epoch, head_seq)

    def _claim(self, con: sqlite3.Connection, claim: Claim) -> KeyRecord | None:
        k = claim.id
        where = (k.tenant, k.principal_id, k.capability, k.key)
        # Insert first: a new key (the common case) costs one statement, and the
        # existing record is read only when there is one.
        inserted = con.execute(
            "INSERT INTO idempotency_keys (tenant, principal_id, capability, key, "
            "fingerprint, state, run_id, step, claimed_at, lease_until) "
            "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (
                *where,
                claim.fingerprint,
                KeyState.IN_PROGRESS.value,
                claim.run_id,
                claim.step,
                _us(claim.now),
                _us(claim.lease_until),
            ),
        ).rowcount
        if inserted:
            return None
        existing = read_key(con, k)
        assert existing is not None  # the insert conflicted inside this transaction
        if not may_replace(existing, claim):
            raise KeyConflict(existing)
        con.execute(
            "UPDATE idempotency_keys SET fingerprint=?, state=?, run_id=?, step=?, "
            "output=NULL, claimed_at=?, lease_until=?, completed_at=NULL "
            "WHERE tenant=? AND principal_id=? AND capability=? AND key=?",
            (
                claim.fingerprint,
                KeyState.IN_PROGRESS.value,
                claim.run_id,
                claim.step,
                _us(claim.now),
                _us(claim.lease_until),
                *where,
            ),
        )
        return existing


def read_key(con: sqlite3.Connection, k: KeyId) -> KeyRecord | None:
    """Read the record of key `k`, if any."""
    row = con.execute(
        "SELECT state, fingerprint, run_id, step, output, claimed_at, lease_until, "
        "completed_at FROM idempotency_keys "
        "WHERE tenant=? AND principal_id=? AND capability=? AND key=?",
        (k.tenant, k.principal_id, k.capability, k.key),
    ).fetchone()
    if row is None:
        return None
    return key_record(row)


def _coalesce(con: sqlite3.Connection, a: ApprovalRow) -> str | None:
    """Return a live pending request for the same call; mark lapsed ones expired.

    The same call is the principal's, for the same person (NULL, for nobody,
    matches NULL): a request made for another person is never waited on.
    """
    key = (a.tenant, a.principal_id, a.digest, a.on_behalf_of)
    row = con.execute(
        "SELECT id FROM approvals WHERE tenant=? AND principal_id=? AND digest=? "
        "AND on_behalf_of IS ? AND status='pending' AND expires_at > ? LIMIT 1",
        (*key, _us(a.created_at)),
    ).fetchone()
    if row is not None:
        return str(row[0])
    con.execute(
        "UPDATE approvals SET status='expired' WHERE tenant=? AND principal_id=? "
        "AND digest=? AND on_behalf_of IS ? AND status='pending' AND expires_at <= ?",
        (*key, _us(a.created_at)),
    )
    return None


def _insert_approval(con: sqlite3.Connection, a: ApprovalRow) -> None:
    con.execute(
        f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES "  # noqa: S608  # constant column list
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        approval_values(a),
    )
