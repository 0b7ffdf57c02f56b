"""The embedded SQLite backend: one file, WAL, safe for several processes on one host.

Every connection is set up the same way (WAL, `synchronous` as configured,
`busy_timeout` 10 s, foreign keys on) and every writing transaction begins with
`BEGIN IMMEDIATE`: a deferred transaction that upgrades to a write gets
SQLITE_BUSY at once, ignoring `busy_timeout`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

from tether import _canonical, _chain
from tether.errors import (
    ApprovalClosed,
    HeadMoved,
    LeaseLost,
    NotFound,
    StoreError,
    UsageError,
)
from tether.store import _limits
from tether.store._base import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Claim,
    Committed,
    GrantGone,
    KeyId,
    KeyRecord,
    KeyState,
    LimitRow,
    PendingExists,
    RunRow,
    Store,
    apply_limits,
    closed_reason,
    may_replace,
)
from tether.store._limits import BreakerRow, BreakerState

__all__ = ["BUSY_TIMEOUT_MS", "PAGE_SIZE", "SQLiteStore", "Synchronous"]

Synchronous = Literal["full", "normal"]
PAGE_SIZE = 8192
"""Page size of a new database file, in bytes."""
BUSY_TIMEOUT_MS = 10_000
"""How long a writer waits for the file lock before the store reports it busy."""

T = TypeVar("T")

_RUN_COLUMNS = (
    "run_id, status, tenant, principal_id, request, created_at, updated_at, "
    "epoch, head_seq, head_hash, head_sig, error_code, lease_until"
)


def _ts(value: datetime) -> str:
    return value.isoformat()


# Key and limit timestamps are integers (microseconds since the epoch): a key is
# claimed and settled on every keyed step, and formatting text costs more.
_us = _limits.to_us
_from_us = _limits.from_us


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


class SQLiteStore(Store):
    """A store in one SQLite file.

    Args:
        path: the database file; its folder is created when missing.
        synchronous: `"full"` (default: a step is on disk before `call` returns,
            through power loss too) or `"normal"` (several times faster; survives
            a process crash, but the last steps may be lost if the machine loses
            power).
        record_key: the key that signs chain heads; None leaves heads unsigned.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "full",
        record_key: bytes | None = None,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise StoreError(
                f"synchronous must be 'full' or 'normal', got {synchronous!r}"
            )
        self.path = Path(path)
        self.synchronous = synchronous
        self.record_key = record_key
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._pks: dict[str, int] = {}
        """Integer keys of the runs this store wrote, by run id."""
        self._macs: dict[bytes, _chain.Mac] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(
                self.path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE ourselves
                check_same_thread=False,  # guarded by self._lock
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the database {str(self.path)!r}: {exc}; check the path "
                "and its permissions, or pass --db"
            ) from exc
        try:
            self._configure()
            self._migrate()
        except StoreError:
            self._con.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._con.close()
            raise StoreError(
                f"{str(self.path)!r} is not a usable tether database ({exc}); "
                "point --db at another file"
            ) from exc

    # -- setup ------------------------------------------------------------------

    def _configure(self) -> None:
        con = self._con
        # 8 KiB pages (a new file only; an existing one keeps its own): a step's
        # events fill a 4 KiB leaf every few steps, and the splits made a
        # synchronous=normal step ~4 us slower (benchmarks/call_path.py); with
        # synchronous=full the fsync dominates and the size makes no difference.
        con.execute(f"PRAGMA page_size={PAGE_SIZE}")
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
        for attempt in range(200):
            if mode == "wal":
                break
            try:
                mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL needs an exclusive lock and returns
                # SQLITE_BUSY without calling the busy handler, so when several
                # processes open a fresh file at once the losers wait here.
                if "locked" not in str(exc) or attempt == 199:
                    raise
                time.sleep(0.01 + 0.0001 * attempt)  # noqa: TID251  # lock wait, not logic
        if mode != "wal":
            raise StoreError(
                f"{str(self.path)!r}: cannot switch to WAL mode (got {mode!r}); "
                "use a local file system"
            )
        con.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        con.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        scripts = sorted(
            (int(f.name.split("_", 1)[0]), f)
            for f in resources.files("tether.store.migrations")
            .joinpath("sqlite")
            .iterdir()
            if f.name.endswith(".sql")
        )
        latest = scripts[-1][0] if scripts else 0
        with self._write() as con:
            current = con.execute("PRAGMA user_version").fetchone()[0]
            if current > latest:
                raise StoreError(
                    f"{str(self.path)!r} has schema version {current}, newer than this "
                    f"tether knows ({latest}); upgrade tether"
                )
            for number, script in scripts:
                if number > current:
                    for statement in script.read_text().split(";\n"):
                        if statement.strip():
                            con.execute(statement)
                    con.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            con = self._con
            # BEGIN IMMEDIATE: a deferred transaction that upgrades to write gets
            # SQLITE_BUSY at once, ignoring busy_timeout.
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._lock:
                return fn(self._con)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {str(self.path)!r}: {exc}") from exc

    # -- writes -----------------------------------------------------------------

    def commit(self, batch: Batch) -> Committed:
        """Write `batch` in one transaction (one fsync with `synchronous=full`)."""
        # The transaction is spelled out rather than taken from `_write()`: a
        # generator-based context manager costs a microsecond per step.
        try:
            with self._lock:
                con = self._con
                con.execute("BEGIN IMMEDIATE")  # see _write
                try:
                    committed = self._commit(con, batch)
                    con.execute("COMMIT")
                except BaseException:
                    _rollback(con)
                    raise
                return committed
        except _Conflict as c:
            return Committed(
                head_seq=batch.base_seq, head_hash=batch.base_hash, conflict=c.record
            )
        except _Blocked as b:
            return Committed(
                head_seq=batch.base_seq, head_hash=batch.base_hash, blocked=b.why
            )
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
                raise _Blocked(GrantGone(approval_id=batch.use_grant))
        if batch.approval is not None:
            pending = _coalesce(con, batch.approval)
            if pending is not None:
                raise _Blocked(PendingExists(approval_id=pending))
            _insert_approval(con, batch.approval)
        events = batch.events
        admitted = None
        if batch.limited:
            events, admitted = apply_limits(_Tables(con), batch)
            if admitted.blocked is not None:
                raise _Blocked(admitted.blocked)
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
                f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608  # constant column list
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
            u = batch.key_update
            con.execute(
                "UPDATE idempotency_keys SET state=?, output=?, completed_at=? "
                "WHERE tenant=? AND principal_id=? AND capability=? AND key=? "
                "AND run_id=? AND step=?",
                (
                    u.state.value,
                    u.output,
                    _us(u.now),
                    u.id.tenant,
                    u.id.principal_id,
                    u.id.capability,
                    u.id.key,
                    u.run_id,
                    u.step,
                ),
            )
        if admitted is None:
            return Committed(head_seq=seq, head_hash=head, took_over=took_over)
        return Committed(
            head_seq=seq,
            head_hash=head,
            took_over=took_over,
            breaker_generation=admitted.breaker_generation,
            probe=admitted.probe,
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
        if epoch != batch.epoch:
            raise LeaseLost(
                f"run {batch.run_id} is held by lease epoch {epoch}, not {batch.epoch}; "
                "this worker's writes are refused"
            )
        raise HeadMoved(
            f"run {batch.run_id}: the record moved to event {head_seq} while this "
            f"writer expected {batch.base_seq}; two writers hold the run"
        )

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
        existing = _key_record(con, k)
        assert existing is not None  # the insert conflicted inside this transaction
        if not may_replace(existing, claim):
            raise _Conflict(existing)
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

    # -- reads ------------------------------------------------------------------

    def limit_rows(self, now: datetime) -> list[LimitRow]:
        """Return every limit counter and live lease set (for `tether status`)."""
        at = _limits.to_us(now)

        def query(con: sqlite3.Connection) -> list[LimitRow]:
            rows: dict[tuple[str, str, int], tuple[Decimal, Decimal, int]] = {}
            for lid, scope, window, holder, amount, until, charged in con.execute(
                "SELECT limit_id, scope, window, holder, amount, until, charged "
                "FROM limit_state WHERE holder <> '~' ORDER BY limit_id, scope, window"
            ):
                if holder != "" and until <= at and not charged:
                    continue  # a lapsed lease: gone
                used, held, count = rows.get((lid, scope, window), _NOTHING)
                if holder == "":
                    used += Decimal(amount)
                elif until > at:
                    held, count = held + Decimal(amount), count + 1
                elif charged:  # lapsed and spent: folded in at the next reservation
                    used += Decimal(amount)
                rows[(lid, scope, window)] = (used, held, count)
            return [
                LimitRow(
                    limit_id=lid,
                    scope=scope,
                    window=_limits.from_us(window) if window else None,
                    used=used,
                    held=held,
                    holds=count,
                )
                for (lid, scope, window), (used, held, count) in rows.items()
            ]

        return self._read(query)

    def _by_id(
        self, table: str, column: str, columns: str, value: str
    ) -> list[tuple[object, ...]]:
        """Return the rows whose id is `value`, else the (at most 2) it is a prefix of."""
        exact = f"SELECT {columns} FROM {table} WHERE {column}=?"  # noqa: S608  # constant names
        prefix = f"SELECT {columns} FROM {table} WHERE {column} >= ? AND {column} < ? LIMIT 2"  # noqa: S608

        def query(con: sqlite3.Connection) -> list[tuple[object, ...]]:
            rows = con.execute(exact, (value,)).fetchall()
            if not rows and len(value) >= 6:
                rows = con.execute(prefix, (value, value + "\U0010ffff")).fetchall()
            return rows

        return self._read(query)

    def take_over(
        self,
        run_id: str,
        *,
        parked: Sequence[str],
        orphaned: Sequence[str] = (),
        now: datetime | None = None,
    ) -> RunRow:
        """Bump a parked or orphaned run's lease epoch (see `Store.take_over`)."""
        row = self.get_run(run_id)
        at = 0 if now is None else _us(now)
        marks = ",".join("?" * len(parked)) or "NULL"
        lost = ",".join("?" * len(orphaned)) or "NULL"
        try:
            with self._write() as con:
                # RETURNING, not a read after COMMIT: by then another worker may
                # have taken the run over again, and its epoch is not ours.
                rows = con.execute(
                    f"UPDATE runs SET epoch=epoch+1 WHERE run_id=? AND epoch=? "  # noqa: S608  # placeholders only
                    f"AND (status IN ({marks}) OR (status IN ({lost}) AND lease_until <= ?)) "
                    f"RETURNING {_RUN_COLUMNS}",
                    (row.run_id, row.epoch, *parked, *orphaned, at),
                ).fetchall()  # every row: a RETURNING statement left open blocks COMMIT
                taken = rows[0] if rows else None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot take over run {run_id}: {exc}") from exc
        if taken is None:
            now_row = self.get_run(row.run_id)
            raise UsageError(
                f"run {row.run_id} is {now_row.status} (epoch {now_row.epoch}), not parked "
                "and not orphaned: only a parked run, or one whose writer's lease ran "
                "out, can be resumed"
            )
        return _run_row(taken)

    # -- approvals ----------------------------------------------------------------

    def latest_approval(
        self, tenant: str, principal_id: str, digest: bytes
    ) -> ApprovalRow | None:
        """Return the newest approval request for this digest, if any."""
        row = self._read(
            lambda con: con.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE tenant=? AND "  # noqa: S608  # constant column list
                "principal_id=? AND digest=? ORDER BY created_at DESC, id DESC LIMIT 1",
                (tenant, principal_id, digest),
            ).fetchone()
        )
        return None if row is None else _approval_row(row)

    def get_approval(self, approval_id: str) -> ApprovalRow:
        """Return one approval request (a unique prefix of 6+ characters works too)."""
        rows = self._by_id("approvals", "id", _APPROVAL_COLUMNS, approval_id)
        if len(rows) != 1:
            hint = (
                "it matches several requests; give more of it"
                if rows
                else "see `tether approvals list`"
            )
            raise NotFound(f"no approval request {approval_id!r}; {hint}")
        return _approval_row(rows[0])

    def list_approvals(
        self,
        *,
        status: ApprovalStatus | None = None,
        limit: int = 50,
        now: datetime | None = None,
        run_id: str | None = None,
    ) -> list[ApprovalRow]:
        """Return approval requests, newest first (see `Store.list_approvals`)."""
        sql = f"SELECT {_APPROVAL_COLUMNS} FROM approvals"  # noqa: S608  # constant column list
        params: tuple[object, ...] = ()
        at = None if now is None else _us(now)
        if status is ApprovalStatus.PENDING and at is not None:
            sql += " WHERE status='pending' AND expires_at > ?"
            params = (at,)
        elif status is ApprovalStatus.EXPIRED and at is not None:
            sql += " WHERE (status='expired' OR (status='pending' AND expires_at <= ?))"
            params = (at,)
        elif status is not None:
            sql += " WHERE status=?"
            params = (status.value,)
        if run_id is not None:
            sql += (" AND" if params else " WHERE") + " run_id=?"
            params = (*params, run_id)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = self._read(lambda con: con.execute(sql, (*params, limit)).fetchall())
        return [_approval_row(r) for r in rows]

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
    ) -> ApprovalRow:
        """Decide a pending request and record `event` in its run, in one transaction."""
        try:
            with self._lock:
                con = self._con
                con.execute("BEGIN IMMEDIATE")
                try:
                    current, closed = self._decide(
                        con, approval_id, status, by, note, now, event
                    )
                    con.execute("COMMIT")
                except BaseException:
                    _rollback(con)
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot decide {approval_id!r}: {exc}") from exc
        if closed:
            raise ApprovalClosed(closed_reason(current, now))
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
    ) -> tuple[ApprovalRow, bool]:
        """Decide inside the caller's transaction; return the row and whether it was closed."""
        select = f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id=?"  # noqa: S608  # constant column list
        row = con.execute(select, (approval_id,)).fetchone()
        if row is None:
            raise NotFound(f"no approval request {approval_id!r}")
        current = _approval_row(row)
        is_open = current.status is ApprovalStatus.PENDING and current.expires_at > now
        if status is not None and is_open:
            # The WHERE makes racing deciders safe even without this transaction.
            con.execute(
                "UPDATE approvals SET status=?, decided_by=?, decided_at=?, note=? "
                "WHERE id=? AND status='pending'",
                (status.value, by, _us(now), note, approval_id),
            )
            current = _approval_row(con.execute(select, (approval_id,)).fetchone())
        run = con.execute(
            "SELECT epoch, head_seq, head_hash FROM runs WHERE run_id=?",
            (current.run_id,),
        ).fetchone()
        if run is None:
            raise NotFound(f"no run {current.run_id!r}")
        closed = status is not None and not is_open
        self._commit(
            con,
            Batch(
                run_id=current.run_id,
                events=[
                    event(current, closed_reason(current, now) if closed else None)
                ],
                at=now,
                epoch=run[0],
                base_seq=run[1],
                base_hash=run[2],
            ),
        )
        return current, closed

    def breaker_row(self, breaker_id: str) -> BreakerRow:
        """Return one breaker's stored row (a closed one when it has none)."""
        return self._read(lambda con: _Tables(con).breaker(breaker_id))

    def breaker_rows(self) -> dict[str, BreakerRow]:
        """Return every breaker's stored row, by id."""
        rows = self._read(
            lambda con: con.execute(
                "SELECT id, state, since, generation, outcomes, probes, probe_deadline "
                "FROM breakers ORDER BY id"
            ).fetchall()
        )
        return {r[0]: _breaker_row(r[1:]) for r in rows}

    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the record of `key`, if any."""
        return self._read(lambda con: _key_record(con, key))

    def get_run(self, run_id: str) -> RunRow:
        """Return one run, by id or by a unique prefix of at least 6 characters."""
        rows = self._by_id("runs", "run_id", _RUN_COLUMNS, run_id)
        if len(rows) != 1:
            hint = (
                "it matches several runs; give more of it"
                if rows
                else ("see `tether runs list`")
            )
            raise NotFound(f"no run {run_id!r} in {str(self.path)!r}; {hint}")
        return _run_row(rows[0])

    def list_runs(self, *, limit: int = 50, status: str | None = None) -> list[RunRow]:
        """Return the newest runs first."""
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"  # noqa: S608  # constant column list
        params: tuple[object, ...] = ()
        if status is not None:
            sql += " WHERE status=?"
            params = (status,)
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
        rows = self._read(lambda con: con.execute(sql, (*params, limit)).fetchall())
        return [_run_row(r) for r in rows]

    def events(self, run_id: str) -> list[_chain.StoredEvent]:
        """Return a run's events in order."""
        rows = self._read(
            lambda con: con.execute(
                "SELECT e.seq, e.body, e.hash FROM events e JOIN runs r ON r.id = e.run "
                "WHERE r.run_id=? ORDER BY e.seq",
                (run_id,),
            ).fetchall()
        )
        return [_chain.StoredEvent(seq=s, body=b, hash=h) for s, b, h in rows]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._con.close()


