"""Circuit breakers against a reference model, and the degraded modes (RELIABILITY D.25-D.29).

The reference model below is the breaker as DESIGN describes it, written
without the store: a count window of the N most recent calls, opening once at
least `min_calls` are in it and the failure (or slow-call) rate reaches its
threshold; open refuses for `open_for`; half-open lets `half_open_calls` trial
calls through and refuses the next, then closes or reopens by the same
thresholds; a trial that does not answer by its deadline reopens it. The real
breaker is driven through a `Tether` app with a fake clock and an upstream that
fails on a scripted schedule; after every call the state and every recorded
transition (its time and the run whose step recorded it) must match the model.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import tether
from tether import gateway
from tether._effects import Execute, Executed, Flow
from tether.agent import PlannerInput, Proposal, ProposedStep, run_agent
from tether.record import Outcome, OutcomeStatus
from tether.run import RunState
from tether.store._breakers import BreakerSpec, BreakerState, breaker_view
from tether.store._limits import to_us
from tether.testing import FakeClock

BREAKER = "up-br"
RESOURCE = "up"
SLOW_CALL = 5
"""Seconds a scripted slow call takes (the handler moves the fake clock)."""
PRINCIPAL = tether.Principal("ops-bot", roles=["agent"], tenant="acme")
US = 1_000_000

Mode = Literal["ok", "fail", "slow", "slow_fail", "hold"]


# -- the breaker as configured -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """One breaker's settings, as a test writes them into `tether.yaml`."""

    window: int = 4
    min_calls: int | None = None
    failure_rate: str = "0.5"
    slow: str | None = None
    """The slow-call duration in seconds; None: no slow-call rule."""
    slow_rate: str = "0.5"
    open_for: int = 30
    probes: int = 1
    probe_timeout: int = 10

    def yaml(self, on_open: str = "escalate") -> str:
        """Return the `breakers:` entry."""
        parts = [
            f"id: {BREAKER}",
            f"resource: {RESOURCE}",
            f"window: {self.window}",
            f"failure_rate: {self.failure_rate}",
            f"open_for: {self.open_for}s",
            f"half_open_calls: {self.probes}",
            f"probe_timeout: {self.probe_timeout}s",
            f"on_open: {on_open}",
        ]
        if self.min_calls is not None:
            parts.append(f"min_calls: {self.min_calls}")
        if self.slow is not None:
            parts.append(
                f"slow_call: {{duration: {self.slow}s, rate: {self.slow_rate}}}"
            )
        return "breakers:\n  - {" + ", ".join(parts) + "}\n"


def write_config(
    folder: Path, spec: Spec, on_open: str = "escalate", extra: str = ""
) -> Path:
    """Write a `tether.yaml` with the breaker (and `extra` sections) into `folder`."""
    path = folder / "tether.yaml"
    path.write_text(
        "defaults: {read: allow, write: allow, destructive: allow}\n"
        + spec.yaml(on_open)
        + extra
    )
    return path


def db_url(backend: str, folder: Path) -> str:
    """Return the store URL of a backend: memory, or a SQLite file in `folder`."""
    if backend == "memory":
        return "memory://"
    return f"sqlite:///{folder / 'tether.db'}?synchronous=normal"


# -- the reference model -------------------------------------------------------------------


Move = tuple[str, str, int]
"""A transition: (previous state, new state, when in µs)."""


@dataclass(slots=True)
class Ticket:
    """What the model said when it let a call through."""

    generation: int
    probe: bool
    start: int


@dataclass(slots=True)
class Model:
    """The breaker as DESIGN states it, in exact arithmetic, with no store."""

    spec: Spec
    state: str = "closed"
    since: int = 0
    generation: int = 0
    window: list[tuple[bool, bool]] = field(default_factory=list)
    """Closed: the recent calls as (failed, slow), oldest first."""
    trials: list[tuple[bool, bool]] = field(default_factory=list)
    """Half-open: the answered trial calls."""
    admitted: int = 0
    """Half-open: trial calls let through."""
    unanswered: list[int] = field(default_factory=list)
    """Half-open: when each trial call still out was let through."""
    deadline: int = 0
    """Half-open: when the oldest trial still out must have answered."""
    moves: list[Move] = field(default_factory=list)
    """Every transition, in order, as time and calls made them."""
    recorded: int = 0
    """How many of `moves` a write has put in a record so far."""

    @property
    def min_calls(self) -> int:
        return self.spec.min_calls or self.spec.window

    def _move(self, to: str, at: int) -> None:
        self.moves.append((self.state, to, at))
        self.state, self.since, self.generation = to, at, self.generation + 1
        self.window, self.trials, self.admitted, self.deadline = [], [], 0, 0
        self.unanswered = []

    def tick(self, now: int) -> None:
        """Let time act: open turns half-open; a trial past its deadline reopens."""
        while True:
            open_until = self.since + self.spec.open_for * US
            if self.state == "open" and now >= open_until:
                self._move("half_open", open_until)
            elif (
                self.state == "half_open"
                and self.admitted > len(self.trials)
                and now >= self.deadline
            ):
                self._move("open", self.deadline)
            else:
                return

    def _written(self) -> list[Move]:
        fresh = self.moves[self.recorded :]
        self.recorded = len(self.moves)
        return fresh

    def admit(self, now: int) -> tuple[Ticket | None, list[Move]]:
        """Ask to let a call through at `now`; return its ticket (None: refused)."""
        self.tick(now)
        if self.state == "closed":
            return Ticket(self.generation, False, now), self._written()
        if self.state == "half_open" and self.admitted < self.spec.probes:
            self.admitted += 1
            self.unanswered.append(now)
            self.deadline = min(self.unanswered) + self.spec.probe_timeout * US
            return Ticket(self.generation, True, now), self._written()
        return None, []  # a refusal writes nothing

    def _trips(self, calls: Sequence[tuple[bool, bool]]) -> bool:
        n = len(calls)
        failed = Fraction(sum(f for f, _ in calls), n)
        slow = Fraction(sum(s for _, s in calls), n)
        if failed >= Fraction(self.spec.failure_rate):
            return True
        return self.spec.slow is not None and slow >= Fraction(self.spec.slow_rate)

    def answer(self, ticket: Ticket, now: int, *, failed: bool) -> list[Move]:
        """Tell the model how a call it let through went, at `now`."""
        self.tick(now)
        slow = (
            self.spec.slow is not None
            and (now - ticket.start) >= Fraction(self.spec.slow) * US
        )
        if ticket.generation == self.generation:  # else: the breaker moved on
            if self.state == "closed" and not ticket.probe:
                self.window = [*self.window, (failed, slow)][-self.spec.window :]
                if len(self.window) >= self.min_calls and self._trips(self.window):
                    self._move("open", now)
            elif self.state == "half_open" and ticket.probe:
                self.trials.append((failed, slow))
                self.unanswered.remove(ticket.start)
                if len(self.trials) >= self.spec.probes:
                    self._move("open" if self._trips(self.trials) else "closed", now)
                elif self.unanswered:  # the next one still out has its own time
                    self.deadline = min(self.unanswered) + self.spec.probe_timeout * US
        return self._written()


