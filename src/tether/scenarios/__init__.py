"""Built-in demo domains: a world, capabilities over it, and a scripted agent.

`SCENARIOS` maps each scenario's name to a `Scenario`; `tether demo --scenario
NAME` runs one end to end. Add a domain (support refunds, payments) by writing
its module beside `cloud_ops.py` and listing it here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tether.agent import Planner, run_agent
from tether.app import Tether
from tether.handle import Run
from tether.principal import Principal
from tether.scenarios import cloud_ops

__all__ = ["SCENARIOS", "Scenario"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """A demo domain: how to set it up, who acts, what is asked and who plans.

    Example:
        ```python
        scenario = SCENARIOS["cloud-ops"]
        scenario.setup(app)
        run = run_agent(app, scenario.planner(), principal=scenario.principal,
                        request=scenario.request, context=scenario.context)
        ```
    """

    name: str
    """The name `tether demo --scenario` takes."""
    description: str
    """One line on what happens."""
    setup: Callable[[Tether], None]
    """Register the scenario's capabilities on an app, over a fresh world."""
    planner: Callable[[], Planner]
    """Make the scenario's (scripted) planner."""
    request: str
    """The task the agent is given."""
    principal: Principal
    """Who the agent acts as."""
    context: Mapping[str, Any] = field(default_factory=dict)
    """Recorded with the run; holds `scenario` so tools can find the capabilities."""

    def run(self, app: Tether) -> Run:
        """Run the scripted agent once on `app` (set up with `setup` first)."""
        return run_agent(
            app,
            self.planner(),
            principal=self.principal,
            request=self.request,
            context=self.context,
        )


SCENARIOS: Mapping[str, Scenario] = MappingProxyType(
    {
        cloud_ops.NAME: Scenario(
            name=cloud_ops.NAME,
            description=cloud_ops.DESCRIPTION,
            setup=cloud_ops.build_app,
            planner=cloud_ops.scripted_planner,
            request=cloud_ops.incident_request(),
            principal=cloud_ops.PRINCIPAL,
            context=MappingProxyType(dict(cloud_ops.CONTEXT)),
        ),
    }
)
"""Every built-in scenario, by name."""
