"""The installed `tether` command, walked through as a new user walks the docs.

Each test is a finding of that walk: what the docs or the help promise, or the
one clear error line a natural mistake deserves. Each runs the real command in
a subprocess, as `tests/test_cli.py` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from _cli import one_error, run


@pytest.fixture
def demo(tmp_path: Path) -> dict[str, Any]:
    """A demo run recorded in `tmp_path/tether.db`."""
    done = run(
        tmp_path, "demo", "--json", "--db", f"sqlite:///{tmp_path / 'tether.db'}"
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest.mark.parametrize(
    "command",
    [
        ["replay"],
        ["status"],
        ["worker"],
        ["runs", "resume"],
        ["policy"],
        ["policy", "check"],
        ["policy", "test"],
        ["policy", "what-if"],
        ["approvals"],
        ["approvals", "list"],
        ["approvals", "show"],
        ["approvals", "approve"],
        ["approvals", "deny"],
    ],
    ids=" ".join,
)
def test_every_other_command_teaches_with_an_example(
    tmp_path: Path, command: list[str]
) -> None:
    """`--help` of each command `tests/test_cli.py` does not cover has an example."""
    done = run(tmp_path, *command, "--help")

    assert done.returncode == 0, done.stderr
    assert "Example: tether" in done.stdout


@pytest.mark.parametrize(
    "command", [["verify"], ["runs", "show"], ["runs", "export"], ["runs", "resume"]]
)
def test_a_run_argument_is_called_run_as_in_the_docs(
    tmp_path: Path, command: list[str]
) -> None:
    """The docs write `tether verify RUN`; help and a missing argument say RUN too."""
    shown = run(tmp_path, *command, "--help")
    missing = run(
        tmp_path, *command, *(["--app", "x:y"] if "resume" in command else [])
    )

    assert "{RUN}" in shown.stdout.splitlines()[0]
    assert "Missing argument 'RUN'" in one_error(missing, "usage_error")


def test_the_runs_group_names_every_subcommand(tmp_path: Path) -> None:
    """`tether runs --help` sums up list, show, export, resume and abort, not some of them."""
    done = run(tmp_path, "runs", "--help")

    assert "List, show, export, resume and abort recorded runs." in done.stdout


def test_list_limits_are_shown_as_n(tmp_path: Path) -> None:
    """`--limit N` in the docs is `--limit N` in the help, not `<int range>`."""
    for command in (["runs", "list"], ["approvals", "list"]):
        done = run(tmp_path, *command, "--help")
        assert "-n, --limit N" in done.stdout
        assert "<int range>" not in done.stdout


@pytest.mark.parametrize(
    "value", ["myapp.py:app", "../here/myapp:app", "src/myapp.py:app"]
)
def test_an_app_given_as_a_path_says_to_give_the_module(
    tmp_path: Path, value: str
) -> None:
    """`--app myapp.py:app` is a natural slip; the error says what to write instead."""
    (tmp_path / "myapp.py").write_text(
        "import tether\napp = tether.Tether(db='memory://')\n"
    )

    line = one_error(run(tmp_path, "status", "--app", value), "usage_error")

    assert "MODULE is a module name, not a file path" in line
    assert line.endswith("write --app myapp:app")


def test_a_folder_given_as_the_database_is_named_a_folder(tmp_path: Path) -> None:
    """A --db naming a folder is not "no database at": it is a folder."""
    (tmp_path / "data.db").mkdir()
    db = "sqlite:///data.db"

    for args in (
        ["runs", "list"],
        ["approvals", "list"],
        ["status"],
        ["verify", "run_0123456789"],
    ):
        line = one_error(run(tmp_path, *args, "--db", db), "not_found")
        assert "data.db is a folder, not a database file" in line, args


def test_a_bad_tether_config_is_not_blamed_on_tether_db(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    """With TETHER_DB and TETHER_CONFIG set, an error in the file names the file only."""
    (tmp_path / "ops.yaml").write_text(
        "limits:\n  - {id: a, kind: quota, per: day, maxx: 1}\n"
    )
    env = {"TETHER_DB": "sqlite:///tether.db"}

    missing = run(tmp_path, "runs", "list", env={**env, "TETHER_CONFIG": "nope.yaml"})
    typo = run(
        tmp_path, "verify", demo["run_id"], env={**env, "TETHER_CONFIG": "ops.yaml"}
    )
    bad_url = run(tmp_path, "runs", "list", env={"TETHER_DB": "bogus"})

    assert one_error(missing, "config_invalid").startswith(
        "error[config_invalid] nope.yaml: cannot read the config file"
    )
    assert one_error(typo, "config_invalid").startswith(
        "error[config_invalid] ops.yaml:2: limits[0] (id 'a'): maxx: unknown field"
    )
    assert "TETHER_DB='bogus': " in one_error(bad_url, "config_invalid")


def test_export_into_a_missing_folder_says_to_create_it(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    """README's `-o tests/runs/...` in a fresh project: the error names the folder."""
    done = run(
        tmp_path, "runs", "export", demo["run_id"], "-o", "tests/runs/inc.tether.jsonl",
        "--db", "sqlite:///tether.db",
    )  # fmt: skip

    line = one_error(done, "usage_error")
    assert "there is no folder 'tests/runs'" in line
    assert "mkdir -p tests/runs" in line
    assert not (tmp_path / "tests").exists()


