"""What a policy decision costs: 100 tether.yaml rules against no rules and Cedar.

One policy of 100 rules over 30 capabilities (globs, role, tenant and
environment matches, CEL conditions on args, principal and run) is written
twice from one description: as `tether.yaml` and as Cedar policies, so both
say the same thing (the script checks that they decide every request alike).
A mix of requests that hit different rules is then decided, interleaved:

- `tether.rules100`: `PolicySet.decide(DecisionRequest)` under the 100 rules;
- `tether.norules`: the same call on a `PolicySet` with no rules (the baseline);
- `cedar.is_authorized`: `cedarpy.is_authorized` with the policies and each
  request's entities parsed beforehand (as far as its API allows);
- `tether.cedar_backend`: `PolicySet.decide` with `CedarPolicy` (information);
- `cel.condition`: one CEL condition evaluated over a step's variables, as the
  rules engine does (RELIABILITY.md G.49 asks for its p99).

    .venv/bin/python benchmarks/policy.py            # about a minute
    .venv/bin/python benchmarks/policy.py --quick    # about 20 s

It prints Rich tables and writes the figures to `benchmarks/results/policy.json`.
A bar that misses is reported, not an error: the exit code is non-zero only when
the benchmark itself fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

import tether
from call_path import (
    Bar,
    Stats,
    _cpu_model,
    _fmt,
    _git,
    _pressure,
    _stats,
    _timer_overhead_ns,
    bars_json,
    bars_table,
)
from tether.config import load_settings
from tether.policy import DecisionRequest, Defaults, PolicySet, RuleSet
from tether.policy.cel import CelError, Scope
from tether.policy.rules import _variables  # the variables RuleSet hands to CEL

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FORMAT = 1
"""Version of the JSON document this script writes."""

# -- one description, two languages ------------------------------------------------


@dataclass(frozen=True)
class Cond:
    """A condition in CEL (tether.yaml `when`) and in Cedar (a `when` clause)."""

    cel: str
    cedar: str


def _cel_path(path: str) -> str:
    return path


def _cedar_path(path: str) -> str:
    head, _, rest = path.partition(".")
    if head == "args":
        return f"context.args.{rest}"
    if head == "run":
        return f"context.{rest}"
    return path  # principal.*, context.*


def _lit(value: object) -> tuple[str, str]:
    if isinstance(value, bool):
        return str(value).lower(), str(value).lower()
    if isinstance(value, str):
        return f"'{value}'", json.dumps(value)
    return str(value), str(value)


def cmp(path: str, op: str, value: object) -> Cond:
    """`path op value`, for ints (`> >= < <= == !=`) and strings (`== !=`)."""
    cel, cedar = _lit(value)
    return Cond(f"{_cel_path(path)} {op} {cel}", f"{_cedar_path(path)} {op} {cedar}")


def has(path: str) -> Cond:
    """The optional field at `path` is present."""
    parent, _, name = _cedar_path(path).rpartition(".")
    return Cond(f"has({path})", f"{parent} has {name}")


def prefix(path: str, start: str) -> Cond:
    """The string at `path` starts with `start`."""
    return Cond(f"{path}.startsWith('{start}')", f'{_cedar_path(path)} like "{start}*"')


def suffix(path: str, end: str) -> Cond:
    """The string at `path` ends with `end`."""
    return Cond(f"{path}.endsWith('{end}')", f'{_cedar_path(path)} like "*{end}"')


def holds(path: str, item: str) -> Cond:
    """The list at `path` holds `item`."""
    return Cond(f"'{item}' in {path}", f'{_cedar_path(path)}.contains("{item}")')


def delegated() -> Cond:
    """The agent acts for a person."""
    return Cond("principal.on_behalf_of != null", "principal has on_behalf_of")


def all_(*conds: Cond) -> Cond:
    return Cond(
        " && ".join(f"({c.cel})" for c in conds),
        " && ".join(f"({c.cedar})" for c in conds),
    )


def any_(*conds: Cond) -> Cond:
    return Cond(
        " || ".join(f"({c.cel})" for c in conds),
        " || ".join(f"({c.cedar})" for c in conds),
    )


def not_(cond: Cond) -> Cond:
    return Cond(f"!({cond.cel})", f"!({cond.cedar})")


@dataclass(frozen=True)
class Spec:
    """One rule: tether.yaml fields, from which the Cedar policy is derived."""

    id: str
    decision: str
    reason: str
    capability: tuple[str, ...] = ()
    effect: tuple[str, ...] = ()
    role: tuple[str, ...] = ()
    tenant: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()
    when: Cond | None = None

    def yaml(self) -> dict[str, Any]:
        match = {
            k: list(v) if len(v) > 1 else v[0]
            for k, v in (
                ("capability", self.capability),
                ("effect", self.effect),
                ("role", self.role),
                ("tenant", self.tenant),
                ("environment", self.environment),
            )
            if v
        }
        out: dict[str, Any] = {"id": self.id, "match": match}
        if self.when is not None:
            out["when"] = self.when.cel
        out.update(decision=self.decision, reason=self.reason)
        return out

    def cedar(self) -> str:
        clauses: list[str] = []
        exact = [c for c in self.capability if "*" not in c]
        globs = [c for c in self.capability if "*" in c]
        assert not any("?" in c or "[" in c for c in self.capability), self.id
        names = [f'action == Action::"{c}"' for c in exact]
        names += [f'resource.name like "{g}"' for g in globs]
        if names:
            clauses.append(" || ".join(names))
        if self.effect:
            clauses.append(_one_of("resource.effect", self.effect))
        if self.role:
            clauses.append(" || ".join(f'principal in Role::"{r}"' for r in self.role))
        if self.tenant:
            clauses.append(_one_of("principal.tenant", self.tenant))
        if self.environment:
            clauses.append(
                f"context has environment && {_one_of('context.environment', self.environment)}"
            )
        if self.when is not None:
            clauses.append(self.when.cedar)
        effect = "forbid" if self.decision == "deny" else "permit"
        notes = f'@id("{self.id}")\n'
        if self.decision in ("require_approval", "dry_run_only"):
            notes += f'@decision("{self.decision}")\n'
        body = " && ".join(f"({c})" for c in clauses) or "true"
        return f"{notes}{effect}(principal, action, resource)\nwhen {{ {body} }};\n"


def _one_of(path: str, values: Sequence[str]) -> str:
    if len(values) == 1:
        return f'{path} == "{values[0]}"'
    return f"{json.dumps(list(values))}.contains({path})"


CAPABILITIES: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (effect, typical args)
    "payments.refund": (
        "write",
        {"order_id": "o-1", "amount_cents": 1200, "currency": "EUR"},
    ),
    "payments.charge": (
        "write",
        {"order_id": "o-2", "amount_cents": 4500, "currency": "USD"},
    ),
    "payments.payout": (
        "write",
        {"account": "acct-9", "amount_cents": 90000, "currency": "EUR"},
    ),
    "payments.capture": (
        "write",
        {"order_id": "o-3", "amount_cents": 3000, "currency": "GBP"},
    ),
    "payments.void": (
        "destructive",
        {"order_id": "o-4", "amount_cents": 700, "currency": "EUR"},
    ),
    "payments.dispute.respond": ("write", {"dispute_id": "d-1", "accept": False}),
    "infra.restart": (
        "write",
        {"service": "api", "region": "eu-west-1", "replicas": 3},
    ),
    "infra.scale": ("write", {"service": "api", "region": "eu-west-1", "replicas": 12}),
    "infra.deploy": (
        "write",
        {"service": "api", "region": "us-east-1", "version": "v1.4.2"},
    ),
    "infra.rollback": (
        "write",
        {"service": "api", "region": "us-east-1", "version": "v1.4.1"},
    ),
    "infra.db.drop": ("destructive", {"database": "orders", "table": "tmp_orders"}),
    "infra.db.backup": ("read", {"database": "orders", "table": "orders"}),
    "infra.db.migrate": ("write", {"database": "orders", "table": "orders"}),
    "infra.dns.update": (
        "write",
        {"zone": "api.example.com", "record": "A", "ttl": 300},
    ),
    "infra.firewall.open": ("write", {"cidr": "10.0.0.0/8", "port": 443}),
    "support.ticket.reply": (
        "write",
        {"ticket_id": "t-1", "body_chars": 420, "tags": ["billing"]},
    ),
    "support.ticket.close": ("write", {"ticket_id": "t-2", "tags": ["resolved"]}),
    "support.account.lookup": (
        "read",
        {"account": "acct-1", "fields": ["email", "plan"]},
    ),
    "support.account.suspend": ("destructive", {"account": "acct-2", "days": 7}),
    "support.credit.issue": (
        "write",
        {"account": "acct-3", "amount_cents": 2500, "currency": "EUR"},
    ),
    "crm.contact.read": ("read", {"contact_id": "c-1", "fields": ["name", "email"]}),
    "crm.contact.update": ("write", {"contact_id": "c-2", "fields": ["phone"]}),
    "crm.contact.delete": ("destructive", {"contact_id": "c-3", "fields": []}),
    "crm.export": (
        "read",
        {"segment": "all", "fields": ["name", "email"], "rows": 5000},
    ),
    "iam.role.grant": ("write", {"user": "u-1", "role": "viewer", "days": 30}),
    "iam.role.revoke": ("destructive", {"user": "u-2", "role": "editor", "days": 0}),
    "iam.key.rotate": ("write", {"key_id": "k-1", "days": 90}),
    "storage.object.read": ("read", {"bucket": "reports", "key": "2030/q1.csv"}),
    "storage.object.delete": (
        "destructive",
        {"bucket": "reports", "key": "2030/q1.csv"},
    ),
    "storage.bucket.policy": ("write", {"bucket": "reports", "public": False}),
}

DEFAULTS = {"read": "allow", "write": "allow", "destructive": "require_approval"}


def policy_specs() -> list[Spec]:
    """The 100 rules: hand-written ones, then families over capabilities."""
    s: list[Spec] = [
        Spec(
            "frozen-tenant",
            "deny",
            "the tenant's account is frozen",
            tenant=("frozen-co",),
        ),
        Spec(
            "trial-no-money-out",
            "deny",
            "trial tenants move no money",
            capability=("payments.*",),
            tenant=("trial-co",),
            effect=("write", "destructive"),
        ),
        Spec(
            "runaway-runs",
            "deny",
            "a run past 40 steps stops acting",
            effect=("write", "destructive"),
            when=cmp("run.steps", ">", 40),
        ),
        Spec(
            "destructive-needs-a-person",
            "deny",
            "destructive steps act for a person",
            effect=("destructive",),
            environment=("prod",),
            when=not_(delegated()),
        ),
        Spec(
            "reads-are-fine",
            "allow",
            "reads are routine",
            capability=("*.read", "*.lookup"),
            role=("agent", "support", "sre"),
        ),
        Spec(
            "sre-prod-restarts",
            "allow",
            "SREs restart in prod",
            capability=("infra.restart",),
            role=("sre",),
            environment=("prod",),
        ),
        Spec(
            "big-scale-ups",
            "require_approval",
            "scaling past 50 replicas costs real money",
            capability=("infra.scale",),
            when=cmp("args.replicas", ">", 50),
        ),
        Spec(
            "hotfix-deploys-rehearse",
            "dry_run_only",
            "hotfixes are rehearsed in prod first",
            capability=("infra.deploy",),
            environment=("prod",),
            when=prefix("args.version", "hotfix-"),
        ),
        Spec(
            "open-to-the-world",
            "deny",
            "no firewall opens to the whole internet",
            capability=("infra.firewall.open",),
            when=cmp("args.cidr", "==", "0.0.0.0/0"),
        ),
        Spec(
            "firewall-admin-ports",
            "require_approval",
            "admin ports need a second look",
            capability=("infra.firewall.open",),
            when=any_(cmp("args.port", "==", 22), cmp("args.port", "==", 3389)),
        ),
        Spec(
            "dns-apex",
            "require_approval",
            "apex records are shared by every service",
            capability=("infra.dns.update",),
            when=not_(suffix("args.zone", ".internal")),
        ),
        Spec(
            "dns-short-ttl",
            "deny",
            "TTLs under 60 s overload the resolvers",
            capability=("infra.dns.update",),
            when=cmp("args.ttl", "<", 60),
        ),
        Spec(
            "prod-drops",
            "deny",
            "tables are never dropped in prod by an agent",
            capability=("infra.db.drop",),
            environment=("prod",),
            when=not_(prefix("args.table", "tmp_")),
        ),
        Spec(
            "tmp-drops-rehearse",
            "dry_run_only",
            "temporary tables are dropped as a dry run first",
            capability=("infra.db.drop",),
            when=prefix("args.table", "tmp_"),
        ),
        Spec(
            "migrations-by-dbas",
            "require_approval",
            "schema changes go through a DBA",
            capability=("infra.db.migrate",),
            environment=("prod", "staging"),
        ),
        Spec(
            "pii-exports",
            "require_approval",
            "exports with PII need the privacy team",
            capability=("crm.export",),
            when=any_(holds("args.fields", "email"), holds("args.fields", "phone")),
        ),
        Spec(
            "huge-exports",
            "deny",
            "exports past 100k rows go through the warehouse",
            capability=("crm.export",),
            when=cmp("args.rows", ">", 100000),
        ),
        Spec(
            "contact-deletes-gdpr",
            "allow",
            "GDPR erasure requests are honoured",
            capability=("crm.contact.delete",),
            role=("privacy",),
            when=delegated(),
        ),
        Spec(
            "admin-grants",
            "require_approval",
            "admin rights need a human",
            capability=("iam.role.grant",),
            when=cmp("args.role", "==", "admin"),
        ),
        Spec(
            "long-grants",
            "deny",
            "grants last at most 90 days",
            capability=("iam.role.grant",),
            when=cmp("args.days", ">", 90),
        ),
        Spec(
            "key-rotation-by-sre",
            "allow",
            "SREs rotate keys",
            capability=("iam.key.rotate",),
            role=("sre",),
        ),
        Spec(
            "public-buckets",
            "deny",
            "buckets are never made public by an agent",
            capability=("storage.bucket.policy",),
            when=cmp("args.public", "==", True),
        ),
        Spec(
            "report-deletes",
            "require_approval",
            "reports are kept for audits",
            capability=("storage.object.delete",),
            when=prefix("args.key", "20"),
        ),
        Spec(
            "long-suspensions",
            "require_approval",
            "suspensions past 30 days need a lead",
            capability=("support.account.suspend",),
            when=cmp("args.days", ">", 30),
        ),
        Spec(
            "legal-tickets",
            "require_approval",
            "legal tickets are answered by people",
            capability=("support.ticket.*",),
            when=holds("args.tags", "legal"),
        ),
        Spec(
            "dispute-accepts",
            "require_approval",
            "accepting a dispute gives the money back",
            capability=("payments.dispute.respond",),
            when=cmp("args.accept", "==", True),
        ),
    ]
    # Money: two thresholds per money-moving capability.
    money = [
        "payments.refund",
        "payments.charge",
        "payments.payout",
        "payments.capture",
        "payments.void",
        "support.credit.issue",
    ]
    for i, cap in enumerate(money):
        short = cap.rsplit(".", 1)[-1]
        s.append(
            Spec(
                f"{short}-over-{500 + 100 * i}",
                "require_approval",
                f"{cap} over {500 + 100 * i}.00 needs finance",
                capability=(cap,),
                when=cmp("args.amount_cents", ">", (500 + 100 * i) * 100),
            )
        )
        s.append(
            Spec(
                f"{short}-over-{10000 * (i + 1)}",
                "deny",
                f"{cap} over {10000 * (i + 1)}.00 is never automated",
                capability=(cap,),
                when=cmp("args.amount_cents", ">", 10000 * (i + 1) * 100),
            )
        )
        s.append(
            Spec(
                f"{short}-odd-currency",
                "require_approval",
                f"{cap} in a rare currency",
                capability=(cap,),
                when=all_(
                    has("args.currency"),
                    not_(
                        any_(
                            cmp("args.currency", "==", "EUR"),
                            cmp("args.currency", "==", "USD"),
                        )
                    ),
                ),
            )
        )
    # Finance may do small money moves without asking.
    for cap in money[:4]:
        s.append(
            Spec(
                f"finance-{cap.rsplit('.', 1)[-1]}",
                "allow",
                "finance handles routine money moves",
                capability=(cap,),
                role=("finance",),
                when=cmp("args.amount_cents", "<=", 50000),
            )
        )
    # Regions: each region has its own change freeze and canary rules.
    regions = ["eu-west-1", "us-east-1", "ap-south-1", "sa-east-1"]
    for region in regions:
        for cap in ["infra.deploy", "infra.restart", "infra.scale", "infra.rollback"]:
            s.append(
                Spec(
                    f"{region}-{cap.rsplit('.', 1)[-1]}-freeze",
                    "dry_run_only",
                    f"{region} is in a change freeze",
                    capability=(cap,),
                    environment=("prod",),
                    when=all_(
                        has("args.region"),
                        cmp("args.region", "==", region),
                        cmp("run.steps", ">", 10),
                    ),
                )
            )
    # Tenants with contractual limits.
    for tenant in ["acme", "globex", "initech", "umbrella"]:
        s.append(
            Spec(
                f"{tenant}-no-prod-destructive",
                "require_approval",
                f"{tenant}'s contract asks for approval of destructive steps",
                tenant=(tenant,),
                effect=("destructive",),
                environment=("prod",),
            )
        )
        s.append(
            Spec(
                f"{tenant}-exports-capped",
                "deny",
                f"{tenant} caps exports at 20k rows",
                capability=("crm.export",),
                tenant=(tenant,),
                when=cmp("args.rows", ">", 20000),
            )
        )
    # Roles that may not touch whole families.
    for role, family in [
        ("support", "infra.*"),
        ("support", "iam.*"),
        ("finance", "infra.*"),
        ("finance", "crm.*"),
        ("contractor", "payments.*"),
        ("contractor", "iam.*"),
        ("contractor", "storage.*"),
    ]:
        s.append(
            Spec(
                f"{role}-off-{family.rstrip('.*')}",
                "deny",
                f"{role} agents stay out of {family}",
                capability=(family,),
                role=(role,),
                effect=("write", "destructive"),
            )
        )
    # Staging is a sandbox; dev a dry run for destructive steps.
    for family in ["payments.*", "infra.*", "crm.*", "iam.*", "storage.*", "support.*"]:
        s.append(
            Spec(
                f"staging-{family.rstrip('.*')}",
                "allow",
                "staging is a sandbox",
                capability=(family,),
                environment=("staging",),
                effect=("read", "write"),
            )
        )
        s.append(
            Spec(
                f"dev-{family.rstrip('.*')}-destructive",
                "dry_run_only",
                "destructive steps in dev are dry runs",
                capability=(family,),
                environment=("dev",),
                effect=("destructive",),
            )
        )
    # Night-shift agents act only on their own tickets and accounts.
    for cap in [
        "support.ticket.reply",
        "support.ticket.close",
        "support.account.suspend",
    ]:
        s.append(
            Spec(
                f"night-{cap.rsplit('.', 1)[-1]}",
                "require_approval",
                "the night shift escalates",
                capability=(cap,),
                role=("night-shift",),
                when=not_(delegated()),
            )
        )
    s.append(
        Spec(
            "long-replies",
            "dry_run_only",
            "long replies are drafted, not sent",
            capability=("support.ticket.reply",),
            when=cmp("args.body_chars", ">", 4000),
        )
    )
    s += [
        Spec(
            "delegated-big-refunds",
            "require_approval",
            "big refunds for a person are confirmed with them",
            capability=("payments.refund",),
            when=all_(delegated(), cmp("args.amount_cents", ">", 20000)),
        ),
        Spec(
            "sre-backups",
            "allow",
            "SREs take backups",
            capability=("infra.db.backup",),
            role=("sre",),
        ),
        Spec(
            "sre-prod-rollbacks",
            "allow",
            "rolling back is always safe for SREs",
            capability=("infra.rollback",),
            role=("sre",),
            environment=("prod",),
        ),
        Spec(
            "sre-revokes",
            "allow",
            "SREs revoke access for the person they act for",
            capability=("iam.role.revoke",),
            role=("sre",),
            when=delegated(),
        ),
        Spec(
            "whole-base-exports",
            "dry_run_only",
            "exporting every contact is previewed first",
            capability=("crm.export",),
            when=cmp("args.segment", "==", "all"),
        ),
    ]
    assert len(s) == 100, len(s)
    assert len({r.id for r in s}) == 100
    return s


# -- the requests -----------------------------------------------------------------

PRINCIPALS = [
    tether.Principal("ops-bot", roles=["agent", "sre"], tenant="acme"),
    tether.Principal(
        "support-bot",
        roles=["agent", "support"],
        tenant="globex",
        on_behalf_of="dana@globex.example",
    ),
    tether.Principal(
        "night-bot", roles=["agent", "support", "night-shift"], tenant="initech"
    ),
    tether.Principal(
        "finance-bot",
        roles=["agent", "finance"],
        tenant="umbrella",
        on_behalf_of="erin@umbrella.example",
    ),
    tether.Principal(
        "privacy-bot",
        roles=["agent", "privacy"],
        tenant="acme",
        on_behalf_of="frank@acme.example",
    ),
    tether.Principal("vendor-bot", roles=["contractor"], tenant="hooli"),
    tether.Principal("trial-bot", roles=["agent"], tenant="trial-co"),
    tether.Principal("frozen-bot", roles=["agent"], tenant="frozen-co"),
]
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "amount_cents": [
        {"amount_cents": 120_000},
        {"amount_cents": 9_000_000},
        {"currency": "JPY"},
    ],
    "replicas": [{"replicas": 80}],
    "version": [{"version": "hotfix-17"}],
    "region": [{"region": "ap-south-1"}, {"region": "sa-east-1"}],
    "cidr": [{"cidr": "0.0.0.0/0"}, {"port": 22}],
    "zone": [{"zone": "db.internal", "ttl": 30}],
    "table": [{"table": "orders"}],
    "fields": [{"fields": ["phone", "name"]}],
    "rows": [{"rows": 250_000}, {"rows": 30_000}],
    "role": [{"role": "admin"}, {"days": 365}],
    "public": [{"public": True}],
    "days": [{"days": 45}],
    "tags": [{"tags": ["legal", "billing"]}],
    "accept": [{"accept": True}],
    "body_chars": [{"body_chars": 9000}],
    "key": [{"key": "scratch/tmp.csv"}],
}


def request_mix(seed: int, size: int) -> list[DecisionRequest]:
    """`size` requests over every capability, principal and environment, seeded."""
    rng = random.Random(seed)
    names = sorted(CAPABILITIES)
    out = []
    for i in range(size):
        name = names[i % len(names)]
        effect, typical = CAPABILITIES[name]
        args = dict(typical)
        variants = [v for key in typical for v in VARIANTS.get(key, [])]
        if variants and rng.random() < 0.5:
            args.update(rng.choice(variants))
        environment = rng.choice(["prod", "prod", "prod", "staging", "dev", None])
        out.append(
            DecisionRequest(
                principal=rng.choice(PRINCIPALS),
                capability=name,
                version="1",
                effect=effect,
                scopes=(),
                args=args,
                context={} if environment is None else {"environment": environment},
                steps_so_far=rng.choice([0, 1, 2, 5, 12, 45]),
                cost_so_far=Decimal("1.25"),
                at=datetime(2030, 3, 1, 9, 30, tzinfo=UTC),
            )
        )
    return out


# -- policies built from the description ---------------------------------------------


def write_policy_files(specs: Sequence[Spec], folder: Path) -> tuple[Path, Path]:
    """Write `policy_100.yaml` and `policy_100.cedar`; return their paths."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    yaml_path = folder / "policy_100.yaml"
    cedar_path = folder / "policy_100.cedar"
    doc = {"version": 1, "defaults": DEFAULTS, "rules": [s.yaml() for s in specs]}
    yaml_path.write_text(
        "# Generated by benchmarks/policy.py: 100 rules over 30 capabilities.\n"
        + yaml.safe_dump(doc, sort_keys=False, width=100)
    )
    cedar_path.write_text(
        "// Generated by benchmarks/policy.py: the same 100 rules in Cedar.\n\n"
        + "\n".join(s.cedar() for s in specs)
    )
    return yaml_path, cedar_path


