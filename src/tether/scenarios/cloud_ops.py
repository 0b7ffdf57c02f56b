"""The `cloud-ops` scenario: an agent remediates a latency incident on a service fleet.

A simulated fleet (checkout, payments, search) runs in memory. Deploy v2.4.1
of checkout shrank its database pool, so checkout's p99 latency is far over
its SLO. The scripted agent confirms the symptom, reads the logs, tries a
restart (which does not help: the bad config comes back with the pods),
previews the rollback with a dry run, rolls back, checks that latency
recovered and reports on the incident ticket. Every step goes through the
gateway: typed, checked, recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tether.agent import ProposedStep, ScriptedPlanner
from tether.app import Tether
from tether.capability import capability
from tether.policy import RulesConfig, RuleSet
from tether.principal import Principal

__all__ = [
    "CONTEXT",
    "DESCRIPTION",
    "NAME",
    "PRINCIPAL",
    "TICKET",
    "CommentRequest",
    "CommentResult",
    "Fleet",
    "LogLine",
    "LogMatches",
    "LogQuery",
    "MetricsQuery",
    "MetricsReport",
    "RestartRequest",
    "RestartResult",
    "RollbackRequest",
    "RollbackResult",
    "build_app",
    "incident_request",
    "scripted_planner",
]

NAME = "cloud-ops"
DESCRIPTION = (
    "checkout latency incident: a change outside the incident held by policy, "
    "a bad deploy, a restart that does not help, "
    "a dry-run rollback, the rollback, verification and a ticket note"
)
TICKET = "INC-4821"
"""The incident ticket the scenario's agent works on."""

PRINCIPAL = Principal(
    "ops-bot",
    roles=["sre-agent"],
    scopes=[
        "deploy:rollback",
        "k8s:restart",
        "logs:read",
        "metrics:read",
        "tickets:write",
    ],
    tenant="acme",
    on_behalf_of="oncall:dana",
)
"""The on-call agent, acting for the engineer on call."""

CONTEXT = {
    "scenario": NAME,
    "environment": "production",
    "ticket": TICKET,
    "incident_service": "checkout",
}
"""Recorded with the run; policies may match on it."""

POLICY = """
rules:
  - id: changes-outside-the-incident-need-a-human
    match: {effect: [write, destructive]}
    when: >-
      has(args.service) && has(context.incident_service)
      && args.service != context.incident_service
    decision: require_approval
    reason: the agent may change only the service its incident is about
"""
"""The scenario's rules, in `tether.yaml` form: installed by `build_app`."""

ServiceName = Annotated[
    str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$", description="Service name.")
]
Version = Annotated[str, Field(pattern=r"^v\d+\.\d+\.\d+$", examples=["v2.4.0"])]
Reason = Annotated[
    str, Field(min_length=3, max_length=500, description="Why, for the audit trail.")
]

# -- models -------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricsQuery(_Model):
    """Which service's golden signals to read, over which window."""

    service: ServiceName
    window_minutes: int = Field(default=15, ge=1, le=1440)


class MetricsReport(_Model):
    """Latency and error rate of a service over the window."""

    service: str
    version: str
    window_minutes: int
    latency_p50_ms: int = Field(ge=0)
    latency_p99_ms: int = Field(ge=0)
    error_rate_pct: Decimal = Field(ge=0, le=100, decimal_places=2)
    slo_p99_ms: int = Field(ge=0)
    within_slo: bool


class LogQuery(_Model):
    """A case-insensitive text search over a service's recent logs."""

    service: ServiceName
    query: str = Field(min_length=1, max_length=200)
    limit: int = Field(default=20, ge=1, le=200)


class LogLine(_Model):
    """One log line."""

    at: datetime
    level: Literal["DEBUG", "INFO", "WARN", "ERROR"]
    message: str


class LogMatches(_Model):
    """The newest matching lines, oldest first."""

    service: str
    query: str
    matched: int = Field(ge=0)
    lines: list[LogLine]


class RestartRequest(_Model):
    """Restart every pod of a service (a rolling restart)."""

    service: ServiceName
    reason: Reason


