"""How a PostgreSQL write reaches the server: pipelined statements, or one statement.

`Writer` queues statements on one connection in pipeline mode, so the locks and
reads of a batch cost one round trip; `Statement` builds the batch's writes as
one statement of data-modifying CTEs; `rollback` ends what a failed write left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

__all__ = ["Statement", "Writer", "rollback"]


class Writer:
    """Queues statements on one connection in pipeline mode; `sync` sends them all.

    The server answers while statements are still being queued, so an error
    may surface at any `execute`: it is kept, later statements are dropped (the
    server skips them too), and `sync` returns it.

    A failed pipeline may leave psycopg's prepared-statement cache out of step with the server: psycopg
    (3.3) marks a statement prepared when it sends the statement's first
    named `Parse`, without waiting for its answer, and the server skips a
    `Parse` queued after a failed statement. The next use of that statement
    on the connection then fails with "prepared statement "_pg3_N" does not
    exist" (seen after a conflict on the locked path: its `COMMIT`). `close`
    then ends the transaction and drops every prepared statement on both
    sides (`DEALLOCATE ALL`, which psycopg's cache follows): one round trip,
    on a failed write only.
    """

    __slots__ = ("conn", "failed", "pipeline", "stack", "unsure")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pipeline: psycopg.Pipeline | None = None
        self.stack = contextlib.ExitStack()
        self.failed: psycopg.Error | None = None
        self.unsure = False
        """A pipeline failed: psycopg's prepared statements may be wrong (see above)."""

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
            self.unsure = True
            self.close()
            raise
        except psycopg.Error as exc:
            self.unsure = True
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
            self.unsure = True
            self.close()
            raise
        except psycopg.Error as exc:
            self.unsure = True
            self.close()
            return exc
        return None

    def close(self) -> None:
        """Leave pipeline mode; after a failure, roll back and drop every prepared statement."""
        self.pipeline = None
        # After a failure, what the server says now adds nothing to the first error.
        with contextlib.suppress(psycopg.Error):
            self.stack.close()
        if self.unsure:
            self.unsure = False
            rollback(self.conn)
            if not (self.conn.closed or self.conn.broken):
                # `prepare=True`: psycopg clears its cache on a DEALLOCATE ALL
                # only when it validates the statement, which it does for a
                # statement it prepares for the first time, and clearing the
                # cache forgets this one too: so every call clears it.
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute("DEALLOCATE ALL", prepare=True)


def rollback(conn: psycopg.Connection[Any]) -> None:
    """End the transaction a failed write left open (or aborted), if any."""
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


class Statement:
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
