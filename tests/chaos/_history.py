"""A history of budget operations, and a counter-model checker for it (RELIABILITY C.24).

Jepsen's approach (Elle, Knossos), written in Python since their tools cannot
be installed here: clients record every operation they begin (`invoke`) and
how it ended (`ok`, `fail`), and an operation whose ending nobody saw (its
process was killed) is `info`: it may have taken effect or not. A checker then
asks whether one budget counter can explain everything the clients saw.

The history, one JSON object a line (`Event`), each process appending to its
own file, one `write` a line, so a SIGKILL loses at most a half last line,
which `parse` drops:

```json
{"process": "p1.0", "thread": 2, "op": 7, "type": "invoke", "f": "spend",
 "value": {"cost": 6, "actual": 4, "run": "..."}, "wall": 1767225600.25, "mono": 812.5}
{"process": "p1.0", "thread": 2, "op": 7, "type": "ok", "f": "spend",
 "value": {"step": 8}, "wall": 1767225600.26, "mono": 812.51}
{"process": "p1.0", "thread": 3, "op": 2, "type": "ok", "f": "read",
 "value": {"used": "1200", "held": "14", "holds": 3}, "wall": 1767225600.27, "mono": 812.52}
```

Two functions are modelled. A `spend` reserves `cost` and settles at
`actual`: `ok` means it executed (the counter grew by `actual`), `fail` that it
was refused or failed before it ran (nothing was applied), `info` that its
process died: it added nothing, its `cost` (a reservation that lapsed counts as
spent) or its `actual` (it settled before the process died), and at most one
of these, once. A `read` returns the counter as one snapshot: `used` (settled
and lapsed), `held` (live reservations) and `holds` (how many).

`check` judges a history against the model; each rule it breaks is one line
naming the operations at fault. Operations are ordered by wall-clock time
(`time.time()`, one host for every process): an operation completed before
another was invoked is before it; otherwise they are concurrent, and either
order is allowed. This module does no I/O: it takes text and values.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

__all__ = [
    "Event",
    "History",
    "HistoryError",
    "Op",
    "Verdict",
    "check",
    "line",
    "parse",
]

EventType = Literal["invoke", "ok", "fail", "info"]
Function = Literal["spend", "read"]
_TYPES = ("invoke", "ok", "fail", "info")
_FUNCTIONS = ("spend", "read")
_ZERO = Decimal(0)


class HistoryError(ValueError):
    """A history file that is not a history: a bad line other than a truncated last one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One line of a history: an operation begun or ended."""

    process: str
    """The process that wrote it: its slot and incarnation (`p1.0`, then `p1.1` once restarted)."""
    thread: int
    """The client thread in that process; one client's operations never overlap."""
    op: int
    """The operation's number in its thread (0, 1, ...): with process and thread, its id."""
    type: EventType
    """`invoke` when it begins; `ok`, `fail` or `info` when it ends."""
    f: Function
    """`spend` or `read`."""
    value: dict[str, Any] | None
    """What it asked (a spend's invoke: `cost`, `actual`, `run`) or saw (a read's ok:
    `used`, `held` as decimal strings, `holds`); None when there is nothing to say."""
    wall: float
    """`time.time()` when it was written, seconds: orders events across processes."""
    mono: float
    """`time.monotonic()` when it was written, seconds: orders one process's events."""

    @property
    def op_id(self) -> str:
        """Return the operation's id, `process/thread/op`."""
        return f"{self.process}/{self.thread}/{self.op}"


def line(event: Event) -> str:
    """Return `event` as one history line (JSON, sorted keys, no newline)."""
    return json.dumps(
        {
            "process": event.process,
            "thread": event.thread,
            "op": event.op,
            "type": event.type,
            "f": event.f,
            "value": event.value,
            "wall": event.wall,
            "mono": event.mono,
        },
        sort_keys=True,
    )