# -- the upstream and the driver -------------------------------------------------------------


class UpIn(BaseModel, extra="forbid"):
    mode: Mode
    tag: int = 0


class UpOut(BaseModel):
    ok: bool


class Hold:
    """A call held inside the upstream until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.settled = threading.Event()
        """Set when the call entered the upstream, or its step returned (refused)."""
        self.gate = threading.Event()
        self.fail = False
        self.outcome: Outcome | None = None


class Upstream:
    """A fake upstream: each call does what its args say; held calls wait for the test."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.holds: dict[int, Hold] = {}
        self.calls = 0

    def capability(self) -> tether.Capability[UpIn, UpOut]:
        @tether.capability(
            "up.call", effect="write", idempotency="keyed", resource=RESOURCE
        )
        def call(args: UpIn) -> UpOut:
            self.calls += 1
            mode = args.mode
            if mode in ("slow", "slow_fail"):
                self.clock.advance(timedelta(seconds=SLOW_CALL))
            if mode == "hold":
                hold = self.holds[args.tag]
                hold.entered.set()
                hold.settled.set()
                assert hold.gate.wait(30), "the test never released the call"
                if hold.fail:
                    raise ConnectionError("upstream 503 (held call)")
                return UpOut(ok=True)
            if mode in ("fail", "slow_fail"):
                raise ConnectionError("upstream 503")
            return UpOut(ok=True)

        return call


CALL_MODES: dict[str, Mode] = {"o": "ok", "f": "fail", "s": "slow", "x": "slow_fail"}


def transitions(app: tether.Tether, run_id: str, skip: int = 0) -> list[Move]:
    """Return the breaker transitions in a run's record (after its first `skip` events)."""
    out = []
    for e in app.store.events(run_id)[skip:]:
        data = e.data()
        if data["kind"] == "breaker_transition":
            assert data["breaker"] == BREAKER
            at = to_us(datetime.fromisoformat(data["at"]))
            out.append((data["previous"], data["state"], at))
    return out


def all_transitions(app: tether.Tether, run_ids: Sequence[str]) -> list[Move]:
    """Return every breaker transition in these runs' records, in time order."""
    return sorted((m for r in run_ids for m in transitions(app, r)), key=_by_time)


def _by_time(move: Move) -> tuple[int, str, str]:
    return move[2], move[0], move[1]


def parse(ops: str) -> list[str]:
    return ops.split()


@dataclass(slots=True)
class Pending:
    """A held call the driver let through and has not released yet."""

    hold: Hold
    run: tether.Run
    thread: threading.Thread
    ticket: Ticket
    seen: int
    """Events of its run already compared."""


