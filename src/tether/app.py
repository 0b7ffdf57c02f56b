"""The `Tether` façade: one app holds its registry, store, policy and clock.

`Tether.run()` opens a run; the `Run` it returns is the caller's handle, with
`call`/`acall` for steps and the lifecycle kept by the state machine in `run.py`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel

from tether import _canonical, record
from tether import config as _config
from tether._approvals import as_of, why_not, why_not_abort
from tether._chain import StoredEvent
from tether._export import export_run, verify_run
from tether._guards import FullCounters
from tether._keeper import LeaseKeeper
from tether._ready import ORPHANABLE_STATES, PARKED_STATES, ReadyRuns
from tether._resolve import Resolution, resolve_in_doubt
from tether.agent.planner import Planner
from tether.capability import Capability, Registry
from tether.clock import Clock, Ids, RandomIds, Rng, SystemClock, system_rng
from tether.errors import (
    ApprovalClosed,
    ConfigError,
    NotAllowedToApprove,
    NotFound,
    StoreError,
    UsageError,
)
from tether.handle import ABORTED_CODE, Run, cut_off_step
from tether.notify import Webhook
from tether.policy import Policy, PolicySet
from tether.policy.rules import RESERVED_PREFIXES
from tether.principal import Principal, check_text
from tether.run import ABORTABLE_STATES, FINAL_STATES, RunState, check_transition
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    RunRow,
    Store,
    open_store,
    skew_problem,
)

__all__ = ["Run", "Tether"]

logger = logging.getLogger(__name__)

Out = TypeVar("Out", bound=BaseModel)
C = TypeVar("C", bound=Capability[Any, Any])


def _aborted_end(
    row: RunRow,
    stored: Sequence[StoredEvent],
    *,
    by: str,
    reason: str,
    at: datetime,
) -> list[record.Event]:
    """The events that end a run `row` aborted, its record being `stored`.

    A step whose intent is recorded and result is not (its process died
    mid-call, or is still in it) is recorded `in_doubt` first, as a resume
    records a `none` step its dead writer cut off: nothing will run it again
    or record its result, and it may have acted upstream, so the record says
    its outcome is unknown rather than end at its intent.
    """
    check_transition(RunState(row.status), RunState.ABORTED)
    events: list[record.Event] = []
    cut = cut_off_step([e.data() for e in stored])
    if cut is not None:
        events.append(
            record.InDoubtRecorded(
                at=at,
                step=cut[0],
                duration_us=0,
                # As a resume's cut-off step: written by no call path.
                error_type="WriterLost",
                message=(
                    f"{cut[1]} step {cut[0]}: the run was aborted mid-call; "
                    "its outcome is unknown (it may have acted upstream, or "
                    "still be running) and it is never run again"
                ),
            )
        )
    return [
        *events,
        record.RunStatus(
            at=at,
            previous=row.status,
            status=RunState.ABORTED.value,
            by=by,
            reason=reason,
        ),
        record.RunFinished(
            at=at,
            status=RunState.ABORTED.value,
            error_code=ABORTED_CODE,
            message=f"aborted by {by}: {reason}",
        ),
    ]


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
        read_only: only read the database (a tool that inspects records): a
            SQLite file must already be a tether database of this schema, and
            is neither migrated nor given a record key file; writes fail.

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
        read_only: bool = False,
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
        if self._config_file is not None:
            self._config_file.took(version)
        self._policy_lock = threading.Lock()
        self.clock: Clock = clock or SystemClock()
        self.ids: Ids = ids or RandomIds(self.clock)
        self.random: Rng = system_rng()
        """Where retry backoff draws its jitter (tests may seed it)."""
        self.capabilities = Registry()
        self.planners: dict[str, Planner] = {}
        """Planners by name (`register_planner`)."""
        self.policy = _config.policy_from(
            self.settings, version, has_file=self._config_file
        )
        self.guards = _config.guards_from(self.settings)
        """The limits, breakers and retry budget in force; None when `tether.yaml` has none."""
        self.full_counters = FullCounters()
        """Counters reads found full in this process: later reads check first."""
        # A read-only app announces nothing: its webhook (and the variable
        # `webhook_env` names, which a reading shell may lack) is never needed.
        self._env: Mapping[str, str] | None = None if read_only else env
        self.webhook = self._webhook(self.settings)
        """Where approval requests and decisions are announced, if anywhere."""
        self.store: Store = open_store(self.db_url, read_only=read_only)
        self._ready = ReadyRuns()
        # The key file is made only once the database opened: a bad --db must not
        # leave a key file beside some other file.
        if self.store.signs_heads:
            store = self.store
            try:
                store.record_key = _config.record_key(
                    self.db_url,
                    env,
                    create=not read_only,
                    has_runs=lambda: bool(store.list_runs(limit=1)),
                )
            except ConfigError:
                store.close()
                raise
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._keeper = LeaseKeeper(lambda: self.settings.idempotency.claim_ttl)
        """Renews the leases of this app's open runs while they live."""
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
                problems = _config.misfits(self.settings, [cap])
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
        if name is None:
            raise NotFound(
                f"run {row.run_id} has no planner: it was opened with app.run() and "
                "driven by its caller, so only that caller can go on with it"
            )
        planner = self.planners.get(str(name))
        if planner is None:
            raise NotFound(
                f"run {row.run_id} was driven by planner {name!r}, which is not "
                "registered here; register it (app.register_planner) and resume again"
            )
        now = self.clock.now()
        row = self.store.take_over(
            row.run_id,
            parked=PARKED_STATES,
            orphaned=ORPHANABLE_STATES,
            now=now,
            # Held from the take-over on, not from its first write: a second
            # worker finds it held, not orphaned still.
            lease_until=now + self.settings.idempotency.claim_ttl,
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
        Every such run is looked at, however many newer ones still wait,
        oldest first and a page at a time, until `limit` are found (orphaned
        runs first, then degraded, then those awaiting approval). A run no
        planner drives (opened with `app.run`) is never returned: only its
        caller can go on with it.
        """
        return self._ready.look(self.store, self.clock.now(), self.guards, limit=limit)

    def wait_for_news(self, seconds: float) -> None:
        """Wait up to `seconds` for news that may make a parked run ready.

        On PostgreSQL a decided approval request ends the wait at once (from
        any process on any host); otherwise it is a sleep on the app's clock.
        """
        self.store.wait_for_news(seconds, self.clock.sleep)

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
        if f"{policy.id}:".startswith(RESERVED_PREFIXES):
            # Its rule ids are `ID:rule`: they would be tether's own.
            raise UsageError(
                f"policy id {policy.id!r} is tether's own (it names breakers, "
                "capabilities and tether itself in rule ids); name the policy "
                "otherwise"
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

    def _webhook(self, settings: _config.Settings) -> Webhook | None:
        """Return where `settings` send approval news (None for a read-only app)."""
        if self._env is None:
            return None
        return _config.webhook_from(settings, self.clock, self._env)

    def _reload(self, watched: _config.ConfigFile) -> None:
        def failed(error: str) -> None:
            logger.warning(
                "policy.reload_failed",
                extra={"tether.config": str(watched.path), "tether.error": error},
            )

        try:
            loaded = watched.load()
        except ConfigError as exc:
            failed(exc.message)
            return
        if loaded is None:
            return  # written while it was read: the next step reads it again
        settings, version = loaded
        problems = _config.misfits(settings, list(self.capabilities))
        if problems:
            failed(f"{problems[0]}; the last good settings stay")
            return
        try:
            webhook = self._webhook(settings)
        except ConfigError as exc:
            failed(f"{exc.message}; the last good settings stay")
            return
        fresh = _config.policy_from(settings, version, has_file=watched)
        self.policy = self.policy.replace(
            rules=fresh.rules, defaults=fresh.defaults, version=version
        )
        self.guards = _config.guards_from(settings)
        self.webhook = webhook
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
        check_text(request, "the run's request")
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

    def abort(self, run_id: str, *, by: str, reason: str) -> RunRow:
        """Stop a run for good: take it from whoever holds it and end it `aborted`.

        In one store transaction (`Store.abort_run`), in whatever state the
        run is short of a final one, even from a live process stepping it:
        its lease epoch goes up, so that process's next write is refused
        (`RunAborted`, saying who aborted the run and why) and it records
        nothing more; and a `run_status` event to `aborted` (with `by` and
        `reason`) and `run_finished` (error code `aborted`) are appended at
        its head. Nothing comes between the two: no worker can take the run
        in between, and no write is refused before the run reads aborted.
        Approval requests of the run
        still pending are then closed undecided (`expired`, in `by`'s name),
        and those approved but not yet spent are withdrawn (`expired` too),
        so nobody approves, nor runs under an approval, a call of a stopped
        run; the same call made again (by another run) asks a person anew.

        A step the holding process was running (or was cut off in when it
        died) may still finish upstream; its result is not recorded: the
        abort records the step `in_doubt`, its outcome unknown. Its limit
        holds end in the same transaction: what it reserved of a budget
        counts as spent (it may have spent it), and its concurrency slot is
        freed at once if the run's lease had run out (no live process can
        still be in the call), else when the slot's own TTL lapses.

        Args:
            run_id: the run, or a unique prefix of 6+ characters.
            by: who stops it: a name under `approvers:` in tether.yaml that
                decides for the run's tenant (as for approval requests).
            reason: why, for the record and whoever ran the run (required).

        Returns:
            The run's row, now `aborted`.

        Raises:
            NotFound: no such run.
            NotAllowedToApprove: `by` may not stop this run (nothing is
                written).
            UsageError: the run already ended, or `by` or `reason` is missing.
            StoreError: the store could not be written (nothing was; on
                PostgreSQL, a connection lost after the write went out may
                have let it land: `tether runs show` says).

        Example:
            ```python
            row = app.abort(run.id, by="alice", reason="stuck in a loop")
            print(row.status)
            #> aborted
            ```
        """
        check_text(by, "who aborts the run (by)", name=True)
        if not check_text(reason, "the reason").strip():
            raise UsageError(
                "an abort needs a reason: say why, for the record and for whoever "
                "ran the run"
            )
        row = self.store.get_run(run_id)  # a prefix names the run here
        refused = why_not_abort(
            by, self.settings.approvers, run_id=row.run_id, tenant=row.tenant
        )
        if refused is not None:
            raise NotAllowedToApprove(refused)
        if row.status in FINAL_STATES:
            raise UsageError(
                f"run {row.run_id} already ended {row.status}; nothing to abort"
            )
        now = self.clock.now()
        ended = self.store.abort_run(
            row.run_id,
            abortable=ABORTABLE_STATES,
            end=lambda at_abort, stored: _aborted_end(
                at_abort, stored, by=by, reason=reason, at=now
            ),
            at=now,
        )
        logger.info(
            "run.aborted", extra={"tether.run_id": ended.run_id, "tether.by": by}
        )
        self._close_requests(ended.run_id, by=by, reason=reason)
        # Read again: closing the requests recorded their closing in the run.
        return self.store.get_run(ended.run_id)

    def _close_requests(self, run_id: str, *, by: str, reason: str) -> None:
        """Close an aborted run's open approval requests, undecided.

        A pending one is closed `expired` in `by`'s name, not denied: an abort
        stops a run, it is no verdict on the call. A denial would stand against
        that exact call for good, so a later run of the principal making it
        would be refused in `by`'s name without asking anyone, and a run that
        waits on the same request (the same call, coalesced) would be told a
        person denied it. Closed undecided, the call asks a person anew
        whenever it is made again, and a run waiting on the request is
        resumed to ask.

        An approved one no step has spent is withdrawn the same way (approved
        -> `expired`, in `by`'s name): else a later run of the principal
        making the identical call would run under it without asking anyone,
        though the run was stopped so that it would not happen. A step
        spending it at once (another run's) and the withdrawal race in the
        store: exactly one wins. The requests are read after the run's end
        is written, so one approved meanwhile is withdrawn too, and one
        approved while this closes it is withdrawn after.
        """
        now = self.clock.now()
        why = f"run {run_id} was aborted by {by}: {reason}"
        notes = {
            ApprovalStatus.PENDING: f"closed undecided: {why}",
            ApprovalStatus.APPROVED: f"approval withdrawn unspent: {why}",
        }
        requests = [
            request
            for status in notes
            for request in self.store.list_approvals(
                status=status, run_id=run_id, limit=10_000
            )
        ]
        while requests:
            request = requests.pop(0)
            withdraw = request.status is ApprovalStatus.APPROVED
            if not withdraw and request.expires_at <= now:
                self.store.expire_approval(request.id, now)
                continue
            note = notes[request.status]

            def event(
                row: ApprovalRow, closed: str | None, note: str = note
            ) -> record.Event:
                return record.ApprovalDecided(
                    at=now,
                    step=row.step,
                    approval_id=row.id,
                    by=by,
                    outcome="refused" if closed else "expired",
                    reason=closed,
                    note=note,
                )

            try:
                decided = self.store.decide_approval(
                    request.id,
                    status=ApprovalStatus.EXPIRED,
                    by=by,
                    note=note,
                    now=now,
                    event=event,
                    withdraw=withdraw,
                )
            except ApprovalClosed:
                # Decided meanwhile: denied or spent, it stays so; approved, it
                # is withdrawn next.
                again = self.store.get_approval(request.id)
                if not withdraw and again.status is ApprovalStatus.APPROVED:
                    requests.insert(0, again)
                continue
            self.notify("approval.decided", decided)

    # -- approvals ---------------------------------------------------------------------

    def resolve_in_doubt(
        self,
        run_id: str,
        step: int,
        *,
        acted: bool,
        by: str,
        reason: str,
        output: Mapping[str, Any] | BaseModel | None = None,
    ) -> Resolution:
        """Say whether a step in doubt acted upstream, and settle its key by it.

        A step in doubt (a `none` write that failed or timed out after it
        started, or a step its run was cut off in) is never run again on its
        own: its idempotency key refuses every retry. Once a person has
        checked the upstream, this records what they found in the step's run
        (`in_doubt_resolved`, also in a run that has ended) and, in the same
        write, settles the step's key: `acted=False` leaves it `failed`, so a
        retry under it runs the call again; `acted=True` leaves it
        `completed` with `output`, the call's result, which a retry under it
        gets instead of acting again.

        Args:
            run_id: the run, or a unique prefix of 6+ characters.
            step: the step's number in the run.
            acted: whether the call acted upstream.
            by: who checked: a name under `approvers:` in tether.yaml that
                decides for the run's tenant, not the run's principal nor
                whom it acts for.
            reason: what they found, for the record (required).
            output: the call's result; required with `acted` when the step
                has a key, checked against the capability's output schema
                when it is registered here.

        Raises:
            NotFound: no such run.
            NotAllowedToApprove: `by` may not answer for this run (nothing is
                written).
            UsageError: the step is not in doubt, was resolved already, or
                the answer is incomplete or does not fit.
            StoreError: the store could not be written (nothing was).

        Example:
            ```python
            done = app.resolve_in_doubt(
                run_id, 3, acted=False, by="alice", reason="no charge in Stripe"
            )
            print(done.key_state)
            #> failed
            ```
        """
        return resolve_in_doubt(
            self.store,
            self.capabilities,
            run_id,
            step,
            now=self.clock.now(),
            acted=acted,
            by=by,
            reason=reason,
            output=output,
            approvers=self.settings.approvers,
        )

    def approvals(
        self, *, status: ApprovalStatus | str | None = None, limit: int = 50
    ) -> list[ApprovalRow]:
        """Return approval requests, newest first (`status` filters: `pending`, ...).

        A pending request past its expiry is listed with status `expired`.
        """
        wanted = None if status is None else ApprovalStatus(status)
        now = self.clock.now()
        return [
            as_of(r, now)
            for r in self.store.list_approvals(status=wanted, limit=limit, now=now)
        ]

    def approval(self, approval_id: str) -> ApprovalRow:
        """Return one approval request (a unique prefix of 6+ characters works too).

        Raises:
            NotFound: no such request.
        """
        return as_of(self.store.get_approval(approval_id), self.clock.now())

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
        check_text(by, "the approver", name=True)
        if note is not None:
            check_text(note, "the note")
        request = self.store.get_approval(approval_id)
        refused = why_not(request, by, self.settings.approvers)
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

    def verify(self, run_id: str, *, head: str | None = None) -> record.VerifyReport:
        """Recompute a run's hash chain and check its signed head (and `head`, if given).

        Raises:
            NotFound: no such run.
        """
        return verify_run(self.store, run_id, head=head)

    def export(self, run_id: str) -> Iterator[bytes]:
        """Yield a run's record as JSON lines: a header, then one line per event.

        The header holds the run, its chain head, the declarations of the
        capabilities it called and the policy version it ran under, with the
        `tether.yaml` text when the app's file is still that version, so the
        file can be checked and replayed elsewhere.

        Raises:
            NotFound: no such run.
        """
        return export_run(
            self.store,
            run_id,
            capabilities=self.capabilities,
            policy_version=self.policy.version,
            config_text=self._config_text,
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
        self._keeper.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.webhook is not None:
            self.webhook.flush(timeout=5)  # announcements in flight get a few seconds
        self.store.close()

    def __enter__(self) -> Tether:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
