"""Checking a YAML file against a pydantic model, every problem with its line.

The file is composed with PyYAML first (nodes keep their line), then constructed
and validated by the model; each pydantic error's `loc` is walked back through
the node tree to the line that holds the offending key or value. `config.py`
uses it for `tether.yaml` and policy test files.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Generic,
    TypeVar,
    Union,
    get_args,
    get_origin,
)

import pydantic
import yaml

__all__ = ["ConfigCheck", "ConfigProblem", "check_file"]

# -- problems, each with its line ----------------------------------------------------------
#
# The file is composed with PyYAML first (nodes keep their line), then constructed and
# validated by the models; each pydantic error's `loc` is walked back through the node
# tree to the line that holds the offending key or value.

M = TypeVar("M", bound=pydantic.BaseModel)
_Loc = tuple[str | int, ...]

_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_ITEM = re.compile(r"^[^.\[]+\[\d+\]")
_MAX_VALUES = 100_000
"""Most values a file may expand to through anchors and aliases (a YAML bomb guard)."""
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigProblem:
    """One thing wrong in a config file, and where it is.

    `str(problem)` is the one line users see:
    `tether.yaml:12: rules[3] (id 'big-refunds'): when: condition does not compile: ...`.
    """

    file: str
    """The file, as it was named."""
    line: int | None
    """The 1-based line of the offending key or value; None when the file is unreadable."""
    path: str = ""
    """Where in the file, e.g. `rules[3].when` (list indexes count from 0); empty
    for the file as a whole."""
    item_id: str | None = None
    """The id (or name) of the list item the problem is in, when it has one."""
    item_key: str = "id"
    """The field `item_id` was read from: `id` for rules, `name` for test cases."""
    message: str
    """What is wrong and, where it helps, how to fix it; one line."""

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return ": ".join(
            part for part in (where, self._shown_path(), self.message) if part
        )

    def _shown_path(self) -> str:
        head = _ITEM.match(self.path)
        if self.item_id is None or head is None:
            return self.path
        label = f"{head.group()} ({self.item_key} {self.item_id!r})"
        rest = self.path[head.end() :].lstrip(".")
        return f"{label}: {rest}" if rest else label

    def to_json(self) -> dict[str, object]:
        """Return the problem as JSON-ready data (`text` is the one-line form)."""
        return {
            "file": self.file,
            "line": self.line,
            "path": self.path,
            "id": self.item_id,
            "message": self.message,
            "text": str(self),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigCheck(Generic[M]):
    """A file checked whole: its value and version, or every problem found in it."""

    path: Path
    """The file checked."""
    value: M | None = None
    """The validated contents; None when there are problems."""
    version: str | None = None
    """`sha256:` and the first 16 hex digits of the file's SHA-256; None when invalid."""
    problems: tuple[ConfigProblem, ...] = ()
    """Everything wrong, in line order; empty when the file is valid."""

    @property
    def ok(self) -> bool:
        """True when the file has no problems."""
        return not self.problems


def check_file(path: Path, model: type[M], what: str) -> ConfigCheck[M]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        message = f"cannot read {what} ({exc.strerror or exc})"
        return ConfigCheck(
            path=path,
            problems=(ConfigProblem(file=str(path), line=None, message=message),),
        )
    value, problems = _Checker(str(path), model).check(raw)
    if value is None:
        return ConfigCheck(path=path, problems=problems)
    version = "sha256:" + hashlib.sha256(raw).hexdigest()[:16]
    return ConfigCheck(path=path, value=value, version=version)


class _Invalid:
    """Marks a file that is not YAML (nothing to validate)."""


