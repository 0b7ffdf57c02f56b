"""Records: tamper evidence (H.51), log injection (H.54) and completeness (H.55).

Tamper tests edit the SQLite file with `sqlite3` as an attacker with write access
to the database would, then ask `Tether.verify`.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

import tether
from tether import record
from tether.store import SQLiteStore, sqlite_path
from tether.testing import FakeClock, temporary_app


class NoteIn(BaseModel, extra="forbid"):
    text: str
    tags: dict[str, str] = {}


class NoteOut(BaseModel):
    text: str
    length: int


class RefundIn(BaseModel, extra="forbid"):
    order_id: str = Field(min_length=1)
    amount_cents: int = Field(gt=0)


class RefundOut(BaseModel):
    order_id: str
    refunded_cents: int


@tether.capability("notes.echo")
def echo(args: NoteIn) -> NoteOut:
    """Return the note as it came."""
    return NoteOut(text=args.text, length=len(args.text))


@tether.capability("notes.fail")
def fail(args: NoteIn) -> NoteOut:
    """Raise with the note in the message."""
    raise RuntimeError(args.text)


@tether.capability(
    "payments.refund", effect="write", idempotency="keyed", cost=lambda a: 1
)
def refund(args: RefundIn) -> RefundOut:
    """Refund an order."""
    return RefundOut(order_id=args.order_id, refunded_cents=args.amount_cents)


def _order_open(args: RefundIn) -> bool | str:
    return True if not args.order_id.startswith("closed-") else "the order is closed"


@tether.capability(
    "payments.refund_open",
    effect="write",
    idempotency="keyed",
    preconditions=[_order_open],
)
def refund_open(args: RefundIn) -> RefundOut:
    """Refund an order that is still open."""
    return RefundOut(order_id=args.order_id, refunded_cents=args.amount_cents)


def _preview(args: RefundIn) -> RefundOut:
    return RefundOut(order_id=args.order_id, refunded_cents=0)


@tether.capability(
    "payments.void", effect="destructive", dry_run=_preview, cost=Decimal("0.5")
)
def void(args: RefundIn) -> RefundOut:
    """Void an order."""
    return RefundOut(order_id=args.order_id, refunded_cents=args.amount_cents)


@dataclass
class BigRefunds:
    """Deny refunds over a threshold; make voids dry runs."""

    id: str = "big-refunds"

    def evaluate(self, request: tether.DecisionRequest) -> tether.Decision | None:
        if request.capability.startswith("payments.refund"):
            if request.args["amount_cents"] > 50_000:
                return tether.Decision(
                    verdict=tether.Verdict.DENY,
                    rule_ids=("big-refunds",),
                    reasons=("over 500.00 needs finance",),
                )
            return tether.Decision(verdict=tether.Verdict.ALLOW, rule_ids=("refunds",))
        if request.capability == "payments.void":
            return tether.Decision(
                verdict=tether.Verdict.DRY_RUN_ONLY, rule_ids=("voids-preview",)
            )
        return None


ALL = (echo, fail, refund, refund_open, void)


_RUN = "run=(SELECT id FROM runs WHERE run_id=?)"
"""Events are keyed by the run's integer id; tests name runs by their public id."""
_INSERT = (
    "INSERT INTO events (run, seq, kind, step, body, hash) "
    "VALUES ((SELECT id FROM runs WHERE run_id=?),?,?,?,?,?)"
)


