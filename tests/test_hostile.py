"""Hostile inputs (G.50): huge, deep, non-finite, ambiguous or malformed args.

Each input is either rejected with `ValidationFailed` (one line naming the
problem, nothing reaching the handler) or accepted exactly as sent; never another
exception. The run's record verifies afterwards either way.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

import tether

MB = 1 << 20


class SinkIn(BaseModel, extra="forbid"):
    text: str = ""
    number: int = 0
    ratio: float = 0.0
    meta: dict[str, Any] = {}
    anything: Any = None


class SinkOut(BaseModel):
    received: bool


_received: list[SinkIn] = []


@tether.capability("hostile.sink")
def sink(args: SinkIn) -> SinkOut:
    """Keep what arrived."""
    _received.append(args)
    return SinkOut(received=True)


def _nested_dicts(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _nested_text(depth: int) -> str:
    return '{"meta":' + '{"a":' * depth + "{}" + "}" * depth + "}"


@dataclass(frozen=True)
class Case:
    """One hostile input: what is sent, and what the handler may see if it is accepted."""

    args: object
    problem: str
    """Regex the rejection message must match (it names the problem)."""
    exact: dict[str, Any] | None = None
    """The fields the handler must see when the input is accepted; None: must be rejected."""


HUGE = 2**70 + 1  # not a float in disguise: float(HUGE) != HUGE

CASES: dict[str, Case] = {
    # size
    "10mb-string-in-mapping": Case({"text": "x" * (10 * MB)}, r"limit|bytes|large"),
    "10mb-json-text": Case(
        orjson.dumps({"text": "x" * (10 * MB)}).decode(), r"limit|bytes|large"
    ),
    "10mb-json-bytes": Case(orjson.dumps({"text": "x" * (10 * MB)}), r"limit|bytes"),
    "200k-keys-in-mapping": Case(
        {"meta": {f"k{i}": i for i in range(200_000)}}, r"limit|bytes|large"
    ),
    # depth
    "10k-deep-json-text": Case(_nested_text(10_000), r"deep|depth"),
    "10k-deep-dicts": Case({"meta": _nested_dicts(10_000)}, r"deep|depth"),
    "10k-deep-lists-in-any": Case({"anything": _nested_lists(10_000)}, r"deep|depth"),
    "300-deep-json-text": Case(_nested_text(300), r"deep|depth"),
    "300-deep-dicts": Case({"meta": _nested_dicts(300)}, r"deep|depth"),
    "100-deep-dicts": Case(
        {"meta": _nested_dicts(100)},
        r"deep|depth",
        exact={"meta": _nested_dicts(100)},
    ),
    # huge integers
    "2**70-int-field": Case({"number": HUGE}, r"64-bit|integer|large"),
    "2**70-any-field": Case({"anything": HUGE}, r"64-bit|integer|large"),
    "2**70-int-field-text": Case(f'{{"number": {HUGE}}}', r"64-bit|integer|large"),
    "2**70-any-field-text": Case(f'{{"anything": {HUGE}}}', r"64-bit|integer|large"),
    "-2**70-any-in-dict-text": Case(
        f'{{"meta": {{"n": -{HUGE}}}}}', r"64-bit|integer|large"
    ),
    # NaN and infinities
    "nan-float-field": Case({"ratio": math.nan}, r"NaN|finite"),
    "inf-float-field": Case({"ratio": math.inf}, r"NaN|finite|Infinity"),
    "nan-any-field": Case({"anything": [1.0, math.nan]}, r"NaN|finite"),
    "-inf-in-dict": Case({"meta": {"x": -math.inf}}, r"NaN|finite|Infinity"),
    "nan-json-text": Case('{"ratio": NaN}', r"JSON|NaN"),
    "infinity-json-text": Case('{"anything": -Infinity}', r"JSON|Infinity"),
    "1e999-json-text": Case('{"ratio": 1e999}', r"JSON|finite|infinity"),
    # duplicate keys
    "duplicate-top-level-keys": Case(
        '{"text": "benign", "text": "evil"}', r"duplicate"
    ),
    "duplicate-nested-keys": Case(
        '{"meta": {"to": "alice", "to": "mallory"}}', r"duplicate"
    ),
    # invalid UTF-8 and surrogates
    "invalid-utf8-bytes": Case(b'{"text": "\xff\xfe"}', r"UTF-8|utf-8"),
    "overlong-utf8-bytes": Case(b'{"text": "\xc0\xaf"}', r"UTF-8|utf-8"),
    "truncated-utf8-bytes": Case(b'{"text": "\xe2\x82"}', r"UTF-8|utf-8"),
    "lone-surrogate-in-mapping": Case({"text": "a\ud800b"}, r"surrogate|UTF-8"),
    "lone-surrogate-in-key": Case({"meta": {"\udfff": 1}}, r"surrogate|UTF-8"),
    "lone-surrogate-escaped-text": Case('{"text": "\\ud800"}', r"surrogate|JSON"),
    "lone-surrogate-raw-text": Case('{"text": "\ud800"}', r"surrogate|UTF-8"),
    # the caller's keys, quoted in the message: escaped and cut, one line
    "extra-key-with-line-breaks": Case(
        {"a\nb\u2028c": 1}, r"'a\\nb\\u2028c'.*[Ee]xtra"
    ),
    "512kb-extra-key": Case({"k" * (MB // 2): 1}, r"'kkkk.*'\.\.\..*[Ee]xtra"),
    # control: hostile-looking but valid, so accepted exactly
    "paired-surrogate-escape": Case(
        '{"text": "\\ud83d\\ude00"}', "", exact={"text": "\U0001f600"}
    ),
    "int64-bounds": Case(
        {"number": -(2**63), "anything": 2**63 - 1},
        "",
        exact={"number": -(2**63), "anything": 2**63 - 1},
    ),
    "nul-and-controls": Case(
        {"text": "\x00\x1b[31m\r\n"}, "", exact={"text": "\x00\x1b[31m\r\n"}
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_hostile_input_is_rejected_or_accepted_exactly(
    app: tether.Tether, principal: tether.Principal, case: Case
) -> None:
    """A hostile input is rejected with one line naming the problem, or taken exactly."""
    app.register(sink)
    _received.clear()

    with app.run(principal=principal, request="hostile") as run:
        outcome = run.step("hostile.sink", case.args)  # type: ignore[arg-type]

    if case.exact is None:
        assert outcome.status is tether.OutcomeStatus.INVALID, "accepted"
        assert type(outcome.error) is tether.ValidationFailed
        message = outcome.error.message
        assert "\n" not in message
        assert len(message) < 500
        assert message.startswith("hostile.sink: ")
        assert _matches(case.problem, message), message
        assert _received == []
    else:
        assert outcome.status is tether.OutcomeStatus.EXECUTED, outcome.error
        (got,) = _received
        seen = got.model_dump(include=set(case.exact))
        assert seen == case.exact
        assert _same_types(seen, case.exact)
    report = app.verify(run.id)
    assert report.ok, report.reason


def test_run_goes_on_after_hostile_inputs(
    app: tether.Tether, principal: tether.Principal
) -> None:
    """After every hostile input in one run, a normal call still works and the run verifies."""
    app.register(sink)
    hostile = [c.args for c in CASES.values() if c.exact is None]

    with app.run(principal=principal, request="hostile") as run:
        for args in hostile:
            # Judged case by case above; here only the aftermath counts.
            with contextlib.suppress(tether.TetherError):
                run.step("hostile.sink", args)  # type: ignore[arg-type]
        _received.clear()
        out = run.call("hostile.sink", {"text": "fine"})

    assert out == SinkOut(received=True)
    assert [a.text for a in _received] == ["fine"]
    assert app.verify(run.id).ok


def _matches(pattern: str, message: str) -> bool:
    return re.search(pattern, message) is not None


def _same_types(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(_same_types(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(map(_same_types, a, b))
    return True


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        pytest.param(
            lambda: tether.Principal("bot\x07"), "is not a name", id="id-bell"
        ),
        pytest.param(lambda: tether.Principal(""), "is not a name", id="id-empty"),
        pytest.param(lambda: tether.Principal(42), "must be text", id="id-number"),  # type: ignore[arg-type]
        pytest.param(
            lambda: tether.Principal("bot", tenant="acme\nglobex"),
            "the tenant",
            id="tenant-newline",
        ),
        pytest.param(
            lambda: tether.Principal("bot", roles="sre"),
            "roles and scopes are lists",
            id="roles-a-string",
        ),
        pytest.param(
            lambda: tether.Principal("bot", on_behalf_of="carol\x00"),
            "NUL",
            id="on-behalf-of-nul",
        ),
        pytest.param(
            lambda: tether.Tether(db="memory://", env={}).run(
                principal=tether.Principal("bot"), request="summarise file\x00.txt"
            ),
            "the run's request holds a NUL",
            id="request-nul",
        ),
        pytest.param(
            lambda: tether.Tether(db="memory://", env={}).approve(
                "apr_0123456789", by="alice\x1b[2J"
            ),
            "the approver",
            id="approver-escape",
        ),
    ],
)
def test_text_no_store_can_keep_exactly_is_refused_at_the_door(
    make: Any, fragment: str
) -> None:
    """Names with control characters, and NUL anywhere (PostgreSQL's text cannot
    hold it, SQLite's can), are refused where they enter, in one line, the same
    on every backend, instead of failing at the first write on one of them."""
    with pytest.raises(tether.UsageError) as caught:
        make()

    assert fragment in caught.value.message
    assert "\n" not in caught.value.message
