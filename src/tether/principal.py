"""Who acts: the agent, the user it acts for, its tenant, roles and scopes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tether.errors import UsageError

__all__ = ["Principal", "check_text"]


def check_text(value: object, what: str, *, name: bool = False) -> str:
    """Return `value` if the record can keep it as text; else raise one line saying why.

    Every store keeps the same text: PostgreSQL's text holds no NUL character,
    so none is accepted anywhere. A `name` (an id, a tenant, a role) is one
    non-empty line of printable characters.

    Raises:
        UsageError: `value` is not text, holds a NUL, or is not a valid name.
    """
    if not isinstance(value, str):
        raise UsageError(f"{what} must be text, got {type(value).__name__}")
    if name and (not value or not value.isprintable()):
        raise UsageError(
            f"{what} {value!r:.80} is not a name; use printable characters, "
            "no control characters, at least one"
        )
    if "\x00" in value:
        raise UsageError(f"{what} holds a NUL character (\\x00); remove it")
    return value


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity a run acts as.

    Example:
        ```python
        bot = tether.Principal("ops-bot", roles=["agent"], tenant="acme")
        ```
    """

    id: str
    """The agent's id, e.g. `"ops-bot"`."""
    roles: tuple[str, ...] = field(default=(), kw_only=True)
    """Roles policy rules match on."""
    scopes: tuple[str, ...] = field(default=(), kw_only=True)
    """Scopes the principal holds; a capability's required scopes are checked against them."""
    tenant: str = field(default="default", kw_only=True)
    """The tenant; idempotency keys and limits are scoped by it."""
    on_behalf_of: str | None = field(default=None, kw_only=True)
    """The person the agent acts for, when there is one."""

    def __init__(
        self,
        id: str,  # the DESIGN vocabulary names it `id`
        *,
        roles: Sequence[str] = (),
        scopes: Sequence[str] = (),
        tenant: str = "default",
        on_behalf_of: str | None = None,
    ) -> None:
        if isinstance(roles, str) or isinstance(scopes, str):
            raise UsageError("roles and scopes are lists of names: write roles=['sre']")
        object.__setattr__(self, "id", check_text(id, "the principal's id", name=True))
        object.__setattr__(
            self, "roles", tuple(check_text(r, "a role", name=True) for r in roles)
        )
        object.__setattr__(
            self, "scopes", tuple(check_text(s, "a scope", name=True) for s in scopes)
        )
        object.__setattr__(self, "tenant", check_text(tenant, "the tenant", name=True))
        object.__setattr__(
            self,
            "on_behalf_of",
            None if on_behalf_of is None else check_text(on_behalf_of, "on_behalf_of"),
        )

    def describe(self) -> dict[str, object]:
        """Return the principal as JSON-ready data (for records)."""
        return {
            "id": self.id,
            "roles": list(self.roles),
            "scopes": list(self.scopes),
            "tenant": self.tenant,
            "on_behalf_of": self.on_behalf_of,
        }