class RestartResult(_Model):
    """The restart's result."""

    service: str
    version: str
    restarted_pods: int = Field(ge=0)
    restarts_total: int = Field(ge=0)


class RollbackRequest(_Model):
    """Roll a service back to the version deployed before the current one."""

    service: ServiceName
    reason: Reason
    expected_version: Version | None = None
    """Refuse unless the service still runs this version (a guard against races)."""


class RollbackResult(_Model):
    """What the rollback did (or, in a dry run, would do)."""

    service: str
    from_version: str
    to_version: str
    replicas: int = Field(ge=0)
    applied: bool
    """False for a dry run: nothing changed."""


class CommentRequest(_Model):
    """Add a comment to an incident ticket."""

    ticket_id: str = Field(pattern=r"^INC-\d{1,9}$")
    body: str = Field(min_length=1, max_length=4000)


class CommentResult(_Model):
    """The comment as the ticket system stored it."""

    ticket_id: str
    comment_id: str
    comments_total: int = Field(ge=1)


# -- the simulated world ------------------------------------------------------------

_T0 = datetime(2026, 1, 1, 14, 0, tzinfo=UTC)


@dataclass(slots=True, kw_only=True)
class _Service:
    # Mutable on purpose: this is the simulated world the capabilities act on.
    name: str
    history: list[str]
    """Deployed versions, oldest first; the last one runs."""
    replicas: int
    p50_ms: int
    p99_ms: int
    error_rate_pct: Decimal
    slo_p99_ms: int
    bad_versions: frozenset[str] = frozenset()
    restarts: int = 0
    logs: list[LogLine] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.history[-1]

    @property
    def degraded(self) -> bool:
        return self.version in self.bad_versions


class Fleet:
    """The simulated services, their logs and the incident tickets, in memory.

    The world has its own clock (a minute per action, from 14:00 UTC on the day
    of the incident), so its outputs are the same on every run.
    """

    __slots__ = ("_minute", "services", "tickets")

    def __init__(self) -> None:
        self._minute = 20
        self.services: dict[str, _Service] = {
            "checkout": _Service(
                name="checkout",
                history=["v2.3.9", "v2.4.0", "v2.4.1"],
                replicas=6,
                p50_ms=48,
                p99_ms=180,
                error_rate_pct=Decimal("0.12"),
                slo_p99_ms=300,
                bad_versions=frozenset({"v2.4.1"}),
            ),
            "payments": _Service(
                name="payments",
                history=["v1.9.2", "v1.9.3"],
                replicas=4,
                p50_ms=35,
                p99_ms=210,
                error_rate_pct=Decimal("0.05"),
                slo_p99_ms=400,
            ),
            "search": _Service(
                name="search",
                history=["v3.1.0"],
                replicas=8,
                p50_ms=22,
                p99_ms=95,
                error_rate_pct=Decimal("0.01"),
                slo_p99_ms=150,
            ),
        }
        self.tickets: dict[str, list[str]] = {TICKET: []}
        checkout = self.services["checkout"]
        checkout.logs.extend(
            [
                _line(1, "INFO", "deploy v2.4.1 started (6 pods, rolling)"),
                _line(2, "INFO", "deploy v2.4.1 complete: db.pool.max_size 50 -> 10"),
                _line(
                    4,
                    "WARN",
                    "db pool exhausted: waited 1840ms for a connection (10/10)",
                ),
                _line(
                    6, "ERROR", "POST /cart/checkout timed out after 2500ms (db pool)"
                ),
                _line(9, "WARN", "db pool exhausted: waited 2210ms for a connection"),
                _line(12, "ERROR", "POST /cart/checkout timed out after 2500ms"),
                _line(15, "INFO", "GET /healthz 200 in 3ms"),
            ]
        )

    def _tick(self) -> datetime:
        self._minute += 1
        return _T0 + timedelta(minutes=self._minute)

    def service(self, name: str) -> _Service:
        """Return a service by name (callers check it exists first)."""
        return self.services[name]

    def metrics(self, name: str, window_minutes: int) -> MetricsReport:
        """Return a service's golden signals as they are now."""
        svc = self.services[name]
        p50, p99, errors = svc.p50_ms, svc.p99_ms, svc.error_rate_pct
        if svc.degraded:
            p50, p99, errors = 640, 2350, Decimal("4.20")
        return MetricsReport(
            service=name,
            version=svc.version,
            window_minutes=window_minutes,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            error_rate_pct=errors,
            slo_p99_ms=svc.slo_p99_ms,
            within_slo=p99 <= svc.slo_p99_ms,
        )

    def restart(self, name: str) -> RestartResult:
        """Restart a service's pods; its version (and any bad config) stays."""
        svc = self.services[name]
        svc.restarts += 1
        svc.logs.append(
            LogLine(
                at=self._tick(),
                level="INFO",
                message=f"rolling restart: {svc.replicas}/{svc.replicas} pods "
                f"ready on {svc.version}",
            )
        )
        return RestartResult(
            service=name,
            version=svc.version,
            restarted_pods=svc.replicas,
            restarts_total=svc.restarts,
        )

    def rollback(self, name: str, *, apply: bool) -> RollbackResult:
        """Roll back to the previous version, or (`apply=False`) say what would happen."""
        svc = self.services[name]
        current, previous = svc.history[-1], svc.history[-2]
        if apply:
            svc.history.pop()
            svc.logs.append(
                LogLine(
                    at=self._tick(),
                    level="INFO",
                    message=f"rollback {current} -> {previous} complete "
                    f"({svc.replicas} pods)",
                )
            )
        return RollbackResult(
            service=name,
            from_version=current,
            to_version=previous,
            replicas=svc.replicas,
            applied=apply,
        )

    def comment(self, ticket_id: str, body: str) -> CommentResult:
        """Add a comment to a ticket."""
        comments = self.tickets[ticket_id]
        comments.append(body)
        return CommentResult(
            ticket_id=ticket_id,
            comment_id=f"{ticket_id}-c{len(comments)}",
            comments_total=len(comments),
        )