@dataclass
class Recorded:
    """A finished run on a SQLite file, and how to reach the file behind tether's back."""

    app: tether.Tether
    run_id: str
    path: Path

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)

    def rows(self) -> list[tuple[int, str, int | None, bytes, bytes]]:
        with self.connect() as con:
            return con.execute(
                f"SELECT seq, kind, step, body, hash FROM events WHERE {_RUN} "
                "ORDER BY seq",
                (self.run_id,),
            ).fetchall()

    def head(self) -> tuple[int, bytes, bytes | None]:
        with self.connect() as con:
            row: tuple[int, bytes, bytes | None] = con.execute(
                "SELECT head_seq, head_hash, head_sig FROM runs WHERE run_id=?",
                (self.run_id,),
            ).fetchone()
            return row

    def execute(self, sql: str, *params: Any) -> None:
        with self.connect() as con:
            con.execute(sql, params)

    def replace_events(
        self,
        rows: list[tuple[int, str, int | None, bytes, bytes]],
        *,
        rechain: bool,
        head: tuple[int, bytes] | None = None,
        sig: bytes | str | None = "keep",
    ) -> bytes:
        """Write `rows` as the run's events; with `rechain`, recompute every hash."""
        previous = record.genesis(self.run_id)
        out = []
        for seq, kind, step, body, digest in rows:
            if rechain:
                digest = record.chain_hash(previous, seq, body)
            out.append((self.run_id, seq, kind, step, body, digest))
            previous = digest
        con = self.connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute(f"DELETE FROM events WHERE {_RUN}", (self.run_id,))
            con.executemany(_INSERT, out)
            if head is not None:
                con.execute(
                    "UPDATE runs SET head_seq=?, head_hash=? WHERE run_id=?",
                    (*head, self.run_id),
                )
            if sig != "keep":
                con.execute(
                    "UPDATE runs SET head_sig=? WHERE run_id=?", (sig, self.run_id)
                )
            con.execute("COMMIT")
        finally:
            con.close()
        return previous

    def key(self) -> bytes:
        """Read the record key from its file beside the database, as an intruder could."""
        return bytes.fromhex(Path(f"{self.path}.key").read_text().strip())


def _drive(app: tether.Tether, principal: tether.Principal) -> str:
    with app.run(principal=principal, request="refund two orders") as run:
        run.call("notes.echo", {"text": "hello"})
        run.call("payments.refund", {"order_id": "o-1", "amount_cents": 1200})
        run.step("payments.refund", {"order_id": "o-2", "amount_cents": 90_000})
        run.step("notes.fail", {"text": "upstream 503"})
        run.call("notes.echo", {"text": "done"})
    return run.id


@pytest.fixture
def recorded(app: tether.Tether, principal: tether.Principal) -> Recorded:
    """A finished run of five steps (about twenty events), untouched."""
    app.register(*ALL)
    app.add_policy(BigRefunds())
    run_id = _drive(app, principal)
    path = sqlite_path(app.db_url.partition("?")[0])
    assert path is not None
    return Recorded(app=app, run_id=run_id, path=Path(path))


# -- H.51 tamper detection ------------------------------------------------------------


def test_untouched_record_verifies(recorded: Recorded) -> None:
    """A record nobody touched verifies, with its head equal to the stored head."""
    head_seq, head_hash, head_sig = recorded.head()

    report = recorded.app.verify(recorded.run_id)

    assert report.ok, report.reason
    assert report.events == head_seq == len(recorded.rows())
    assert report.head == head_hash.hex()
    assert head_sig is not None
    assert (report.first_bad_seq, report.reason) == (None, None)


def test_untouched_record_matches_its_exported_head(recorded: Recorded) -> None:
    """The head in an export's header verifies the record it came from, in any hex case."""
    header = orjson.loads(next(recorded.app.export(recorded.run_id)))

    report = recorded.app.verify(recorded.run_id, head=header["head"].upper())

    assert report.ok, report.reason


@settings(
    max_examples=40,
    deadline=None,
    # The record is restored after each example, so one file serves them all.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_one_changed_byte_is_found(recorded: Recorded, data: st.DataObject) -> None:
    """Changing any one byte of any event body fails verify at that event's seq."""
    rows = recorded.rows()
    seq, _, _, body, _ = data.draw(st.sampled_from(rows), label="event")
    offset = data.draw(st.integers(0, len(body) - 1), label="offset")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != body[offset]))
    forged = body[:offset] + bytes([new]) + body[offset + 1 :]
    recorded.execute(
        f"UPDATE events SET body=? WHERE {_RUN} AND seq=?",
        forged,
        recorded.run_id,
        seq,
    )

    try:
        report = recorded.app.verify(recorded.run_id)
    finally:
        recorded.execute(
            f"UPDATE events SET body=? WHERE {_RUN} AND seq=?",
            body,
            recorded.run_id,
            seq,
        )

    assert not report.ok
    assert report.first_bad_seq == seq
    assert report.reason is not None
    assert f"event {seq}" in report.reason


