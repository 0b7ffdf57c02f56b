"""The walk: re-drive a recorded run, event by event, through today's call path.

Each step is driven against the scratch app, with the record standing in for the
world (`_world`, `_scratch`); what the scratch run gains is handed, beside the
recorded events, to the comparison (`_compare`), which writes the report.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic

from tether import _canonical, gateway, record
from tether._effects import Execute
from tether._resolve import resolve_in_doubt
from tether._stages import handler_args, may_hold_secrets, validate_output
from tether.app import Tether
from tether.capability import Capability, Effect
from tether.clock import SystemClock
from tether.config import Settings, guards_from, load_settings, policy_from
from tether.errors import LimitExceeded, NotFound, TetherError
from tether.handle import IN_DOUBT_RULE, Run
from tether.plan import PlanStep
from tether.policy import PolicySet, file_part
from tether.principal import Principal
from tether.replay._compare import Comparison
from tether.replay._records import RecordedRun, at
from tether.replay._report import Mode, Prediction, ReplayError, ReplayReport
from tether.replay._scratch import Met, ScratchStore, breaker_met, met_by
from tether.replay._world import (
    FirstRng,
    ReplayClock,
    ReplayIds,
    attempts,
    call_of,
    drive,
    recorded_checks,
)
from tether.store import ApprovalStatus
from tether.store._limits import to_us

__all__ = ["Replayer"]

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
        "in_doubt_resolved",
    }
)
"""Kinds written outside a step: the walk handles each where it appears."""

_TURN = frozenset({"usage_charged", "plan_proposed"})
"""Kinds that a planner turn writes, the first of them after its room was checked."""

_STEP_ENDS = frozenset({"executed", "failed", "in_doubt", "idempotent_hit"})
"""Kinds that end a step (as `Run.resumed` reads them): after an intent, a step
with none of them was cut off by its process's death."""


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
        self._guards = app.guards if settings is None else guards_from(self.settings)

    @classmethod
    def for_file(cls, app: Tether, path: str | Path, *, mode: Mode) -> Replayer:
        """A replayer under the policy file at `path`, keeping the app's Python policies.

        Raises:
            ConfigError: the file does not load.
        """
        settings, version = load_settings(Path(path))
        from_file = policy_from(settings, version, has_file=True)
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
        if type(fmt) is not int:
            raise ReplayError(
                f"{recorded.source}: record format {fmt!r} is not a format version "
                "(a whole number); the record is damaged: export it again"
            )
        if fmt > record.FORMAT:
            raise ReplayError(
                f"{recorded.source}: record format {fmt} is newer than this tether "
                f"reads ({record.FORMAT}); upgrade tether to replay it"
            )
        _check_events(recorded)
        self.report = ReplayReport(
            run_id=recorded.run_id, mode=replayer.mode, events=len(self.events), steps=0
        )
        self.compare = Comparison(self.report)
        self.clock = ReplayClock(at(first))
        approvals = [
            str(e["approval_id"])
            for e in self.events
            if e.get("kind") == "approval_requested"
        ]
        self.resumed_requests = {
            str(e["approval_id"])
            for e in self.events
            if e.get("kind") == "approval_requested"
            and IN_DOUBT_RULE in (e.get("rule_ids") or ())
        }
        """Requests a resume made for a `none` step its dead process cut off: the
        resume's, not the call path's, so no step of the replay makes them."""
        ids = ReplayIds(
            {
                "run_": [recorded.run_id],
                "apr_": [a for a in approvals if a not in self.resumed_requests],
            }
        )
        self.scratch = _scratch_app(replayer, self.clock, ids)
        self.takes: dict[int, tuple[int, list[dict[str, Any]]]] = {}
        """Each take of a step, by the position of its first event: the step's
        number and its events. A step is taken once, but one its process died in
        (intent, no result) is taken again under its number when the run resumes."""
        current: dict[int, list[dict[str, Any]]] = {}
        for position, e in enumerate(self.events):
            number = e.get("step")
            if number is None or e.get("kind") in _RUN_LEVEL:
                continue
            take = current.get(number)
            if take is None or (
                e["kind"] == "validated" and any(x["kind"] == "validated" for x in take)
            ):
                take = current[number] = []
                self.takes[position] = (number, take)
            take.append(e)
        self.proposed: deque[dict[str, Any]] = deque()
        self.breakers_known: dict[str, str] = {}
        """Where this run's own record last left each breaker (`breaker_met`)."""
        self.own_requests = set(approvals)
        """Approval requests this run made (any other it waited on was another run's)."""
        self.previews: dict[tuple[str, bytes], Any] = {}
        """The recorded preview of each approval request, by capability and args."""
        self.seen = (
            0  # replayed events already compared (an index into the scratch record)
        )
        self.recorded_version: str | None = None
        """The policy version the record's latest decision so far was made under."""
        self.unchecked_turns = False
        """A turn the record took past a spent budget was noted (see `_turn`)."""

    # -- the walk -------------------------------------------------------------------

    def run(self) -> ReplayReport:
        first = self.events[0]
        principal = Principal(**first["principal"])
        store = self.scratch.store
        assert isinstance(store, ScratchStore)
        store.on_behalf_of = principal.on_behalf_of  # whom a seeded grant was for
        run = Run(
            self.scratch,
            principal=principal,
            request=str(first["request"]),
            context=dict(first.get("context") or {}),
        )
        run.planner = first.get("planner")
        budget = first.get("budget")
        if budget is not None:
            run.budget = Decimal(str(budget))
        run.__enter__()
        self.run_ = run
        self._fresh()  # run_started and its status: the walk starts after them
        admitted_once = False
        turn_checked = False  # a planner turn's room is checked before the turn
        turned = paid = False  # as the agent loop reads them (`_turns_of`)
        for position, event in enumerate(self.events):
            if position == 0:
                continue
            kind = event["kind"]
            if kind in _TURN and run.planner is not None and not turn_checked:
                if paid or not turned:  # the loop checks no free planner's turn
                    self._turn(event)
                turn_checked = turned = True
            if kind == "usage_charged" and Decimal(str(event.get("cost") or 0)) > 0:
                paid = True
            if kind == "plan_proposed":
                self.proposed = deque(event.get("steps") or ())
                turn_checked = False
            elif kind == "plan_admitted":
                self._admit(event, first_admission=not admitted_once)
                admitted_once = True
            elif kind == "usage_charged":
                self._usage(event)
            elif kind == "limit_refused" and event.get("step") is None:
                self._turn(event)
            elif kind == "approval_decided":
                self._decided(event)
            elif kind == "in_doubt_resolved":
                self._resolved(event)
            elif position in self.takes:
                self._step(*self.takes[position])
            if event.get("policy_version"):
                self.recorded_version = str(event["policy_version"])
        return self.report

    def _fresh(self) -> list[dict[str, Any]]:
        """The events the scratch run gained since the last call."""
        store = self.scratch.store
        assert isinstance(store, ScratchStore)
        new = store.events_since(self.run_.id, self.seen)
        self.seen += len(new)
        return new

    # -- run-level events --------------------------------------------------------------

    def _admit(self, event: dict[str, Any], *, first_admission: bool) -> None:
        run = self.run_
        self.clock.set(at(event))
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
            self.compare.diverge(
                None, "plan_admitted", None, "plan_admitted", exc.message
            )
            return
        new = self._fresh()
        # Named by the step it admits, so the report points at the plan's first step.
        self.compare.events(run.steps + 1, [event], new, run_level=True)
        if self.replayer.mode == "what_if" and new:
            self.compare.plan_changes(event, new[-1])

    def _turn(self, event: dict[str, Any]) -> None:
        """Re-make the check before a planner turn (`Run.check_turn_room`).

        At a turn's first event (its usage charge, or its proposal) the check
        passed in the record; at a run-level `limit_refused` it refused.
        """
        self.clock.set(at(event))
        if event["kind"] == "limit_refused":
            self._seed_turn(event)
        with contextlib.suppress(LimitExceeded):  # its event is compared below
            self.run_.check_turn_room()
        refused = [event] if event["kind"] == "limit_refused" else []
        new = self._fresh()
        if (
            not refused
            and new
            and self.recorded_version is not None
            and file_part(self.recorded_version) == self.scratch.policy.file_version
        ):
            # The same settings refuse a turn the record took: the record was
            # made before tether checked a turn (its planner was asked past the
            # budget then), not by another policy. (The budgets are the file's:
            # Python policies, counted in the version since, have no say.)
            if not self.unchecked_turns:
                self.unchecked_turns = True
                self.report.notes.append(
                    f"{at(event).isoformat()}: the record takes a planner turn past "
                    f"a spent budget ({new[-1].get('limit')}) under the settings it was "
                    "recorded with: it predates the check before a turn, which "
                    "is not compared"
                )
            return
        self.compare.events(None, refused, new)

    def _seed_turn(self, refused: dict[str, Any]) -> None:
        """Put a budget where a refused turn found it (`ScratchStore` does so for steps).

        Other runs charge a tenant's, a principal's or a global budget too, and
        their charges are not in this record: the refusal's `used` and `held`
        say what the turn met. Only a budget today's settings still charge
        model usage to is seeded; today's amount then decides the turn.
        """
        guards = self.scratch.guards
        if guards is None or not guards.limits:
            return
        run = self.run_
        now = at(refused)
        found = next(
            (
                b
                for b in guards.limits.model_budgets(
                    principal=run.principal, run_id=run.id, now=now
                )
                if b.limit.id == refused["limit"] and b.scope == refused.get("scope")
            ),
            None,
        )
        if found is None:
            return
        store = self.scratch.store
        assert isinstance(store, ScratchStore)
        us = to_us(now)
        store.seed_counter(
            (found.limit.id, found.scope, found.window),
            used=Decimal(str(refused.get("used", 0))),
            held=Decimal(str(refused.get("held", 0))),
            at_us=us,
            hold_until=us + 1,
        )

    def _usage(self, event: dict[str, Any]) -> None:
        self.clock.set(at(event))
        self.run_.charge_usage(
            Decimal(str(event["cost"])),
            input_tokens=int(event.get("input_tokens", 0)),
            output_tokens=int(event.get("output_tokens", 0)),
            model=event.get("model"),
        )
        self.compare.events(None, [event], self._fresh(), run_level=True)

    def _decided(self, event: dict[str, Any]) -> None:
        """Apply a person's recorded decision to the scratch store."""
        outcome = event.get("outcome")
        when = at(event)
        store = self.scratch.store
        approval_id = str(event["approval_id"])
        try:
            if outcome == "expired":
                store.expire_approval(approval_id, when)
            elif outcome in ("approved", "denied"):

                def made(row: object, refused: str | None) -> record.Event:
                    return record.ApprovalDecided(
                        at=when,
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
                    now=when,
                    event=made,
                )
        except (NotFound, TetherError):
            if approval_id in self.resumed_requests:
                return  # the resume's request for a cut-off step: noted at the step
            # The request was not made again (an earlier divergence says why).
            self.report.notes.append(
                f"approval {approval_id}: decided in the record, but the replay "
                "made no such request"
            )
        self._fresh()  # the decision's own event is the person's, not compared

    def _resolved(self, event: dict[str, Any]) -> None:
        """Apply a person's recorded answer to a step in doubt to the scratch store.

        The replayed step must be in doubt too; its key is settled as the
        answer said, so a later retry under it replays as it ran (the call
        again, or the person's result).
        """
        step = int(event["step"])
        if any(
            e["kind"] == "in_doubt"
            and e.get("step") == step
            and e.get("error_type") == "WriterLost"
            for e in self.events
        ):
            # Cut off by its process's death or an abort: the replay does not
            # re-drive what those wrote (`_cut_at_resume`), so the step is not
            # in doubt here and its answer has nothing to settle.
            self._fresh()
            return
        try:
            resolve_in_doubt(
                self.scratch.store,
                self.scratch.capabilities,
                self.run_.id,
                step,
                now=at(event),
                acted=bool(event["acted"]),
                by=str(event["by"]),
                reason=str(event["reason"]),
                output=event.get("output"),
                approvers=None,  # who answered was checked when they did
            )
        except TetherError as exc:
            self.report.notes.append(
                f"step {step}: resolved by {event['by']} in the record, but the "
                f"replay cannot resolve it ({exc.message})"
            )
        self._fresh()  # the answer's own event is the person's, not compared

    # -- steps -----------------------------------------------------------------------

    def _step(self, number: int, recorded: list[dict[str, Any]]) -> None:
        run = self.run_
        proposal = self.proposed.popleft() if self.proposed else None
        if number <= run.steps:
            # A step its process died in, taken again under its number on resume
            # (Run.resumed does the same): it may run again under its derived key.
            run.steps = number - 1
            run._numbers = itertools.count(number)
        if number - run.steps > len(self.events):
            raise ReplayError(
                f"{self.recorded.source}: step {number} follows step {run.steps} in "
                "a record of fewer events; the record is damaged: export it again"
            )
        while run.steps < number - 1:  # a step the record has no events for
            run.next_step()
        recorded, resumed = _cut_at_resume(recorded)
        if resumed:
            self.report.notes.append(
                f"step {number}: its process died mid-call; the in-doubt request the "
                "resume made for it is the record's, not re-checked"
            )
        call = call_of(recorded, proposal)
        if call is None:
            run.next_step()
            self.report.notes.append(
                f"step {number}: the record keeps no args for it (they were refused "
                "before validation passed), so it was not re-checked"
            )
            return
        name, args, key, dry_run = call
        try:
            cap = _capability(self.scratch, name, recorded)
        except NotFound as exc:
            raise ReplayError(
                f"{self.recorded.source}: step {number} called {name!r}, which this app "
                "does not register; replay with the app that made the run (--app)"
            ) from exc
        if self.replayer.mode == "dry_run":
            self._predict(number, cap, args, recorded)
        self.clock.set(at(recorded[0]))
        results = deque(attempts(recorded))
        asked = next((e for e in recorded if e["kind"] == "approval_requested"), None)
        seen_as = (name, _canonical.dumps(args))
        if asked is not None:
            self.previews[seen_as] = asked.get("preview")
        # A step that found its request already pending recorded no preview of its
        # own: it was the pending request's (the digest covers it).
        preview = self.previews.get(seen_as)
        if cap.preconditions:
            cap = recorded_checks(cap, recorded)
        store = self.scratch.store
        assert isinstance(store, ScratchStore)
        store.met = met_by(
            recorded,
            self.own_requests,
            # the recorded args are masked, as the call path's canonical bytes are
            secret_args=may_hold_secrets(cap, _canonical.dumps(args)),
        )
        guards = self.scratch.guards
        watch = None if guards is None else guards.breakers.for_resource(cap.resource)
        if watch is not None and not dry_run:
            spec = watch[1]
            known = self.breakers_known.get(spec.id, "closed")
            checked, seed, self.breakers_known[spec.id] = breaker_met(
                recorded,
                spec.id,
                known,
                passes_open=cap.effect is Effect.READ
                and watch[0].on_open == "read_only",
            )
            if seed:
                store.seed_breaker(spec, checked, at(recorded[0]))
        flow = gateway.step(
            run, cap, args, key=key, dry_run=dry_run, deadline=_deadline_of(recorded)
        )
        try:
            drive(
                flow, cap, results, preview, self.clock, cut_off=_is_cut_off(recorded)
            )
        finally:
            store.met = Met()
        self.report.steps += 1
        now = self._fresh()
        self.compare.events(number, recorded, now)
        if self.replayer.mode == "what_if":
            self.compare.step_changes(number, name, recorded, now)

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


