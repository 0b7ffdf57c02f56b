"""The `Tether` façade: one app holds its registry, store, policy and clock.

`Tether.run()` opens a run; the `Run` it returns is the caller's handle, with
`call`/`acall` for steps and the lifecycle kept by the state machine in `run.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar, overload

import anyio.to_thread
from pydantic import BaseModel

from tether import _canonical, gateway, plan, record
from tether import config as _config
from tether.capability import Capability, Registry
from tether.clock import Clock, Ids, RandomIds, Rng, SystemClock, system_rng
from tether.errors import (
    BreakerOpen,
    ConfigError,
    LeaseLost,
    NotFound,
    StoreError,
    TetherError,
    UsageError,
)
from tether.limits import LimitSet
from tether.policy import Policy, PolicySet, RuleSet
from tether.principal import Principal
from tether.record import Outcome
from tether.resilience import BreakerSet
from tether.run import FINAL_STATES, RunState, check_transition
from tether.store import Batch, Claim, Committed, KeyUpdate, NewRun, Store, open_store
from tether.store._limits import (
    BreakerAdmit,
    BreakerOutcome,
    Reserve,
    RetryCharge,
    Settle,
)

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
        self.clock: Clock = clock or SystemClock()
        self.ids: Ids = ids or RandomIds(self.clock)
        self.random: Rng = system_rng()
        """Where retry backoff draws its jitter (tests may seed it)."""
        self.capabilities = Registry()
        self.policy = _policy_from(self.settings, version, has_file=self._config_file)
        self.guards = _guards_from(self.settings)
        """The limits, breakers and retry budget in force; None when `tether.yaml` has none."""
        self.store: Store = open_store(self.db_url)
        # The key file is made only once the database opened: a bad --db must not
        # leave a key file beside some other file.
        if self.store.signs_heads:
            self.store.record_key = _config.record_key(self.db_url, env)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- setup --------------------------------------------------------------------

    def register(self, *capabilities: C) -> C:
        """Make capabilities callable through this app; returns the first one.

        Raises:
            UsageError: not a capability, or its name and version are taken.
        """
        if not capabilities:
            raise UsageError("register() needs at least one capability")
        ttl = self.settings.idempotency.claim_ttl
        for cap in capabilities:
            timeout = getattr(cap, "timeout", None)  # checked by add() below
            if timeout is not None and timeout > ttl:
                raise UsageError(
                    f"capability {cap.name!r}: its timeout {timeout} is longer than "
                    f"idempotency.claim_ttl ({ttl}), so a retry could take its key over "
                    "while it still runs; shorten the timeout or raise claim_ttl"
                )
            self.capabilities.add(cap)
        return capabilities[0]

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
        ttl = settings.idempotency.claim_ttl
        too_slow = [
            c.name
            for c in self.capabilities
            if c.timeout is not None and c.timeout > ttl
        ]
        if too_slow:
            logger.warning(
                "policy.reload_failed",
                extra={
                    "tether.config": str(watched.path),
                    "tether.error": f"idempotency.claim_ttl {ttl} is shorter than the "
                    f"timeout of {', '.join(too_slow)}; the last good settings stay",
                },
            )
            return
        fresh = _policy_from(settings, version, has_file=watched)
        self.policy = self.policy.replace(
            rules=fresh.rules, defaults=fresh.defaults, version=version
        )
        self.guards = _guards_from(settings)
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

        The header holds the run, its chain head and the declarations of the
        capabilities it called, so the file can be checked and replayed elsewhere.

        Raises:
            NotFound: no such run.
        """
        row = self.store.get_run(run_id)
        events = self.store.events(row.run_id)
        names = sorted({str(e.data().get("capability")) for e in events} - {"None"})
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
                "policy_version": self.policy.version,
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
        self.store.close()

    def __enter__(self) -> Tether:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Run:
    """One agent task from request to outcome; every step goes through `call`.

    Made by `Tether.run`; open it with `with` (or `async with`). Leaving the block
    normally ends the run `succeeded`; leaving it with an exception ends it
    `failed`, recording the error's code.
    """

    def __init__(
        self,
        app: Tether,
        *,
        principal: Principal,
        request: str,
        context: dict[str, Any],
        budget: Decimal | int | None = None,
    ) -> None:
        self.app = app
        self.id = self.run_id = app.ids.new_id("run_")
        self.principal = principal
        self.request = request
        self.context: Mapping[str, Any] = context
        self.status = RunState.PENDING
        self.steps = 0
        self._numbers = itertools.count(1)
        self.clock = app.clock
        self.store = app.store
        self.retention = app.settings.idempotency.retention
        self.claim_ttl = app.settings.idempotency.claim_ttl
        self.cost = Decimal(0)
        """Sum of the run's executed step costs."""
        self.budget = plan.as_budget(budget)
        """The most the run's plans may cost; None: no budget (see `admit`)."""
        self.charges_before_claim = False
        """The store takes the claim before it reserves limits or asks the breaker,
        in one transaction, so a finished call's retry is answered from its key
        and never charged or refused: no lookup is needed first (see gateway.step)."""
        self.random = app.random
        self.pool = app._thread_pool
        self._upcoming: tuple[plan.StepLike, ...] = ()
        """The steps a planner means to take after the current one (stashed with it)."""
        self._epoch = 1
        self._head_seq = 0
        self._head_hash = record.genesis(self.id)
        self._pending: list[Batch] = []
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.status.value}>"

    # -- RunPort ---------------------------------------------------------------------

    @property
    def policy(self) -> PolicySet:
        """The app's policy in force now (a changed `tether.yaml` applies at the next step)."""
        app = self.app
        return app.policy if app._config_file is None else app.current_policy()

    @property
    def guards(self) -> gateway.Guards | None:
        """The limits, breakers and retry budget in force (read after `policy`)."""
        return self.app.guards

    def next_step(self) -> int:
        """Return the next step number (from 1)."""
        # next() on a count is atomic under the GIL: no lock on the hot path.
        self.steps = number = next(self._numbers)
        return number

    def commit(
        self,
        events: Sequence[record.Event],
        *,
        claim: Claim | None = None,
        key_update: KeyUpdate | None = None,
        keep_on_failure: bool = False,
        reserve: Sequence[Reserve] = (),
        breaker: BreakerAdmit | None = None,
        throttle: bool = True,
        settle: Sequence[Settle] = (),
        breaker_outcome: BreakerOutcome | None = None,
        retry: RetryCharge | None = None,
        step: int = 0,
    ) -> gateway.StoreOp:
        """Return the effect that appends `events` (and a key claim or update) to the record."""
        batch = Batch(
            run_id=self.id,
            events=events,
            claim=claim,
            key_update=key_update,
            at=events[-1].at,
            reserve=reserve,
            breaker=breaker,
            throttle=throttle,
            settle=settle,
            breaker_outcome=breaker_outcome,
            retry=retry,
            step=step,
        )
        return gateway.StoreOp(self._commit, batch, keep_on_failure)

    def has_pending(self) -> bool:
        """Tell whether a result write failed and waits to be retried."""
        return bool(self._pending)

    def flush_pending(self) -> None:
        """Write the results kept after failed writes.

        Raises:
            StoreError: the store still fails; the results stay kept.
        """
        with self._lock:
            while self._pending:
                self._write(self._pending[0])
                self._pending.pop(0)

    def _commit(self, batch: Batch, keep_on_failure: bool = False) -> Committed:
        with self._lock:
            if self.status in FINAL_STATES:
                raise UsageError(
                    f"run {self.id} is {self.status.value}; its record takes no more "
                    "events (a step still running when the run ended cannot record)"
                )
            try:
                if self._pending:
                    self.flush_pending()
                return self._write(batch)
            except StoreError as exc:
                if isinstance(exc, LeaseLost):
                    raise
                if keep_on_failure:
                    # A step that already acted keeps its result until the store
                    # takes it; the next write on this run retries it first.
                    self._pending.append(batch)
                    raise StoreError(
                        f"{exc.message}; the step ran: its result is kept and is "
                        "written first on this run's next write"
                    ) from exc
                raise StoreError(f"{exc.message}; nothing ran after it") from exc

    def _write(self, batch: Batch) -> Committed:
        # The chain head and epoch are read at write time: a batch kept after a
        # failed write extends whatever the head is when it is retried.
        batch.epoch = self._epoch
        batch.base_seq = self._head_seq
        batch.base_hash = self._head_hash
        committed = self.store.commit(batch)
        if committed.conflict is None:
            self._head_seq, self._head_hash = committed.head_seq, committed.head_hash
        return committed

    # -- lifecycle ---------------------------------------------------------------------

    def _start(self) -> Batch:
        check_transition(self.status, RunState.EXECUTING)
        now = self.clock.now()
        started = record.RunStarted(
            at=now,
            request=self.request,
            principal=self.principal.describe(),
            context=dict(self.context),
        )
        new_run = NewRun(
            tenant=self.principal.tenant,
            principal_id=self.principal.id,
            request=self.request,
            status=RunState.EXECUTING.value,
            created_at=now,
        )
        return self._moving(RunState.EXECUTING, now, started, new_run=new_run)

    def _finish(self, error: BaseException | None) -> Batch:
        target = RunState.SUCCEEDED if error is None else RunState.FAILED
        check_transition(self.status, target)
        now = self.clock.now()
        code = message = None
        if isinstance(error, TetherError):
            code, message = error.code, error.message
        elif error is not None:
            code, message = "internal", type(error).__name__
        finished = record.RunFinished(
            at=now, status=target.value, error_code=code, message=message
        )
        batch = self._moving(target, now, after=finished)
        batch.error_code = code
        return batch

    def _moving(
        self,
        target: RunState,
        now: datetime,
        *before: record.Event,
        after: record.Event | None = None,
        new_run: NewRun | None = None,
    ) -> Batch:
        moved = record.RunStatus(
            at=now, previous=self.status.value, status=target.value
        )
        events = [*before, moved, *([after] if after else [])]
        return Batch(
            run_id=self.id, events=events, at=now, status=target.value, new_run=new_run
        )

    def _apply(self, batch: Batch) -> None:
        self._commit(batch)
        assert batch.status is not None
        self.status = RunState(batch.status)

    def _log_lost(self) -> None:
        if self._pending:
            logger.error(
                "step.result_lost",
                extra={"tether.run_id": self.id, "tether.results": len(self._pending)},
            )

    def transition(self, target: RunState) -> None:
        """Move the run to `target`, recording a `run_status` event.

        Raises:
            IllegalTransition: the lifecycle forbids the move.
            StoreError: the event could not be written; the status is unchanged.
        """
        if target in FINAL_STATES:
            raise UsageError(
                f"end a run by leaving its `with` block, not with transition({target.value!r})"
            )
        check_transition(self.status, target)
        self._apply(self._moving(target, self.clock.now()))

    def append(self, *events: record.Event) -> None:
        """Append events that no step writes (a proposed plan, say) to the record.

        Raises:
            StoreError: the events could not be written.
        """
        if events:
            self._commit(Batch(run_id=self.id, events=events, at=events[-1].at))

    def admit(self, steps: Sequence[plan.StepLike]) -> plan.Admission:
        """Check a whole plan before its first step runs, and record the answer.

        Every step is checked as the gateway would check it when its turn
        came (the capability exists, its args validate, policy's decision),
        and the plan's estimated cost against what is left of the run's
        budget. Nothing runs; one `plan_admitted` event is recorded.
        Preconditions are left to each step, since they read live state.

        Args:
            steps: `PlanStep`s or `(capability, args[, rationale])` tuples, in order.

        Returns:
            The `Admission`: `admitted`, `needs_approval` or `refused`, with
            what was found for each step.

        Raises:
            UsageError: the run is not open, or a step is malformed.
            StoreError: the `plan_admitted` event could not be written.

        Example:
            ```python
            admission = run.admit([("net.ping", {"host": "db-1"})])
            print(admission.status)
            #> admitted
            ```
        """
        if self.status is RunState.PENDING or self.status in FINAL_STATES:
            raise UsageError(
                f"run {self.id} is {self.status.value}; admit plans inside "
                "`with app.run(...) as run:`"
            )
        admission = plan.admit(
            plan.as_steps(steps),
            capabilities=self.app.capabilities,
            policy=self.policy,
            principal=self.principal,
            context=self.context,
            steps_taken=self.steps,
            cost=self.cost,
            budget=self.budget,
            at=self.clock.now(),
        )
        self.append(admission.to_event())
        return admission

    def __enter__(self) -> Run:
        self._apply(self._start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.status in FINAL_STATES or self.status is RunState.DEGRADED:
            return  # a degraded run stays parked, to be resumed
        try:
            self._apply(self._finish(exc))
        except StoreError:
            self._log_lost()
            if exc is None:
                raise
            # The body's error is the one the caller needs; the store's is secondary.

    async def __aenter__(self) -> Run:
        await anyio.to_thread.run_sync(self._apply, self._start())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.status in FINAL_STATES or self.status is RunState.DEGRADED:
            return  # a degraded run stays parked, to be resumed
        try:
            await anyio.to_thread.run_sync(self._apply, self._finish(exc))
        except StoreError:
            self._log_lost()
            if exc is None:
                raise

    # -- steps ---------------------------------------------------------------------------

    def _resolve(self, capability: str | Capability[Any, Any]) -> Capability[Any, Any]:
        if self.status is RunState.DEGRADED:
            raise UsageError(
                f"run {self.id} is degraded: an open breaker parked it with its "
                "remaining plan (see its plan_stashed event); resume it once the "
                "breaker has closed"
            )
        if self.status is not RunState.EXECUTING:
            raise UsageError(
                f"run {self.id} is {self.status.value}; call steps inside "
                "`with app.run(...) as run:`"
            )
        if isinstance(capability, Capability):
            return self.app.capabilities.get(capability.name, capability.version)
        return self.app.capabilities.get(capability)

    def step(
        self,
        capability: str | Capability[Any, Any],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> Outcome:
        """Take one step and return its `Outcome` (refusals and failures included).

        Raises:
            UsageError: the run is not open, or the handler is async and this
                thread runs an event loop (use `astep`).
            NotFound: no capability by that name.
            StoreError: the record could not be written; nothing ran after a failed
                intent write.
        """
        cap = self._resolve(capability)
        handler = cap.dry_run_handler if dry_run else cap.handler
        if handler is not None and handler.is_async and _loop_running():
            raise UsageError(
                f"{cap.name} is async and an event loop is running here; "
                "use `await run.acall(...)`"
            )
        flow = gateway.step(
            self,
            cap,
            {} if args is None else args,
            key=idempotency_key,
            dry_run=dry_run,
        )
        outcome = gateway.drive(flow)
        if _stashes(outcome):
            self._stash(outcome, cap, args, idempotency_key)
        return outcome

    async def astep(
        self,
        capability: str | Capability[Any, Any],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> Outcome:
        """Take one step without blocking the event loop; see `step`."""
        cap = self._resolve(capability)
        flow = gateway.step(
            self,
            cap,
            {} if args is None else args,
            key=idempotency_key,
            dry_run=dry_run,
        )
        outcome = await gateway.adrive(flow)
        if _stashes(outcome):
            await anyio.to_thread.run_sync(
                self._stash, outcome, cap, args, idempotency_key
            )
        return outcome

    def _stash(
        self,
        outcome: Outcome,
        cap: Capability[Any, Any],
        args: object,
        key: str | None,
    ) -> None:
        """Park the run `degraded` with the refused step and the plan after it."""
        error = outcome.error
        assert isinstance(error, BreakerOpen)
        try:
            first = plan.PlanStep(
                capability=cap.name,
                args=cap.dump_args(cap.validate_args(args or {}))[0],
                idempotency_key=key or outcome.idempotency_key,
            )
        except TetherError:
            first = plan.PlanStep(capability=cap.name, args={})
        steps = [first, *plan.as_steps(self._upcoming)]
        now = self.clock.now()
        stashed = record.PlanStashed(
            at=now,
            breaker=error.breaker_id,
            reason=error.message,
            steps=tuple(
                {
                    "capability": s.capability,
                    "args": dict(s.args),
                    "idempotency_key": s.idempotency_key,
                }
                for s in steps
            ),
        )
        self._apply(self._moving(RunState.DEGRADED, now, stashed))

    def charge_usage(
        self,
        cost: Decimal | int,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        model: str | None = None,
    ) -> None:
        """Charge a planner's model usage to the run's budgets, as capability `llm`.

        Usage has happened when it is reported: it is charged even past a
        budget's end (recorded as it is), and the next step's reservation is
        the one refused.

        Raises:
            UsageError: the cost is a float or negative.
            StoreError: the charge could not be written.
        """
        amount = plan.as_budget(cost)
        assert amount is not None
        guards = self.app.guards
        settles = (
            []
            if guards is None or not guards.limits
            else guards.limits.charges(
                principal=self.principal,
                run_id=self.id,
                cost=amount,
                now=self.clock.now(),
            )
        )
        charged = record.UsageCharged(
            at=self.clock.now(),
            cost=amount,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            model=model,
            limits=tuple(s.limit_id for s in settles),
        )
        self._commit(
            Batch(run_id=self.id, events=[charged], at=charged.at, settle=settles)
        )
        self.cost += amount

    @overload
    def call(
        self,
        capability: Capability[Any, Out],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> Out: ...
    @overload
    def call(
        self,
        capability: str,
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> BaseModel: ...
    def call(
        self,
        capability: str | Capability[Any, Any],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> BaseModel:
        """Call a capability through the gateway and return its output.

        Args:
            capability: its name (or the capability object, for a typed result).
            args: a mapping, a model instance or JSON text.
            idempotency_key: a retry with the same key and args returns the stored
                result without running again, from any process.
            dry_run: run the dry-run handler instead of the real one.

        Raises:
            ValidationFailed: the args do not match the input schema.
            Refused: a precondition, policy, limit or key in use said no
                (`Denied`, `ApprovalRequired`, `KeyInUse`, ...).
            IdempotencyConflict: the key was used with other args.
            CapabilityFailed: the handler raised (retry under the same key).
            InDoubt: a `none` capability started and failed: a person must check.
        """
        return self.step(
            capability, args, idempotency_key=idempotency_key, dry_run=dry_run
        ).unwrap()

    @overload
    async def acall(
        self,
        capability: Capability[Any, Out],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> Out: ...
    @overload
    async def acall(
        self,
        capability: str,
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> BaseModel: ...
    async def acall(
        self,
        capability: str | Capability[Any, Any],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> BaseModel:
        """Call a capability without blocking the event loop; see `call`."""
        outcome = await self.astep(
            capability, args, idempotency_key=idempotency_key, dry_run=dry_run
        )
        return outcome.unwrap()


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


def _stashes(outcome: Outcome) -> bool:
    error = outcome.error
    return isinstance(error, BreakerOpen) and error.mode == "stash"


def _guards_from(settings: _config.Settings) -> gateway.Guards | None:
    guards = gateway.Guards(
        limits=LimitSet(settings.limits, default_ttl=settings.idempotency.claim_ttl),
        breakers=BreakerSet(settings.breakers),
        retry=settings.retry_budget,
    )
    return guards if guards else None


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
