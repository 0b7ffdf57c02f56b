"""Capability definitions: the decorator, its checks, tool schemas and the registry."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, Field

import tether
from strategies import (
    Handled,
    bfcl_doc,
    capability_from_doc,
    public_name,
    tooltalk_doc,
    tooltalk_gold_calls,
)
from tether.capability import Registry


class HostIn(BaseModel, extra="forbid"):
    host: str = Field(min_length=1)


class HostOut(BaseModel):
    host: str
    up: bool


class OtherOut(BaseModel):
    done: bool


def _ping(args: HostIn) -> HostOut:
    """Check that a host answers."""
    return HostOut(host=args.host, up=True)


def _ping_ctx(args: HostIn, ctx: tether.CallContext) -> HostOut:
    return HostOut(host=f"{args.host}@{ctx.run_id}/{ctx.step}", up=not ctx.dry_run)


async def _aping(args: HostIn) -> HostOut:
    await asyncio.sleep(0)
    return HostOut(host=args.host, up=True)


async def _aping_ctx(args: HostIn, ctx: tether.CallContext) -> HostOut:
    await asyncio.sleep(0)
    return HostOut(host=f"{args.host}@{ctx.run_id}/{ctx.step}", up=not ctx.dry_run)


def _call(run: tether.Run, mode: str, *args: Any, **kwargs: Any) -> Any:
    if mode == "sync":
        return run.call(*args, **kwargs)
    return anyio.run(partial(run.acall, *args, **kwargs))


# -- the decorator on sync and async handlers ------------------------------------------


@pytest.mark.parametrize(
    ("fn", "is_async", "wants_ctx"),
    [
        (_ping, False, False),
        (_ping_ctx, False, True),
        (_aping, True, False),
        (_aping_ctx, True, True),
    ],
    ids=["sync", "sync-ctx", "async", "async-ctx"],
)
def test_decorator_detects_the_handler_shape_once(
    fn: Any, is_async: bool, wants_ctx: bool
) -> None:
    """The decorator records whether a handler is async and wants a context."""
    cap = tether.capability("net.ping")(fn)

    shape = cap.handler

    assert (shape.is_async, shape.wants_ctx) == (is_async, wants_ctx)
    assert (cap.input_model, cap.output_model) == (HostIn, HostOut)


@pytest.mark.parametrize("fn", [_ping, _aping], ids=["sync", "async"])
def test_handler_without_context_gets_validated_args(
    app: tether.Tether, principal: tether.Principal, mode: str, fn: Any
) -> None:
    """A handler that takes only args runs with a validated model and returns its output."""
    app.register(tether.capability("net.ping")(fn))

    with app.run(principal=principal, request="ping") as run:
        out = _call(run, mode, "net.ping", {"host": "db-1"})

    assert out == HostOut(host="db-1", up=True)


@pytest.mark.parametrize("fn", [_ping_ctx, _aping_ctx], ids=["sync", "async"])
def test_handler_with_context_gets_run_and_step(
    app: tether.Tether, principal: tether.Principal, mode: str, fn: Any
) -> None:
    """A handler that takes `ctx` receives the run id and the step number."""
    app.register(tether.capability("net.ping")(fn))

    with app.run(principal=principal, request="ping") as run:
        _call(run, mode, "net.ping", {"host": "a"})
        out = _call(run, mode, "net.ping", {"host": "b"})

    assert out.host == f"b@{run.id}/2"
    assert out.up is True


def test_context_carries_the_idempotency_key(
    app: tether.Tether, principal: tether.Principal
) -> None:
    """A keyed write's handler sees the caller's idempotency key in its context."""
    seen: list[tether.CallContext] = []

    def reboot(args: HostIn, ctx: tether.CallContext) -> HostOut:
        seen.append(ctx)
        return HostOut(host=args.host, up=False)

    app.register(
        tether.capability("host.reboot", effect="write", idempotency="keyed")(reboot)
    )

    with app.run(principal=principal, request="reboot") as run:
        run.call("host.reboot", {"host": "db-1"}, idempotency_key="reboot-db-1")

    assert [(c.capability, c.idempotency_key, c.dry_run) for c in seen] == [
        ("host.reboot", "reboot-db-1", False)
    ]


# -- what the decorator refuses --------------------------------------------------------


def test_destructive_capability_without_dry_run_is_refused() -> None:
    """A destructive capability declared without a dry-run handler raises UsageError."""
    decorate = tether.capability("host.wipe", effect="destructive")

    with pytest.raises(tether.UsageError, match="dry-run"):
        decorate(_ping)


def test_destructive_capability_with_dry_run_is_accepted() -> None:
    """A destructive capability with a matching dry-run handler is defined."""
    cap = tether.capability("host.wipe", effect="destructive", dry_run=_ping_ctx)(_ping)

    assert cap.dry_run_handler is not None
    assert cap.dry_run_handler.wants_ctx is True
    assert cap.idempotency is tether.Idempotency.NONE


def test_dry_run_with_other_models_is_refused() -> None:
    """A dry-run handler whose output model differs from the handler's raises UsageError."""

    def predict(args: HostIn) -> OtherOut:
        return OtherOut(done=False)

    decorate = tether.capability("host.wipe", effect="destructive", dry_run=predict)

    with pytest.raises(tether.UsageError, match="dry-run handler must take HostIn"):
        decorate(_ping)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Net.ping",
        "net.Ping",
        "net..ping",
        ".net",
        "net.",
        "1net.ping",
        "net.ping-now",
        "net ping",
        "net/ping",
        "net.ping\n",
    ],
)
def test_bad_name_is_refused(name: str) -> None:
    """A name that is not dotted lowercase words raises UsageError naming it."""
    with pytest.raises(tether.UsageError, match="is invalid"):
        tether.capability(name)


