"""CEL conditions for rules: compiled once per policy version, evaluated safely.

The expression language is CEL (as in Kubernetes admission policies and Envoy
RBAC), run by the Rust-backed `common-expression-language` package: it cannot
reach Python objects, attributes or builtins, only the values handed in. What
tether adds is bounds: an expression is at most 4 KiB; `map` and `filter`
(quadratic in this runtime) are refused; a comprehension may not nest inside
another, and its body may read only its own variable and literals; so
evaluation time stays linear in the size of the args (capped at 1 MiB).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "MAX_EXPRESSION",
    "VARIABLES",
    "CelError",
    "Condition",
    "Scope",
    "compile_condition",
]

MAX_EXPRESSION = 4096
"""Longest accepted condition, in characters."""

VARIABLES = ("args", "principal", "context", "capability", "run")
"""The names a condition may read."""

_MACROS = re.compile(r"\.\s*(all|exists|exists_one|map|filter)\s*\(")
_BOUND = re.compile(
    r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,"
)
_FUNCTIONS = frozenset(
    {
        "size", "has", "int", "uint", "double", "string", "bytes", "timestamp",
        "duration", "dyn", "type", "matches", "contains", "startsWith", "endsWith",
        "all", "exists", "exists_one", "map", "filter", "getFullYear", "getMonth",
        "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getHours",
        "getMinutes", "getSeconds", "getMilliseconds",
    }
)  # fmt: skip
"""The functions the runtime has; any other call would fail at every evaluation."""
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_TOP_LEVEL = re.compile(r"(?<![\w.])(args|principal|context|capability|run)\b")


@functools.cache
def _runtime() -> ModuleType:
    """Import the CEL runtime on first use.

    Its package imports its own command line (prompt_toolkit, typer) on
    import: half of `import tether`'s time, which every `tether` command and
    every app without conditions would pay for nothing.
    """
    import cel  # deferred: see above

    return cel


class CelError(ValueError):
    """A condition that cannot compile, or failed to evaluate; one line."""


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled `when` expression."""

    source: str
    program: Any
    """The compiled `cel.Program`."""
    variables: frozenset[str]
    """The top-level names it reads (a subset of `VARIABLES`)."""


@functools.lru_cache(maxsize=4096)
def compile_condition(source: str) -> Condition:
    """Compile `source`, checking its bounds and the names it reads.

    Cached: the model's validator and the rule index compile the same text,
    and a hot reload recompiles only the conditions that changed.

    Raises:
        CelError: a syntax error, an unknown variable, or a bound exceeded.
    """
    if not source.strip():
        raise CelError(
            "the condition is empty; write a CEL expression or leave out `when`"
        )
    if len(source) > MAX_EXPRESSION:
        raise CelError(
            f"the condition is {len(source)} characters, over {MAX_EXPRESSION}; split the rule"
        )
    _check_nesting(source)
    try:
        program = _runtime().compile(source)
    except ValueError as exc:
        raise CelError(_parse_error(exc)) from exc
    code = _code_only(source)
    unknown_calls = sorted(set(_CALL.findall(code)) - _FUNCTIONS)
    if unknown_calls:
        raise CelError(
            f"unknown function(s) {', '.join(map(repr, unknown_calls))}; this CEL has "
            f"{', '.join(sorted(_FUNCTIONS - {'map', 'filter'}))}"
        )
    bound = set(_BOUND.findall(code))  # comprehension variables
    names = frozenset(program.variables()) - bound
    unknown = sorted(names - set(VARIABLES))
    if unknown:
        raise CelError(
            f"unknown name(s) {', '.join(map(repr, unknown))}; a condition may read "
            f"{', '.join(VARIABLES)}"
        )
    return Condition(source=source, program=program, variables=names)


def _code_only(source: str) -> str:
    """Return `source` with comments removed and every string literal emptied.

    Knows CEL's quotes (single, double, triple), raw (`r`) and bytes (`b`)
    prefixes, and `//` comments, so the checks below see only code.
    """
    out: list[str] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if source.startswith("//", i):
            end = source.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "'\"":
            j = i - 1
            prefix = ""
            while j >= 0 and source[j] in "rRbB" and len(prefix) < 2:
                prefix = source[j] + prefix
                j -= 1
            raw = "r" in prefix.lower() and (
                j < 0 or not (source[j].isalnum() or source[j] == "_")
            )
            quote = ch * 3 if source.startswith(ch * 3, i) else ch
            k = i + len(quote)
            while k < n and not source.startswith(quote, k):
                k += 2 if source[k] == "\\" and not raw else 1
            out.append("''")
            i = k + len(quote)
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _check_nesting(source: str) -> None:
    """Refuse comprehensions that can take more than linear time.

    `map` and `filter` copy their result at every element in the CEL runtime
    (quadratic), one comprehension inside another is quadratic, and so is a
    body that reads a top-level collection again (`x in args.items`): a body may
    read only its own variable and literals.
    """
    text = _code_only(source)
    opens: dict[int, str] = {m.end() - 1: m.group(1) for m in _MACROS.finditer(text)}
    for name in opens.values():
        if name in ("map", "filter"):
            raise CelError(
                f"{name}() takes quadratic time in the CEL runtime; say it with "
                "exists(), all() or exists_one()"
            )
    inside: list[tuple[int, int]] = []  # (paren depth, index of "(") of open macros
    depth = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if i in opens:
                if inside:
                    raise CelError(
                        "a comprehension (all/exists) nests inside another, which can "
                        "take quadratic time; flatten the condition"
                    )
                inside.append((depth, i))
        elif ch == ")":
            if inside and inside[-1][0] == depth:
                _, start = inside.pop()
                found = _TOP_LEVEL.search(text, start, i)
                if found:
                    raise CelError(
                        f"a comprehension body reads {found.group(1)!r} again, which "
                        "can take quadratic time; compare the element with literals"
                    )
            depth -= 1


def _parse_error(exc: BaseException) -> str:
    # The parser quotes the whole expression first, its own newlines included;
    # the diagnostic itself follows "ERROR: <input>:".
    text = str(exc)
    _, marker, rest = text.partition("ERROR: <input>:")
    if marker:
        return "syntax error at " + rest.strip().splitlines()[0]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__


class Scope:
    """The values one decision's conditions read, converted to CEL once.

    Converting Python values to CEL costs more than evaluating a compiled
    condition, so a scope converts each variable only when a condition first
    reads it, once per decision.
    """

    __slots__ = ("_context", "_pending")

    def __init__(self, values: Mapping[str, object]) -> None:
        self._context = _runtime().Context()
        self._pending = dict(values)

    def evaluate(self, condition: Condition) -> bool:
        """Return the condition's truth value.

        Raises:
            CelError: evaluation failed (a missing field, a type mismatch) or the
                result is not a boolean.
        """
        result = self.value(condition)
        if result is True or result is False:
            return result
        raise CelError(
            f"the condition gave {type(result).__name__} {result!r:.40}, not a bool"
        )

    def value(self, condition: Condition) -> object:
        """Return the expression's value (a limit's cost, say).

        Raises:
            CelError: evaluation failed (a missing field, a type mismatch).
        """
        pending = self._pending
        try:
            if pending:
                for name in condition.variables:
                    if name in pending:
                        # Converting a value CEL cannot carry (a set, an object)
                        # fails here: a failed evaluation, not a crash.
                        self._context.add_variable(name, pending.pop(name))
            return condition.program.execute(self._context)
        except Exception as exc:  # the CEL runtime raises many builtin types
            raise CelError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