class _Checker(Generic[M]):
    """Collects the problems of one file against one model."""

    def __init__(self, file: str, model: type[M]) -> None:
        self.file = file
        self.model = model
        self.root: yaml.Node | None = None
        self.problems: list[ConfigProblem] = []
        self.reported: list[_Loc] = []
        """Places already reported (a null value, a duplicate key): pydantic's
        errors there or below say the same thing again."""
        self.duplicate_ids: list[str] = []

    def check(self, raw: bytes) -> tuple[M | None, tuple[ConfigProblem, ...]]:
        data = self._parse(raw)
        if isinstance(data, _Invalid):
            return None, self._sorted()
        if not isinstance(data, dict):
            sections = ", ".join(self.model.model_fields)
            self._add(
                (),
                f"the top level must be a mapping of sections ({sections}), "
                f"not {_shown(data)}",
            )
            return None, self._sorted()
        self._check_unique_items()
        try:
            value = self.model.model_validate(data)
        except pydantic.ValidationError as exc:
            self._add_pydantic(exc.errors(include_url=False))
            return None, self._sorted()
        if self.problems:
            return None, self._sorted()
        return value, ()

    def _sorted(self) -> tuple[ConfigProblem, ...]:
        unique = dict.fromkeys(self.problems)  # the same problem found twice shows once
        return tuple(sorted(unique, key=lambda p: p.line or 0))

    # -- YAML ------------------------------------------------------------------------

    def _parse(self, raw: bytes) -> object:
        loader: yaml.SafeLoader | None = None
        try:
            loader = yaml.SafeLoader(raw)
            node = loader.get_single_node()
            if node is None:
                return {}  # an empty file (or only comments): every default
            self.root = node
            size = _expanded_size(node, {}, set())
            if size > _MAX_VALUES:
                self._add(
                    (),
                    f"the file expands to over {_MAX_VALUES} values through "
                    "anchors and aliases; write it out plainly",
                )
                return _Invalid()
            self._scan(node, (), set())
            return loader.construct_document(node)
        except _RecursiveAlias as exc:
            self.problems.append(
                ConfigProblem(
                    file=self.file,
                    line=exc.line,
                    message="not valid here: an alias refers to a node that contains "
                    "it; write the value out",
                )
            )
        except yaml.MarkedYAMLError as exc:
            self.problems.append(self._yaml_problem(exc))
        except yaml.YAMLError as exc:  # a ReaderError: bytes that are not UTF-8 text
            position = getattr(exc, "position", 0)
            first = str(exc).splitlines()[0]
            self.problems.append(
                ConfigProblem(
                    file=self.file,
                    line=raw[:position].count(b"\n") + 1,
                    message=f"not valid YAML: {first}; save the file as UTF-8 text",
                )
            )
        finally:
            if loader is not None:
                loader.dispose()
        return _Invalid()

    def _yaml_problem(self, exc: yaml.MarkedYAMLError) -> ConfigProblem:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark is not None and "end of stream" in str(exc.problem):
            mark = exc.context_mark  # an unclosed quote or bracket: where it opened
        line = 1 if mark is None else mark.line + 1
        # PyYAML says "while scanning a quoted scalar (there), found ... (here)".
        parts = []
        if exc.context:
            started = None if exc.context_mark is None else exc.context_mark.line + 1
            shown = f" from line {started}" if started not in (None, line) else ""
            parts.append(f"{exc.context}{shown}")
        if exc.problem:
            parts.append(exc.problem)
        text = "not valid YAML: " + (", ".join(parts) or "cannot be read")
        if "'\\t'" in text:
            text += "; indent with spaces, not tabs"
        return ConfigProblem(file=self.file, line=line, message=text)

    def _scan(self, node: yaml.Node, loc: _Loc, seen_nodes: set[int]) -> None:
        # Each node once: an alias shares its node, and is reported where it is defined.
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._scan(item, (*loc, index), seen_nodes)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        schema = _model_at(self.model, loc)
        first: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == _MERGE or not isinstance(key, yaml.ScalarNode):
                continue
            name, line = str(key.value), key.start_mark.line + 1
            here = (*loc, name)
            if name in first:
                self._add(
                    here,
                    f"duplicate key {name!r} (first on line {first[name]}); YAML keeps "
                    "only the last one, so remove or rename one",
                    line=line,
                )
                self.reported.append(here)
                continue
            first[name] = line
            is_field = schema is not None and name in schema.model_fields
            if is_field and isinstance(value, yaml.ScalarNode) and value.tag == _NULL:
                self._add(here, f"no value; write one or leave out `{name}`", line=line)
                self.reported.append(here)
                continue
            self._scan(value, here, seen_nodes)

    # -- ids -------------------------------------------------------------------------

    def _check_unique_items(self) -> None:
        if not isinstance(self.root, yaml.MappingNode):
            return
        # Ids are unique in the whole file (a rule and a limit may not share one).
        first: dict[tuple[str, str], tuple[str, int, int]] = {}
        for key, value in self.root.value:
            if not isinstance(key, yaml.ScalarNode) or not isinstance(
                value, yaml.SequenceNode
            ):
                continue
            section = str(key.value)
            item_model = _model_at(self.model, (section, 0))
            item_key = _item_key(item_model)
            if item_key is None:
                continue
            for field in _unique_fields(item_model):
                self._check_unique_field(section, value, field)
            for index, item in enumerate(value.value):
                found = _lookup(item, item_key)
                if found is None or not isinstance(found[1], yaml.ScalarNode):
                    continue
                name, line = str(found[1].value), found[0].start_mark.line + 1
                seen = (item_key, name) if item_key == "id" else (section, name)
                if seen not in first:
                    first[seen] = (section, index, line)
                    continue
                was_section, was, was_line = first[seen]
                self._add(
                    (section, index),
                    f"{item_key} {name!r} is used twice, by {was_section}[{was}] (line "
                    f"{was_line}) and {section}[{index}] (line {line}); give each its "
                    f"own {item_key}",
                    line=line,
                )
                self.duplicate_ids.append(name)

    def _check_unique_field(
        self, section: str, items: yaml.SequenceNode, field: str
    ) -> None:
        seen: dict[str, tuple[int, int]] = {}
        for index, item in enumerate(items.value):
            found = _lookup(item, field)
            if found is None or not isinstance(found[1], yaml.ScalarNode):
                continue
            name, line = str(found[1].value), found[0].start_mark.line + 1
            if name not in seen:
                seen[name] = (index, line)
                continue
            was, was_line = seen[name]
            self._add(
                (section, index),
                f"{field} {name!r} is used twice, by {section}[{was}] (line {was_line}) "
                f"and {section}[{index}] (line {line}); keep one",
                line=line,
            )
            self.duplicate_ids.append(name)

    # -- pydantic --------------------------------------------------------------------

    def _add_pydantic(self, errors: Sequence[Mapping[str, Any]]) -> None:
        missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
        guessed: set[_Loc] = set()
        messages: list[tuple[_Loc, str, bool]] = []
        for error in errors:
            loc: _Loc = tuple(error["loc"])
            if any(loc[: len(done)] == done for done in self.reported):
                continue
            if len(loc) <= 1 and any(
                repr(n) in str(error["msg"]) for n in self.duplicate_ids
            ):
                continue  # the model's own duplicate check: reported with lines
            if error["type"] == "extra_forbidden" and loc:
                text, guess = self._unknown_field(loc)
                if guess is not None and (*loc[:-1], guess) in missing:
                    guessed.add((*loc[:-1], guess))  # one mistake, one line
                elif len(loc) >= 2 and (*loc[:-2], loc[-1]) in missing:
                    # Indented one level too deep: `decision:` under `match:`.
                    guessed.add((*loc[:-2], loc[-1]))
                    text = (
                        f"{loc[-1]!r} does not belong in {loc[-2]!r}; it belongs one "
                        "level up (indent it less)"
                    )
                messages.append((loc, text, False))
            elif error["type"] == "missing" and loc:
                messages.append((loc, f"missing required field {loc[-1]!r}", True))
            else:
                messages.append((loc, _message(error), False))
        for loc, text, is_missing in messages:
            if loc not in guessed:
                self._add(loc[:-1] if is_missing else loc, text)

    def _unknown_field(self, loc: _Loc) -> tuple[str, str | None]:
        schema = _model_at(self.model, loc[:-1])
        known = list(schema.model_fields) if schema is not None else []
        what = "section" if len(loc) == 1 else "field"
        text = f"unknown {what} {loc[-1]!r}"
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            return f"{text}; did you mean {close[0]!r}?", close[0]
        if known:
            text += f"; known {what}s: {', '.join(known)}"
        return text, None

    # -- where -----------------------------------------------------------------------

    def _add(self, loc: _Loc, message: str, *, line: int | None = None) -> None:
        _, found_line = _walk(self.root, loc)
        item_id = item_key = None
        if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
            item_key = _item_key(_model_at(self.model, loc[:2]))
            item_node, _ = _walk(self.root, loc[:2])
            found = None if item_key is None else _lookup(item_node, item_key)
            if found is not None and isinstance(found[1], yaml.ScalarNode):
                item_id = str(found[1].value)
        self.problems.append(
            ConfigProblem(
                file=self.file,
                line=found_line if line is None else line,
                path=_dotted(loc),
                item_id=item_id,
                item_key=item_key or "id",
                message=" ".join(message.split()),
            )
        )