class Driver:
    """Play a schedule against the real breaker and the model, comparing after each op.

    Ops: `o`/`f` a call that succeeds/fails at once; `s`/`x` the same taking
    `SLOW_CALL` seconds; `wN` the clock moves N seconds; `h` a call that enters
    the upstream and stays there; `r`/`R` the oldest held call answers ok/fails.
    Held calls run in their own run, on a thread; the others share one run.
    """

    def __init__(
        self, app: tether.Tether, clock: FakeClock, upstream: Upstream, spec: Spec
    ) -> None:
        self.app = app
        self.clock = clock
        self.upstream = upstream
        self.spec = spec
        found = app.guards.breakers.for_resource(RESOURCE) if app.guards else None
        assert found is not None
        self.real_spec: BreakerSpec = found[1]
        self.model = Model(spec=spec, since=self.now())
        self.run = app.run(principal=PRINCIPAL, request="drive the breaker")
        self.run.__enter__()
        self.seen = len(app.store.events(self.run.id))
        self.pending: list[Pending] = []
        self.run_ids = [self.run.id]

    def now(self) -> int:
        return to_us(self.clock.now())

    def play(self, ops: Sequence[str]) -> None:
        for index, op in enumerate(ops):
            where = f"op {index} {op!r} of {' '.join(ops)!r}"
            if op.startswith("w"):
                self.clock.advance(timedelta(seconds=float(op[1:])))
            elif op in ("o", "f", "s", "x"):
                self._call(op, where)
            elif op == "h":
                self._hold(where)
            elif op in ("r", "R"):
                self._release(op == "R", where)
            else:
                raise AssertionError(f"unknown op {op!r}")
            self._check_state(where)
        while self.pending:  # release what is still held, as the model is told
            self._release(False, "final release")
            self._check_state("final release")
        self.run.__exit__(None, None, None)
        assert all_transitions(self.app, self.run_ids) == sorted(
            self.model.moves[: self.model.recorded], key=_by_time
        )

    def _check_state(self, where: str) -> None:
        now = self.now()
        self.model.tick(now)
        row = self.app.store.breaker_row(BREAKER)
        view, _ = breaker_view(row, self.real_spec, now)
        assert view.state.value == self.model.state, f"{where}: state"

    def _check_refused(self, outcome: Outcome, where: str) -> None:
        assert outcome.status is OutcomeStatus.REFUSED, f"{where}: {outcome}"
        assert isinstance(outcome.error, tether.ApprovalRequired), where
        assert BREAKER in outcome.error.message, where

    def _call(self, op: str, where: str) -> None:
        mode = CALL_MODES[op]
        ticket, admitted = self.model.admit(self.now())
        outcome = self.run.step("up.call", {"mode": mode})
        fresh = transitions(self.app, self.run.id, self.seen)
        self.seen = len(self.app.store.events(self.run.id))
        if ticket is None:
            self._check_refused(outcome, where)
            assert fresh == [], f"{where}: a refusal recorded a transition"
            return
        failed = mode in ("fail", "slow_fail")
        expected = OutcomeStatus.FAILED if failed else OutcomeStatus.EXECUTED
        assert outcome.status is expected, f"{where}: {outcome}"
        answered = self.model.answer(ticket, self.now(), failed=failed)
        assert fresh == admitted + answered, f"{where}: transitions"

    def _hold(self, where: str) -> None:
        tag = len(self.upstream.holds)
        hold = self.upstream.holds[tag] = Hold()
        run = self.app.run(principal=PRINCIPAL, request=f"held call {tag}")
        run.__enter__()
        self.run_ids.append(run.id)
        seen = len(self.app.store.events(run.id))
        ticket, admitted = self.model.admit(self.now())

        def take() -> None:
            hold.outcome = run.step("up.call", {"mode": "hold", "tag": tag})
            hold.settled.set()

        thread = threading.Thread(target=take, name=f"held-call-{tag}")
        thread.start()
        assert hold.settled.wait(10), f"{where}: the held call neither ran nor returned"
        fresh = transitions(self.app, run.id, seen)
        if ticket is None:
            thread.join(10)
            assert hold.outcome is not None
            assert not hold.entered.is_set(), (
                f"{where}: a refused call reached the upstream"
            )
            self._check_refused(hold.outcome, where)
            assert fresh == [], f"{where}: a refusal recorded a transition"
            run.__exit__(None, None, None)
            return
        assert hold.entered.is_set(), (
            f"{where}: the model let it through: {hold.outcome}"
        )
        assert fresh == admitted, f"{where}: transitions at admission"
        seen = len(self.app.store.events(run.id))
        self.pending.append(Pending(hold, run, thread, ticket, seen))

    def _release(self, fail: bool, where: str) -> None:
        if not self.pending:
            return
        held = self.pending.pop(0)
        held.hold.fail = fail
        held.hold.gate.set()
        held.thread.join(10)
        assert not held.thread.is_alive(), f"{where}: the held call did not finish"
        outcome = held.hold.outcome
        assert outcome is not None
        expected = OutcomeStatus.FAILED if fail else OutcomeStatus.EXECUTED
        assert outcome.status is expected, f"{where}: {outcome}"
        answered = self.model.answer(held.ticket, self.now(), failed=fail)
        fresh = transitions(self.app, held.run.id, held.seen)
        assert fresh == answered, f"{where}: transitions at the answer"
        held.run.__exit__(None, None, None)

    def abandon(self) -> None:
        """Let every held call go (after a failed assertion), so no thread lingers."""
        for held in self.pending:
            held.hold.gate.set()
            held.thread.join(10)


@contextlib.contextmanager
def breaker_app(
    backend: str, spec: Spec, *, on_open: str = "escalate", extra: str = ""
) -> Iterator[tuple[tether.Tether, FakeClock, Upstream]]:
    """Yield an app with the breaker over the fake upstream, on a fresh store."""
    with tempfile.TemporaryDirectory(prefix="tether-breaker-") as name:
        folder = Path(name)
        clock = FakeClock()
        app = tether.Tether(
            db=db_url(backend, folder),
            config=write_config(folder, spec, on_open, extra),
            clock=clock,
            env={},
        )
        upstream = Upstream(clock)
        app.register(upstream.capability())
        try:
            yield app, clock, upstream
        finally:
            app.close()


def play(backend: str, spec: Spec, ops: Sequence[str]) -> str:
    """Play a schedule against the model; return the breaker's final state."""
    with breaker_app(backend, spec) as (app, clock, upstream):
        driver = Driver(app, clock, upstream, spec)
        try:
            driver.play(ops)
        finally:
            driver.abandon()
        return driver.model.state


# -- D.25: hand-written schedules --------------------------------------------------------------

K2 = Spec(probes=2)
K3 = Spec(probes=3)
W10 = Spec(window=10, min_calls=4)
SLOW = Spec(slow="2.5", slow_rate="0.5")
OPEN = "f f f f"
"""Four failures: opens the default breaker (window 4, rate 0.5)."""

