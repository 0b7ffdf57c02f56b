"""Capability input fuzzing (I.57): every input is accepted and valid, or rejected typed.

Hypothesis feeds arbitrary JSON values and mutated valid inputs to capabilities,
hand-written and built from public tool schemas (BFCL, ToolTalk). pydantic's own
verdict on the same value is the oracle: what it accepts must run the handler once
with that model; what it rejects must be `invalid` with `ValidationFailed` and
never reach the handler. On failure Hypothesis prints the falsifying example and
a `@reproduce_failure` blob; `--hypothesis-seed` replays a run.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import anyio
import orjson
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

import tether
from strategies import (
    INT64,
    Handled,
    bfcl_doc,
    capability_from_doc,
    json_values,
    mutated,
    mutated_args,
    tooltalk_doc,
)

FUZZ = settings(max_examples=30, deadline=None, print_blob=True)
"""CI-sized: a few hundred examples over the whole module."""


class Line(BaseModel, extra="forbid"):
    sku: str = Field(min_length=1, max_length=20)
    quantity: int = Field(ge=1, le=1000)


class OrderIn(BaseModel, extra="forbid"):
    order_id: str = Field(pattern=r"^o-[0-9]+$")
    amount_cents: int = Field(gt=0)
    currency: Literal["EUR", "USD"] = "EUR"
    rush: bool = False
    weight_kg: float | None = None
    lines: list[Line] = []
    notes: dict[str, str] = {}
    meta: dict[str, Any] = {}


class OrderOut(BaseModel):
    order_id: str
    charged_cents: int = Field(ge=0)
    lines: list[Line] = []


_orders = Handled()


@tether.capability("orders.place", effect="write", idempotency="keyed")
def place(args: OrderIn) -> OrderOut:
    """Place an order."""
    _orders.args.append(args)
    return OrderOut(order_id=args.order_id, charged_cents=args.amount_cents)


@tether.capability("orders.quote")
async def quote(args: OrderIn) -> OrderOut:
    """Quote an order (async)."""
    _orders.args.append(args)
    return OrderOut(order_id=args.order_id, charged_cents=0)


_returned: list[object] = []


@tether.capability("orders.lookup")
def lookup(args: Line) -> OrderOut:
    """Return whatever the test put in `_returned`."""
    return _returned[-1]  # type: ignore[return-value]  # the output fuzz under test


_VALID_ORDER = st.fixed_dictionaries(
    {
        "order_id": st.integers(0, 10**6).map(lambda n: f"o-{n}"),
        "amount_cents": st.integers(1, INT64[1]),
    },
    optional={
        "currency": st.sampled_from(["EUR", "USD"]),
        "rush": st.booleans(),
        "weight_kg": st.none() | st.floats(allow_nan=False, allow_infinity=False),
        "lines": st.lists(
            st.fixed_dictionaries(
                {
                    "sku": st.text(min_size=1, max_size=20),
                    "quantity": st.integers(1, 1000),
                }
            ),
            max_size=3,
        ),
        "notes": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        "meta": st.dictionaries(st.text(max_size=5), json_values(), max_size=3),
    },
)

PUBLIC = {
    "bfcl:add": lambda: bfcl_doc("add"),
    "bfcl:mean": lambda: bfcl_doc("mean"),
    "bfcl:edit_ticket": lambda: bfcl_doc("edit_ticket"),
    "bfcl:post_tweet": lambda: bfcl_doc("post_tweet"),
    "bfcl:lockDoors": lambda: bfcl_doc("lockDoors"),
    "tooltalk:SendEmail": lambda: tooltalk_doc("SendEmail"),
    "tooltalk:CreateEvent": lambda: tooltalk_doc("CreateEvent"),
}


@cache
def _public(name: str) -> tuple[dict[str, Any], tether.Capability[Any, Any], Handled]:
    doc = PUBLIC[name]()
    handled = Handled()
    return doc, capability_from_doc(doc, handled=handled), handled


def _expected(model: type[BaseModel], args: object) -> BaseModel | None:
    """Return what pydantic makes of `args`, or None when it rejects them."""
    value = {} if args is None else args
    try:
        if isinstance(value, (str, bytes)):
            return model.model_validate_json(value)
        return model.model_validate(value)
    except pydantic.ValidationError:
        return None


def _check(
    outcome: tether.Outcome,
    handled: list[BaseModel],
    model: type[BaseModel],
    args: object,
) -> None:
    """Assert the gateway and pydantic agree, and the handler saw only valid models."""
    expected = _expected(model, args)
    if expected is None:
        assert outcome.status is tether.OutcomeStatus.INVALID, outcome
        assert type(outcome.error) is tether.ValidationFailed
        assert "\n" not in outcome.error.message
        assert handled == []
    else:
        assert outcome.status is tether.OutcomeStatus.EXECUTED, outcome.error
        assert len(handled) == 1
        (got,) = handled
        assert type(got) is model
        assert got == expected


def _as_sent(value: object, form: str) -> object:
    if form == "text":
        return orjson.dumps(value).decode()
    if form == "bytes":
        return orjson.dumps(value)
    return value


_FORMS = st.sampled_from(["mapping", "text", "bytes"])


# -- inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_tool_inputs_are_accepted_or_rejected_typed(
    principal: tether.Principal, name: str
) -> None:
    """Fuzzed args for a public tool either run it with a valid model or are invalid."""
    doc, cap, handled = _public(name)
    app = tether.Tether(db="memory://")
    app.register(cap)

    @FUZZ
    @given(args=mutated_args(doc), form=_FORMS)
    def check(args: object, form: str) -> None:
        handled.args.clear()
        sent = _as_sent(args, form)
        with app.run(principal=principal, request="fuzz") as run:
            outcome = run.step(cap.name, sent)  # type: ignore[arg-type]
        _check(outcome, handled.args, cap.input_model, sent)

    check()


def test_order_inputs_are_accepted_or_rejected_typed(
    principal: tether.Principal,
) -> None:
    """Mutated orders (constraints, literals, nesting) agree with pydantic's verdict."""
    app = tether.Tether(db="memory://")
    app.register(place)

    @settings(FUZZ, max_examples=80)
    @given(args=mutated(_VALID_ORDER), form=_FORMS)
    def check(args: object, form: str) -> None:
        _orders.args.clear()
        sent = _as_sent(args, form)
        with app.run(principal=principal, request="fuzz") as run:
            outcome = run.step("orders.place", sent)  # type: ignore[arg-type]
        _check(outcome, _orders.args, OrderIn, sent)

    check()