def _rollback(con: sqlite3.Connection) -> None:
    # A failed COMMIT (SQLITE_BUSY, I/O error) may leave the transaction open;
    # without this every later write fails "within a transaction".
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")


class _Conflict(Exception):  # control flow, never escapes this module
    def __init__(self, existing: KeyRecord) -> None:
        self.record = existing


class _Blocked(Exception):  # control flow, never escapes this module: rolls back
    def __init__(self, why: _limits.Blocked | GrantGone | PendingExists) -> None:
        self.why = why


_EXACT_INT = 10**17
"""Below this, integer sums stay exact in SQLite's 64-bit integers."""
_NOTHING = (Decimal(0), Decimal(0), 0)


class _Tables:
    """`LimitTables` over a connection inside the caller's transaction."""

    __slots__ = ("con",)

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def counter(self, limit_id: str, scope: str, window: int) -> Decimal:
        row = self.con.execute(
            "SELECT amount FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
            "AND holder=''",
            (limit_id, scope, window),
        ).fetchone()
        return Decimal(0) if row is None else Decimal(row[0])

    def set_counter(
        self, limit_id: str, scope: str, window: int, value: Decimal, now: int
    ) -> None:
        self.con.execute(
            "INSERT INTO limit_state (limit_id, scope, window, holder, amount, until, "
            "charged) VALUES (?,?,?,'',?,0,0) ON CONFLICT DO UPDATE "
            "SET amount=excluded.amount",
            (limit_id, scope, window, str(value)),
        )

    def add_to_counter(
        self, limit_id: str, scope: str, window: int, delta: Decimal, now: int
    ) -> None:
        # Whole amounts (cents, counts: the common case) are added by SQLite in
        # one statement, exactly in 64-bit integers; a decimal anywhere (in the
        # delta or the stored value) is added by Python, read then written.
        if delta == delta.to_integral_value() and 0 <= delta < _EXACT_INT:
            cur = self.con.execute(
                "INSERT INTO limit_state (limit_id, scope, window, holder, amount, "
                "until, charged) VALUES (?,?,?,'',?,0,0) ON CONFLICT DO UPDATE SET "
                "amount=CAST(CAST(amount AS INTEGER) + CAST(excluded.amount AS INTEGER) "
                "AS TEXT) WHERE amount GLOB '[0-9]*' AND NOT amount GLOB '*[^0-9]*' "
                "AND length(amount) < 18",
                (limit_id, scope, window, str(int(delta))),
            )
            if cur.rowcount == 1:
                return
        value = self.counter(limit_id, scope, window) + delta
        self.set_counter(limit_id, scope, window, value, now)

    def usage(
        self, limit_id: str, scope: str, window: int, now: int
    ) -> tuple[Decimal, Decimal, int]:
        # One statement, one page: the counter and its holds sit side by side.
        rows = self.con.execute(
            "SELECT holder, amount, until, charged FROM limit_state "
            "WHERE limit_id=? AND scope=? AND window=?",
            (limit_id, scope, window),
        ).fetchall()
        used, total, count, lapsed = Decimal(0), Decimal(0), 0, None
        for holder, amount, until, charged in rows:
            if holder == "":
                used = Decimal(amount)
            elif until > now:
                total += Decimal(amount)
                count += 1
            else:
                lapsed = (lapsed or Decimal(0)) + (Decimal(amount) if charged else 0)
        if lapsed is not None:  # a crashed or hung worker's hold comes back by itself
            self.con.execute(
                "DELETE FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
                "AND holder NOT IN ('', '~') AND until <= ?",
                (limit_id, scope, window, now),
            )
            if lapsed:
                used += lapsed
                self.set_counter(limit_id, scope, window, used, now)
        return used, total, count

    def add_hold(
        self,
        limit_id: str,
        scope: str,
        window: int,
        run_id: str,
        step: int,
        amount: Decimal,
        until: int,
        *,
        charged: bool,
    ) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO limit_state (limit_id, scope, window, holder, "
            "amount, until, charged) VALUES (?,?,?,?,?,?,?)",
            (
                limit_id,
                scope,
                window,
                f"{run_id}/{step}",
                str(amount),
                until,
                int(charged),
            ),
        )

    def drop_hold(
        self, limit_id: str, scope: str, window: int, run_id: str, step: int
    ) -> bool:
        cur = self.con.execute(
            "DELETE FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
            "AND holder=?",
            (limit_id, scope, window, f"{run_id}/{step}"),
        )
        return cur.rowcount == 1

    def tat(self, limit_id: str, scope: str) -> int | None:
        row = self.con.execute(
            "SELECT until FROM limit_state WHERE limit_id=? AND scope=? AND window=0 "
            "AND holder='~'",
            (limit_id, scope),
        ).fetchone()
        return None if row is None else int(row[0])

    def set_tat(self, limit_id: str, scope: str, tat: int) -> None:
        self.con.execute(
            "INSERT INTO limit_state (limit_id, scope, window, holder, amount, until, "
            "charged) VALUES (?,?,0,'~','',?,0) ON CONFLICT DO UPDATE "
            "SET until=excluded.until",
            (limit_id, scope, tat),
        )

    def breaker(self, breaker_id: str) -> BreakerRow:
        row = self.con.execute(
            "SELECT state, since, generation, outcomes, probes, probe_deadline "
            "FROM breakers WHERE id=?",
            (breaker_id,),
        ).fetchone()
        return BreakerRow() if row is None else _breaker_row(row)

    def set_breaker(self, breaker_id: str, row: BreakerRow) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO breakers (id, state, since, generation, outcomes, "
            "probes, probe_deadline) VALUES (?,?,?,?,?,?,?)",
            (
                breaker_id,
                row.state.value,
                row.since,
                row.generation,
                row.outcomes,
                row.probes,
                row.probe_deadline,
            ),
        )

    def push_sample(
        self, breaker_id: str, code: str, window: int, min_calls: int, generation: int
    ) -> bool:
        row = self.con.execute(
            "SELECT state, generation, outcomes FROM breakers WHERE id=?",
            (breaker_id,),
        ).fetchone()
        if row is None or row[0] != "closed" or row[1] != generation:
            return False
        outcomes: str = row[2]
        if len(outcomes) == min_calls - 1:
            return False
        pushed = (outcomes + code)[-window:]
        # A full window of successes stays the same: a healthy upstream's
        # breaker is read, never written.
        if pushed != outcomes:
            self.con.execute(
                "UPDATE breakers SET outcomes=? WHERE id=?", (pushed, breaker_id)
            )
        return True


