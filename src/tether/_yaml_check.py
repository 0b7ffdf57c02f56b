"""Checking a YAML file against a pydantic model, every problem with its line.

The file is composed with PyYAML first (nodes keep their line), then constructed
and validated by the model; each pydantic error's `loc` is walked back through
the node tree to the line that holds the offending key or value. `config.py`
uses it for `tether.yaml` and policy test files. Following a place to its line
is in `_yaml_nodes`, finding the model of a place in `_yaml_schema`, and the
wording of pydantic's errors in `_yaml_messages`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pydantic
import yaml

from tether._yaml_messages import error_message, shown, unknown_field
from tether._yaml_nodes import (
    MAX_DEPTH,
    MAX_VALUES,
    Loader,
    Loc,
    RecursiveAlias,
    TooDeep,
    alias_values,
    dotted,
    lookup,
    walk,
)
from tether._yaml_schema import model_at, name_field, unique_fields

__all__ = ["ConfigCheck", "ConfigProblem", "check_file"]

# -- problems, each with its line ----------------------------------------------------------
#
# The file is composed with PyYAML first (nodes keep their line), then constructed and
# validated by the models; each pydantic error's `loc` is walked back through the node
# tree to the line that holds the offending key or value.

M = TypeVar("M", bound=pydantic.BaseModel)
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_ITEM = re.compile(r"^[^.\[]+\[\d+\]")


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
        self.reported: list[Loc] = []
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
                f"not {shown(data)}",
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
        loader: Loader | None = None
        try:
            loader = Loader(raw)
            node = loader.get_single_node()
            if node is None:
                return {}  # an empty file (or only comments): every default
            self.root = node
            if alias_values(node) > MAX_VALUES:
                self._add(
                    (),
                    f"the file expands to over {MAX_VALUES} values through "
                    "anchors and aliases; write it out plainly",
                )
                return _Invalid()
            self._scan(node, (), set())
            return loader.construct_document(node)
        except TooDeep as exc:
            self.problems.append(
                ConfigProblem(
                    file=self.file,
                    line=exc.line,
                    message=f"lists and mappings are nested over {MAX_DEPTH} deep "
                    "here; a tether file needs a few levels, so flatten it",
                )
            )
        except RecursiveAlias as exc:
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

    def _scan(self, node: yaml.Node, loc: Loc, seen_nodes: set[int]) -> None:
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
        schema = model_at(self.model, loc)
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
            item_model = model_at(self.model, (section, 0))
            item_key = name_field(item_model)
            if item_key is None:
                continue
            for field in unique_fields(item_model):
                self._check_unique_field(section, value, field)
            for index, item in enumerate(value.value):
                found = lookup(item, item_key)
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
            found = lookup(item, field)
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
        guessed: set[Loc] = set()
        messages: list[tuple[Loc, str, bool]] = []
        for error in errors:
            loc: Loc = tuple(error["loc"])
            if any(loc[: len(done)] == done for done in self.reported):
                continue
            if len(loc) <= 1 and any(
                repr(n) in str(error["msg"]) for n in self.duplicate_ids
            ):
                continue  # the model's own duplicate check: reported with lines
            if error["type"] == "extra_forbidden" and loc:
                text, guess = unknown_field(self.model, loc)
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
                messages.append((loc, error_message(error), False))
        for loc, text, is_missing in messages:
            if loc not in guessed:
                self._add(loc[:-1] if is_missing else loc, text)

    # -- where -----------------------------------------------------------------------

    def _add(self, loc: Loc, message: str, *, line: int | None = None) -> None:
        _, found_line = walk(self.root, loc)
        item_id = item_key = None
        if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
            item_key = name_field(model_at(self.model, loc[:2]))
            item_node, _ = walk(self.root, loc[:2])
            found = None if item_key is None else lookup(item_node, item_key)
            if found is not None and isinstance(found[1], yaml.ScalarNode):
                item_id = str(found[1].value)
        self.problems.append(
            ConfigProblem(
                file=self.file,
                line=found_line if line is None else line,
                path=dotted(loc),
                item_id=item_id,
                item_key=item_key or "id",
                message=" ".join(message.split()),
            )
        )