def test_arbitrary_json_never_escapes_as_another_error(
    principal: tether.Principal,
) -> None:
    """Any JSON value as args, through `call`, returns or raises ValidationFailed only."""
    app = tether.Tether(db="memory://")
    app.register(place)

    @settings(FUZZ, max_examples=60)
    @given(args=json_values(max_leaves=20), form=_FORMS)
    def check(args: object, form: str) -> None:
        _orders.args.clear()
        sent = _as_sent(args, form)
        expected = _expected(OrderIn, sent)
        with app.run(principal=principal, request="fuzz") as run:
            if expected is None:
                with pytest.raises(tether.ValidationFailed) as info:
                    run.call("orders.place", sent)  # type: ignore[call-overload]
                assert info.value.outcome is not None
                assert info.value.outcome.status is tether.OutcomeStatus.INVALID
                assert _orders.args == []
            else:
                out = run.call("orders.place", sent)  # type: ignore[call-overload]
                assert isinstance(out, OrderOut)
                assert _orders.args == [expected]

    check()


def test_async_driver_agrees_with_pydantic(principal: tether.Principal) -> None:
    """Through `astep`, an async handler sees only valid models too."""
    app = tether.Tether(db="memory://")
    app.register(quote)

    @FUZZ
    @given(args=mutated(_VALID_ORDER))
    def check(args: object) -> None:
        _orders.args.clear()

        async def go() -> tether.Outcome:
            async with app.run(principal=principal, request="fuzz") as run:
                return await run.astep("orders.quote", args)  # type: ignore[arg-type]

        outcome = anyio.run(go)
        _check(outcome, _orders.args, OrderIn, args)

    check()


# -- outputs -----------------------------------------------------------------------------


def _constructed(fields: dict[str, Any]) -> OrderOut:
    return OrderOut.model_construct(
        **fields
    )  # no validation: what a careless handler does


def _changed_after_validation(cents: int) -> OrderOut:
    out = OrderOut(order_id="o-1", charged_cents=1)
    out.charged_cents = cents  # pydantic does not validate assignment by default
    return out


_OUTPUTS = st.one_of(
    json_values(),
    st.fixed_dictionaries(
        {"order_id": st.text(max_size=5), "charged_cents": st.integers(*INT64)},
        optional={"lines": json_values(max_leaves=4)},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "order_id": st.text(max_size=5) | json_values(max_leaves=2),
            "charged_cents": st.integers(-5, 5) | json_values(max_leaves=2),
        },
    ).map(_constructed),
    st.integers(-5, 5).map(_changed_after_validation),
    st.just(Line(sku="a", quantity=1)),
)
"""Output candidates: JSON, near-valid dicts, and model instances that skipped validation."""


def test_outputs_that_break_the_schema_are_invalid_output(
    principal: tether.Principal,
) -> None:
    """A handler's output is returned when it fits the schema, else InvalidOutput."""
    app = tether.Tether(db="memory://")
    app.register(lookup)
    line = {"sku": "a", "quantity": 1}

    @settings(FUZZ, max_examples=60)
    @given(value=_OUTPUTS)
    def check(value: object) -> None:
        _returned.append(value)
        with app.run(principal=principal, request="fuzz") as run:
            outcome = run.step("orders.lookup", line)
        expected = _expected_output(value)
        if expected is None:
            assert outcome.status is tether.OutcomeStatus.FAILED, outcome
            assert type(outcome.error) is tether.InvalidOutput
            with pytest.raises(tether.InvalidOutput):
                outcome.unwrap()
        else:
            assert outcome.status is tether.OutcomeStatus.EXECUTED, outcome.error
            assert outcome.output == expected

    check()


def _expected_output(value: object) -> OrderOut | None:
    if isinstance(value, BaseModel):
        value = dict(value.__dict__)  # its fields as they are, validated or not
    try:
        return OrderOut.model_validate(value)
    except pydantic.ValidationError:
        return None


# -- the record stays whole -------------------------------------------------------------------


def test_fuzzed_run_record_verifies(
    app: tether.Tether, principal: tether.Principal
) -> None:
    """A run of fuzzed calls on a SQLite file keeps one terminal event per step and verifies."""
    app.register(place)
    examples: list[object] = []

    @settings(FUZZ, max_examples=40)
    @given(args=mutated(_VALID_ORDER))
    def collect(args: object) -> None:
        examples.append(args)

    collect()
    with app.run(principal=principal, request="fuzz") as run:
        outcomes = [run.step("orders.place", a) for a in examples]  # type: ignore[arg-type]

    report = app.verify(run.id)
    kinds = [e.data()["kind"] for e in app.store.events(run.id)]

    assert report.ok, report.reason
    terminal = {"executed", "failed", "in_doubt", "idempotent_hit"}
    assert sum(k in terminal for k in kinds) == len(outcomes)
