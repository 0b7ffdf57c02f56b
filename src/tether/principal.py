"""Who acts: the agent, the user it acts for, its tenant, roles and scopes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Principal"]


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
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "roles", tuple(roles))
        object.__setattr__(self, "scopes", tuple(scopes))
        object.__setattr__(self, "tenant", tenant)
        object.__setattr__(self, "on_behalf_of", on_behalf_of)

    def describe(self) -> dict[str, object]:
        """Return the principal as JSON-ready data (for records)."""
        return {
            "id": self.id,
            "roles": list(self.roles),
            "scopes": list(self.scopes),
            "tenant": self.tenant,
            "on_behalf_of": self.on_behalf_of,
        }