SCHEDULES: list[tuple[str, Spec, str, str]] = [
    ("all-ok-stays-closed", Spec(), "o o o o o o o o", "closed"),
    ("fewer-than-min-calls-stays-closed", Spec(), "f f f", "closed"),
    ("full-window-of-failures-opens", Spec(), OPEN, "open"),
    ("rate-equal-to-threshold-opens", Spec(), "o o f f", "open"),
    ("rate-below-threshold-stays-closed", Spec(), "o o o f", "closed"),
    ("success-that-fills-min-calls-opens", Spec(), "f f o o", "open"),
    ("old-failure-slides-out", Spec(), "f o o o o f", "closed"),
    ("failures-accumulate-in-window", Spec(), "o o o f f", "open"),
    ("window-counts-calls-not-time", Spec(), "f w1000 f w1000 f w1000 f", "open"),
    ("open-refuses", Spec(), f"{OPEN} o o f", "open"),
    ("open-refuses-until-open-for", Spec(), f"{OPEN} w29.999 o", "open"),
    ("open-refuses-in-parts", Spec(), f"{OPEN} w10 o w19 o", "open"),
    ("half-open-once-open-for-passed", Spec(), f"{OPEN} w30", "half_open"),
    ("ok-probe-closes", Spec(), f"{OPEN} w30 o", "closed"),
    ("failed-probe-reopens", Spec(), f"{OPEN} w30 f", "open"),
    ("reopened-refuses-for-open-for", Spec(), f"{OPEN} w30 f w29 o", "open"),
    ("reopened-half-opens-again", Spec(), f"{OPEN} w30 f w30 o", "closed"),
    ("closing-empties-the-window", Spec(), f"{OPEN} w30 o f f f", "closed"),
    ("closed-again-opens-again", Spec(), f"{OPEN} w30 o f f f f", "open"),
    ("probe-after-an-hour", Spec(), f"{OPEN} w3600 o", "closed"),
    ("cycles", Spec(), f"{OPEN} w30 f w30 f w30 o o o o o", "closed"),
    ("two-probes-ok-close", K2, f"{OPEN} w30 o o", "closed"),
    ("one-of-two-probes-failed-reopens", K2, f"{OPEN} w30 o f", "open"),
    ("first-probe-failed-reopens", K2, f"{OPEN} w30 f o", "open"),
    ("one-probe-answered-stays-half-open", K2, f"{OPEN} w30 o", "half_open"),
    (
        "one-of-two-probes-failed-under-rate-1-closes",
        Spec(probes=2, failure_rate="1.0"),
        f"{OPEN} w30 o f",
        "closed",
    ),
    ("probe-k-plus-1-refused-k1", Spec(), f"{OPEN} w30 h o o r", "closed"),
    ("probe-k-plus-1-refused-k2", K2, f"{OPEN} w30 h h o r r", "closed"),
    ("probe-k-plus-1-refused-k3", K3, f"{OPEN} w30 h h h o r r r", "closed"),
    ("held-probes-one-fails", K2, f"{OPEN} w30 h h o R r", "open"),
    ("held-probes-answer-out-of-order", K2, f"{OPEN} w30 h o r", "closed"),
    ("hung-probe-reopens-at-deadline", Spec(), f"{OPEN} w30 h w10 o", "open"),
    ("hung-probe-just-before-deadline", Spec(), f"{OPEN} w30 h w9.999 o r", "closed"),
    ("hung-probe-then-half-open-again", Spec(), f"{OPEN} w30 h w40 o", "closed"),
    ("hung-probe-two-moves-in-one-look", Spec(), f"{OPEN} w30 h w100 o", "closed"),
    ("late-answer-is-ignored", Spec(), f"{OPEN} w30 h w11 R", "open"),
    ("late-ok-answer-does-not-close", Spec(), f"{OPEN} w30 h w11 r", "open"),
    (
        "short-probe-timeout",
        Spec(probe_timeout=5),
        f"{OPEN} w30 h w5 o w30 o",
        "closed",
    ),
    ("one-answered-one-hung-reopens", K2, f"{OPEN} w30 h o w10 o", "open"),
    ("two-hung-probes-reopen", K2, f"{OPEN} w30 h h w10 o", "open"),
    (
        "answered-probe-hands-its-deadline-on",
        K2,
        f"{OPEN} w30 h w8 h w1 r w5",
        "closed",
    ),
    ("next-probe-keeps-its-own-deadline", K2, f"{OPEN} w30 h w8 h w1 r w9 r", "open"),
    (
        "young-probe-answers-after-the-old-deadline",
        Spec(probes=2, probe_timeout=60),
        f"{OPEN} w30 h w50 h w5 r w6 r",
        "closed",
    ),
    (
        "call-let-through-closed-answers-after-open",
        Spec(),
        f"h {OPEN} R w30 o",
        "closed",
    ),
    ("held-closed-call-counts-when-it-answers", Spec(), "h o o f R", "open"),
    ("min-calls-below-window-opens-early", W10, OPEN, "open"),
    ("min-calls-below-window-rate", W10, "o o o f", "closed"),
    ("min-calls-below-window-rate-reached", W10, "o o f f", "open"),
    ("nine-of-nine-with-min-ten", Spec(window=10), "f f f f f f f f f", "closed"),
    ("window-one-opens-on-first-failure", Spec(window=1), "o o f", "open"),
    (
        "rate-one-needs-every-call-failed",
        Spec(failure_rate="1.0"),
        "f f f o f f f",
        "closed",
    ),
    ("rate-one-all-failed-opens", Spec(failure_rate="1.0"), "o f f f f", "open"),
    ("rate-quarter-opens-on-one-of-four", Spec(failure_rate="0.25"), "o o o f", "open"),
    ("slow-calls-open", SLOW, "s s o o", "open"),
    ("slow-calls-below-rate", SLOW, "s o o o", "closed"),
    (
        "slow-and-failed-counts-as-slow",
        Spec(slow="2.5", slow_rate="0.5", failure_rate="0.75"),
        "x x o o",
        "open",
    ),
    ("no-slow-rule-slow-never-opens", Spec(), "s s s s s", "closed"),
    (
        "faster-than-slow-duration",
        Spec(slow="7.5", slow_rate="0.5"),
        "s s s s",
        "closed",
    ),
    ("slow-probe-reopens", SLOW, f"{OPEN} w30 s", "open"),
    (
        "held-probe-answering-late-is-slow",
        Spec(slow="2.5", slow_rate="1.0"),
        f"{OPEN} w30 h w5 r",
        "open",
    ),
    (
        "held-closed-call-is-slow",
        Spec(window=2, slow="2.5", slow_rate="0.5"),
        "h w3 o r",
        "open",
    ),
]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize(
    ("spec", "ops", "final"),
    [pytest.param(s, o, f, id=i) for i, s, o, f in SCHEDULES],
)
def test_breaker_follows_the_model_on_a_schedule(
    backend: str, spec: Spec, ops: str, final: str
) -> None:
    """D.25: after every call the breaker's state, and every recorded transition
    (its time, and the run that recorded it), match the reference model."""
    assert play(backend, spec, parse(ops)) == final


