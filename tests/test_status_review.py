"""Review of `tether status`: defects found by driving real parts, each pinned here."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
import tether.cli
from tether.status import status
from tether.testing import FakeClock

CONFIG = """\
limits:
  - {id: per-hour, kind: quota, per: hour, max: 5}
"""


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = tether.cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("TETHER_DB", "TETHER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tether.yaml").write_text(CONFIG)
    return tmp_path


@pytest.mark.parametrize("what", ["absent.db", "folder"])
def test_a_missing_database_from_tether_db_names_the_variable(
    folder: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    """docs/cli.md: an error about a URL from TETHER_DB starts with `TETHER_DB='...':`."""
    (folder / "folder").mkdir()
    url = f"sqlite:///{folder / what}"
    monkeypatch.setenv("TETHER_DB", url)

    code, out, err = run_cli(capsys, "status")

    assert (code, out) == (2, "")
    (line,) = err.splitlines()
    assert line.startswith(f"error[not_found] TETHER_DB={url!r}: "), line
    assert not (folder / "absent.db").exists()


class GoArgs(BaseModel):
    n: int


class GoResult(BaseModel):
    n: int


@tether.capability("x.go", effect="read")
def go(args: GoArgs) -> GoResult:
    return GoResult(n=args.n)


def _app(tmp_path: Path, config: str, clock: FakeClock) -> tether.Tether:
    path = tmp_path / "tether.yaml"
    path.write_text(config)
    app = tether.Tether(
        db=f"sqlite:///{tmp_path / 't.db'}", config=path, clock=clock, env={}
    )
    app.register(go)
    return app


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("kind: quota, per: minute, max: 5", "kind: quota, per: day, max: 5"),
        ("kind: quota, per: hour, max: 5", "kind: concurrency, max: 5"),
    ],
)
def test_counters_of_a_limit_edited_in_place_follow_what_the_limit_counts(
    tmp_path: Path, before: str, after: str
) -> None:
    """A limit whose window or kind changed (same id) shows what its next call meets.

    The limits count in the window `at - at % per` (none for caps): a counter
    of another window is not the limit's now, so it is not shown as live (it
    would say 3 of 5 used, 2 left, while the next calls may take all 5).
    """
    clock = FakeClock(datetime(2026, 1, 1, 0, 10, 30, tzinfo=UTC))
    app = _app(tmp_path, f"limits:\n  - {{id: q, {before}}}\n", clock)
    with app.run(principal=tether.Principal("bot", tenant="acme"), request="x") as run:
        for n in range(3):
            run.call("x.go", {"n": n})
    app.close()

    app = _app(tmp_path, f"limits:\n  - {{id: q, {after}}}\n", clock)
    try:
        (lim,) = status(app).limits
        assert (lim.unused, lim.counters) == (True, ())
        with app.run(principal=tether.Principal("bot"), request="y") as run:
            for n in range(5):  # the limit's full cap: nothing of the old counter
                assert run.step("x.go", {"n": n}).status == "executed"
    finally:
        app.close()


def test_retries_of_an_edited_retry_window_are_not_shown_as_live(
    tmp_path: Path,
) -> None:
    """After `window: 1m` becomes `1h`, the 00:10 minute's retries are no hour's."""
    clock = FakeClock(datetime(2026, 1, 1, 0, 10, 30, tzinfo=UTC))
    budget = "retry_budget: {{per_run: 3, max_attempts: 2, window: {}, backoff: 1ms}}\n"
    upstream = {"failing": True}

    @tether.capability("x.flaky", effect="read")
    def flaky(args: GoArgs) -> GoResult:
        if upstream["failing"]:
            upstream["failing"] = False
            raise ConnectionError("503")
        return GoResult(n=args.n)

    app = _app(tmp_path, budget.format("1m"), clock)
    app.register(flaky)
    with app.run(principal=tether.Principal("bot"), request="x") as run:
        run.call("x.flaky", {"n": 1})
    retry = status(app).retry_budget
    assert retry is not None
    assert [c.retries for c in retry.capabilities] == [1]
    app.close()

    app = _app(tmp_path, budget.format("1h"), clock)
    try:
        retry = status(app).retry_budget
        assert retry is not None
        assert retry.capabilities == ()
    finally:
        app.close()