def test_the_demo_without_a_file_does_not_claim_every_step_is_allowed(
    tmp_path: Path,
) -> None:
    """The scenario's own rule holds a step, so the config line must not say all are allowed."""
    done = run(tmp_path, "demo", "--db", "sqlite:///demo.db?synchronous=normal")

    assert done.returncode == 0, done.stderr
    config = next(x for x in done.stdout.splitlines() if x.startswith("config"))
    assert "only the scenario's own rules apply" in config
    assert "require_approval" in done.stdout
    # The hints are commands to paste: a URL with `?` is quoted for the shell.
    assert "--db 'sqlite:///demo.db?synchronous=normal'" in done.stdout


def test_verify_prints_one_line_in_a_narrow_pipe(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    """`intact run ...: N events, head HASH` stays one line, so scripts can grep the head."""
    report = run(
        tmp_path, "verify", demo["run_id"], "--json", "--db", "sqlite:///tether.db"
    )
    done = run(
        tmp_path, "verify", demo["run_id"], "--db", "sqlite:///tether.db",
        env={"COLUMNS": "60"},
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    doc = json.loads(report.stdout)
    assert done.stdout.splitlines()[0] == (
        f"intact run {demo['run_id']}: {doc['events']} events, head {doc['head']}"
    )


def test_a_failing_policy_case_is_one_line(tmp_path: Path) -> None:
    """Each `FAIL case: reason` line stays whole in a pipe, however long."""
    (tmp_path / "tether.yaml").write_text(
        "rules:\n  - id: nope\n    decision: deny\n    reason: " + "x" * 150 + "\n"
    )
    (tmp_path / "tether.test.yaml").write_text(
        "policy: tether.yaml\ncases:\n  - name: a case that expects too much\n"
        "    capability: a.b\n    effect: read\n    principal: {id: bot}\n"
        "    expect: {decision: allow}\n"
    )

    done = run(tmp_path, "policy", "test", "tether.test.yaml")

    assert done.returncode == 1
    fails = [x for x in done.stdout.splitlines() if x.startswith("FAIL ")]
    assert fails == ["FAIL a case that expects too much: " + "x" * 150]


def test_what_if_since_is_not_cut_at_the_newest_fifty(tmp_path: Path) -> None:
    """`--last N | --since DATE`: --since alone takes every run since DATE."""
    app = tether.Tether(db=f"sqlite:///{tmp_path / 'w.db'}", env={})
    for i in range(52):
        with app.run(principal=tether.Principal("bot"), request=f"r{i}"):
            pass
    app.close()
    (tmp_path / "p.yaml").write_text("rules: []\n")

    def runs(*args: str) -> int:
        done = run(tmp_path, "policy", "what-if", "p.yaml", *args, "--json",
                   "--db", "sqlite:///w.db")  # fmt: skip
        assert done.returncode == 0, done.stderr
        count: int = json.loads(done.stdout)["runs"]
        return count

    assert runs() == 50
    assert runs("--since", "2000-01-01") == 52
    assert runs("--since", "2000-01-01", "--last", "3") == 3


def test_what_if_names_a_skipped_run_once(tmp_path: Path) -> None:
    """A run that cannot be replayed is `skipped RUN: why`, not `skipped RUN: run RUN: why`."""

    script = (
        "import tether\n"
        "from pydantic import BaseModel\n"
        "class In(BaseModel):\n    x: int\n"
        "@tether.capability('x.read', effect='read')\n"
        "def read(args: In) -> In:\n    return args\n"
        "app = tether.Tether(db='sqlite:///w.db', env={})\n"
        "app.register(read)\n"
        "with app.run(principal=tether.Principal('bot'), request='r') as r:\n"
        "    r.call('x.read', {'x': 1})\n"
        "print(r.id)\n"
        "app.close()\n"
    )
    made = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    run_id = made.stdout.strip()
    (tmp_path / "p.yaml").write_text("rules: []\n")

    done = run(tmp_path, "policy", "what-if", "p.yaml", "--db", "sqlite:///w.db")

    skipped = [x for x in done.stdout.splitlines() if x.startswith("skipped")]
    assert skipped == [
        f"skipped {run_id}: step 1 called 'x.read', which this app does not "
        "register; replay with the app that made the run (--app)"
    ]


class Note(BaseModel):
    text: str


class Noted(BaseModel):
    ok: bool


@tether.capability("ticket.note", effect="write", idempotency="keyed")
def note(args: Note) -> Noted:
    return Noted(ok=True)


def test_runs_show_gives_each_steps_recorded_effect_without_the_app(
    tmp_path: Path,
) -> None:
    """`runs show` does not load the app's capabilities: the effect comes
    from the record (each validated step records it), not `?`."""
    db = f"sqlite:///{tmp_path / 'app.db'}"
    with tether.Tether(db=db, env={}) as app:
        app.register(note)
        with app.run(principal=tether.Principal("bot"), request="note") as r:
            r.call("ticket.note", {"text": "hi"})

    done = run(tmp_path, "runs", "show", r.id, "--json", "--db", db)
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)["steps"]
    assert [(s["capability"], s["effect"]) for s in steps] == [("ticket.note", "write")]
    table = run(tmp_path, "runs", "show", r.id, "--db", db)
    assert "write" in table.stdout
