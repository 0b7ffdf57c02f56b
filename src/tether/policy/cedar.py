"""Cedar policies as a tether policy: the optional `tether[cedar]` backend.

`CedarPolicy` asks the Cedar authorizer (the Rust engine, through `cedarpy`)
about each step and answers in tether's terms, so Cedar and `tether.yaml` rules
take part in the same precedence. A step becomes a Cedar request:

- principal `Principal::"<id>"`, with attributes `id`, `tenant`, `roles`,
  `scopes` (sets of strings) and `on_behalf_of` (when set); its parents are
  `Role::"<role>"` for each role and `Tenant::"<tenant>"`, so
  `principal in Role::"finance"` works;
- action `Action::"<capability name>"`;
- resource `Capability::"<capability name>"`, with attributes `name`, `version`,
  `effect` and `scopes`;
- context: the run's context (`environment`, ...) with `args` (the validated
  args), `tenant`, `steps` (steps so far), `cost` (cost so far, a `decimal`
  rounded up to 4 places) and `time` (a `datetime`) set by tether.

A `permit` allows (a permit annotated `@decision("require_approval")` or
`@decision("dry_run_only")` gives that verdict instead); a `forbid` denies. The
rule ids recorded are `<policy id>:<Cedar id>`, the Cedar id being the policy's
`@id("...")` annotation, else Cedar's own (`policy0`, `policy1`, ... in file
order); a `@reason("...")` annotation becomes the recorded reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, Literal

from tether.errors import UsageError
from tether.policy._decision import (
    Decision,
    DecisionRequest,
    Verdict,
    combine,
    content_hash,
)

if TYPE_CHECKING:
    import cedarpy

__all__ = ["CedarPolicy"]

PRINCIPAL = "Principal"
"""Entity type of the acting principal."""
ROLE = "Role"
"""Entity type of the principal's roles (its parents)."""
TENANT = "Tenant"
"""Entity type of the principal's tenant (a parent too)."""
ACTION = "Action"
"""Entity type of the action: one per capability name."""
CAPABILITY = "Capability"
"""Entity type of the resource: the capability called."""

_I64 = (-(2**63), 2**63 - 1)
_DECIMAL_MAX = Decimal("922337203685477.5807")  # Cedar decimals: i64 / 10^4
_PLACES = Decimal("0.0001")
_RESERVED_KEYS = frozenset({"__entity", "__extn", "__expr"})  # Cedar JSON escapes
_ERRORED = re.compile(r"error while evaluating policy `([^`]+)`")
_CACHE_SIZE = 4096
_PERMIT_VERDICTS = {
    "allow": Verdict.ALLOW,
    "require_approval": Verdict.REQUIRE_APPROVAL,
    "dry_run_only": Verdict.DRY_RUN_ONLY,
}


class _Unrepresentable(ValueError):
    """A value Cedar's JSON cannot carry exactly (the message names its path)."""


@dataclass(frozen=True, slots=True)
class _CedarRule:
    index: int
    rule_id: str
    effect: Literal["permit", "forbid"]
    verdict: Verdict
    reason: str | None


def _import_cedarpy() -> Any:  # the module; typed at each use through TYPE_CHECKING
    try:
        import cedarpy  # optional: only CedarPolicy needs it
    except ImportError as exc:
        raise UsageError(
            "CedarPolicy needs the cedarpy package, which is not installed; "
            "pip install 'tether[cedar]'"
        ) from exc
    return cedarpy


