"""`tether replay` and `tether policy what-if`: the issue's bars and the CLI contract.

Runs are recorded by the real `tether demo` on a SQLite file in the test's own
folder and replayed by the real command, in this process (`tether.cli.main`),
or in a subprocess where a folder with no database is the point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tether
from tether import _canonical, _chain
from tether.cli import main
from tether.replay import RecordedRun, Replayer, ReplayError
from tether.scenarios import SCENARIOS

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")
"""The installed command, for the tests that need a process of its own."""

RULE = """\
rules:
  - id: wide-log-searches
    match: {capability: logs.search}
    when: "args.limit > LIMIT"
    decision: deny
    reason: searches that wide load the log cluster
"""
"""A rule on the demo's one `logs.search` step (step 2, whose `limit` is 20)."""

GUARDS = """\
limits:
  - {id: k8s-changes, kind: quota, per: hour, max: 5, resource: k8s}
breakers:
  - {id: k8s-api, resource: k8s, window: 4, failure_rate: 0.5, open_for: 30s}
"""
"""A quota and a breaker on the resource the demo's restarts and rollbacks use."""


def policy(limit: int = 50) -> str:
    """Return a `tether.yaml`: the rule with its threshold at `limit`, and the guards.

    With a file, destructive steps default to `require_approval`, so the demo's
    rollbacks are held for a person: the record has default decisions and
    approval requests as well as rule decisions.
    """
    return RULE.replace("LIMIT", str(limit)) + GUARDS