def _line(minute: int, level: Literal["INFO", "WARN", "ERROR"], text: str) -> LogLine:
    return LogLine(at=_T0 + timedelta(minutes=minute), level=level, message=text)


# -- capabilities -------------------------------------------------------------------


def build_app(app: Tether, *, fleet: Fleet | None = None) -> None:
    """Register the scenario's capabilities on `app`, acting on `fleet` (default: a fresh one).

    Raises:
        UsageError: the app already has capabilities by these names.

    Example:
        ```python
        fleet = Fleet()
        build_app(app, fleet=fleet)
        ```
    """
    world = Fleet() if fleet is None else fleet

    def service_exists(
        args: MetricsQuery | LogQuery | RestartRequest | RollbackRequest,
    ) -> bool | str:
        if args.service in world.services:
            return True
        known = ", ".join(sorted(world.services))
        return f"no service {args.service!r}; known: {known}"

    def has_previous_version(args: RollbackRequest) -> bool | str:
        history = world.service(args.service).history
        if len(history) >= 2:
            return True
        return (
            f"{args.service} has no earlier version than {history[-1]} to roll back to"
        )

    def runs_expected_version(args: RollbackRequest) -> bool | str:
        running = world.service(args.service).version
        if args.expected_version is None or args.expected_version == running:
            return True
        return f"{args.service} runs {running}, not {args.expected_version}"

    def ticket_exists(args: CommentRequest) -> bool | str:
        return args.ticket_id in world.tickets or f"no ticket {args.ticket_id!r}"

    @capability(
        "metrics.query",
        effect="read",
        preconditions=[service_exists],
        scopes=["metrics:read"],
        resource="prometheus",
    )
    def query_metrics(args: MetricsQuery) -> MetricsReport:
        """Read a service's p50/p99 latency and error rate over a window."""
        return world.metrics(args.service, args.window_minutes)

    @capability(
        "logs.search",
        effect="read",
        preconditions=[service_exists],
        scopes=["logs:read"],
        resource="loki",
    )
    def search_logs(args: LogQuery) -> LogMatches:
        """Search a service's recent logs for a text (case-insensitive)."""
        needle = args.query.lower()
        found = [
            line
            for line in world.service(args.service).logs
            if needle in line.message.lower() or needle == line.level.lower()
        ]
        return LogMatches(
            service=args.service,
            query=args.query,
            matched=len(found),
            lines=found[-args.limit :],
        )

    @capability(
        "service.restart",
        effect="write",
        idempotency="keyed",
        preconditions=[service_exists],
        scopes=["k8s:restart"],
        timeout=timedelta(seconds=30),
        resource="k8s",
    )
    def restart_service(args: RestartRequest) -> RestartResult:
        """Restart every pod of a service, one at a time."""
        return world.restart(args.service)

    def preview_rollback(args: RollbackRequest) -> RollbackResult:
        return world.rollback(args.service, apply=False)

    @capability(
        "deploy.rollback",
        effect="destructive",
        dry_run=preview_rollback,
        preconditions=[service_exists, has_previous_version, runs_expected_version],
        scopes=["deploy:rollback"],
        timeout=timedelta(seconds=60),
        resource="k8s",
    )
    def rollback_deploy(args: RollbackRequest) -> RollbackResult:
        """Roll a service back to the version deployed before the current one."""
        return world.rollback(args.service, apply=True)

    @capability(
        "ticket.comment",
        effect="write",
        preconditions=[ticket_exists],
        scopes=["tickets:write"],
        resource="ticketing",
    )
    def comment_ticket(args: CommentRequest) -> CommentResult:
        """Add a comment to an incident ticket."""
        return world.comment(args.ticket_id, args.body)

    app.register(
        query_metrics, search_logs, restart_service, rollback_deploy, comment_ticket
    )
    rules = RulesConfig.model_validate(yaml.safe_load(POLICY)).rules
    app.add_policy(RuleSet(rules, id=NAME))


