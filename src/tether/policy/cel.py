"""CEL conditions for rules: compiled once per policy version, evaluated safely.

The expression language is CEL (as in Kubernetes admission policies and Envoy
RBAC), run by the Rust-backed `common-expression-language` package: it cannot
reach Python objects, attributes or builtins, only the values handed in. What
tether adds is bounds: an expression is at most 4 KiB, and one comprehension
macro may not nest inside another, so evaluation time stays linear in the size
of the args (which the gateway caps at 1 MiB).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cel

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
_STRING = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")


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


def compile_condition(source: str) -> Condition:
    """Compile `source`, checking its bounds and the names it reads.

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
        program = cel.compile(source)
    except ValueError as exc:
        raise CelError(_parse_error(exc)) from exc
    bound = set(_BOUND.findall(_STRING.sub("''", source)))  # comprehension variables
    names = frozenset(program.variables()) - bound
    unknown = sorted(names - set(VARIABLES))
    if unknown:
        raise CelError(
            f"unknown name(s) {', '.join(map(repr, unknown))}; a condition may read "
            f"{', '.join(VARIABLES)}"
        )
    return Condition(source=source, program=program, variables=names)


def _check_nesting(source: str) -> None:
    # Strip string literals so a macro name inside quotes does not count.
    text = _STRING.sub("''", source)
    opens = {m.end() - 1 for m in _MACROS.finditer(text)}  # index of each macro's "("
    inside: list[int] = []  # paren depths at which open macros started
    depth = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if i in opens:
                if inside:
                    raise CelError(
                        "a comprehension (all/exists/map/filter) nests inside another, "
                        "which can take quadratic time; flatten the condition"
                    )
                inside.append(depth)
        elif ch == ")":
            if inside and inside[-1] == depth:
                inside.pop()
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
    reads it, and a run reuses the principal's conversion across its steps.
    """

    __slots__ = ("_context", "_pending")

    def __init__(self, values: Mapping[str, object]) -> None:
        self._context = cel.Context()
        self._pending = dict(values)

    def evaluate(self, condition: Condition) -> bool:
        """Return the condition's truth value.

        Raises:
            CelError: evaluation failed (a missing field, a type mismatch) or the
                result is not a boolean.
        """
        pending = self._pending
        if pending:
            for name in condition.variables:
                if name in pending:
                    self._context.add_variable(name, pending.pop(name))
        try:
            result = condition.program.execute(self._context)
        except Exception as exc:  # the CEL runtime raises many builtin types
            raise CelError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
        if result is True or result is False:
            return result
        raise CelError(
            f"the condition gave {type(result).__name__} {result!r:.40}, not a bool"
        )