def parse(text: str, *, source: str = "history") -> list[Event]:
    """Read the events of one history file's text.

    A last line without its newline was cut by a kill: it is dropped when it
    does not parse (one that parses was written whole, and is kept).

    Args:
        text: the file's content.
        source: the file's name, for messages.

    Raises:
        HistoryError: any other line is not an event.
    """
    lines = text.split("\n")
    cut = lines.pop()  # "" when the text ends in a newline
    events = [_event(raw, f"{source}:{n}") for n, raw in enumerate(lines, 1)]
    if cut:
        with contextlib.suppress(HistoryError):  # the half line a SIGKILL left
            events.append(_event(cut, f"{source}:{len(lines) + 1}"))
    return events


def _event(raw: str, where: str) -> Event:
    try:
        data = json.loads(raw)
        event = Event(
            process=str(data["process"]),
            thread=int(data["thread"]),
            op=int(data["op"]),
            type=data["type"],
            f=data["f"],
            value=data["value"],
            wall=float(data["wall"]),
            mono=float(data["mono"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise HistoryError(f"{where}: not a history event: {raw[:200]!r}") from exc
    if event.type not in _TYPES or event.f not in _FUNCTIONS:
        raise HistoryError(f"{where}: unknown type or function: {raw[:200]!r}")
    return event


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One operation: its invoke paired with its ending."""

    id: str
    """`process/thread/op`."""
    f: Function
    """`spend` or `read`."""
    type: Literal["ok", "fail", "info"]
    """How it ended; `info` when its ending is unknown."""
    invoked: float
    """Wall-clock time of its invoke, seconds."""
    completed: float | None
    """Wall-clock time of its ending; None for an `info` op, which may take effect any time later."""
    cost: Decimal = _ZERO
    """A spend's estimate (what it reserves)."""
    actual: Decimal = _ZERO
    """A spend's reported cost (what it settles at)."""
    run: str | None = None
    """The run a spend stepped in."""
    used: Decimal = _ZERO
    """What an ok read saw settled (and lapsed)."""
    held: Decimal = _ZERO
    """What an ok read saw reserved by live holds."""
    holds: int = 0
    """How many live holds an ok read saw."""
    note: str = ""
    """How a `fail` or worker-written `info` ended, as its process said."""

    @property
    def most(self) -> Decimal:
        """Return the most a spend can have added to the counter: `actual` if ok, the larger of `cost` and `actual` if info, else 0."""
        if self.f != "spend" or self.type == "fail":
            return _ZERO
        return self.actual if self.type == "ok" else max(self.cost, self.actual)

    @property
    def overrun(self) -> Decimal:
        """Return how far a spend that may have settled did so above its estimate (0: not at all)."""
        if self.f != "spend" or self.type == "fail":
            return _ZERO
        return max(self.actual - self.cost, _ZERO)

    def describe(self) -> str:
        """Return the op as messages name it: id, function and values."""
        if self.f == "spend":
            return (
                f"{self.type} spend {self.id} (cost {self.cost}, actual {self.actual})"
            )
        if self.type == "ok":
            return f"ok read {self.id} (used {self.used}, held {self.held})"
        return f"{self.type} read {self.id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    """A history's operations, with what was wrong in its shape."""

    ops: tuple[Op, ...]
    """Every operation, in invoke order."""
    problems: tuple[str, ...]
    """Events that do not pair up: an ending without an invoke, two endings, an
    op left open by a process that was not killed, ops of one thread that overlap."""

    @classmethod
    def of(cls, events: Iterable[Event], *, crashed: Collection[str]) -> History:
        """Pair each invoke with its ending; an op that has none becomes `info`.

        Args:
            events: every event of every process, in any order.
            crashed: the processes that were killed: only their ops may be
                left open; one left open elsewhere is a problem.
        """
        invokes: dict[str, Event] = {}
        endings: dict[str, Event] = {}
        problems: list[str] = []
        for e in events:
            if e.type == "invoke":
                if e.op_id in invokes:
                    problems.append(f"op {e.op_id} is invoked twice")
                invokes[e.op_id] = e
            elif e.op_id in endings:
                problems.append(f"op {e.op_id} ends twice")
            else:
                endings[e.op_id] = e
        problems += [
            f"op {op_id} ends ({e.type}) but was never invoked"
            for op_id, e in endings.items()
            if op_id not in invokes
        ]
        ops: list[Op] = []
        for op_id, start in sorted(invokes.items(), key=lambda kv: kv[1].wall):
            end = endings.get(op_id)
            if end is None and start.process not in crashed:
                problems.append(
                    f"op {op_id} never ended though process {start.process} was not killed"
                )
            if end is not None and end.f != start.f:
                problems.append(f"op {op_id} is invoked as {start.f}, ends as {end.f}")
            if end is not None and end.mono < start.mono:
                problems.append(f"op {op_id} ends before it was invoked")
            ops.append(_op(op_id, start, end))
        problems += _overlaps(invokes, endings)
        return cls(ops=tuple(ops), problems=tuple(problems))

    def spends(self) -> list[Op]:
        """Return the spend ops."""
        return [op for op in self.ops if op.f == "spend"]

    def reads(self) -> list[Op]:
        """Return the reads that returned a value (ok)."""
        return [op for op in self.ops if op.f == "read" and op.type == "ok"]


def _op(op_id: str, start: Event, end: Event | None) -> Op:
    asked = start.value or {}
    seen = (end.value if end is not None else None) or {}
    ending = "info" if end is None else end.type
    assert ending != "invoke"
    ok_read = start.f == "read" and ending == "ok"
    if ok_read and not {"used", "held", "holds"} <= seen.keys():
        raise HistoryError(
            f"op {op_id}: a read's ok needs used, held and holds: {seen}"
        )
    return Op(
        id=op_id,
        f=start.f,
        type=ending,
        invoked=start.wall,
        completed=None if end is None or ending == "info" else end.wall,
        cost=Decimal(str(asked.get("cost", 0))),
        actual=Decimal(str(asked.get("actual", 0))),
        run=asked.get("run"),
        used=Decimal(str(seen["used"])) if ok_read else _ZERO,
        held=Decimal(str(seen["held"])) if ok_read else _ZERO,
        holds=int(seen["holds"]) if ok_read else 0,
        note="no ending (killed)" if end is None else _note(seen),
    )


def _note(seen: dict[str, Any]) -> str:
    """Return what an ending said beyond a read's counter: `status=refused code=...`."""
    said = {k: v for k, v in seen.items() if k not in ("used", "held", "holds")}
    return " ".join(f"{k}={v}" for k, v in sorted(said.items()))


def _overlaps(invokes: dict[str, Event], endings: dict[str, Event]) -> list[str]:
    """Name the ops of one client thread that overlap: each must end before the next begins."""
    by_thread: dict[tuple[str, int], list[Event]] = {}
    for e in invokes.values():
        by_thread.setdefault((e.process, e.thread), []).append(e)
    problems = []
    for starts in by_thread.values():
        starts.sort(key=lambda e: e.op)
        for first, then in itertools.pairwise(starts):
            end = endings.get(first.op_id)
            if end is None:
                problems.append(
                    f"op {then.op_id} began while op {first.op_id} of its thread was open"
                )
            elif end.mono > then.mono:
                problems.append(
                    f"op {then.op_id} began before op {first.op_id} of its thread ended"
                )
    return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What `check` found: valid when `problems` is empty."""

    problems: tuple[str, ...]
    """One line per broken rule, naming the ops at fault."""
    counts: dict[str, int]
    """Ops by function and ending (`spend:ok`, `read:info`, ...)."""
    applied: tuple[tuple[str, str, Decimal], ...]
    """An explanation of the final counter: each info spend taken as applied,
    as `(op id, "cost" or "actual", amount)`; empty when none was needed (or
    none explains it: see `problems`)."""
    info: int
    """How many info spends the explanation chose among."""

    @property
    def valid(self) -> bool:
        """Return whether the history fits the model."""
        return not self.problems

    def summary(self) -> str:
        """Return one line: the counts, and the verdict."""
        c = self.counts
        spends = {k: c.get(f"spend:{k}", 0) for k in ("ok", "fail", "info")}
        verdict = "valid" if self.valid else f"INVALID ({len(self.problems)} problems)"
        return (
            f"{sum(spends.values())} spends (ok {spends['ok']}, fail {spends['fail']}, "
            f"info {spends['info']}, {len(self.applied)} of them applied), "
            f"{c.get('read:ok', 0)} reads ({c.get('read:info', 0)} info): {verdict}"
        )

    def raise_for_problems(self) -> None:
        """Raise `AssertionError` listing the problems, if any."""
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = len(self.problems) - 20
            raise AssertionError(
                f"history invalid:\n  {shown}"
                + (f"\n  ... and {more} more" if more > 0 else "")
            )


def check(history: History, *, amount: Decimal, final_used: Decimal) -> Verdict:
    """Judge a history of one budget counter against the counter model.

    The rules:

    1. No overspend: every read's `used + held`, and `final_used`, are at most
       `amount` plus the overruns (`actual` above `cost`) of the spends that may
       have settled by then: admission keeps `used + held + cost <= amount`,
       and only a settlement above its estimate can go past it.
    2. Each read's `used` lies between the sum of `actual` over the spends ok
       before the read was invoked, and the most the spends invoked before it
       completed could add (ok: `actual`; info: the larger of `cost` and
       `actual`). Its `held` and `holds` are at most the cost and number of the
       spends that may have been in flight (info ones count forever).
    3. `used` never goes down: a read completed before another was invoked saw
       at most what the later one saw, and every read at most `final_used`.
    4. `final_used` (read once every hold lapsed) is the sum of `actual` over
       the ok spends plus, for each info spend, once, 0, its `cost` or its
       `actual`: `Verdict.applied` gives one such choice.

    Args:
        history: the paired operations (`History.of`).
        amount: the budget's amount.
        final_used: the counter once every hold lapsed.

    Returns:
        The verdict, with one problem per rule broken (and the history's own problems).
    """
    problems = list(history.problems)
    spends = history.spends()
    reads = history.reads()
    problems += _overspend(spends, reads, amount, final_used)
    problems += _intervals(spends, reads)
    problems += _monotonic(reads, final_used)
    applied, missing = _explain(spends, final_used)
    problems += missing
    counts = Counter(f"{op.f}:{op.type}" for op in history.ops)
    return Verdict(
        problems=tuple(problems),
        counts=dict(counts),
        applied=applied,
        info=sum(op.type == "info" for op in spends),
    )


class _Prefix:
    """Sums of a quantity over ops sorted by a time: the sum over those before a moment."""

    def __init__(self, keyed: Iterable[tuple[float, Decimal]]) -> None:
        ordered = sorted(keyed, key=lambda kv: kv[0])
        self.times = [t for t, _ in ordered]
        self.sums = [_ZERO]
        for _, v in ordered:
            self.sums.append(self.sums[-1] + v)

    def before(self, moment: float, *, inclusive: bool) -> Decimal:
        """Return the sum over ops whose time is before `moment` (or at it, if `inclusive`)."""
        cut = bisect.bisect_right if inclusive else bisect.bisect_left
        return self.sums[cut(self.times, moment)]


def _overspend(
    spends: Sequence[Op], reads: Sequence[Op], amount: Decimal, final_used: Decimal
) -> list[str]:
    overruns = _Prefix((op.invoked, op.overrun) for op in spends)
    problems = []
    for r in reads:
        assert r.completed is not None
        allowed = amount + overruns.before(r.completed, inclusive=True)
        if r.used + r.held > allowed:
            problems.append(
                f"overspend: {r.describe()} saw used + held = {r.used + r.held} "
                f"> {allowed} (the amount {amount} plus settled overruns)"
            )
    allowed = amount + sum((op.overrun for op in spends), _ZERO)
    if final_used > allowed:
        problems.append(
            f"overspend: the final counter {final_used} > {allowed} "
            f"(the amount {amount} plus settled overruns)"
        )
    return problems


def _intervals(spends: Sequence[Op], reads: Sequence[Op]) -> list[str]:
    oks = [op for op in spends if op.type == "ok"]
    settled = _Prefix((op.completed or 0.0, op.actual) for op in oks)
    possible = _Prefix((op.invoked, op.most) for op in spends)
    # Holding: a spend holds at most its cost from its invoke to its ending;
    # an info one may hold until its reservation lapses, after the history.
    started_cost = _Prefix((op.invoked, op.cost) for op in spends)
    started_n = _Prefix((op.invoked, Decimal(1)) for op in spends)
    ended = [op for op in spends if op.completed is not None]
    ended_cost = _Prefix((op.completed or 0.0, op.cost) for op in ended)
    ended_n = _Prefix((op.completed or 0.0, Decimal(1)) for op in ended)
    problems = []
    for r in reads:
        assert r.completed is not None
        low = settled.before(r.invoked, inclusive=False)
        high = possible.before(r.completed, inclusive=True)
        if r.used < low:
            before = [op.id for op in oks if (op.completed or 0.0) < r.invoked]
            problems.append(
                f"read out of its interval: {r.describe()} saw used below {low}, "
                f"what the {len(before)} ok spends completed before it settled "
                f"(the last: {', '.join(before[-3:])})"
            )
        if r.used > high:
            problems.append(
                f"read out of its interval: {r.describe()} saw used above {high}, "
                "the most the spends invoked before it completed could add"
            )
        held = started_cost.before(r.completed, inclusive=True) - ended_cost.before(
            r.invoked, inclusive=False
        )
        count = started_n.before(r.completed, inclusive=True) - ended_n.before(
            r.invoked, inclusive=False
        )
        if not (_ZERO <= r.held <= held and 0 <= r.holds <= count):
            problems.append(
                f"read out of its interval: {r.describe()} saw {r.holds} holds of "
                f"{r.held}, but at most {count} spends of cost {held} may have been in flight"
            )
    return problems


def _monotonic(reads: Sequence[Op], final_used: Decimal) -> list[str]:
    """Name each read that saw less than a read completed before it was invoked saw.

    The final counter, read after every op, must be at least what each saw.
    """
    done = sorted(reads, key=lambda r: r.completed or 0.0)
    best: Op | None = None
    i = 0
    problems = []
    for r in sorted(reads, key=lambda r: r.invoked):
        while i < len(done) and (done[i].completed or 0.0) < r.invoked:
            if best is None or done[i].used > best.used:
                best = done[i]
            i += 1
        if best is not None and r.used < best.used:
            problems.append(
                f"non-monotonic reads: {best.describe()} completed before "
                f"{r.describe()} was invoked, and saw more"
            )
    problems += [
        f"non-monotonic reads: {r.describe()} saw more than the final counter {final_used}"
        for r in reads
        if r.used > final_used
    ]
    return problems


def _explain(
    spends: Sequence[Op], final_used: Decimal
) -> tuple[tuple[tuple[str, str, Decimal], ...], list[str]]:
    """Find, for each info spend, 0, its cost or its actual (once) so the final counter adds up.

    A subset-sum over the info spends (a few, a kill leaves one per client
    thread at most), by dynamic programming over the reachable sums.
    """
    settled = sum((op.actual for op in spends if op.type == "ok"), _ZERO)
    info = [op for op in spends if op.type == "info"]
    target = final_used - settled
    # layers[i]: each sum reachable with the first i info ops -> the choice that
    # reached it first (what op i-1 added, and the sum before it).
    layers: list[dict[Decimal, tuple[str, Decimal]]] = [{_ZERO: ("", _ZERO)}]
    for op in info:
        reach: dict[Decimal, tuple[str, Decimal]] = {}
        for total in layers[-1]:
            for name, add in (("", _ZERO), ("actual", op.actual), ("cost", op.cost)):
                reach.setdefault(total + add, (name, total))
        layers.append(reach)
    if target not in layers[-1]:
        reachable = sorted(layers[-1])
        below = [s for s in reachable if s < target][-1:]
        above = [s for s in reachable if s > target][:1]
        named = ", ".join(op.describe() for op in info) or "none"
        return (), [
            f"final counter unexplained: {final_used} is the ok spends' {settled} plus "
            f"{target}, but the info spends ({named}) can add, each at most once, "
            f"{' or '.join(str(s) for s in below + above) or 'nothing'} nearest to it"
        ]
    applied = []
    total = target
    for i in range(len(info), 0, -1):
        name, before = layers[i][total]
        if name:
            applied.append((info[i - 1].id, name, total - before))
        total = before
    return tuple(reversed(applied)), []