def cedar_request(req: DecisionRequest) -> dict[str, Any]:
    """The Cedar request `CedarPolicy` builds for `req` (principal, action, resource, context)."""
    from tether.policy.cedar import _context

    return {
        "principal": {"type": "Principal", "id": req.principal.id},
        "action": {"type": "Action", "id": req.capability},
        "resource": {"type": "Capability", "id": req.capability},
        "context": _context(req),
    }


# -- cases -----------------------------------------------------------------------------


@dataclass
class Case:
    """One measured call over the request mix: `fn(item)` is timed."""

    id: str
    title: str
    fn: Callable[[Any], object]
    items: list[Any]
    samples: list[int] = field(default_factory=list)
    rounds: list[list[int]] = field(default_factory=list)
    pos: int = 0

    def run(self, n: int) -> list[int]:
        out = [0] * n
        clock = time.perf_counter_ns
        fn, items, j, k = self.fn, self.items, self.pos, len(self.items)
        for i in range(n):
            item = items[j]
            j = j + 1 if j + 1 < k else 0
            t0 = clock()
            fn(item)
            out[i] = clock() - t0
        self.pos = j
        return out


@dataclass(frozen=True, kw_only=True)
class Mode:
    name: str
    rounds: int
    budget_s: float
    """Time each case may spend in timed calls, over all rounds."""
    warmup_s: float


