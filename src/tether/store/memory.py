"""A store in process memory, for unit tests and for measuring the call path alone.

Nothing survives the process. Events are kept as objects and encoded, hashed
and chained only when read, so a call costs no encoding at all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tether import _canonical, _chain
from tether.errors import LeaseLost, NotFound, StoreError
from tether.store._base import (
    Batch,
    Committed,
    KeyId,
    KeyRecord,
    KeyState,
    KeyUpdate,
    NewRun,
    RunRow,
    Store,
    may_replace,
)

if TYPE_CHECKING:
    from tether.record import Event

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Run:
    row: RunRow
    events: list[Event] = field(default_factory=list)


class MemoryStore(Store):
    """Runs, records and keys in a dict; thread-safe, not shared between processes."""

    signs_heads = False

    def __init__(self) -> None:
        self.url = "memory://"
        self.record_key = None
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._keys: dict[KeyId, KeyRecord] = {}

    def commit(self, batch: Batch) -> Committed:
        """Apply `batch` under a lock: every check first, then every change."""
        with self._lock:
            run = self._runs.get(batch.run_id)
            if batch.new_run is not None:
                if run is not None:
                    raise StoreError(f"run {batch.run_id} exists already")
            elif run is None:
                raise NotFound(f"no run {batch.run_id!r} in memory")
            elif run.row.epoch != batch.epoch:
                raise LeaseLost(
                    f"run {batch.run_id} is held by lease epoch {run.row.epoch}"
                )
            elif len(run.events) != batch.base_seq:
                raise StoreError(f"run {batch.run_id}: the record moved; two writers")
            claim = batch.claim
            existing = None
            if claim is not None:
                existing = self._keys.get(claim.id)
                if existing is not None and not may_replace(existing, claim):
                    return Committed(
                        head_seq=batch.base_seq,
                        head_hash=batch.base_hash,
                        conflict=existing,
                    )
            # -- nothing below can fail --
            if claim is not None:
                self._keys[claim.id] = KeyRecord(
                    state=KeyState.IN_PROGRESS,
                    fingerprint=claim.fingerprint,
                    run_id=claim.run_id,
                    step=claim.step,
                    output=None,
                    claimed_at=claim.now,
                    lease_until=claim.lease_until,
                    completed_at=None,
                )
            if run is None:
                assert batch.new_run is not None
                run = self._runs[batch.run_id] = _Run(_new_row(batch, batch.new_run))
            run.events.extend(batch.events)
            if batch.status is not None or batch.error_code is not None:
                run.row = _replace_status(run.row, batch)
            if batch.key_update is not None:
                self._update_key(batch.key_update)
            return Committed(
                head_seq=len(run.events), head_hash=b"", took_over=existing
            )

    def _update_key(self, u: KeyUpdate) -> None:
        old = self._keys.get(u.id)
        if old is not None and old.run_id == u.run_id and old.step == u.step:
            self._keys[u.id] = KeyRecord(
                state=u.state,
                fingerprint=old.fingerprint,
                run_id=old.run_id,
                step=old.step,
                output=u.output,
                claimed_at=old.claimed_at,
                lease_until=old.lease_until,
                completed_at=u.now,
            )

    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the record of `key`, if any."""
        return self._keys.get(key)

    def get_run(self, run_id: str) -> RunRow:
        """Return one run, with its chain head computed now."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None and len(run_id) >= 6:
                found = [rid for rid in self._runs if rid.startswith(run_id)]
                if len(found) == 1:
                    run_id = found[0]
                    run = self._runs[run_id]
            if run is None:
                raise NotFound(f"no run {run_id!r} in memory; see `tether runs list`")
            events = self._stored(run_id, run.events)
        head = events[-1].hash if events else _chain.genesis(run_id)
        r = run.row
        return RunRow(
            run_id=r.run_id,
            status=r.status,
            tenant=r.tenant,
            principal_id=r.principal_id,
            request=r.request,
            created_at=r.created_at,
            updated_at=r.updated_at,
            epoch=r.epoch,
            head_seq=len(events),
            head_hash=head,
            head_sig=None,
            error_code=r.error_code,
        )

    def list_runs(self, *, limit: int = 50, status: str | None = None) -> list[RunRow]:
        """Return the newest runs first."""
        with self._lock:
            ids = [
                rid
                for rid, r in self._runs.items()
                if status is None or r.row.status == status
            ]
        return [self.get_run(rid) for rid in reversed(ids)][:limit]

    def events(self, run_id: str) -> list[_chain.StoredEvent]:
        """Return a run's events, encoded and chained now."""
        with self._lock:
            run = self._runs.get(run_id)
            return [] if run is None else self._stored(run_id, run.events)

    @staticmethod
    def _stored(run_id: str, events: list[Event]) -> list[_chain.StoredEvent]:
        head = _chain.genesis(run_id)
        out = []
        for seq, event in enumerate(events, 1):
            body = _canonical.dumps_fields(event)
            head = _chain.chain_hash(head, seq, body)
            out.append(_chain.StoredEvent(seq=seq, body=body, hash=head))
        return out


def _new_row(batch: Batch, new: NewRun) -> RunRow:
    return RunRow(
        run_id=batch.run_id,
        status=new.status,
        tenant=new.tenant,
        principal_id=new.principal_id,
        request=new.request,
        created_at=new.created_at,
        updated_at=batch.at,
        epoch=batch.epoch,
        head_seq=0,
        head_hash=batch.base_hash,
        head_sig=None,
        error_code=None,
    )


def _replace_status(row: RunRow, batch: Batch) -> RunRow:
    return RunRow(
        run_id=row.run_id,
        status=batch.status or row.status,
        tenant=row.tenant,
        principal_id=row.principal_id,
        request=row.request,
        created_at=row.created_at,
        updated_at=batch.at,
        epoch=row.epoch,
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        error_code=batch.error_code or row.error_code,
    )