def test_changed_hash_is_found(recorded: Recorded) -> None:
    """Changing a stored hash fails verify at that event."""
    seq, _, _, _, digest = recorded.rows()[4]
    recorded.execute(
        f"UPDATE events SET hash=? WHERE {_RUN} AND seq=?",
        bytes([digest[0] ^ 1]) + digest[1:],
        recorded.run_id,
        seq,
    )

    report = recorded.app.verify(recorded.run_id)

    assert (report.ok, report.first_bad_seq) == (False, seq)


@pytest.mark.parametrize("position", [0, 1, 6, -2])
def test_deleted_event_is_found(recorded: Recorded, position: int) -> None:
    """Deleting an event fails verify at the missing seq."""
    seq = recorded.rows()[position][0]
    recorded.execute(f"DELETE FROM events WHERE {_RUN} AND seq=?", recorded.run_id, seq)

    report = recorded.app.verify(recorded.run_id)

    assert (report.ok, report.first_bad_seq) == (False, seq)
    assert f"event {seq} is missing" in (report.reason or "")


def test_deleted_last_event_is_found_by_the_stored_head(recorded: Recorded) -> None:
    """Deleting the last event, leaving the head alone, fails verify at that seq."""
    last = recorded.rows()[-1][0]
    recorded.execute(
        f"DELETE FROM events WHERE {_RUN} AND seq=?", recorded.run_id, last
    )

    report = recorded.app.verify(recorded.run_id)

    assert (report.ok, report.first_bad_seq) == (False, last)


@pytest.mark.parametrize(("i", "j"), [(0, 1), (2, 9), (3, -1)])
def test_swapped_events_are_found(recorded: Recorded, i: int, j: int) -> None:
    """Swapping two events' bodies fails verify at the earlier one."""
    rows = recorded.rows()
    a, b = rows[i], rows[j]
    recorded.execute(
        f"UPDATE events SET body=? WHERE {_RUN} AND seq=?",
        b[3],
        recorded.run_id,
        a[0],
    )
    recorded.execute(
        f"UPDATE events SET body=? WHERE {_RUN} AND seq=?",
        a[3],
        recorded.run_id,
        b[0],
    )

    report = recorded.app.verify(recorded.run_id)

    assert (report.ok, report.first_bad_seq) == (False, a[0])


def test_swapped_events_with_their_hashes_are_found(recorded: Recorded) -> None:
    """Moving two events (body and hash together) to each other's place fails verify."""
    rows = recorded.rows()
    swapped = list(rows)
    swapped[3] = (rows[3][0], *rows[7][1:])
    swapped[7] = (rows[7][0], *rows[3][1:])
    recorded.replace_events(swapped, rechain=False)

    report = recorded.app.verify(recorded.run_id)

    assert (report.ok, report.first_bad_seq) == (False, rows[3][0])


def _forged_body() -> bytes:
    event = record.Executed(
        at=datetime.fromisoformat("2026-01-01T00:00:00+00:00"),
        step=2,
        output={"order_id": "o-1", "refunded_cents": 999_999},
        duration_us=1,
    )
    return record.encode(event)


def test_forged_event_inserted_in_the_middle_is_found(recorded: Recorded) -> None:
    """A forged event slipped in at seq k (later events renumbered) fails verify at k."""
    rows = recorded.rows()
    k = 6
    forged = (k, "executed", 2, _forged_body(), b"\x00" * 32)
    moved = [(s + 1, *rest) if s >= k else (s, *rest) for s, *rest in rows]
    recorded.replace_events(sorted([*moved, forged]), rechain=False)  # type: ignore[list-item]

    report = recorded.app.verify(recorded.run_id)

    assert (report.ok, report.first_bad_seq) == (False, k)


def test_forged_event_appended_with_a_valid_hash_is_found(recorded: Recorded) -> None:
    """A forged event chained correctly after the head fails verify at its own seq."""
    rows = recorded.rows()
    last_seq, last_hash = rows[-1][0], rows[-1][4]
    body = _forged_body()
    recorded.execute(
        _INSERT,
        recorded.run_id,
        last_seq + 1,
        "executed",
        2,
        body,
        record.chain_hash(last_hash, last_seq + 1, body),
    )

    report = recorded.app.verify(recorded.run_id)

    assert not report.ok
    assert report.first_bad_seq == last_seq + 1


