"""A SQLite store's approval requests: reading, expiring and deciding them.

A request is created by the write that parks its step (`Writes._commit`). Deciding
one appends the decision to the run's record, through the write path, in the
same transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

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
from tether.store.sqlite._connection import rollback
from tether.store.sqlite._write import Writes

if TYPE_CHECKING:
    from tether.record import Event

__all__ = ["Approvals"]

_us = _limits.to_us


class Approvals(Writes):
    """The approval requests of `SQLiteStore`."""

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
            lambda con: con.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant=? AND "  # noqa: S608  # constant column list
                "principal_id=? AND digest=? AND rule_ids=? AND "
                "on_behalf_of IS ? "  # NULL (made for nobody) matches NULL
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                (tenant, principal_id, digest, rules, on_behalf_of),
            ).fetchone()
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
            "?", status=status, now=now, run_id=run_id, limit=limit
        )
        rows = self._read(lambda con: con.execute(sql, params).fetchall())
        return [approval_row(r) for r in rows]

    def expire_approval(self, approval_id: str, now: datetime) -> bool:
        """Mark a pending request past its expiry `expired` (see `Store.expire_approval`)."""
        try:
            with self._write() as con:
                cur = con.execute(
                    "UPDATE approvals SET status='expired' WHERE id=? AND "
                    "status='pending' AND expires_at <= ?",
                    (approval_id, _us(now)),
                )
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise StoreError(f"cannot expire {approval_id!r}: {exc}") from exc

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
        try:
            with self._lock:
                con = self._con
                con.execute("BEGIN IMMEDIATE")
                try:
                    current, refused = self._decide(
                        con, approval_id, status, by, note, now, event, withdraw
                    )
                    con.execute("COMMIT")
                except BaseException:
                    rollback(con)
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot decide {approval_id!r}: {exc}") from exc
        if refused is not None:
            raise ApprovalClosed(refused)
        return current

    def _decide(
        self,
        con: sqlite3.Connection,
        approval_id: str,
        status: ApprovalStatus | None,
        by: str,
        note: str | None,
        now: datetime,
        event: Callable[[ApprovalRow, str | None], Any],
        withdraw: bool,
    ) -> tuple[ApprovalRow, str | None]:
        """Decide inside the caller's transaction; return the row and why it was closed, if it was."""
        select = f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id=?"  # noqa: S608  # constant column list
        row = con.execute(select, (approval_id,)).fetchone()
        if row is None:
            raise NotFound(f"no approval request {approval_id!r}")
        current = approval_row(row)
        refused = decision_refused(current, now, status, withdraw=withdraw)
        if status is not None and refused is None:
            # The WHERE makes racing deciders (and a step spending a withdrawn
            # grant: approved -> used) safe even without this transaction.
            con.execute(
                "UPDATE approvals SET status=?, decided_by=?, decided_at=?, note=? "
                "WHERE id=? AND status=?",
                (
                    status.value,
                    by,
                    _us(now),
                    note,
                    approval_id,
                    "approved" if withdraw else "pending",
                ),
            )
            current = approval_row(con.execute(select, (approval_id,)).fetchone())
        run = con.execute(
            "SELECT epoch, head_seq, head_hash FROM runs WHERE run_id=?",
            (current.run_id,),
        ).fetchone()
        if run is None:
            raise NotFound(f"no run {current.run_id!r}")
        self._commit(
            con,
            Batch(
                run_id=current.run_id,
                events=[event(current, refused)],
                at=now,
                epoch=run[0],
                base_seq=run[1],
                base_hash=run[2],
            ),
        )
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
        """Settle a step in doubt and record the answer, in one transaction (see `Store.resolve_step`)."""
        try:
            with self._lock:
                con = self._con
                con.execute("BEGIN IMMEDIATE")
                try:
                    seq = self._resolve(con, run_id, step, seen_seq, key, event, at)
                    con.execute("COMMIT")
                except BaseException:
                    rollback(con)
                    raise
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot resolve run {run_id} step {step} in {str(self.path)!r}: {exc}"
            ) from exc
        return seq

    def _resolve(
        self,
        con: sqlite3.Connection,
        run_id: str,
        step: int,
        seen_seq: int,
        key: KeyUpdate | None,
        event: Callable[[bool], Event],
        at: datetime,
    ) -> int:
        # The file lock makes this the only writer: the head read here is the
        # one the write below extends, whoever holds the run.
        run = con.execute(
            "SELECT id, epoch, head_seq, head_hash FROM runs WHERE run_id=?", (run_id,)
        ).fetchone()
        if run is None:
            raise NotFound(f"no run {run_id!r} in {str(self.path)!r}")
        answered = con.execute(
            answered_since("?"),
            (run[0], seen_seq, step),
        ).fetchone()
        if answered is not None:
            raise resolved_meanwhile(run_id, step)
        settled = key is not None and con.execute(*key_settle("?", key)).rowcount == 1
        committed = self._commit(
            con,
            Batch(
                run_id=run_id,
                events=[event(settled)],
                at=at,
                epoch=run[1],
                base_seq=run[2],
                base_hash=run[3],
            ),
        )
        return committed.head_seq
