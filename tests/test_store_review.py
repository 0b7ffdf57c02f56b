"""Review of the SQLite store, the record's tamper evidence, its export and its key.

Real parts only: SQLite files in `tmp_path`, child processes for file-size
limits and lock holders, raw `sqlite3` edits as an attacker with write access to
the database would make them, and the installed `tether` command.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel

import tether
from tether import config
from tether.replay import ReplayError
from tether.replay._records import RecordedRun
from tether.store.sqlite import _connection

PRINCIPAL = tether.Principal("bot")


class NoteIn(BaseModel, extra="forbid"):
    text: str


class NoteOut(BaseModel):
    text: str


@tether.capability("notes.echo")
def echo(args: NoteIn) -> NoteOut:
    """Return the note as it came."""
    return NoteOut(text=args.text)


@tether.capability("notes.fail")
def fail(args: NoteIn) -> NoteOut:
    """Raise, so that the run fails."""
    raise RuntimeError("upstream said no")


def _db(path: Path) -> str:
    return f"sqlite:///{path}"


def _child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own interpreter and code
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- errors at open: a full disk or a busy file is not "no tether database" -------------

_OPEN_UNDER_A_FILE_SIZE_LIMIT = """
    import resource, sys, tether
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    try:
        tether.Tether(db=sys.argv[1], env={})
    except tether.StoreError as exc:
        print(exc.message)
    else:
        print("opened")