_APPROVAL_COLUMNS = (
    "id, run_id, step, tenant, principal_id, on_behalf_of, capability, version, args, "
    "preview, digest, policy_version, rule_ids, reasons, approvers, status, created_at, "
    "expires_at, decided_by, decided_at, note"
)


def _coalesce(con: sqlite3.Connection, a: ApprovalRow) -> str | None:
    """Return a live pending request for the same call; mark lapsed ones expired."""
    key = (a.tenant, a.principal_id, a.digest)
    row = con.execute(
        "SELECT id FROM approvals WHERE tenant=? AND principal_id=? AND digest=? "
        "AND status='pending' AND expires_at > ? LIMIT 1",
        (*key, _us(a.created_at)),
    ).fetchone()
    if row is not None:
        return str(row[0])
    con.execute(
        "UPDATE approvals SET status='expired' WHERE tenant=? AND principal_id=? "
        "AND digest=? AND status='pending' AND expires_at <= ?",
        (*key, _us(a.created_at)),
    )
    return None


def _insert_approval(con: sqlite3.Connection, a: ApprovalRow) -> None:
    con.execute(
        f"INSERT INTO approvals ({_APPROVAL_COLUMNS}) VALUES "  # noqa: S608  # constant column list
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
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
            _canonical.dumps(list(a.rule_ids)).decode(),
            _canonical.dumps(list(a.reasons)).decode(),
            _canonical.dumps(list(a.approvers)).decode(),
            a.status.value,
            _us(a.created_at),
            _us(a.expires_at),
            a.decided_by,
            None if a.decided_at is None else _us(a.decided_at),
            a.note,
        ),
    )


