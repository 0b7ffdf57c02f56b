"""A run's record writer: fenced, chained appends that survive a lost answer.

Every write of a run goes through its `RunWriter`. A write carries the run's
lease epoch (another writer's newer epoch refuses it) and extends the chain
head this writer last saw (a write that finds the head moved is refused). Two
things may grow the record under a live writer, and both are taken up here
rather than failing the run: a person's approval decision, recorded in the
run from whatever process decides; and this writer's own write whose answer
was lost with the connection after it committed. A step's result whose write
failed is kept and written first at the run's next write, so an upstream
effect that happened is never dropped from the record.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from tether import _canonical, _chain, _guards, record
from tether._chain import StoredEvent
from tether._events import PEOPLES_KINDS
from tether.clock import Clock
from tether.errors import HeadMoved, LeaseLost, StoreError
from tether.store import (
    Batch,
    Committed,
    KeyId,
    KeyState,
    KeyUpdate,
    RunRow,
    Store,
)

__all__ = ["RunWriter"]

_DECISION_RACES = 20
"""How many times a write re-reads the record after people's decisions grew it."""


class RunWriter:
    """Writes one run's batches to the store, in order, under one lock."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        clock: Clock,
        claim_ttl: timedelta,
        *,
        epoch: int = 1,
        head: tuple[int, bytes] | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.clock = clock
        self.claim_ttl = claim_ttl
        """How long every write renews the run's lease for."""
        self.lock = threading.RLock()
        """Held around each write; the run holds it to check its state first."""
        self._epoch = epoch
        self._head_seq, self._head_hash = head or (0, record.genesis(run_id))
        self._pending: list[Batch] = []
        """Results of steps that ran, whose write failed: written first, next time."""
        self._unsure: Batch | None = None
        """The last write that failed: it may have landed all the same (its
        answer lost with the connection); the next write first looks."""
        self._closing: Batch | None = None
        """The write that closes a step whose intent landed unseen, to make
        before any other (see `_look_unsure`)."""
        self._running: tuple[KeyId, int] | None = None
        """The key and step of a step whose intent is written and result is
        not: its claim is renewed with the run's lease (`renew`)."""

    def renew(self) -> bool:
        """Renew the run's lease, and its running step's key claim, for a claim TTL.

        Called from the app's lease keeper's thread while the run's own thread
        may be in a handler or a planner: it takes no lock (the epoch it sends
        is the store's fence).

        Returns:
            False if another writer took the run over.

        Raises:
            StoreError: the store could not be written.
        """
        return self.store.renew_lease(
            self.run_id,
            epoch=self._epoch,
            until=self.clock.now() + self.claim_ttl,
            claim=self._running,
        )

    def has_pending(self) -> bool:
        """Tell whether a result write failed and waits to be retried."""
        return bool(self._pending)

    def kept(self) -> int:
        """Return how many step results are kept, not yet written."""
        return len(self._pending)

    def flush_pending(self) -> None:
        """Settle what failed writes owe: look at an unsure one, write kept results.

        Raises:
            StoreError: the store still fails; the results stay kept.
        """
        with self.lock:
            self._look_unsure()
            while self._pending:
                self._write(self._pending[0])
                self._pending.pop(0)

    def commit(self, batch: Batch, *, keep_on_failure: bool = False) -> Committed:
        """Write `batch` after whatever earlier writes still owe the record.

        Raises:
            LeaseLost: a newer writer holds the run.
            StoreError: the write failed; with `keep_on_failure` (the step
                already acted) the batch is kept and written first next time.
        """
        with self.lock:
            try:
                self._look_unsure()
                if self._pending:
                    self.flush_pending()
                return self._write(batch)
            except StoreError as exc:
                if isinstance(exc, LeaseLost):
                    raise
                if keep_on_failure:
                    # A step that already acted keeps its result until the store
                    # takes it; the next write on this run retries it first.
                    self._pending.append(batch)
                    raise StoreError(
                        f"{exc.message}; the step ran: its result is kept and is "
                        "written first on this run's next write"
                    ) from exc
                raise StoreError(f"{exc.message}; nothing ran after it") from exc

    def _write(self, batch: Batch) -> Committed:
        # The chain head and epoch are read at write time: a batch kept after a
        # failed write extends whatever the head is when it is retried.
        batch.epoch = self._epoch
        batch.base_seq = self._head_seq
        batch.base_hash = self._head_hash
        # Every write renews the run's lease; between writes (a long handler,
        # a slow planner) the app's lease keeper does (`renew`).
        batch.lease_until = batch.at + self.claim_ttl
        for tries in range(_DECISION_RACES, -1, -1):
            try:
                committed = self.store.commit(batch)
                break
            except HeadMoved:
                # People deciding this run's approval requests append to its
                # record; take their events up and write after them.
                try:
                    adopted = tries > 0 and self._adopt_decisions()
                except StoreError:
                    self._unsure = batch  # an earlier try may have landed
                    raise
                if not adopted:
                    # Not their events: maybe this write's own, landed late
                    # after its connection dropped; the next write looks.
                    self._unsure = batch
                    raise
                batch.base_seq = self._head_seq
                batch.base_hash = self._head_hash
            except LeaseLost:
                raise
            except StoreError:
                self._unsure = batch
                raise
        if committed.conflict is None:
            self._head_seq, self._head_hash = committed.head_seq, committed.head_hash
            if batch.key_update is not None:
                self._running = None
            if batch.claim is not None and committed.blocked is None:
                self._running = (batch.claim.id, batch.claim.step)
        return committed

    def _look_unsure(self) -> None:
        """Find out whether the last failed write landed; take it up if it did.

        A write whose connection broke after it was sent may have committed
        (PostgreSQL: when even the store's own look could not reach the
        server). The run's lease epoch fences every other writer off, so
        events past this writer's head, while the epoch is still its own, are
        that write's (and people's approval decisions after it): they are
        taken up. A kept result that landed is not written again; a step
        intent that landed opened room for a step that never ran: its key,
        limits and the record are closed as a failed step's would be, and an
        approval it spent is given back, in a write made before any other,
        and made again until it lands.

        Raises:
            StoreError: the store still cannot be read or written (the write
                stays unsure, or the closing write is still to make).
        """
        batch = self._unsure
        if batch is not None:
            row = self.store.get_run(self.run_id)
            grown = self._grown()
            self._unsure = None
            if self._took_up(batch, row, grown):
                if batch is self._closing:
                    self._closing = None
                elif any(b is batch for b in self._pending):
                    self._pending = [b for b in self._pending if b is not batch]
                elif any(isinstance(e, record.Intent) for e in batch.events):
                    self._closing = self._never_ran(batch)
        if self._closing is not None:
            self._write(self._closing)
            self._closing = None

    def _took_up(self, batch: Batch, row: RunRow, grown: list[StoredEvent]) -> bool:
        """Take up `batch` and what followed it if it is what grew the record."""
        if row.epoch != self._epoch or not grown:
            return False  # not ours to take up (LeaseLost comes), or it did not land
        if grown[0].body != _canonical.dumps_fields(batch.events[0]):
            return False  # another write: the next one says so (HeadMoved)
        return self._extend(grown)

    def _grown(self) -> list[StoredEvent]:
        """Return the record's events past this writer's head."""
        return [e for e in self.store.events(self.run_id) if e.seq > self._head_seq]

    def _extend(self, grown: list[StoredEvent]) -> bool:
        """Move the head over `grown` if it chains on from it; tell whether it did."""
        head_seq, head_hash = self._head_seq, self._head_hash
        for ev in grown:
            if ev.seq != head_seq + 1 or (
                self.store.signs_heads
                and _chain.chain_hash(head_hash, ev.seq, ev.body) != ev.hash
            ):
                return False  # not a chain from this head: HeadMoved says so
            head_seq, head_hash = ev.seq, ev.hash
        self._head_seq, self._head_hash = head_seq, head_hash
        return True

    def _never_ran(self, intent: Batch) -> Batch:
        """The write that closes a step whose intent landed unseen: it did not run."""
        now = self.clock.now()
        claim = intent.claim
        settles, settled = _guards.released(
            self.run_id, intent.reserve, intent.step, now
        )
        failed = record.Failed(
            at=now,
            step=intent.step,
            stage="intent",
            error_code=StoreError.code,
            error_type=StoreError.__name__,
            message=(
                "the step's intent was written, but the answer was lost with the "
                "connection; the step did not run, and its key and limits are freed"
                + ("" if intent.use_grant is None else ", and its approval given back")
            ),
        )
        return Batch(
            run_id=self.run_id,
            events=[*settled, failed],
            at=now,
            settle=settles,
            step=intent.step,
            return_grant=intent.use_grant,
            key_update=None
            if claim is None
            else KeyUpdate(
                id=claim.id,
                run_id=self.run_id,
                step=intent.step,
                state=KeyState.FAILED,
                now=now,
            ),
        )

    def _adopt_decisions(self) -> bool:
        """Take up events people's answers appended to this run's record.

        Deciding an approval request records the decision in the requesting
        run, and resolving a step in doubt records the answer in the step's
        run, from whatever process. When only such events grew the
        record (each chained onto the last), this writer extends them;
        anything else is a second writer, and stays an error.
        """
        grown = self._grown()
        if not grown or any(ev.data().get("kind") not in PEOPLES_KINDS for ev in grown):
            return False
        return self._extend(grown)