@pytest.mark.parametrize("k", [1, 3, 10])
def test_truncated_tail_is_found_by_the_signed_head(recorded: Recorded, k: int) -> None:
    """Cutting the last k events and rewriting the head to match fails the head signature."""
    rows = recorded.rows()[:-k]
    recorded.replace_events(rows, rechain=False, head=(rows[-1][0], rows[-1][4]))

    report = recorded.app.verify(recorded.run_id)

    assert not report.ok
    assert "signed head does not match" in (report.reason or "")


def test_truncated_tail_with_signature_removed_is_found(recorded: Recorded) -> None:
    """Cutting the tail and deleting the head signature fails verify when a key is set."""
    rows = recorded.rows()[:-2]
    recorded.replace_events(
        rows, rechain=False, head=(rows[-1][0], rows[-1][4]), sig=None
    )

    report = recorded.app.verify(recorded.run_id)

    assert not report.ok


def _rewrite_refund(
    rows: list[tuple[int, str, int | None, bytes, bytes]],
) -> list[tuple[int, str, int | None, bytes, bytes]]:
    """Return the rows with the refund's amount changed (hashes left as they were)."""
    old, new = b'"refunded_cents":1200', b'"refunded_cents":1'
    out = [
        (seq, kind, step, body.replace(old, new), h)
        for seq, kind, step, body, h in rows
    ]
    assert out != rows
    return out


def test_consistent_rewrite_is_found_by_the_signed_head(recorded: Recorded) -> None:
    """Rewriting the whole chain consistently, without the key, fails the head signature."""
    rows = _rewrite_refund(recorded.rows())
    head = recorded.replace_events(rows, rechain=True)
    recorded.execute(
        "UPDATE runs SET head_hash=? WHERE run_id=?", head, recorded.run_id
    )

    report = recorded.app.verify(recorded.run_id)

    assert not report.ok
    assert report.first_bad_seq is None
    assert "signed head does not match" in (report.reason or "")


def test_consistent_rewrite_with_signature_removed_is_found(recorded: Recorded) -> None:
    """Rewriting the chain and setting the head signature to NULL fails verify when a key is set."""
    rows = _rewrite_refund(recorded.rows())
    head = recorded.replace_events(rows, rechain=True, sig=None)
    recorded.execute(
        "UPDATE runs SET head_hash=? WHERE run_id=?", head, recorded.run_id
    )

    report = recorded.app.verify(recorded.run_id)

    assert not report.ok


def test_rewrite_by_a_key_holder_is_found_by_the_exported_head(
    recorded: Recorded,
) -> None:
    """A rewrite re-signed with the stolen key passes the signature but not an exported head.

    The key file sits beside the database, so an intruder who can write the file
    can often read the key too; only a head exported beforehand catches them.
    """
    exported = orjson.loads(next(recorded.app.export(recorded.run_id)))["head"]
    rows = _rewrite_refund(recorded.rows())
    head = recorded.replace_events(rows, rechain=True)
    last = rows[-1][0]
    sig = record.sign_head(recorded.key(), recorded.run_id, last, head)
    recorded.execute(
        "UPDATE runs SET head_hash=?, head_sig=? WHERE run_id=?",
        head,
        sig,
        recorded.run_id,
    )

    signed_only = recorded.app.verify(recorded.run_id)
    anchored = recorded.app.verify(recorded.run_id, head=exported)

    assert signed_only.ok  # the limitation the exported head exists for
    assert not anchored.ok
    assert exported in (anchored.reason or "")


def test_truncation_is_found_by_the_exported_head_without_the_key(
    recorded: Recorded,
) -> None:
    """A keyless auditor holding an exported head catches a truncated, re-headed record."""
    exported = recorded.app.verify(recorded.run_id).head
    rows = recorded.rows()[:-3]
    recorded.replace_events(
        rows, rechain=False, head=(rows[-1][0], rows[-1][4]), sig=None
    )
    auditor = SQLiteStore(recorded.path)  # no record key
    row = auditor.get_run(recorded.run_id)

    try:
        report = record.verify(
            recorded.run_id,
            auditor.events(recorded.run_id),
            head_seq=row.head_seq,
            head_hash=row.head_hash,
            head_sig=row.head_sig,
            key=auditor.record_key,
            expected_head=exported,
        )
    finally:
        auditor.close()

    assert not report.ok


