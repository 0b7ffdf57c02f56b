"""Circuit breakers as the store keeps them: their rows, commands, and rules.

A breaker per resource is closed, open or half-open (see `docs/limits.md`).
The call path sends a `BreakerAdmit` with a step's intent and a
`BreakerOutcome` with its result, inside the run's `Batch`; a backend applies
them in the same transaction as the batch's events (through
`tether.store._limits.apply_admission` and `apply_results`, beside the
step's limits), reading and writing the breaker's one row (`BreakerTables`).
Time alone moves a breaker too (`breaker_view`): open turns half-open after
its cool-down, and half-open reopens when a trial call does not answer.

An `escalate` breaker's approval requests (rule id `breaker:ID`) ask whether a
call may go past it during one outage: the write that closes the breaker
closes them too (`closed_by`, `closing_requests`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from tether import _canonical
from tether.store._rows import ApprovalRow, ApprovalStatus
from tether.store._time import from_us, to_us

if TYPE_CHECKING:
    from tether.record import Event

__all__ = [
    "BREAKER_RULE",
    "BreakerAdmit",
    "BreakerBlocked",
    "BreakerNote",
    "BreakerOutcome",
    "BreakerPass",
    "BreakerRow",
    "BreakerSpec",
    "BreakerState",
    "BreakerTables",
    "admit_breaker",
    "breaker_rule",
    "breaker_view",
    "closed_by",
    "closed_request",
    "closing_requests",
    "decode_admits",
    "encode_admits",
    "record_outcome",
]

# -- rows and commands ---------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class BreakerSpec:
    """A breaker's settings, as the store applies them."""

    id: str
    window: int
    """How many recent calls the failure and slow-call rates are taken over."""
    min_calls: int
    failure_rate: float
    slow_rate: float
    """1.0 and above: slow calls never open the breaker."""
    slow_us: int
    """A call that takes at least this long is slow (0: none is)."""
    open_us: int
    """How long an open breaker refuses before it lets probes through."""
    probes: int
    """How many trial calls half-open lets through before it decides."""
    probe_timeout_us: int
    """How long half-open waits for a probe's result before it reopens."""


class BreakerState(StrEnum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True, kw_only=True)
class BreakerRow:
    """A breaker's stored state."""

    state: BreakerState = BreakerState.CLOSED
    since: int = 0
    """When it entered `state`, µs."""
    generation: int = 0
    """Incremented at every transition: outcomes of an older generation are ignored."""
    outcomes: str = ""
    """Closed: the recent calls, oldest first: 0 ok, 1 failed, 2 slow, 3 slow and failed.
    Half-open: the probes' results so far."""
    probes: int = 0
    """Half-open: trial calls let through so far."""
    probe_deadline: int = 0
    """Half-open: when the oldest unanswered probe's time is up, µs."""
    probe_admits: tuple[int, ...] = ()
    """Half-open: when each unanswered probe was let through, µs, in that order."""
    closed_at: int = 0
    """When it last closed after being open, µs (0: never, or before this was kept):
    a request it made before then belongs to an outage that is over."""

    def copy(self) -> BreakerRow:
        """Return a copy to change (`copy.copy` costs four times as much here)."""
        return BreakerRow(
            state=self.state,
            since=self.since,
            generation=self.generation,
            outcomes=self.outcomes,
            probes=self.probes,
            probe_deadline=self.probe_deadline,
            probe_admits=self.probe_admits,
            closed_at=self.closed_at,
        )


def encode_admits(admits: tuple[int, ...]) -> str:
    """Return `BreakerRow.probe_admits` as a `breakers` row stores it."""
    return " ".join(map(str, admits))


def decode_admits(text: str) -> tuple[int, ...]:
    """Return `BreakerRow.probe_admits` from a `breakers` row's text."""
    return tuple(map(int, text.split()))


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerNote:
    """What a breaker did to a step, for its record: a transition, or a probe let through."""

    breaker_id: str
    at: datetime
    previous: str | None
    """The state before a transition; None for a note that is not one."""
    state: str
    reason: str


@dataclass(slots=True, kw_only=True)
class BreakerAdmit:
    """Ask the breaker to let a step through."""

    spec: BreakerSpec
    read_only_pass: bool = False
    """The breaker degrades to read-only and the step is a read: open lets it through."""
    note: Callable[[BreakerNote], Event]
    """Makes the record event for a transition or a probe (appended to the batch)."""


