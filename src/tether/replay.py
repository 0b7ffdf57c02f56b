"""Deterministic replay: drive a recorded run again through today's call path.

A replay takes a run's record (from the store or an exported file) and walks it
event by event. Each step is re-driven through `gateway.step`, the same call path
a live call takes, against a scratch in-memory store and a clock that reads the
record's own timestamps; plan admissions and usage charges are re-made too.
Whatever reaches the world is taken from the record instead:

- a handler's result (output, error, timeout) is the recorded one; nothing is
  executed, except a dry-run handler in `--dry-run` mode, which acts on nothing;
- the clock reads each event's recorded time, ids are the recorded ids;
- a person's approval decision is applied to the scratch store where the record
  shows it was made.

Every validation, precondition, decision, limit and breaker outcome is thereby
computed afresh by today's code and compared with the recorded event, field by
field; times and durations are not compared (they are the world's, not a
decision's), and neither is a retry's jittered delay.

What a replay cannot see is state other runs made: another run's use of a shared
budget, its breaker samples, its idempotency keys. The scratch store starts
empty, so a step whose recorded outcome depended on such state is reported as
divergent, naming the limit, breaker or key; docs/replay.md says how to read it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from tether import _canonical, _chain, gateway, record
from tether._effects import Execute, Executed, Flow, Sleep
from tether._stages import handler_args, validate_output
from tether.app import Tether, _guards_from, _policy_from
from tether.capability import Capability
from tether.clock import SystemClock
from tether.config import Settings, load_settings
from tether.errors import NotFound, StoreError, TetherError, UsageError
from tether.handle import Run
from tether.plan import PlanStep
from tether.policy import PolicySet
from tether.principal import Principal
from tether.store import ApprovalStatus, Store

__all__ = [
    "DecisionChange",
    "Divergence",
    "Mode",
    "Prediction",
    "RecordedRun",
    "ReplayError",
    "ReplayReport",
    "Replayer",
]

Mode = Literal["verify", "what_if", "dry_run"]

IGNORED_FIELDS = frozenset({"at", "duration_us", "delay_us"})
"""Fields that are the world's (times, durations, jitter), not a decision's."""

_RUN_LEVEL = frozenset(
    {
        "run_started",
        "run_status",
        "run_finished",
        "plan_proposed",
        "plan_admitted",
        "plan_stashed",
        "usage_charged",
        "approval_decided",
    }
)
"""Kinds written outside a step: the walk handles each where it appears."""

_NOT_COMPARED = frozenset({"breaker_transition"})
"""A transition depends on every run's calls to the resource, not this run's alone:
reported when it differs, but never as a divergence."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReplayError(UsageError):
    """A record cannot be replayed (unreadable, newer format, unknown capability)."""

    code = "replay_impossible"


# -- what a replay reports --------------------------------------------------------


@dataclass(slots=True, frozen=True, kw_only=True)
class Divergence:
    """Where today's code decided differently from the record."""

    step: int | None
    """The step, or None for a run-level event (a plan admission)."""
    kind: str
    """The recorded event kind (the stage), or `missing`/`extra`."""
    field: str | None
    """The first differing field, or None when the events differ in kind."""
    recorded: Any
    now: Any
    rule_ids: tuple[str, ...] = ()
    """Rules named by the recorded or the new decision, when it is one."""
    policy_version: tuple[str | None, str | None] = (None, None)
    """Recorded and current policy version, for a decision."""

    def describe(self) -> str:
        """One readable line."""
        where = "run" if self.step is None else f"step {self.step}"
        if self.field is None:
            text = f"{where}: recorded {self.recorded}, now {self.now}"
        else:
            text = (
                f"{where} {self.kind}: {self.field} was {_short(self.recorded)}, "
                f"now {_short(self.now)}"
            )
        if self.rule_ids:
            text += f" (rules: {', '.join(self.rule_ids)})"
        old, new = self.policy_version
        if old != new and old is not None and new is not None:
            text += f" (policy version {old} -> {new})"
        return text

    def to_json(self) -> dict[str, Any]:
        """The divergence as JSON-ready data."""
        return {
            "step": self.step,
            "kind": self.kind,
            "field": self.field,
            "recorded": self.recorded,
            "now": self.now,
            "rule_ids": list(self.rule_ids),
            "policy_version": {
                "recorded": self.policy_version[0],
                "now": self.policy_version[1],
            },
            "message": self.describe(),
        }