@pytest.mark.parametrize("name", ["ping", "net.ping", "infra.k8s.restart_pod"])
def test_good_name_is_accepted(name: str) -> None:
    """Dotted lowercase words (digits and underscores after the first letter) are names."""
    cap = tether.capability(name)(_ping)

    assert cap.name == name


def _dict_arg(args: dict) -> HostOut:  # type: ignore[type-arg]
    return HostOut(host="x", up=True)


def _int_return(args: HostIn) -> int:
    return 1


def _no_annotations(args, ctx):  # type: ignore[no-untyped-def]
    return None


def _no_params() -> HostOut:
    return HostOut(host="x", up=True)


def _three_params(args: HostIn, ctx: tether.CallContext, extra: int) -> HostOut:
    return HostOut(host="x", up=True)


def _none_return(args: HostIn) -> None:
    return None


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_dict_arg, "argument annotation must be a pydantic BaseModel"),
        (_int_return, "return annotation must be a pydantic BaseModel"),
        (_no_annotations, "argument annotation must be a pydantic BaseModel"),
        (_none_return, "return annotation must be a pydantic BaseModel"),
        (_no_params, "got 0 parameters"),
        (_three_params, "got 3 parameters"),
    ],
    ids=["dict-arg", "int-return", "none", "none-return", "no-params", "three-params"],
)
def test_annotations_that_are_not_models_are_refused(fn: Any, message: str) -> None:
    """A handler whose first parameter or return is not a pydantic model raises UsageError."""
    decorate = tether.capability("net.ping")

    with pytest.raises(tether.UsageError, match=message):
        decorate(fn)


def test_unresolvable_annotation_is_refused() -> None:
    """A handler annotated with a name that does not resolve raises UsageError, not NameError."""

    def handler(args: NoSuchModel) -> HostOut:  # type: ignore[name-defined]  # noqa: F821
        return HostOut(host="x", up=True)

    with pytest.raises(tether.UsageError, match="cannot resolve the annotations"):
        tether.capability("net.ping")(handler)


