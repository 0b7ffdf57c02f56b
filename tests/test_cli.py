"""The installed `tether` command, run in a subprocess as users and scripts run it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tether
import tether.cli

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")
"""The command under test: `TETHER_CLI` (the wheel test sets it), else the venv's."""


class Cli:
    """Runs `tether` in `folder` with its own database and none of the caller's TETHER_*."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "tether.db"
        self.db = f"sqlite:///{self.path}"

    def __call__(
        self, *args: str, db: str | None = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run the command; `--db` is this test's database unless `db` says otherwise."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        chosen = self.db if db == "" else db
        argv = [CLI, *args, *(["--db", chosen] if chosen is not None else [])]
        return subprocess.run(
            argv,
            cwd=self.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def json(self, *args: str) -> Any:
        """Run with `--json`, check it succeeded and return the document."""
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def demo(self) -> dict[str, Any]:
        """Run the demo and return its JSON document."""
        doc: dict[str, Any] = self.json("demo")
        return doc


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """The command, on a database of this test's own."""
    return Cli(tmp_path)


def assert_one_error_line(done: subprocess.CompletedProcess[str], code: str) -> None:
    """The command failed to run: exit 2 and exactly one `error[code]` line on stderr."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error[{code}] "), lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_demo_remediates_the_incident_and_prints_one_json_document(cli: Cli) -> None:
    """`tether demo --json` succeeds, with the rollback dry-run once and executed once."""
    doc = cli.demo()

    assert doc["format"] == 1
    assert doc["status"] == "succeeded"
    assert doc["run_id"].startswith("run_")
    rollbacks = [s for s in doc["steps"] if s["capability"] == "deploy.rollback"]
    assert [(s["status"], s["effect"]) for s in rollbacks] == [
        ("dry_run", "destructive"),
        ("executed", "destructive"),
    ]
    assert doc["steps"][-2]["output"]["within_slo"] is True
    held = [s for s in doc["steps"] if s["decision"] != "allow"]
    assert [(s["args"]["service"], s["decision"], s["status"]) for s in held] == [
        ("payments", "require_approval", "refused")
    ]


def test_demo_prints_a_readable_timeline(cli: Cli) -> None:
    """Without --json the demo prints each step, the final status and the run id."""
    done = cli("demo")

    assert done.returncode == 0, done.stderr
    out = done.stdout
    for text in ("deploy.rollback", "destructive", "dry_run", "service.restart"):
        assert text in out
    assert "succeeded" in out
    assert "tether verify run_" in out
    assert done.stderr == ""


def test_demo_run_verifies_and_runs_commands_find_it(cli: Cli, tmp_path: Path) -> None:
    """The demo's run is intact, listed, shown and exported, and its export head verifies."""
    run_id = cli.demo()["run_id"]

    verified = cli("verify", run_id)
    report = cli.json("verify", run_id)
    listed = cli.json("runs", "list")
    shown = cli.json("runs", "show", run_id[:12])
    shown_text = cli("runs", "show", run_id)
    exported = cli("runs", "export", run_id)
    to_file = cli("runs", "export", run_id, "-o", str(tmp_path / "run.jsonl"))

    assert verified.returncode == 0
    assert "intact" in verified.stdout
    assert (report["format"], report["ok"], report["anchored"]) == (1, True, True)
    assert [r["run_id"] for r in listed["runs"]] == [run_id]
    assert listed["format"] == 1
    assert shown["run"]["run_id"] == run_id
    assert len(shown["steps"]) == 9
    assert [e["seq"] for e in shown["events"]] == list(range(1, report["events"] + 1))
    assert shown_text.returncode == 0
    assert run_id in shown_text.stdout
    assert "plan_proposed" in shown_text.stdout
    lines = exported.stdout.splitlines()
    header = json.loads(lines[0])
    assert header["run_id"] == run_id
    assert header["head"] == report["head"]
    assert header["capabilities"]["deploy.rollback"]["effect"] == "destructive"
    assert len(lines) == 1 + report["events"]
    assert to_file.returncode == 0
    assert (tmp_path / "run.jsonl").read_text() == exported.stdout
    assert cli("verify", run_id, "--head", header["head"]).returncode == 0


def test_one_changed_byte_fails_verify_naming_the_event(cli: Cli) -> None:
    """Changing one byte of one event in the SQLite file makes verify exit 1 and name it."""
    run_id = cli.demo()["run_id"]
    con = sqlite3.connect(cli.path)
    seq, body = con.execute(
        "SELECT seq, body FROM events WHERE instr(body, ?) > 0",
        (b'"restarted_pods":6',),
    ).fetchone()
    forged = body.replace(b'"restarted_pods":6', b'"restarted_pods":7')
    con.execute("UPDATE events SET body = ? WHERE body = ?", (forged, body))
    con.commit()
    con.close()

    done = cli("verify", run_id)
    report = json.loads(cli("verify", run_id, "--json").stdout)

    assert done.returncode == 1
    assert f"event {seq}" in done.stdout
    assert "Traceback" not in done.stderr
    assert (report["ok"], report["first_bad_seq"]) == (False, seq)