FULL = Mode(name="full", rounds=10, budget_s=6.0, warmup_s=0.3)
QUICK = Mode(name="quick", rounds=5, budget_s=1.0, warmup_s=0.1)
CHUNK_S = 0.002
"""Time each case runs before the next one takes its turn."""


def _measure(cases: list[Case], mode: Mode, rng: random.Random) -> None:
    plan: dict[str, tuple[int, int]] = {}
    for case in cases:
        started = time.perf_counter()
        warm: list[int] = []
        while time.perf_counter() - started < mode.warmup_s:
            warm.extend(case.run(len(case.items)))
        per_call = statistics.median(warm) / 1e9
        per_round = max(1, int(mode.budget_s / mode.rounds / per_call))
        plan[case.id] = (per_round, max(1, round(CHUNK_S / per_call)))
        _say(f"  warmed {case.id}: ~{per_call * 1e6:,.2f} µs/call")
    for r in range(mode.rounds):
        gc.collect()
        left = {c.id: plan[c.id][0] for c in cases}
        got: dict[str, list[int]] = {c.id: [] for c in cases}
        active = list(cases)
        while active:
            rng.shuffle(active)
            for case in active:
                n = min(plan[case.id][1], left[case.id])
                got[case.id].extend(case.run(n))
                left[case.id] -= n
            active = [c for c in active if left[c.id] > 0]
        for case in cases:
            case.samples.extend(got[case.id])
            case.rounds.append(got[case.id])
        _say(f"  round {r + 1}/{mode.rounds} done")


