"""A run's record to replay: from the store, or from an exported file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tether import _canonical, _chain
from tether._export import verify_run
from tether.replay._report import ReplayError
from tether.store import Store

__all__ = ["RecordedRun", "at"]


@dataclass(slots=True, frozen=True, kw_only=True)
class RecordedRun:
    """A run's record: its events in order, and the export header when from a file."""

    run_id: str
    events: tuple[dict[str, Any], ...]
    header: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    """Where it came from, for messages: `run ID` or a file path."""

    @classmethod
    def from_store(cls, store: Store, run_id: str) -> RecordedRun:
        """Read a run's record from a store and check its hash chain and signed head.

        Raises:
            NotFound: no such run.
            ReplayError: the record does not verify (an event was altered,
                removed or forged): it is refused, not replayed.
        """
        row = store.get_run(run_id)
        checked = verify_run(store, row.run_id)
        if not checked.ok:
            # A replay of an edited record would report the edit as a changed
            # decision, or pass a forged one as "same": neither is true.
            raise ReplayError(
                f"run {row.run_id}: its record does not verify ({checked.reason}); "
                "it is refused, not replayed (see `tether verify RUN`)"
            )
        events = tuple(_canonical.loads(e.body) for e in store.events(row.run_id))
        return cls(run_id=row.run_id, events=events, source=f"run {row.run_id}")

    @classmethod
    def from_file(cls, path: str | Path) -> RecordedRun:
        """Read an exported record (`tether runs export`) and check its hash chain.

        Raises:
            ReplayError: the file cannot be read, is not an export, or its chain
                does not hold (an event was altered or removed).
        """
        path = Path(path)
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise ReplayError(
                f"cannot read {str(path)!r}: {exc.strerror or exc}; give the path of a "
                "file written by `tether runs export RUN`"
            ) from exc
        try:
            header = _canonical.loads(lines[0]) if lines else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("type") != "tether.run":
            raise ReplayError(
                f"{path}: not a tether run export (its first line is no "
                '{"type": "tether.run"} header); write one with `tether runs export RUN`'
            )
        run_id = str(header.get("run_id"))
        previous = _chain.genesis(run_id)
        events: list[dict[str, Any]] = []
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                entry = _canonical.loads(line)
                event = entry["event"]
                seq = int(entry["seq"])
                stated = bytes.fromhex(entry["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ReplayError(
                    f"{path}:{number}: not an event line ({exc}); re-export the run"
                ) from exc
            body = _canonical.dumps(event)
            previous = _chain.chain_hash(previous, seq, body)
            if previous != stated or seq != len(events) + 1:
                raise ReplayError(
                    f"{path}:{number}: event {seq} does not match its hash: the file "
                    "was altered or an event removed; re-export the run"
                )
            events.append(event)
        head = header.get("head")
        if head is not None and previous.hex() != head:  # no events: cut to its header
            raise ReplayError(
                f"{path}: the events end at a different head than the header's; "
                "the file was truncated or altered; re-export the run"
            )
        return cls(run_id=run_id, events=tuple(events), header=header, source=str(path))


def at(event: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00"))
