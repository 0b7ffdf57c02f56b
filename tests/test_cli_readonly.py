"""The installed `tether` command: reads that never write, and the edges of its contract.

Each test runs the real command in a subprocess, as `tests/test_cli.py` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import tether
from _cli import CLI, one_error, run


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def demo(tmp_path: Path) -> dict[str, Any]:
    """A demo run recorded in `tmp_path/tether.db` (with its key file beside it)."""
    done = run(
        tmp_path, "demo", "--json", "--db", f"sqlite:///{tmp_path / 'tether.db'}"
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


# -- 1. verify without the key -----------------------------------------------------------


def test_verify_of_a_copy_without_its_key_neither_cries_tamper_nor_makes_a_key(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    shutil.copy(tmp_path / "tether.db", tmp_path / "k.db")
    db = "sqlite:///k.db"

    done = run(tmp_path, "verify", demo["run_id"], "--db", db)

    line = one_error(done, "not_found")
    assert "cannot be checked" in line
    assert "k.db.key" in line
    assert "NOT intact" not in done.stdout
    assert not (tmp_path / "k.db.key").exists()
    head = json.loads(
        run(
            tmp_path, "verify", demo["run_id"], "--json", "--db", "sqlite:///tether.db"
        ).stdout
    )["head"]
    checked = run(
        tmp_path, "verify", demo["run_id"], "--head", head, "--json", "--db", db
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["signature"] == "unchecked"
    shutil.copy(tmp_path / "tether.db.key", tmp_path / "k.db.key")
    again = run(tmp_path, "verify", demo["run_id"], "--json", "--db", db)
    assert again.returncode == 0, again.stdout
    assert json.loads(again.stdout)["signature"] == "checked"


def test_a_write_to_a_copy_without_its_key_is_refused_rather_than_signed_anew(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    """A command that writes, pointed at a copy of a database without its key
    file, refuses in one line instead of making a new key (which would fail
    every earlier run's verify), and records no run; with the key copied
    beside it, it runs, and the earlier run still verifies."""
    shutil.copy(tmp_path / "tether.db", tmp_path / "k.db")

    refused = run(tmp_path, "demo", "--db", "sqlite:///k.db")
    line = one_error(refused, "config_invalid")
    made_key = (tmp_path / "k.db.key").exists()
    listed = run(tmp_path, "runs", "list", "--json", "--db", "sqlite:///k.db")
    shutil.copy(tmp_path / "tether.db.key", tmp_path / "k.db.key")
    again = run(tmp_path, "demo", "--db", "sqlite:///k.db")
    verified = run(tmp_path, "verify", demo["run_id"], "--db", "sqlite:///k.db")

    assert "k.db.key is missing" in line
    assert "copy the key file beside the database" in line
    assert not made_key
    assert [r["run_id"] for r in json.loads(listed.stdout)["runs"]] == [demo["run_id"]]
    assert again.returncode == 0, again.stderr
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- 2. read-only commands on a file that is not a tether database ------------------------

READS = [
    ["runs", "list"],
    ["runs", "show", "run_0123456789"],
    ["runs", "export", "run_0123456789"],
    ["verify", "run_0123456789"],
    ["replay", "run_0123456789"],
    ["status"],
    ["approvals", "list"],
    ["approvals", "show", "apr_0123456789"],
    ["policy", "what-if", "proposed.yaml"],
]


@pytest.mark.parametrize("command", READS, ids=" ".join)
@pytest.mark.parametrize("kind", ["app", "empty"])
def test_a_read_leaves_a_foreign_database_untouched(
    tmp_path: Path, command: list[str], kind: str
) -> None:
    (tmp_path / "proposed.yaml").write_text("rules: []\n")
    app_db = tmp_path / "app.db"
    if kind == "app":
        con = sqlite3.connect(app_db)
        con.execute("CREATE TABLE users (id INTEGER)")
        con.commit()
        con.close()
    else:
        app_db.write_bytes(b"")
    before = digest(app_db)

    done = run(tmp_path, *command, "--db", "sqlite:///app.db")

    line = one_error(done, "store_error")
    assert "is not a tether database" in line
    assert digest(app_db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "proposed.yaml"]


def test_a_read_does_not_migrate_an_older_schema(tmp_path: Path) -> None:
    tether.Tether(db=f"sqlite:///{tmp_path / 'old.db'}", env={}).close()
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("PRAGMA user_version=1")
    con.close()

    done = run(tmp_path, "runs", "list", "--db", "sqlite:///old.db")

    line = one_error(done, "store_error")
    assert "schema version 1" in line
    assert "migrates it" in line
    con = sqlite3.connect(tmp_path / "old.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.close()


# -- 3. run ids whole --------------------------------------------------------------------


@pytest.mark.parametrize("columns", [None, "80", "50"])
def test_runs_list_prints_whole_run_ids(
    tmp_path: Path, demo: dict[str, Any], columns: str | None
) -> None:
    env = {} if columns is None else {"COLUMNS": columns}

    done = run(tmp_path, "runs", "list", "--db", "sqlite:///tether.db", env=env)

    assert done.returncode == 0, done.stderr
    assert demo["run_id"] in done.stdout
    assert "succeeded" in done.stdout
    assert "…" not in done.stdout


# -- 4. Ctrl-C ---------------------------------------------------------------------------


def test_ctrl_c_in_a_command_is_one_interrupted_line_and_exit_130(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "started"
    (tmp_path / "slowapp.py").write_text(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(30)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    proc = subprocess.Popen(
        [CLI, "status", "--app", "slowapp:app"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 130, (out, err)
    assert err.startswith("error[interrupted] "), err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


# -- 5. --last out of range ---------------------------------------------------------------


def test_what_if_last_out_of_range_is_a_usage_error(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    (tmp_path / "proposed.yaml").write_text("rules: []\n")

    done = run(
        tmp_path, "policy", "what-if", "proposed.yaml", "--last",
        "99999999999999999999", "--db", "sqlite:///tether.db",
    )  # fmt: skip

    line = one_error(done, "usage_error")
    assert "10000" in line


# -- 7, 8. demo: its config named, memory:// keeps nothing -----------------------------------


def test_demo_names_the_config_it_used(tmp_path: Path) -> None:
    (tmp_path / "tether.yaml").write_text("rules: []\n")

    text = run(tmp_path, "demo", "--db", "sqlite:///d.db")
    doc = json.loads(run(tmp_path, "demo", "--json", "--db", "sqlite:///d.db").stdout)

    assert "tether.yaml" in text.stdout
    assert doc["config"] == "tether.yaml"
    assert doc["policy_version"].startswith("sha256:")


def test_demo_in_memory_gives_no_hints_that_cannot_work(tmp_path: Path) -> None:
    done = run(tmp_path, "demo", "--db", "memory://")

    assert done.returncode == 0, done.stderr
    assert "tether verify" not in done.stdout
    assert "nothing was kept" in done.stdout


# -- 9. a read-only folder -----------------------------------------------------------------


def test_a_database_in_a_read_only_folder_says_the_folder_must_be_writable(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    """A good database in a folder SQLite cannot write its -wal and -shm files
    to is named as such, not as an unusable database. (Root writes through
    permission bits, so as root the folder is made immutable instead, which
    stops root too.)"""
    rodir = tmp_path / "rodir"
    rodir.mkdir()
    shutil.copy(tmp_path / "tether.db", rodir / "t.db")
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(rodir)], check=True)
    else:
        rodir.chmod(0o555)
    try:
        done = run(tmp_path, "runs", "list", "--db", "sqlite:///rodir/t.db")
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(rodir)], check=True)
        else:
            rodir.chmod(0o755)

    line = one_error(done, "store_error")
    assert "is not writable" in line
    assert "-wal" in line


# -- 10. --json errors -------------------------------------------------------------------


def test_a_json_error_is_also_a_json_document_on_stdout(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    done = run(tmp_path, "verify", "run_nope", "--json", "--db", "sqlite:///tether.db")

    one_error(done, "not_found")
    doc = json.loads(done.stdout)
    assert doc["format"] == 1
    assert doc["ok"] is False
    assert doc["error"]["code"] == "not_found"
    assert "run_nope" in doc["error"]["message"]


# -- wording ------------------------------------------------------------------------------


def test_an_empty_db_flag_is_refused(tmp_path: Path) -> None:
    one_error(run(tmp_path, "runs", "list", "--db", ""), "usage_error")


def test_an_error_from_tether_db_says_so(tmp_path: Path) -> None:
    done = run(tmp_path, "runs", "list", env={"TETHER_DB": "nosuch://x"})

    assert "TETHER_DB=" in one_error(done, "config_invalid")


def test_an_ambiguous_prefix_is_called_ambiguous(tmp_path: Path) -> None:
    db = "sqlite:///tether.db"
    for _ in range(2):
        assert run(tmp_path, "demo", "--json", "--db", db).returncode == 0

    first = run(tmp_path, "runs", "list", "--json", "--db", db)
    a, b = (r["run_id"] for r in json.loads(first.stdout)["runs"])
    prefix = a[: next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)]
    assert len(prefix) >= 6
    done = run(tmp_path, "runs", "show", prefix, "--db", db)

    assert "is ambiguous" in one_error(done, "not_found")
    assert "more than one" in done.stderr  # it reads two rows: it cannot count


def test_a_prefix_too_short_says_how_long_it_must_be(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    done = run(tmp_path, "runs", "show", demo["run_id"][:5], "--db",
               "sqlite:///tether.db")  # fmt: skip

    assert "at least 6 characters" in one_error(done, "not_found")


def test_export_to_dash_is_stdout(tmp_path: Path, demo: dict[str, Any]) -> None:
    done = run(tmp_path, "runs", "export", demo["run_id"], "-o", "-", "--db",
               "sqlite:///tether.db")  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["head"]
    assert not (tmp_path / "-").exists()


def test_no_runs_in_a_status_says_none_match(
    tmp_path: Path, demo: dict[str, Any]
) -> None:
    done = run(
        tmp_path, "runs", "list", "--status", "failed", "--db", "sqlite:///tether.db"
    )

    assert done.returncode == 0
    assert "no runs match --status failed" in done.stdout
    assert "tether demo" not in done.stdout