# -- equivalence and probes ------------------------------------------------------------


def check_equivalence(
    tether_set: PolicySet, cedar_set: PolicySet, requests: Sequence[DecisionRequest]
) -> dict[str, Any]:
    """Decide every request under the yaml and the Cedar policy; count differences."""
    differ: list[dict[str, Any]] = []
    verdicts: dict[str, int] = {}
    rules_hit: set[str] = set()
    for req in requests:
        a = tether_set.decide(req)
        b = cedar_set.decide(req)
        ids_b = tuple(i.removeprefix("cedar:") for i in b.rule_ids)
        verdicts[a.verdict.value] = verdicts.get(a.verdict.value, 0) + 1
        rules_hit.update(a.rule_ids)
        failed = [r for r in a.reasons if "could not be evaluated" in r]
        if (a.verdict, a.rule_ids) != (b.verdict, ids_b) or failed:
            differ.append(
                {
                    "capability": req.capability,
                    "principal": req.principal.id,
                    "args": dict(req.args),
                    "tether": [a.verdict.value, list(a.rule_ids)],
                    "cedar": [b.verdict.value, list(ids_b)],
                    "failed": failed,
                }
            )
    return {
        "requests": len(requests),
        "differences": len(differ),
        "first_differences": differ[:5],
        "verdicts": dict(sorted(verdicts.items())),
        "distinct_rules_deciding": len(rules_hit),
        "default_decisions": sum(
            1 for r in requests if not tether_set.decide(r).rule_ids
        ),
    }


