"""`tether status` counts a capability's retries left in whole retries.

The ratio allows `max(ratio * calls, min_retries)` retries a window, which need
not be whole (0.5 * 3 calls = 1.5); the store admits a retry while
`retries + 1 <= allowed`, so what is left is the whole retries below that, as
the next failing call shows: it is not retried.
"""

from __future__ import annotations

import json
import sys
import types
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
import tether.cli
from tether.status import status
from tether.testing import FakeClock

CONFIG = """\
retry_budget: {per_run: 10, ratio: 0.5, min_retries: 1, window: 1m, backoff: 1ms,
               max_attempts: 3}
"""


class In(BaseModel):
    n: int


class Out(BaseModel):
    n: int


@pytest.mark.parametrize("db", ["sqlite", "memory"])
def test_capability_retries_left_are_whole_and_match_what_the_store_admits(
    db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    failing = {"now": False}
    attempts: list[int] = []

    @tether.capability("svc.call", effect="read")
    def call(args: In) -> Out:
        attempts.append(args.n)
        if failing["now"]:
            raise RuntimeError("upstream answered 503")
        return Out(n=args.n)

    url = f"sqlite:///{tmp_path / 'tether.db'}" if db == "sqlite" else "memory://"
    clock = FakeClock(datetime(2026, 1, 1, 0, 10, tzinfo=UTC))
    app = tether.Tether(db=url, config=config, clock=clock, env={})
    app.register(call)
    with app, app.run(principal=tether.Principal("bot"), request="x") as run:
        run.step("svc.call", {"n": 1})
        run.step("svc.call", {"n": 2})
        failing["now"] = True
        run.step("svc.call", {"n": 3})  # fails, is retried once (1 <= 1.5), fails
        retry = status(app).retry_budget
        assert retry is not None
        (cap,) = retry.capabilities
        assert (cap.retries, cap.calls, cap.allowed) == (1, 3, Decimal("1.5"))
        assert cap.left == 0
        assert isinstance(cap.left, int)

        monkeypatch.setitem(sys.modules, "wholeapp", types.SimpleNamespace(app=app))
        monkeypatch.setenv("COLUMNS", "200")
        assert tether.cli.main(["status", "--app", "wholeapp:app", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        (shown,) = doc["retry_budget"]["capabilities"]
        assert (shown["allowed"], shown["left"]) == ("1.5", "0")
        assert tether.cli.main(["status", "--app", "wholeapp:app"]) == 0
        text = capsys.readouterr().out
        (line,) = [ln.split() for ln in text.splitlines() if "svc.call" in ln.split()]
        at = line.index("svc.call")
        assert line[at + 1 : at + 5] == [
            "1",
            "1.5",
            "0",
            "3",
        ]  # used, allowed, left, calls

        # What the report says is left is what the store admits: no retry.
        attempts.clear()
        run.step("svc.call", {"n": 4})
        assert attempts == [4]