@dataclass(slots=True, frozen=True, kw_only=True)
class DecisionChange:
    """A decision that a replay made differently (what-if's unit)."""

    run_id: str
    step: int | None
    """The step, or None for a plan admission's step."""
    capability: str
    recorded: str
    now: str
    rule_ids: tuple[str, ...]
    """The rules that account for the change (see `_attribute`)."""
    source: Literal["step", "plan"] = "step"

    def to_json(self) -> dict[str, Any]:
        """The change as JSON-ready data."""
        return {
            "run_id": self.run_id,
            "step": self.step,
            "capability": self.capability,
            "recorded": self.recorded,
            "now": self.now,
            "rule_ids": list(self.rule_ids),
            "source": self.source,
        }


@dataclass(slots=True, frozen=True, kw_only=True)
class Prediction:
    """A dry-run handler's prediction beside what the step really returned."""

    step: int
    capability: str
    recorded: dict[str, Any]
    predicted: dict[str, Any] | None
    error: str | None = None
    """Why the dry-run handler gave no prediction, if it did not."""

    @property
    def differs(self) -> dict[str, tuple[Any, Any]]:
        """Top-level fields whose predicted value differs from the real one."""
        if self.predicted is None:
            return {}
        keys = sorted(set(self.recorded) | set(self.predicted))
        return {
            k: (self.recorded.get(k), self.predicted.get(k))
            for k in keys
            if self.recorded.get(k) != self.predicted.get(k)
        }

    def to_json(self) -> dict[str, Any]:
        """The prediction as JSON-ready data."""
        return {
            "step": self.step,
            "capability": self.capability,
            "recorded": self.recorded,
            "predicted": self.predicted,
            "error": self.error,
            "differs": {
                k: {"recorded": r, "predicted": p} for k, (r, p) in self.differs.items()
            },
        }


@dataclass(slots=True, kw_only=True)
class ReplayReport:
    """What one replay found."""

    run_id: str
    mode: Mode
    events: int
    """Recorded events walked."""
    steps: int
    """Steps re-driven through the call path."""
    divergences: list[Divergence] = field(default_factory=list)
    decisions: list[DecisionChange] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the replay could not re-check, and why (never a divergence)."""

    @property
    def ok(self) -> bool:
        """True when every re-computed outcome matched the record."""
        return not self.divergences

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON-ready document (stable key order)."""
        return {
            "run_id": self.run_id,
            "mode": self.mode,
            "ok": self.ok,
            "events": self.events,
            "steps": self.steps,
            "divergences": [d.to_json() for d in self.divergences],
            "decisions": [d.to_json() for d in self.decisions],
            "predictions": [p.to_json() for p in self.predictions],
            "notes": list(self.notes),
        }


# -- the record to replay -------------------------------------------------------------


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
        """Read a run's record from a store.

        Raises:
            NotFound: no such run.
        """
        row = store.get_run(run_id)
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
        if head is not None and events and previous.hex() != head:
            raise ReplayError(
                f"{path}: the events end at a different head than the header's; "
                "the file was truncated or altered; re-export the run"
            )
        return cls(run_id=run_id, events=tuple(events), header=header, source=str(path))


# -- the engine -------------------------------------------------------------------------


