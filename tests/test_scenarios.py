"""The built-in scenarios: the cloud-ops incident is remediated through the gateway."""

from __future__ import annotations

from typing import Any

import pytest

import tether
from tether.agent import run_agent
from tether.scenarios import SCENARIOS, cloud_ops
from tether.scenarios.cloud_ops import Fleet, MetricsReport
from tether.testing import temporary_app


@pytest.fixture
def fleet() -> Fleet:
    """A fresh simulated fleet."""
    return Fleet()


@pytest.fixture
def ops(app: tether.Tether, fleet: Fleet) -> tether.Tether:
    """The app with the cloud-ops capabilities acting on `fleet`."""
    cloud_ops.build_app(app, fleet=fleet)
    return app


def remediate(app: tether.Tether) -> tether.Run:
    """Run the scenario's scripted agent on the incident."""
    return run_agent(
        app,
        cloud_ops.scripted_planner(),
        principal=cloud_ops.PRINCIPAL,
        request=cloud_ops.incident_request(),
        context=cloud_ops.CONTEXT,
    )


def events(app: tether.Tether, run_id: str) -> list[dict[str, Any]]:
    """Return a run's events as dicts, in order."""
    return [e.data() for e in app.store.events(run_id)]


def checkout_metrics(app: tether.Tether) -> MetricsReport:
    """Read checkout's metrics in a run of its own."""
    with app.run(principal=cloud_ops.PRINCIPAL, request="check checkout") as run:
        out = run.call("metrics.query", {"service": "checkout"})
    assert isinstance(out, MetricsReport)
    return out


def test_incident_is_remediated_and_latency_recovers(
    ops: tether.Tether, fleet: Fleet
) -> None:
    """After the scripted run, checkout runs v2.4.0 and its p99 is back within the SLO."""
    before = checkout_metrics(ops)

    run = remediate(ops)

    after = checkout_metrics(ops)
    assert run.status is tether.RunState.SUCCEEDED
    assert (before.version, before.within_slo) == ("v2.4.1", False)
    assert (after.version, after.latency_p99_ms, after.within_slo) == (
        "v2.4.0",
        180,
        True,
    )
    assert fleet.tickets[cloud_ops.TICKET][0].startswith("Cause: checkout v2.4.1")


def test_rollback_is_previewed_then_executed_exactly_once(ops: tether.Tether) -> None:
    """The rollback runs once for real, after one dry run that changed nothing."""
    run = remediate(ops)

    evs = events(ops, run.id)
    steps = {e["step"]: e["capability"] for e in evs if e["kind"] == "validated"}
    rollbacks = [
        e
        for e in evs
        if e["kind"] == "executed" and steps[e["step"]] == "deploy.rollback"
    ]
    assert [(r["dry_run"], r["output"]["applied"]) for r in rollbacks] == [
        (True, False),
        (False, True),
    ]
    assert rollbacks[0]["output"]["to_version"] == "v2.4.0"


def test_restart_does_not_help_and_is_keyed(ops: tether.Tether, fleet: Fleet) -> None:
    """The restart is recorded under an idempotency key and latency stays high after it."""
    run = remediate(ops)

    evs = events(ops, run.id)
    intent = next(
        e for e in evs if e["kind"] == "intent" and e["capability"] == "service.restart"
    )
    assert intent["key"] == f"{run.id}/{intent['step']}"
    assert (
        ops.capabilities.get("service.restart").idempotency is tether.Idempotency.KEYED
    )
    recheck = next(
        e for e in evs if e["kind"] == "executed" and e["step"] == intent["step"] + 1
    )
    assert recheck["output"]["within_slo"] is False
    assert fleet.services["checkout"].restarts == 1


def test_a_retried_restart_under_its_key_restarts_nothing(
    ops: tether.Tether, fleet: Fleet
) -> None:
    """The same restart key from a second run returns the stored result."""
    args = {"service": "checkout", "reason": "INC-1: stuck"}
    for request in ("first", "retry"):
        with ops.run(principal=cloud_ops.PRINCIPAL, request=request) as run:
            outcome = run.step("service.restart", args, idempotency_key="inc-1")

    assert outcome.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert fleet.services["checkout"].restarts == 1


def test_rollback_without_an_earlier_version_is_refused(
    ops: tether.Tether, fleet: Fleet
) -> None:
    """Search has one version only, so its rollback fails a precondition and nothing runs."""
    with ops.run(principal=cloud_ops.PRINCIPAL, request="roll back search") as run:
        outcome = run.step("deploy.rollback", {"service": "search", "reason": "try it"})

    assert outcome.status is tether.OutcomeStatus.REFUSED
    assert isinstance(outcome.error, tether.PreconditionFailed)
    assert "no earlier version" in outcome.error.message
    assert fleet.services["search"].history == ["v3.1.0"]


def test_rollback_of_a_moved_service_is_refused(
    ops: tether.Tether, fleet: Fleet
) -> None:
    """A rollback guarded by `expected_version` is refused once the service moved on."""
    args = {"service": "checkout", "reason": "bad", "expected_version": "v2.4.0"}
    with ops.run(principal=cloud_ops.PRINCIPAL, request="roll back") as run:
        outcome = run.step("deploy.rollback", args)

    assert isinstance(outcome.error, tether.PreconditionFailed)
    assert "runs v2.4.1, not v2.4.0" in outcome.error.message
    assert fleet.services["checkout"].version == "v2.4.1"


def test_unknown_service_is_refused_before_any_handler_runs(ops: tether.Tether) -> None:
    """Asking about a service the fleet lacks is a precondition refusal naming the known ones."""
    with ops.run(principal=cloud_ops.PRINCIPAL, request="metrics") as run:
        outcome = run.step("metrics.query", {"service": "billing"})

    assert outcome.status is tether.OutcomeStatus.REFUSED
    assert outcome.error is not None
    assert "known: checkout, payments, search" in outcome.error.message


def test_inputs_are_strict(ops: tether.Tether) -> None:
    """Unknown fields and out-of-range values are refused by the input models."""
    with ops.run(principal=cloud_ops.PRINCIPAL, request="bad args") as run:
        extra = run.step("metrics.query", {"service": "checkout", "region": "eu"})
        window = run.step("metrics.query", {"service": "checkout", "window_minutes": 0})

    assert extra.status is window.status is tether.OutcomeStatus.INVALID


def test_the_scenario_record_verifies(ops: tether.Tether) -> None:
    """The scenario's run record verifies."""
    run = remediate(ops)

    assert ops.verify(run.id).ok


def test_registry_describes_cloud_ops_with_a_fresh_world_per_app(
    principal: tether.Principal,
) -> None:
    """`SCENARIOS["cloud-ops"]` sets up each app on its own fleet, so each demo starts broken."""
    scenario = SCENARIOS["cloud-ops"]
    statuses = []
    for _ in range(2):
        with temporary_app() as app:
            scenario.setup(app)
            run = scenario.run(app)
            statuses.append(run.status)

    assert scenario.name == "cloud-ops"
    assert scenario.description
    assert scenario.context["scenario"] == "cloud-ops"
    assert statuses == [tether.RunState.SUCCEEDED, tether.RunState.SUCCEEDED]