def _approval_row(row: Sequence[Any]) -> ApprovalRow:
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
        args=args,
        preview=preview,
        digest=digest,
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


def _breaker_row(row: Sequence[Any]) -> BreakerRow:
    state, since, generation, outcomes, probes, deadline = row
    return BreakerRow(
        state=BreakerState(state),
        since=since,
        generation=generation,
        outcomes=outcomes,
        probes=probes,
        probe_deadline=deadline,
    )


def _key_record(con: sqlite3.Connection, k: KeyId) -> KeyRecord | None:
    row = con.execute(
        "SELECT state, fingerprint, run_id, step, output, claimed_at, lease_until, "
        "completed_at FROM idempotency_keys "
        "WHERE tenant=? AND principal_id=? AND capability=? AND key=?",
        (k.tenant, k.principal_id, k.capability, k.key),
    ).fetchone()
    if row is None:
        return None
    state, fp, run_id, step, output, claimed, lease, completed = row
    return KeyRecord(
        state=KeyState(state),
        fingerprint=fp,
        run_id=run_id,
        step=step,
        output=output,
        claimed_at=_from_us(claimed),
        lease_until=_from_us(lease),
        completed_at=None if completed is None else _from_us(completed),
    )


def _run_row(row: tuple[object, ...]) -> RunRow:
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
        run_id=str(run_id),
        status=str(status),
        tenant=str(tenant),
        principal_id=str(principal_id),
        request=str(request),
        created_at=_dt(str(created)),
        updated_at=_dt(str(updated)),
        epoch=int(epoch),  # type: ignore[call-overload]  # INTEGER column
        head_seq=int(head_seq),  # type: ignore[call-overload]  # INTEGER column
        head_hash=_blob(head_hash),
        head_sig=None if head_sig is None else _blob(head_sig),
        error_code=None if error_code is None else str(error_code),
        lease_until=_from_us(int(lease_until)) if lease_until else None,  # type: ignore[call-overload]  # INTEGER column
    )


def _blob(value: object) -> bytes:
    assert isinstance(value, bytes), value  # BLOB columns read back as bytes
    return value