class _ReplayClock:
    """A clock that reads the record: the walk sets it to each event's time."""

    __slots__ = ("_now",)

    def __init__(self, start: datetime) -> None:
        self._now = start

    def set(self, at: datetime) -> None:
        self._now = at

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return (self._now - _EPOCH).total_seconds()

    def sleep(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


class _ReplayIds:
    """Ids in the order the record used them; made-up ones past its end."""

    __slots__ = ("_given", "_made")

    def __init__(self, given: Mapping[str, Iterable[str]]) -> None:
        self._given = {prefix: deque(ids) for prefix, ids in given.items()}
        self._made = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        queue = self._given.get(prefix)
        if queue:
            return queue.popleft()
        return f"{prefix}replay{next(self._made):026d}"


class _FirstRng:
    """Retry jitter in a replay: the delay is the world's, and not compared."""

    def uniform(self, a: float, b: float) -> float:
        return a


class _RecordedFailure(Exception):
    """Stands in for a recorded handler error; renamed to the recorded type."""


_failure_types: dict[str, type[Exception]] = {}


def _failure(type_name: str, text: str) -> Exception:
    cls = _failure_types.get(type_name)
    if cls is None:
        cls = _failure_types[type_name] = type(type_name, (_RecordedFailure,), {})
    return cls(text)


@dataclass(slots=True)
class _Attempt:
    kind: Literal["ok", "failed"]
    event: dict[str, Any]


class Replayer:
    """Replays recorded runs against an app's capabilities and a policy.

    Args:
        app: where the capabilities (and, unless given, the policy, limits and
            breakers) come from. Its store is never written.
        settings: the configuration to replay under (what-if: a proposed
            `tether.yaml`); default the app's.
        policy: the policy to replay under; default the app's. Give both, as
            `Replayer.for_file` does, to replay under another file.
        mode: `verify` (every outcome must match), `what_if` (collect changed
            decisions), or `dry_run` (also ask each step's dry-run handler).
    """

    def __init__(
        self,
        app: Tether,
        *,
        settings: Settings | None = None,
        policy: PolicySet | None = None,
        mode: Mode = "verify",
    ) -> None:
        self.app = app
        self.settings = app.settings if settings is None else settings
        self.policy = app.current_policy() if policy is None else policy
        self.mode: Mode = mode
        self._guards = app.guards if settings is None else _guards_for(self.settings)

    @classmethod
    def for_file(cls, app: Tether, path: str | Path, *, mode: Mode) -> Replayer:
        """A replayer under the policy file at `path`, keeping the app's Python policies.

        Raises:
            ConfigError: the file does not load.
        """
        settings, version = load_settings(Path(path))
        from_file = _policy_from(settings, version, has_file=True)
        policy = app.current_policy().replace(
            rules=from_file.rules, defaults=from_file.defaults, version=version
        )
        return cls(app, settings=settings, policy=policy, mode=mode)

    def replay(self, recorded: RecordedRun) -> ReplayReport:
        """Replay one run and report what differs.

        Raises:
            ReplayError: the record cannot be replayed here (empty, a newer
                format, or a capability this app does not have).
        """
        return _Walk(self, recorded).run()


def _guards_for(settings: Settings) -> gateway.Guards | None:
    return _guards_from(settings)


class _Walk:
    """One replay: the scratch app, the run, and the comparison."""

    def __init__(self, replayer: Replayer, recorded: RecordedRun) -> None:
        self.replayer = replayer
        self.recorded = recorded
        self.events = recorded.events
        if not self.events or self.events[0].get("kind") != "run_started":
            raise ReplayError(
                f"{recorded.source}: the record does not begin with run_started; "
                "it cannot be replayed (re-export it, or check it with `tether verify`)"
            )
        first = self.events[0]
        fmt = first.get("format", 1)
        if not isinstance(fmt, int) or fmt > record.FORMAT:
            raise ReplayError(
                f"{recorded.source}: record format {fmt} is newer than this tether "
                f"reads ({record.FORMAT}); upgrade tether to replay it"
            )
        self.report = ReplayReport(
            run_id=recorded.run_id, mode=replayer.mode, events=len(self.events), steps=0
        )
        self.clock = _ReplayClock(_at(first))
        approvals = [
            str(e["approval_id"])
            for e in self.events
            if e.get("kind") == "approval_requested"
        ]
        ids = _ReplayIds({"run_": [recorded.run_id], "apr_": approvals})
        self.scratch = _scratch_app(replayer, self.clock, ids)
        self.by_step: dict[int, list[dict[str, Any]]] = {}
        for e in self.events:
            number = e.get("step")
            if number is not None and e.get("kind") not in _RUN_LEVEL:
                self.by_step.setdefault(int(number), []).append(e)
        self.proposed: deque[dict[str, Any]] = deque()
        self.version_noted = False
        """The policy version differs (said once, in the notes)."""
        self.previews: dict[tuple[str, bytes], Any] = {}
        """The recorded preview of each approval request, by capability and args."""
        self.seen = (
            0  # replayed events already compared (an index into the scratch record)
        )

    # -- the walk -------------------------------------------------------------------

    def run(self) -> ReplayReport:
        first = self.events[0]
        principal = Principal(**first["principal"])
        run = Run(
            self.scratch,
            principal=principal,
            request=str(first["request"]),
            context=dict(first.get("context") or {}),
        )
        run.planner = first.get("planner")
        run.__enter__()
        self.run_ = run
        self._fresh()  # run_started and its status: the walk starts after them
        done: set[int] = set()
        admitted_once = False
        for event in self.events[1:]:
            kind = event["kind"]
            number = event.get("step")
            if kind == "plan_proposed":
                self.proposed = deque(event.get("steps") or ())
            elif kind == "plan_admitted":
                self._admit(event, first_admission=not admitted_once)
                admitted_once = True
            elif kind == "usage_charged":
                self._usage(event)
            elif kind == "approval_decided":
                self._decided(event)
            elif kind in _RUN_LEVEL:
                continue
            elif number is not None and int(number) not in done:
                done.add(int(number))
                self._step(int(number))
        return self.report

    def _fresh(self) -> list[dict[str, Any]]:
        """The events the scratch run gained since the last call."""
        stored = self.scratch.store.events(self.run_.id)
        new = [_canonical.loads(e.body) for e in stored[self.seen :]]
        self.seen = len(stored)
        return new

    # -- run-level events --------------------------------------------------------------

    def _admit(self, event: dict[str, Any], *, first_admission: bool) -> None:
        run = self.run_
        self.clock.set(_at(event))
        left = event.get("budget_left")
        if first_admission and left is not None:
            run.budget = Decimal(str(left)) + run.cost  # what the run was opened with
        steps = [
            PlanStep(
                capability=str(s["capability"]),
                args=s.get("args") or {},
                rationale=str(s.get("rationale") or ""),
                idempotency_key=s.get("idempotency_key"),
                dry_run=bool(s.get("dry_run")),
            )
            for s in self.proposed
        ]
        try:
            run.admit(steps)
        except TetherError as exc:
            self._diverge(None, "plan_admitted", None, "plan_admitted", exc.message)
            return
        new = self._fresh()
        # Named by the step it admits, so the report points at the plan's first step.
        self._compare(run.steps + 1, [event], new, run_level=True)
        if self.replayer.mode == "what_if" and new:
            self._plan_changes(event, new[-1])

    def _usage(self, event: dict[str, Any]) -> None:
        self.clock.set(_at(event))
        self.run_.charge_usage(
            Decimal(str(event["cost"])),
            input_tokens=int(event.get("input_tokens", 0)),
            output_tokens=int(event.get("output_tokens", 0)),
            model=event.get("model"),
        )
        self._compare(None, [event], self._fresh(), run_level=True)

    def _decided(self, event: dict[str, Any]) -> None:
        """Apply a person's recorded decision to the scratch store."""
        outcome = event.get("outcome")
        at = _at(event)
        store = self.scratch.store
        approval_id = str(event["approval_id"])
        try:
            if outcome == "expired":
                store.expire_approval(approval_id, at)
            elif outcome in ("approved", "denied"):

                def made(row: object, refused: str | None) -> record.Event:
                    return record.ApprovalDecided(
                        at=at,
                        approval_id=approval_id,
                        by=str(event["by"]),
                        outcome=str(outcome) if refused is None else "refused",
                        note=event.get("note"),
                        reason=refused,
                        step=event.get("step"),
                    )

                store.decide_approval(
                    approval_id,
                    status=ApprovalStatus(str(outcome)),
                    by=str(event["by"]),
                    note=event.get("note"),
                    now=at,
                    event=made,
                )
        except (NotFound, TetherError):
            # The request was not made again (an earlier divergence says why).
            self.report.notes.append(
                f"approval {approval_id}: decided in the record, but the replay "
                "made no such request"
            )
        self._fresh()  # the decision's own event is the person's, not compared

    # -- steps -----------------------------------------------------------------------

    def _step(self, number: int) -> None:
        run = self.run_
        recorded = self.by_step.get(number, [])
        proposal = self.proposed.popleft() if self.proposed else None
        while run.steps < number - 1:  # a step the record has no events for
            run.next_step()
        call = _call_of(recorded, proposal)
        if call is None:
            run.next_step()
            self.report.notes.append(
                f"step {number}: the record keeps no args for it (they were refused "
                "before validation passed), so it was not re-checked"
            )
            return
        name, args, key, dry_run = call
        try:
            cap = self.scratch.capabilities.get(name)
        except NotFound as exc:
            raise ReplayError(
                f"{self.recorded.source}: step {number} called {name!r}, which this app "
                "does not register; replay with the app that made the run (--app)"
            ) from exc
        if self.replayer.mode == "dry_run":
            self._predict(number, cap, args, recorded)
        self.clock.set(_at(recorded[0]))
        attempts = deque(_attempts(recorded))
        asked = next((e for e in recorded if e["kind"] == "approval_requested"), None)
        seen_as = (name, _canonical.dumps(args))
        if asked is not None:
            self.previews[seen_as] = asked.get("preview")
        # A step that found its request already pending recorded no preview of its
        # own: it was the pending request's (the digest covers it).
        preview = self.previews.get(seen_as)
        flow = gateway.step(run, cap, args, key=key, dry_run=dry_run)
        _drive(flow, cap, attempts, preview, self.clock)
        self.report.steps += 1
        now = self._fresh()
        self._compare(number, recorded, now)
        if self.replayer.mode == "what_if":
            self._step_changes(number, name, recorded, now)

    def _predict(
        self,
        number: int,
        cap: Capability[Any, Any],
        args: dict[str, Any],
        recorded: Sequence[dict[str, Any]],
    ) -> None:
        executed = next((e for e in recorded if e["kind"] == "executed"), None)
        if executed is None or executed.get("dry_run") or cap.dry_run_handler is None:
            return
        handler = cap.dry_run_handler
        predicted: dict[str, Any] | None = None
        error: str | None = None
        done = Execute(
            fn=handler.fn,
            is_async=handler.is_async,
            call_args=handler_args(
                handler,
                self.run_,
                cap,
                cap.validate_args(args),
                number,
                None,
                dry_run=True,
            ),
            timeout=cap.timeout,
            clock=SystemClock(),  # a real wait: the dry-run handler runs
            pool=self.replayer.app._thread_pool,  # the app's own pool
        ).perform()
        if done.error is not None:
            error = f"{type(done.error).__name__}: {done.error}"
        elif done.timed_out:
            error = f"no answer within its {cap.timeout} timeout"
        else:
            try:
                _, predicted = validate_output(cap, done.value)
            except TetherError as exc:
                error = exc.message
        self.report.predictions.append(
            Prediction(
                step=number,
                capability=cap.name,
                recorded=executed["output"],
                predicted=predicted,
                error=error,
            )
        )

    # -- comparison -----------------------------------------------------------------

    def _compare(
        self,
        number: int | None,
        recorded: Sequence[dict[str, Any]],
        now: Sequence[dict[str, Any]],
        *,
        run_level: bool = False,
    ) -> None:
        mine = [e for e in recorded if e["kind"] not in _NOT_COMPARED]
        theirs = [e for e in now if e["kind"] not in _NOT_COMPARED]
        if run_level:  # a plan admission or a usage charge: only its own kinds
            kinds = {e["kind"] for e in mine}
            theirs = [e for e in theirs if e["kind"] in kinds]
        for old, new in itertools.zip_longest(mine, theirs):
            if old is None:
                self._diverge(number, "extra", None, "nothing", _summary(new))
                return
            if new is None:
                self._diverge(number, "missing", None, _summary(old), "nothing")
                return
            if old["kind"] != new["kind"]:
                self._diverge(number, old["kind"], None, _summary(old), _summary(new),
                              old, new)  # fmt: skip
                return
            was, now = old.get("policy_version"), new.get("policy_version")
            if was != now and not self.version_noted:
                self.version_noted = True
                self.report.notes.append(
                    f"recorded under policy version {was}, replayed under {now}"
                )
            name = _first_difference(old, new, versions_differ=self.version_noted)
            if name is not None:
                self._diverge(
                    number, old["kind"], name, old.get(name), new.get(name), old, new
                )
                return

    def _diverge(
        self,
        number: int | None,
        kind: str,
        name: str | None,
        was: Any,
        now: Any,
        old: Mapping[str, Any] | None = None,
        new: Mapping[str, Any] | None = None,
    ) -> None:
        rules: list[str] = []
        versions: tuple[str | None, str | None] = (None, None)
        for e in (old, new):
            if e is not None:
                rules.extend(r for r in e.get("rule_ids") or () if r not in rules)
                for s in e.get("steps") or ():
                    if isinstance(s, Mapping):
                        rules.extend(
                            r for r in s.get("rule_ids") or () if r not in rules
                        )
        if old is not None and new is not None and "policy_version" in old:
            versions = (old.get("policy_version"), new.get("policy_version"))
        self.report.divergences.append(
            Divergence(
                step=number,
                kind=kind,
                field=name,
                recorded=was,
                now=now,
                rule_ids=tuple(rules),
                policy_version=versions,
            )
        )

    def _step_changes(
        self,
        number: int,
        name: str,
        recorded: Sequence[dict[str, Any]],
        now: Sequence[dict[str, Any]],
    ) -> None:
        old = next((e for e in recorded if e["kind"] == "decided"), None)
        new = next((e for e in now if e["kind"] == "decided"), None)
        if old is None or new is None or old["verdict"] == new["verdict"]:
            return
        self.report.decisions.append(
            DecisionChange(
                run_id=self.recorded.run_id,
                step=number,
                capability=name,
                recorded=old["verdict"],
                now=new["verdict"],
                rule_ids=_attribute(old, new),
            )
        )

    def _plan_changes(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        for was, now in zip(
            old.get("steps") or (), new.get("steps") or (), strict=False
        ):
            if was.get("verdict") != now.get("verdict"):
                self.report.decisions.append(
                    DecisionChange(
                        run_id=self.recorded.run_id,
                        step=None,
                        capability=str(was.get("capability")),
                        recorded=str(was.get("verdict")),
                        now=str(now.get("verdict")),
                        rule_ids=_attribute(was, now),
                        source="plan",
                    )
                )


def _scratch_app(replayer: Replayer, clock: _ReplayClock, ids: _ReplayIds) -> Tether:
    """An app on an empty in-memory store, with the replayer's capabilities and policy."""
    source = replayer.app
    scratch = Tether(db="memory://", config=None, clock=clock, ids=ids, env={})
    scratch._config_file = None  # no file to watch: the policy is given
    scratch.config_path = None
    scratch.capabilities = source.capabilities
    scratch.settings = replayer.settings
    scratch.policy = replayer.policy
    scratch.guards = replayer._guards  # the same module's class
    scratch.random = _FirstRng()
    scratch.webhook = None
    return scratch


def _call_of(
    recorded: Sequence[dict[str, Any]], proposal: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any], str | None, bool] | None:
    """The call that made a step: capability, args, key and the caller's dry_run."""
    by_kind = {e["kind"]: e for e in reversed(recorded)}  # the first of each kind
    validated = by_kind.get("validated")
    if validated is not None:
        name, args = str(validated["capability"]), dict(validated["args"])
    elif proposal is not None:
        name, args = str(proposal["capability"]), dict(proposal.get("args") or {})
    else:
        return None
    key = None
    if "intent" in by_kind:
        key = by_kind["intent"].get("key")
    elif "idempotent_hit" in by_kind:
        key = by_kind["idempotent_hit"].get("key")
    elif proposal is not None:
        key = proposal.get("idempotency_key")
    if proposal is not None and "dry_run" in proposal:
        dry_run = bool(proposal["dry_run"])
    else:
        executed = by_kind.get("executed")
        decided = by_kind.get("decided")
        forced = decided is not None and decided.get("verdict") == "dry_run_only"
        dry_run = bool(executed and executed.get("dry_run")) and not forced
    return name, args, key, dry_run


def _attempts(recorded: Sequence[dict[str, Any]]) -> Iterator[_Attempt]:
    """The handler's recorded results, attempt by attempt."""
    for e in recorded:
        kind = e["kind"]
        if kind == "executed":
            yield _Attempt("ok", e)
        elif kind in ("retry_scheduled", "in_doubt") or (
            kind == "failed" and e.get("stage") in ("execute", "output")
        ):
            yield _Attempt("failed", e)


def _drive(
    flow: Flow,
    cap: Capability[Any, Any],
    attempts: deque[_Attempt],
    preview: Mapping[str, Any] | None,
    clock: _ReplayClock,
) -> record.Outcome:
    """Drive a step with the record standing in for every handler call."""
    reply: object = None
    while True:
        try:
            effect = flow.send(reply)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]  # the flow's return value
        if isinstance(effect, Execute) and effect.preview:
            reply = _recorded_preview(cap, preview)
        elif isinstance(effect, Execute):
            reply = _recorded_result(cap, attempts, clock)
        elif isinstance(effect, Sleep):
            clock.sleep(effect.seconds)
            reply = None
        else:
            reply = effect.perform()  # the scratch store


