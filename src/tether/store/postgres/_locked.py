"""The locked path of a PostgreSQL write: its locks and reads, before its statement.

A batch with limits, breakers or an approval request (or one the one statement
could not settle) first takes its advisory locks and reads what its checks
need, pipelined in one round trip; then claims, grants and pending requests
are decided here, exactly, under those locks, and a new request is inserted. An idempotency key's record is
read here too (`read_key`), locked when a claim finds it taken.
"""

from __future__ import annotations

from typing import Any

import psycopg

from tether.store import _limits
from tether.store._base import (
    ApprovalRow,
    Batch,
    Claim,
    GrantGone,
    KeyId,
    KeyRecord,
    KeyState,
    PendingExists,
    may_replace,
)
from tether.store._sql import (
    APPROVAL_COLUMNS,
    KeyConflict,
    WriteBlocked,
    approval_values,
    key_record,
)
from tether.store.postgres._connection import lock_key
from tether.store.postgres._pipeline import Writer
from tether.store.postgres._tables import (
    SELECT_BREAKER,
    SELECT_GROUP,
    Tables,
    limit_keys,
)

__all__ = ["locked_reads", "read_key"]

_us = _limits.to_us


def locked_reads(
    w: Writer, batch: Batch, schema: str
) -> tuple[Tables | None, KeyRecord | None]:
    """Take the batch's locks and read what its checks need, in one round trip.

    Runs the claim, the grant and the approval check in SQLite's order, so a
    batch refused for two reasons is refused for the same one everywhere.
    """
    w.execute("BEGIN")
    claimed = None
    if batch.claim is not None:
        claimed = _claim_insert(w, batch.claim)
    groups, breakers = limit_keys(batch) if batch.limited else ((), ())
    keys = [lock_key(schema, "limit", *map(str, g)) for g in groups]
    keys += [lock_key(schema, "breaker", b) for b in breakers]
    a = batch.approval
    if a is not None:
        keys.append(
            lock_key(schema, "approval", a.tenant, a.principal_id, a.digest.hex())
        )
    # One simple statement per lock and per read: the server runs the
    # pipelined statements in order, so the locks are taken sorted (no
    # deadlock between two batches), and each read's snapshot is taken
    # after every lock is held. (An unnest() of them all costs the server
    # two to three times more.)
    for key in sorted(set(keys)):
        w.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
    # The grant's row is locked after the advisory locks, in the order of every
    # writer that takes both: a breaker's closing and an abort take their
    # limit and breaker locks, then update requests (a grant row locked first
    # could deadlock with them). Its answer is still read before the others'.
    grant = None
    if batch.use_grant is not None:
        grant = w.execute(
            "UPDATE approvals SET status='used' WHERE id=%s AND status='approved' "
            "AND expires_at > %s RETURNING 1",
            (batch.use_grant, _us(batch.at)),
        )
    limit_rows = [w.execute(SELECT_GROUP, g) for g in groups]
    breaker_rows = [w.execute(SELECT_BREAKER, (b,)) for b in breakers]
    pending = None
    if a is not None:
        pending = w.execute(
            "SELECT id FROM approvals WHERE tenant=%s AND principal_id=%s AND "
            "digest=%s AND on_behalf_of IS NOT DISTINCT FROM %s AND "
            "status='pending' AND expires_at > %s LIMIT 1",
            (a.tenant, a.principal_id, a.digest, a.on_behalf_of, _us(a.created_at)),
        )
    failed = w.sync()
    if failed is not None:
        raise failed
    took_over = None
    if batch.claim is not None:
        assert claimed is not None
        if claimed.fetchone() is None:
            took_over = _claim_taken(w, batch.claim)
    if grant is not None and grant.fetchone() is None:
        assert batch.use_grant is not None
        raise WriteBlocked(GrantGone(approval_id=batch.use_grant))
    if a is not None:
        assert pending is not None
        found = pending.fetchone()
        if found is not None:
            raise WriteBlocked(PendingExists(approval_id=str(found[0])))
        w.execute(
            "UPDATE approvals SET status='expired' WHERE tenant=%s AND "
            "principal_id=%s AND digest=%s AND on_behalf_of IS NOT DISTINCT FROM %s "
            "AND status='pending' AND expires_at <= %s",
            (a.tenant, a.principal_id, a.digest, a.on_behalf_of, _us(a.created_at)),
        )
        _insert_approval(w, a)
    if not batch.limited:
        return None, took_over
    tables = Tables(schema, w)
    tables.top = max(keys, default=None)  # a late lock keeps to the order above
    for g in groups:
        tables.groups[g] = {}
    for b in breakers:
        tables.breakers[b] = None
    for cur in limit_rows:
        tables.load_limits(cur.fetchall())
    for cur in breaker_rows:
        tables.load_breakers(cur.fetchall())
    return tables, took_over


def _claim_insert(w: Writer, claim: Claim) -> psycopg.Cursor[Any]:
    """Queue the claim's insert; its cursor has a row if the key was free."""
    k = claim.id
    return w.execute(
        "INSERT INTO idempotency_keys (tenant, principal_id, capability, key, "
        "fingerprint, state, run_id, step, claimed_at, lease_until) "
        "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING 1",
        (
            k.tenant,
            k.principal_id,
            k.capability,
            k.key,
            claim.fingerprint,
            KeyState.IN_PROGRESS.value,
            claim.run_id,
            claim.step,
            _us(claim.now),
            _us(claim.lease_until),
        ),
    )


def _claim_taken(w: Writer, claim: Claim) -> KeyRecord:
    """Decide a claim whose key has a record: take it over, or conflict."""
    existing = read_key(w.conn, claim.id, lock=True)
    assert existing is not None  # keys are never deleted
    if not may_replace(existing, claim):
        raise KeyConflict(existing)
    k = claim.id
    w.execute(
        "UPDATE idempotency_keys SET fingerprint=%s, state=%s, run_id=%s, step=%s, "
        "output=NULL, claimed_at=%s, lease_until=%s, completed_at=NULL "
        "WHERE tenant=%s AND principal_id=%s AND capability=%s AND key=%s",
        (
            claim.fingerprint,
            KeyState.IN_PROGRESS.value,
            claim.run_id,
            claim.step,
            _us(claim.now),
            _us(claim.lease_until),
            k.tenant,
            k.principal_id,
            k.capability,
            k.key,
        ),
    )
    return existing


def _insert_approval(w: Writer, a: ApprovalRow) -> None:
    w.execute(
        f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES "  # noqa: S608  # constant column list
        "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
        approval_values(a),
    )


_KEY_RECORD = (
    "SELECT state, fingerprint, run_id, step, output, claimed_at, lease_until, "
    "completed_at FROM idempotency_keys "
    "WHERE tenant=%s AND principal_id=%s AND capability=%s AND key=%s"
)
_LOCK_KEY_RECORD = _KEY_RECORD + " FOR UPDATE"


def read_key(
    conn: psycopg.Connection[Any], k: KeyId, *, lock: bool = False
) -> KeyRecord | None:
    """Read the record of key `k` (`FOR UPDATE` with `lock`), if any."""
    row = conn.execute(
        _LOCK_KEY_RECORD if lock else _KEY_RECORD,
        (k.tenant, k.principal_id, k.capability, k.key),
    ).fetchone()
    return None if row is None else key_record(row)