def incident_request() -> str:
    """Return the incident, as the pager put it to the agent."""
    return (
        f"{TICKET}: checkout p99 latency is far above its 300 ms SLO since about "
        "14:02 UTC. Find the cause and remediate."
    )


def scripted_planner() -> ScriptedPlanner:
    """Return the scripted agent that remediates the incident, step by step."""
    checkout = {"service": "checkout"}
    return ScriptedPlanner(
        [
            ("metrics.query", checkout, "confirm the symptom"),
            (
                "logs.search",
                {"service": "checkout", "query": "pool"},
                "look for the cause in the logs",
            ),
            (
                "service.restart",
                {"service": "payments", "reason": f"{TICKET}: it shares the db pool"},
                "payments shares the pool; restart it too (policy stops this)",
            ),
            (
                "service.restart",
                {"service": "checkout", "reason": f"{TICKET}: clear stuck db pools"},
                "a restart is the cheapest fix to try first",
            ),
            ("metrics.query", checkout, "did the restart help?"),
            ProposedStep(
                capability="deploy.rollback",
                args={
                    "service": "checkout",
                    "reason": f"{TICKET}: v2.4.1 shrank the db pool",
                    "expected_version": "v2.4.1",
                },
                rationale="preview the rollback before doing it",
                dry_run=True,
            ),
            (
                "deploy.rollback",
                {
                    "service": "checkout",
                    "reason": f"{TICKET}: v2.4.1 shrank the db pool",
                    "expected_version": "v2.4.1",
                },
                "the restart did not help; the deploy is the cause",
            ),
            ("metrics.query", checkout, "verify that latency recovered"),
            (
                "ticket.comment",
                {
                    "ticket_id": TICKET,
                    "body": (
                        "Cause: checkout v2.4.1 cut db.pool.max_size from 50 to 10; "
                        "requests queued for connections. A restart did not help. "
                        "Rolled back to v2.4.0; p99 is back within the 300 ms SLO."
                    ),
                },
                "tell the humans what happened",
            ),
        ],
        answer="checkout rolled back from v2.4.1 to v2.4.0; p99 latency is back "
        "within its SLO and the ticket has the details",
    )
