"""The comparison: a recorded event beside the one today's code wrote, field by field.

The walk (`_walk`) re-drives each step and hands this module both sides: what the
record holds and what the scratch run gained. What differs is written into the
report: the first differing field of the first differing event as a divergence,
and in what-if mode every changed decision with the rules that account for it.
Times, durations and jitter are the world's, not a decision's: never compared.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tether.replay._report import DecisionChange, Divergence, ReplayReport

__all__ = ["IGNORED_FIELDS", "Comparison"]

IGNORED_FIELDS = frozenset({"at", "duration_us", "delay_us"})
"""Fields that are the world's (times, durations, jitter), not a decision's."""

_NOT_COMPARED = frozenset({"breaker_transition"})
"""A transition depends on every run's calls to the resource, not this run's alone:
reported when it differs, but never as a divergence."""


class Comparison:
    """One replay's comparison, writing what differs into its report."""

    def __init__(self, report: ReplayReport) -> None:
        self.report = report
        self.version_noted = False
        """The policy version differs (said once, in the notes)."""

    def events(
        self,
        number: int | None,
        recorded: Sequence[dict[str, Any]],
        now: Sequence[dict[str, Any]],
        *,
        run_level: bool = False,
    ) -> None:
        """Compare a step's (or a run-level event's) recorded events with the new ones."""
        mine = [e for e in recorded if e["kind"] not in _NOT_COMPARED and not _empty(e)]
        theirs = [e for e in now if e["kind"] not in _NOT_COMPARED]
        if not run_level:
            # A step that finds its request lapsed records the expiry as a decision;
            # decisions are walked where the record has them (see _walk's _decided).
            theirs = [e for e in theirs if e["kind"] != "approval_decided"]
        if run_level:  # a plan admission or a usage charge: only its own kinds
            kinds = {e["kind"] for e in mine}
            theirs = [e for e in theirs if e["kind"] in kinds]
        for old, new in itertools.zip_longest(mine, theirs):
            if old is None:
                self.diverge(number, "extra", None, "nothing", _summary(new))
                return
            if new is None:
                self.diverge(number, "missing", None, _summary(old), "nothing")
                return
            if old["kind"] != new["kind"]:
                self.diverge(number, old["kind"], None, _summary(old), _summary(new),
                             old, new)  # fmt: skip
                return
            old_version, new_version = (
                old.get("policy_version"),
                new.get("policy_version"),
            )
            if old_version != new_version and not self.version_noted:
                self.version_noted = True
                self.report.notes.append(
                    f"recorded under policy version {old_version}, replayed under "
                    f"{new_version}"
                )
            name = _first_difference(old, new, versions_differ=self.version_noted)
            if name is not None:
                self.diverge(
                    number, old["kind"], name, old.get(name), new.get(name), old, new
                )
                return

    def diverge(
        self,
        number: int | None,
        kind: str,
        name: str | None,
        was: Any,
        now: Any,
        old: Mapping[str, Any] | None = None,
        new: Mapping[str, Any] | None = None,
    ) -> None:
        """Report a divergence, naming the rules either decision named."""
        rules: list[str] = []
        versions: tuple[str | None, str | None] = (None, None)
        for e in (old, new):
            if e is not None:
                rules.extend(r for r in e.get("rule_ids") or () if r not in rules)
                for s in e.get("steps") or ():
                    if isinstance(s, Mapping):
                        rules.extend(
                            r for r in s.get("rule_ids") or () if r not in rules
                        )
        if old is not None and new is not None and "policy_version" in old:
            versions = (old.get("policy_version"), new.get("policy_version"))
        self.report.divergences.append(
            Divergence(
                step=number,
                kind=kind,
                field=name,
                recorded=was,
                now=now,
                rule_ids=tuple(rules),
                policy_version=versions,
            )
        )

    def step_changes(
        self,
        number: int,
        name: str,
        recorded: Sequence[dict[str, Any]],
        now: Sequence[dict[str, Any]],
    ) -> None:
        """What-if: report the step's decision if its verdict changed."""
        old = next((e for e in recorded if e["kind"] == "decided"), None)
        new = next((e for e in now if e["kind"] == "decided"), None)
        if old is None or new is None or old["verdict"] == new["verdict"]:
            return
        self.report.decisions.append(
            DecisionChange(
                run_id=self.report.run_id,
                step=number,
                capability=name,
                recorded=old["verdict"],
                now=new["verdict"],
                rule_ids=_attribute(old, new),
            )
        )

    def plan_changes(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """What-if: report each planned step whose admission verdict changed."""
        for was, now in zip(
            old.get("steps") or (), new.get("steps") or (), strict=False
        ):
            if was.get("verdict") != now.get("verdict"):
                self.report.decisions.append(
                    DecisionChange(
                        run_id=self.report.run_id,
                        step=None,
                        capability=str(was.get("capability")),
                        recorded=str(was.get("verdict")),
                        now=str(now.get("verdict")),
                        rule_ids=_attribute(was, now),
                        source="plan",
                    )
                )


_VERSIONED = frozenset({"policy_version", "digest"})
"""Fields that change with the policy file's version (a grant's digest covers it):
a new version alone is a note; what it changes shows in verdicts and rules."""


_FIRST = ("verdict", "status", "admitted", "state", "rule_ids", "limit", "breaker")
"""Fields a reader wants named first when several differ: the outcome, then why."""


def _empty(event: Mapping[str, Any]) -> bool:
    """Tell whether a recorded event says nothing: today's code does not write it.

    Records made before 2026-12-03 hold a `limit_settled` with no limits for a
    step in doubt (or cut off) that reserved nothing.
    """
    return event["kind"] == "limit_settled" and not event.get("limits")


def _weight(name: str) -> tuple[int, str]:
    return (_FIRST.index(name) if name in _FIRST else len(_FIRST), name)


def _first_difference(
    old: Mapping[str, Any], new: Mapping[str, Any], *, versions_differ: bool
) -> str | None:
    if old.keys() == new.keys() and all(
        value == new[name] or name in IGNORED_FIELDS for name, value in old.items()
    ):
        return None  # the common case, without sorting field names
    for name in sorted(set(old) | set(new), key=_weight):
        if name not in old and name in new:
            continue  # a field added since the record was written: nothing to compare
        if name in IGNORED_FIELDS or (versions_differ and name in _VERSIONED):
            continue
        if old.get(name) != new.get(name):
            if name == "message" and (
                (old.get("kind") == "failed" and old.get("stage") == "output")
                or old.get("error_code") == "invalid_output"  # a retry's
                or old.get("error_type") == "InvalidOutput"  # an in-doubt write's
            ):
                continue  # the invalid output itself is not recorded, only its error
            return name
    return None


def _attribute(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, ...]:
    """The rules that account for a changed decision.

    Rules named by one decision but not the other; when both name the same rules
    (a rule's own verdict changed), those. `(default)` when no rule took part.
    """
    was = list(old.get("rule_ids") or ())
    now = list(new.get("rule_ids") or ())
    changed = [r for r in now if r not in was] + [r for r in was if r not in now]
    return tuple(changed or now or was or ["(default)"])


def _summary(event: Mapping[str, Any]) -> str:
    kind = str(event.get("kind"))
    for name in ("verdict", "status", "stage", "capability", "limit", "breaker"):
        if name in event and event[name] is not None:
            return f"{kind} ({name} {event[name]})"
    return kind
