"""Input fuzzing of the shipped scenarios' capabilities (I.57).

Every capability every built-in scenario registers (read from the app's registry,
so a capability added later is fuzzed too) takes (a) arbitrary JSON values and
(b) values shaped like its input JSON schema with hostile content: integers
beyond 64 bits or 4,300 digits, NaN and Infinity (as floats and as JSON text),
deep nesting, long strings, control characters, lone surrogates, wrong types,
Python objects JSON has no form for, broken JSON text. The args go through
`run.step` in one run on a SQLite file, as the scenario's own principal with its
context, so its preconditions and policy see them too.

Each outcome must be a call (executed, a dry run, a hit, a refusal, or a handler
failure that is not a programming error such as KeyError) or a clean
`ValidationFailed` (`invalid`, one line); whatever pydantic rejects must be
`invalid`; nothing may escape `run.step`; and the run's record must verify.
"""

from __future__ import annotations

import builtins
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tether
from strategies import INT64, json_values, mutated
from tether.scenarios import SCENARIOS, Scenario

FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""CI-sized, like test_fuzz.py: the module stays well under a minute on 2 cores."""

HOSTILE_EXAMPLES = 120
"""Schema-shaped hostile args per capability."""


# -- the capabilities under test ------------------------------------------------------


def _registered(scenario: Scenario) -> list[str]:
    """Return the names of the capabilities `scenario.setup` registers."""
    app = tether.Tether(db="memory://", env={})
    try:
        scenario.setup(app)
        return [cap.name for cap in app.capabilities]
    finally:
        app.close()


CAPABILITIES = [
    pytest.param(scenario.name, name, id=f"{scenario.name}:{name}")
    for scenario in SCENARIOS.values()
    for name in _registered(scenario)
]


def _seeds(
    scenario: Scenario,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[Any]]]:
    """Return the args the scenario's scripted planner uses, by capability and by key.

    Values that reach the handlers (a service that exists, the open ticket) come
    from here; a planner without scripted steps gives none.
    """
    by_cap: dict[str, list[dict[str, Any]]] = {}
    by_key: dict[str, list[Any]] = {}
    for step in getattr(scenario.planner(), "steps", ()):
        args = dict(step.args)
        by_cap.setdefault(step.capability, []).append(args)
        for key, value in args.items():
            if value not in by_key.setdefault(key, []):
                by_key[key].append(value)
    return by_cap, by_key


# -- hostile values ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Raw:
    """A JSON text token (`1e400`, `NaN`) and the Python value it stands for."""

    text: str
    value: object


@dataclass(frozen=True, slots=True)
class Deep:
    """A value nested `depth` lists or objects deep (built without recursion)."""

    depth: int
    kind: str

    def build(self) -> object:
        value: object = "x"
        for _ in range(self.depth):
            value = [value] if self.kind == "list" else {"a": value}
        return value

    def text(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + '"x"' + "]" * self.depth
        return '{"a":' * self.depth + '"x"' + "}" * self.depth


_RAW_NUMBERS = [
    Raw("NaN", math.nan),
    Raw("Infinity", math.inf),
    Raw("-Infinity", -math.inf),
    Raw("1e400", math.inf),
    Raw("-1e400", -math.inf),
    Raw("1e-400", 0.0),
    Raw("-0", 0),
    Raw(str(2**63), 2**63),
    Raw(str(2**64), 2**64),
    Raw(str(-(2**63) - 1), -(2**63) - 1),
    Raw("9" * 40, 10**40 - 1),
    Raw("9" * 5000, 10**5000 - 1),  # past Python's 4,300-digit str() limit
]
_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5]
_CONTROL = [
    "\x00",
    "\n",
    "\r\n",
    "\t",
    "\x1b[2J\x1b[H",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
    "\u202e",
    "\ufeff",
    "\ufffe",
    "\U0010ffff",
]
_SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
_WRONG_TYPES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    "",
    "0",
    "true",
    "null",
    [],
    {},
    [None],
]
_PYTHON_ONLY = [
    b"\xff\xfe",
    b"checkout",
    bytearray(b"x"),
    Decimal("NaN"),
    Decimal("-Infinity"),
    Decimal("1e999999"),
    frozenset({1}),
    (1, 2),
    complex(1, 2),
    object(),
]
"""Values a Python caller may pass in a mapping that JSON has no form for."""


def _pick(*options: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Draw from one of `options`, each as likely (`st.one_of` flattens nested ones)."""
    return st.sampled_from(options).flatmap(lambda strategy: strategy)


