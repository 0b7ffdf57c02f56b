"""What a replay reports: divergences, changed decisions, dry-run predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tether import _canonical
from tether.errors import UsageError

__all__ = [
    "DecisionChange",
    "Divergence",
    "Mode",
    "Prediction",
    "ReplayError",
    "ReplayReport",
]

Mode = Literal["verify", "what_if", "dry_run"]


class ReplayError(UsageError):
    """A record cannot be replayed (unreadable, newer format, unknown capability)."""

    code = "replay_impossible"


# -- what a replay reports --------------------------------------------------------


@dataclass(slots=True, frozen=True, kw_only=True)
class Divergence:
    """Where today's code decided differently from the record."""

    step: int | None
    """The step, or None for a run-level event (a plan admission)."""
    kind: str
    """The recorded event kind (the stage), or `missing`/`extra`."""
    field: str | None
    """The first differing field, or None when the events differ in kind."""
    recorded: Any
    now: Any
    rule_ids: tuple[str, ...] = ()
    """Rules named by the recorded or the new decision, when it is one."""
    policy_version: tuple[str | None, str | None] = (None, None)
    """Recorded and current policy version, for a decision."""

    def describe(self) -> str:
        """One readable line."""
        where = "run" if self.step is None else f"step {self.step}"
        if self.field is None:
            text = f"{where}: recorded {self.recorded}, now {self.now}"
        else:
            text = (
                f"{where} {self.kind}: {self.field} was {_short(self.recorded)}, "
                f"now {_short(self.now)}"
            )
        if self.rule_ids:
            text += f" (rules: {', '.join(self.rule_ids)})"
        old, new = self.policy_version
        if old != new and old is not None and new is not None:
            text += f" (policy version {old} -> {new})"
        return text

    def to_json(self) -> dict[str, Any]:
        """The divergence as JSON-ready data."""
        return {
            "step": self.step,
            "kind": self.kind,
            "field": self.field,
            "recorded": self.recorded,
            "now": self.now,
            "rule_ids": list(self.rule_ids),
            "policy_version": {
                "recorded": self.policy_version[0],
                "now": self.policy_version[1],
            },
            "message": self.describe(),
        }


@dataclass(slots=True, frozen=True, kw_only=True)
class DecisionChange:
    """A decision that a replay made differently (what-if's unit)."""

    run_id: str
    step: int | None
    """The step, or None for a plan admission's step."""
    capability: str
    recorded: str
    now: str
    rule_ids: tuple[str, ...]
    """The rules that account for the change (see `_compare._attribute`)."""
    source: Literal["step", "plan"] = "step"

    def to_json(self) -> dict[str, Any]:
        """The change as JSON-ready data."""
        return {
            "run_id": self.run_id,
            "step": self.step,
            "capability": self.capability,
            "recorded": self.recorded,
            "now": self.now,
            "rule_ids": list(self.rule_ids),
            "source": self.source,
        }


@dataclass(slots=True, frozen=True, kw_only=True)
class Prediction:
    """A dry-run handler's prediction beside what the step really returned."""

    step: int
    capability: str
    recorded: dict[str, Any]
    predicted: dict[str, Any] | None
    error: str | None = None
    """Why the dry-run handler gave no prediction, if it did not."""

    @property
    def differs(self) -> dict[str, tuple[Any, Any]]:
        """Top-level fields whose predicted value differs from the real one."""
        if self.predicted is None:
            return {}
        keys = sorted(set(self.recorded) | set(self.predicted))
        return {
            k: (self.recorded.get(k), self.predicted.get(k))
            for k in keys
            if self.recorded.get(k) != self.predicted.get(k)
        }

    def to_json(self) -> dict[str, Any]:
        """The prediction as JSON-ready data."""
        return {
            "step": self.step,
            "capability": self.capability,
            "recorded": self.recorded,
            "predicted": self.predicted,
            "error": self.error,
            "differs": {
                k: {"recorded": r, "predicted": p} for k, (r, p) in self.differs.items()
            },
        }


@dataclass(slots=True, kw_only=True)
class ReplayReport:
    """What one replay found."""

    run_id: str
    mode: Mode
    events: int
    """Recorded events walked."""
    steps: int
    """Steps re-driven through the call path."""
    divergences: list[Divergence] = field(default_factory=list)
    decisions: list[DecisionChange] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the replay could not re-check, and why (never a divergence)."""

    @property
    def ok(self) -> bool:
        """True when every re-computed outcome matched the record."""
        return not self.divergences

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON-ready document (stable key order)."""
        return {
            "run_id": self.run_id,
            "mode": self.mode,
            "ok": self.ok,
            "events": self.events,
            "steps": self.steps,
            "divergences": [d.to_json() for d in self.divergences],
            "decisions": [d.to_json() for d in self.decisions],
            "predictions": [p.to_json() for p in self.predictions],
            "notes": list(self.notes),
        }


def _short(value: Any) -> str:
    text = (
        repr(value)
        if not isinstance(value, (dict, list))
        else _canonical.dumps(value).decode()
    )
    return text if len(text) <= 120 else text[:117] + "..."