@dataclass(frozen=True, slots=True)
class Done:
    """One command's exit code and output."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """Return stdout as the one JSON document `--json` prints."""
        return json.loads(self.out)


class Cli:
    """Runs `tether` in this process, in the test's folder, on its own database."""

    def __init__(self, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.folder = folder
        self.capsys = capsys
        self.path = folder / "tether.db"
        self.db = f"sqlite:///{self.path}"

    def __call__(self, *args: str, db: bool = True) -> Done:
        """Run the command; `--db` is this test's database unless `db` is False."""
        code = main([*args, *(["--db", self.db] if db else [])])
        out, err = self.capsys.readouterr()
        return Done(code, out, err)

    def demo(self) -> str:
        """Run the demo (under the folder's `tether.yaml`, if any); return its run id."""
        done = self("demo", "--json")
        assert done.code == 0, done.err
        run_id: str = done.json()["run_id"]
        return run_id

    def export(self, run_id: str, name: str = "run.tether.jsonl") -> Path:
        """Export a run to a file in the folder and return its path."""
        path = self.folder / name
        done = self("runs", "export", run_id, "-o", str(path))
        assert done.code == 0, done.err
        return path

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """Return a run's recorded events, as the export holds them."""
        lines = self.export(run_id, "events.jsonl").read_bytes().splitlines()
        return [_canonical.loads(line)["event"] for line in lines[1:]]


@pytest.fixture
def cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    """The command in a folder of the test's own, with none of the caller's TETHER_*."""
    for name in list(os.environ):
        if name.startswith("TETHER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return Cli(tmp_path, capsys)


def in_subprocess(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `tether` in `folder`, with none of the caller's TETHER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [CLI, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_one_error_line(done: Done, code: str, *fragments: str) -> None:
    """The command could not run: exit 2, one `error[code]` line holding `fragments`."""
    assert done.code == 2, (done.out, done.err)
    lines = done.err.splitlines()
    assert len(lines) == 1, done.err
    assert lines[0].startswith(f"error[{code}] "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.err + done.out


def rechained(source: Path, target: Path, **run_started: Any) -> Path:
    """Copy an export with `run_started` fields changed, its hash chain made whole again.

    This is how a record written by another version of tether looks: a
    different event, with a chain that holds.
    """
    lines = source.read_bytes().splitlines()
    header = _canonical.loads(lines[0])
    previous = _chain.genesis(header["run_id"])
    out = []
    for line in lines[1:]:
        entry = _canonical.loads(line)
        if entry["event"]["kind"] == "run_started":
            entry["event"].update(run_started)
        previous = _chain.chain_hash(
            previous, entry["seq"], _canonical.dumps(entry["event"])
        )
        entry["hash"] = previous.hex()
        out.append(_canonical.dumps(entry))
    header["head"] = previous.hex()
    target.write_bytes(b"\n".join([_canonical.dumps(header), *out]) + b"\n")
    return target


# -- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, policy()], ids=["no-policy", "rules-limits"])
def test_the_demo_replays_the_same_from_the_database_and_from_its_export(
    cli: Cli, config: str | None
) -> None:
    """A demo run replays to exit 0 with all 9 steps re-checked, from the store and from a file."""
    if config is not None:
        (cli.folder / "tether.yaml").write_text(config)
    run_id = cli.demo()
    recorded = cli.events(run_id)
    export = cli.export(run_id)
    elsewhere = cli.folder / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "run.tether.jsonl").write_bytes(export.read_bytes())

    text = cli("replay", run_id)
    doc = cli("replay", run_id, "--json")
    from_file = in_subprocess(elsewhere, "replay", "run.tether.jsonl", "--json")
    after = cli.events(run_id)

    assert text.code == 0, text.err
    assert text.out.startswith(f"same run {run_id}: {len(recorded)} events, 9 steps")
    assert doc.code == 0, doc.err
    report = doc.json()
    assert (report["ok"], report["mode"], report["steps"]) == (True, "verify", 9)
    assert (report["events"], report["divergences"], report["notes"]) == (
        len(recorded),
        [],
        [],
    )
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout) == report
    assert sorted(p.name for p in elsewhere.iterdir()) == ["run.tether.jsonl"]
    assert after == recorded  # the live store was not written
    verdicts = {e["verdict"] for e in recorded if e["kind"] == "decided"}
    if config is None:
        assert verdicts == {"allow", "require_approval"}
    else:  # the file's destructive default held both rollbacks for a person
        held = [
            e["step"]
            for e in recorded
            if e["kind"] == "decided" and e["verdict"] == "require_approval"
        ]
        assert held == [3, 6, 7]


def test_an_exported_run_replays_under_the_policy_it_carries(cli: Cli) -> None:
    """Replaying a file uses the `tether.yaml` in its header, not the one beside it."""
    (cli.folder / "tether.yaml").write_text(policy(50))
    run_id = cli.demo()
    export = cli.export(run_id)
    (cli.folder / "tether.yaml").write_text(policy(10))

    from_file = cli("replay", str(export), "--json", db=False)
    from_store = cli("replay", run_id, "--json")

    assert from_file.code == 0, from_file.out
    assert from_file.json()["ok"] is True
    assert from_store.code == 1  # the run id replays under today's file
    assert from_store.json()["divergences"][0]["rule_ids"] == ["wide-log-searches"]


def test_an_export_made_after_the_policy_changed_names_the_version_it_ran_under(
    cli: Cli,
) -> None:
    """Exported after `tether.yaml` changed: the run's own version, and not the new text."""
    (cli.folder / "tether.yaml").write_text(policy(50))
    run_id = cli.demo()
    ran_under = {
        e["policy_version"] for e in cli.events(run_id) if e["kind"] == "decided"
    }
    (cli.folder / "tether.yaml").write_text(policy(10))
    export = cli.export(run_id)

    header = RecordedRun.from_file(export).header
    done = cli("replay", str(export), "--json", db=False)

    assert header["policy_version"] in ran_under
    assert header["config"] is None  # the file in force now is not what it ran under
    assert done.code == 1  # replayed under today's file, which denies step 2
    report = done.json()
    assert report["divergences"][0]["step"] == 2
    assert any("replayed under" in note for note in report["notes"])


# -- a changed threshold -------------------------------------------------------------------


def test_a_tighter_threshold_diverges_at_the_log_search_naming_its_rule(
    cli: Cli,
) -> None:
    """Under `args.limit > 10` the replay exits 1: step 2's decision is deny, by the changed rule."""
    (cli.folder / "tether.yaml").write_text(policy(50))
    run_id = cli.demo()
    (cli.folder / "proposed.yaml").write_text(policy(10))

    same = cli("replay", run_id, "--policy", "tether.yaml", "--json")
    doc = cli("replay", run_id, "--policy", "proposed.yaml", "--json")
    text = cli("replay", run_id, "--policy", "proposed.yaml")

    assert same.code == 0, same.out
    assert doc.code == 1, doc.err
    report = doc.json()
    assert report["ok"] is False
    first = report["divergences"][0]
    assert (first["step"], first["field"], first["rule_ids"]) == (
        2,
        "status",
        ["wide-log-searches"],
    )
    assert first["kind"] == "plan_admitted"  # the plan's admission is decided first
    steps = {(d["step"], d["kind"]) for d in report["divergences"]}
    assert steps == {(2, "plan_admitted"), (2, "decided")}
    decided = next(d for d in report["divergences"] if d["kind"] == "decided")
    assert (decided["field"], decided["recorded"], decided["now"]) == (
        "verdict",
        "allow",
        "deny",
    )
    assert decided["rule_ids"] == ["wide-log-searches"]
    old, new = decided["policy_version"]["recorded"], decided["policy_version"]["now"]
    assert old != new
    assert report["notes"] == [
        f"recorded under policy version {old}, replayed under {new}"
    ]
    assert text.code == 1
    said = " ".join(text.out.split())  # Rich folds the headline at 120 columns
    assert said.startswith(
        f"DIVERGES run {run_id}: step 2 plan_admitted: status was 'admitted', "
        "now 'refused' (rules: wide-log-searches)"
    )


def test_what_if_counts_exactly_the_decisions_a_threshold_change_flips(
    cli: Cli,
) -> None:
    """Over 3 demo runs the tighter rule changes 3 step decisions and 3 plan admissions, allow -> deny."""
    (cli.folder / "tether.yaml").write_text(policy(50))
    runs = [cli.demo() for _ in range(3)]
    (cli.folder / "proposed.yaml").write_text(policy(10))

    every = cli("policy", "what-if", "proposed.yaml", "--json")
    one = cli("policy", "what-if", "proposed.yaml", runs[1], "--json")
    newest = cli("policy", "what-if", "proposed.yaml", "--last", "2", "--json")
    later = cli("policy", "what-if", "proposed.yaml", "--since", "2999-01-01", "--json")
    unchanged = cli("policy", "what-if", "tether.yaml", "--json")
    table = cli("policy", "what-if", "proposed.yaml")

    assert every.code == 0, every.err
    doc = every.json()
    assert (doc["runs"], doc["changed"], doc["skipped"]) == (3, 6, [])
    assert doc["decisions_checked"] == 3 * 18  # 9 steps and 9 plan admissions a run
    (group,) = doc["by_rule"]
    assert {k: v for k, v in group.items() if k != "runs"} == {
        "rule": "wide-log-searches",
        "recorded": "allow",
        "now": "deny",
        "count": 3,
        "plans": 3,
    }
    assert sorted(group["runs"]) == sorted(runs)
    assert {(c["step"], c["capability"], c["source"]) for c in doc["changes"]} == {
        (2, "logs.search", "step"),
        (None, "logs.search", "plan"),
    }
    (group,) = one.json()["by_rule"]
    assert (group["count"], group["plans"], group["runs"]) == (1, 1, [runs[1]])
    assert newest.json()["runs"] == 2
    assert (later.json()["runs"], later.json()["changed"]) == (0, 0)
    assert unchanged.code == 0
    assert (unchanged.json()["changed"], unchanged.json()["by_rule"]) == (0, [])
    assert table.code == 0
    assert "3 runs, 54 decisions re-made, 6 would change" in table.out
    assert "wide-log-searches" in table.out
    assert "allow -> deny" in table.out


def test_verify_mode_reports_the_change_that_what_if_mode_counts(cli: Cli) -> None:
    """`Replayer.for_file` in verify mode reports the change the CLI reports, in what-if mode it counts it."""
    (cli.folder / "tether.yaml").write_text(policy(50))
    run_id = cli.demo()
    (cli.folder / "proposed.yaml").write_text(policy(10))
    recorded = RecordedRun.from_file(cli.export(run_id))

    with _scenario_app() as app:
        verify = Replayer.for_file(app, "proposed.yaml", mode="verify").replay(recorded)
        what_if = Replayer.for_file(app, "proposed.yaml", mode="what_if").replay(
            recorded
        )

    assert not verify.ok
    assert verify.decisions == []  # verify mode collects no decision changes
    assert [(d.step, d.kind) for d in verify.divergences] == [
        (2, "plan_admitted"),
        (2, "decided"),
    ]
    assert [
        (c.step, c.recorded, c.now, c.rule_ids, c.source) for c in what_if.decisions
    ] == [
        (None, "allow", "deny", ("wide-log-searches",), "plan"),
        (2, "allow", "deny", ("wide-log-searches",), "step"),
    ]


def _scenario_app() -> tether.Tether:
    """A fresh app with the cloud-ops capabilities, as `tether replay` builds one."""
    app = tether.Tether(db="memory://", env={})
    SCENARIOS["cloud-ops"].setup(app)
    return app


# -- --dry-run -----------------------------------------------------------------------------


def test_dry_run_replay_predicts_the_rollback_would_not_apply(cli: Cli) -> None:
    """`--dry-run` asks the rollback's dry-run handler: it predicts `applied: false`, where the step applied."""
    run_id = cli.demo()

    doc = cli("replay", run_id, "--dry-run", "--json")
    text = cli("replay", run_id, "--dry-run")

    assert doc.code == 0, doc.err
    report = doc.json()
    assert (report["mode"], report["ok"]) == ("dry_run", True)
    (prediction,) = report[
        "predictions"
    ]  # the only executed step with a dry-run handler
    assert (prediction["step"], prediction["capability"], prediction["error"]) == (
        7,
        "deploy.rollback",
        None,
    )
    assert prediction["differs"] == {"applied": {"recorded": True, "predicted": False}}
    assert prediction["predicted"]["to_version"] == "v2.4.0"
    assert text.code == 0
    assert "dry-run predictions" in text.out
    assert "applied: predicted False, was True" in text.out


# -- could not run -------------------------------------------------------------------------


def test_an_unknown_run_is_one_error_line(cli: Cli) -> None:
    """A run id the database lacks exits 2 with one line naming it."""
    cli.demo()

    done = cli("replay", "run_nosuchrun")

    assert_one_error_line(done, "not_found", "'run_nosuchrun'")


def test_a_file_that_is_not_an_export_is_one_error_line(cli: Cli) -> None:
    """A JSONL file without the export header exits 2 saying how to make one."""
    path = cli.folder / "notes.tether.jsonl"
    path.write_text('{"kind": "run_started"}\n')

    done = cli("replay", str(path), db=False)

    assert_one_error_line(
        done, "replay_impossible", "not a tether run export", "tether runs export RUN"
    )


def test_a_tampered_export_is_refused_naming_the_line(cli: Cli) -> None:
    """An export whose one event's args were edited exits 2 naming that line of the file."""
    run_id = cli.demo()
    path = cli.export(run_id)
    lines = path.read_bytes().splitlines()
    number = next(
        n
        for n, line in enumerate(lines, start=1)
        if b'"kind":"validated"' in line and b"logs.search" in line
    )
    entry = _canonical.loads(lines[number - 1])
    entry["event"]["args"]["limit"] = 200
    lines[number - 1] = _canonical.dumps(entry)
    path.write_bytes(b"\n".join(lines) + b"\n")

    done = cli("replay", str(path), db=False)
    with pytest.raises(ReplayError) as caught:
        RecordedRun.from_file(path)

    assert_one_error_line(
        done, "replay_impossible", f"{path}:{number}:", "altered", "re-export"
    )
    assert caught.value.code == "replay_impossible"


def test_a_truncated_export_is_refused(cli: Cli) -> None:
    """An export missing its last events no longer ends at the header's head: exit 2."""
    run_id = cli.demo()
    path = cli.export(run_id)
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(lines[:-3]) + b"\n")

    done = cli("replay", str(path), db=False)

    assert_one_error_line(done, "replay_impossible", "truncated or altered")


def test_a_record_of_a_newer_format_says_to_upgrade(cli: Cli) -> None:
    """A record whose run_started says format 99 (chain intact) exits 2 naming the format."""
    run_id = cli.demo()
    path = rechained(cli.export(run_id), cli.folder / "future.tether.jsonl", format=99)

    done = cli("replay", str(path), db=False)

    assert RecordedRun.from_file(path).events[0]["format"] == 99  # the chain holds
    assert_one_error_line(
        done, "replay_impossible", "record format 99 is newer", "upgrade tether"
    )


@pytest.fixture
def partial_app(cli: Cli) -> Iterator[str]:
    """A module in the folder whose app lacks `ticket.comment`; yields `MODULE:app`."""
    name = f"partial_{cli.folder.name.replace('-', '_')}"
    (cli.folder / f"{name}.py").write_text(
        "import tether\n"
        "from tether.scenarios import cloud_ops\n"
        "\n"
        "_full = tether.Tether(db='memory://', env={})\n"
        "cloud_ops.build_app(_full)\n"
        "app = tether.Tether(db='memory://', env={})\n"
        "app.register(*[c for c in _full.capabilities if c.name != 'ticket.comment'])\n"
    )
    path = list(sys.path)
    yield f"{name}:app"
    sys.modules.pop(name, None)
    sys.path[:] = path


def test_a_capability_the_app_lacks_is_named_with_the_app_flag(
    cli: Cli, partial_app: str
) -> None:
    """Replaying with an app missing a capability the run called exits 2 naming it and --app."""
    run_id = cli.demo()

    done = cli("replay", run_id, "--app", partial_app)

    assert_one_error_line(done, "replay_impossible", "'ticket.comment'", "--app")
    assert "step 9" in done.err


def test_what_if_skips_a_run_it_cannot_replay_and_says_why(
    cli: Cli, partial_app: str
) -> None:
    """What-if under an app lacking a capability reports the run as skipped, with the reason."""
    run_id = cli.demo()
    (cli.folder / "proposed.yaml").write_text(policy(10))

    done = cli("policy", "what-if", "proposed.yaml", "--app", partial_app, "--json")

    assert done.code == 0, done.err
    doc = done.json()
    assert (doc["runs"], doc["changed"]) == (0, 0)
    (skipped,) = doc["skipped"]
    assert skipped["run_id"] == run_id
    assert "'ticket.comment'" in skipped["reason"]
