"""Pydantic's errors said in a YAML file's terms, one line each, with a guess for a typo.

`error_message` turns one pydantic error into what the user wrote wrong and what
is expected instead; `unknown_field` names a key the model does not have and
suggests the close one (`did you mean 'decision'?`) or lists the known ones.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import pydantic

from tether._yaml_nodes import Loc
from tether._yaml_schema import model_at

__all__ = ["error_message", "shown", "unknown_field"]

_EXPECTED = {
    "tuple_type": "a list",
    "list_type": "a list",
    "set_type": "a list",
    "frozen_set_type": "a list",
    "string_type": "text",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "float_type": "a number",
    "float_parsing": "a number",
    "decimal_type": "a number",
    "decimal_parsing": "a number",
    "datetime_type": "a timestamp such as 2026-01-31T12:00:00Z",
    "datetime_parsing": "a timestamp such as 2026-01-31T12:00:00Z",
    "datetime_from_date_parsing": "a timestamp such as 2026-01-31T12:00:00Z",
    "timezone_aware": "a timestamp with a time zone (end it with Z or +00:00)",
}


def unknown_field(model: type[pydantic.BaseModel], loc: Loc) -> tuple[str, str | None]:
    """Say that the key at `loc` is unknown; return the text and the guessed key, if any."""
    schema = model_at(model, loc[:-1])
    known = list(schema.model_fields) if schema is not None else []
    what = "section" if len(loc) == 1 else "field"
    text = f"unknown {what} {loc[-1]!r}"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"{text}; did you mean {close[0]!r}?", close[0]
    if known:
        text += f"; known {what}s: {', '.join(known)}"
    return text, None


def shown(value: object) -> str:
    """Describe a YAML value in a message, briefly."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:59] + "…")
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def error_message(error: Mapping[str, Any]) -> str:
    """Say what a pydantic error means in the file's terms."""
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    msg = str(error["msg"])
    if kind in ("enum", "literal_error"):
        expected = str(ctx.get("expected", ""))
        choices = re.findall(r"'([^']*)'", expected) or [expected]
        given = repr(value) if isinstance(value, (str, int, float)) else shown(value)
        if isinstance(value, str) and value in choices and "'" not in expected:
            # `version: '1'`: the choice is a number, and quotes made it text.
            return f"{given} is text; write {value} without quotes"
        text = f"unknown value {given}; use one of: {', '.join(choices)}"
        close = difflib.get_close_matches(str(value), choices, n=1)
        return f"{text} (did you mean {close[0]!r}?)" if close else text
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "assertion_error":
        return msg.removeprefix("Assertion failed, ")
    if kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}, got {shown(value)}"
        if kind == "string_type" and isinstance(value, bool):
            text += " (YAML reads yes, no, on and off as true or false: quote the text)"
        return text
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    return msg