"""


def test_a_database_that_cannot_grow_is_reported_as_a_disk_problem_and_opens_later(
    tmp_path: Path,
) -> None:
    """Opening a new database where the disk is full (a file-size limit) names the disk, not the file, and the file opens once space is back."""
    path = tmp_path / "tether.db"

    opened = _child(_OPEN_UNDER_A_FILE_SIZE_LIMIT, _db(path))

    message = opened.stdout.strip()
    assert opened.returncode == 0, opened.stderr
    assert len(message.splitlines()) == 1
    assert "disk" in message
    assert "not a usable tether database" not in message
    assert "point --db" not in message
    app = tether.Tether(db=_db(path), env={})
    app.register(echo)
    with app.run(principal=PRINCIPAL, request="after the disk was freed") as run:
        run.call("notes.echo", {"text": "hello"})
    assert app.verify(run.id).ok
    app.close()


_HOLD_THE_WRITE_LOCK = """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_a_database_held_by_another_process_is_reported_busy_and_opens_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a database whose write lock another process holds past the busy timeout says it is busy, and opens once the lock is let go."""
    path = tmp_path / "tether.db"
    tether.Tether(db=_db(path), env={}).close()
    monkeypatch.setattr(_connection, "BUSY_TIMEOUT_MS", 200)
    with subprocess.Popen(  # our own interpreter and code
        [sys.executable, "-c", textwrap.dedent(_HOLD_THE_WRITE_LOCK), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdin is not None
        assert holder.stdout.readline() == "holding\n"

        with pytest.raises(tether.StoreError) as caught:
            tether.Tether(db=_db(path), env={})
        holder.stdin.close()  # the holder reads to EOF, then exits
        holder.wait(timeout=30)

    message = caught.value.message
    assert len(message.splitlines()) == 1
    assert "busy" in message
    assert "not a usable tether database" not in message
    app = tether.Tether(db=_db(path), env={})
    with app.run(principal=PRINCIPAL, request="after the lock was let go") as run:
        pass
    assert app.verify(run.id).ok
    app.close()


# -- tamper evidence: the runs row's columns that are shown must agree with the record --


@pytest.fixture
def failed_run(tmp_path: Path) -> Iterator[tuple[tether.Tether, str, Path]]:
    """An app on a SQLite file, and a finished run of it that failed."""
    path = tmp_path / "tether.db"
    app = tether.Tether(db=_db(path), env={})
    app.register(echo, fail)
    started: list[str] = []

    def fail_a_run() -> None:
        with app.run(principal=PRINCIPAL, request="fail once") as run:
            started.append(run.id)
            run.call("notes.echo", {"text": "hello"})
            run.call("notes.fail", {"text": "boom"})

    with pytest.raises(tether.TetherError):
        fail_a_run()
    yield app, started[0], path
    app.close()


def _edit(path: Path, sql: str, *params: object) -> None:
    con = sqlite3.connect(path)
    with con:
        con.execute(sql, params)
    con.close()


def test_an_untouched_failed_run_verifies(
    failed_run: tuple[tether.Tether, str, Path],
) -> None:
    """A failed run, its row untouched, verifies (no false alarm from the row checks)."""
    app, run_id, _path = failed_run

    report = app.verify(run_id)

    assert report.ok, report.reason
    assert app.store.get_run(run_id).error_code is not None


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("error_code", "policy_denied"),
        ("error_code", None),
        ("created_at", "2020-01-01T00:00:00+00:00"),
    ],
    ids=["error-code-changed", "error-code-cleared", "created-at-backdated"],
)
def test_an_edited_runs_row_column_that_runs_list_shows_fails_verify(
    failed_run: tuple[tether.Tether, str, Path], column: str, value: str | None
) -> None:
    """Editing a column that `tether runs list` prints (the error code, the creation time) behind the record fails `verify`, naming the column."""
    app, run_id, path = failed_run
    _edit(
        path, f"UPDATE runs SET {column}=? WHERE run_id=?", value, run_id
    )  # constant column names

    report = app.verify(run_id)

    assert not report.ok
    assert report.reason is not None
    assert column.split("_")[0] in report.reason


def test_tether_verify_exits_1_for_a_backdated_run(
    failed_run: tuple[tether.Tether, str, Path],
) -> None:
    """`tether verify` exits 1 on a run whose creation time was edited in the runs table."""
    app, run_id, path = failed_run
    app.close()
    _edit(path, "UPDATE runs SET created_at=? WHERE run_id=?", "2020-01-01", run_id)

    done = subprocess.run(  # the installed command
        [Path(sys.executable).with_name("tether"), "verify", run_id, "--db", _db(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT intact" in done.stdout


# -- export: hostile text reaches no terminal raw, and the export still round-trips -----

HOSTILE = "a\u202eevil\u2066x\u2069\u200b\u009b31m\u007f\u0085\u061c\ufeffz"
"""Bidi overrides and isolates, a zero-width space, a C1 CSI, DEL, NEL, BOM."""
RAW_UNSAFE = ["\u202e", "\u2066", "\u2069", "\u200b", "\u009b", "\u007f", "\u0085"]


def test_an_export_escapes_terminal_controls_and_bidi_marks_and_round_trips(
    tmp_path: Path,
) -> None:
    """Control characters and bidi or invisible marks in a record leave an export as JSON escapes; the file still verifies against its head and replays its chain."""
    path = tmp_path / "tether.db"
    app = tether.Tether(db=_db(path), env={})
    app.register(echo)
    with app.run(principal=PRINCIPAL, request=HOSTILE) as run:
        run.call("notes.echo", {"text": HOSTILE})

    lines = list(app.export(run.id))
    exported = tmp_path / "run.jsonl"
    exported.write_bytes(b"".join(line + b"\n" for line in lines))

    text = exported.read_bytes().decode()
    assert [ch for ch in RAW_UNSAFE if ch in text] == []
    header = orjson.loads(lines[0])
    assert header["request"] == HOSTILE
    outputs = [orjson.loads(line)["event"].get("output") for line in lines[1:]]
    assert {"text": HOSTILE} in outputs
    recorded = RecordedRun.from_file(exported)
    assert len(recorded.events) == len(lines) - 1
    assert app.verify(run.id, head=header["head"]).ok
    app.close()


def test_an_export_cut_to_its_header_is_refused_as_truncated(tmp_path: Path) -> None:
    app = tether.Tether(db=_db(tmp_path / "tether.db"), env={})
    app.register(echo)
    with app.run(principal=PRINCIPAL, request="note") as run:
        run.call("notes.echo", {"text": "hi"})
    header = next(iter(app.export(run.id)))
    app.close()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(header + b"\n")

    with pytest.raises(ReplayError, match="truncated or altered"):
        RecordedRun.from_file(cut)


# -- the record key file -------------------------------------------------------------


def test_the_key_file_is_not_written_through_a_planted_symlink(
    tmp_path: Path,
) -> None:
    """A symlink planted where the key file is first written aside leaves its target untouched; the key file is a regular 0600 file holding the key."""
    db = tmp_path / "tether.db"
    target = tmp_path / "someone-elses-file"
    target.write_text("precious\n")
    target.chmod(0o644)
    planted = tmp_path / f"tether.db.key.{os.getpid()}.tmp"
    planted.symlink_to(target)

    key = config.record_key(_db(db), {})

    key_file = tmp_path / "tether.db.key"
    assert target.read_text() == "precious\n"
    assert not key_file.is_symlink()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key is not None
    assert bytes.fromhex(key_file.read_text()) == key


def test_a_key_file_made_once_is_never_replaced(tmp_path: Path) -> None:
    """Asking for the key again, however often, returns the key file's key and leaves the file as it was."""
    db = tmp_path / "tether.db"
    first = config.record_key(_db(db), {})
    key_file = tmp_path / "tether.db.key"
    before = (key_file.read_bytes(), key_file.stat().st_ino)

    again = [config.record_key(_db(db), {}) for _ in range(3)]

    assert again == [first] * 3
    assert (key_file.read_bytes(), key_file.stat().st_ino) == before


def test_a_runs_row_with_a_garbled_time_is_one_store_error_line_not_a_crash(
    failed_run: tuple[tether.Tether, str, Path],
) -> None:
    """A runs row whose creation time was overwritten with text makes `runs list` and `verify` fail with one `store_error` line, not `error[internal]`."""
    app, run_id, path = failed_run
    app.close()
    _edit(path, "UPDATE runs SET created_at=? WHERE run_id=?", "garbage", run_id)
    tether_cmd = Path(sys.executable).with_name("tether")

    done = [
        subprocess.run(  # the installed command
            [tether_cmd, *args, "--db", _db(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for args in (["runs", "list"], ["verify", run_id])
    ]

    assert [d.returncode for d in done] == [2, 2]
    for d in done:
        assert d.stderr.startswith("error[store_error] ")
        assert len(d.stderr.splitlines()) == 1