def test_there_are_fifty_hand_written_schedules() -> None:
    """D.25 asks for about fifty; each has a distinct id."""
    assert len(SCHEDULES) >= 50
    assert len({s[0] for s in SCHEDULES}) == len(SCHEDULES)


def test_the_model_is_not_the_only_judge() -> None:
    """Two schedules whose expected transitions are written out by hand, in µs from the start."""
    with breaker_app("memory", K2) as (app, clock, upstream):
        driver = Driver(app, clock, upstream, K2)
        start = driver.now()
        driver.play(parse(f"{OPEN} w30 h o w10 o"))
        got = [(a, b, t - start) for a, b, t in all_transitions(app, driver.run_ids)]
    assert got == [
        ("closed", "open", 0),
        ("open", "half_open", 30 * US),
        ("half_open", "open", 40 * US),  # the held probe's deadline
    ]


# -- D.25: generated schedules ------------------------------------------------------------------

OPS = st.sampled_from(
    ["o", "o", "o", "f", "f", "f", "s", "x", "h", "r", "R"]
) | st.sampled_from(["w1", "w5", "w10", "w30", "w31", "w100"])


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """Draw breaker settings; rates and durations chosen so no comparison is a float tie."""
    window = draw(st.integers(1, 6), label="window")
    return Spec(
        window=window,
        min_calls=draw(st.none() | st.integers(1, window), label="min_calls"),
        failure_rate=draw(st.sampled_from(["0.25", "0.5", "0.6", "1.0"])),
        slow=draw(st.sampled_from([None, "2.5", "7.5"]), label="slow"),
        slow_rate=draw(st.sampled_from(["0.5", "1.0"]), label="slow_rate"),
        open_for=draw(st.sampled_from([1, 10, 30]), label="open_for"),
        probes=draw(st.integers(1, 3), label="probes"),
        probe_timeout=draw(st.sampled_from([1, 5, 10, 60]), label="probe_timeout"),
    )


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=specs(), ops=st.lists(OPS, min_size=1, max_size=40))
def test_breaker_follows_the_model_on_generated_schedules(
    spec: Spec, ops: list[str]
) -> None:
    """D.25: random settings and schedules (in memory); the model and the store agree."""
    event(f"ends {play('memory', spec, ops)}")


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=specs(), ops=st.lists(OPS, min_size=1, max_size=20))
def test_breaker_follows_the_model_on_generated_schedules_sqlite(
    spec: Spec, ops: list[str]
) -> None:
    """D.25: the same property on SQLite, fewer examples."""
    event(f"ends {play('sqlite', spec, ops)}")


# -- D.26 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_nine_failures_of_nine_with_min_calls_ten_stay_closed(backend: str) -> None:
    """D.26: nine failures out of nine with min_calls 10 stay closed; the tenth opens."""
    spec = Spec(window=10, min_calls=10)
    with (
        breaker_app(backend, spec) as (app, _, _),
        app.run(principal=PRINCIPAL, request="fail") as run,
    ):
        outcomes = [run.step("up.call", {"mode": "fail"}) for _ in range(9)]
        closed = app.store.breaker_row(BREAKER).state
        tenth = run.step("up.call", {"mode": "fail"})
        opened = app.store.breaker_row(BREAKER).state
        eleventh = run.step("up.call", {"mode": "ok"})

    assert [o.status for o in outcomes] == [OutcomeStatus.FAILED] * 9
    assert closed is BreakerState.CLOSED
    assert tenth.status is OutcomeStatus.FAILED  # it ran, and its failure opened it
    assert opened is BreakerState.OPEN
    assert eleventh.status is OutcomeStatus.REFUSED


# -- D.27: hung probes --------------------------------------------------------------------------


def open_breaker(app: tether.Tether, n: int = 4) -> str:
    """Fail `n` calls in one run (enough to open the default breaker); return the run id."""
    with app.run(principal=PRINCIPAL, request="break it") as run:
        for _ in range(n):
            run.step("up.call", {"mode": "fail"})
    assert app.store.breaker_row(BREAKER).state is BreakerState.OPEN
    return run.id


def stop_at_execute(
    run: tether.Run, capability: str, args: dict[str, Any]
) -> tuple[Flow, Execute]:
    """Take a step up to the moment its handler would start, and stop there.

    Everything before the handler (the admission, the breaker's trial slot) is
    written; what a process that dies inside the handler leaves behind.
    """
    flow = gateway.step(run, app_capability(run, capability), args)
    reply: object = None
    while True:
        effect = flow.send(reply)
        if isinstance(effect, Execute):
            return flow, effect
        reply = effect.perform()