def test_unanchored_consistent_rewrite_verifies(recorded: Recorded) -> None:
    """Without a key and without an exported head, a consistent rewrite verifies.

    This is the known limitation of an unanchored hash chain (RELIABILITY.md H.51,
    Crosby & Wallach): whoever can write the database can recompute every hash.
    Only the signed head (key outside the database) or a head exported beforehand
    tells the rewrite from the original.
    """
    rows = _rewrite_refund(recorded.rows())
    head = recorded.replace_events(rows, rechain=True, sig=None)
    recorded.execute(
        "UPDATE runs SET head_hash=? WHERE run_id=?", head, recorded.run_id
    )
    auditor = SQLiteStore(recorded.path)
    row = auditor.get_run(recorded.run_id)

    try:
        report = record.verify(
            recorded.run_id,
            auditor.events(recorded.run_id),
            head_seq=row.head_seq,
            head_hash=row.head_hash,
            head_sig=row.head_sig,
            key=None,
        )
    finally:
        auditor.close()

    assert report.ok


def test_key_from_the_environment_signs_and_verifies(
    tmp_path: Path, clock: FakeClock, principal: tether.Principal
) -> None:
    """With `TETHER_RECORD_KEY` set no key file is written; that key verifies, another does not."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    key, other = "11" * 32, "22" * 32
    with tether.Tether(db=db, clock=clock, env={"TETHER_RECORD_KEY": key}) as app:
        app.register(*ALL)
        run_id = _drive(app, principal)

    with tether.Tether(db=db, env={"TETHER_RECORD_KEY": key}) as same:
        good = same.verify(run_id)
    with tether.Tether(db=db, env={"TETHER_RECORD_KEY": other}) as wrong:
        bad = wrong.verify(run_id)

    assert not (tmp_path / "tether.db.key").exists()
    assert good.ok, good.reason
    assert not bad.ok


def test_rewrite_is_found_when_the_key_lives_only_in_the_environment(
    tmp_path: Path, clock: FakeClock, principal: tether.Principal
) -> None:
    """An intruder with the database but not `TETHER_RECORD_KEY` cannot re-sign a rewrite."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    env = {"TETHER_RECORD_KEY": "33" * 32}
    with tether.Tether(db=db, clock=clock, env=env) as app:
        app.register(*ALL)
        run_id = _drive(app, principal)
        target = Recorded(app=app, run_id=run_id, path=tmp_path / "tether.db")
        rows = _rewrite_refund(target.rows())
        head = target.replace_events(rows, rechain=True)
        forged_key = b"guess"
        target.execute(
            "UPDATE runs SET head_hash=?, head_sig=? WHERE run_id=?",
            head,
            record.sign_head(forged_key, run_id, rows[-1][0], head),
            run_id,
        )

        report = app.verify(run_id)

    assert not report.ok


@pytest.mark.parametrize(
    ("column", "value"),
    [("status", "failed"), ("principal_id", "mallory"), ("request", "nothing")],
)
def test_edited_run_row_is_found(recorded: Recorded, column: str, value: str) -> None:
    """Editing the run's status, principal or request behind the record fails verify.

    Exports print these columns in their header, so they must agree with the
    chain's `run_started` and `run_finished` events.
    """
    recorded.execute(
        f"UPDATE runs SET {column}=? WHERE run_id=?", value, recorded.run_id
    )

    report = recorded.app.verify(recorded.run_id)

    assert not report.ok


def test_unknown_run_is_not_found(recorded: Recorded) -> None:
    """Verifying a run id that does not exist raises NotFound."""
    with pytest.raises(tether.NotFound):
        recorded.app.verify("run_does_not_exist")