def cel_pairs(
    rules: RuleSet, requests: Sequence[DecisionRequest]
) -> list[tuple[Any, Any]]:
    """Every (condition, variables) pair the rules engine evaluates for the mix."""
    pairs = []
    for req in requests:
        variables = _variables(req)
        for rule in rules.candidates(req.capability, req.effect):
            if rule.condition is not None:
                pairs.append((rule.condition, variables))
    return pairs


def _evaluate_pair(pair: tuple[Any, Any]) -> object:
    condition, variables = pair
    try:
        return Scope(variables).evaluate(condition)
    except CelError:
        return None


HOSTILE = [
    ("linear: args.items.all(x, x >= 0)", "args.items.all(x, x >= 0)", 8000),
    ("map over n items", "args.items.map(x, x).size() > 0", 2000),
    ("map over 4n items", "args.items.map(x, x).size() > 0", 8000),
    ("filter over 4n items", "args.items.filter(x, x > 0).size() > 0", 8000),
    ("x in args.items, per item", "args.items.all(x, x in args.items)", 2000),
    ("x in args.items, 4n items", "args.items.all(x, x in args.items)", 8000),
]
"""Costly conditions over a list arg: refused at compile time, or what one costs."""


def probe_hostile() -> list[dict[str, Any]]:
    """Time each hostile condition (best of 3): G.49's cost limit, measured."""
    from tether.policy.cel import compile_condition

    out: list[dict[str, Any]] = []
    for label, source, n in HOSTILE:
        try:
            condition = compile_condition(source)
        except CelError as exc:
            out.append(
                {"what": label, "source": source, "items": n, "refused": str(exc)}
            )
            _say(f"  hostile {label}: refused at compile time")
            continue
        variables = {"args": {"items": list(range(n))}}
        best = min(
            _timed_once(lambda c=condition, v=variables: Scope(v).evaluate(c))
            for _ in range(3)
        )
        payload = len(json.dumps(variables["args"]))
        out.append(
            {
                "what": label,
                "source": source,
                "items": n,
                "args_bytes": payload,
                "ms": best / 1e6,
            }
        )
        _say(f"  hostile {label} (n={n}): {best / 1e6:,.1f} ms")
    return out


