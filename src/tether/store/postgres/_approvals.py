"""A PostgreSQL store's approval requests: reading, expiring and deciding them.

A request is created by the write that parks its step, on the locked path
(`_locked`). Deciding one locks its row, so of two deciders the second finds
it closed; the decision is appended to the run's record in the same
transaction, which notifies the store's channel: a worker in `wait_for_news`
wakes as the decision commits.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg

from tether import _canonical, _chain
from tether.errors import ApprovalClosed, NotFound
from tether.store import _limits
from tether.store._base import ApprovalRow, ApprovalStatus, Batch, closed_reason
from tether.store._sql import (
    APPROVAL_COLUMNS,
    approval_row,
    approvals_query,
    not_one,
    text_list,
)
from tether.store.postgres._connection import Connected

__all__ = ["Approvals"]

_us = _limits.to_us


class Approvals(Connected):
    """The approval requests of `PostgresStore`."""

    def latest_approval(
        self, tenant: str, principal_id: str, digest: bytes, rule_ids: tuple[str, ...]
    ) -> ApprovalRow | None:
        """Return the newest approval request for this digest asked by these rules, if any."""
        rules = text_list(rule_ids)
        row = self._read(
            lambda conn: conn.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant=%s AND "  # noqa: S608  # constant column list
                "principal_id=%s AND digest=%s AND rule_ids=%s "
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                (tenant, principal_id, digest, rules),
            ).fetchone(),
            "read approvals",
        )
        return None if row is None else approval_row(row)

    def get_approval(self, approval_id: str) -> ApprovalRow:
        """Return one approval request (a unique prefix of 6+ characters works too)."""
        rows = self._by_id("approvals", "id", APPROVAL_COLUMNS, approval_id)
        if len(rows) != 1:
            raise not_one(
                rows, "approval request", approval_id, "", "tether approvals list"
            )
        return approval_row(rows[0])

    def list_approvals(
        self,
        *,
        status: ApprovalStatus | None = None,
        limit: int = 50,
        now: datetime | None = None,
        run_id: str | None = None,
    ) -> list[ApprovalRow]:
        """Return approval requests, newest first (see `Store.list_approvals`)."""
        sql, params = approvals_query(
            "%s", status=status, now=now, run_id=run_id, limit=limit
        )
        rows = self._read(
            lambda conn: conn.execute(sql, params).fetchall(), "list approvals"
        )
        return [approval_row(r) for r in rows]

    def expire_approval(self, approval_id: str, now: datetime) -> bool:
        """Mark a pending request past its expiry `expired` (see `Store.expire_approval`)."""
        return self._run(
            lambda conn: (
                conn.execute(
                    "UPDATE approvals SET status='expired' WHERE id=%s AND "
                    "status='pending' AND expires_at <= %s",
                    (approval_id, _us(now)),
                ).rowcount
                == 1
            ),
            f"expire {approval_id!r}",
        )

    def decide_approval(
        self,
        approval_id: str,
        *,
        status: ApprovalStatus | None,
        by: str,
        note: str | None,
        now: datetime,
        event: Callable[[ApprovalRow, str | None], Any],
    ) -> ApprovalRow:
        """Decide a pending request and record `event` in its run, in one transaction."""
        current, closed = self._run(
            lambda conn: self._decide(conn, approval_id, status, by, note, now, event),
            f"decide {approval_id!r}",
        )
        if closed:
            raise ApprovalClosed(closed_reason(current, now))
        return current

    def _decide(
        self,
        conn: psycopg.Connection[Any],
        approval_id: str,
        status: ApprovalStatus | None,
        by: str,
        note: str | None,
        now: datetime,
        event: Callable[[ApprovalRow, str | None], Any],
    ) -> tuple[ApprovalRow, bool]:
        """Decide in one transaction; return the row and whether it was closed.

        The request's row is locked first: of two deciders, the second reads
        the first one's decision and finds the request closed.
        """
        conn.execute("BEGIN")
        row = conn.execute(
            f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id=%s FOR UPDATE",  # noqa: S608  # constant column list
            (approval_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no approval request {approval_id!r}")
        current = approval_row(row)
        is_open = current.status is ApprovalStatus.PENDING and current.expires_at > now
        if status is not None and is_open:
            updated = conn.execute(
                "UPDATE approvals SET status=%s, decided_by=%s, decided_at=%s, "  # noqa: S608  # constant column list
                f"note=%s WHERE id=%s RETURNING {APPROVAL_COLUMNS}",
                (status.value, by, _us(now), note, approval_id),
            ).fetchone()
            assert updated is not None  # the row is locked by this transaction
            current = approval_row(updated)
        # Locked, so the head read here is the one the write below extends.
        run = conn.execute(
            "SELECT epoch, head_seq, head_hash FROM runs WHERE run_id=%s FOR UPDATE",
            (current.run_id,),
        ).fetchone()
        if run is None:
            raise NotFound(f"no run {current.run_id!r}")
        closed = status is not None and not is_open
        batch = Batch(
            run_id=current.run_id,
            events=[event(current, closed_reason(current, now) if closed else None)],
            at=now,
            epoch=run[0],
            base_seq=run[1],
            base_hash=bytes(run[2]),
        )
        if status is not None and is_open:
            # Delivered when the decision commits: a waiting worker wakes now.
            conn.execute("SELECT pg_notify(%s, %s)", (self._channel, current.run_id))
        self._append(conn, batch)
        return current, closed

    def _append(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        """Append events to a run inside the caller's open transaction, and commit."""
        seq, head = batch.base_seq, batch.base_hash
        rows = []
        for e in batch.events:
            seq += 1
            body = _canonical.dumps_fields(e)
            head = _chain.chain_hash(head, seq, body)
            rows.append((batch.run_id, seq, e.kind, e.step, body, head))
        sig = (
            None
            if self.record_key is None
            else self._mac(self.record_key).head(batch.run_id, seq, head)
        )
        conn.execute(
            "UPDATE runs SET head_seq=%s, head_hash=%s, head_sig=%s WHERE run_id=%s",
            (seq, head, sig, batch.run_id),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO events (run, seq, kind, step, body, hash) "
                "VALUES ((SELECT id FROM runs WHERE run_id=%s), %s, %s, %s, %s, %s)",
                rows,
            )
        conn.execute("COMMIT")
