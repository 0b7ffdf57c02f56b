"""The PostgreSQL backend: one database shared by every worker on every host.

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

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from tether import _canonical, _chain
from tether.errors import (
    ApprovalClosed,
    ConfigError,
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
from tether.store._limits import BreakerRow, BreakerState, LimitKind, Reserve

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_POOL_SIZE",
    "POOL_TIMEOUT_S",
    "PostgresStore",
    "parse_url",
]

DEFAULT_POOL_SIZE = 4
"""Connections a store keeps at most, unless the URL says `?pool_size=N`."""
POOL_TIMEOUT_S = 10.0
"""How long an operation waits for a free (or new) connection before it fails."""
CONNECT_TIMEOUT_S = 10
"""libpq's `connect_timeout`, unless the URL sets its own."""
RETRIES = 5
"""Deadlocks and serialization failures retried before a write gives up."""

T = TypeVar("T")

_us = _limits.to_us
_from_us = _limits.from_us
_OPTIONS = ("pool_size",)
"""Query options tether reads itself; every other one goes to libpq."""

_RUN_COLUMNS = (
    "run_id, status, tenant, principal_id, request, created_at, updated_at, "
    "epoch, head_seq, head_hash, head_sig, error_code, lease_until"
)
_APPROVAL_COLUMNS = (
    "id, run_id, step, tenant, principal_id, on_behalf_of, capability, version, args, "
    "preview, digest, policy_version, rule_ids, reasons, approvers, status, created_at, "
    "expires_at, decided_by, decided_at, note"
)
_BREAKER_COLUMNS = "id, state, since, generation, outcomes, probes, probe_deadline"
_LIMIT_COLUMNS = 'limit_id, scope, "window", holder, amount, until, charged'

_SELECT_GROUP = (
    f"SELECT {_LIMIT_COLUMNS} FROM limit_state "  # noqa: S608  # constant column list
    'WHERE limit_id=%s AND scope=%s AND "window"=%s'
)
_SELECT_BREAKER = f"SELECT {_BREAKER_COLUMNS} FROM breakers WHERE id=%s"  # noqa: S608  # constant column list
_UPSERT_LIMIT = (
    f"INSERT INTO limit_state ({_LIMIT_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s) "  # noqa: S608  # constant column list
    'ON CONFLICT (limit_id, scope, "window", holder) DO UPDATE SET '
    "amount=EXCLUDED.amount, until=EXCLUDED.until, charged=EXCLUDED.charged"
)

_REQUIRE_FAILED = "TT001"
"""The SQLSTATE `tether_require` raises (0001_init.sql); its hint names the check."""
_NO_ROOM = "TT002"
"""The SQLSTATE `tether_charge` raises (0005_charge.sql): a counter has no room."""


def parse_url(url: str) -> tuple[str, int]:
    """Split a `postgresql://` URL into libpq's connection string and the pool size.

    Raises:
        ConfigError: an option neither tether nor libpq knows, or a bad pool size.
    """
    shown = _safe_url(url)
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    size_text = query.pop("pool_size", [str(DEFAULT_POOL_SIZE)])[-1]
    try:
        size = int(size_text)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(
            f"database URL {shown!r}: pool_size must be a whole number >= 1, "
            f"got {size_text!r}"
        )
    # quote, not quote_plus: libpq reads no "+" as a space.
    libpq_url = parts._replace(
        query=urlencode(query, doseq=True, quote_via=quote)
    ).geturl()
    try:
        params = conninfo_to_dict(libpq_url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"database URL {shown!r}: {_one_line(exc)}; tether knows ?pool_size=N, "
            "the rest must be libpq connection parameters"
        ) from exc
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    return make_conninfo("", **params), size