def test_not_callable_is_refused() -> None:
    """Decorating something that is not callable raises UsageError."""
    with pytest.raises(tether.UsageError, match="not callable"):
        tether.capability("net.ping")("not a function")  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"effect": "explode"}, "'explode' is not a valid Effect"),
        ({"idempotency": "maybe"}, "'maybe' is not a valid Idempotency"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"timeout": -1.5}, "timeout must be > 0"),
        ({"timeout": float("nan")}, "timeout must be > 0"),
        ({"timeout": float("inf")}, "timeout must be > 0"),
    ],
)
def test_bad_declaration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    """An unknown effect or idempotency, or a timeout <= 0, raises UsageError."""
    with pytest.raises(tether.UsageError, match=message):
        tether.capability("net.ping", **kwargs)


@pytest.mark.parametrize(
    ("effect", "idempotency"),
    [("read", "native"), ("write", "none"), ("destructive", "none")],
)
def test_idempotency_defaults_follow_the_effect(effect: str, idempotency: str) -> None:
    """Reads default to `native` idempotency and writes to `none`."""
    cap = tether.capability("host.act", effect=effect, dry_run=_ping)(_ping)

    assert cap.idempotency == idempotency
    assert cap.effect == effect


def test_timeout_in_seconds_becomes_a_timedelta() -> None:
    """A timeout given in seconds is kept as a `timedelta`."""
    cap = tether.capability("net.ping", timeout=2.5)(_ping)

    assert cap.timeout == timedelta(seconds=2.5)


def test_scopes_are_sorted_and_unique_and_description_defaults_to_docstring() -> None:
    """Scopes are kept sorted without duplicates; the docstring is the description."""
    cap = tether.capability("net.ping", scopes=["net:write", "net:read", "net:write"])(
        _ping
    )

    assert cap.scopes == ("net:read", "net:write")
    assert cap.description == "Check that a host answers."


# -- cost ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        (0, Decimal(0)),
        (7, Decimal(7)),
        ("0.25", Decimal("0.25")),
        (Decimal("1.10"), Decimal("1.10")),
        (0.1, Decimal("0.1")),
        (1e-7, Decimal("1e-7")),
    ],
)
def test_cost_is_kept_as_an_exact_decimal(cost: Any, expected: Decimal) -> None:
    """A number cost becomes a Decimal; a float converts through its repr, exactly."""
    cap = tether.capability("net.ping", cost=cost)(_ping)

    assert cap.cost == expected
    assert isinstance(cap.cost, Decimal)
    assert cap.estimate_cost(HostIn(host="x")) == expected


@pytest.mark.parametrize(
    "cost", [-1, "-0.01", float("nan"), float("inf"), "lots", True, None, [1]]
)
def test_bad_cost_is_refused_at_definition(cost: Any) -> None:
    """A negative, non-finite, boolean or non-numeric cost raises UsageError."""
    decorate = tether.capability("net.ping", cost=cost)

    with pytest.raises(tether.UsageError, match="cost"):
        decorate(_ping)


def test_cost_function_float_converts_exactly() -> None:
    """A cost function that returns a float is charged its repr as a Decimal."""
    cap = tether.capability("net.ping", cost=lambda a: len(a.host) * 0.1)(_ping)

    charged = cap.estimate_cost(HostIn(host="abc"))

    assert charged == Decimal(repr(3 * 0.1))
    assert isinstance(charged, Decimal)


def test_cost_function_returning_garbage_is_a_usage_error() -> None:
    """A cost function that returns something that is not a number raises UsageError."""
    cap = tether.capability("net.ping", cost=lambda a: "free")(_ping)

    with pytest.raises(tether.UsageError, match="must be a number"):
        cap.estimate_cost(HostIn(host="abc"))


# -- tool schemas ------------------------------------------------------------------------