def finish(flow: Flow, first: Executed) -> Outcome:
    """Resume a stopped step with its handler's result and drive it to the end."""
    reply: object = first
    while True:
        try:
            effect = flow.send(reply)
        except StopIteration as done:
            outcome: Outcome = done.value
            return outcome
        reply = effect.perform()


def app_capability(run: tether.Run, name: str) -> tether.Capability[Any, Any]:
    return run.app.capabilities.get(name)


def view_state(app: tether.Tether, clock: FakeClock) -> BreakerState:
    """Return the breaker's state as it stands now (time moves it without calls)."""
    assert app.guards is not None
    found = app.guards.breakers.for_resource(RESOURCE)
    assert found is not None
    view, _ = breaker_view(app.store.breaker_row(BREAKER), found[1], to_us(clock.now()))
    return view.state


def test_a_probe_whose_process_died_reopens_the_breaker_at_its_deadline(
    tmp_path: Path,
) -> None:
    """D.27: a trial call whose worker died in the handler holds half-open no longer
    than probe_timeout; then it is open, and after open_for a new probe goes through."""
    spec = Spec(probe_timeout=10, open_for=30)
    config = write_config(tmp_path, spec)
    db = db_url("sqlite", tmp_path)
    clock = FakeClock()
    dead = tether.Tether(db=db, config=config, clock=clock, env={})
    live = tether.Tether(db=db, config=config, clock=clock, env={})
    for app in (dead, live):
        app.register(Upstream(clock).capability())
    try:
        open_breaker(live)
        clock.advance(timedelta(seconds=30))
        doomed = dead.run(principal=PRINCIPAL, request="the probe that dies")
        doomed.__enter__()
        stop_at_execute(
            doomed, "up.call", {"mode": "ok"}
        )  # ... and the process is gone
        admitted = to_us(clock.now())

        with live.run(principal=PRINCIPAL, request="after the crash") as run:
            clock.advance(timedelta(seconds=10) - timedelta(microseconds=1))
            during = view_state(live, clock), run.step("up.call", {"mode": "ok"})
            clock.advance(timedelta(microseconds=1))
            at_deadline = view_state(live, clock), run.step("up.call", {"mode": "ok"})
            clock.advance(timedelta(seconds=30))
            new_probe = run.step("up.call", {"mode": "ok"})
        moves = transitions(live, run.id)
    finally:
        dead.close()
        live.close()

    assert during[0] is BreakerState.HALF_OPEN
    assert during[1].status is OutcomeStatus.REFUSED
    assert at_deadline[0] is BreakerState.OPEN
    assert at_deadline[1].status is OutcomeStatus.REFUSED
    assert new_probe.status is OutcomeStatus.EXECUTED
    assert moves == [
        ("half_open", "open", admitted + 10 * US),
        ("open", "half_open", admitted + 40 * US),
        ("half_open", "closed", admitted + 40 * US),
    ]


def test_a_probe_that_overruns_its_timeout_counts_as_failed(tmp_path: Path) -> None:
    """D.27: a trial call whose handler overruns the capability timeout answers as a
    failure at once (step_timeout): the breaker reopens instead of waiting half-open."""
    clock = FakeClock()
    release = threading.Event()

    @tether.capability(
        "up.slow", effect="write", idempotency="keyed", resource=RESOURCE, timeout=0.05
    )
    def slow(args: UpIn) -> UpOut:
        release.wait(10)
        return UpOut(ok=True)

    app = tether.Tether(
        db=db_url("sqlite", tmp_path),
        config=write_config(tmp_path, Spec()),
        clock=clock,
        env={},
    )
    app.register(Upstream(clock).capability(), slow)
    try:
        open_breaker(app)
        clock.advance(timedelta(seconds=30))
        with app.run(principal=PRINCIPAL, request="probe") as run:
            probe = run.step("up.slow", {"mode": "hold"})
            after = run.step("up.call", {"mode": "ok"})
        moves = transitions(app, run.id)
    finally:
        release.set()
        app.close()

    assert probe.status is OutcomeStatus.FAILED
    assert isinstance(probe.error, tether.StepTimeout)
    assert [m[:2] for m in moves] == [("open", "half_open"), ("half_open", "open")]
    assert after.status is OutcomeStatus.REFUSED


def test_a_hung_probe_is_not_kept_alive_by_a_later_probe() -> None:
    """D.27: a trial that does not answer within probe_timeout reopens the breaker,
    even when a second trial was let through after it (half_open_calls 2)."""
    with breaker_app("memory", K2) as (app, clock, _):
        open_breaker(app)
        clock.advance(timedelta(seconds=30))
        first = app.run(principal=PRINCIPAL, request="hung probe")
        first.__enter__()
        stop_at_execute(first, "up.call", {"mode": "ok"})  # never answers
        clock.advance(timedelta(seconds=9))
        with app.run(principal=PRINCIPAL, request="second probe") as run:
            assert run.step("up.call", {"mode": "ok"}).status is OutcomeStatus.EXECUTED
        clock.advance(
            timedelta(seconds=5)
        )  # 14 s after the first probe, 5 after the second

        state = view_state(app, clock)

    assert state is BreakerState.OPEN


# -- D.28-lite: one breaker, two store connections -----------------------------------------------


