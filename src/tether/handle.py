"""A run's handle: the `Run` a caller steps through, with its lifecycle and record.

Made by `Tether.run`; `call`/`acall` take steps through the gateway, and the
run's state machine (`tether.run`) is checked at every transition.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio.to_thread
from pydantic import BaseModel

from tether import _canonical, gateway, plan, record
from tether._approval_stage import requested_event
from tether._chain import StoredEvent
from tether._guards import after
from tether._run_writer import RunWriter
from tether._stages import call_secrets
from tether._units import parse_duration
from tether.capability import Capability, Effect, Idempotency
from tether.errors import (
    ApprovalRequired,
    BreakerOpen,
    LeaseLost,
    LimitExceeded,
    NotFound,
    RunAborted,
    StoreError,
    TetherError,
    UsageError,
)
from tether.limits import RUN_BUDGET
from tether.policy import PolicySet
from tether.principal import Principal
from tether.record import Outcome
from tether.run import FINAL_STATES, RunState, check_transition
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Claim,
    Committed,
    KeyUpdate,
    NewRun,
    RunRow,
)
from tether.store._breakers import BreakerAdmit, BreakerOutcome
from tether.store._limits import Reserve, RetryCharge, Settle, to_us

if TYPE_CHECKING:
    from tether.app import Tether

__all__ = ["ABORTED_CODE", "IN_DOUBT_RULE", "Run", "cut_off_step"]

logger = logging.getLogger("tether.app")

_PARKED = frozenset({RunState.DEGRADED, RunState.AWAITING_APPROVAL})
"""States a run leaves its `with` block in, to be resumed (not ended)."""

_STEP_ENDS = frozenset({"executed", "failed", "in_doubt", "idempotent_hit"})

IN_DOUBT_RULE = "in_doubt"
"""The rule id of an approval request for a step whose outcome is unknown."""

ABORTED_CODE = "aborted"
"""The error code of a run a person stopped (`Tether.abort`), in its `run_finished`."""

_REASON_SHOWN = 500
"""Characters of an abort's reason that `RunAborted`'s message quotes."""

Out = TypeVar("Out", bound=BaseModel)


def cut_off_step(events: Sequence[Mapping[str, Any]]) -> tuple[int, str] | None:
    """Return the step (number, capability) whose intent is recorded and end is not.

    Its writer died mid-call (or still runs it, if the run was taken from it).
    """
    cut: tuple[int, str] | None = None
    for data in events:
        kind = data["kind"]
        if kind == "intent":
            cut = (int(data["step"]), str(data["capability"]))
        elif cut is not None and kind in _STEP_ENDS and data.get("step") == cut[0]:
            cut = None
    return cut


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
        self.approval_ttl = app.settings.approvals.ttl
        self.cost = Decimal(0)
        """Sum of the run's executed step costs."""
        self.budget = plan.as_budget(budget)
        """The most the run's plans may cost; None: no budget (see `admit`)."""
        self.charges_before_claim = False
        """The store takes the claim before it reserves limits or asks the breaker,
        in one transaction, so a finished call's retry is answered from its key
        and never charged or refused: no lookup is needed first (see gateway.step)."""
        self.random = app.random
        self.full_counters = app.full_counters
        self.pool = app._thread_pool
        self._upcoming: tuple[plan.StepLike, ...] = ()
        """The steps a planner means to take after the current one (stashed with it)."""
        self._writer = RunWriter(self.store, self.id, self.clock, self.claim_ttl)
        self._resumed = False
        """Made by `resumed`: entering its `with` block creates nothing."""
        self.planner: str | None = None
        """The registered planner driving the run, recorded when it starts."""
        self.max_steps: int | None = None
        """The most steps its planner may take, recorded when it starts (None: no planner)."""
        self._in_doubt_on_resume: (
            tuple[record.InDoubtRecorded, record.ApprovalRequested, ApprovalRow] | None
        ) = None
        """A `none` step its dead writer cut off: in doubt, and a request, on entering."""

    @classmethod
    def resumed(cls, app: Tether, row: RunRow, events: Sequence[StoredEvent]) -> Run:
        """Rebuild a parked run's handle from its row and record, under the row's epoch.

        The caller took the run over first (`Store.take_over`): this handle's
        writes carry the new epoch, and an older writer's are refused.
        """
        started = events[0].data()
        who = started["principal"]
        budget = started.get("budget")  # None in records older than it
        run = cls(
            app,
            principal=Principal(
                who["id"],
                roles=who.get("roles", ()),
                scopes=who.get("scopes", ()),
                tenant=who.get("tenant", "default"),
                on_behalf_of=who.get("on_behalf_of"),
            ),
            request=row.request,
            context=dict(started.get("context") or {}),
            budget=None if budget is None else Decimal(budget),
        )
        run.max_steps = started.get("max_steps")
        run.id = run.run_id = row.run_id
        run.status = RunState(row.status)
        run._writer = RunWriter(
            app.store,
            row.run_id,
            app.clock,
            run.claim_ttl,
            epoch=row.epoch,
            head=(row.head_seq, row.head_hash),
        )
        last = 0
        validated: dict[int, dict[str, Any]] = {}
        decoded = [ev.data() for ev in events]
        for data in decoded:
            step = data.get("step") or 0
            last = max(last, step)
            kind = data["kind"]
            if kind == "validated":
                validated[step] = data
            # A planner's model usage counts toward the budget too.
            if (
                kind == "executed" and not data.get("dry_run")
            ) or kind == "usage_charged":
                run.cost += Decimal(data.get("cost") or 0)
        run.steps = last
        run._numbers = itertools.count(last + 1)
        run._resumed = True
        cut = cut_off_step(decoded)
        if cut is not None:
            run._cut_off(cut[0], cut[1], validated.get(cut[0], {}))
        return run

    def _cut_off(
        self, number: int, capability: str, validated: Mapping[str, Any]
    ) -> None:
        """Settle a step its dead writer left between intent and result.

        A step that is safe to repeat (`keyed`, `native`, a read) keeps its
        number, so the planner's proposal of it again runs under the same
        derived key (`run_id/step`) and the upstream's dedup holds. A `none`
        write is never run again on its own: it is recorded in doubt and goes
        to a person as an approval request saying its outcome is unknown; the
        run parks until they answer. Approved, the planner proposes it again
        (a person checked it did not happen); denied or expired, the planner
        is told it is in doubt and goes on.
        """
        try:
            cap: Capability[Any, Any] | None = self.app.capabilities.get(capability)
        except NotFound:
            cap = None
        safe = cap is not None and (
            cap.idempotency is not Idempotency.NONE or cap.effect is Effect.READ
        )
        if safe:
            self.steps = number - 1
            self._numbers = itertools.count(number)
            return
        now = self.clock.now()
        why = (
            f"{capability} step {number}: the process running it died mid-call; its "
            "outcome is unknown. Approve to run it again (you checked it did not "
            "happen); deny to leave it"
        )
        args = dict(validated.get("args") or {})
        request = ApprovalRow(
            id=self.app.ids.new_id("apr_"),
            run_id=self.id,
            step=number,
            tenant=self.principal.tenant,
            principal_id=self.principal.id,
            on_behalf_of=self.principal.on_behalf_of,
            capability=capability,
            version=str(validated.get("version", "")),
            args=_canonical.dumps(args),
            preview=None,
            digest=hashlib.sha256(
                f"tether-in-doubt\x00{self.id}\x00{number}".encode()
            ).digest(),
            policy_version=self.policy.version,
            rule_ids=(IN_DOUBT_RULE,),
            reasons=(why,),
            approvers=(),
            status=ApprovalStatus.PENDING,
            created_at=now,
            expires_at=now + self.approval_ttl,
        )
        self._in_doubt_on_resume = (
            record.InDoubtRecorded(
                at=now,
                step=number,
                duration_us=0,
                error_type="WriterLost",
                message=why,
            ),
            requested_event(request, args, None),
            request,
        )

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

    def new_id(self, prefix: str) -> str:
        """Return a new unique id from the app's id source."""
        return self.app.ids.new_id(prefix)

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
        approval: ApprovalRow | None = None,
        use_grant: str | None = None,
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
            approval=approval,
            use_grant=use_grant,
        )
        return gateway.StoreOp(self._commit, batch, keep_on_failure)

    def has_pending(self) -> bool:
        """Tell whether a result write failed and waits to be retried."""
        return self._writer.has_pending()

    def flush_pending(self) -> None:
        """Settle what failed writes owe: look at one that may have landed, write kept results.

        Raises:
            StoreError: the store still fails; the results stay kept.
        """
        self._writer.flush_pending()

    def _commit(self, batch: Batch, keep_on_failure: bool = False) -> Committed:
        with self._writer.lock:
            if self.status in FINAL_STATES:
                raise UsageError(
                    f"run {self.id} is {self.status.value}; its record takes no more "
                    "events (a step still running when the run ended cannot record)"
                )
            try:
                return self._writer.commit(batch, keep_on_failure=keep_on_failure)
            except LeaseLost as exc:
                why = self._why_aborted()
                if why is None:
                    raise  # another writer resumed it: not ours to say more
                # Final: leaving the `with` block writes nothing more.
                self.status = RunState.ABORTED
                raise RunAborted(why) from exc

    def _why_aborted(self) -> str | None:
        """Say who aborted the run and why, if a person did (None: not aborted).

        `Tether.abort` takes the run over and ends it in one transaction
        (`Store.abort_run`): a write its new epoch refused finds the run
        aborted already; one refused by a worker that resumed the run finds
        it unended.
        """
        try:
            if self.store.get_run(self.id).status != RunState.ABORTED.value:
                return None
            events = self.store.events(self.id)
        except StoreError:
            return None  # the lease message is all that can be said
        said = next(
            (
                data
                for data in (e.data() for e in reversed(events))
                if data["kind"] == "run_status"
            ),
            {},
        )
        who = said.get("by") or "someone"
        reason = str(said.get("reason") or "")
        if len(reason) > _REASON_SHOWN:  # the record keeps it whole
            reason = reason[: _REASON_SHOWN - 1] + "…"
        why = f": {reason}" if reason else ""
        return (
            f"run {self.id} was aborted by {who}{why}; this process may write "
            "nothing more to it (steps stop, the run stays aborted)"
        )

    # -- lifecycle ---------------------------------------------------------------------

    def _start(self) -> Batch:
        check_transition(self.status, RunState.EXECUTING)
        now = self.clock.now()
        started = record.RunStarted(
            at=now,
            request=self.request,
            principal=self.principal.describe(),
            context=dict(self.context),
            planner=self.planner,
            budget=self.budget,
            max_steps=self.max_steps,
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
        kept = self._writer.kept()
        if kept:
            logger.error(
                "step.result_lost",
                extra={"tether.run_id": self.id, "tether.results": kept},
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
        if not self._resumed:
            self._apply(self._start())
        elif self._in_doubt_on_resume is not None:
            doubt, asked, request = self._in_doubt_on_resume
            self._in_doubt_on_resume = None
            self._commit(
                Batch(
                    run_id=self.id, events=[doubt, asked], at=doubt.at, approval=request
                )
            )
            self._apply(self._moving(RunState.AWAITING_APPROVAL, doubt.at))
        if self.status not in FINAL_STATES and self.status not in _PARKED:
            self.app._keeper.hold(self._writer)  # a step may outlast the claim TTL
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.app._keeper.release(self._writer)
        if self.status in FINAL_STATES or self.status in _PARKED:
            return  # a parked run stays parked, to be resumed
        try:
            self._apply(self._finish(exc))
        except StoreError:
            self._log_lost()
            if exc is None:
                raise
            # The body's error is the one the caller needs; the store's is secondary.

    async def __aenter__(self) -> Run:
        return await anyio.to_thread.run_sync(self.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.app._keeper.release(self._writer)
        if self.status in FINAL_STATES or self.status in _PARKED:
            return  # a parked run stays parked, to be resumed
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
        timeout: float | timedelta | None = None,
    ) -> Outcome:
        """Take one step and return its `Outcome` (refusals and failures included).

        `timeout` is the most, in seconds, the caller waits for the handler (as
        for `call`).

        Raises:
            UsageError: the run is not open, the timeout is not a positive
                number of seconds, or the handler is async and this thread runs
                an event loop (use `astep`).
            NotFound: no capability by that name.
            StoreError: the record could not be written; nothing ran after a failed
                intent write.
        """
        cap = self._resolve(capability)
        # What may run: a dry run's handler (a read without one runs its real
        # one); else the real one, or the dry-run one (required by policy, or
        # an approval request's preview).
        preview = cap.dry_run_handler
        if dry_run:
            is_async = (preview or cap.handler).is_async
        else:
            is_async = cap.handler.is_async or (
                preview is not None and preview.is_async
            )
        if is_async and _loop_running():
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
            deadline=_deadline(timeout),
        )
        outcome = gateway.drive(flow)
        if outcome.error is not None:
            self._after_refusal(outcome, cap, args, idempotency_key)
        return outcome

    async def astep(
        self,
        capability: str | Capability[Any, Any],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109  # recorded with the step; a cancel scope cannot stop a handler thread
    ) -> Outcome:
        """Take one step without blocking the event loop; see `step`."""
        cap = self._resolve(capability)
        flow = gateway.step(
            self,
            cap,
            {} if args is None else args,
            key=idempotency_key,
            dry_run=dry_run,
            deadline=_deadline(timeout),
        )
        outcome = await gateway.adrive(flow)
        if outcome.error is not None:  # the store is only touched after a refusal
            await anyio.to_thread.run_sync(
                self._after_refusal, outcome, cap, args, idempotency_key
            )
        return outcome

    def _after_refusal(
        self,
        outcome: Outcome,
        cap: Capability[Any, Any],
        args: object,
        key: str | None,
    ) -> None:
        """Park a run a stash-mode breaker refused; announce a new approval request."""
        error = outcome.error
        if isinstance(error, BreakerOpen) and error.mode == "stash":
            self._stash(outcome, cap, args, key)
        elif (
            isinstance(error, ApprovalRequired)
            and error.created
            and error.approval_id is not None
            and self.app.webhook is not None
        ):
            self.app.notify(
                "approval.requested", self.store.get_approval(error.approval_id)
            )

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
        later = plan.as_steps(self._upcoming)
        now = self.clock.now()
        stashed = record.PlanStashed(
            at=now,
            breaker=error.breaker_id,
            reason=error.message,
            steps=(
                self._stashable(cap.name, args or {}, key or outcome.idempotency_key),
                *(
                    self._stashable(s.capability, dict(s.args), s.idempotency_key)
                    for s in later
                ),
            ),
        )
        self._apply(self._moving(RunState.DEGRADED, now, stashed))

    def _stashable(
        self, capability: str, args: object, key: str | None
    ) -> dict[str, Any]:
        """Return a stashed step as the record keeps it: its args as a step records them.

        Secrets are masked, as everywhere in the record, so the step is marked
        `secrets`: resuming cannot take it from the record, and hands it back
        to the planner. Args that do not validate are not kept (nothing says
        which of them are secret).
        """
        kept: dict[str, Any] = {
            "capability": capability,
            "args": {},
            "idempotency_key": key,
        }
        try:
            cap = self._resolve(capability)
            validated = cap.validate_args(args)
            kept["args"], args_bytes = cap.dump_args(validated)
        except TetherError:
            return kept
        if call_secrets(cap, validated, args_bytes):  # a free-form field's too
            kept["secrets"] = True
        return kept

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
            UsageError: the cost is a float or negative, a token count is not
                an int from 0, or the model is not text.
            StoreError: the charge could not be written.
        """
        amount = plan.as_budget(cost)
        assert amount is not None
        plan.check_token_count(input_tokens, "input_tokens")
        plan.check_token_count(output_tokens, "output_tokens")
        if model is not None and not isinstance(model, str):
            raise UsageError(f"usage model must be text, got {model!r:.80}")
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

    def check_turn_room(self) -> None:
        """Refuse the planner's next turn when model usage has no room left.

        A turn's cost is known only after it (the model reports it), so it
        cannot be reserved as a step's is: a turn is taken while every budget
        in `tether.yaml` that model usage is charged to (capability `llm`) has
        something left, and the run's own budget too. The turn that overruns
        is charged in full; no turn follows it. Without this a refused step
        goes back to the planner, whose every new turn costs more.

        Raises:
            LimitExceeded: a budget is spent; one run-level `limit_refused`
                event names it (the run's own budget as `run budget`).
            StoreError: the budget could not be read, or the refusal written.
        """
        now = self.clock.now()
        refused: record.LimitRefused | None = None
        retry_after_us = 0
        if self.budget is not None and self.cost >= self.budget:
            refused = record.LimitRefused(
                at=now,
                limit=RUN_BUDGET,
                limit_kind="budget",
                scope=self.id,
                cap=self.budget,
                used=self.cost,
                requested=Decimal(0),
                left=Decimal(0),
            )
        # The policy first: a changed tether.yaml (a budget raised, say) applies
        # at a turn as at a step, and a run refused here takes no step to load it.
        _ = self.policy
        guards = self.app.guards
        if refused is None and guards is not None and guards.limits:
            at = to_us(now)
            for b in guards.limits.model_budgets(
                principal=self.principal, run_id=self.id, now=now
            ):
                row = self.store.limit_row(b.limit.id, b.scope, b.window, now)
                cap = b.limit.amount or Decimal(0)
                if row is None or row.used + row.held < cap:
                    continue
                retry_after_us = b.window + b.length_us - at if b.length_us else 0
                refused = record.LimitRefused(
                    at=now,
                    limit=b.limit.id,
                    limit_kind="budget",
                    scope=b.scope,
                    cap=cap,
                    used=row.used,
                    held=row.held,
                    requested=Decimal(0),
                    left=Decimal(0),
                    retry_after_us=retry_after_us,
                )
                break
        if refused is None:
            return
        self.append(refused)
        then = ""
        if retry_after_us:
            then = f"; its window turns {after(retry_after_us / 1e6)}"
        whose = (
            "the run's own budget"
            if refused.limit == RUN_BUDGET
            else f"budget {refused.limit!r} (scope {refused.scope})"
        )
        raise LimitExceeded(
            f"run {self.id}: {whose} is spent ({refused.used + refused.held} of "
            f"{refused.cap}, model usage included), so the planner is not asked "
            f"again{then}; raise the budget, or start the task again later",
            limit_id=refused.limit,
            left=Decimal(0),
            retry_after=retry_after_us / 1e6 if retry_after_us else None,
        )

    @overload
    def call(
        self,
        capability: Capability[Any, Out],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        timeout: float | timedelta | None = None,
    ) -> Out: ...
    @overload
    def call(
        self,
        capability: str,
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        timeout: float | timedelta | None = None,
    ) -> BaseModel: ...
    def call(
        self,
        capability: str | Capability[Any, Any],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        timeout: float | timedelta | None = None,
    ) -> BaseModel:
        """Call a capability through the gateway and return its output.

        Args:
            capability: its name (or the capability object, for a typed result).
            args: a mapping, a model instance or JSON text.
            idempotency_key: a retry with the same key and args returns the stored
                result without running again, from any process.
            dry_run: run the dry-run handler instead of the real one.
            timeout: the most, in seconds, this caller waits for the handler
                (its deadline): it shortens the capability's own timeout for
                this call, never lengthens it, and is recorded with the step.
                A call past it ends as one past the capability's timeout does
                (`StepTimeout`, or `InDoubt` for a `none` write that started).

        Raises:
            ValidationFailed: the args do not match the input schema.
            Refused: a precondition, policy, limit or key in use said no
                (`Denied`, `ApprovalRequired`, `KeyInUse`, ...).
            IdempotencyConflict: the key was used with other args.
            CapabilityFailed: the handler raised (retry under the same key).
            InDoubt: a `none` capability started and failed: a person must check.
        """
        return self.step(
            capability,
            args,
            idempotency_key=idempotency_key,
            dry_run=dry_run,
            timeout=timeout,
        ).unwrap()

    @overload
    async def acall(
        self,
        capability: Capability[Any, Out],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109  # recorded with the step; a cancel scope cannot stop a handler thread
    ) -> Out: ...
    @overload
    async def acall(
        self,
        capability: str,
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109  # recorded with the step; a cancel scope cannot stop a handler thread
    ) -> BaseModel: ...
    async def acall(
        self,
        capability: str | Capability[Any, Any],
        args: Mapping[str, Any] | BaseModel | str | bytes | None = None,
        *,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109  # recorded with the step; a cancel scope cannot stop a handler thread
    ) -> BaseModel:
        """Call a capability without blocking the event loop; see `call`."""
        outcome = await self.astep(
            capability,
            args,
            idempotency_key=idempotency_key,
            dry_run=dry_run,
            timeout=timeout,
        )
        return outcome.unwrap()


def _deadline(timeout: float | timedelta | None) -> timedelta | None:
    """Return a caller's `timeout` as a deadline, checked (None: none given).

    Raises:
        UsageError: not a positive, finite number of seconds (or timedelta).
    """
    if timeout is None:
        return None
    try:
        return parse_duration(timeout)
    except ValueError as exc:
        raise UsageError(
            f"timeout must be a positive number of seconds or a timedelta ({exc})"
        ) from None


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
