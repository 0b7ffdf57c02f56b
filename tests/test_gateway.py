"""The one call path, stage by stage, through the sync and the async driver."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, Field, SecretStr

import tether
from tether import record
from tether.record import Outcome, OutcomeStatus
from tether.store import KeyId, KeyState


class HostIn(BaseModel, extra="forbid"):
    host: str = Field(min_length=1)


class HostOut(BaseModel):
    host: str
    up: bool


class BigOut(BaseModel):
    n: int


class Calls:
    """Counts handler calls per capability name."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.contexts: list[tether.CallContext] = []

    def hit(self, name: str) -> None:
        self.n[name] = self.n.get(name, 0) + 1


@pytest.fixture
def calls() -> Calls:
    return Calls()


def kinds(app: tether.Tether, run_id: str, step: int | None = None) -> list[str]:
    """Return the event kinds of a run (of one step, if given), in order."""
    out = []
    for e in app.store.events(run_id):
        data = e.data()
        if step is None or data.get("step") == step:
            out.append(data["kind"])
    return out


def take(run: tether.Run, mode: str, *args: Any, **kwargs: Any) -> Outcome:
    """Take one step through the driver the test's mode names."""
    if mode == "sync":
        return run.step(*args, **kwargs)
    return anyio.run(partial(run.astep, *args, **kwargs))


@pytest.fixture
def ops(app: tether.Tether, calls: Calls) -> tether.Tether:
    """The app with a read, a keyed write, a none write and an async read registered."""

    @tether.capability("net.ping", effect="read")
    def ping(args: HostIn) -> HostOut:
        calls.hit("net.ping")
        return HostOut(host=args.host, up=True)

    @tether.capability("net.aping", effect="read")
    async def aping(args: HostIn) -> HostOut:
        calls.hit("net.aping")
        await asyncio.sleep(0)
        return HostOut(host=args.host, up=True)

    @tether.capability("host.reboot", effect="write", idempotency="keyed")
    def reboot(args: HostIn, ctx: tether.CallContext) -> HostOut:
        calls.hit("host.reboot")
        calls.contexts.append(ctx)
        return HostOut(host=args.host, up=False)

    @tether.capability("host.wipe", effect="write", idempotency="none")
    def wipe(args: HostIn) -> HostOut:
        calls.hit("host.wipe")
        return HostOut(host=args.host, up=False)

    app.register(ping, aping, reboot, wipe)
    return app