def test_two_apps_on_one_sqlite_file_share_one_breaker(tmp_path: Path) -> None:
    """D.28: two apps (two connections) count into one window, let k probes through
    globally (not k per app), and each transition is in the record of the run that made it."""
    spec = Spec(probes=2)
    config = write_config(tmp_path, spec)
    db = db_url("sqlite", tmp_path)
    clock = FakeClock()
    a = tether.Tether(db=db, config=config, clock=clock, env={})
    b = tether.Tether(db=db, config=config, clock=clock, env={})
    for app in (a, b):
        app.register(Upstream(clock).capability())
    try:
        ra = a.run(principal=PRINCIPAL, request="a")
        rb = b.run(principal=PRINCIPAL, request="b")
        ra.__enter__()
        rb.__enter__()
        for run in (ra, rb, ra):
            run.step("up.call", {"mode": "fail"})
        assert a.store.breaker_row(BREAKER).state is BreakerState.CLOSED
        rb.step(
            "up.call", {"mode": "fail"}
        )  # the 4th failure, counted across both apps
        opened_at = to_us(clock.now())
        assert a.store.breaker_row(BREAKER).state is BreakerState.OPEN
        assert ra.step("up.call", {"mode": "ok"}).status is OutcomeStatus.REFUSED

        clock.advance(timedelta(seconds=30))
        pa = a.run(principal=PRINCIPAL, request="probe a")
        pb = b.run(principal=PRINCIPAL, request="probe b")
        pa.__enter__()
        pb.__enter__()
        flow_a, exec_a = stop_at_execute(pa, "up.call", {"mode": "ok"})
        flow_b, exec_b = stop_at_execute(pb, "up.call", {"mode": "ok"})
        third = [ra.step("up.call", {"mode": "ok"}), rb.step("up.call", {"mode": "ok"})]
        assert a.store.breaker_row(BREAKER).probes == 2
        done_a = finish(flow_a, exec_a.perform())
        clock.advance(timedelta(seconds=1))
        done_b = finish(flow_b, exec_b.perform())
        for run in (ra, rb, pa, pb):
            run.__exit__(None, None, None)
        records = {
            name: [m[:2] for m in transitions(app, run.id)]
            for name, app, run in [
                ("ra", a, ra),
                ("rb", b, rb),
                ("pa", a, pa),
                ("pb", b, pb),
            ]
        }
        closed_by_b = transitions(b, pb.id)
    finally:
        a.close()
        b.close()

    assert [o.status for o in third] == [OutcomeStatus.REFUSED] * 2
    assert all(
        o.error is not None
        and "half-open with its trial calls taken" in o.error.message
        for o in third
    )
    assert (done_a.status, done_b.status) == (OutcomeStatus.EXECUTED,) * 2
    assert records == {
        "ra": [],
        "rb": [("closed", "open")],
        "pa": [("open", "half_open")],
        "pb": [("half_open", "closed")],
    }
    assert closed_by_b[0][2] == opened_at + 31 * US


# -- D.29: degraded modes ----------------------------------------------------------------------


def kinds_of(app: tether.Tether, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.data() for e in app.store.events(run_id) if e.data()["kind"] == kind]


def test_escalate_raises_approval_required_naming_the_breaker(tmp_path: Path) -> None:
    """D.29 escalate: a call refused by the open breaker raises ApprovalRequired naming
    it; the record holds a refused breaker check and a failure at stage "breaker"."""
    with breaker_app("sqlite", Spec(), on_open="escalate") as (app, _, upstream):
        open_breaker(app)
        calls = upstream.calls
        with (
            pytest.raises(tether.ApprovalRequired) as caught,
            app.run(principal=PRINCIPAL, request="pay") as run,
        ):
            run.call("up.call", {"mode": "ok"})
        checked = kinds_of(app, run.id, "breaker_checked")
        failed = kinds_of(app, run.id, "failed")
        status = app.store.get_run(run.id).status
        assert upstream.calls == calls  # nothing ran

    assert caught.value.code == "approval_required"
    assert f"breaker {BREAKER}" in caught.value.message
    assert [(c["breaker"], c["admitted"], c["mode"], c["state"]) for c in checked] == [
        (BREAKER, False, "escalate", "open")
    ]
    assert [(f["stage"], f["error_code"]) for f in failed] == [
        ("breaker", "approval_required")
    ]
    assert status == "failed"  # the exception left the block


