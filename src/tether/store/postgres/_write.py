"""The PostgreSQL write path: one database shared by every worker on every host.

Every decision two workers could race on is settled by PostgreSQL itself, at
READ COMMITTED: a run's write is fenced by an atomic
`UPDATE runs ... WHERE epoch=%s AND head_seq=%s`; an idempotency key is claimed
by `INSERT ... ON CONFLICT DO NOTHING` and, when taken, read `FOR UPDATE`; an
approval is decided under its row lock; and the limit and breaker rows a batch
reads then writes are guarded by transaction-scoped advisory locks, taken in
sorted order (so two writers never deadlock on them) before the rows are read,
which also covers rows that do not exist yet.

A write without limits, breakers or an approval request is one statement in
autocommit (one round trip): its writes are data-modifying CTEs, and a failed
fence, claim or grant raises inside the server (`tether_require`), which undoes
the statement. So is a write whose limits only charge counters (a read charged
after it answers: quotas, budgets without a throttle, settled in the same
batch): its statement first calls `tether_charge` (0005_charge.sql), which
takes the locked path's advisory locks, then checks and adds to the counters
as the limit rules would; when a counter has no room it raises, nothing is
written, and the write takes the locked path, which says what is left. Any
other write with limits is one transaction of two round trips: the locks and
reads (`BEGIN`, one lock and one `SELECT` per limit, pipelined), then that
same kind of statement and `COMMIT`, since the limit rules
(`tether.store._limits`) are written once, in Python, for every backend.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from tether import _canonical, _chain
from tether.errors import LeaseLost, NotFound, StoreError
from tether.store import _limits
from tether.store._base import (
    Batch,
    Committed,
    GrantGone,
    KeyRecord,
    KeyState,
    apply_limits,
)
from tether.store._breakers import closed_by, closing_requests
from tether.store._limits import LimitKind, Reserve
from tether.store._sql import (
    RUN_COLUMNS,
    Refused,
    WriteBlocked,
    fence_error,
    key_update,
    return_grant,
)
from tether.store.postgres._connection import Connected, lock_key, one_line
from tether.store.postgres._locked import locked_reads
from tether.store.postgres._pipeline import Statement, Writer, rollback
from tether.store.postgres._tables import counter_charges

__all__ = ["Writes"]

_us = _limits.to_us

_REQUIRE_FAILED = "TT001"
"""The SQLSTATE `tether_require` raises (0001_init.sql); its hint names the check."""
_NO_ROOM = "TT002"
"""The SQLSTATE `tether_charge` raises (0005_charge.sql): a counter has no room."""


class Writes(Connected):
    """The writes of `PostgresStore`: `commit`, and what it takes to land one."""

    def commit(self, batch: Batch) -> Committed:
        """Write `batch` in one transaction (see the module docstring for its cost)."""
        attempt = _Attempt(batch)
        try:
            while True:
                try:
                    return self._run(
                        lambda conn: self._commit(conn, attempt),
                        f"write run {batch.run_id}",
                        lost=lambda exc: self._landed(attempt, exc),
                    )
                except _NeedsLocks:
                    # The one statement found the key taken or a counter full:
                    # decide it under the locks, exactly.
                    attempt.locked = True
        except Refused as refused:
            return self._late(attempt, refused) or refused.answer(batch)
        except StoreError as exc:
            landed = self._late(attempt, exc)
            if landed is None:
                raise
            return landed

    def _landed(
        self, attempt: _Attempt, exc: psycopg.OperationalError
    ) -> Committed | None:
        """Tell whether a write whose connection broke was committed after all.

        Its events' chain head is its own: if the run's head is that one, the
        write landed and its answer stands. If the head is still the batch's
        base, nothing landed yet and the write is tried again (the fence makes
        a late commit of the lost try and the new one exclusive; `_late` tells
        which one it was).

        Raises:
            StoreError: it cannot tell (the write had no events, the server
                is still away, or the head is neither).
        """
        batch, done = attempt.batch, attempt.result
        if done is None:
            return None  # the connection broke before the COMMIT was sent
        unknown = StoreError(
            f"cannot write run {batch.run_id}: lost the connection to {self.url} "
            f"({one_line(exc)}) after sending the write, and cannot tell whether "
            "it landed; check the run's record"
        )
        if done.head_seq == batch.base_seq:
            raise unknown from exc  # no events: the head cannot tell
        try:
            row = self.get_run(batch.run_id)
        except NotFound:
            attempt.lost = done
            return None  # a new run that was not created (yet)
        except StoreError as again:
            raise unknown from again
        if (row.head_seq, row.head_hash) == (done.head_seq, done.head_hash):
            return done
        if (row.head_seq, row.epoch) == (batch.base_seq, batch.epoch):
            attempt.lost = done
            return None
        raise unknown from exc

    def _late(self, attempt: _Attempt, exc: Exception) -> Committed | None:
        """Tell whether a lost try landed late, after the retry `_landed` allowed.

        A one-statement write waiting on a lock goes on running on the server
        after its client's connection drops, and commits once the lock frees;
        its retry then fails the fence, or is refused (the lost try took the
        key, the grant or the room). Returns the lost try's answer if its
        first event follows the batch's base; None if there was no lost try,
        or another write's event follows the base: then the lost try can
        never land (its fence wants the base) and `exc` stands.

        Raises:
            StoreError: it cannot tell: the run is still at the base (the
                lost try may still land) or cannot be read.
        """
        batch, done = attempt.batch, attempt.lost
        if done is None or isinstance(exc, LeaseLost) or not batch.events:
            return None
        unknown = StoreError(
            f"cannot write run {batch.run_id}: lost the connection to {self.url} "
            "after sending the write, and cannot tell whether it landed; check "
            "the run's record"
        )
        seq = batch.base_seq + 1
        ours = _chain.chain_hash(
            batch.base_hash, seq, _canonical.dumps_fields(batch.events[0])
        )

        def look(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            return conn.execute(
                "SELECT r.head_seq, r.head_hash, e.hash FROM runs r LEFT JOIN "
                "events e ON e.run = r.id AND e.seq = %s WHERE r.run_id = %s",
                (seq, batch.run_id),
            ).fetchone()

        try:
            row = self._read(look, f"read run {batch.run_id}")
        except StoreError as again:
            raise unknown from again
        if row is None or row[0] == batch.base_seq:
            raise unknown from exc  # not created or not moved (yet)
        head_seq, head_hash, first = row
        if (head_seq, head_hash) == (done.head_seq, done.head_hash) or first == ours:
            return done
        return None

    def _commit(self, conn: psycopg.Connection[Any], attempt: _Attempt) -> Committed:
        w = Writer(conn)
        try:
            return self._write(w, attempt)
        finally:
            w.close()

    def _write(self, w: Writer, attempt: _Attempt) -> Committed:
        batch = attempt.batch
        attempt.result = None
        q = Statement()
        took_over: KeyRecord | None = None
        events = batch.events
        admitted = None
        charges = None if attempt.locked else counter_charges(batch)
        # A claim and a key update of one batch would be one statement's two
        # writes to one row, which cannot see each other: claim first, then.
        locked = charges is None and (
            attempt.locked
            or batch.limited
            or batch.approval is not None
            or (batch.claim is not None and batch.key_update is not None)
        )
        gate = ""
        closed = None
        if locked:
            tables, took_over = locked_reads(w, batch, self._schema)
            if tables is not None:
                events, admitted = apply_limits(tables, batch)
                if admitted.blocked is not None:
                    raise WriteBlocked(admitted.blocked)
                tables.flush(q)
                closed = closed_by(tables, batch.breaker_outcome)
        else:
            # One statement, in autocommit: atomic by itself, no BEGIN/COMMIT.
            if charges is not None:
                self._charge(q, batch, charges)
                # The fence reads the charge's answer: the charge runs first
                # (an uncorrelated subquery is a one-time filter, evaluated
                # before the run's row is read), and once (a CTE with a
                # volatile call is materialized, never inlined).
                gate = " AND (SELECT ok FROM ch)"
            if batch.claim is not None:
                c = batch.claim
                q.add(
                    "c",
                    "INSERT INTO idempotency_keys (tenant, principal_id, capability, "
                    "key, fingerprint, state, run_id, step, claimed_at, lease_until) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING "
                    "RETURNING 1",
                    (
                        c.id.tenant,
                        c.id.principal_id,
                        c.id.capability,
                        c.id.key,
                        c.fingerprint,
                        KeyState.IN_PROGRESS.value,
                        c.run_id,
                        c.step,
                        _us(c.now),
                        _us(c.lease_until),
                    ),
                    check="claim",
                )
            if batch.use_grant is not None:
                q.add(
                    "g",
                    "UPDATE approvals SET status='used' WHERE id=%s AND "
                    "status='approved' AND expires_at > %s RETURNING 1",
                    (batch.use_grant, _us(batch.at)),
                    check="grant",
                )
        if batch.return_grant is not None:
            given_back, back_params = return_grant("%s", batch.return_grant)
            q.add("rg", f"{given_back} RETURNING 1", back_params)
            # Given back before the run's row is locked, as the fence reads
            # it first (a one-time filter, like the charge's): a decider
            # locks a request's row, then its run's (`_approvals`), and the
            # other order could deadlock with it.
            gate += " AND (SELECT count(*) FROM rg) >= 0"
        if closed is not None:
            closing, closing_params = closing_requests("%s", closed, _us(batch.at))
            q.add("bc", f"{closing} RETURNING 1", closing_params)
            # Before the run's row is locked, as a given-back grant is (above).
            gate += " AND (SELECT count(*) FROM bc) >= 0"
        seq, head = batch.base_seq, batch.base_hash
        rows: list[Any] = []
        for event in events:
            seq += 1
            body = _canonical.dumps_fields(event)
            head = _chain.chain_hash(head, seq, body)
            rows += (seq, event.kind, event.step, body, head)
        sig = (
            None
            if self.record_key is None
            else self._mac(self.record_key).head(batch.run_id, seq, head)
        )
        lease = 0 if batch.lease_until is None else _us(batch.lease_until)
        if batch.new_run is not None:
            new = batch.new_run
            q.add(
                "r",
                f"INSERT INTO runs ({RUN_COLUMNS}) VALUES "  # noqa: S608  # constant column list
                "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                (
                    batch.run_id,
                    new.status,
                    new.tenant,
                    new.principal_id,
                    new.request,
                    new.created_at,
                    batch.at,
                    batch.epoch,
                    seq,
                    head,
                    sig,
                    None,
                    lease,
                ),
            )
        elif batch.status is None:  # a step: the head moves, nothing else
            q.add(
                "r",
                "UPDATE runs SET head_seq=%s, head_hash=%s, head_sig=%s, "  # noqa: S608  # constant gate
                "lease_until=GREATEST(lease_until, %s) WHERE run_id=%s AND epoch=%s "
                f"AND head_seq=%s{gate} RETURNING id",
                (seq, head, sig, lease, batch.run_id, batch.epoch, batch.base_seq),
                check="fence",
            )
        else:
            q.add(
                "r",
                "UPDATE runs SET head_seq=%s, head_hash=%s, head_sig=%s, "  # noqa: S608  # constant gate
                "updated_at=%s, status=%s, error_code=COALESCE(%s, error_code), "
                "lease_until=GREATEST(lease_until, %s) WHERE run_id=%s AND epoch=%s "
                f"AND head_seq=%s{gate} RETURNING id",
                (
                    seq,
                    head,
                    sig,
                    batch.at,
                    batch.status,
                    batch.error_code,
                    lease,
                    batch.run_id,
                    batch.epoch,
                    batch.base_seq,
                ),
                check="fence",
            )
        if rows:
            # From the run's row as this statement wrote it: no run, no events.
            # A VALUES list: unnest() of five arrays costs twice as much.
            q.add(
                "e",
                "INSERT INTO events (run, seq, kind, step, body, hash) "  # noqa: S608  # placeholders only
                f"SELECT r.id, x.* FROM r, (VALUES {_event_rows(len(events))}) AS x",
                rows,
            )
        if batch.key_update is not None:
            q.add("k", *key_update("%s", batch.key_update))
        if admitted is None:
            result = Committed(head_seq=seq, head_hash=head, took_over=took_over)
        else:
            result = Committed(
                head_seq=seq,
                head_hash=head,
                took_over=took_over,
                breaker_generation=admitted.breaker_generation,
                probe=admitted.probe,
                probe_at=admitted.probe_at,
            )
        sql, params = q.build()
        if locked:
            w.execute(sql, params)
            w.execute("COMMIT")
            attempt.result = result
            failed = w.sync()
        else:
            attempt.result = result
            try:
                w.conn.execute(sql, params)
                failed = None
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                failed = exc
        if failed is not None:
            attempt.result = None  # nothing of it was committed
            self._failed(w.conn, batch, failed)
        return result

    def _failed(
        self, conn: psycopg.Connection[Any], batch: Batch, exc: psycopg.Error
    ) -> None:
        """Turn a failed pipelined write into its answer; always raises."""
        rollback(conn)
        if isinstance(exc, pg_errors.UniqueViolation) and batch.new_run is not None:
            raise StoreError(
                f"cannot create run {batch.run_id} in {self.url}: a run with that "
                "id exists already"
            ) from exc
        if exc.sqlstate == _NO_ROOM:
            raise _NeedsLocks from exc
        if exc.sqlstate != _REQUIRE_FAILED:
            raise exc
        check = exc.diag.message_hint
        if check == "claim":
            raise _NeedsLocks from exc
        if check == "grant":
            assert batch.use_grant is not None
            raise WriteBlocked(GrantGone(approval_id=batch.use_grant)) from exc
        assert check == "fence", check
        row = conn.execute(
            "SELECT epoch, head_seq FROM runs WHERE run_id=%s", (batch.run_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no run {batch.run_id!r} in {self.url}") from exc
        epoch, head_seq = row
        raise fence_error(batch, epoch, head_seq) from exc

    def _charge(
        self, q: Statement, batch: Batch, charges: Sequence[tuple[Reserve, Decimal]]
    ) -> None:
        """Add the `tether_charge` call that checks and adds to the batch's counters."""
        locks = sorted(
            {
                lock_key(self._schema, "limit", r.limit_id, r.scope, str(r.window))
                for r, _ in charges
            }
        )
        q.add(
            "ch",
            "SELECT tether_charge(%s::bigint[], %s::text[], %s::text[], "
            "%s::bigint[], %s::boolean[], %s::numeric[], %s::numeric[], "
            "%s::numeric[], %s, %s) AS ok",
            (
                _array(locks),
                _array([_quoted(r.limit_id) for r, _ in charges]),
                _array([_quoted(r.scope) for r, _ in charges]),
                _array([r.window for r, _ in charges]),
                _array(
                    ["t" if r.kind is LimitKind.BUDGET else "f" for r, _ in charges]
                ),
                _array([r.amount for r, _ in charges]),
                _array([r.cap for r, _ in charges]),
                _array([delta for _, delta in charges]),
                f"{batch.run_id}/{batch.step}",
                _us(batch.at),
            ),
        )