class _RecursiveAlias(Exception):
    """An alias inside the node it refers to; caught in `_Checker._parse`."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Count the values `node` stands for once every alias is expanded."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if id(node) in open_nodes:
        raise _RecursiveAlias(node.start_mark.line + 1)
    open_nodes.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, sizes, open_nodes)
            if size > _MAX_VALUES:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded_size(key, sizes, open_nodes)
            size += _expanded_size(value, sizes, open_nodes)
            if size > _MAX_VALUES:
                break
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def _lookup(node: object, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """Return the (key, value) nodes of `key` in a mapping node: the last, which wins."""
    if not isinstance(node, yaml.MappingNode):
        return None
    found = None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and str(k.value) == key:
            found = (k, v)
    return found


def _walk(root: yaml.Node | None, loc: _Loc) -> tuple[yaml.Node | None, int]:
    """Follow `loc` from `root`; return the deepest node reached and its line.

    A mapping key's line is the key's own (where a reader looks for it); a list
    item's is where the item starts.
    """
    node = root
    line = 1 if root is None else root.start_mark.line + 1
    for step in loc:
        if isinstance(node, yaml.MappingNode):
            found = _lookup(node, str(step))
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(step, int)
            and 0 <= step < len(node.value)
        ):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            break
    return node, line


def _dotted(loc: _Loc) -> str:
    """Write a location as `rules[3].match.role[0]`."""
    text = ""
    for step in loc:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text += f".{step}" if text else str(step)
    return text


def _unwrap(annotation: object) -> object:
    """Strip `Annotated` and `| None` from a field's type."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _model_at(
    model: type[pydantic.BaseModel], loc: _Loc
) -> type[pydantic.BaseModel] | None:
    """Return the model that validates the mapping at `loc`, if one does."""
    current: object = model
    for step in loc:
        current = _unwrap(current)
        if isinstance(step, str):
            if not (
                isinstance(current, type) and issubclass(current, pydantic.BaseModel)
            ):
                return None
            field = current.model_fields.get(step)
            if field is None:
                return None
            current = field.annotation
        else:
            args = get_args(current)
            if get_origin(current) not in (tuple, list) or not args:
                return None
            current = args[0]
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, pydantic.BaseModel):
        return current
    return None


