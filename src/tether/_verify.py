"""Chain verification: recompute a run's hash chain and check its stored and signed heads.

The chain's primitives live in `_chain`; this module walks a run's stored events
with them and reports the first event that fails, if one does.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from tether import _canonical
from tether._chain import StoredEvent, chain_hash, genesis, sign_head
from tether._events import PEOPLES_KINDS

__all__ = ["VerifyReport", "verify"]


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What `verify` found."""

    run_id: str
    ok: bool
    events: int
    """Events checked."""
    head: str
    """Hex hash of the last good event (the chain head)."""
    first_bad_seq: int | None = None
    """Sequence number of the first event that fails, if one does."""
    reason: str | None = None
    """One line on what failed."""

    def raise_for_failure(self) -> None:
        """Raise `IntegrityError` when the chain does not verify."""
        if not self.ok:
            from tether.errors import IntegrityError

            raise IntegrityError(f"run {self.run_id}: {self.reason}")

    def to_json(self) -> dict[str, object]:
        """Return the report as a JSON document."""
        return {
            "format": 1,
            "run_id": self.run_id,
            "ok": self.ok,
            "events": self.events,
            "head": self.head,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
        }


def verify(
    run_id: str,
    events: Sequence[StoredEvent],
    *,
    head_seq: int,
    head_hash: bytes,
    head_sig: bytes | None,
    key: bytes | None,
    expected_head: str | None = None,
) -> VerifyReport:
    """Recompute a run's chain and check its stored, signed and exported heads.

    Without a signature key (or an exported head) a consistent rewrite of the
    whole chain by someone with write access to the database cannot be told from
    the original: that is the unanchored case, and the report says so.
    """
    previous = genesis(run_id)
    expected_seq = 1
    finished = False
    for ev in events:
        # A finished run's record takes nothing more but people's answers,
        # recorded in it wherever and whenever they are given.
        if finished and _kind(ev.body) not in PEOPLES_KINDS:
            return _bad(
                run_id,
                ev.seq,
                previous,
                expected_seq - 1,
                f"event {ev.seq} follows the run's run_finished event",
            )
        if ev.seq != expected_seq:
            return _bad(
                run_id,
                expected_seq,
                previous,
                expected_seq - 1,
                f"event {expected_seq} is missing (found {ev.seq} next)",
            )
        h = chain_hash(previous, ev.seq, ev.body)
        if not hmac.compare_digest(h, ev.hash):
            return _bad(
                run_id,
                ev.seq,
                previous,
                expected_seq - 1,
                f"event {ev.seq} does not match its hash (altered, moved or forged)",
            )
        previous = h
        expected_seq += 1
        finished = finished or _kind(ev.body) == "run_finished"
    count = expected_seq - 1
    if head_seq != count or not hmac.compare_digest(head_hash, previous):
        return _bad(
            run_id,
            min(head_seq, count) + 1,
            previous,
            count,
            f"the stored head is event {head_seq} but the chain ends at {count} "
            + (
                "(events removed from the end, or the head rewritten)"
                if head_seq > count
                else "(events appended after the head, or the head rewritten)"
            ),
        )
    if key is not None and head_sig is None:
        return _bad(
            run_id,
            None,
            previous,
            count,
            "the head is not signed although a record key is configured: the "
            "signature was removed, so the record may have been rewritten",
        )
    if key is not None and head_sig is not None:
        good = sign_head(key, run_id, head_seq, head_hash)
        if not hmac.compare_digest(good, head_sig):
            return _bad(
                run_id,
                None,
                previous,
                count,
                "the signed head does not match: the record was rewritten or "
                "truncated by someone without the record key",
            )
    if expected_head is not None and expected_head.lower() != previous.hex():
        return _bad(
            run_id,
            None,
            previous,
            count,
            f"the head {previous.hex()} differs from the exported head {expected_head}",
        )
    return VerifyReport(run_id=run_id, ok=True, events=count, head=previous.hex())


def _kind(body: bytes) -> object:
    try:
        data = _canonical.loads(body)
    except ValueError:
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _bad(
    run_id: str, seq: int | None, head: bytes, count: int, reason: str
) -> VerifyReport:
    return VerifyReport(
        run_id=run_id,
        ok=False,
        events=count,
        head=head.hex(),
        first_bad_seq=seq,
        reason=reason,
    )
