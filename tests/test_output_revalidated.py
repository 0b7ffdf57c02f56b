"""An output built with `model_construct()` is validated for the first caller too.

`model_construct()` skips pydantic's checks, so a handler can return an
instance of the right class with wrongly typed fields. The first caller must
get what a keyed retry later reads back from the record (validated), never the
unchecked instance; an output that cannot be valid fails the call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import BaseModel, SecretStr

import tether
from tether.record import OutcomeStatus

BOT = tether.Principal("bot", tenant="acme")


def bad(value: object) -> Any:
    """`value` as whatever a field wants: what a careless handler passes."""
    return cast(Any, value)


NOTHING: dict[str, Any] = {}


class In(BaseModel):
    n: int


class Inner(BaseModel):
    k: int


class Out(BaseModel):
    n: int
    inner: Inner | None = None


def _app(tmp_path: Path, made: Any) -> tether.Tether:
    @tether.capability("svc.make", effect="write", idempotency="keyed")
    def make(args: In) -> Out:
        return made()  # type: ignore[no-any-return]

    app = tether.Tether(db=f"sqlite:///{tmp_path / 'tether.db'}", env={})
    app.register(make)
    return app


@pytest.mark.parametrize(
    "made",
    [
        lambda: Out.model_construct(n=bad("5")),
        lambda: Out.model_construct(n=bad(5.0)),
        lambda: Out.model_construct(n=5, inner=Inner.model_construct(k=bad("7"))),
    ],
    ids=["str-for-int", "float-for-int", "nested"],
)
def test_a_constructed_output_reaches_the_first_caller_validated(
    tmp_path: Path, made: Any
) -> None:
    app = _app(tmp_path, made)
    with app, app.run(principal=BOT, request="x") as run:
        first = run.step("svc.make", {"n": 1}, idempotency_key="k")
        again = run.step("svc.make", {"n": 1}, idempotency_key="k")

    assert first.status is OutcomeStatus.EXECUTED
    assert again.status is OutcomeStatus.IDEMPOTENT_HIT
    out: Any = first.output
    assert type(out.n) is int
    if out.inner is not None:
        assert type(out.inner.k) is int
    assert out == again.output
    assert out.model_dump() == bad(again.output).model_dump()


@pytest.mark.parametrize(
    "made",
    [
        lambda: Out.model_construct(**NOTHING),
        lambda: Out.model_construct(n=bad("five")),
        lambda: Out.model_construct(n=5, inner=Inner.model_construct(**NOTHING)),
    ],
    ids=["missing", "wrong-type", "nested-missing"],
)
def test_a_constructed_output_that_cannot_be_valid_fails_the_call(
    tmp_path: Path, made: Any
) -> None:
    app = _app(tmp_path, made)
    with app, app.run(principal=BOT, request="x") as run:
        outcome = run.step("svc.make", {"n": 1}, idempotency_key="k")

    assert outcome.status is not OutcomeStatus.EXECUTED
    assert outcome.output is None
    assert isinstance(outcome.error, tether.errors.InvalidOutput)


class Measured(BaseModel):
    """A float field makes the output free-form (checked for NaN): the other branch."""

    n: int
    ratio: float


class Issued(BaseModel):
    n: int
    token: SecretStr


def test_a_constructed_free_form_output_reaches_the_first_caller_validated(
    tmp_path: Path,
) -> None:
    @tether.capability("svc.measure", effect="write", idempotency="keyed")
    def measure(args: In) -> Measured:
        return Measured.model_construct(n=bad("5"), ratio=1)

    app = tether.Tether(db=f"sqlite:///{tmp_path / 'tether.db'}", env={})
    app.register(measure)
    with app, app.run(principal=BOT, request="x") as run:
        first = run.step("svc.measure", {"n": 1}, idempotency_key="k")
        again = run.step("svc.measure", {"n": 1}, idempotency_key="k")

    got: Any = first.output
    assert (type(got.n), type(got.ratio)) == (int, float)
    assert first.output == again.output


def test_a_constructed_secret_output_is_validated_and_keeps_its_clear_value(
    tmp_path: Path,
) -> None:
    @tether.capability("svc.issue", effect="write")
    def issue(args: In) -> Issued:
        return Issued.model_construct(n=bad("5"), token=SecretStr("s3cret"))

    app = tether.Tether(db=f"sqlite:///{tmp_path / 'tether.db'}", env={})
    app.register(issue)
    with app, app.run(principal=BOT, request="x") as run:
        out = run.step("svc.issue", {"n": 1})

    assert out.status is OutcomeStatus.EXECUTED
    got: Any = out.output
    assert type(got.n) is int
    assert got.token.get_secret_value() == "s3cret"