def _recorded_preview(
    cap: Capability[Any, Any], preview: Mapping[str, Any] | None
) -> Executed:
    """An approval request's preview, as the record kept it."""
    if preview is not None and isinstance(preview.get("output"), Mapping):
        return Executed(
            value=cap.output_model.model_validate(preview["output"]), duration_us=0
        )
    if preview is not None and "error" in preview:
        message = str(preview.get("message", ""))
        if preview["error"] == "step_timeout":
            return Executed(timed_out=True, duration_us=0)
        type_name, text = _split_failure(cap.name, message, None)
        return Executed(error=_failure(type_name, text), duration_us=0)
    return Executed(
        error=_failure("NotInRecord", "the record has no preview for this request"),
        duration_us=0,
    )


def _recorded_result(
    cap: Capability[Any, Any], attempts: deque[_Attempt], clock: _ReplayClock
) -> Executed:
    if not attempts:
        return Executed(
            error=_failure(
                "NotInRecord", "the record has no result for this call (it never ran)"
            ),
            duration_us=0,
        )
    attempt = attempts.popleft()
    e = attempt.event
    clock.set(_at(e))
    duration = int(e.get("duration_us") or 0)
    if attempt.kind == "ok":
        return Executed(value=cap.output_model.model_validate(e["output"]),
                        duration_us=duration)  # fmt: skip
    code = e.get("error_code")
    message = str(e.get("message", ""))
    if code == "step_timeout":
        started = "did not start" not in message
        return Executed(
            timed_out=True,
            started=started,
            still_running=started and "may still be running" in message,
            duration_us=duration,
        )
    if code == "usage_error":
        return Executed(error=UsageError(message), duration_us=duration)
    type_name, text = _split_failure(cap.name, message, e.get("error_type"))
    return Executed(error=_failure(type_name, text), duration_us=duration)


