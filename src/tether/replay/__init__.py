"""Deterministic replay: drive a recorded run again through today's call path.

A replay takes a run's record (from the store or an exported file) and walks it
event by event. Each step is re-driven through `gateway.step`, the same call path
a live call takes, against a scratch in-memory store and a clock that reads the
record's own timestamps; plan admissions and usage charges are re-made too.
Whatever reaches the world is taken from the record instead:

- a handler's result (output, error, timeout) is the recorded one; nothing is
  executed, except a dry-run handler in `--dry-run` mode, which acts on nothing;
- the clock reads each event's recorded time, ids are the recorded ids;
- a person's approval decision is applied to the scratch store where the record
  shows it was made.

Every validation, precondition, decision, limit and breaker outcome is thereby
computed afresh by today's code and compared with the recorded event, field by
field; times and durations are not compared (they are the world's, not a
decision's), and neither is a retry's jittered delay.

What a replay cannot see is state other runs made: another run's use of a shared
budget, its breaker samples, its idempotency keys. The scratch store starts
empty, so a step whose recorded outcome depended on such state is reported as
divergent, naming the limit, breaker or key; docs/replay.md says how to read it.
"""

from __future__ import annotations

from tether.replay._compare import IGNORED_FIELDS
from tether.replay._records import RecordedRun
from tether.replay._report import (
    DecisionChange,
    Divergence,
    Mode,
    Prediction,
    ReplayError,
    ReplayReport,
)
from tether.replay._walk import Replayer

__all__ = [
    "IGNORED_FIELDS",
    "DecisionChange",
    "Divergence",
    "Mode",
    "Prediction",
    "RecordedRun",
    "ReplayError",
    "ReplayReport",
    "Replayer",
]