# The charge's arrays are sent as array literals (text the server casts):
# psycopg's list dumper looks up each element's type on every call, which
# cost a tenth of a charged read's client time.


def _array(items: Sequence[object]) -> str:
    """Return a PostgreSQL array literal of already formatted elements."""
    return "{" + ",".join(map(str, items)) + "}"


def _quoted(text: str) -> str:
    """Return `text` as a double-quoted array element (any characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(slots=True)
class _Attempt:
    """One `commit` call across its tries."""

    batch: Batch
    result: Committed | None = None
    """The answer of the try whose COMMIT went out, were it to land."""
    lost: Committed | None = None
    """The answer of a try whose connection broke after its COMMIT went out,
    tried again while it had not landed: it may land late (see `_late`)."""
    locked: bool = False
    """The one-statement write found the key taken or a counter full: take the
    locks and decide it exactly this time."""


class _NeedsLocks(Exception):  # control flow, never escapes this module
    """The one statement found the key taken or a counter full: lock and decide it."""


@functools.cache
def _event_rows(n: int) -> str:
    """Return the placeholders of `n` event rows (the first typed for VALUES)."""
    first = "(%s::bigint, %s::text, %s::integer, %s::bytea, %s::bytea)"
    return ", ".join([first] + ["(%s, %s, %s, %s, %s)"] * (n - 1))