def test_raise_for_failure_names_the_run(recorded: Recorded) -> None:
    """A failed report raises IntegrityError naming the run and the reason."""
    recorded.execute(f"DELETE FROM events WHERE {_RUN} AND seq=?", recorded.run_id, 3)
    report = recorded.app.verify(recorded.run_id)

    with pytest.raises(tether.IntegrityError, match=f"run {recorded.run_id}: event 3"):
        report.raise_for_failure()


# -- H.54 log injection -----------------------------------------------------------------

HOSTILE = {
    "crlf": 'ok\r\n{"seq":99,"event":{"kind":"run_finished"}}\r\n',
    "lf-only": "a\nb\n\n",
    "ansi": "\x1b[2J\x1b[31mALL GOOD\x1b[0m\x07",
    "u2028": "line\u2028{}\u2028",
    "u2029": "para\u2029graph",
    "nel": "next\x85line",
    "separators": "\x1c\x1d\x1e\x0b\x0c",
    "braces": '}}]]"{"kind":"forged"\\',
    "nul": "nul\x00byte",
}


def _lines(app: tether.Tether, run_id: str) -> list[bytes]:
    return [chunk.removesuffix(b"\n") for chunk in app.export(run_id)]


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_export_stays_one_event_per_line(app: tether.Tether, payload: str) -> None:
    """Hostile text in args, keys, outputs, errors and the request keeps one JSON object per line.

    (A principal's id is a printable name, and no recorded text holds a NUL:
    those are refused at the door, see test_hostile.py.)"""
    app.register(echo, fail)
    text = payload.replace("\x00", "")
    who = tether.Principal("bot", on_behalf_of=text, tenant="t")
    with app.run(principal=who, request=text, context={payload: payload}) as run:
        run.call("notes.echo", {"text": payload, "tags": {payload: payload}})
        run.step("notes.fail", {"text": payload})
        run.step("notes.echo", {"text": payload, payload: 1})

    lines = _lines(app, run.id)

    assert len(lines) == 1 + len(app.store.events(run.id))
    # A reader that splits text on Unicode line breaks (str.splitlines, editors,
    # log viewers) must see the same lines as one that splits on b"\n".
    split = [line[:60] for line in lines if len(line.decode().splitlines()) != 1]
    assert split == []
    parsed = [orjson.loads(line) for line in lines]
    assert [p["seq"] for p in parsed[1:]] == list(range(1, len(lines)))
    assert {p["event"]["kind"] for p in parsed[1:]} <= set(_KINDS)
    assert b"\x1b" not in b"".join(lines)
    assert parsed[0]["request"] == text
    echoed = next(p["event"] for p in parsed[1:] if p["event"]["kind"] == "executed")
    assert echoed["output"]["text"] == payload
    assert app.verify(run.id).ok


def test_export_lines_round_trip_every_event(recorded: Recorded) -> None:
    """Each export line holds its event's stored body and hash, unchanged."""
    stored = recorded.app.store.events(recorded.run_id)

    lines = _lines(recorded.app, recorded.run_id)[1:]

    assert [orjson.loads(line)["hash"] for line in lines] == [
        e.hash.hex() for e in stored
    ]
    assert [orjson.loads(line)["event"] for line in lines] == [
        orjson.loads(e.body) for e in stored
    ]


# -- H.55 record completeness ----------------------------------------------------------------

_KINDS = {
    "run_started",
    "run_status",
    "run_finished",
    "plan_proposed",
    "validated",
    "precondition_checked",
    "decided",
    "idempotent_hit",
    "key_expired",
    "intent",
    "executed",
    "failed",
    "in_doubt",
}
_TERMINAL = {"executed", "failed", "in_doubt", "idempotent_hit"}


def _varied_steps(run: tether.Run, i: int) -> Iterator[tether.Outcome]:
    """Yield the outcomes of ten steps of every kind: reads, writes, refusals, failures."""
    yield run.step("notes.echo", {"text": f"note {i}"})
    yield run.step("payments.refund", {"order_id": f"o-{i}", "amount_cents": 100 + i})
    yield run.step(
        "payments.refund",
        {"order_id": f"o-{i}", "amount_cents": 100 + i},
        idempotency_key=f"k-{i % 7}-{i}",
    )
    yield run.step(
        "payments.refund",
        {"order_id": f"o-{i}", "amount_cents": 100 + i},
        idempotency_key=f"k-{i % 7}-{i}",
    )
    yield run.step("payments.refund", {"order_id": f"o-{i}", "amount_cents": 60_000})
    yield run.step(
        "payments.refund_open", {"order_id": f"closed-{i}", "amount_cents": 5}
    )
    yield run.step("payments.void", {"order_id": f"o-{i}", "amount_cents": 5})
    yield run.step("notes.fail", {"text": f"upstream {i}"})
    yield run.step("notes.echo", {"text": i})
    yield run.step("payments.refund", {"order_id": "", "amount_cents": -1})


