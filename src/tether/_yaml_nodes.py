"""Places in a composed YAML file: the node and line a location names.

PyYAML's composer keeps each node's position. A location (`Loc`, as in a
pydantic error's `loc`) is followed through the node tree to the line a reader
looks at, and written as `rules[3].match.role[0]`; a file's size once anchors
and aliases are expanded is counted before it is constructed (a YAML bomb guard),
and its nesting is bounded while it is composed (PyYAML's composer recurses).
"""

from __future__ import annotations

import yaml

__all__ = [
    "MAX_DEPTH",
    "MAX_VALUES",
    "Loader",
    "Loc",
    "RecursiveAlias",
    "TooDeep",
    "alias_values",
    "dotted",
    "lookup",
    "walk",
]

Loc = tuple[str | int, ...]
"""A place in the file: mapping keys and list indexes, from the top."""

MAX_VALUES = 100_000
"""Most values anchors and aliases may add to a file (a YAML bomb guard)."""

MAX_DEPTH = 100
"""Deepest nesting of lists and mappings a file may have: PyYAML composes a
node by recursion, so a hostile file would otherwise exhaust Python's stack."""


class RecursiveAlias(Exception):
    """An alias inside the node it refers to; caught in `_yaml_check._Checker._parse`."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class TooDeep(Exception):
    """Nesting past `MAX_DEPTH`; caught in `_yaml_check._Checker._parse`."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than `MAX_DEPTH` as it composes."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose one node, counting how deep it sits (raises `TooDeep`)."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise TooDeep(event.start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def alias_values(node: yaml.Node) -> int:
    """Count the values aliases add to `node` once expanded, up to past `MAX_VALUES`.

    A file written out plainly adds none, however long it is: the guard is for
    a few lines of aliases that expand to millions of values.

    Raises:
        RecursiveAlias: an alias inside the node it refers to.
    """
    plain = _distinct(node)
    return _expanded(node, {}, set(), plain + MAX_VALUES) - plain


def _distinct(root: yaml.Node) -> int:
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack += (key, value)
    return len(seen)


def _expanded(
    node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], limit: int
) -> int:
    """Count the values `node` stands for once every alias is expanded (stops past `limit`)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if id(node) in open_nodes:
        raise RecursiveAlias(node.start_mark.line + 1)
    open_nodes.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded(item, sizes, open_nodes, limit)
            if size > limit:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded(key, sizes, open_nodes, limit)
            size += _expanded(value, sizes, open_nodes, limit)
            if size > limit:
                break
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def lookup(node: object, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """Return the (key, value) nodes of `key` in a mapping node: the last, which wins."""
    if not isinstance(node, yaml.MappingNode):
        return None
    found = None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and str(k.value) == key:
            found = (k, v)
    return found


def walk(root: yaml.Node | None, loc: Loc) -> tuple[yaml.Node | None, int]:
    """Follow `loc` from `root`; return the deepest node reached and its line.

    A mapping key's line is the key's own (where a reader looks for it); a list
    item's is where the item starts.
    """
    node = root
    line = 1 if root is None else root.start_mark.line + 1
    for step in loc:
        if isinstance(node, yaml.MappingNode):
            found = lookup(node, str(step))
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


def dotted(loc: Loc) -> str:
    """Write a location as `rules[3].match.role[0]`."""
    text = ""
    for step in loc:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text += f".{step}" if text else str(step)
    return text