class CedarPolicy:
    """A `Policy` that decides steps by Cedar policies.

    How Cedar's answers map to tether's, and why:

    - A satisfied `forbid` denies, naming every satisfied forbid.
    - A satisfied `permit` allows (or gives its `@decision`), naming every
      satisfied permit with the winning verdict.
    - No satisfied policy (Cedar's default deny) abstains (None) by default:
      Cedar then speaks only where its policies say something, and the
      `tether.yaml` rules, other policies and the per-effect defaults still
      decide the rest, which is what adding a policy to an app means. With
      `no_permit="deny"` Cedar is the authority instead and its default deny
      stands (recorded under this policy's `id`).
    - Fail closed, as tether's own rules do: a `forbid` that Cedar could not
      evaluate (a missing attribute, a type error) denies naming it, since
      skipping it, as Cedar does, would loosen the policy; so does a `permit`
      annotated to ask approval or a dry run. A plain `permit` that could not be
      evaluated is simply not satisfied, which only ever tightens. A
      request Cedar cannot build (an arg with no Cedar form, such as a float
      with more than 4 decimal places or a NaN, or one that breaks the
      schema) is denied with the reason, naming this policy.

    Policies, schema and entities are parsed once; the entities that describe a
    step's principal and capability are parsed once per distinct principal
    and capability and reused.

    Args:
        policies: Cedar policy text (static policies; templates are refused).
        entities: extra entities (Cedar JSON, as text or a list of entity
            objects), such as a role hierarchy (`Role::"lead"` in
            `Role::"staff"`); the `Principal` and `Capability` entities are
            tether's to make.
        schema: a Cedar schema (Cedar text, JSON text or a JSON mapping); when
            given, the policies are validated against it once and each request
            and its entities are checked against it.
        id: this policy's id, recorded as the prefix of its rule ids.
        no_permit: `"abstain"` (default) or `"deny"`: what Cedar's default deny
            means, see above.

    Raises:
        UsageError: cedarpy is not installed (`pip install 'tether[cedar]'`), or
            the policies, schema or entities are invalid.

    Example:
        ```python
        from tether.policy.cedar import CedarPolicy

        app.add_policy(
            CedarPolicy('@id("no-prod-drops") forbid(principal, '
                        'action == Action::"db.drop", resource) '
                        'when { context.environment == "prod" };')
        )
        ```
    """

    __slots__ = (
        "_authorize",
        "_base",
        "_cache",
        "_rules",
        "_schema",
        "_set",
        "id",
        "no_permit",
        "version",
    )

    def __init__(
        self,
        policies: str,
        *,
        entities: str | Sequence[Mapping[str, Any]] = (),
        schema: str | Mapping[str, Any] | None = None,
        id: str = "cedar",  # the Policy protocol's field
        no_permit: Literal["abstain", "deny"] = "abstain",
    ) -> None:
        cedar = _import_cedarpy()
        if no_permit not in ("abstain", "deny"):
            raise UsageError(
                f"no_permit must be 'abstain' or 'deny', got {no_permit!r}"
            )
        self.id = id
        self.no_permit = no_permit
        if not isinstance(entities, str):
            entities = list(entities)  # read once: an iterator is used up
        self.version = "sha256:" + content_hash([policies, entities, schema, no_permit])
        """A hash of what decides: counted in the policy version (`combined_version`)."""
        try:
            self._set: cedarpy.PolicySet = cedar.PolicySet.from_str(policies)
            est = json.loads(cedar.policies_to_json_str(policies))
        except ValueError as exc:
            raise UsageError(
                f"Cedar policies of {id!r} do not parse: {_one_line(exc)}"
            ) from exc
        self._rules = self._read_rules(est)
        self._schema: cedarpy.Schema | None = None
        if schema is not None:
            self._schema = _parse_schema(cedar, schema, id)
            checked = cedar.validate_policies(policies, self._schema)
            if not checked.validation_passed:
                raise UsageError(
                    f"Cedar policies of {id!r} do not match the schema: "
                    f"{_one_line(checked.errors[0])}"
                )
        text = entities if isinstance(entities, str) else json.dumps(list(entities))
        _check_entities(text, id)
        try:
            self._base: cedarpy.Entities = cedar.Entities.from_json_str(
                text, self._schema
            )
        except ValueError as exc:
            raise UsageError(
                f"Cedar entities of {id!r} are invalid: {_one_line(exc)}"
            ) from exc
        self._authorize = cedar.is_authorized
        self._cache: dict[tuple[object, ...], cedarpy.Entities] = {}

    def _read_rules(self, est: Mapping[str, Any]) -> dict[str, _CedarRule]:
        if est.get("templates"):
            raise UsageError(
                f"Cedar policies of {self.id!r} hold templates "
                f"({', '.join(sorted(est['templates']))}), which CedarPolicy does "
                "not link; write static policies"
            )
        rules: dict[str, _CedarRule] = {}
        seen: dict[str, str] = {}
        for cedar_id, body in est["staticPolicies"].items():
            notes = body.get("annotations") or {}
            name = notes.get("id") or cedar_id
            if name in seen:
                raise UsageError(
                    f"Cedar policies of {self.id!r}: id {name!r} is used by both "
                    f"{seen[name]} and {cedar_id}; give each policy its own @id"
                )
            seen[name] = cedar_id
            effect = body["effect"]
            wanted = notes.get("decision")
            if effect == "forbid":
                if wanted not in (None, "deny"):
                    raise UsageError(
                        f"Cedar policy {name!r}: a forbid always denies, so "
                        f'@decision("{wanted}") cannot apply; remove it'
                    )
                verdict = Verdict.DENY
            else:
                if wanted is not None and wanted not in _PERMIT_VERDICTS:
                    raise UsageError(
                        f"Cedar policy {name!r}: @decision({wanted!r}) is not one of "
                        f"{', '.join(_PERMIT_VERDICTS)}; fix the annotation"
                    )
                verdict = _PERMIT_VERDICTS[wanted or "allow"]
            rules[cedar_id] = _CedarRule(
                # Cedar names parsed policies policy0, policy1, ... in file order.
                index=int(cedar_id.removeprefix("policy")),
                rule_id=f"{self.id}:{name}",
                effect=effect,
                verdict=verdict,
                reason=notes.get("reason") or None,
            )
        return rules

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        """Decide `request` by the Cedar policies, or abstain (see the class)."""
        try:
            context = _context(request)
        except _Unrepresentable as exc:
            return self._refuse(f"{exc}; Cedar cannot evaluate this step")
        try:
            entities = self._entities(request)
            result = self._authorize(
                {
                    "principal": {"type": PRINCIPAL, "id": request.principal.id},
                    "action": {"type": ACTION, "id": request.capability},
                    "resource": {"type": CAPABILITY, "id": request.capability},
                    "context": context,
                },
                self._set,
                entities,
                self._schema,
            )
        except ValueError as exc:  # cedarpy: entities or request rejected
            return self._refuse(f"Cedar rejected the request: {_one_line(exc)}")
        diagnostics = result.diagnostics
        answers: list[tuple[int, Verdict, str, str]] = []
        for error in diagnostics.errors:
            found = _ERRORED.search(error)
            if found is None:  # not one policy's error: the request itself failed
                return self._refuse(f"Cedar could not decide: {_one_line(error)}")
            rule = self._rules[found.group(1)]
            # A forbid, or a permit that tightens (asks approval or a dry run),
            # that cannot be evaluated denies: skipping it would let an agent
            # escape it by leaving out the field it reads.
            if rule.effect == "forbid" or rule.verdict is not Verdict.ALLOW:
                detail = _one_line(error[found.end() :].lstrip(": ") or error)
                answers.append(
                    (
                        rule.index,
                        Verdict.DENY,
                        rule.rule_id,
                        f"Cedar policy {rule.rule_id!r} could not be evaluated "
                        f"({detail}); denied until it can",
                    )
                )
        for cedar_id in diagnostics.reasons:
            rule = self._rules[cedar_id]
            reason = rule.reason or (
                f"Cedar policy {rule.rule_id!r} "
                f"{'forbids' if rule.effect == 'forbid' else 'permits'} "
                f"{request.capability}"
            )
            answers.append((rule.index, rule.verdict, rule.rule_id, reason))
        if not answers:
            if self.no_permit == "deny":
                return self._refuse(
                    f"no Cedar policy permits {request.capability} for "
                    f"{request.principal.id!r}"
                )
            return None
        answers.sort()  # file order: Cedar reports satisfied policies unordered
        return combine((v, rule_id, why) for _, v, rule_id, why in answers)

    def _refuse(self, reason: str) -> Decision:
        return Decision(verdict=Verdict.DENY, rule_ids=(self.id,), reasons=(reason,))

    def _entities(self, request: DecisionRequest) -> cedarpy.Entities:
        principal = request.principal
        key = (
            principal,
            request.capability,
            request.version,
            request.effect,
            request.scopes,
        )
        found = self._cache.get(key)
        if found is None:
            attrs: dict[str, Any] = {
                "id": principal.id,
                "tenant": principal.tenant,
                "roles": list(principal.roles),
                "scopes": list(principal.scopes),
            }
            if principal.on_behalf_of is not None:
                attrs["on_behalf_of"] = principal.on_behalf_of
            parents = [{"type": ROLE, "id": role} for role in principal.roles]
            parents.append({"type": TENANT, "id": principal.tenant})
            delta = [
                {
                    "uid": {"type": PRINCIPAL, "id": principal.id},
                    "attrs": attrs,
                    "parents": parents,
                },
                {
                    "uid": {"type": CAPABILITY, "id": request.capability},
                    "attrs": {
                        "name": request.capability,
                        "version": request.version,
                        "effect": request.effect,
                        "scopes": list(request.scopes),
                    },
                    "parents": [],
                },
            ]
            found = self._base.with_added_json_str(json.dumps(delta), self._schema)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()  # bounded; a clear is cheaper than LRU upkeep
            self._cache[key] = found
        return found


