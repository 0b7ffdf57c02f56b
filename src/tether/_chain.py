"""The hash chain's primitives: each event's hash covers the one before it.

Kept at the bottom layer so the store can chain what it writes without
knowing the event kinds; `record` builds verification on top.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from tether import _canonical

__all__ = ["StoredEvent", "chain_hash", "genesis", "sign_head"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """One event as the store holds it."""

    seq: int
    """Position in the run's record, from 1, contiguous."""
    body: bytes
    """Canonical JSON of the event."""
    hash: bytes
    """SHA-256 over the previous hash, `seq` and `body`."""

    def data(self) -> dict[str, Any]:
        """Return the event as a JSON-ready dict with its `seq`."""
        out: dict[str, Any] = _canonical.loads(self.body)
        out["seq"] = self.seq
        return out


def genesis(run_id: str) -> bytes:
    """Return the hash that the run's first event chains from (binds events to the run)."""
    return hashlib.sha256(b"tether-record-v1\x00" + run_id.encode()).digest()


def chain_hash(previous: bytes, seq: int, body: bytes) -> bytes:
    """Return the hash of event `seq` with canonical `body` after `previous`."""
    return hashlib.sha256(previous + seq.to_bytes(8, "big") + body).digest()


def sign_head(key: bytes, run_id: str, seq: int, head: bytes) -> bytes:
    """Return the HMAC-SHA256 of the chain head, with a key kept outside the database."""
    msg = run_id.encode() + b"\x00" + seq.to_bytes(8, "big") + head
    return hmac.digest(key, msg, "sha256")