def _timed_once(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


# -- the run ------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("tether", "common-expression-language", "cedarpy", "pydantic", "rich"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def benchmark(mode: Mode, out: Path, seed: int) -> dict[str, Any]:
    import cedarpy

    from tether.policy.cedar import CedarPolicy

    started = time.perf_counter()
    git = _git()
    specs = policy_specs()
    yaml_path, cedar_path = write_policy_files(specs, RESULTS)
    settings, version = load_settings(yaml_path)
    rules = RuleSet(settings.rules)
    with_rules = PolicySet(rules=rules, defaults=settings.defaults, version=version)
    no_rules = PolicySet(rules=None, defaults=Defaults(), version="none")
    cedar_text = cedar_path.read_text()
    backend = CedarPolicy(cedar_text)
    cedar_set = PolicySet([backend], defaults=settings.defaults, version=version)
    requests = request_mix(seed, 240)

    _say("checking that tether.yaml and Cedar decide every request alike")
    equivalence = check_equivalence(with_rules, cedar_set, requests)
    if equivalence["differences"]:
        _say(f"  DIFFERENT: {json.dumps(equivalence['first_differences'][:2])}")

    # Cedar as its API allows it at its fastest: the policy set parsed once, each
    # request's entities (principal and resource) parsed once, the request built once.
    policy_set = cedarpy.PolicySet.from_str(cedar_text)
    raw = []
    for req in requests:
        raw.append((cedar_request(req), backend._entities(req)))
    cedar_metrics = [
        cedarpy.is_authorized(r, policy_set, e).metrics for r, e in raw[:50]
    ]

    pairs = cel_pairs(rules, requests)
    cases = [
        Case(
            "tether.rules100",
            "PolicySet.decide, 100 tether.yaml rules",
            with_rules.decide,
            requests,
        ),
        Case(
            "tether.norules",
            "PolicySet.decide, no rules (baseline)",
            no_rules.decide,
            requests,
        ),
        Case(
            "cedar.is_authorized",
            "cedarpy.is_authorized, the same policy, pre-parsed",
            lambda item: cedarpy.is_authorized(item[0], policy_set, item[1]),
            raw,
        ),
        Case(
            "tether.cedar_backend",
            "PolicySet.decide with CedarPolicy",
            cedar_set.decide,
            requests,
        ),
        Case(
            "cel.condition",
            "one CEL condition over a step's variables",
            _evaluate_pair,
            pairs,
        ),
    ]
    rng = random.Random(seed)
    _say(f"{len(cases)} cases interleaved over {mode.rounds} rounds ({mode.name})")
    pressure_start = _pressure()
    load_start = list(os.getloadavg())
    _measure(cases, mode, rng)
    hostile = probe_hostile()

    stats = {c.id: _stats(c.samples, c.rounds) for c in cases}
    bars = _bars(stats, equivalence)
    docs = {
        c.id: {
            "title": c.title,
            "n": stats[c.id].n,
            "items": len(c.items),
            "median_us": stats[c.id].median_us,
            "p99_us": stats[c.id].p99_us,
            "p90_us": stats[c.id].p90_us,
            "mean_us": stats[c.id].mean_us,
            "min_us": stats[c.id].min_us,
            "round_medians_us": stats[c.id].round_medians_us,
        }
        for c in cases
    }
    base = stats["tether.norules"].median_us
    cedar = stats["cedar.is_authorized"].median_us
    t100 = stats["tether.rules100"].median_us
    ratios = {
        "tether.rules100 / tether.norules (p50)": t100 / base,
        "cedar.is_authorized / tether.rules100 (p50)": cedar / t100,
        "tether.rules100 / cedar.is_authorized (p50)": t100 / cedar,
        "tether.rules100 - tether.norules (p50, µs)": t100 - base,
        "cedar.is_authorized / tether.rules100 (p99)": stats[
            "cedar.is_authorized"
        ].p99_us
        / stats["tether.rules100"].p99_us,
    }
    doc: dict[str, Any] = {
        "format": FORMAT,
        "benchmark": "policy",
        "mode": mode.name,
        "seed": seed,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - started,
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "timer_overhead_ns": _timer_overhead_ns(),
            "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()),
            "pressure_start": pressure_start,
            "pressure_end": _pressure(),
        },
        "versions": _versions(),
        "git": git,
        "policy": {
            "rules": len(specs),
            "capabilities": len(CAPABILITIES),
            "with_condition": sum(s.when is not None for s in specs),
            "globs": sum(any("*" in c for c in s.capability) for s in specs),
            "yaml": str(yaml_path),
            "cedar": str(cedar_path),
            "version": version,
            "cel_pairs": len(pairs),
        },
        "equivalence": equivalence,
        "cases": docs,
        "ratios": ratios,
        "cedar_metrics_median_us": {
            key: statistics.median(m.get(key, 0) for m in cedar_metrics)
            for key in ("build_request_duration_micros", "authz_duration_micros")
        },
        "hostile_conditions": hostile,
        **bars_json(bars),
        "notes": [
            "median and p99 are per call, timed with perf_counter_ns around the call "
            "alone (the timer's own ~40 ns are not subtracted)",
            "each case cycles through the same request mix; Cedar gets its requests and "
            "entities pre-built, tether builds its CEL variables inside decide()",
            "cel.condition converts the step's variables and evaluates one condition, "
            "as the first condition of a decision does",
            "hostile_conditions: costly conditions over a list arg of n items (G.49 "
            "cost limit): refused at compile time, or what one evaluation costs; "
            "they are not interleaved",
        ],
        "json_path": str(out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return doc


def _bars(stats: Mapping[str, Stats], equivalence: Mapping[str, Any]) -> list[Bar]:
    t100 = stats["tether.rules100"]
    cedar = stats["cedar.is_authorized"]
    return [
        Bar(
            id="rules100.median",
            what="PolicySet.decide under 100 rules, median",
            value=t100.median_us,
            op="<",
            threshold=20.0,
            unit="µs",
        ),
        Bar(
            id="rules100.vs_cedar",
            what="tether median / Cedar is_authorized median",
            value=t100.median_us / cedar.median_us,
            op="<",
            threshold=0.25,
            unit="x",
        ),
        Bar(
            id="cel.p99",
            what="one CEL condition over a step's variables, p99 (G.49)",
            value=stats["cel.condition"].p99_us,
            op="<",
            threshold=1000.0,
            unit="µs",
        ),
        Bar(
            id="equivalence",
            what="requests decided differently by tether.yaml and Cedar",
            value=float(equivalence["differences"]),
            op="<=",
            threshold=0.0,
            unit="requests",
        ),
    ]


def _render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, shutil.get_terminal_size().columns))
    m = doc["machine"]
    p = doc["policy"]
    console.print(
        f"[bold]tether policy decision[/bold] ({doc['mode']}, {doc['duration_s']:.0f} s) on "
        f"{m['cpu']}, {m['cpus_usable']} CPUs, Python {m['python']}; "
        f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
    )
    eq = doc["equivalence"]
    console.print(
        f"policy: {p['rules']} rules ({p['with_condition']} with a CEL condition, "
        f"{p['globs']} with a glob) over {p['capabilities']} capabilities; "
        f"{eq['requests']} requests, decided by {eq['distinct_rules_deciding']} distinct "
        f"rules ({eq['default_decisions']} by the default), verdicts {eq['verdicts']}; "
        f"tether.yaml and Cedar differ on {eq['differences']}"
    )
    table = Table(title="per decision", title_justify="left")
    for col, just in (
        ("case", "left"),
        ("p50 µs", "right"),
        ("p90 µs", "right"),
        ("p99 µs", "right"),
        ("n", "right"),
        ("what", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for case_id, c in doc["cases"].items():
        table.add_row(
            case_id,
            _fmt(c["median_us"], ",.2f"),
            _fmt(c["p90_us"], ",.2f"),
            _fmt(c["p99_us"], ",.2f"),
            f"{c['n']:,}",
            c["title"],
        )
    console.print(table)
    ratios = Table(title="ratios", title_justify="left")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    for name, value in doc["ratios"].items():
        ratios.add_row(name, _fmt(value, ",.2f"))
    console.print(ratios)
    hostile = Table(
        title="costly CEL conditions (G.49 cost): refused, or one evaluation",
        title_justify="left",
    )
    for col, just in (
        ("condition", "left"),
        ("items", "right"),
        ("ms (or refused)", "right"),
    ):
        hostile.add_column(col, justify=just)  # type: ignore[arg-type]
    for h in doc["hostile_conditions"]:
        hostile.add_row(
            h["source"],
            f"{h['items']:,}",
            "refused" if "refused" in h else _fmt(h["ms"], ",.1f"),
        )
    console.print(hostile)
    console.print(bars_table(doc["bars"], ",.2f"))
    cm = doc["cedar_metrics_median_us"]
    console.print(
        f"- Cedar's own metrics (median): build request {cm['build_request_duration_micros']} µs, "
        f"authorize {cm['authz_duration_micros']} µs"
    )
    for note in doc["notes"]:
        console.print(f"- {note}")
    console.print(f"JSON: {doc['json_path']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help="an ~20 s run with fewer samples"
    )
    parser.add_argument(
        "--out", default=str(RESULTS / "policy.json"), help="the JSON file to write"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed for the requests and the round order"
    )
    args = parser.parse_args(argv)
    try:
        import cedarpy  # noqa: F401
    except ImportError:
        _say("cedarpy is not installed; run `make bench` (the bench group has it)")
        return 2
    doc = benchmark(QUICK if args.quick else FULL, Path(args.out), args.seed)
    _render(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