def _safe_url(url: str) -> str:
    from tether.store import safe_url  # the package imports this module lazily

    return safe_url(url)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _lock_key(*parts: str) -> int:
    """Return a signed 64-bit advisory lock key for `parts`."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore(Store):
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

    def __init__(
        self,
        url: str,
        *,
        pool_size: int | None = None,
        record_key: bytes | None = None,
    ) -> None:
        conninfo, url_pool_size = parse_url(url)
        self.url = _safe_url(url)
        self.record_key = record_key
        self._macs: dict[bytes, _chain.Mac] = {}
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                self._schema = self._migrate(conn)
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"cannot connect to {self.url}: {_one_line(exc)}; check the server "
                "is running and the URL"
            ) from exc
        except psycopg.Error as exc:
            raise StoreError(
                f"{self.url} is not a usable tether database ({_one_line(exc)}); "
                "check the URL's database and search_path"
            ) from exc
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size or url_pool_size,
            kwargs={"autocommit": True},
            timeout=POOL_TIMEOUT_S,
            name="tether",
            open=False,
        )
        self._pool.open(wait=False)
        self._conninfo = conninfo
        # Deciding a request notifies this channel; a worker waiting for news
        # listens on it (one per schema: stores in other schemas are others).
        self._channel = (
            "tether_news_" + hashlib.sha256(self._schema.encode()).hexdigest()[:16]
        )
        self._listener: psycopg.Connection[Any] | None = None
        self._listen_lock = threading.Lock()

    # -- setup ------------------------------------------------------------------

    def _migrate(self, conn: psycopg.Connection[Any]) -> str:
        """Bring the schema to the latest version; return the schema's name."""
        scripts = sorted(
            (int(f.name.split("_", 1)[0]), f)
            for f in resources.files("tether.store.migrations")
            .joinpath("postgres")
            .iterdir()
            if f.name.endswith(".sql")
        )
        latest = scripts[-1][0] if scripts else 0
        schema, current = self._version(conn)
        if current is None or current < latest:
            with conn.transaction():
                # Processes opening a fresh database together queue here; the
                # first migrates, the others find the work done.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema, "migrate"),)
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
                )
                _, current = self._version(conn)
                for number, script in scripts:
                    if number > (current or 0):
                        conn.execute(script.read_text())  # no parameters: a script
                if (current or 0) < latest:
                    conn.execute("DELETE FROM schema_version")
                    conn.execute("INSERT INTO schema_version VALUES (%s)", (latest,))
                current = latest
        if current > latest:
            raise StoreError(
                f"{self.url} has schema version {current}, newer than this tether "
                f"knows ({latest}); upgrade tether"
            )
        return schema

    def _version(self, conn: psycopg.Connection[Any]) -> tuple[str, int | None]:
        """Return the schema tether's tables go in, and its version (None: none yet)."""
        row = conn.execute(
            "SELECT current_schema(), to_regclass('schema_version') IS NOT NULL"
        ).fetchone()
        assert row is not None
        schema, exists = row
        if schema is None:
            raise StoreError(
                f"{self.url}: no schema of the search_path exists; create it or "
                "fix ?options=-csearch_path"
            )
        if not exists:
            return str(schema), None
        found = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return str(schema), None if found is None or found[0] is None else int(found[0])

    def _run(
        self,
        fn: Callable[[psycopg.Connection[Any]], T],
        what: str,
        *,
        lost: Callable[[psycopg.OperationalError], T | None] | None = None,
    ) -> T:
        """Run `fn` on a pooled connection, retrying what is safe to retry.

        A deadlock or serialization failure rolled the transaction back: it is
        tried again, a bounded number of times. A lost connection is replaced;
        `lost` then says whether to try once more (returning None), gives the
        answer (a write that landed before the connection went), or raises.
        Without `lost`, a lost connection is a `StoreError`.
        """
        reconnected = False
        for attempt in range(RETRIES + 1):
            try:
                with self._pool.connection() as conn:
                    try:
                        return fn(conn)
                    except BaseException:
                        _rollback(conn)
                        raise
            except (
                pg_errors.DeadlockDetected,
                pg_errors.SerializationFailure,
            ) as exc:
                if attempt == RETRIES:
                    raise StoreError(
                        f"cannot {what} in {self.url}: it conflicted with other "
                        f"writers {RETRIES + 1} times ({_one_line(exc)}); try again"
                    ) from exc
            except PoolTimeout as exc:
                raise StoreError(
                    f"cannot {what}: no connection to {self.url} within "
                    f"{POOL_TIMEOUT_S:g} s; check the server is running and the URL"
                ) from exc
            except psycopg.OperationalError as exc:
                # The connection broke (server restart, network): the pool drops
                # it on return; check() drops its idle siblings, dead too.
                self._pool.check()
                gone = StoreError(
                    f"cannot {what}: lost the connection to {self.url} "
                    f"({_one_line(exc)}); check the server, then try again"
                )
                if lost is None:
                    raise gone from exc
                # Asked after every loss, not just the first: a retry may land
                # before its own connection goes, and its answer must stand.
                answer = lost(exc)
                if answer is not None:
                    return answer
                if reconnected:
                    raise gone from exc  # twice lost, nothing landed: give up
                reconnected = True
            except psycopg.Error as exc:
                raise StoreError(
                    f"cannot {what} in {self.url}: {_one_line(exc)}"
                ) from exc
        raise AssertionError("the loop returns or raises")  # pragma: no cover

    def _read(self, fn: Callable[[psycopg.Connection[Any]], T], what: str) -> T:
        # A read is safe to repeat: after a lost connection it is tried once more.
        return self._run(fn, what, lost=lambda exc: None)

    # -- writes -----------------------------------------------------------------

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
        except _Conflict as c:
            return Committed(
                head_seq=batch.base_seq, head_hash=batch.base_hash, conflict=c.record
            )
        except _Blocked as b:
            return Committed(
                head_seq=batch.base_seq, head_hash=batch.base_hash, blocked=b.why
            )

    def _landed(
        self, attempt: _Attempt, exc: psycopg.OperationalError
    ) -> Committed | None:
        """Tell whether a write whose connection broke was committed after all.

        Its events' chain head is its own: if the run's head is that one, the
        write landed and its answer stands. If the head is still the batch's
        base, nothing landed and the write is tried again (the fence makes a
        late commit of the lost try and the new one exclusive).

        Raises:
            StoreError: it cannot tell (the write had no events, the server
                is still away, or the head is neither).
        """
        batch, done = attempt.batch, attempt.result
        if done is None:
            return None  # the connection broke before the COMMIT was sent
        unknown = StoreError(
            f"cannot write run {batch.run_id}: lost the connection to {self.url} "
            f"({_one_line(exc)}) after sending the write, and cannot tell whether "
            "it landed; check the run's record"
        )
        if done.head_seq == batch.base_seq:
            raise unknown from exc  # no events: the head cannot tell
        try:
            row = self.get_run(batch.run_id)
        except NotFound:
            return None  # a new run that was not created
        except StoreError as again:
            raise unknown from again
        if (row.head_seq, row.head_hash) == (done.head_seq, done.head_hash):
            return done
        if (row.head_seq, row.epoch) == (batch.base_seq, batch.epoch):
            return None
        raise unknown from exc

    def _commit(self, conn: psycopg.Connection[Any], attempt: _Attempt) -> Committed:
        w = _Writer(conn)
        try:
            return self._write(w, attempt)
        finally:
            w.close()

    def _write(self, w: _Writer, attempt: _Attempt) -> Committed:
        batch = attempt.batch
        attempt.result = None
        q = _Statement()
        took_over: KeyRecord | None = None
        events = batch.events
        admitted = None
        charges = None if attempt.locked else _counter_charges(batch)
        # A claim and a key update of one batch would be one statement's two
        # writes to one row, which cannot see each other: claim first, then.
        locked = charges is None and (
            attempt.locked
            or batch.limited
            or batch.approval is not None
            or (batch.claim is not None and batch.key_update is not None)
        )
        gate = ""
        if locked:
            tables, took_over = self._locked_reads(w, batch)
            if tables is not None:
                events, admitted = apply_limits(tables, batch)
                if admitted.blocked is not None:
                    raise _Blocked(admitted.blocked)
                tables.flush(q)
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
                f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES "  # noqa: S608  # constant column list
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
            u = batch.key_update
            q.add(
                "k",
                "UPDATE idempotency_keys SET state=%s, output=%s, completed_at=%s "
                "WHERE tenant=%s AND principal_id=%s AND capability=%s AND key=%s "
                "AND run_id=%s AND step=%s",
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
            result = Committed(head_seq=seq, head_hash=head, took_over=took_over)
        else:
            result = Committed(
                head_seq=seq,
                head_hash=head,
                took_over=took_over,
                breaker_generation=admitted.breaker_generation,
                probe=admitted.probe,
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
        _rollback(conn)
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
            raise _Blocked(GrantGone(approval_id=batch.use_grant)) from exc
        assert check == "fence", check
        row = conn.execute(
            "SELECT epoch, head_seq FROM runs WHERE run_id=%s", (batch.run_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no run {batch.run_id!r} in {self.url}") from exc
        epoch, head_seq = row
        if epoch != batch.epoch:
            raise LeaseLost(
                f"run {batch.run_id} is held by lease epoch {epoch}, not {batch.epoch}; "
                "this worker's writes are refused"
            ) from exc
        raise HeadMoved(
            f"run {batch.run_id}: the record moved to event {head_seq} while this "
            f"writer expected {batch.base_seq}; two writers hold the run"
        ) from exc

    def _charge(
        self, q: _Statement, batch: Batch, charges: Sequence[tuple[Reserve, Decimal]]
    ) -> None:
        """Add the `tether_charge` call that checks and adds to the batch's counters."""
        locks = sorted(
            {
                _lock_key(self._schema, "limit", r.limit_id, r.scope, str(r.window))
                for r, _ in charges
            }
        )
        q.add(
            "ch",
            "SELECT tether_charge(%s::bigint[], %s::text[], %s::text[], "
            "%s::bigint[], %s::boolean[], %s::numeric[], %s::numeric[], "
            "%s::numeric[], %s, %s) AS ok",
            (
                locks,
                [r.limit_id for r, _ in charges],
                [r.scope for r, _ in charges],
                [r.window for r, _ in charges],
                [r.kind is LimitKind.BUDGET for r, _ in charges],
                [r.amount for r, _ in charges],
                [r.cap for r, _ in charges],
                [delta for _, delta in charges],
                f"{batch.run_id}/{batch.step}",
                _us(batch.at),
            ),
        )

    def _locked_reads(
        self, w: _Writer, batch: Batch
    ) -> tuple[_Tables | None, KeyRecord | None]:
        """Take the batch's locks and read what its checks need, in one round trip.

        Runs the claim, the grant and the approval check in SQLite's order, so a
        batch refused for two reasons is refused for the same one everywhere.
        """
        w.execute("BEGIN")
        claimed = None
        if batch.claim is not None:
            claimed = self._claim_insert(w, batch.claim)
        grant = None
        if batch.use_grant is not None:
            grant = w.execute(
                "UPDATE approvals SET status='used' WHERE id=%s AND status='approved' "
                "AND expires_at > %s RETURNING 1",
                (batch.use_grant, _us(batch.at)),
            )
        groups, breakers = _limit_keys(batch) if batch.limited else ((), ())
        keys = [_lock_key(self._schema, "limit", *map(str, g)) for g in groups]
        keys += [_lock_key(self._schema, "breaker", b) for b in breakers]
        a = batch.approval
        if a is not None:
            keys.append(
                _lock_key(
                    self._schema, "approval", a.tenant, a.principal_id, a.digest.hex()
                )
            )
        # One simple statement per lock and per read: the server runs the
        # pipelined statements in order, so the locks are taken sorted (no
        # deadlock between two batches), and each read's snapshot is taken
        # after every lock is held. (An unnest() of them all costs the server
        # two to three times more.)
        for key in sorted(set(keys)):
            w.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        limit_rows = [w.execute(_SELECT_GROUP, g) for g in groups]
        breaker_rows = [w.execute(_SELECT_BREAKER, (b,)) for b in breakers]
        pending = None
        if a is not None:
            pending = w.execute(
                "SELECT id FROM approvals WHERE tenant=%s AND principal_id=%s AND "
                "digest=%s AND status='pending' AND expires_at > %s LIMIT 1",
                (a.tenant, a.principal_id, a.digest, _us(a.created_at)),
            )
        failed = w.sync()
        if failed is not None:
            raise failed
        took_over = None
        if batch.claim is not None:
            assert claimed is not None
            if claimed.fetchone() is None:
                took_over = self._claim_taken(w, batch.claim)
        if grant is not None and grant.fetchone() is None:
            assert batch.use_grant is not None
            raise _Blocked(GrantGone(approval_id=batch.use_grant))
        if a is not None:
            assert pending is not None
            found = pending.fetchone()
            if found is not None:
                raise _Blocked(PendingExists(approval_id=str(found[0])))
            w.execute(
                "UPDATE approvals SET status='expired' WHERE tenant=%s AND "
                "principal_id=%s AND digest=%s AND status='pending' AND expires_at <= %s",
                (a.tenant, a.principal_id, a.digest, _us(a.created_at)),
            )
            _insert_approval(w, a)
        if not batch.limited:
            return None, took_over
        tables = _Tables(self, w)
        for g in groups:
            tables.groups[g] = {}
        for b in breakers:
            tables.breakers[b] = None
        for cur in limit_rows:
            tables.load_limits(cur.fetchall())
        for cur in breaker_rows:
            tables.load_breakers(cur.fetchall())
        return tables, took_over

    def _claim_insert(self, w: _Writer, claim: Claim) -> psycopg.Cursor[Any]:
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

    def _claim_taken(self, w: _Writer, claim: Claim) -> KeyRecord:
        """Decide a claim whose key has a record: take it over, or conflict."""
        existing = _key_record(w.conn, claim.id, lock=True)
        assert existing is not None  # keys are never deleted
        if not may_replace(existing, claim):
            raise _Conflict(existing)
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

    def _mac(self, key: bytes) -> _chain.Mac:
        # record_key may be set after opening (Tether does); build the pads once per key.
        mac = self._macs.get(key)
        if mac is None:
            mac = self._macs[key] = _chain.Mac(key)
        return mac

    # -- reads ------------------------------------------------------------------

    def limit_rows(self, now: datetime) -> list[LimitRow]:
        """Return every limit counter and live lease set (for `tether status`)."""
        at = _us(now)

        def query(conn: psycopg.Connection[Any]) -> list[LimitRow]:
            rows: dict[tuple[str, str, int], tuple[Decimal, Decimal, int]] = {}
            for lid, scope, window, holder, amount, until, charged in conn.execute(
                f"SELECT {_LIMIT_COLUMNS} FROM limit_state WHERE holder <> '~' "  # noqa: S608  # constant column list
                'ORDER BY limit_id, scope, "window"'
            ):
                if holder != "" and until <= at and not charged:
                    continue  # a lapsed lease: gone
                used, held, count = rows.get((lid, scope, window), _NOTHING)
                if holder == "":
                    used += amount
                elif until > at:
                    held, count = held + amount, count + 1
                elif charged:  # lapsed and spent: folded in at the next reservation
                    used += amount
                rows[(lid, scope, window)] = (used, held, count)
            return [
                LimitRow(
                    limit_id=lid,
                    scope=scope,
                    window=_from_us(window) if window else None,
                    used=used,
                    held=held,
                    holds=count,
                )
                for (lid, scope, window), (used, held, count) in rows.items()
            ]

        return self._read(query, "read the limits")

    def breaker_row(self, breaker_id: str) -> BreakerRow:
        """Return one breaker's stored row (a closed one when it has none)."""
        row = self._read(
            lambda conn: conn.execute(
                f"SELECT {_BREAKER_COLUMNS} FROM breakers WHERE id=%s",  # noqa: S608  # constant column list
                (breaker_id,),
            ).fetchone(),
            "read a breaker",
        )
        return BreakerRow() if row is None else _breaker_row(row[1:])

    def breaker_rows(self) -> dict[str, BreakerRow]:
        """Return every breaker's stored row, by id."""
        rows = self._read(
            lambda conn: conn.execute(
                f"SELECT {_BREAKER_COLUMNS} FROM breakers ORDER BY id"  # noqa: S608  # constant column list
            ).fetchall(),
            "read the breakers",
        )
        return {r[0]: _breaker_row(r[1:]) for r in rows}

    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the record of `key`, if any."""
        return self._read(lambda conn: _key_record(conn, key), "read a key")

    def _by_id(
        self, table: str, column: str, columns: str, value: str
    ) -> list[tuple[Any, ...]]:
        """Return the rows whose id is `value`, else the (at most 2) it is a prefix of."""
        exact = f"SELECT {columns} FROM {table} WHERE {column}=%s"  # noqa: S608  # constant names
        # The id columns are COLLATE "C": the range is a prefix, in byte order.
        prefix = f"SELECT {columns} FROM {table} WHERE {column} >= %s AND {column} < %s LIMIT 2"  # noqa: S608

        def query(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            rows = conn.execute(exact, (value,)).fetchall()
            if not rows and len(value) >= 6:
                rows = conn.execute(prefix, (value, value + "\U0010ffff")).fetchall()
            return rows

        if "\0" in value:
            return []  # PostgreSQL text holds no NUL: no id has one
        return self._read(query, f"read {table}")

    def get_run(self, run_id: str) -> RunRow:
        """Return one run, by id or by a unique prefix of at least 6 characters."""
        rows = self._by_id("runs", "run_id", _RUN_COLUMNS, run_id)
        if len(rows) != 1:
            hint = (
                "it matches several runs; give more of it"
                if rows
                else "see `tether runs list`"
            )
            raise NotFound(f"no run {run_id!r} in {self.url}; {hint}")
        return _run_row(rows[0])

    def list_runs(self, *, limit: int = 50, status: str | None = None) -> list[RunRow]:
        """Return the newest runs first."""
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"  # noqa: S608  # constant column list
        params: tuple[object, ...] = ()
        if status is not None:
            sql += " WHERE status=%s"
            params = (status,)
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT %s"
        rows = self._read(
            lambda conn: conn.execute(sql, (*params, limit)).fetchall(), "list runs"
        )
        return [_run_row(r) for r in rows]

    def events(self, run_id: str) -> list[_chain.StoredEvent]:
        """Return a run's events in order."""
        if "\0" in run_id:
            return []
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT e.seq, e.body, e.hash FROM events e JOIN runs r ON r.id = e.run "
                "WHERE r.run_id=%s ORDER BY e.seq",
                (run_id,),
            ).fetchall(),
            f"read run {run_id}",
        )
        return [_chain.StoredEvent(seq=s, body=b, hash=h) for s, b, h in rows]

    def take_over(
        self,
        run_id: str,
        *,
        parked: Sequence[str],
        orphaned: Sequence[str] = (),
        now: datetime | None = None,
    ) -> RunRow:
        """Bump a parked or orphaned run's lease epoch (see `Store.take_over`).

        One conditional `UPDATE`: of workers racing for a run, the first bumps
        the epoch and the others, re-checking the row once its lock is free,
        find the epoch moved and are refused.
        """
        row = self.get_run(run_id)
        at = 0 if now is None else _us(now)
        taken = self._run(
            lambda conn: conn.execute(
                f"UPDATE runs SET epoch=epoch+1 WHERE run_id=%s AND epoch=%s "  # noqa: S608  # constant column list
                "AND (status = ANY(%s) OR (status = ANY(%s) AND lease_until <= %s)) "
                f"RETURNING {_RUN_COLUMNS}",
                (row.run_id, row.epoch, list(parked), list(orphaned), at),
            ).fetchone(),
            f"take over run {run_id}",
        )
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
            lambda conn: conn.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE tenant=%s AND "  # noqa: S608  # constant column list
                "principal_id=%s AND digest=%s ORDER BY created_at DESC, id DESC LIMIT 1",
                (tenant, principal_id, digest),
            ).fetchone(),
            "read approvals",
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
            sql += " WHERE status='pending' AND expires_at > %s"
            params = (at,)
        elif status is ApprovalStatus.EXPIRED and at is not None:
            sql += (
                " WHERE (status='expired' OR (status='pending' AND expires_at <= %s))"
            )
            params = (at,)
        elif status is not None:
            sql += " WHERE status=%s"
            params = (status.value,)
        if run_id is not None:
            sql += (" AND" if params else " WHERE") + " run_id=%s"
            params = (*params, run_id)
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        rows = self._read(
            lambda conn: conn.execute(sql, (*params, limit)).fetchall(),
            "list approvals",
        )
        return [_approval_row(r) for r in rows]

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
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id=%s FOR UPDATE",  # noqa: S608  # constant column list
            (approval_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no approval request {approval_id!r}")
        current = _approval_row(row)
        is_open = current.status is ApprovalStatus.PENDING and current.expires_at > now
        if status is not None and is_open:
            updated = conn.execute(
                "UPDATE approvals SET status=%s, decided_by=%s, decided_at=%s, "  # noqa: S608  # constant column list
                f"note=%s WHERE id=%s RETURNING {_APPROVAL_COLUMNS}",
                (status.value, by, _us(now), note, approval_id),
            ).fetchone()
            assert updated is not None  # the row is locked by this transaction
            current = _approval_row(updated)
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

    def wait_for_news(self, seconds: float, sleep: Callable[[float], None]) -> None:
        """Wait up to `seconds`, less once an approval request is decided (LISTEN/NOTIFY).

        The first wait opens a connection of its own that listens; a decision
        made after that wakes the waiter as it commits, from any host. While
        the server cannot be reached, it waits with `sleep`, as a poller does.
        """
        with self._listen_lock:
            try:
                conn = self._listener
                if conn is None or conn.closed:
                    conn = self._listener = psycopg.connect(
                        self._conninfo, autocommit=True
                    )
                    conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
                    )
                for _ in conn.notifies(timeout=seconds, stop_after=1):
                    pass
            except psycopg.Error:
                self._close_listener()
            else:
                return
        sleep(seconds)

    def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        """Close the pool's connections (and the listener's)."""
        with self._listen_lock:
            self._close_listener()
        self._pool.close()


# -- plumbing --------------------------------------------------------------------------


@dataclass(slots=True)
class _Attempt:
    """One `commit` call across its tries."""

    batch: Batch
    result: Committed | None = None
    """The answer of the try whose COMMIT went out, were it to land."""
    locked: bool = False
    """The one-statement write found the key taken or a counter full: take the
    locks and decide it exactly this time."""


class _Writer:
    """Queues statements on one connection in pipeline mode; `sync` sends them all.

    The server answers while statements are still being queued, so an error
    may surface at any `execute`: it is kept, later statements are dropped (the
    server skips them too), and `sync` returns it.
    """

    __slots__ = ("conn", "failed", "pipeline", "stack")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pipeline: psycopg.Pipeline | None = None
        self.stack = contextlib.ExitStack()
        self.failed: psycopg.Error | None = None

    def execute(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> psycopg.Cursor[Any]:
        """Queue one statement; its cursor has rows once `sync` returned None."""
        cur = self.conn.cursor()
        if self.failed is not None:
            return cur
        if self.pipeline is None:
            self.pipeline = self.stack.enter_context(self.conn.pipeline())
        try:
            cur.execute(sql, params)
        except psycopg.OperationalError:
            self.close()
            raise
        except psycopg.Error as exc:
            self.failed = exc
        return cur

    def sync(self) -> psycopg.Error | None:
        """Send what is queued and wait for it; return the first error, if any."""
        pipeline, self.pipeline = self.pipeline, None
        failed, self.failed = self.failed, None
        if pipeline is None:
            return failed
        if failed is not None:
            self.close()
            return failed
        try:
            # Leaving pipeline mode sends the Sync and reads every answer: one
            # round trip (a sync() first would cost a second one).
            self.stack.close()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            return exc
        return None

    def close(self) -> None:
        """Leave pipeline mode, after a failure too (the caller then rolls back)."""
        self.pipeline = None
        # After a failure, what the server says now adds nothing to the first error.
        with contextlib.suppress(psycopg.Error):
            self.stack.close()


def _rollback(conn: psycopg.Connection[Any]) -> None:
    # A failed batch leaves the transaction open (or aborted): end it before the
    # connection goes back to the pool, which would warn and roll back itself.
    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status in (
        TransactionStatus.INTRANS,
        TransactionStatus.INERROR,
    ):
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")


@functools.cache
def _event_rows(n: int) -> str:
    """Return the placeholders of `n` event rows (the first typed for VALUES)."""
    first = "(%s::bigint, %s::text, %s::integer, %s::bytea, %s::bytea)"
    return ", ".join([first] + ["(%s, %s, %s, %s, %s)"] * (n - 1))


class _Statement:
    """One statement made of data-modifying CTEs, whose checks end it.

    PostgreSQL runs every data-modifying CTE of a statement, referenced or
    not, on one snapshot; a failed check (`tether_require`) then fails the
    statement and undoes them all. The checks run in the order they were
    added. (`tether_charge`, called from a CTE the fence reads, is the one
    part that reads on snapshots of its own, taken after its locks.)
    """

    __slots__ = ("checks", "params", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.params: list[Any] = []
        self.checks: list[str] = []

    def add(
        self, name: str, sql: str, params: Sequence[Any], *, check: str | None = None
    ) -> None:
        """Add a CTE; with `check`, the statement fails unless it touched one row."""
        self.parts.append(f"{name} AS ({sql})")
        self.params.extend(params)
        if check is not None:
            self.checks.append(
                f"tether_require((SELECT count(*) FROM {name}) = 1, '{check}')"  # noqa: S608  # constant names
            )

    def build(self) -> tuple[str, list[Any]]:
        """Return the statement and its parameters."""
        select = ", ".join(self.checks) or "NULL"
        return f"WITH {', '.join(self.parts)} SELECT {select}", self.params


class _Conflict(Exception):  # control flow, never escapes this module
    def __init__(self, existing: KeyRecord) -> None:
        self.record = existing


class _Blocked(Exception):  # control flow, never escapes this module: rolls back
    def __init__(self, why: _limits.Blocked | GrantGone | PendingExists) -> None:
        self.why = why


class _NeedsLocks(Exception):  # control flow, never escapes this module
    """The one statement found the key taken or a counter full: lock and decide it."""


def _counter_charges(batch: Batch) -> list[tuple[Reserve, Decimal]] | None:
    """Return each reservation and its counter's gain when counters are all the batch limits.

    That is a read charged after it answers (`tether._guards.charged_after`):
    quotas, and budgets without a throttle, each settled by the same step in
    the same batch, in distinct groups, with no breaker, retry, claim, grant,
    approval or new run. On such a batch `apply_limits` admits when every
    counter has room, adds no events, and leaves each quota's counter plus its
    amount and each budget's counter plus its actual cost (the hold it adds,
    the settle drops), lapsed holds gone (the charged ones counted as spent):
    what `tether_charge` does in the server. None: the batch needs the locks.
    """
    if (
        not batch.reserve
        or batch.breaker is not None
        or batch.breaker_outcome is not None
        or batch.retry is not None
        or batch.claim is not None
        or batch.use_grant is not None
        or batch.approval is not None
        or batch.new_run is not None
    ):
        return None
    settled: dict[tuple[str, str, int], Decimal] = {}
    for s in batch.settle:
        group = (s.limit_id, s.scope, s.window)
        if (
            s.kind is not LimitKind.BUDGET
            or (s.run_id, s.step) != (batch.run_id, batch.step)
            or group in settled
        ):
            return None
        settled[group] = s.actual or Decimal(0)  # None: released, nothing spent
    charges: list[tuple[Reserve, Decimal]] = []
    seen: set[tuple[str, str, int]] = set()
    for r in batch.reserve:
        group = (r.limit_id, r.scope, r.window)
        if group in seen:
            return None  # two reservations of one group read the same counter
        seen.add(group)
        if r.kind is LimitKind.QUOTA:
            charges.append((r, r.amount))
        elif r.kind is LimitKind.BUDGET and not r.throttle_max_us and group in settled:
            charges.append((r, settled.pop(group)))
        else:
            return None
    return None if settled else charges  # left: a hold this batch did not take


def _limit_keys(batch: Batch) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Return the limit groups and breakers a batch reads, sorted."""
    groups: set[tuple[str, str, int]] = set()
    breakers: set[str] = set()
    for r in batch.reserve:
        groups.add((r.limit_id, r.scope, 0 if r.kind is LimitKind.RATE else r.window))
    for s in batch.settle:
        groups.add((s.limit_id, s.scope, s.window))
    retry = batch.retry
    if retry is not None:
        for limit_id, scope, _ in retry.counters:
            groups.add((limit_id, scope, 0))
        groups.add((retry.ratio_id, "*", retry.window))
        groups.add((retry.ratio_id + ":calls", "*", retry.window))
        if retry.breaker is not None:
            breakers.add(retry.breaker.id)
    if batch.breaker is not None:
        breakers.add(batch.breaker.spec.id)
    if batch.breaker_outcome is not None:
        breakers.add(batch.breaker_outcome.spec.id)
    return sorted(groups), sorted(breakers)


@dataclass(slots=True)
class _Row:
    amount: Decimal
    until: int
    charged: bool


_NOTHING = (Decimal(0), Decimal(0), 0)
_Key = tuple[str, str, int, str]


class _Tables:
    """`LimitTables` over rows read under the batch's locks; writes are queued.

    The batch's advisory locks make these rows this transaction's own until it
    ends, so the copies read once stay true: every change lands in the copy and
    in a queue of final row states, written with the batch.
    """

    __slots__ = ("breakers", "dirty", "dirty_breakers", "groups", "store", "w")

    def __init__(self, store: PostgresStore, w: _Writer) -> None:
        self.store = store
        self.w = w
        self.groups: dict[tuple[str, str, int], dict[str, _Row]] = {}
        self.breakers: dict[str, BreakerRow | None] = {}
        self.dirty: dict[_Key, _Row | None] = {}
        """Rows to write (None: to delete), by key."""
        self.dirty_breakers: set[str] = set()

    def load_limits(self, rows: Iterable[Sequence[Any]]) -> None:
        for lid, scope, window, holder, amount, until, charged in rows:
            self.groups.setdefault((lid, scope, window), {})[holder] = _Row(
                amount, until, charged
            )

    def load_breakers(self, rows: Iterable[Sequence[Any]]) -> None:
        for r in rows:
            self.breakers[r[0]] = _breaker_row(r[1:])

    def _group(self, limit_id: str, scope: str, window: int) -> dict[str, _Row]:
        key = (limit_id, scope, window)
        group = self.groups.get(key)
        if group is None:
            # Not foreseen by _limit_keys: lock and read it now (a round trip).
            group = self.groups[key] = {}
            conn = self.w.conn
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s)",
                (_lock_key(self.store._schema, "limit", limit_id, scope, str(window)),),
            )
            self.load_limits(conn.execute(_SELECT_GROUP, key).fetchall())
        return group

    def _put(self, key: tuple[str, str, int], holder: str, row: _Row | None) -> None:
        group = self._group(*key)
        if row is None:
            group.pop(holder, None)
        else:
            group[holder] = row
        self.dirty[(*key, holder)] = row

    def flush(self, q: _Statement) -> None:
        """Add the final state of every changed row to the batch's statement."""
        for i, ((limit_id, scope, window, holder), r) in enumerate(self.dirty.items()):
            if r is None:
                q.add(
                    f"l{i}",
                    "DELETE FROM limit_state WHERE limit_id=%s AND scope=%s "
                    'AND "window"=%s AND holder=%s',
                    (limit_id, scope, window, holder),
                )
            else:
                q.add(
                    f"l{i}",
                    _UPSERT_LIMIT,
                    (limit_id, scope, window, holder, r.amount, r.until, r.charged),
                )
        for i, breaker_id in enumerate(sorted(self.dirty_breakers)):
            row = self.breakers[breaker_id]
            assert row is not None
            q.add(
                f"b{i}",
                f"INSERT INTO breakers ({_BREAKER_COLUMNS}) VALUES "  # noqa: S608  # constant column list
                "(%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE SET "
                "state=EXCLUDED.state, since=EXCLUDED.since, "
                "generation=EXCLUDED.generation, outcomes=EXCLUDED.outcomes, "
                "probes=EXCLUDED.probes, probe_deadline=EXCLUDED.probe_deadline",
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

    # -- LimitTables ----------------------------------------------------------------

    def counter(self, limit_id: str, scope: str, window: int) -> Decimal:
        row = self._group(limit_id, scope, window).get("")
        return Decimal(0) if row is None else row.amount

    def set_counter(
        self, limit_id: str, scope: str, window: int, value: Decimal, now: int
    ) -> None:
        self._put((limit_id, scope, window), "", _Row(value, 0, False))

    def add_to_counter(
        self, limit_id: str, scope: str, window: int, delta: Decimal, now: int
    ) -> None:
        # Exact: the batch's lock holds the row, so read-then-write is safe.
        value = self.counter(limit_id, scope, window) + delta
        self.set_counter(limit_id, scope, window, value, now)

    def usage(
        self, limit_id: str, scope: str, window: int, now: int
    ) -> tuple[Decimal, Decimal, int]:
        group = self._group(limit_id, scope, window)
        used, total, count, lapsed = Decimal(0), Decimal(0), 0, None
        gone = []
        for holder, row in group.items():
            if holder == "":
                used = row.amount
            elif row.until > now:
                total += row.amount
                count += 1
            else:
                lapsed = (lapsed or Decimal(0)) + (row.amount if row.charged else 0)
                if holder != "~":
                    gone.append(holder)
        if lapsed is not None:  # a crashed or hung worker's hold comes back by itself
            for holder in gone:
                self._put((limit_id, scope, window), holder, None)
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
        self._put(
            (limit_id, scope, window), f"{run_id}/{step}", _Row(amount, until, charged)
        )

    def drop_hold(
        self, limit_id: str, scope: str, window: int, run_id: str, step: int
    ) -> bool:
        holder = f"{run_id}/{step}"
        if holder not in self._group(limit_id, scope, window):
            return False
        self._put((limit_id, scope, window), holder, None)
        return True

    def tat(self, limit_id: str, scope: str) -> int | None:
        row = self._group(limit_id, scope, 0).get("~")
        return None if row is None else row.until

    def set_tat(self, limit_id: str, scope: str, tat: int) -> None:
        self._put((limit_id, scope, 0), "~", _Row(Decimal(0), tat, False))

    def _breaker(self, breaker_id: str) -> BreakerRow | None:
        if breaker_id not in self.breakers:
            # Not foreseen by _limit_keys: lock and read it now (a round trip).
            conn = self.w.conn
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s)",
                (_lock_key(self.store._schema, "breaker", breaker_id),),
            )
            found = conn.execute(_SELECT_BREAKER, (breaker_id,)).fetchone()
            self.breakers[breaker_id] = (
                None if found is None else _breaker_row(found[1:])
            )
        return self.breakers[breaker_id]

    def breaker(self, breaker_id: str) -> BreakerRow:
        row = self._breaker(breaker_id)
        # A copy: the rules change the rows they are given.
        return BreakerRow() if row is None else replace(row)

    def set_breaker(self, breaker_id: str, row: BreakerRow) -> None:
        self.breakers[breaker_id] = replace(row)
        self.dirty_breakers.add(breaker_id)

    def push_sample(
        self, breaker_id: str, code: str, window: int, min_calls: int, generation: int
    ) -> bool:
        row = self._breaker(breaker_id)
        if (
            row is None
            or row.state is not BreakerState.CLOSED
            or row.generation != generation
        ):
            return False
        if len(row.outcomes) == min_calls - 1:
            return False
        pushed = (row.outcomes + code)[-window:]
        # A full window of successes stays the same: a healthy upstream's
        # breaker is read, never written.
        if pushed != row.outcomes:
            self.set_breaker(breaker_id, replace(row, outcomes=pushed))
        return True


def _insert_approval(w: _Writer, a: ApprovalRow) -> None:
    w.execute(
        f"INSERT INTO approvals ({_APPROVAL_COLUMNS}) VALUES "  # noqa: S608  # constant column list
        "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
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


_KEY_RECORD = (
    "SELECT state, fingerprint, run_id, step, output, claimed_at, lease_until, "
    "completed_at FROM idempotency_keys "
    "WHERE tenant=%s AND principal_id=%s AND capability=%s AND key=%s"
)
_LOCK_KEY_RECORD = _KEY_RECORD + " FOR UPDATE"


def _key_record(
    conn: psycopg.Connection[Any], k: KeyId, *, lock: bool = False
) -> KeyRecord | None:
    row = conn.execute(
        _LOCK_KEY_RECORD if lock else _KEY_RECORD,
        (k.tenant, k.principal_id, k.capability, k.key),
    ).fetchone()
    if row is None:
        return None
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


def _run_row(row: Sequence[Any]) -> RunRow:
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
        created_at=created.astimezone(UTC),
        updated_at=updated.astimezone(UTC),
        epoch=epoch,
        head_seq=head_seq,
        head_hash=bytes(head_hash),
        head_sig=None if head_sig is None else bytes(head_sig),
        error_code=error_code,
        lease_until=_from_us(lease_until) if lease_until else None,
    )
