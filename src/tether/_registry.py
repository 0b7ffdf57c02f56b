"""The `Registry`: the capabilities one app can call, by name and version.

An app holds one as `app.capabilities` (`Tether.register` adds to it); a run
resolves each step's capability through `get`, and a planner asks for every
capability's tool schema each turn, so `tool_schemas` builds them once per
flavor. Import it from `tether.capability`.
"""

from __future__ import annotations

import copy
from typing import Any

from tether._capability_spec import Capability
from tether.errors import NotFound, UsageError

__all__ = ["Registry"]


class Registry:
    """The capabilities one app can call, by name and version."""

    __slots__ = ("_by_name", "_latest", "_schemas")

    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, Capability[Any, Any]]] = {}
        self._latest: dict[str, Capability[Any, Any]] = {}
        self._schemas: dict[str, list[dict[str, object]]] = {}
        """Tool schemas per flavor, built once: a planner asks for them every turn."""

    def add(self, cap: Capability[Any, Any]) -> None:
        """Add `cap`; the version registered last is the one `get(name)` returns.

        Raises:
            UsageError: `cap` is not a capability, or that name and version is taken
                by another one.
        """
        if not isinstance(cap, Capability):
            raise UsageError(
                f"{cap!r} is not a capability; decorate it with @tether.capability(...)"
            )
        versions = self._by_name.setdefault(cap.name, {})
        existing = versions.get(cap.version)
        if existing is not None and existing is not cap:
            raise UsageError(
                f"capability {cap.name!r} version {cap.version!r} is already "
                "registered; bump the version"
            )
        versions.pop(cap.version, None)
        versions[cap.version] = cap
        self._latest[cap.name] = cap
        self._schemas.clear()

    def get(self, name: str, version: str | None = None) -> Capability[Any, Any]:
        """Return the capability `name` (its latest version unless `version`).

        Raises:
            NotFound: no such capability or version.
        """
        if version is None:
            latest = self._latest.get(name)
            if latest is not None:
                return latest
        versions = self._by_name.get(name)
        if not versions:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise NotFound(f"unknown capability {name!r}; registered: {known}")
        assert version is not None  # a registered name always has a latest version
        try:
            return versions[version]
        except KeyError:
            raise NotFound(
                f"capability {name!r} has no version {version!r}; "
                f"registered: {', '.join(versions)}"
            ) from None

    def __iter__(self) -> Any:
        return (next(reversed(v.values())) for _, v in sorted(self._by_name.items()))

    def __len__(self) -> int:
        return len(self._by_name)

    def tool_schemas(self, flavor: str = "mcp") -> list[dict[str, object]]:
        """Return every capability's tool schema, sorted by name (a fresh list)."""
        cached = self._schemas.get(flavor)
        if cached is None:
            cached = self._schemas[flavor] = [cap.tool_schema(flavor) for cap in self]
        return copy.deepcopy(cached)