def test_verify_against_another_head_fails(cli: Cli) -> None:
    """A record that does not end at the exported head fails verify with exit 1."""
    run_id = cli.demo()["run_id"]

    done = cli("verify", run_id, "--head", "ab" * 32)

    assert done.returncode == 1
    assert "exported head" in done.stdout


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["runs", "show", "run_nope"], "not_found"),
        (["verify", "run_nope"], "not_found"),
        (["runs", "export", "run_nope"], "not_found"),
        (["runs", "list", "--bogus"], "usage_error"),
        (["runs", "list", "--limit", "zero"], "usage_error"),
        (["demo", "--scenario", "nope"], "usage_error"),
        (["verify"], "usage_error"),
        (["verify", "run_x", "--head", "xyz"], "usage_error"),
        (["frobnicate"], "usage_error"),
    ],
)
def test_a_command_that_cannot_run_prints_one_error_line(
    cli: Cli, args: list[str], code: str
) -> None:
    """Unknown runs, bad flags and bad values exit 2 with one `error[...]` line."""
    tether.Tether(db=cli.db, env={}).close()  # an empty database of the current schema

    done = cli(*args)

    assert_one_error_line(done, code)


def test_a_file_that_is_not_a_database_is_one_error_line(
    cli: Cli, tmp_path: Path
) -> None:
    """A text file passed as the database exits 2 with one `error[store_error]` line."""
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")

    done = cli("runs", "list", db=f"sqlite:///{text}")

    assert_one_error_line(done, "store_error")


def test_a_missing_database_is_not_created_by_a_read(cli: Cli, tmp_path: Path) -> None:
    """Reading commands refuse a database that does not exist instead of creating it."""
    done = cli("runs", "list", db=f"sqlite:///{tmp_path / 'absent.db'}")

    assert_one_error_line(done, "not_found")
    assert not (tmp_path / "absent.db").exists()


def test_agent_text_is_escaped_before_it_reaches_the_terminal(cli: Cli) -> None:
    """Control characters and Rich markup in a request are shown escaped, never obeyed."""
    hostile = "clear\x1b[2J [bold red]markup[/] \u202eevil\x07\r"
    app = tether.Tether(db=cli.db, env={})
    with app.run(principal=tether.Principal("bot"), request=hostile) as run:
        pass
    app.close()

    listed = cli("runs", "list")
    shown = cli("runs", "show", run.id)

    for done in (listed, shown):
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout
        assert "\u202e" not in done.stdout
        assert "\x07" not in done.stdout
        assert "\\x1b[2J" in done.stdout
    assert "[bold red]markup[/]" in shown.stdout


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["demo"],
        ["runs"],
        ["runs", "list"],
        ["runs", "show"],
        ["runs", "export"],
        ["verify"],
    ],
    ids=lambda c: " ".join(c) or "tether",
)
def test_every_command_teaches_with_an_example(cli: Cli, command: list[str]) -> None:
    """`--help` on every command prints a summary and an example, and exits 0."""
    done = cli(*command, "--help", db=None)

    assert done.returncode == 0, done.stderr
    assert "Example: tether" in done.stdout


def test_verify_help_states_the_unanchored_limitation(cli: Cli) -> None:
    """`tether verify --help` says what cannot be detected without a key or a head."""
    done = cli("verify", "--help", db=None)

    text = " ".join(done.stdout.split())
    assert "without the record key or an exported head" in text
    assert "consistent rewrite of the whole chain" in text
    assert "cannot be detected" in text


def test_bare_tether_prints_its_help(cli: Cli) -> None:
    """`tether` with no command prints the help and exits 0."""
    done = cli(db=None)

    assert done.returncode == 0
    assert "demo" in done.stdout
    assert "verify" in done.stdout


def test_an_unexpected_error_is_one_internal_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug surfaces as one `error[internal]` line, with the traceback only when asked."""

    def broken(*_: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(tether.cli._runs, "_timeline", broken)
    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    argv = ["demo", "--db", "memory://"]

    quiet = tether.cli.main(argv)
    quiet_err = capsys.readouterr().err
    monkeypatch.setenv("TETHER_DEBUG", "1")
    loud = tether.cli.main(argv)
    loud_err = capsys.readouterr().err

    assert quiet == loud == 2
    assert quiet_err.splitlines() == [
        "error[internal] RuntimeError: boom (a bug in tether; set TETHER_DEBUG=1 "
        "for the traceback and report it)"
    ]
    assert "Traceback" in loud_err
    assert loud_err.splitlines()[-1].startswith("error[internal] ")


def test_version_prints_the_package_version(cli: Cli) -> None:
    """`tether --version` prints the installed version."""
    done = cli("--version", db=None)

    assert done.returncode == 0
    assert done.stdout.strip() == f"tether {tether.__version__}"