class TestReadStep:
    def test_read_step_returns_output_and_records_three_stages(
        self, ops: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """A read step returns its output and records validated, decided, executed."""
        with ops.run(principal=principal, request="ping") as run:
            outcome = take(run, mode, "net.ping", {"host": "db-1"})

        assert outcome.status is OutcomeStatus.EXECUTED
        assert outcome.output == HostOut(host="db-1", up=True)
        assert kinds(ops, run.id, step=1) == ["validated", "decided", "executed"]

    def test_async_handler_runs_under_both_drivers(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls, mode: str
    ) -> None:
        """An async handler serves sync `step` and async `astep` alike."""
        with ops.run(principal=principal, request="ping") as run:
            outcome = take(run, mode, "net.aping", {"host": "db-1"})

        assert outcome.output == HostOut(host="db-1", up=True)
        assert calls.n == {"net.aping": 1}

    def test_sync_call_of_async_handler_inside_a_loop_is_a_usage_error(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """Calling an async capability with `call` inside a running loop says to use `acall`."""

        async def main() -> None:
            with ops.run(principal=principal, request="ping") as run:
                run.call("net.aping", {"host": "db-1"})

        with pytest.raises(tether.UsageError, match="acall"):
            asyncio.run(main())

    def test_typed_call_by_capability_object_returns_its_model(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """Calling by capability object returns the capability's own output model."""
        cap = ops.capabilities.get("net.ping")
        with ops.run(principal=principal, request="ping") as run:
            out = run.call(cap, HostIn(host="db-2"))

        assert isinstance(out, HostOut)
        assert out.host == "db-2"


class TestValidation:
    def test_bad_args_are_refused_before_anything_runs(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls, mode: str
    ) -> None:
        """Args that break the schema give `ValidationFailed` naming the field; nothing runs."""
        with ops.run(principal=principal, request="ping") as run:
            outcome = take(run, mode, "net.ping", {"host": ""})

        assert outcome.status is OutcomeStatus.INVALID
        assert isinstance(outcome.error, tether.ValidationFailed)
        assert "host" in outcome.error.message
        assert calls.n == {}
        assert kinds(ops, run.id, step=1) == ["failed"]

    def test_unknown_capability_names_the_registered_ones(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """An unknown capability name raises `NotFound` listing what is registered."""
        with (
            ops.run(principal=principal, request="x") as run,
            pytest.raises(tether.NotFound, match=r"net\.ping"),
        ):
            run.call("net.pong", {"host": "a"})

    def test_invalid_output_is_caught(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """A handler returning data that breaks its output schema gives `InvalidOutput`."""

        @tether.capability("net.broken", effect="read")
        def broken(args: HostIn) -> HostOut:
            return {"host": args.host}  # type: ignore[return-value]  # the bug under test

        app.register(broken)
        with app.run(principal=principal, request="x") as run:
            outcome = take(run, mode, "net.broken", {"host": "a"})

        assert isinstance(outcome.error, tether.InvalidOutput)
        failed = [
            e.data() for e in app.store.events(run.id) if e.data()["kind"] == "failed"
        ]
        assert failed[0]["stage"] == "output"


class TestPreconditions:
    def test_failed_precondition_refuses_with_its_reason(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """A precondition returning a reason refuses the step with that reason."""
        ran = []

        def not_prod(args: HostIn) -> bool | str:
            return (
                "production hosts are off limits"
                if args.host.startswith("prod")
                else True
            )

        @tether.capability("host.drain", effect="write", preconditions=[not_prod])
        def drain(args: HostIn) -> HostOut:
            ran.append(args.host)
            return HostOut(host=args.host, up=False)

        app.register(drain)
        with app.run(principal=principal, request="drain") as run:
            refused = take(run, mode, "host.drain", {"host": "prod-1"})
            allowed = take(run, mode, "host.drain", {"host": "dev-1"})

        assert isinstance(refused.error, tether.PreconditionFailed)
        assert "off limits" in refused.error.message
        assert allowed.status is OutcomeStatus.EXECUTED
        assert ran == ["dev-1"]
        checked = [
            e.data()
            for e in app.store.events(run.id)
            if e.data()["kind"] == "precondition_checked"
        ]
        assert checked[0]["failed"] == "not_prod"
        assert checked[1]["failed"] is None


@dataclass
class RulePolicy:
    """A Python policy that gives `verdict` for one capability."""

    id: str
    capability: str
    verdict: tether.Verdict

    def evaluate(self, request: tether.DecisionRequest) -> tether.Decision | None:
        if request.capability != self.capability:
            return None
        return tether.Decision(
            verdict=self.verdict, rule_ids=(self.id,), reasons=(f"{self.id} says so",)
        )


class TestPolicy:
    def test_deny_stops_the_step_with_rule_ids(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls, mode: str
    ) -> None:
        """A deny raises `Denied` carrying the rule ids and reasons; nothing runs."""
        ops.add_policy(RulePolicy("no-wipes", "host.wipe", tether.Verdict.DENY))
        with ops.run(principal=principal, request="wipe") as run:
            outcome = take(run, mode, "host.wipe", {"host": "a"})

        assert isinstance(outcome.error, tether.Denied)
        assert outcome.error.rule_ids == ("no-wipes",)
        assert calls.n == {}
        decided = [
            e.data() for e in ops.store.events(run.id) if e.data()["kind"] == "decided"
        ]
        assert decided[0]["verdict"] == "deny"
        assert decided[0]["rule_ids"] == ["no-wipes"]

    def test_deny_overrides_allow_and_approval(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """With several policies the strictest verdict wins: deny over approval over allow."""
        ops.add_policy(RulePolicy("ok", "host.wipe", tether.Verdict.ALLOW))
        ops.add_policy(RulePolicy("ask", "host.wipe", tether.Verdict.REQUIRE_APPROVAL))
        ops.add_policy(RulePolicy("never", "host.wipe", tether.Verdict.DENY))
        with (
            ops.run(principal=principal, request="wipe") as run,
            pytest.raises(tether.Denied) as caught,
        ):
            run.call("host.wipe", {"host": "a"})

        assert caught.value.rule_ids == ("never",)

    def test_require_approval_parks_the_step(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls
    ) -> None:
        """`require_approval` stops the step with `ApprovalRequired`; nothing runs."""
        ops.add_policy(
            RulePolicy("ask", "host.reboot", tether.Verdict.REQUIRE_APPROVAL)
        )
        with (
            ops.run(principal=principal, request="reboot") as run,
            pytest.raises(tether.ApprovalRequired),
        ):
            run.call("host.reboot", {"host": "a"})

        assert calls.n == {}

    def test_dry_run_only_runs_the_dry_run_handler(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """`dry_run_only` runs the dry-run handler instead and says so in the outcome."""
        acted = []

        def preview(args: HostIn) -> HostOut:
            return HostOut(host=args.host, up=True)

        @tether.capability("host.destroy", effect="destructive", dry_run=preview)
        def destroy(args: HostIn) -> HostOut:
            acted.append(args.host)
            return HostOut(host=args.host, up=False)

        app.register(destroy)
        app.add_policy(
            RulePolicy("preview", "host.destroy", tether.Verdict.DRY_RUN_ONLY)
        )
        with app.run(principal=principal, request="destroy") as run:
            outcome = take(run, mode, "host.destroy", {"host": "a"})

        assert outcome.dry_run
        assert outcome.output == HostOut(host="a", up=True)
        assert acted == []
        assert kinds(app, run.id, step=1) == ["validated", "decided", "executed"]

    def test_python_policy_needs_id_and_evaluate(self, app: tether.Tether) -> None:
        """Registering an object that is not a policy is a usage error."""
        with pytest.raises(tether.UsageError, match="evaluate"):
            app.add_policy(object())  # type: ignore[arg-type]  # the misuse under test


class TestWriteStep:
    def test_intent_is_durable_before_the_handler_runs(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """The `intent` event is in the store when the handler starts."""
        seen: list[list[str]] = []

        @tether.capability("host.tag", effect="write")
        def tag(args: HostIn, ctx: tether.CallContext) -> HostOut:
            seen.append([e.data()["kind"] for e in app.store.events(ctx.run_id)])
            return HostOut(host=args.host, up=True)

        app.register(tag)
        with app.run(principal=principal, request="tag") as run:
            take(run, mode, "host.tag", {"host": "a"})

        assert seen[0][-1] == "intent"
        assert kinds(app, run.id, step=1) == [
            "validated",
            "decided",
            "intent",
            "executed",
        ]

    def test_keyed_capability_gets_a_derived_key_from_run_and_step(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls
    ) -> None:
        """A keyed call without a key runs under `<run id>/<step>`, passed to the handler."""
        with ops.run(principal=principal, request="reboot") as run:
            run.call("host.reboot", {"host": "a"})
            run.call("host.reboot", {"host": "a"}, idempotency_key="given")

        assert [c.idempotency_key for c in calls.contexts] == [f"{run.id}/1", "given"]
        assert [c.step for c in calls.contexts] == [1, 2]
        assert calls.contexts[0].run_id == run.id

    def test_keyed_failure_is_retryable_under_the_same_key(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """A keyed handler that raises gives `CapabilityFailed`; a retry runs again."""
        attempts = []

        @tether.capability("host.flaky", effect="write", idempotency="keyed")
        def flaky(args: HostIn, ctx: tether.CallContext) -> HostOut:
            attempts.append(ctx.idempotency_key)
            if len(attempts) == 1:
                raise ConnectionError("upstream reset the connection")
            return HostOut(host=args.host, up=True)

        app.register(flaky)
        with app.run(principal=principal, request="x") as run:
            first = take(run, mode, "host.flaky", {"host": "a"}, idempotency_key="k1")
            second = take(run, mode, "host.flaky", {"host": "a"}, idempotency_key="k1")

        assert isinstance(first.error, tether.CapabilityFailed)
        assert "ConnectionError: upstream reset the connection" in first.error.message
        assert second.status is OutcomeStatus.EXECUTED
        assert attempts == ["k1", "k1"]

    def test_none_failure_is_in_doubt(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """A `none` write that raises after starting is in doubt and records `in_doubt`."""

        @tether.capability("pay.send", effect="write", idempotency="none")
        def send(args: HostIn) -> HostOut:
            raise TimeoutError("gateway timed out")

        app.register(send)
        with app.run(principal=principal, request="x") as run:
            outcome = take(run, mode, "pay.send", {"host": "a"})

        assert outcome.status is OutcomeStatus.IN_DOUBT
        assert isinstance(outcome.error, tether.InDoubt)
        # With no limits, no `limit_settled` (older records' empty one still
        # replays: tests/test_in_doubt_record.py).
        assert kinds(app, run.id, step=1)[-2:] == ["intent", "in_doubt"]


class TestTimeout:
    def test_sync_handler_past_its_timeout_is_a_step_timeout(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """A handler that overruns its timeout gives `StepTimeout` within the timeout."""
        release = threading.Event()

        @tether.capability("net.hang", effect="read", timeout=0.05)
        def hang(args: HostIn) -> HostOut:
            release.wait(5)
            return HostOut(host=args.host, up=True)

        app.register(hang)
        try:
            with app.run(principal=principal, request="x") as run:
                outcome = take(run, mode, "net.hang", {"host": "a"})
        finally:
            release.set()

        assert isinstance(outcome.error, tether.StepTimeout)
        assert isinstance(outcome.error, TimeoutError)
        # Still running, it may still spend; with no limits there is no
        # settling to record.
        assert kinds(app, run.id, step=1)[-2:] == ["decided", "failed"]

    def test_none_write_past_its_timeout_is_in_doubt(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A `none` write that times out is in doubt, never retried by itself."""
        release = threading.Event()

        @tether.capability("pay.slow", effect="write", timeout=0.05)
        def slow(args: HostIn) -> HostOut:
            release.wait(5)
            return HostOut(host=args.host, up=True)

        app.register(slow)
        try:
            with (
                app.run(principal=principal, request="x") as run,
                pytest.raises(tether.InDoubt, match="timeout"),
            ):
                run.call("pay.slow", {"host": "a"})
        finally:
            release.set()


class TestRunLifecycle:
    def test_run_ends_succeeded_and_records_its_transitions(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """A run left normally ends `succeeded`, with each transition recorded."""
        with ops.run(principal=principal, request="ping") as run:
            run.call("net.ping", {"host": "a"})

        statuses = [
            (e.data()["previous"], e.data()["status"])
            for e in ops.store.events(run.id)
            if e.data()["kind"] == "run_status"
        ]
        assert statuses == [("pending", "executing"), ("executing", "succeeded")]
        assert ops.store.get_run(run.id).status == "succeeded"
        assert run.status is tether.RunState.SUCCEEDED

    def test_run_left_with_an_error_ends_failed_with_its_code(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """A run whose block raises ends `failed`, recording the error's code."""
        ops.add_policy(RulePolicy("no", "host.wipe", tether.Verdict.DENY))
        with (
            pytest.raises(tether.Denied),
            ops.run(principal=principal, request="wipe") as run,
        ):
            run.call("host.wipe", {"host": "a"})

        row = ops.store.get_run(run.id)
        assert (row.status, row.error_code) == ("failed", "policy_denied")

    def test_call_outside_the_block_is_a_usage_error(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """Calling a step on a run that is not open says how to open it."""
        run = ops.run(principal=principal, request="x")

        with pytest.raises(tether.UsageError, match=r"with app\.run"):
            run.call("net.ping", {"host": "a"})

    def test_illegal_transition_raises(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """Moving a run where its lifecycle forbids raises `IllegalTransition`."""
        with ops.run(principal=principal, request="x") as run:
            with pytest.raises(tether.IllegalTransition, match="degraded"):
                run.transition(tether.RunState.PENDING)
            run.transition(tether.RunState.PLANNING)

        assert run.status is tether.RunState.SUCCEEDED

    def test_async_with_opens_and_finishes_the_run(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """`async with app.run(...)` opens and ends the run like `with`."""

        async def main() -> tether.Run:
            async with ops.run(principal=principal, request="ping") as run:
                await run.acall("net.aping", {"host": "a"})
            return run

        run = asyncio.run(main())

        assert ops.store.get_run(run.id).status == "succeeded"
        assert ops.verify(run.id).ok


class TestMemoryStore:
    def test_memory_store_records_the_same_events(
        self, principal: tether.Principal
    ) -> None:
        """With `memory://` the record holds the same events and verifies."""
        app = tether.Tether(db="memory://", env={})

        @tether.capability("net.ping", effect="read")
        def ping(args: HostIn) -> HostOut:
            return HostOut(host=args.host, up=True)

        app.register(ping)
        with app.run(principal=principal, request="ping") as run:
            run.call("net.ping", {"host": "a"})

        assert kinds(app, run.id) == [
            "run_started",
            "run_status",
            "validated",
            "decided",
            "executed",
            "run_status",
            "run_finished",
        ]
        assert app.verify(run.id).ok


class TestKeyLookup:
    @pytest.mark.parametrize("lookup_first", [False, True])
    def test_lookup_and_claim_answer_alike(
        self,
        ops: tether.Tether,
        principal: tether.Principal,
        calls: Calls,
        lookup_first: bool,
    ) -> None:
        """With or without the lookup before the claim, a key answers hit, conflict alike."""
        with ops.run(principal=principal, request="reboot") as run:
            run.charges_before_claim = lookup_first
            first = run.step("host.reboot", {"host": "a"}, idempotency_key="k")
            again = run.step("host.reboot", {"host": "a"}, idempotency_key="k")
            other = run.step("host.reboot", {"host": "b"}, idempotency_key="k")

        assert first.status is OutcomeStatus.EXECUTED
        assert again.status is OutcomeStatus.IDEMPOTENT_HIT
        assert again.output == first.output
        assert isinstance(other.error, tether.IdempotencyConflict)
        assert calls.n == {"host.reboot": 1}
        assert kinds(ops, run.id, step=2) == ["validated", "decided", "idempotent_hit"]


class TestEdges:
    def test_dry_run_of_a_write_without_a_dry_run_handler_is_refused(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls
    ) -> None:
        """Asking a write with no dry-run handler for a dry run refuses; nothing acts."""
        with ops.run(principal=principal, request="x") as run:
            outcome = run.step("host.wipe", {"host": "a"}, dry_run=True)

        assert isinstance(outcome.error, tether.Denied)
        assert "no dry-run handler" in outcome.error.message
        assert calls.n == {}

    def test_dry_run_of_a_read_runs_the_read(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls
    ) -> None:
        """A read acts on nothing, so its dry run is the read itself, marked dry."""
        with ops.run(principal=principal, request="x") as run:
            outcome = run.step("net.ping", {"host": "a"}, dry_run=True)

        assert outcome.dry_run
        assert calls.n == {"net.ping": 1}

    def test_output_json_cannot_hold_is_invalid(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """An output with an integer beyond 64 bits cannot be recorded exactly: invalid."""

        @tether.capability("math.big", effect="read")
        def big(args: HostIn) -> BigOut:
            return BigOut(n=2**70)

        app.register(big)
        with app.run(principal=principal, request="x") as run:
            outcome = run.step("math.big", {"host": "a"})

        assert isinstance(outcome.error, tether.InvalidOutput)
        assert "exact JSON" in outcome.error.message

    def test_output_of_another_model_is_revalidated(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A handler returning a different model with the right fields gets its model."""

        class Lookalike(BaseModel):
            host: str
            up: bool

        @tether.capability("net.alias", effect="read")
        def alias(args: HostIn) -> HostOut:
            return Lookalike(host=args.host, up=True)  # type: ignore[return-value]  # under test

        app.register(alias)
        with app.run(principal=principal, request="x") as run:
            out = run.call("net.alias", {"host": "a"})

        assert type(out) is HostOut

    def test_long_error_messages_are_cut(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A handler error longer than 2000 characters is recorded cut, with an ellipsis."""

        @tether.capability("net.noisy", effect="read")
        def noisy(args: HostIn) -> HostOut:
            raise RuntimeError("x" * 5000)

        app.register(noisy)
        with app.run(principal=principal, request="x") as run:
            outcome = run.step("net.noisy", {"host": "a"})

        assert outcome.error is not None
        assert outcome.error.message.endswith("...")
        assert len(outcome.error.message) < 2100

    def test_usage_error_from_a_handler_reaches_the_caller_as_is(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A handler that misuses tether gets tether's own `UsageError` back, not a wrapper."""

        @tether.capability("net.misuse", effect="read")
        def misuse(args: HostIn) -> HostOut:
            raise tether.UsageError("handlers may not open runs")

        app.register(misuse)
        with (
            app.run(principal=principal, request="x") as run,
            pytest.raises(tether.UsageError, match="may not open runs"),
        ):
            run.call("net.misuse", {"host": "a"})


class TestDeadlinesAndCancellation:
    def test_timed_out_keyed_handler_keeps_its_key_claimed(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A keyed handler still running past its timeout keeps the key: a retry waits."""
        release = threading.Event()
        ran: list[str] = []

        @tether.capability(
            "host.slow", effect="write", idempotency="keyed", timeout=0.05
        )
        def slow(args: HostIn) -> HostOut:
            ran.append(args.host)
            release.wait(5)
            return HostOut(host=args.host, up=True)

        app.register(slow)
        try:
            with app.run(principal=principal, request="x") as run:
                first = run.step("host.slow", {"host": "a"}, idempotency_key="k")
                retry = run.step("host.slow", {"host": "a"}, idempotency_key="k")
        finally:
            release.set()

        assert isinstance(first.error, tether.StepTimeout)
        assert "may still be running" in first.error.message
        assert isinstance(retry.error, tether.KeyInUse)
        assert ran == ["a"]

    def test_handlers_own_timeout_error_is_a_failure_not_a_deadline(
        self, app: tether.Tether, principal: tether.Principal, mode: str
    ) -> None:
        """A `TimeoutError` the handler raises is its failure, with its own message."""

        @tether.capability("net.upstream", effect="read", timeout=5)
        def upstream(args: HostIn) -> HostOut:
            raise TimeoutError("upstream took too long")

        app.register(upstream)
        with app.run(principal=principal, request="x") as run:
            outcome = take(run, mode, "net.upstream", {"host": "a"})

        assert type(outcome.error) is tether.CapabilityFailed
        assert "upstream took too long" in outcome.error.message

    def test_cancelled_caller_still_records_the_outcome(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """Cancelling `acall` mid-handler records the step in doubt, then cancels."""
        started = asyncio.Event()

        @tether.capability("pay.send", effect="write", idempotency="none")
        async def send(args: HostIn) -> HostOut:
            started.set()
            await asyncio.sleep(60)
            return HostOut(host=args.host, up=True)

        app.register(send)

        async def main() -> tether.Run:
            async with app.run(principal=principal, request="x") as run:
                task = asyncio.create_task(run.acall("pay.send", {"host": "a"}))
                await started.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            return run

        run = asyncio.run(main())

        assert kinds(app, run.id, step=1)[-1] == "in_doubt"
        assert app.verify(run.id).ok

    def test_interrupted_sync_call_still_records_the_outcome(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """Ctrl-C in a sync `none` handler records the step in doubt, then interrupts."""

        @tether.capability("pay.send", effect="write", idempotency="none")
        def send(args: HostIn) -> HostOut:
            raise KeyboardInterrupt  # what Ctrl-C does mid-call in the caller's thread

        app.register(send)
        with (  # the run must end as the interruption leaves it
            pytest.raises(KeyboardInterrupt),
            app.run(principal=principal, request="x") as run,
        ):
            run.call("pay.send", {"host": "a"}, idempotency_key="k-1")
        key = app.store.lookup_key(
            KeyId(
                tenant=principal.tenant,
                principal_id=principal.id,
                capability="pay.send",
                key="k-1",
            )
        )

        assert kinds(app, run.id, step=1)[-1] == "in_doubt"
        assert key is not None
        assert key.state is KeyState.IN_DOUBT
        assert app.store.get_run(run.id).status == "failed"
        assert app.verify(run.id).ok


class CardIn(BaseModel):
    order: str
    card: SecretStr


class TestReviewFindings:
    def test_same_key_with_another_secret_is_a_conflict(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A changed secret argument makes other args: the key conflicts, nothing reruns."""
        charged: list[str] = []

        @tether.capability("pay.charge", effect="write", idempotency="keyed")
        def charge(args: CardIn) -> HostOut:
            charged.append(args.card.get_secret_value())
            return HostOut(host=args.order, up=True)

        app.register(charge)
        with app.run(principal=principal, request="x") as run:
            run.call(
                "pay.charge", {"order": "o-1", "card": "4111"}, idempotency_key="k"
            )
            other = run.step(
                "pay.charge", {"order": "o-1", "card": "5555"}, idempotency_key="k"
            )

        assert isinstance(other.error, tether.IdempotencyConflict)
        assert charged == ["4111"]

    def test_constructed_model_args_are_revalidated(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls
    ) -> None:
        """Args built with `model_construct()` are validated like any other input."""
        bad = HostIn.model_construct(host="")

        with ops.run(principal=principal, request="x") as run:
            outcome = run.step("net.ping", bad)

        assert isinstance(outcome.error, tether.ValidationFailed)
        assert calls.n == {}

    def test_a_policy_that_raises_denies_in_its_name(
        self, ops: tether.Tether, principal: tether.Principal, calls: Calls
    ) -> None:
        """A Python policy that raises fails closed: the step is denied by that policy."""

        class Broken:
            id = "broken-policy"

            def evaluate(
                self, request: tether.DecisionRequest
            ) -> tether.Decision | None:
                raise KeyError("amount")

        ops.add_policy(Broken())
        with ops.run(principal=principal, request="x") as run:
            outcome = run.step("net.ping", {"host": "a"})

        assert isinstance(outcome.error, tether.Denied)
        assert outcome.error.rule_ids == ("broken-policy",)
        assert calls.n == {}

    def test_a_cost_function_that_raises_refuses_the_step(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A cost function that raises refuses the step with a one-line usage error."""

        @tether.capability("net.costly", effect="read", cost=lambda a: 1 / 0)
        def costly(args: HostIn) -> HostOut:
            return HostOut(host=args.host, up=True)

        app.register(costly)
        with app.run(principal=principal, request="x") as run:
            outcome = run.step("net.costly", {"host": "a"})

        assert isinstance(outcome.error, tether.UsageError)
        assert "ZeroDivisionError" in outcome.error.message

    def test_a_stored_result_that_no_longer_fits_is_refused(
        self, app: tether.Tether, principal: tether.Principal
    ) -> None:
        """A result stored by an older version that breaks the new schema is refused."""

        @tether.capability("host.tag", effect="write", idempotency="keyed", version="1")
        def tag_v1(args: HostIn) -> HostOut:
            return HostOut(host=args.host, up=True)

        @tether.capability("host.tag", effect="write", idempotency="keyed", version="2")
        def tag_v2(args: HostIn) -> BigOut:
            return BigOut(n=1)

        app.register(tag_v1)
        with app.run(principal=principal, request="x") as run:
            run.call("host.tag", {"host": "a"}, idempotency_key="k")
        app.register(tag_v2)
        with app.run(principal=principal, request="y") as run:
            outcome = run.step("host.tag", {"host": "a"}, idempotency_key="k")

        assert isinstance(outcome.error, tether.IdempotencyConflict)
        assert "version 2" in outcome.error.message


class TestRunGuards:
    def test_context_that_cannot_be_recorded_is_a_usage_error(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """A run context holding a value JSON cannot keep exactly is refused at once."""
        with pytest.raises(tether.UsageError, match="context"):
            ops.run(principal=principal, request="x", context={"n": 2**70})

    def test_a_finished_run_takes_no_more_events(
        self, ops: tether.Tether, principal: tether.Principal
    ) -> None:
        """Once a run ended, nothing more is written to its record."""
        with ops.run(principal=principal, request="x") as run:
            run.call("net.ping", {"host": "a"})

        late = record.Failed(
            at=run.clock.now(),
            step=9,
            stage="execute",
            error_code="x",
            error_type="X",
            message="a step that outlived its run",
        )

        with pytest.raises(tether.UsageError, match="succeeded"):
            run.append(late)
        assert ops.verify(run.id).ok

    def test_timeout_longer_than_the_claim_is_refused_at_registration(
        self, app: tether.Tether
    ) -> None:
        """A timeout longer than the key claim's TTL could let a retry run alongside."""

        @tether.capability("net.slow", effect="read", timeout=3600)
        def slow(args: HostIn) -> HostOut:
            return HostOut(host=args.host, up=True)

        with pytest.raises(tether.UsageError, match="claim_ttl"):
            app.register(slow)