@dataclass(slots=True, kw_only=True)
class BreakerOutcome:
    """Tell the breaker how a call it let through went."""

    spec: BreakerSpec
    generation: int
    probe: bool
    failed: bool
    slow: bool
    note: Callable[[BreakerNote], Event]
    probe_at: int = 0
    """A trial call: when it was let through, µs (`BreakerPass.probe_at`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerBlocked:
    """The breaker refused the step; nothing of the batch was written."""

    breaker_id: str
    state: BreakerState
    retry_after_us: int


@dataclass(slots=True, kw_only=True)
class BreakerPass:
    """The breaker let the step through."""

    generation: int | None
    """The generation the call runs under; None for a read let through an open
    read-only breaker (its outcome is not the breaker's sample)."""
    probe: bool = False
    """The call is one of half-open's trial calls."""
    probe_at: int = 0
    """A trial call: when it was let through, µs; its outcome names it, so the
    deadline moves on to the next unanswered one when it answers."""
    events: list[Event] = field(default_factory=list)
    """The record events of the transitions and the trial call, if any."""


class BreakerTables(Protocol):
    """A breaker's row, read and written inside the caller's transaction."""

    def breaker(self, breaker_id: str) -> BreakerRow:
        """Return a breaker's row (a closed one when it has none)."""
        ...

    def set_breaker(self, breaker_id: str, row: BreakerRow) -> None:
        """Store a breaker's row."""
        ...

    def push_sample(
        self, breaker_id: str, code: str, window: int, min_calls: int, generation: int
    ) -> bool:
        """Append a success to a closed breaker's window in one write, when it cannot trip it.

        A success lowers both rates once the window holds `min_calls`; the one
        that brings it to `min_calls` is the first to be checked, so it is not
        taken here.

        Returns:
            False when the breaker has no row, is not closed, is of another
            generation, or holds `min_calls - 1` outcomes: then nothing was written.
        """
        ...


# -- rules ---------------------------------------------------------------------------


def breaker_view(
    row: BreakerRow, spec: BreakerSpec, now: int
) -> tuple[BreakerRow, list[tuple[BreakerState, BreakerState, int, str]]]:
    """Return the breaker as it stands at `now`, with the transitions time made.

    Time moves a breaker without any call: open becomes half-open once its
    cool-down is over, and half-open reopens when a probe's time is up without
    an answer (a hung probe must not keep it half-open). The row is not changed.
    """
    moves: list[tuple[BreakerState, BreakerState, int, str]] = []
    cur = row.copy()
    if cur.state is BreakerState.OPEN and cur.since > now:
        # Opened in the future: the wall clock stepped back. Its cool-down is
        # taken as over, so trial calls decide (and the first one's write
        # repairs the row): counting from `now` instead would restart at every
        # refused call, which writes nothing, and refuse until the clock caught up.
        cur.since = now - spec.open_us
    for _ in range(4):  # at most open -> half-open -> open -> half-open in one look
        if cur.state is BreakerState.OPEN and now >= cur.since + spec.open_us:
            at = cur.since + spec.open_us
            moves.append((cur.state, BreakerState.HALF_OPEN, at, "cool-down over"))
            cur = BreakerRow(
                state=BreakerState.HALF_OPEN,
                since=at,
                generation=cur.generation + 1,
                closed_at=cur.closed_at,
            )
        elif (
            cur.state is BreakerState.HALF_OPEN
            and cur.probes > len(cur.outcomes)
            and now >= cur.probe_deadline
        ):
            at = cur.probe_deadline
            moves.append(
                (cur.state, BreakerState.OPEN, at, "a probe did not answer in time")
            )
            cur = BreakerRow(
                state=BreakerState.OPEN,
                since=at,
                generation=cur.generation + 1,
                closed_at=cur.closed_at,
            )
        else:
            break
    return cur, moves


def _notes(
    breaker_id: str,
    moves: Sequence[tuple[BreakerState, BreakerState, int, str]],
    note: Callable[[BreakerNote], Event],
) -> list[Event]:
    return [
        note(
            BreakerNote(
                breaker_id=breaker_id,
                at=from_us(at),
                previous=old.value,
                state=new.value,
                reason=why,
            )
        )
        for old, new, at, why in moves
    ]


def admit_breaker(
    tables: BreakerTables, admit: BreakerAdmit, now: datetime
) -> BreakerPass | BreakerBlocked:
    """Let a step through the breaker, or refuse it (writing nothing then)."""
    spec = admit.spec
    at = to_us(now)
    stored = tables.breaker(spec.id)
    row, moves = breaker_view(stored, spec, at)
    if row.state is BreakerState.CLOSED or admit.read_only_pass:
        # Closed; or a read under a read_only breaker: it goes through while the
        # breaker is open or half-open, and takes no trial call's slot.
        events: list[Event] = []
        if moves:  # (closed is never reached by time alone; kept for safety)
            tables.set_breaker(spec.id, row)
            events = _notes(spec.id, moves, admit.note)
        return BreakerPass(
            generation=row.generation if row.state is BreakerState.CLOSED else None,
            events=events,
        )
    if row.state is BreakerState.HALF_OPEN and row.probes < spec.probes:
        if row.probes == len(row.outcomes):
            # The deadline runs from the oldest unanswered trial call: a later one
            # must not keep a hung one's half-open state alive.
            row.probe_deadline = at + spec.probe_timeout_us
            row.probe_admits = ()
        row.probes += 1
        row.probe_admits = (*row.probe_admits, at)
        tables.set_breaker(spec.id, row)
        events = _notes(spec.id, moves, admit.note)
        events.append(
            admit.note(
                BreakerNote(
                    breaker_id=spec.id,
                    at=now,
                    previous=None,
                    state=row.state.value,
                    reason=f"trial call {row.probes} of {spec.probes}",
                )
            )
        )
        return BreakerPass(
            generation=row.generation, probe=True, probe_at=at, events=events
        )
    if row.state is BreakerState.OPEN:
        retry = row.since + spec.open_us - at
    else:
        retry = max(row.probe_deadline - at, 0)
    return BreakerBlocked(breaker_id=spec.id, state=row.state, retry_after_us=retry)


def _code(failed: bool, slow: bool) -> str:
    return "0123"[int(failed) + 2 * int(slow)]


def _rates(outcomes: str) -> tuple[float, float]:
    n = len(outcomes)
    failed = sum(1 for c in outcomes if c in "13")
    slow = sum(1 for c in outcomes if c in "23")
    return failed / n, slow / n


def _trips(spec: BreakerSpec, outcomes: str) -> str | None:
    failure, slow = _rates(outcomes)
    if failure >= spec.failure_rate:
        return f"failure rate {failure:.0%} of {len(outcomes)} calls >= {spec.failure_rate:.0%}"
    if spec.slow_us and slow >= spec.slow_rate:
        return f"slow-call rate {slow:.0%} of {len(outcomes)} calls >= {spec.slow_rate:.0%}"
    return None


def _answered(row: BreakerRow, probe_at: int, spec: BreakerSpec) -> None:
    """Take an answered trial call off the row: the deadline is the next one's.

    (A row written before `probe_admits` existed has none: its deadline stays.)
    """
    admits = list(row.probe_admits)
    if probe_at in admits:
        admits.remove(probe_at)  # equal times are interchangeable
    row.probe_admits = tuple(admits)
    if admits:
        row.probe_deadline = min(admits) + spec.probe_timeout_us


def record_outcome(
    tables: BreakerTables, outcome: BreakerOutcome, now: datetime
) -> list[Event]:
    """Add a call's outcome to its breaker; return the events of the transitions it made."""
    spec = outcome.spec
    code = _code(outcome.failed, outcome.slow)
    if (
        code == "0"
        and not outcome.probe
        and tables.push_sample(
            spec.id, code, spec.window, spec.min_calls, outcome.generation
        )
    ):
        return []  # a quick success in a closed breaker can trip nothing: one write
    at = to_us(now)
    stored = tables.breaker(spec.id)
    row, moves = breaker_view(stored, spec, at)
    changed = bool(moves)
    if row.generation != outcome.generation:
        pass  # the breaker moved on since the call was let through: not its sample
    elif row.state is BreakerState.CLOSED and not outcome.probe:
        row.outcomes = (row.outcomes + code)[-spec.window :]
        changed = True
        why = (
            _trips(spec, row.outcomes) if len(row.outcomes) >= spec.min_calls else None
        )
        if why is not None:
            moves.append((row.state, BreakerState.OPEN, at, why))
            row = BreakerRow(
                state=BreakerState.OPEN,
                since=at,
                generation=row.generation + 1,
                closed_at=row.closed_at,
            )
    elif row.state is BreakerState.HALF_OPEN and outcome.probe:
        row.outcomes += code
        changed = True
        if len(row.outcomes) >= spec.probes:
            why = _trips(spec, row.outcomes)
            target = BreakerState.OPEN if why else BreakerState.CLOSED
            moves.append(
                (row.state, target, at, why or f"{spec.probes} trial calls succeeded")
            )
            row = BreakerRow(
                state=target,
                since=at,
                generation=row.generation + 1,
                closed_at=at if target is BreakerState.CLOSED else row.closed_at,
            )
        else:
            _answered(row, outcome.probe_at, spec)
    if changed:
        tables.set_breaker(spec.id, row)
    return _notes(spec.id, moves, outcome.note)


# -- the requests an escalating breaker made ----------------------------------------------


def closed_by(tables: BreakerTables, outcome: BreakerOutcome | None) -> str | None:
    """Return the breaker a trial call's outcome left closed, if it did (after `record_outcome`).

    Only a trial call closes a breaker (time alone never does), so only its
    outcome is looked at: the hot path of a closed breaker reads nothing more.
    A trial call answering late, to a breaker another one closed already,
    names it too: nothing the breaker asked a person about is left open
    then either, so closing its requests again changes nothing.
    """
    if outcome is None or not outcome.probe:
        return None
    if tables.breaker(outcome.spec.id).state is BreakerState.CLOSED:
        return outcome.spec.id
    return None


def closing_requests(
    mark: str, breaker_id: str, at: int
) -> tuple[str, tuple[object, ...]]:
    """Return the statement that closes a breaker's requests as the breaker closes at `at`, µs.

    Each asked whether a call may go past the breaker during the outage that
    is now over: the call goes through on its own again, and an answer given
    for this outage must not decide the same call in the next one. So each
    request still pending, approved but unspent, or denied is closed
    `expired`: nobody can approve a pending one after, no later outage lets
    the call past under an old grant, and none refuses it under an old
    denial (a later outage asks a person anew). An undecided one is closed in
    `tether`'s name; a decided one keeps who decided it and when, and its
    decider's note after the closing's own. `mark` is
    the backend's placeholder (SQLite's `?`, psycopg's `%s`).
    """
    rules = _canonical.dumps([breaker_rule(breaker_id)]).decode()  # as `_sql.text_list`
    pending, approved, denied = _closing_notes(breaker_id)
    m = mark
    return (
        "UPDATE approvals SET status='expired', "  # noqa: S608  # placeholders only
        f"decided_by=CASE WHEN status='pending' THEN 'tether' ELSE decided_by END, "
        f"decided_at=CASE WHEN status='pending' THEN {m} ELSE decided_at END, "
        f"note=CASE WHEN status='pending' THEN {m} WHEN status='approved' THEN {m} "
        f"|| COALESCE(' (approved: ' || note || ')', '') "
        f"ELSE {m} || COALESCE(' (denied: ' || note || ')', '') END "
        f"WHERE rule_ids={m} AND status IN ('pending','approved','denied') "
        f"AND expires_at > {m}",
        (at, pending, approved, denied, rules, at),
    )


def closed_request(row: ApprovalRow, breaker_id: str, at: int) -> ApprovalRow | None:
    """Return `row` as `closing_requests` leaves it (None: not one it changes)."""
    when = from_us(at)
    if row.rule_ids != (breaker_rule(breaker_id),) or row.expires_at <= when:
        return None
    pending, approved, denied = _closing_notes(breaker_id)
    if row.status is ApprovalStatus.PENDING:
        return replace(
            row,
            status=ApprovalStatus.EXPIRED,
            decided_by="tether",
            decided_at=when,
            note=pending,
        )
    # A decided one keeps its decider's note after tether's (as `||` and
    # COALESCE do in SQL: a missing note adds nothing).
    if row.status is ApprovalStatus.APPROVED:
        was = "" if row.note is None else f" (approved: {row.note})"
        return replace(row, status=ApprovalStatus.EXPIRED, note=approved + was)
    if row.status is ApprovalStatus.DENIED:
        was = "" if row.note is None else f" (denied: {row.note})"
        return replace(row, status=ApprovalStatus.EXPIRED, note=denied + was)
    return None


BREAKER_RULE = "breaker:"
"""What the rule id of an escalating breaker's requests starts with."""


def breaker_rule(breaker_id: str) -> str:
    """The rule id of the requests an escalating breaker makes (`_limit_stage.take_room`)."""
    return f"{BREAKER_RULE}{breaker_id}"


def _closing_notes(breaker_id: str) -> tuple[str, str, str]:
    """The notes of a pending, an approved and a denied request the breaker's closing closes."""
    return (
        f"closed undecided: breaker {breaker_id} closed; the call goes through it again",
        f"approval withdrawn unspent: breaker {breaker_id} closed",
        f"denial lapsed: breaker {breaker_id} closed; a later outage asks anew",
    )