def _scratch_app(replayer: Replayer, clock: ReplayClock, ids: ReplayIds) -> Tether:
    """An app on an empty in-memory store, with the replayer's capabilities and policy."""
    source = replayer.app
    scratch = Tether(db="memory://", config=None, clock=clock, ids=ids, env={})
    scratch._config_file = None  # no file to watch: the policy is given
    scratch.config_path = None
    scratch.capabilities = source.capabilities
    scratch.settings = replayer.settings
    scratch.policy = replayer.policy
    scratch.guards = replayer._guards  # the same module's class
    scratch.random = FirstRng()
    scratch.webhook = None
    scratch.store = ScratchStore()
    return scratch


def _capability(
    app: Tether, name: str, recorded: Sequence[dict[str, Any]]
) -> Capability[Any, Any]:
    """The capability a step called: the recorded version while the app has it.

    A run may call a version that is not the latest (`run.step(cap_v1, ...)`);
    verify mode replays under the versions the run used. Without that version
    the latest stands in, and the changed version shows as a divergence.

    Raises:
        NotFound: the app has no capability of that name.
    """
    validated = next((e for e in recorded if e["kind"] == "validated"), None)
    version = None if validated is None else validated.get("version")
    if isinstance(version, str):
        try:
            return app.capabilities.get(name, version)
        except NotFound:
            pass
    return app.capabilities.get(name)