def _parse_schema(cedar: Any, schema: str | Mapping[str, Any], id: str) -> Any:
    try:
        if isinstance(schema, str) and not schema.lstrip().startswith("{"):
            return cedar.Schema.from_str(schema)
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cedar.Schema.from_json_str(text)
    except ValueError as exc:
        raise UsageError(
            f"Cedar schema of {id!r} does not parse: {_one_line(exc)}"
        ) from exc


def _check_entities(text: str, id: str) -> None:
    try:
        given = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"Cedar entities of {id!r} are not JSON: {_one_line(exc)}"
        ) from exc
    for entity in given if isinstance(given, list) else ():
        uid = entity.get("uid") if isinstance(entity, dict) else None
        if isinstance(uid, dict) and uid.get("type") in (PRINCIPAL, CAPABILITY):
            raise UsageError(
                f"Cedar entities of {id!r} hold {uid['type']}::{uid.get('id')!r}; tether "
                f"makes the {PRINCIPAL} and {CAPABILITY} entities of each step "
                "itself: describe roles, tenants or groups instead"
            )


def _context(request: DecisionRequest) -> dict[str, Any]:
    context = _record(request.context, "context")
    context["args"] = _record(request.args, "context.args")
    context["tenant"] = request.principal.tenant
    context["steps"] = request.steps_so_far
    cost = request.cost_so_far
    if cost.is_finite() and abs(cost) <= _DECIMAL_MAX:  # else _decimal refuses it
        # Rounded up, so a budget check in Cedar errs on the side of refusing.
        cost = cost.quantize(_PLACES, rounding=ROUND_CEILING)
    context["cost"] = _decimal(cost, "context.cost")
    if request.at is not None:
        context["time"] = _datetime(request.at, "context.time")
    return context