def test_every_event_of_a_busy_record_is_complete(
    tmp_path: Path, principal: tether.Principal
) -> None:
    """Three hundred varied steps leave events with every field an auditor needs."""
    config = tmp_path / "tether.yaml"
    config.write_text("version: 1\n")
    clock = FakeClock(tick=timedelta(milliseconds=3))
    agent = tether.Principal("support-bot", tenant="acme", on_behalf_of="alice")
    run_ids = []
    statuses: Counter[str] = Counter()
    with temporary_app(clock=clock, config=config) as app:
        app.register(*ALL)
        app.add_policy(BigRefunds())
        for r in range(6):
            who = agent if r % 2 else principal
            with app.run(principal=who, request=f"batch {r}") as run:
                for i in range(r * 5, r * 5 + 5):
                    statuses.update(o.status.value for o in _varied_steps(run, i))
            run_ids.append(run.id)

        records = {rid: app.store.events(rid) for rid in run_ids}
        policy_version = app.policy.version

    assert sum(statuses.values()) == 300
    assert set(statuses) == {
        "executed",
        "idempotent_hit",
        "refused",
        "dry_run",
        "failed",
        "invalid",
    }
    assert policy_version.startswith("sha256:")
    for rid, stored in records.items():
        _check_record(rid, stored, policy_version)


def _check_record(
    run_id: str, stored: list[record.StoredEvent], policy_version: str
) -> None:
    events = [e.data() for e in stored]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), run_id
    for e, raw in zip(events, stored, strict=True):
        record.decode(raw.body)  # every event is one of the record's kinds
        assert e["kind"] in _KINDS
        assert e["at"].endswith("Z")
        at = datetime.fromisoformat(e["at"])
        assert at.utcoffset() == timedelta(0), e
    steps: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e["step"] is not None:
            steps.setdefault(e["step"], []).append(e)
    assert events[0]["kind"] == "run_started"
    assert events[-1]["kind"] == "run_finished"
    for number, group in steps.items():
        kinds = [e["kind"] for e in group]
        assert sum(k in _TERMINAL for k in kinds) == 1, (run_id, number, kinds)
        by_kind = {e["kind"]: e for e in group}
        if "validated" in by_kind:
            v = by_kind["validated"]
            assert v["capability"]
            assert v["version"] == "1"
            assert isinstance(v["args"], dict)
        else:
            assert kinds == ["failed"], kinds
            assert by_kind["failed"]["stage"] == "validate"
        if "decided" in by_kind:
            d = by_kind["decided"]
            assert "validated" in by_kind, "a decision names its capability version"
            assert d["principal"] in {"ops-bot", "support-bot"}
            assert "on_behalf_of" in d
            assert d["on_behalf_of"] == (
                "alice" if d["principal"] == "support-bot" else None
            )
            assert isinstance(d["rule_ids"], list)
            assert d["policy_version"] == policy_version
            assert d["verdict"] in {"allow", "deny", "dry_run_only", "require_approval"}
            if d["verdict"] != "allow" or by_kind["validated"]["capability"].startswith(
                "payments."
            ):
                assert d["rule_ids"], d
        if "executed" in by_kind:
            x = by_kind["executed"]
            assert isinstance(x["duration_us"], int)
            assert x["duration_us"] >= 0
            assert Decimal(x["cost"]) >= 0
            assert isinstance(x["output"], dict)
        if "failed" in by_kind:
            f = by_kind["failed"]
            assert f["stage"]
            assert f["error_code"]
            assert f["message"]
        if "intent" in by_kind:
            assert by_kind["intent"]["version"] == "1"
