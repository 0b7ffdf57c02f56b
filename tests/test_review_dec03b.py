"""What a review of 0037593 (the policy version covers Python policies) found, fixed.

The version keeps the file's part readable (`sha256:...+policies:...`), and
the export and replay's turn check compare that part; `CedarPolicy` reads
its entities once. Before the fix:

- `tether runs export` opens the app without the user's Python policies, so
  its policy version is the file's alone; a run the user's app recorded names
  the combined version. The export compares the two, finds them different,
  and drops the `tether.yaml` text even though the file has not changed: the
  export no longer carries the policy it ran under (docs/replay.md), and
  `tether replay FILE --app ...` elsewhere replays under whatever file is
  there.
- Replay tells a record made before the check before a planner turn (7eb3dd0)
  from one refused under another policy by comparing the recorded policy
  version with today's. A record made before 0037593 by an app with Python
  policies names the file's version; today's is the combined one, so the old
  record's turns past a spent budget are now divergences instead of the note
  the earlier fix gave them.
- `CedarPolicy` now hashes `list(entities)` for its version before it reads
  the entities: entities given as an iterator (a generator) are used up by
  the hash and the policy is built with none, silently. A `forbid` that
  reaches a principal through those entities then no longer applies.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

import tether
import tether.policy
from test_policy_version import POLICY, Guard, refund
from test_turn_review import LIMITS, _record_without_turn_checks, save
from tether.cli import main
from tether.replay import RecordedRun, Replayer
from tether.testing import FakeClock

# -- `tether runs export` of a run made by an app with Python policies ------------------


def test_a_cli_export_of_a_run_under_python_policies_carries_the_unchanged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file has not changed since the run: the export carries its text, as docs/replay.md says."""
    config = tmp_path / "tether.yaml"
    config.write_text(POLICY)
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, config=config, env={}) as app:
        app.register(refund)
        app.add_policy(Guard())
        with app.run(
            principal=tether.Principal("bot", tenant="acme"), request="r"
        ) as run:
            run.step("pay.refund", {"cents": 5})
        in_app_header = json.loads(next(iter(app.export(run.id))))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TETHER_CONFIG", raising=False)
    monkeypatch.delenv("TETHER_DB", raising=False)
    out = tmp_path / "run.tether.jsonl"

    code = main(["runs", "export", run.id, "--db", db, "-o", str(out)])

    assert code == 0
    assert in_app_header["config"] == POLICY  # the app itself still carries it
    header = RecordedRun.from_file(out).header
    assert header["config"] == POLICY


# -- records made before the turn check, by an app with Python policies -----------------


def test_an_old_record_of_an_app_with_python_policies_taking_turns_past_a_spent_budget_is_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made before 0037593 (its version the file's) and before the turn check: a note, no divergence."""
    config = tmp_path / "tether.yaml"
    config.write_text(LIMITS)
    db = f"sqlite:///{tmp_path / 't.db'}"

    def open_app() -> tether.Tether:
        app = tether.Tether(db=db, config=config, clock=FakeClock(), env={})
        app.register(save)
        app.add_policy(Guard())
        return app

    with monkeypatch.context() as old_code:
        # As the code before 0037593 computed it: the file's version alone.
        old_code.setattr(tether.policy, "combined_version", lambda version, _: version)
        with open_app() as app:
            file_version = app.policy.version
            run_id = _record_without_turn_checks(app, turns=4)
            recorded = RecordedRun.from_store(app.store, run_id)

    with open_app() as app:
        assert app.policy.file_version == file_version  # the same file, the same policy
        report = Replayer(app).replay(recorded)

    assert sum(e["kind"] == "usage_charged" for e in recorded.events) == 4
    assert report.divergences == []
    assert any("predates the check before a turn" in n for n in report.notes)


# -- CedarPolicy entities given as an iterator -------------------------------------------


def test_cedar_entities_given_as_an_iterator_still_decide() -> None:
    """A forbid reaching the principal through a given role hierarchy still denies."""
    from tether.policy.cedar import CedarPolicy

    hierarchy = [
        {
            "uid": {"type": "Role", "id": "intern"},
            "attrs": {},
            "parents": [{"type": "Role", "id": "restricted"}],
        }
    ]
    text = '@id("no-restricted") forbid(principal in Role::"restricted", action, resource);'
    from_list = CedarPolicy(text, entities=hierarchy)
    # Outside the annotation (a Sequence), but it worked before 0037593.
    from_iterator = CedarPolicy(text, entities=iter(hierarchy))  # type: ignore[arg-type]
    intern = tether.Principal("ivy", roles=["intern"], tenant="acme")
    asked = tether.DecisionRequest(
        principal=intern,
        capability="pay.refund",
        version="1",
        effect="write",
        scopes=(),
        args={"cents": 5},
        context={},
        steps_so_far=0,
        cost_so_far=Decimal(0),
        at=datetime(2026, 12, 3, tzinfo=UTC),
    )

    listed = from_list.evaluate(asked)
    iterated = from_iterator.evaluate(asked)

    assert (None if listed is None else listed.verdict) is tether.Verdict.DENY
    assert (None if iterated is None else iterated.verdict) is tether.Verdict.DENY