def _record(values: Mapping[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise _Unrepresentable(f"{path}: key {key!r} is not text")
        if key in _RESERVED_KEYS:
            # Cedar's JSON reads these as entity or extension escapes: agent data
            # must not forge an entity reference.
            raise _Unrepresentable(f"{path}: the key {key!r} is reserved by Cedar")
        if value is not None:  # Cedar has no null: a None field is absent (`has`)
            out[key] = _value(value, f"{path}.{key}")
    return out


def _value(value: object, path: str) -> Any:
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _I64[0] <= value <= _I64[1]:
            raise _Unrepresentable(f"{path}: {value} is beyond Cedar's 64-bit longs")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Unrepresentable(f"{path}: {value!r} has no Cedar form")
        return _decimal(Decimal(repr(value)), path)
    if isinstance(value, Decimal):
        return _decimal(value, path)
    if isinstance(value, datetime):
        return _datetime(value, path)
    if isinstance(value, Mapping):
        return _record(value, path)
    if isinstance(value, list | tuple | Set):
        return [_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise _Unrepresentable(
        f"{path}: a {type(value).__name__} has no Cedar form; pass JSON-like data"
    )


def _decimal(value: Decimal, path: str) -> dict[str, Any]:
    # The bound first: quantizing a huge decimal overflows the context's precision.
    if (
        not value.is_finite()
        or abs(value) > _DECIMAL_MAX
        or value.quantize(_PLACES) != value
    ):
        raise _Unrepresentable(
            f"{path}: {value} does not fit Cedar's decimal (4 places, up to "
            f"{_DECIMAL_MAX})"
        )
    return {"__extn": {"fn": "decimal", "arg": f"{value.quantize(_PLACES):f}"}}


def _datetime(value: datetime, path: str) -> dict[str, Any]:
    if value.tzinfo is None:
        raise _Unrepresentable(f"{path}: a naive datetime; use an aware UTC time")
    utc = value.astimezone(UTC)
    text = f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"
    return {"__extn": {"fn": "datetime", "arg": text}}


def _one_line(exc: object) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__
