"""The `Tether` façade: one app holds its registry, store, policy and clock.

`Tether.run()` opens a run; the `Run` it returns is the caller's handle, with
`call`/`acall` for steps and the lifecycle kept by the state machine in `run.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel

from tether import _canonical, gateway, record
from tether import config as _config
from tether.agent.planner import Planner
from tether.capability import Capability, Registry
from tether.clock import Clock, Ids, RandomIds, Rng, SystemClock, system_rng
from tether.errors import (
    ConfigError,
    NotAllowedToApprove,
    NotFound,
    StoreError,
    UsageError,
)
from tether.handle import Run
from tether.limits import LimitSet
from tether.notify import Webhook
from tether.policy import Policy, PolicySet, RuleSet
from tether.principal import Principal
from tether.resilience import BreakerSet
from tether.run import RunState
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    RunRow,
    Store,
    open_store,
    skew_problem,
)
from tether.store._breakers import BreakerState, breaker_view
from tether.store._limits import to_us

__all__ = ["Run", "Tether"]

logger = logging.getLogger(__name__)

Out = TypeVar("Out", bound=BaseModel)
C = TypeVar("C", bound=Capability[Any, Any])


class Tether:
    """The app: capabilities, the store they record to, and the policy over them.

    Args:
        db: database URL; default `TETHER_DB`, else `sqlite:///.tether/tether.db`.
            `memory://` keeps records in memory (for unit tests).
        config: path to `tether.yaml`; default `TETHER_CONFIG`, else `./tether.yaml`
            when present.
        clock: where time is read (tests pass `tether.testing.FakeClock`).
        ids: where run ids come from.
        env: the environment to read `TETHER_*` variables from (default `os.environ`).

    Example:
        ```python
        app = tether.Tether(db="memory://")
        app.register(ping)
        with app.run(principal=tether.Principal("bot"), request="check") as run:
            print(run.call("net.ping", {"host": "db-1"}).up)
        #> True
        ```
    """

    def __init__(
        self,
        db: str | None = None,
        config: str | os.PathLike[str] | None = None,
        *,
        clock: Clock | None = None,
        ids: Ids | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.db_url = _config.resolve_db(db, env)
        self.config_path = _config.resolve_config_path(config, env)
        # Stamp the file before reading it: an edit made while it loads is seen
        # as a change at the next step, not taken for what was loaded.
        self._config_file = (
            None if self.config_path is None else _config.ConfigFile(self.config_path)
        )
        self.settings, version = _config.load_settings(self.config_path)
        self._policy_lock = threading.Lock()
        self._awaited_by_run: dict[str, tuple[tuple[int, bytes], frozenset[str]]] = {}
        """What `ready_runs` read of each parked run's record, by its head."""
        self.clock: Clock = clock or SystemClock()
        self.ids: Ids = ids or RandomIds(self.clock)
        self.random: Rng = system_rng()
        """Where retry backoff draws its jitter (tests may seed it)."""
        self.capabilities = Registry()
        self.planners: dict[str, Planner] = {}
        """Planners by name (`register_planner`)."""
        self.policy = _policy_from(self.settings, version, has_file=self._config_file)
        self.guards = _guards_from(self.settings)
        """The limits, breakers and retry budget in force; None when `tether.yaml` has none."""
        self.webhook = _webhook_from(self.settings, self.clock)
        """Where approval requests and decisions are announced, if anywhere."""
        self.store: Store = open_store(self.db_url)
        # The key file is made only once the database opened: a bad --db must not
        # leave a key file beside some other file.
        if self.store.signs_heads:
            self.store.record_key = _config.record_key(self.db_url, env)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._warn_of_skew()

    def _warn_of_skew(self) -> None:
        try:
            skew = self.clock_skew()
        except StoreError:
            return  # the store is away: the first operation says so
        problem = skew_problem(skew)
        if problem is not None:
            logger.warning(
                "store.clock_skew",
                extra={"tether.db": self.store.url, "tether.error": problem},
            )

    def clock_skew(self) -> timedelta | None:
        """Return how far this app's clock is ahead of its store's (None: the store has no clock of its own).

        Every host sharing a PostgreSQL store reckons leases, limit windows,
        rate limits and approval expiry by its own clock; opening the app logs
        a warning (`store.clock_skew`) when this one is off by more than
        `tether.store.CLOCK_SKEW_WARN`, and `tether status` shows it.

        Raises:
            StoreError: the store could not be read.
        """
        return self.store.clock_skew(self.clock.now)

    # -- setup --------------------------------------------------------------------

    def register(self, *capabilities: C) -> C:
        """Make capabilities callable through this app; returns the first one.

        Raises:
            UsageError: not a capability, or its name and version are taken.
        """
        if not capabilities:
            raise UsageError("register() needs at least one capability")
        for cap in capabilities:
            if isinstance(cap, Capability):  # anything else is refused by add()
                problems = _misfits(self.settings, [cap])
                if problems:
                    raise UsageError(problems[0])
            self.capabilities.add(cap)
        return capabilities[0]

    def register_planner(self, name: str, planner: Planner) -> None:
        """Name a planner, so `start` (and, later, a worker resuming runs) can use it.

        Raises:
            UsageError: `planner` has no `propose` method, or the name is taken.
        """
        if not isinstance(planner, Planner):
            raise UsageError(
                f"{planner!r} is not a planner; give it a "
                "`propose(state: PlannerInput) -> Proposal` method"
            )
        if not name or name in self.planners:
            raise UsageError(
                f"planner name {name!r} is empty or taken; register each planner once"
            )
        self.planners[name] = planner

    def start(
        self,
        request: str,
        *,
        planner: str,
        principal: Principal,
        context: Mapping[str, Any] | None = None,
        budget: Decimal | int | None = None,
        max_steps: int = 50,
    ) -> Run:
        """Run the agent loop with a registered planner until the run ends or parks.

        A step that needs a person's approval parks the run in
        `awaiting_approval` (its request waits in the store); a breaker in
        `stash` mode parks it `degraded`. Read `run.status`.

        Raises:
            NotFound: no planner by that name.
        """
        found = self.planners.get(planner)
        if found is None:
            names = ", ".join(sorted(self.planners)) or "none registered"
            raise NotFound(f"no planner {planner!r} ({names}); register it first")
        # The agent loop stands beside the app (it drives a Run); imported here
        # because tether.agent imports this module.
        from tether.agent import run_agent

        return run_agent(
            self,
            found,
            principal=principal,
            request=request,
            context=context,
            budget=budget,
            max_steps=max_steps,
            planner_name=planner,
            park_on_approval=True,
        )

    def _stash_breaker_closed(self, run_id: str, now: datetime) -> bool:
        """Tell whether the breaker that stashed a degraded run lets calls through again."""
        stashed = [
            e.data()["breaker"]
            for e in self.store.events(run_id)
            if e.data()["kind"] == "plan_stashed"
        ]
        if not stashed:
            return False
        guards = self.guards
        found = None
        if guards is not None:
            found = next(
                (b for b in guards.breakers.breakers if b.id == stashed[-1]), None
            )
        if found is None:
            return True  # the breaker is gone from the config: nothing holds the run
        row = self.store.breaker_row(found.id)
        view, _ = breaker_view(row, found.spec(), to_us(now))
        return view.state is not BreakerState.OPEN

    def resume(self, run_id: str) -> Run:
        """Continue a parked run (or one whose process died), here, until it ends or parks again.

        The run is taken over first (its lease epoch goes up, so a process
        still holding it can no longer write), then its planner, by the name
        its record gives, continues from the record: steps taken are not
        taken again, and the step it parked on runs under its grant once a
        person approved it (a denial is the planner's to handle).

        Raises:
            NotFound: no such run, or its planner is not registered here.
            UsageError: the run is not parked (it ended, or is running).
        """
        row = self.store.get_run(run_id)
        events = self.store.events(row.run_id)
        names = [
            e.data().get("planner")
            for e in events
            if e.data()["kind"] in ("run_started", "plan_proposed")
        ]
        name = next((n for n in reversed(names) if n), None)
        planner = None if name is None else self.planners.get(str(name))
        if planner is None:
            raise NotFound(
                f"run {row.run_id} was driven by planner {name!r}, which is not "
                "registered here; register it (app.register_planner) and resume again"
            )
        row = self.store.take_over(
            row.run_id,
            parked=_PARKED_STATES,
            orphaned=_ORPHANABLE_STATES,
            now=self.clock.now(),
        )
        from tether.agent.loop import resume_agent  # see start()

        run = Run.resumed(self, row, self.store.events(row.run_id))
        return resume_agent(self, run, planner, planner_name=str(name))

    def ready_runs(self, *, limit: int = 100) -> list[str]:
        """Return the parked runs that may go on: ready to resume, oldest first.

        A run parked in `awaiting_approval` is ready once none of the requests
        it made or waits on is still pending (each was approved, denied or has
        expired); it may wait on another run's request for the same call. A run left
        `executing` or `planning` is ready once its writer's lease ran out (the
        process died: every write renews the lease for `idempotency.claim_ttl`);
        a `degraded` run once the breaker that stashed it is no longer open.
        """
        now = self.clock.now()
        ready = []
        for row in self.store.list_runs(
            status=RunState.AWAITING_APPROVAL.value, limit=limit
        ):
            asked = self.store.list_approvals(run_id=row.run_id, now=now, limit=1000)
            own = {a.id for a in asked}
            asked += [self.store.get_approval(i) for i in self._awaited(row) - own]
            if asked and not any(
                _as_of(a, now).status is ApprovalStatus.PENDING for a in asked
            ):
                ready.append(row.run_id)
        ready.extend(
            row.run_id
            for row in self.store.list_runs(status=RunState.DEGRADED.value, limit=limit)
            if self._stash_breaker_closed(row.run_id, now)
        )
        for status in _ORPHANABLE_STATES:  # their writer died: its lease ran out
            ready.extend(
                row.run_id
                for row in self.store.list_runs(status=status, limit=limit)
                if row.lease_until is None or row.lease_until <= now
            )
        return ready[::-1]

    def wait_for_news(self, seconds: float) -> None:
        """Wait up to `seconds` for news that may make a parked run ready.

        On PostgreSQL a decided approval request ends the wait at once (from
        any process on any host); otherwise it is a sleep on the app's clock.
        """
        self.store.wait_for_news(seconds, self.clock.sleep)

    def _awaited(self, row: RunRow) -> frozenset[str]:
        """Return the approval requests a run's steps waited on, from its record.

        Kept by the record's head: a parked run's record does not grow while
        it waits, so a worker's looks read it once, not at every look.
        """
        seen = self._awaited_by_run.get(row.run_id)
        if seen is not None and seen[0] == (row.head_seq, row.head_hash):
            return seen[1]
        found = set()
        for ev in self.store.events(row.run_id):
            if b'"approval_id":"' not in ev.body:  # most events: no decoding
                continue
            data = ev.data()
            if data["kind"] == "failed":
                found.add(str(data["approval_id"]))
        if len(self._awaited_by_run) >= _AWAITED_KEPT:
            self._awaited_by_run.clear()  # parked runs come and go: start afresh
        self._awaited_by_run[row.run_id] = (
            (row.head_seq, row.head_hash),
            frozenset(found),
        )
        return frozenset(found)

    def add_policy(self, policy: Policy) -> None:
        """Add a Python policy; it takes part in the same precedence as rules.

        Raises:
            UsageError: `policy` has no `id` or no `evaluate` method.
        """
        if not isinstance(policy, Policy):
            raise UsageError(
                f"{policy!r} is not a policy; give it an `id` and an "
                "`evaluate(request) -> Decision | None` method"
            )
        with self._policy_lock:
            self.policy = self.policy.add(policy)

    def current_policy(self) -> PolicySet:
        """Return the policy in force, reloading `tether.yaml` first if it changed.

        A file that fails to load leaves the last good policy in force; the
        failure is logged (`policy.reload_failed`) once per change of the file.
        """
        watched = self._config_file
        if watched is not None and watched.changed():
            with self._policy_lock:
                if watched.changed():
                    self._reload(watched)
        return self.policy

    def _reload(self, watched: _config.ConfigFile) -> None:
        try:
            settings, version = watched.load()
        except ConfigError as exc:
            logger.warning(
                "policy.reload_failed",
                extra={"tether.config": str(watched.path), "tether.error": exc.message},
            )
            return
        problems = _misfits(settings, list(self.capabilities))
        if problems:
            logger.warning(
                "policy.reload_failed",
                extra={
                    "tether.config": str(watched.path),
                    "tether.error": f"{problems[0]}; the last good settings stay",
                },
            )
            return
        fresh = _policy_from(settings, version, has_file=watched)
        self.policy = self.policy.replace(
            rules=fresh.rules, defaults=fresh.defaults, version=version
        )
        self.guards = _guards_from(settings)
        self.webhook = _webhook_from(settings, self.clock)
        self.settings = settings
        logger.info("policy.reloaded", extra={"tether.policy_version": version})

    # -- runs ----------------------------------------------------------------------

    def run(
        self,
        *,
        principal: Principal,
        request: str,
        context: Mapping[str, Any] | None = None,
        budget: Decimal | int | None = None,
    ) -> Run:
        """Open a run; use it as a context manager (`with` or `async with`).

        Args:
            principal: who the run acts as.
            request: the task, in words.
            context: recorded with the run and shown to policies.
            budget: the most the run's plans may cost, in the capabilities' cost
                unit; `Run.admit` refuses a plan that costs more than is left.
                None (the default) is no budget.

        Raises:
            UsageError: `principal` is not a `Principal`, or the budget is a
                float, negative or not finite.
        """
        if not isinstance(principal, Principal):
            raise UsageError(f"principal must be a tether.Principal, got {principal!r}")
        try:
            # The context is recorded: it must be JSON the record keeps exactly, and
            # the run holds its own copy, in canonical form.
            recorded: dict[str, Any] = _canonical.loads(
                _canonical.dumps(dict(context or {}))
            )
        except (_canonical.CanonicalError, TypeError, ValueError) as exc:
            raise UsageError(
                f"the run's context cannot be recorded exactly ({exc}); pass JSON "
                "values: text, numbers within 64 bits, lists and mappings"
            ) from exc
        return Run(
            self,
            principal=principal,
            request=request,
            context=recorded,
            budget=budget,
        )

    # -- approvals ---------------------------------------------------------------------

    def approvals(
        self, *, status: ApprovalStatus | str | None = None, limit: int = 50
    ) -> list[ApprovalRow]:
        """Return approval requests, newest first (`status` filters: `pending`, ...).

        A pending request past its expiry is listed with status `expired`.
        """
        wanted = None if status is None else ApprovalStatus(status)
        now = self.clock.now()
        return [
            _as_of(r, now)
            for r in self.store.list_approvals(status=wanted, limit=limit, now=now)
        ]

    def approval(self, approval_id: str) -> ApprovalRow:
        """Return one approval request (a unique prefix of 6+ characters works too).

        Raises:
            NotFound: no such request.
        """
        return _as_of(self.store.get_approval(approval_id), self.clock.now())

    def approve(
        self, approval_id: str, *, by: str, note: str | None = None
    ) -> ApprovalRow:
        """Grant a pending request: the call it was made for may run once.

        Raises:
            NotFound: no such request.
            NotAllowedToApprove: `by` is the requester, or holds no approver role
                for it (the attempt is recorded in the run).
            ApprovalClosed: it is decided, used or expired (recorded too).
        """
        return self._decide(approval_id, ApprovalStatus.APPROVED, by=by, note=note)

    def deny(self, approval_id: str, *, by: str, reason: str) -> ApprovalRow:
        """Deny a pending request; the call it was made for is refused with `reason`.

        Raises:
            UsageError: no reason given.
            NotFound, NotAllowedToApprove, ApprovalClosed: as for `approve`.
        """
        if not reason or not reason.strip():
            raise UsageError(
                "a denial needs a reason: say why, for the agent and the record"
            )
        return self._decide(approval_id, ApprovalStatus.DENIED, by=by, note=reason)

    def _decide(
        self, approval_id: str, status: ApprovalStatus, *, by: str, note: str | None
    ) -> ApprovalRow:
        request = self.store.get_approval(approval_id)
        refused = self._may_not_decide(request, by)
        now = self.clock.now()
        outcome = "approved" if status is ApprovalStatus.APPROVED else "denied"

        def event(row: ApprovalRow, closed: str | None) -> record.Event:
            why = refused or closed
            return record.ApprovalDecided(
                at=now,
                step=row.step,
                approval_id=row.id,
                by=by,
                outcome="refused" if why else outcome,
                reason=why,
                note=note,
            )

        decided = self.store.decide_approval(
            request.id,
            status=None if refused else status,
            by=by,
            note=note,
            now=now,
            event=event,
        )
        if refused:
            raise NotAllowedToApprove(refused)
        self.notify("approval.decided", decided)
        return decided

    def notify(self, event: str, row: ApprovalRow) -> None:
        """Announce an approval request's news on the webhook, if one is configured."""
        if self.webhook is not None:
            self.webhook.send({"event": event, "approval": row.describe()})

    def _may_not_decide(self, request: ApprovalRow, by: str) -> str | None:
        """Say why `by` may not decide `request`, or None when they may."""
        if by in (request.principal_id, request.on_behalf_of):
            return (
                f"{by} asked for approval request {request.id} (or acts for who did); "
                "nobody approves their own request"
            )
        approver = self.settings.approvers.get(by)
        if approver is None:
            return (
                f"{by} is not an approver: name them under `approvers:` in "
                "tether.yaml with their roles"
            )
        if approver.tenants and request.tenant not in approver.tenants:
            return (
                f"{by} decides for {', '.join(approver.tenants)}, not for tenant "
                f"{request.tenant} (approval request {request.id})"
            )
        if request.approvers and set(request.approvers).isdisjoint(approver.roles):
            return (
                f"{by} holds none of the roles that may decide approval request "
                f"{request.id} ({', '.join(request.approvers)})"
            )
        return None

    def verify(self, run_id: str, *, head: str | None = None) -> record.VerifyReport:
        """Recompute a run's hash chain and check its signed head (and `head`, if given).

        Raises:
            NotFound: no such run.
        """
        row = self.store.get_run(run_id)
        events = self.store.events(row.run_id)
        report = record.verify(
            row.run_id,
            events,
            head_seq=row.head_seq,
            head_hash=row.head_hash,
            head_sig=row.head_sig,
            key=self.store.record_key,
            expected_head=head,
        )
        if not report.ok or not events:
            return report
        # The runs row is an index over the record, not part of the chain: what it
        # shows (and `runs list` prints) must agree with the chained events.
        started = events[0].data()
        last_status = None
        for event in reversed(events):
            data = event.data()
            if data["kind"] == "run_status":
                last_status = data["status"]
                break
        principal = started.get("principal") or {}
        facts = {
            "request": (row.request, started.get("request")),
            "principal": (row.principal_id, principal.get("id")),
            "tenant": (row.tenant, principal.get("tenant")),
            "status": (row.status, last_status),
        }
        for name, (shown, recorded) in facts.items():
            if shown != recorded:
                return record.VerifyReport(
                    run_id=row.run_id,
                    ok=False,
                    events=report.events,
                    head=report.head,
                    reason=f"the run's {name} {shown!r} differs from the record's "
                    f"{recorded!r}: the runs table was edited",
                )
        return report

    def export(self, run_id: str) -> Iterator[bytes]:
        """Yield a run's record as JSON lines: a header, then one line per event.

        The header holds the run, its chain head, the declarations of the
        capabilities it called and the policy version it ran under, with the
        `tether.yaml` text when the app's file is still that version, so the
        file can be checked and replayed elsewhere.

        Raises:
            NotFound: no such run.
        """
        row = self.store.get_run(run_id)
        events = self.store.events(row.run_id)
        data = [e.data() for e in events]
        names = sorted({str(d.get("capability")) for d in data} - {"None"})
        versions = {str(d["policy_version"]) for d in data if d.get("policy_version")}
        ran_under = next(iter(versions)) if len(versions) == 1 else None
        same_policy = versions <= {self.policy.version}
        caps: dict[str, dict[str, object] | None] = {}
        for name in names:
            try:
                caps[name] = self.capabilities.get(name).describe()
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
                "policy_version": ran_under or self.policy.version,
                # The file's text only when it is the version the run ran under:
                # a file edited since would replay the run under another policy.
                "config": self._config_text() if same_policy else None,
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

    def _config_text(self) -> str | None:
        """The policy file's text, for an export to replay under elsewhere."""
        if self.config_path is None:
            return None
        try:
            return self.config_path.read_text(encoding="utf-8")
        except OSError:
            return None  # removed since it loaded: the export still has the version

    # -- resources -------------------------------------------------------------------

    def _thread_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(thread_name_prefix="tether-handler")
            return self._pool

    def close(self) -> None:
        """Close the store and stop the handler threads (abandoning any that hang)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.webhook is not None:
            self.webhook.flush(timeout=5)  # announcements in flight get a few seconds
        self.store.close()

    def __enter__(self) -> Tether:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line_safe(document: object) -> bytes:
    """Encode one JSONL line, escaping the characters text readers take for breaks.

    JSON allows U+2028, U+2029 and U+0085 raw, but `str.splitlines` and many
    log tools split lines on them.
    """
    line = _canonical.dumps(document)
    for char, escaped in _LINE_BREAKS:
        line = line.replace(char, escaped)
    return line


_LINE_BREAKS = tuple(
    (ch.encode(), f"\\u{ord(ch):04x}".encode()) for ch in ("\u2028", "\u2029", "\x85")
)


def _policy_from(
    settings: _config.Settings, version: str, *, has_file: object
) -> PolicySet:
    rules = RuleSet(settings.rules) if settings.rules else None
    if has_file is None:
        return PolicySet(rules=rules, version=version)  # no policy file: allow all
    return PolicySet(rules=rules, defaults=settings.defaults, version=version)


_AWAITED_KEPT = 10_000
"""Parked runs whose awaited requests `ready_runs` keeps between looks."""
_PARKED_STATES = (RunState.AWAITING_APPROVAL.value, RunState.DEGRADED.value)
_ORPHANABLE_STATES = (RunState.EXECUTING.value, RunState.PLANNING.value)


def _as_of(row: ApprovalRow, now: datetime) -> ApprovalRow:
    """Show a pending request past its expiry as expired (it can no longer be decided)."""
    if row.status is ApprovalStatus.PENDING and row.expires_at <= now:
        return dataclasses.replace(row, status=ApprovalStatus.EXPIRED)
    return row


def _misfits(
    settings: _config.Settings, capabilities: Sequence[Capability[Any, Any]]
) -> list[str]:
    """Say where capabilities' timeouts and the settings cannot work together."""
    problems = []
    ttl = settings.idempotency.claim_ttl
    breakers = BreakerSet(settings.breakers)
    for cap in capabilities:
        timeout = cap.timeout
        if timeout is None:
            continue
        if timeout > ttl:
            problems.append(
                f"capability {cap.name!r}: its timeout {timeout} is longer than "
                f"idempotency.claim_ttl ({ttl}), so a retry could take its key over "
                "while it still runs; shorten the timeout or raise claim_ttl"
            )
        watch = breakers.for_resource(cap.resource)
        if watch is not None and watch[0].probe_timeout < timeout:
            problems.append(
                f"capability {cap.name!r}: its timeout {timeout} is longer than the "
                f"probe_timeout ({watch[0].probe_timeout}) of breaker {watch[0].id!r}, "
                "so a slow trial call would reopen the breaker while it still runs; "
                "raise probe_timeout or shorten the timeout"
            )
    return problems


def _webhook_from(settings: _config.Settings, clock: Clock) -> Webhook | None:
    url = settings.approvals.webhook
    if url is None:
        return None
    return Webhook(url, retries=settings.approvals.webhook_retries, sleep=clock.sleep)


def _guards_from(settings: _config.Settings) -> gateway.Guards | None:
    guards = gateway.Guards(
        limits=LimitSet(settings.limits, default_ttl=settings.idempotency.claim_ttl),
        breakers=BreakerSet(settings.breakers),
        retry=settings.retry_budget,
    )
    return guards if guards else None
