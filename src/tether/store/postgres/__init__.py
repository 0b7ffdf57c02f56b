"""The PostgreSQL backend: one database shared by every worker on every host.

`PostgresStore` is made of parts, one idea a module:

- `_connection`: the URL, the pool, migrations, and the retrying `_run` every
  operation goes through;
- `_write`: `commit`, in one statement or one locked transaction (its docstring
  counts the round trips);
- `_locked`: the locked path's advisory locks and reads, claims and grants;
- `_tables`: the limit and breaker rows a batch reads and writes;
- `_approvals`: approval requests, and deciding them;
- `_pipeline`: pipelined statements and the one-statement builder.

Reads of runs, keys, limits and breakers are here, on the store itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from tether import _chain
from tether.errors import NotFound
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
from tether.store.postgres._approvals import Approvals
from tether.store.postgres._connection import (
    CONNECT_TIMEOUT_S,
    DEFAULT_POOL_SIZE,
    POOL_TIMEOUT_S,
    lock_key,
    parse_url,
)
from tether.store.postgres._locked import read_key
from tether.store.postgres._tables import (
    BREAKER_COLUMNS,
    LIMIT_COLUMNS,
    OutOfOrder,
)
from tether.store.postgres._write import Writes

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_POOL_SIZE",
    "POOL_TIMEOUT_S",
    "PostgresStore",
    "parse_url",
]

if TYPE_CHECKING:
    from tether.record import Event

_us = _limits.to_us


class PostgresStore(Writes, Approvals):
    """A store in a PostgreSQL database, shared by every process that opens it.

    Opening migrates the schema (under an advisory lock, so processes opening
    together migrate once). Tables go in the first schema of the connection's
    `search_path` (`?options=-csearch_path%3Dtether` picks one).

    Args:
        url: `postgresql://user@host:port/dbname`, with libpq's connection
            parameters and tether's `?pool_size=N` as query options.
        pool_size: connections kept at most (default: the URL's, else
            `DEFAULT_POOL_SIZE`); a pool starts with one.
        record_key: the key that signs chain heads; None leaves heads unsigned.

    Raises:
        ConfigError: the URL has an option neither tether nor libpq knows.
        StoreError: the server cannot be reached, or the schema is newer than
            this tether.
    """

    # -- reads ------------------------------------------------------------------

    def limit_rows(self, now: datetime) -> list[LimitRow]:
        """Return every limit counter and live lease set (for `tether status`)."""
        at = _us(now)

        def query(conn: psycopg.Connection[Any]) -> list[LimitRow]:
            return limit_summary(
                conn.execute(
                    f"SELECT {LIMIT_COLUMNS} FROM limit_state WHERE holder <> '~' "  # noqa: S608  # constant column list
                    'ORDER BY limit_id, scope, "window"'
                ),
                at,
            )

        return self._read(query, "read the limits")

    def limit_row(
        self, limit_id: str, scope: str, window: int, now: datetime
    ) -> LimitRow | None:
        """Return one limit counter, if it has one (see `Store.limit_row`)."""
        found = self._read(
            lambda conn: limit_summary(
                conn.execute(
                    f"SELECT {LIMIT_COLUMNS} FROM limit_state WHERE limit_id=%s "  # noqa: S608  # constant column list
                    "AND scope=%s AND \"window\"=%s AND holder <> '~'",
                    (limit_id, scope, window),
                ),
                _us(now),
            ),
            "read a limit",
        )
        return found[0] if found else None

    def breaker_row(self, breaker_id: str) -> BreakerRow:
        """Return one breaker's stored row (a closed one when it has none)."""
        row = self._read(
            lambda conn: conn.execute(
                f"SELECT {BREAKER_COLUMNS} FROM breakers WHERE id=%s",  # noqa: S608  # constant column list
                (breaker_id,),
            ).fetchone(),
            "read a breaker",
        )
        return BreakerRow() if row is None else breaker_row(row[1:])

    def breaker_rows(self) -> dict[str, BreakerRow]:
        """Return every breaker's stored row, by id."""
        rows = self._read(
            lambda conn: conn.execute(
                f"SELECT {BREAKER_COLUMNS} FROM breakers ORDER BY id"  # noqa: S608  # constant column list
            ).fetchall(),
            "read the breakers",
        )
        return {r[0]: breaker_row(r[1:]) for r in rows}

    def clock_skew(self, now: Callable[[], datetime]) -> timedelta:
        """Return how far the clock `now` is ahead of the server's, to within half a round trip."""

        def query(conn: psycopg.Connection[Any]) -> timedelta:
            before = now()
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            after = now()
            assert row is not None
            served: datetime = row[0]
            return before + (after - before) / 2 - served

        return self._read(query, "read the server's clock")

    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the record of `key`, if any."""
        return self._read(lambda conn: read_key(conn, key), "read a key")

    def get_run(self, run_id: str) -> RunRow:
        """Return one run, by id or by a unique prefix of at least 6 characters."""
        rows = self._by_id("runs", "run_id", RUN_COLUMNS, run_id)
        if len(rows) != 1:
            raise not_one(rows, "run", run_id, f" in {self.url}", "tether runs list")
        return run_row(rows[0], _utc)

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
        # run_id is COLLATE "C": the row comparison orders as ORDER BY does.
        sql, params = runs_page(
            "%s",
            status=status,
            after=None if after is None else (after.created_at, after.run_id),
            oldest_first=oldest_first,
            limit=limit,
        )
        rows = self._read(
            lambda conn: conn.execute(sql, params).fetchall(), "list runs"
        )
        return [run_row(r, _utc) for r in rows]

    def events(self, run_id: str) -> list[_chain.StoredEvent]:
        """Return a run's events in order."""
        if "\0" in run_id:
            return []
        rows = self._read(
            lambda conn: conn.execute(events_of("%s"), (run_id,)).fetchall(),
            f"read run {run_id}",
        )
        return [_chain.StoredEvent(seq=s, body=b, hash=h) for s, b, h in rows]

    def abort_run(
        self,
        run_id: str,
        *,
        abortable: Sequence[str],
        end: Callable[[RunRow, list[_chain.StoredEvent]], list[Event]],
        at: datetime,
    ) -> RunRow:
        """Take a run and end it `aborted`, in one transaction (see `Store.abort_run`).

        The run's row is locked first: a writer's step (which locks it in its
        one statement) either lands before, and the end extends it, or waits
        and then finds the epoch moved. A lost connection is an error, not
        tried again: the abort may have landed (`tether runs show` says; a
        second try is refused as ended).
        """
        return self._run(
            lambda conn: self._abort(conn, run_id, abortable, end, at),
            f"abort run {run_id}",
        )

    def _abort(
        self,
        conn: psycopg.Connection[Any],
        run_id: str,
        abortable: Sequence[str],
        end: Callable[[RunRow, list[_chain.StoredEvent]], list[Event]],
        at: datetime,
    ) -> RunRow:
        conn.execute("BEGIN")
        # The limit groups the run holds room in are locked before its row: a
        # writer of the run takes its advisory locks first and the row last,
        # and the other order could deadlock with it.
        locked = self._lock_holds(conn, run_id, set())
        found = conn.execute(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id=%s FOR UPDATE",  # noqa: S608  # constant column list
            (run_id,),
        ).fetchone()
        if found is None:
            raise NotFound(f"no run {run_id!r} in {self.url}")
        row = run_row(found, _utc)
        if row.status not in abortable:
            raise not_abortable(row)
        self._end_holds(conn, row, at, locked)
        stored = [
            _chain.StoredEvent(seq=s, body=b, hash=h)
            for s, b, h in conn.execute(events_of("%s"), (run_id,)).fetchall()
        ]
        self._append(
            conn,
            Batch(
                run_id=run_id,
                events=end(row, stored),
                at=at,
                epoch=row.epoch + 1,
                base_seq=row.head_seq,
                base_hash=row.head_hash,
            ),
        )
        ended = conn.execute(
            "UPDATE runs SET epoch=epoch+1, status='aborted', error_code='aborted', "  # noqa: S608  # constant column list
            f"updated_at=%s WHERE run_id=%s RETURNING {RUN_COLUMNS}",
            (at, run_id),
        ).fetchone()
        assert ended is not None  # the row is locked: it is there
        conn.execute("COMMIT")
        return run_row(ended, _utc)

    def _lock_holds(
        self,
        conn: psycopg.Connection[Any],
        run_id: str,
        locked: set[tuple[str, str, int]],
    ) -> set[tuple[str, str, int]]:
        """Lock the limit groups `run_id` holds room in, beyond `locked`; return them all.

        Taken in the locked path's sorted order, so that no two transactions
        wait for each other; a group found only once others are held (a step
        of the run wrote a hold in between) cannot be waited for in order, so
        the abort rolls back and is tried again (`OutOfOrder`).
        """
        # A scan of limit_state (no index leads with the holder): an abort is
        # a person's act, rare beside the steps that use the table.
        groups = {
            (limit_id, scope, window)
            for limit_id, scope, window in conn.execute(
                'SELECT DISTINCT limit_id, scope, "window" FROM limit_state '
                "WHERE starts_with(holder, %s)",
                (f"{run_id}/",),
            )
        }
        new = groups - locked
        if new and locked:
            raise OutOfOrder(
                f"run {run_id} took room in a limit while it was being aborted; "
                "rolled back to lock it in order"
            )
        for key in sorted(
            lock_key(self._schema, "limit", lid, scope, str(window))
            for lid, scope, window in new
        ):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        return groups | locked

    def _end_holds(
        self,
        conn: psycopg.Connection[Any],
        row: RunRow,
        at: datetime,
        locked: set[tuple[str, str, int]],
    ) -> None:
        """End an aborted run's limit holds (see `aborted_holds`), in its transaction."""
        self._lock_holds(conn, row.run_id, locked)  # none new, or it rolls back
        holds = [
            ((limit_id, scope, window), holder, amount, until, charged)
            for limit_id, scope, window, holder, amount, until, charged in conn.execute(
                f"SELECT {LIMIT_COLUMNS} FROM limit_state "  # noqa: S608  # constant column list
                "WHERE starts_with(holder, %s)",
                (f"{row.run_id}/",),
            )
        ]
        charges, drops = aborted_holds(holds, lease_until=row.lease_until, at=at)
        with conn.cursor() as cur:
            # Under the groups' locks: adding to the counter in place is exact.
            cur.executemany(
                f"INSERT INTO limit_state ({LIMIT_COLUMNS}) "  # noqa: S608  # constant column list
                "VALUES (%s,%s,%s,'',%s,0,false) "
                'ON CONFLICT (limit_id, scope, "window", holder) DO UPDATE SET '
                "amount = limit_state.amount + EXCLUDED.amount",
                [(*group, amount) for group, amount in charges.items()],
            )
            cur.executemany(
                "DELETE FROM limit_state WHERE limit_id=%s AND scope=%s "
                'AND "window"=%s AND holder=%s',
                [(*group, holder) for group, holder in drops],
            )

    def renew_lease(
        self,
        run_id: str,
        *,
        epoch: int,
        until: datetime,
        claim: tuple[KeyId, int] | None = None,
    ) -> bool:
        """Extend a live run's lease and its step's claim (see `Store.renew_lease`).

        One statement: the claim's update runs only if the run's did (the
        CTE's row is its gate).
        """
        at = _us(until)
        key_sql = ""
        key_params: tuple[object, ...] = ()
        if claim is not None:
            key, step = claim
            key_sql = (
                ", k AS (UPDATE idempotency_keys SET lease_until=GREATEST(lease_until, %s) "
                "WHERE tenant=%s AND principal_id=%s AND capability=%s AND key=%s "
                "AND state='in_progress' AND run_id=%s AND step=%s "
                "AND EXISTS (SELECT 1 FROM r))"
            )
            key_params = (
                at,
                key.tenant,
                key.principal_id,
                key.capability,
                key.key,
                run_id,
                step,
            )
        row = self._run(
            lambda conn: conn.execute(
                "WITH r AS (UPDATE runs SET lease_until=GREATEST(lease_until, %s) "  # noqa: S608  # constant SQL
                f"WHERE run_id=%s AND epoch=%s RETURNING 1){key_sql} "
                "SELECT count(*) FROM r",
                (at, run_id, epoch, *key_params),
            ).fetchone(),
            f"renew the lease of run {run_id}",
        )
        return row is not None and row[0] == 1

    def take_over(
        self,
        run_id: str,
        *,
        parked: Sequence[str],
        orphaned: Sequence[str] = (),
        now: datetime | None = None,
        lease_until: datetime | None = None,
    ) -> RunRow:
        """Bump a parked or orphaned run's lease epoch (see `Store.take_over`).

        One conditional `UPDATE`: of workers racing for a run, the first bumps
        the epoch and the others, re-checking the row once its lock is free,
        find the epoch moved and are refused.
        """
        row = self.get_run(run_id)
        at = 0 if now is None else _us(now)
        until = 0 if lease_until is None else _us(lease_until)
        lost = [] if now is None else list(orphaned)  # no time, no lease ran out
        taken = self._run(
            lambda conn: conn.execute(
                "UPDATE runs SET epoch=epoch+1, lease_until=GREATEST(lease_until, %s) "  # noqa: S608  # constant column list
                "WHERE run_id=%s AND epoch=%s AND (status = ANY(%s) OR "
                f"(status = ANY(%s) AND lease_until <= %s)) RETURNING {RUN_COLUMNS}",
                (until, row.run_id, row.epoch, list(parked), lost, at),
            ).fetchone(),
            f"take over run {run_id}",
        )
        if taken is None:
            raise not_resumable(self.get_run(row.run_id))
        return run_row(taken, _utc)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)