def test_mcp_tool_schema_shape() -> None:
    """The MCP schema has the name, description, both JSON schemas and effect hints."""
    cap = tether.capability("net.ping", description="Ping a host.")(_ping)

    schema = cap.tool_schema("mcp")

    assert schema == {
        "name": "net.ping",
        "description": "Ping a host.",
        "inputSchema": HostIn.model_json_schema(),
        "outputSchema": HostOut.model_json_schema(),
        "annotations": {
            "readOnlyHint": True,
            "destructiveHint": False,
            "idempotentHint": True,
        },
    }


def test_openai_tool_schema_replaces_dots() -> None:
    """The OpenAI schema is a function whose name has `__` for each dot."""
    cap = tether.capability("infra.k8s.restart", effect="destructive", dry_run=_ping)(
        _ping
    )

    schema = cap.tool_schema("openai")

    assert schema == {
        "type": "function",
        "function": {
            "name": "infra__k8s__restart",
            "description": "Check that a host answers.",
            "parameters": HostIn.model_json_schema(),
        },
    }


def test_destructive_mcp_hints() -> None:
    """A destructive `none` capability is hinted destructive and not idempotent."""
    cap = tether.capability("host.wipe", effect="destructive", dry_run=_ping)(_ping)

    hints = cap.tool_schema()["annotations"]

    assert hints == {
        "readOnlyHint": False,
        "destructiveHint": True,
        "idempotentHint": False,
    }


def test_unknown_tool_schema_flavor_is_refused() -> None:
    """An unknown tool schema flavor raises UsageError naming the known ones."""
    cap = tether.capability("net.ping")(_ping)

    with pytest.raises(tether.UsageError, match="'mcp' or 'openai'"):
        cap.tool_schema("anthropic")


# -- registry ------------------------------------------------------------------------------


def _versions(*versions: str) -> list[tether.Capability[HostIn, HostOut]]:
    return [tether.capability("net.ping", version=v)(_ping) for v in versions]


def test_registry_returns_the_version_registered_last() -> None:
    """`get(name)` returns the version registered last; `get(name, v)` that version."""
    registry = Registry()
    v1, v2 = _versions("1", "2")
    registry.add(v1)
    registry.add(v2)

    latest, first = registry.get("net.ping"), registry.get("net.ping", "1")

    assert (latest, first) == (v2, v1)


def test_registry_refuses_a_taken_version() -> None:
    """Another capability under a taken name and version raises UsageError."""
    registry = Registry()
    v1, again = _versions("1", "1")
    registry.add(v1)

    with pytest.raises(tether.UsageError, match="already registered; bump the version"):
        registry.add(again)


def test_registry_accepts_the_same_capability_twice() -> None:
    """Adding the very same capability again is harmless."""
    registry = Registry()
    (v1,) = _versions("1")
    registry.add(v1)

    registry.add(v1)

    assert len(registry) == 1
    assert registry.get("net.ping", "1") is v1


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("net.pong", None, "unknown capability 'net.pong'"),
        ("net.ping", "9", "no version"),
    ],
)
def test_registry_lookup_misses_are_not_found(
    name: str, version: str | None, message: str
) -> None:
    """An unknown name or version raises NotFound naming what is registered."""
    registry = Registry()
    registry.add(_versions("1")[0])

    with pytest.raises(tether.NotFound, match=message):
        registry.get(name, version)


def test_registry_refuses_what_is_not_a_capability() -> None:
    """Registering a plain function raises UsageError pointing at the decorator."""
    with pytest.raises(tether.UsageError, match=r"@tether\.capability"):
        Registry().add(_ping)  # type: ignore[arg-type]


def test_app_register_needs_a_capability(app: tether.Tether) -> None:
    """`register()` with nothing raises UsageError."""
    with pytest.raises(tether.UsageError, match="at least one"):
        app.register()


def test_app_register_returns_the_first(app: tether.Tether) -> None:
    """`register(a, b)` registers both and returns `a`."""
    a = tether.capability("b.first")(_ping)
    b = tether.capability("a.second")(_ping)

    got = app.register(a, b)

    assert got is a
    assert len(app.capabilities) == 2


