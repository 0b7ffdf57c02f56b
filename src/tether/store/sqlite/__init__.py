"""The embedded SQLite backend: one file, WAL, safe for several processes on one host.

Every connection is set up the same way (WAL, `synchronous` as configured,
`busy_timeout` 10 s, foreign keys on) and every writing transaction begins with
`BEGIN IMMEDIATE`: a deferred transaction that upgrades to a write gets
SQLITE_BUSY at once, ignoring `busy_timeout`.

`SQLiteStore` below holds the reads; its bases and helpers live beside it:
`_connection` opens, configures and migrates the file and runs transactions;
`_write` is `commit` and its checks (claim, grant, approval request, fence);
`_tables` gives the limit rules the file's limit and breaker rows; and
`_approvals` lists, expires and decides approval requests.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from tether import _chain
from tether.errors import NotFound, StoreError
from tether.store import _limits
from tether.store._base import (
    Batch,
    KeyId,
    KeyRecord,
    LimitRow,
    RunRow,
    not_abortable,
)
from tether.store._breakers import BreakerRow
from tether.store._sql import (
    RUN_COLUMNS,
    aborted_holds,
    breaker_row,
    events_of,
    limit_summary,
    not_one,
    not_resumable,
    run_row,
    runs_page,
)
from tether.store.sqlite._approvals import Approvals
from tether.store.sqlite._connection import (
    BUSY_TIMEOUT_MS,
    PAGE_SIZE,
    Synchronous,
    rollback,
)
from tether.store.sqlite._tables import Tables
from tether.store.sqlite._write import read_key

__all__ = ["BUSY_TIMEOUT_MS", "PAGE_SIZE", "SQLiteStore", "Synchronous"]

if TYPE_CHECKING:
    from tether.record import Event

_us = _limits.to_us


class SQLiteStore(Approvals):
    """A store in one SQLite file.

    Args:
        path: the database file; its folder is created when missing.
        synchronous: `"full"` (default: a step is on disk before `call` returns,
            through power loss too) or `"normal"` (several times faster; survives
            a process crash, but the last steps may be lost if the machine loses
            power).
        record_key: the key that signs chain heads; None leaves heads unsigned.
        read_only: open an existing tether database of this schema for reading
            only: never create, configure or migrate the file (a file that is
            not one, or is at an older schema, is a `StoreError`).
    """

    # -- reads ------------------------------------------------------------------

    def limit_rows(self, now: datetime) -> list[LimitRow]:
        """Return every limit counter and live lease set (for `tether status`)."""
        at = _limits.to_us(now)

        def query(con: sqlite3.Connection) -> list[LimitRow]:
            return limit_summary(
                con.execute(
                    "SELECT limit_id, scope, window, holder, amount, until, charged "
                    "FROM limit_state WHERE holder <> '~' ORDER BY limit_id, scope, window"
                ),
                at,
            )

        return self._read(query)

    def limit_row(
        self, limit_id: str, scope: str, window: int, now: datetime
    ) -> LimitRow | None:
        """Return one limit counter, if it has one (see `Store.limit_row`)."""
        found = self._read(
            lambda con: limit_summary(
                con.execute(
                    "SELECT limit_id, scope, window, holder, amount, until, charged "
                    "FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
                    "AND holder <> '~'",
                    (limit_id, scope, window),
                ),
                _limits.to_us(now),
            )
        )
        return found[0] if found else None

    def renew_lease(
        self,
        run_id: str,
        *,
        epoch: int,
        until: datetime,
        claim: tuple[KeyId, int] | None = None,
    ) -> bool:
        """Extend a live run's lease and its step's claim (see `Store.renew_lease`)."""
        at = _us(until)
        try:
            with self._write() as con:
                moved = con.execute(
                    "UPDATE runs SET lease_until=MAX(lease_until, ?) "
                    "WHERE run_id=? AND epoch=?",
                    (at, run_id, epoch),
                ).rowcount
                if moved != 1:
                    return False
                if claim is not None:
                    key, step = claim
                    con.execute(
                        "UPDATE idempotency_keys SET lease_until=MAX(lease_until, ?) "
                        "WHERE tenant=? AND principal_id=? AND capability=? AND key=? "
                        "AND state='in_progress' AND run_id=? AND step=?",
                        (
                            at,
                            key.tenant,
                            key.principal_id,
                            key.capability,
                            key.key,
                            run_id,
                            step,
                        ),
                    )
                return True
        except sqlite3.Error as exc:
            raise StoreError(f"cannot renew the lease of run {run_id}: {exc}") from exc

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
        row = self.get_run(run_id)
        if now is None:
            orphaned = ()  # no time, no lease ran out
        at = 0 if now is None else _us(now)
        until = 0 if lease_until is None else _us(lease_until)
        marks = ",".join("?" * len(parked)) or "NULL"
        lost = ",".join("?" * len(orphaned)) or "NULL"
        try:
            with self._write() as con:
                # RETURNING, not a read after COMMIT: by then another worker may
                # have taken the run over again, and its epoch is not ours.
                rows = con.execute(
                    "UPDATE runs SET epoch=epoch+1, lease_until=MAX(lease_until, ?) "  # noqa: S608  # placeholders only
                    f"WHERE run_id=? AND epoch=? AND (status IN ({marks}) OR "
                    f"(status IN ({lost}) AND lease_until <= ?)) RETURNING {RUN_COLUMNS}",
                    (until, row.run_id, row.epoch, *parked, *orphaned, at),
                ).fetchall()  # every row: a RETURNING statement left open blocks COMMIT
                taken = rows[0] if rows else None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot take over run {run_id}: {exc}") from exc
        if taken is None:
            raise not_resumable(self.get_run(row.run_id))
        return run_row(taken, _dt)

    def abort_run(
        self,
        run_id: str,
        *,
        abortable: Sequence[str],
        end: Callable[[RunRow, list[_chain.StoredEvent]], list[Event]],
        at: datetime,
    ) -> RunRow:
        """Take a run and end it `aborted`, in one transaction (see `Store.abort_run`)."""
        try:
            with self._lock:
                con = self._con
                con.execute("BEGIN IMMEDIATE")  # the file's one writer until COMMIT
                try:
                    ended = self._abort(con, run_id, abortable, end, at)
                    con.execute("COMMIT")
                except BaseException:
                    rollback(con)
                    raise
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot abort run {run_id} in {str(self.path)!r}: {exc}"
            ) from exc
        return ended

    def _abort(
        self,
        con: sqlite3.Connection,
        run_id: str,
        abortable: Sequence[str],
        end: Callable[[RunRow, list[_chain.StoredEvent]], list[Event]],
        at: datetime,
    ) -> RunRow:
        found = con.execute(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id=?",  # noqa: S608  # constant column list
            (run_id,),
        ).fetchone()
        if found is None:
            raise NotFound(f"no run {run_id!r} in {str(self.path)!r}")
        row = run_row(found, _dt)
        if row.status not in abortable:
            raise not_abortable(row)
        stored = [
            _chain.StoredEvent(seq=s, body=b, hash=h)
            for s, b, h in con.execute(events_of("?"), (run_id,))
        ]
        _end_holds(con, row, at)
        con.execute("UPDATE runs SET epoch=epoch+1 WHERE run_id=?", (run_id,))
        self._commit(
            con,
            Batch(
                run_id=run_id,
                events=end(row, stored),
                at=at,
                epoch=row.epoch + 1,
                base_seq=row.head_seq,
                base_hash=row.head_hash,
                status="aborted",
                error_code="aborted",
            ),
        )
        ended = con.execute(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id=?",  # noqa: S608  # constant column list
            (run_id,),
        ).fetchone()
        return run_row(ended, _dt)

    def breaker_row(self, breaker_id: str) -> BreakerRow:
        """Return one breaker's stored row (a closed one when it has none)."""
        return self._read(lambda con: Tables(con).breaker(breaker_id))

    def breaker_rows(self) -> dict[str, BreakerRow]:
        """Return every breaker's stored row, by id."""
        rows = self._read(
            lambda con: con.execute(
                "SELECT id, state, since, generation, outcomes, probes, probe_deadline "
                "FROM breakers ORDER BY id"
            ).fetchall()
        )
        return {r[0]: breaker_row(r[1:]) for r in rows}

    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the record of `key`, if any."""
        return self._read(lambda con: read_key(con, key))

    def get_run(self, run_id: str) -> RunRow:
        """Return one run, by id or by a unique prefix of at least 6 characters."""
        rows = self._by_id("runs", "run_id", RUN_COLUMNS, run_id)
        if len(rows) != 1:
            where = f" in {str(self.path)!r}"
            raise not_one(rows, "run", run_id, where, "tether runs list")
        return run_row(rows[0], _dt)

    def list_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        after: RunRow | None = None,
        oldest_first: bool = False,
    ) -> list[RunRow]:
        """Return up to `limit` runs in `(created_at, run_id)` order, from after `after`.

        Newest first unless `oldest_first`; see `Store.list_runs`. Each page
        is one range of `runs_by_status` (or `runs_by_created`), however deep.
        """
        # created_at is stored as its isoformat(): the same text orders alike.
        sql, params = runs_page(
            "?",
            status=status,
            after=None
            if after is None
            else (after.created_at.isoformat(), after.run_id),
            oldest_first=oldest_first,
            limit=limit,
        )
        rows = self._read(lambda con: con.execute(sql, params).fetchall())
        return [run_row(r, _dt) for r in rows]

    def events(self, run_id: str) -> list[_chain.StoredEvent]:
        """Return a run's events in order."""
        rows = self._read(lambda con: con.execute(events_of("?"), (run_id,)).fetchall())
        return [_chain.StoredEvent(seq=s, body=b, hash=h) for s, b, h in rows]


