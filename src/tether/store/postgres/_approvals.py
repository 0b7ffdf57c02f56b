"""A PostgreSQL store's approval requests: reading, expiring and deciding them.

A request is created by the write that parks its step, on the locked path
(`_locked`). Deciding one locks its row, so of two deciders the second finds
it closed; the decision is appended to the run's record in the same
transaction, which notifies the store's channel: a worker in `wait_for_news`
wakes as the decision commits.

A decision whose connection is lost is tried once more. If its `COMMIT` had
gone out, it may have landed, or land late (it holds the request's row lock
until it ends, so the retry waits for it): the retry then finds its event in
the run's record and answers as it would have, instead of recording a
second decision, refused as closed by the first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg

from tether import _canonical, _chain
from tether.errors import ApprovalClosed, NotFound, StoreError
from tether.store import _limits
from tether.store._base import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    KeyUpdate,
    check_withdrawal,
    decision_refused,
    resolved_meanwhile,
)
from tether.store._sql import (
    APPROVAL_COLUMNS,
    answered_since,
    approval_row,
    approvals_query,
    key_settle,
    not_one,
    text_list,
)
from tether.store.postgres._connection import Connected, one_line

if TYPE_CHECKING:
    from tether.record import Event

__all__ = ["Approvals"]

_us = _limits.to_us


class Approvals(Connected):
    """The approval requests of `PostgresStore`."""

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
        rules = text_list(rule_ids)
        row = self._read(
            lambda conn: conn.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant=%s AND "  # noqa: S608  # constant column list
                "principal_id=%s AND digest=%s AND rule_ids=%s AND "
                "on_behalf_of IS NOT DISTINCT FROM %s "  # NULL (made for nobody) matches NULL
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                (tenant, principal_id, digest, rules, on_behalf_of),
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
        withdraw: bool = False,
    ) -> ApprovalRow:
        """Decide a pending request and record `event` in its run, in one transaction.

        With `withdraw`, close an approved, unspent request instead (see
        `Store.decide_approval`).
        """
        check_withdrawal(status, withdraw=withdraw)
        sent = _Sent()

        def lost(exc: psycopg.OperationalError) -> None:
            # Tried once more: `_decide` tells a try that landed.
            if sent.losses and sent.answer is not None:
                raise StoreError(
                    f"cannot decide {approval_id!r}: lost the connection to "
                    f"{self.url} ({one_line(exc)}) after sending the decision, "
                    "and cannot tell whether it landed; see the request "
                    "(`tether approvals show`) before deciding again"
                ) from exc
            sent.losses += 1

        current, refused = self._run(
            lambda conn: self._decide(
                conn, sent, approval_id, status, by, note, now, event, withdraw
            ),
            f"decide {approval_id!r}",
            lost=lost,
        )
        if refused is not None:
            raise ApprovalClosed(refused)
        return current

    def _decide(
        self,
        conn: psycopg.Connection[Any],
        sent: _Sent,
        approval_id: str,
        status: ApprovalStatus | None,
        by: str,
        note: str | None,
        now: datetime,
        event: Callable[[ApprovalRow, str | None], Any],
        withdraw: bool,
    ) -> tuple[ApprovalRow, str | None]:
        """Decide in one transaction; return the row and why it was closed, if it was.

        The request's row is locked first: of two deciders, the second reads
        the first one's decision and finds the request closed. A step
        spending a grant being withdrawn (approved -> used, guarded by
        `status='approved'`) waits for the lock too, then finds it expired;
        or it spent the grant first, and the withdrawal finds it used. A try
        of this call whose `COMMIT` went out before its connection was lost
        (`sent`) held that lock until it ended: if its event is in the record
        now, it landed, and its answer stands.
        """
        conn.execute("BEGIN")
        row = conn.execute(
            f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id=%s FOR UPDATE",  # noqa: S608  # constant column list
            (approval_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no approval request {approval_id!r}")
        current = approval_row(row)
        refused = decision_refused(current, now, status, withdraw=withdraw)
        if status is not None and refused is None:
            updated = conn.execute(
                "UPDATE approvals SET status=%s, decided_by=%s, decided_at=%s, "  # noqa: S608  # constant column list
                f"note=%s WHERE id=%s AND status=%s RETURNING {APPROVAL_COLUMNS}",
                (
                    status.value,
                    by,
                    _us(now),
                    note,
                    approval_id,
                    current.status.value,  # pending, or approved for a withdrawal
                ),
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
        if sent.answer is not None and _landed(conn, sent):
            conn.execute("ROLLBACK")
            return sent.answer
        batch = Batch(
            run_id=current.run_id,
            events=[event(current, refused)],
            at=now,
            epoch=run[0],
            base_seq=run[1],
            base_hash=bytes(run[2]),
        )
        if status is not None and refused is None:
            # Delivered when the decision commits: a waiting worker wakes now.
            conn.execute("SELECT pg_notify(%s, %s)", (self._channel, current.run_id))
        sent.answer = None
        sent.seq, sent.head = self._append(conn, batch)
        sent.answer = (current, refused)  # from here on, it may land
        conn.execute("COMMIT")
        return current, refused

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
        """Settle a step in doubt and record the answer, in one transaction (see `Store.resolve_step`).

        A lost connection is an error, not tried again: the answer may have
        landed (`tether runs show` says; a second try is refused as resolved).
        """
        return self._run(
            lambda conn: self._resolve(conn, run_id, step, seen_seq, key, event, at),
            f"resolve run {run_id} step {step}",
        )

    def _resolve(
        self,
        conn: psycopg.Connection[Any],
        run_id: str,
        step: int,
        seen_seq: int,
        key: KeyUpdate | None,
        event: Callable[[bool], Event],
        at: datetime,
    ) -> int:
        conn.execute("BEGIN")
        # The key's row first, as a call claiming it locks it before its run's.
        settled = key is not None and conn.execute(*key_settle("%s", key)).rowcount == 1
        # Locked, so the head read here is the one the write below extends.
        run = conn.execute(
            "SELECT id, epoch, head_seq, head_hash FROM runs WHERE run_id=%s FOR UPDATE",
            (run_id,),
        ).fetchone()
        if run is None:
            raise NotFound(f"no run {run_id!r} in {self.url}")
        answered = conn.execute(
            answered_since("%s"),
            (run[0], seen_seq, step),
        ).fetchone()
        if answered is not None:
            raise resolved_meanwhile(run_id, step)
        seq, _ = self._append(
            conn,
            Batch(
                run_id=run_id,
                events=[event(settled)],
                at=at,
                epoch=run[1],
                base_seq=run[2],
                base_hash=bytes(run[3]),
            ),
        )
        conn.execute("COMMIT")
        return seq

    def _append(self, conn: psycopg.Connection[Any], batch: Batch) -> tuple[int, bytes]:
        """Append events to a run inside the caller's open transaction; return its new head."""
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
        return seq, head


@dataclass(slots=True)
class _Sent:
    """The try of one `decide_approval` call whose `COMMIT` went out, if any."""

    answer: tuple[ApprovalRow, str | None] | None = None
    """What it answers if it lands: the request, and why it was closed, if it was."""
    seq: int = 0
    """The seq of its last event."""
    head: bytes = b""
    """The hash of its last event."""
    losses: int = 0
    """Connections the call lost."""


def _landed(conn: psycopg.Connection[Any], sent: _Sent) -> bool:
    """Tell whether the try that sent its `COMMIT` landed: its last event is recorded."""
    assert sent.answer is not None
    row = conn.execute(
        "SELECT e.hash FROM events e JOIN runs r ON r.id = e.run "
        "WHERE r.run_id = %s AND e.seq = %s",
        (sent.answer[0].run_id, sent.seq),
    ).fetchone()
    return row is not None and bytes(row[0]) == sent.head