_MAX_DEPTH = 6
"""How deep a schema is unfolded into strategies (a model may refer to itself)."""


def _regex(schema: Mapping[str, Any]) -> st.SearchStrategy[str] | None:
    """Strings matching the schema's pattern, when Python's `re` reads it."""
    pattern = schema.get("pattern")
    if not isinstance(pattern, str):
        return None
    try:
        re.compile(pattern)
    except re.error:  # pydantic's Rust regex syntax Python lacks (\p{L}, say)
        return None
    return st.from_regex(pattern, fullmatch=True)


def _resolve(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        found: Mapping[str, Any] = defs[ref.removeprefix("#/$defs/")]
        return found
    return schema


def _bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema:
        low = math.floor(schema["exclusiveMinimum"]) + 1
    if "exclusiveMaximum" in schema:
        high = math.ceil(schema["exclusiveMaximum"]) - 1
    return (None if low is None else int(low)), (None if high is None else int(high))


class Shapes:
    """Strategies for one input schema: plausible values, and hostile ones in their place."""

    def __init__(
        self,
        schema: Mapping[str, Any],
        by_key: Mapping[str, list[Any]],
        *,
        python: bool,
    ) -> None:
        self.defs: Mapping[str, Any] = schema.get("$defs", {})
        self.by_key = by_key
        self.python = python
        self.root = schema

    def plausible(
        self, schema: Mapping[str, Any], key: str | None = None, depth: int = 0
    ) -> st.SearchStrategy[Any]:
        """Values that match `schema` (or nearly: lengths beside a pattern are not enforced)."""
        if depth > _MAX_DEPTH:  # a recursive model: stop unfolding it
            return json_values(max_leaves=2)
        schema = _resolve(schema, self.defs)
        options: list[st.SearchStrategy[Any]] = []
        if key is not None and self.by_key.get(key):
            options.append(st.sampled_from(self.by_key[key]))
        for name in ("enum", "examples"):
            if schema.get(name):
                options.append(st.sampled_from(list(schema[name])))
        if "const" in schema:
            options.append(st.just(schema["const"]))
        if "default" in schema:
            options.append(st.just(schema["default"]))
        for name in ("anyOf", "oneOf", "allOf"):
            for part in schema.get(name, ()):
                options.append(self.plausible(part, key, depth + 1))
        kinds = schema.get("type")
        for kind in kinds if isinstance(kinds, list) else [kinds]:
            options.extend(self._typed(schema, kind, depth))
        return st.one_of(options) if options else json_values(max_leaves=4)

    def _typed(
        self, schema: Mapping[str, Any], kind: object, depth: int
    ) -> Iterator[st.SearchStrategy[Any]]:
        if kind == "string":
            matching = _regex(schema)
            if matching is not None:
                yield matching
            else:
                low = schema.get("minLength", 0)
                yield st.text(
                    min_size=low,
                    max_size=max(low, min(schema.get("maxLength", 20), 20)),
                )
        elif kind == "integer":
            low, high = _bounds(schema)
            yield st.integers(
                INT64[0] if low is None else low, INT64[1] if high is None else high
            )
        elif kind == "number":
            low, high = _bounds(schema)
            yield st.floats(low, high, allow_nan=False, allow_infinity=False)
        elif kind == "boolean":
            yield st.booleans()
        elif kind == "null":
            yield st.none()
        elif kind == "array":
            items = self.plausible(schema.get("items", {}), depth=depth + 1)
            yield st.lists(items, max_size=3)
        elif kind == "object":
            yield self.obj(schema, hostile=False, depth=depth + 1)

    def obj(
        self, schema: Mapping[str, Any], *, hostile: bool = True, depth: int = 0
    ) -> st.SearchStrategy[dict[str, Any]]:
        """An object: each declared property plausible (or hostile), required keys present."""

        def value(part: Mapping[str, Any], key: str | None = None) -> Any:
            if hostile:
                return self.field(part, key, depth)
            return self.plausible(part, key, depth)

        props: Mapping[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if not props:
            return st.dictionaries(st.text(max_size=8), value({}), max_size=3)
        return st.fixed_dictionaries(
            {k: value(v, k) for k, v in props.items() if k in required},
            optional={k: value(v, k) for k, v in props.items() if k not in required},
        )

    def one_hostile(
        self, base: st.SearchStrategy[dict[str, Any]], *, text_only: bool = False
    ) -> st.SearchStrategy[dict[str, Any]]:
        """`base` args with one declared property's value made hostile (or nasty text)."""
        make = self.nasty_text if text_only else self.hostile
        props: Mapping[str, Any] = self.root.get("properties", {})
        if not props:
            return base

        def swap(pair: tuple[dict[str, Any], str]) -> st.SearchStrategy[dict[str, Any]]:
            args, key = pair
            return make(props[key], key).map(lambda v: {**args, key: v})

        return st.tuples(base, st.sampled_from(sorted(props))).flatmap(swap)

    def field(
        self, schema: Mapping[str, Any], key: str | None = None, depth: int = 0
    ) -> st.SearchStrategy[Any]:
        """A plausible value for `schema`, or a hostile one."""
        return _pick(self.plausible(schema, key, depth), self.hostile(schema, key))

    def hostile(
        self, schema: Mapping[str, Any], key: str | None = None
    ) -> st.SearchStrategy[Any]:
        """Values a careless or malicious caller sends where `schema` is expected."""
        schema = _resolve(schema, self.defs)
        low, high = _bounds(schema)
        edges = [v + d for v in (low, high) if v is not None for d in (-1, 0, 1)]
        options = [
            st.sampled_from(_RAW_NUMBERS + _FLOATS),
            st.integers(),  # any size: beyond 64 bits too
            st.sampled_from(edges + [float(v) + 0.5 for v in edges])
            if edges
            else st.nothing(),
            self.nasty_text(schema, key),
            st.builds(
                Deep,
                st.sampled_from([64, 1_000, 5_000, 100_000]),
                st.sampled_from(["list", "dict"]),
            ),
            st.sampled_from(_WRONG_TYPES),
            json_values(max_leaves=6),
        ]
        if self.python:
            options.append(st.sampled_from(_PYTHON_ONLY))
        return st.one_of(options)

    def nasty_text(
        self, schema: Mapping[str, Any], key: str | None = None
    ) -> st.SearchStrategy[str]:
        """Text with control characters, lone surrogates, or at (and past) its lengths.

        Some of it is still valid (a reason with a NUL in it): it reaches the handler.
        """
        schema = _resolve(schema, self.defs)
        text = self._near_text(schema, key)
        lengths = [
            n + d
            for n in (schema.get("minLength"), schema.get("maxLength"))
            if n is not None
            for d in (-1, 0, 1)
            if n + d >= 0
        ]
        return st.one_of(
            st.builds(
                lambda s, c, front: c + s if front else s + c,
                text,
                st.sampled_from(_CONTROL),
                st.booleans(),
            ),
            st.builds(
                lambda s, c, t: s + c + t, text, _SURROGATES, st.text(max_size=3)
            ),
            st.builds(
                lambda n, c: (c * n)[:n],
                st.sampled_from([*lengths, 10_000, (1 << 20) + 1]),
                st.sampled_from(["a", "\u00e9", "\U0001f642", "\x00", "\ud800", "ab-"]),
            ),
            st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
        )

    def _near_text(
        self, schema: Mapping[str, Any], key: str | None
    ) -> st.SearchStrategy[str]:
        if key is not None and any(
            isinstance(v, str) for v in self.by_key.get(key, ())
        ):
            return st.sampled_from([v for v in self.by_key[key] if isinstance(v, str)])
        return _regex(schema) or st.text(max_size=8)


# -- sending them ----------------------------------------------------------------------


def _python(value: object) -> object:
    """Return `value` as a Python caller passes it: markers become what they stand for."""
    if isinstance(value, Raw):
        return value.value
    if isinstance(value, Deep):
        return value.build()
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_python(v) for v in value]
    return value


def _text(value: object, *, ascii: bool) -> str:
    """Return `value` as JSON text, NaN and Infinity and lone surrogates included."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Deep):
        return value.text()
    if isinstance(value, dict):
        items = (
            f"{json.dumps(str(k), ensure_ascii=ascii)}:{_text(v, ascii=ascii)}"
            for k, v in value.items()
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v, ascii=ascii) for v in value) + "]"
    if isinstance(value, float) and not isinstance(value, bool):
        return json.dumps(value, allow_nan=True)  # NaN, Infinity, -Infinity
    if isinstance(value, int) and not isinstance(value, bool):
        return repr(value) if abs(value) < 10**4000 else "9" * 4400
    return json.dumps(value, ensure_ascii=ascii)


@dataclass(frozen=True, slots=True)
class Sent:
    """What `run.step` is given, and what a Python caller's equal value would be."""

    form: str
    args: object
    value: object
    """The Python value pydantic judges (None: the text is broken, no value)."""

    def __repr__(self) -> str:  # hypothesis prints it: keep 1 MiB strings out
        return f"Sent({self.form}, {_short(self.args)})"


def _short(value: object) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return "(nested too deeply to show)"
    return text if len(text) <= 300 else f"{text[:300]}... ({len(text)} chars)"


@st.composite
def _sent(draw: st.DrawFn, make: Any) -> Sent:
    """Draw args from `make(python=...)` and send them as a mapping, JSON text or bytes."""
    form = draw(
        st.sampled_from(["mapping", "mapping", "text", "text-ascii", "bytes", "broken"])
    )
    value = draw(make(form == "mapping"))
    if form == "mapping":
        args = _python(value)
        return Sent(form, args, args)
    text = _text(value, ascii=form == "text-ascii")
    if form == "bytes":
        return Sent(form, text.encode("utf-8", "surrogatepass"), _python(value))
    if form == "broken":
        if isinstance(value, dict) and value and text.startswith("{"):
            key = json.dumps(str(next(iter(value))))
            how = draw(st.sampled_from(["duplicate", "truncate"]))
            if how == "duplicate":
                return Sent(form, "{" + key + ":null," + text[1:], None)
            cut = draw(st.integers(0, len(text) - 1))
            return Sent(form, text[:cut], None)
        form = "text"
    return Sent(form, text, _python(value))


# -- the oracle ------------------------------------------------------------------------

_PROGRAMMING_ERRORS = (
    LookupError,
    TypeError,
    AttributeError,
    AssertionError,
    NameError,
    RecursionError,
    UnicodeError,
    ArithmeticError,
)
"""A handler that raises one of these on args the gateway accepted has crashed."""

_CRASH_NAMES = "|".join(
    sorted(
        name
        for name, value in vars(builtins).items()
        if isinstance(value, type) and issubclass(value, _PROGRAMMING_ERRORS)
    )
)
"""The built-in names of those errors, as a failure's message quotes them."""


def _rejected(model: type[pydantic.BaseModel], sent: Sent) -> bool:
    """True when pydantic refuses the value (or the text is not JSON at all)."""
    if sent.value is None and sent.form == "broken":
        return True
    try:
        model.model_validate({} if sent.value is None else sent.value)
    except (pydantic.ValidationError, RecursionError):
        return True
    return False


def _one_line(message: str) -> bool:
    return bool(message) and message.splitlines() == [message]


def _check(
    cap: tether.Capability[Any, Any], outcome: tether.Outcome, sent: Sent
) -> None:
    """Assert `outcome` is a clean call or a clean refusal of the args."""
    error = outcome.error
    status = outcome.status
    if _rejected(cap.input_model, sent):
        assert status is tether.OutcomeStatus.INVALID, (status, error)
    if status is tether.OutcomeStatus.INVALID:
        assert type(error) is tether.ValidationFailed, repr(error)
        assert _one_line(error.message), repr(error.message)
        assert error.message.startswith(f"{cap.name}: "), repr(error.message)
        assert outcome.output is None
    elif status in (
        tether.OutcomeStatus.EXECUTED,
        tether.OutcomeStatus.DRY_RUN,
        tether.OutcomeStatus.IDEMPOTENT_HIT,
    ):
        assert error is None
        assert isinstance(outcome.output, cap.output_model)
    elif status is tether.OutcomeStatus.REFUSED:
        assert isinstance(error, tether.Refused), repr(error)
        assert _one_line(error.message), repr(error.message)
    else:  # failed or in doubt: the handler raised; its own errors only
        assert isinstance(error, tether.TetherError), repr(error)
        # The message quotes the handler's error as "<capability>: <type>: ..."
        # (an in-doubt step keeps no __cause__).
        crashed = isinstance(error.__cause__, _PROGRAMMING_ERRORS) or re.search(
            rf"{re.escape(cap.name)}: ({_CRASH_NAMES}): ", error.message
        )
        assert not crashed, f"{cap.name} crashed on args it accepted: {error!r}"


class Session:
    """One scenario set up on `app`, and the step numbers its fuzzed calls got."""

    def __init__(self, app: tether.Tether, scenario_name: str) -> None:
        self.scenario = SCENARIOS[scenario_name]
        self.scenario.setup(app)
        self.app = app
        self.by_cap, self.by_key = _seeds(self.scenario)
        self.steps: list[int] = []

    def shapes(self, cap_name: str, *, python: bool) -> Shapes:
        schema = self.app.capabilities.get(cap_name).input_model.model_json_schema()
        return Shapes(schema, self.by_key, python=python)

    def step(
        self, run: tether.Run, cap_name: str, sent: Sent, *, dry_run: bool = False
    ) -> None:
        outcome = run.step(cap_name, sent.args, dry_run=dry_run)  # type: ignore[arg-type]
        _check(self.app.capabilities.get(cap_name), outcome, sent)
        self.steps.append(outcome.step)

    def run(self) -> tether.Run:
        return self.app.run(
            principal=self.scenario.principal,
            request="fuzz the scenario's capabilities",
            context=self.scenario.context,
        )

    def verified(self, run: tether.Run) -> None:
        assert self.steps == sorted(set(self.steps)), "a step number was reused"
        report = self.app.verify(run.id)
        assert report.ok, report.reason


# -- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "capability"), CAPABILITIES)
def test_arbitrary_json_is_a_call_or_a_clean_invalid(
    app: tether.Tether, scenario: str, capability: str
) -> None:
    """Any JSON value as args, as a mapping, text or bytes: a call or one-line invalid."""
    session = Session(app, scenario)

    with session.run() as run:

        @FUZZ
        @given(sent=_sent(lambda python: json_values(max_leaves=20)))
        def check(sent: Sent) -> None:
            session.step(run, capability, sent)

        check()

    session.verified(run)


@pytest.mark.parametrize(("scenario", "capability"), CAPABILITIES)
def test_hostile_schema_shaped_args_are_a_call_or_a_clean_invalid(
    app: tether.Tether, scenario: str, capability: str
) -> None:
    """Args shaped like the input schema with hostile values never crash the gateway."""
    session = Session(app, scenario)
    seeds = session.by_cap.get(capability, [])

    def make(python: bool) -> st.SearchStrategy[Any]:
        shapes = session.shapes(capability, python=python)
        root = shapes.root
        plain = shapes.obj(root, hostile=False)
        bases = st.one_of(st.sampled_from(seeds), plain) if seeds else plain
        return _pick(
            shapes.one_hostile(bases),  # one value hostile, the rest plausible
            shapes.one_hostile(bases, text_only=True),  # often valid: reaches handlers
            bases,  # plausible args, as the scenario's agent sends them
            shapes.obj(root),  # each value plausible or hostile
            mutated(bases),  # a key dropped, added, retyped (strategies.mutated)
            shapes.hostile(root),  # the args themselves hostile
        )

    with session.run() as run:

        @settings(FUZZ, max_examples=HOSTILE_EXAMPLES)
        @given(sent=_sent(make), dry_run=st.sampled_from([False, False, False, True]))
        def check(sent: Sent, dry_run: bool) -> None:
            session.step(run, capability, sent, dry_run=dry_run)

        check()

    session.verified(run)


_HOSTILE_KEYS = st.one_of(
    st.sampled_from(["a\nb", "\r", "\x00", "\u2028", "\x1b[2J", "\x85", " ", ""]),
    st.builds(lambda s, c: s + c, st.text(max_size=4), _SURROGATES),
    st.text(min_size=1, max_size=8),
)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_hostile_keys_keep_the_invalid_message_one_line(
    app: tether.Tether, scenario: str
) -> None:
    """An extra key with control characters is refused in one line, by every capability."""
    session = Session(app, scenario)
    names = [cap.name for cap in app.capabilities]

    with session.run() as run:

        @settings(FUZZ, max_examples=60)
        @example(name=names[0], key="a\nb", form="mapping")
        @given(
            name=st.sampled_from(names),
            key=_HOSTILE_KEYS,
            form=st.sampled_from(["mapping", "text", "bytes"]),
        )
        def check(name: str, key: str, form: str) -> None:
            value = {**(session.by_cap.get(name) or [{}])[0], key: 1}
            if form == "mapping":
                sent = Sent(form, value, value)
            else:
                text = _text(value, ascii=False)
                raw = text.encode("utf-8", "surrogatepass") if form == "bytes" else text
                sent = Sent(form, raw, value)
            session.step(run, name, sent)

        check()

    session.verified(run)