def _split_failure(name: str, message: str, error_type: object) -> tuple[str, str]:
    """Recover the handler's error type and text from `NAME: Type: text`."""
    rest = message.removeprefix(f"{name}: ")
    type_name, sep, text = rest.partition(": ")
    if isinstance(error_type, str) and error_type and error_type != type_name and sep:
        return error_type, text
    if not sep or not type_name.isidentifier():
        return (error_type if isinstance(error_type, str) else "Exception"), rest
    return type_name, text


_VERSIONED = frozenset({"policy_version", "digest"})
"""Fields that change with the policy file's version (a grant's digest covers it):
a new version alone is a note; what it changes shows in verdicts and rules."""


_FIRST = ("verdict", "status", "admitted", "state", "rule_ids", "limit", "breaker")
"""Fields a reader wants named first when several differ: the outcome, then why."""


def _weight(name: str) -> tuple[int, str]:
    return (_FIRST.index(name) if name in _FIRST else len(_FIRST), name)


def _first_difference(
    old: Mapping[str, Any], new: Mapping[str, Any], *, versions_differ: bool
) -> str | None:
    for name in sorted(set(old) | set(new), key=_weight):
        if name in IGNORED_FIELDS or (versions_differ and name in _VERSIONED):
            continue
        if old.get(name) != new.get(name):
            if (
                name == "message"
                and old.get("kind") == "failed"
                and old.get("stage") == "output"
            ):
                continue  # the invalid output itself is not recorded, only its error
            return name
    return None


def _attribute(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, ...]:
    """The rules that account for a changed decision.

    Rules named by one decision but not the other; when both name the same rules
    (a rule's own verdict changed), those. `(default)` when no rule took part.
    """
    was = list(old.get("rule_ids") or ())
    now = list(new.get("rule_ids") or ())
    changed = [r for r in now if r not in was] + [r for r in was if r not in now]
    return tuple(changed or now or was or ["(default)"])


def _summary(event: Mapping[str, Any]) -> str:
    kind = str(event.get("kind"))
    for name in ("verdict", "status", "stage", "capability", "limit", "breaker"):
        if name in event and event[name] is not None:
            return f"{kind} ({name} {event[name]})"
    return kind


def _short(value: Any) -> str:
    text = (
        repr(value)
        if not isinstance(value, (dict, list))
        else _canonical.dumps(value).decode()
    )
    return text if len(text) <= 120 else text[:117] + "..."


def _at(event: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00"))


def replay_all(
    replayer: Replayer, runs: Iterable[RecordedRun]
) -> Iterator[ReplayReport]:
    """Replay several runs, one report each, in order."""
    for run in runs:
        yield replayer.replay(run)


_ = StoreError  # re-exported for callers catching the scratch store's errors