def test_call_by_capability_object_uses_its_version(
    app: tether.Tether, principal: tether.Principal
) -> None:
    """Calling with a capability object runs that version, not the latest one."""
    v1 = tether.capability("net.ping", version="1")(_ping)
    v2 = tether.capability("net.ping", version="2")(_ping_ctx)
    app.register(v1, v2)

    with app.run(principal=principal, request="ping") as run:
        old = run.call(v1, {"host": "a"})
        new = run.call("net.ping", {"host": "a"})

    assert old.host == "a"
    assert isinstance(new, HostOut)
    assert new.host.startswith("a@")


def test_tool_schemas_are_sorted_by_name(app: tether.Tether) -> None:
    """`app.capabilities.tool_schemas()` lists each name once, sorted, latest version."""
    for name in ["z.last", "a.first", "m.middle"]:
        app.register(tether.capability(name)(_ping))
    app.register(tether.capability("a.first", version="2", description="v2")(_ping))

    schemas = app.capabilities.tool_schemas("openai")

    assert [s["function"]["name"] for s in schemas] == [  # type: ignore[index]
        "a__first",
        "m__middle",
        "z__last",
    ]
    assert schemas[0]["function"]["description"] == "v2"  # type: ignore[index]


# -- capabilities from public tool schemas ------------------------------------------------

BFCL_TOOLS = [
    "add",
    "mean",
    "edit_ticket",
    "create_ticket",
    "post_tweet",
    "authenticate_twitter",
    "lockDoors",
]
TOOLTALK_TOOLS = ["ChangePassword", "SendEmail", "CreateEvent", "CurrentWeather"]


def test_public_tool_docs_register_as_capabilities(app: tether.Tether) -> None:
    """BFCL and ToolTalk tool docs become capabilities whose schemas keep their fields."""
    docs = [bfcl_doc(n) for n in BFCL_TOOLS] + [tooltalk_doc(n) for n in TOOLTALK_TOOLS]

    for doc in docs:
        app.register(capability_from_doc(doc))
    schemas = {s["name"]: s for s in app.capabilities.tool_schemas()}

    assert len(schemas) == len(docs)
    for doc in docs:
        schema = schemas[public_name(doc["name"])]
        params = schema["inputSchema"]
        assert isinstance(params, dict)
        assert set(params["properties"]) == set(doc["parameters"]["properties"])
        assert set(params.get("required", [])) == set(doc["parameters"]["required"])
        assert schema["description"] == doc["description"]


def test_tooltalk_gold_calls_validate_against_their_specs(
    app: tether.Tether, principal: tether.Principal
) -> None:
    """Every gold API call of ToolTalk's easy conversations runs on its spec's capability."""
    handled = Handled()
    gold = tooltalk_gold_calls()
    for api in sorted({name for name, _ in gold}):
        app.register(capability_from_doc(tooltalk_doc(api), handled=handled))

    with app.run(principal=principal, request="tooltalk easy") as run:
        outcomes = [run.step(public_name(api), args) for api, args in gold]

    assert [o.status for o in outcomes] == [tether.OutcomeStatus.EXECUTED] * len(gold)
    assert [a.model_dump(exclude_none=True) for a in handled.args] == [
        args for _, args in gold
    ]
    assert app.verify(run.id).ok


def test_public_tool_rejects_missing_required_field(
    app: tether.Tether, principal: tether.Principal
) -> None:
    """A BFCL tool called without a required field is invalid and never runs."""
    handled = Handled()
    app.register(capability_from_doc(bfcl_doc("edit_ticket"), handled=handled))

    with app.run(principal=principal, request="edit") as run:
        outcome = run.step("public.edit_ticket", {"ticket_id": 7})

    assert outcome.status is tether.OutcomeStatus.INVALID
    assert isinstance(outcome.error, tether.ValidationFailed)
    assert "updates: Field required" in outcome.error.message
    assert handled.args == []
