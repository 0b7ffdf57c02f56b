"""The hash chain's primitives: each event's hash covers the one before it.

Kept at the bottom layer so the store can chain what it writes without
knowing the event kinds; `_verify` builds verification on top.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tether import _canonical

__all__ = ["Mac", "StoredEvent", "chain_hash", "genesis", "sign_head"]


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
    return Mac(key).head(run_id, seq, head)


class Mac:
    """HMAC-SHA256 under one key, with the key's pads hashed once.

    The same bytes as `hmac.digest(key, msg, "sha256")` (RFC 2104): the inner
    and outer SHA-256 states after the padded key are kept and copied per
    message, which takes a third of the time of the one-shot call. Every commit
    signs its chain head, so this is
    on the call path; hmac offers no way to reuse a key's pads but `copy()` on a
    Python-level object, which is slower than this.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        """Return HMAC-SHA256(key, message)."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def head(self, run_id: str, seq: int, head: bytes) -> bytes:
        """Return the signature of a run's chain head (as `sign_head`)."""
        return self.digest(run_id.encode() + b"\x00" + seq.to_bytes(8, "big") + head)