def _unique_fields(model: type[pydantic.BaseModel] | None) -> tuple[str, ...]:
    """Return the fields besides the id that a list's items may not share.

    A model declares them as `model_config["json_schema_extra"]["x-unique"]`.
    """
    extra = None if model is None else model.model_config.get("json_schema_extra")
    unique = extra.get("x-unique") if isinstance(extra, dict) else None
    return tuple(str(f) for f in unique) if isinstance(unique, list) else ()


def _item_key(model: type[pydantic.BaseModel] | None) -> str | None:
    """Return the field that names a list item: `id`, else `name`."""
    if model is None:
        return None
    for key in ("id", "name"):
        if key in model.model_fields:
            return key
    return None


def _shown(value: object) -> str:
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


def _message(error: Mapping[str, Any]) -> str:
    """Say what a pydantic error means in the file's terms."""
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    msg = str(error["msg"])
    if kind in ("enum", "literal_error"):
        expected = str(ctx.get("expected", ""))
        choices = re.findall(r"'([^']*)'", expected) or [expected]
        shown = repr(value) if isinstance(value, (str, int, float)) else _shown(value)
        text = f"unknown value {shown}; use one of: {', '.join(choices)}"
        close = difflib.get_close_matches(str(value), choices, n=1)
        return f"{text} (did you mean {close[0]!r}?)" if close else text
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "assertion_error":
        return msg.removeprefix("Assertion failed, ")
    if kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}, got {_shown(value)}"
        if kind == "string_type" and isinstance(value, bool):
            text += " (YAML reads yes, no, on and off as true or false: quote the text)"
        return text
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    return msg