def _end_holds(con: sqlite3.Connection, row: RunRow, at: datetime) -> None:
    """End an aborted run's limit holds (see `aborted_holds`), in the caller's write."""
    prefix = f"{row.run_id}/"  # a hold's holder is 'run_id/step'
    # A scan of limit_state (no index leads with the holder): an abort is a
    # person's act, rare beside the steps that use the table.
    holds = [
        ((limit_id, scope, window), holder, Decimal(amount), until, bool(charged))
        for limit_id, scope, window, holder, amount, until, charged in con.execute(
            "SELECT limit_id, scope, window, holder, amount, until, charged "
            "FROM limit_state WHERE substr(holder, 1, ?) = ?",
            (len(prefix), prefix),
        )
    ]
    charges, drops = aborted_holds(holds, lease_until=row.lease_until, at=at)
    tables = Tables(con)
    for (limit_id, scope, window), amount in charges.items():
        tables.add_to_counter(limit_id, scope, window, amount, _us(at))
    con.executemany(
        "DELETE FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
        "AND holder=?",
        [(*group, holder) for group, holder in drops],
    )


def _dt(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        # Only an edit or damage outside tether puts a non-time here: say so in
        # one line, not as a crash of tether's own.
        raise StoreError(
            f"the runs table holds {str(value)[:40]!r} where a time belongs: the "
            "database was edited or damaged outside tether; restore it from a backup"
        ) from exc