def _is_cut_off(recorded: Sequence[dict[str, Any]]) -> bool:
    """True when the step's process died mid-call: an intent, and no result after."""
    return any(e["kind"] == "intent" for e in recorded) and not any(
        e["kind"] in _STEP_ENDS for e in recorded
    )


def _cut_at_resume(
    recorded: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], bool]:
    """Split off what a resume wrote for a `none` step its dead process cut off.

    The resume (`Run.resumed`) records the step in doubt and asks a person; the
    call path did not write those events, so the replay does not re-drive them.
    """
    for i, e in enumerate(recorded):
        if e["kind"] == "in_doubt" and e.get("error_type") == "WriterLost":
            return recorded[:i], True
    return recorded, False


def _check_events(recorded: RecordedRun) -> None:
    """Refuse a record whose events are not events of this format.

    A chain proves an export unedited since it was hashed, not that tether wrote
    it: a crafted file must be refused with a reason, not crash the replay.

    Raises:
        ReplayError: an event does not fit its kind's schema.
    """
    for number, event in enumerate(recorded.events, start=1):
        try:
            record.decode(_canonical.dumps(event))
        except (pydantic.ValidationError, _canonical.CanonicalError, TypeError) as exc:
            first = (
                exc.errors()[0] if isinstance(exc, pydantic.ValidationError) else None
            )
            where = "" if first is None else ".".join(str(p) for p in first["loc"])
            why = str(exc) if first is None else first["msg"]
            why = f"{where}: {why}" if where else why
            raise ReplayError(
                f"{recorded.source}: event {number} is not a record event of "
                f"this tether ({why}); the record is damaged: export it again"
            ) from exc


def _deadline_of(recorded: Sequence[Mapping[str, Any]]) -> timedelta | None:
    """The caller's deadline a recorded step ran under (`validated.timeout`), if any."""
    for event in recorded:
        if event["kind"] == "validated":
            seconds = event.get("timeout")  # absent from records older than the field
            return None if seconds is None else timedelta(seconds=float(seconds))
    return None