class WholePlan:
    """A planner that proposes its whole plan in one turn, then finishes."""

    def __init__(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
        self.steps = tuple(ProposedStep(capability=c, args=a) for c, a in steps)

    def propose(self, state: PlannerInput) -> Proposal:
        if state.observations:
            return Proposal(finish=True, answer="done")
        return Proposal(steps=self.steps)


class PingIn(BaseModel, extra="forbid"):
    host: str


class PingOut(BaseModel):
    up: bool


@tether.capability("net.ping", effect="read")
def ping(args: PingIn) -> PingOut:
    return PingOut(up=True)


def test_stash_parks_the_run_degraded_with_the_rest_of_its_plan() -> None:
    """D.29 stash: the refused step and the steps after it are stashed; the run leaves
    its block `degraded`, refuses further calls, and its record verifies."""
    with breaker_app("sqlite", Spec(), on_open="stash") as (app, _, upstream):
        app.register(ping)
        open_breaker(app)
        calls = upstream.calls
        plan: list[tuple[str, dict[str, Any]]] = [
            ("net.ping", {"host": "a"}),
            ("up.call", {"mode": "ok", "tag": 1}),
            ("up.call", {"mode": "ok", "tag": 2}),
            ("net.ping", {"host": "b"}),
        ]
        run = run_agent(app, WholePlan(plan), principal=PRINCIPAL, request="pay")
        stashed = kinds_of(app, run.id, "plan_stashed")
        row = app.store.get_run(run.id)
        with pytest.raises(tether.UsageError, match="degraded"):
            run.call("net.ping", {"host": "c"})
        report = app.verify(run.id)
        assert upstream.calls == calls

    assert run.status is RunState.DEGRADED
    assert row.status == "degraded"
    assert len(stashed) == 1
    assert stashed[0]["breaker"] == BREAKER
    assert [(s["capability"], s["args"]) for s in stashed[0]["steps"]] == [
        ("up.call", {"mode": "ok", "tag": 1}),
        ("up.call", {"mode": "ok", "tag": 2}),
        ("net.ping", {"host": "b"}),
    ]
    assert report.ok


def test_stash_through_run_step_stays_degraded_and_can_go_on_after_close() -> None:
    """D.29 stash: `BreakerOpen(mode="stash")`; leaving the block keeps the run
    degraded; once the breaker has closed, the run can be moved back and the
    stashed step taken."""
    with breaker_app("memory", Spec(), on_open="stash") as (app, clock, _):
        open_breaker(app)
        with app.run(principal=PRINCIPAL, request="pay") as run:
            refused = run.step("up.call", {"mode": "ok", "tag": 7})
        after_block = run.status
        (stashed,) = kinds_of(app, run.id, "plan_stashed")

        clock.advance(timedelta(seconds=30))
        with app.run(principal=PRINCIPAL, request="probe") as probe:
            probe.call("up.call", {"mode": "ok"})  # closes it
        run.transition(RunState.EXECUTING)
        resumed = [run.step(s["capability"], s["args"]) for s in stashed["steps"]]
        run.__exit__(None, None, None)

    assert isinstance(refused.error, tether.BreakerOpen)
    assert (refused.error.mode, refused.error.breaker_id) == ("stash", BREAKER)
    assert after_block is RunState.DEGRADED
    assert [s["args"] for s in stashed["steps"]] == [{"mode": "ok", "tag": 7}]
    assert [o.status for o in resumed] == [OutcomeStatus.EXECUTED]
    assert run.status is RunState.SUCCEEDED


class Cmd(BaseModel, extra="forbid"):
    n: int


def test_read_only_refuses_every_write_and_admits_every_read() -> None:
    """D.29 read_only: with the breaker open, 100% of write and destructive calls are
    refused with BreakerOpen(mode="read_only") and every read runs."""
    ran: list[str] = []

    @tether.capability("up.read", effect="read", resource=RESOURCE)
    def read(args: Cmd) -> PingOut:
        ran.append("read")
        return PingOut(up=True)

    @tether.capability(
        "up.write", effect="write", idempotency="keyed", resource=RESOURCE
    )
    def write(args: Cmd) -> PingOut:
        ran.append("write")
        return PingOut(up=True)

    def predict(args: Cmd) -> PingOut:
        return PingOut(up=False)

    @tether.capability(
        "up.drop", effect="destructive", resource=RESOURCE, dry_run=predict
    )
    def drop(args: Cmd) -> PingOut:
        ran.append("drop")
        return PingOut(up=True)

    with breaker_app("sqlite", Spec(), on_open="read_only") as (app, clock, _):
        app.register(read, write, drop)
        open_breaker(app)
        outcomes: dict[str, list[Outcome]] = {
            "up.read": [],
            "up.write": [],
            "up.drop": [],
        }
        with app.run(principal=PRINCIPAL, request="mixed") as run:
            for n in range(20):
                for name in ("up.write", "up.read", "up.drop"):
                    outcomes[name].append(run.step(name, {"n": n}))
                clock.advance(timedelta(seconds=1))  # still within open_for
        state = app.store.breaker_row(BREAKER).state

    assert [o.status for o in outcomes["up.read"]] == [OutcomeStatus.EXECUTED] * 20
    for name in ("up.write", "up.drop"):
        errors = [o.error for o in outcomes[name]]
        assert all(isinstance(e, tether.BreakerOpen) for e in errors), name
        assert {e.mode for e in errors if isinstance(e, tether.BreakerOpen)} == {
            "read_only"
        }
    assert ran == ["read"] * 20
    assert state is BreakerState.OPEN


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_probe_that_answers_hands_the_deadline_to_the_next_one(backend: str) -> None:
    """D.27: when a trial call answers, half-open waits for the oldest one still out
    from its own admission, not from the answered one's: two trials that both
    succeed close the breaker, though the second answers past the first's deadline."""
    spec = Spec(probes=2, probe_timeout=60)
    with breaker_app(backend, spec) as (app, clock, _):
        open_breaker(app)
        clock.advance(timedelta(seconds=30))
        first = app.run(principal=PRINCIPAL, request="first probe")
        first.__enter__()
        flow_a, exec_a = stop_at_execute(first, "up.call", {"mode": "ok"})
        clock.advance(timedelta(seconds=50))
        second = app.run(principal=PRINCIPAL, request="second probe")
        second.__enter__()
        flow_b, exec_b = stop_at_execute(second, "up.call", {"mode": "ok"})
        clock.advance(timedelta(seconds=5))
        done_a = finish(flow_a, exec_a.perform())
        clock.advance(
            timedelta(seconds=6)
        )  # past the first's deadline, 11 s into the second's
        between = view_state(app, clock)
        done_b = finish(flow_b, exec_b.perform())
        for run in (first, second):
            run.__exit__(None, None, None)
        row = app.store.breaker_row(BREAKER)
        moves = [m[:2] for m in transitions(app, second.id)]

    assert (done_a.status, done_b.status) == (OutcomeStatus.EXECUTED,) * 2
    assert between is BreakerState.HALF_OPEN
    assert row.state is BreakerState.CLOSED
    assert moves == [("half_open", "closed")]
