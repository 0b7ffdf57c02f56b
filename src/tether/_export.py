"""A run's record read back whole: checked against its signed head, or exported.

`Tether.verify` and `Tether.export` (and `tether verify`, `tether runs
export`) are these functions over the app's store.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime

from tether import _canonical, record
from tether.capability import Registry
from tether.errors import NotFound
from tether.policy import file_part
from tether.store import Store

__all__ = ["export_run", "verify_run"]

_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
"""What JSON lets through raw but a terminal or a line reader acts on: DEL and the
C1 controls (U+009B starts an escape sequence in some terminals), the Unicode
line breaks, and the invisible and bidirectional marks (`tether`'s CLI escapes
the same set)."""


def verify_run(
    store: Store, run_id: str, *, head: str | None = None
) -> record.VerifyReport:
    """Recompute a run's hash chain and check its signed head (and `head`, if given).

    Raises:
        NotFound: no such run.
    """
    row = store.get_run(run_id)
    events = store.events(row.run_id)
    report = record.verify(
        row.run_id,
        events,
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        key=store.record_key,
        expected_head=head,
    )
    if not report.ok or not events:
        return report
    # The runs row is an index over the record, not part of the chain: what it
    # shows (and `runs list` prints) must agree with the chained events.
    started = events[0].data()
    last_status = error_code = None
    for event in reversed(events):
        data = event.data()
        if data["kind"] == "run_finished" and error_code is None:
            error_code = data.get("error_code")
        if data["kind"] == "run_status":
            last_status = data["status"]
            break
    principal = started.get("principal") or {}
    facts: dict[str, tuple[object, object]] = {
        "request": (row.request, started.get("request")),
        "principal": (row.principal_id, principal.get("id")),
        "tenant": (row.tenant, principal.get("tenant")),
        "status": (row.status, last_status),
        # `runs list` and the export header show these two as well.
        "error_code": (row.error_code, error_code),
        "created_at": (row.created_at, _instant(started.get("at"))),
    }
    for name, (shown, recorded) in facts.items():
        if shown != recorded:  # datetimes: the same instant, whatever its zone
            return record.VerifyReport(
                run_id=row.run_id,
                ok=False,
                events=report.events,
                head=report.head,
                reason=f"the run's {name} {_shown(shown)!r} differs from the "
                f"record's {_shown(recorded)!r}: the runs table was edited",
            )
    return report


def _instant(value: object) -> datetime | None:
    """Return a recorded RFC 3339 time as a datetime (None when it is not one)."""
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _shown(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def export_run(
    store: Store,
    run_id: str,
    *,
    capabilities: Registry,
    policy_version: str,
    config_text: Callable[[], str | None],
) -> Iterator[bytes]:
    """Yield a run's record as JSON lines: a header, then one line per event.

    The header holds the run, its chain head, the declarations of the
    capabilities it called and the policy version it ran under, with the
    policy file's text (`config_text()`) when `policy_version` is still that
    version, so the file can be checked and replayed elsewhere.

    Raises:
        NotFound: no such run (at the first line).
    """
    row = store.get_run(run_id)
    events = store.events(row.run_id)
    data = [e.data() for e in events]
    names = sorted({str(d.get("capability")) for d in data} - {"None"})
    versions = {str(d["policy_version"]) for d in data if d.get("policy_version")}
    ran_under = next(iter(versions)) if len(versions) == 1 else None
    # The file's part only: this process may lack the app's Python policies
    # (`tether runs export` has none), which a replay takes from `--app`.
    same_policy = {file_part(v) for v in versions} <= {file_part(policy_version)}
    caps: dict[str, dict[str, object] | None] = {}
    for name in names:
        try:
            caps[name] = capabilities.get(name).describe()
        except NotFound:
            caps[name] = None  # recorded under a capability this app lacks
    yield _line_safe(
        {
            "format": record.FORMAT,
            "type": "tether.run",
            "run_id": row.run_id,
            "status": row.status,
            "tenant": row.tenant,
            "principal": row.principal_id,
            "request": row.request,
            "created_at": row.created_at,
            "head_seq": row.head_seq,
            "head": row.head_hash.hex(),
            "policy_version": ran_under or policy_version,
            # The file's text only when it is the version the run ran under:
            # a file edited since would replay the run under another policy.
            "config": config_text() if same_policy else None,
            "capabilities": caps,
        }
    )
    for ev in events:
        yield _line_safe(
            {
                "seq": ev.seq,
                "hash": ev.hash.hex(),
                "event": _canonical.loads(ev.body),
            }
        )


def _line_safe(document: object) -> bytes:
    """Encode one JSONL line, escaping what text readers and terminals act on.

    JSON allows U+2028, U+2029 and U+0085 raw, but `str.splitlines` and many
    log tools split lines on them; an export printed to a terminal must not
    move its cursor or reorder its text either. A JSON escape stands for the
    same string, so the events' hashes are unchanged.
    """
    line = _canonical.dumps(document)
    if line.isascii() and b"\x7f" not in line:
        return line
    return _UNSAFE.sub(_escape, line.decode()).encode()


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"
