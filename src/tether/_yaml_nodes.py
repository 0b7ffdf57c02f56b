"""Places in a composed YAML file: the node and line a location names.

PyYAML's composer keeps each node's position. A location (`Loc`, as in a
pydantic error's `loc`) is followed through the node tree to the line a reader
looks at, and written as `rules[3].match.role[0]`; a file's size once anchors
and aliases are expanded is counted before it is constructed (a YAML bomb guard).
"""

from __future__ import annotations

import yaml

__all__ = [
    "MAX_VALUES",
    "Loc",
    "RecursiveAlias",
    "dotted",
    "expanded_size",
    "lookup",
    "walk",
]

Loc = tuple[str | int, ...]
"""A place in the file: mapping keys and list indexes, from the top."""

MAX_VALUES = 100_000
"""Most values a file may expand to through anchors and aliases (a YAML bomb guard)."""


class RecursiveAlias(Exception):
    """An alias inside the node it refers to; caught in `_yaml_check._Checker._parse`."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Count the values `node` stands for once every alias is expanded."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if id(node) in open_nodes:
        raise RecursiveAlias(node.start_mark.line + 1)
    open_nodes.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += expanded_size(item, sizes, open_nodes)
            if size > MAX_VALUES:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += expanded_size(key, sizes, open_nodes)
            size += expanded_size(value, sizes, open_nodes)
            if size > MAX_VALUES:
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
