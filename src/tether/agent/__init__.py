"""The reasoning loop and its planners: the agent proposes, the gateway disposes.

`run_agent(app, planner, ...)` drives one run; `ScriptedPlanner` is the
deterministic planner for demos and tests. Any object with
`propose(PlannerInput) -> Proposal` is a planner.
"""

from __future__ import annotations

from tether.agent.loop import PlannerFailed, PlannerGaveUp, StepLimitReached, run_agent
from tether.agent.planner import (
    Observation,
    Planner,
    PlannerInput,
    Proposal,
    ProposedStep,
    ScriptedPlanner,
    ScriptedStep,
    Usage,
)

__all__ = [
    "Observation",
    "Planner",
    "PlannerFailed",
    "PlannerGaveUp",
    "PlannerInput",
    "Proposal",
    "ProposedStep",
    "ScriptedPlanner",
    "ScriptedStep",
    "StepLimitReached",
    "Usage",
    "run_agent",
]
