"""A pytest plugin, installed with tether: every `*.tether.jsonl` file is a test.

Export a run (`tether runs export RUN > tests/runs/inc-4821.tether.jsonl`) and
pytest replays it in verify mode on every test run: the test fails, with the
divergences, when today's capabilities, policy, limits or breakers decide any
step differently from the record. That is how a bad production run becomes a
regression test.

Which app the runs replay against, in order: `--tether-app MODULE:ATTR`, the
`tether_app` ini option, else the built-in scenario a run names. The policy is
the one the file carries (the `tether.yaml` it ran under), unless the
`tether_policy` ini option names another (a path relative to the rootdir).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tether.cli._common import _load_app
from tether.cli._replay import apps_for, config_of
from tether.errors import TetherError
from tether.replay import RecordedRun, Replayer, ReplayReport

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr

__all__ = ["RecordFile", "RecordItem", "ReplayFailed"]

SUFFIX = ".tether.jsonl"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the plugin's option and ini settings."""
    group = parser.getgroup("tether", "replay recorded tether runs")
    group.addoption(
        "--tether-app",
        metavar="MODULE:ATTR",
        default=None,
        help="The tether.Tether whose capabilities the *.tether.jsonl runs replay "
        "against (default: the tether_app ini option, else the built-in scenario).",
    )
    parser.addini("tether_app", "MODULE:ATTR of the app runs replay against.")
    parser.addini(
        "tether_policy", "A policy file to replay every run under (default: its own)."
    )


def pytest_collect_file(
    file_path: Path, parent: pytest.Collector
) -> pytest.Collector | None:
    """Collect `*.tether.jsonl` files as replay tests."""
    if file_path.name.endswith(SUFFIX):
        return RecordFile.from_parent(parent, path=file_path)
    return None


class ReplayFailed(Exception):
    """A recorded run did not replay the same; carries the report."""

    def __init__(self, report: ReplayReport) -> None:
        super().__init__(report.run_id)
        self.report = report


class RecordFile(pytest.File):
    """One exported run: one test."""

    def collect(self) -> Iterator[RecordItem]:
        """Yield the file's single replay test, named by the file."""
        yield RecordItem.from_parent(self, name=self.path.name.removesuffix(SUFFIX))


class RecordItem(pytest.Item):
    """Replays one exported run in verify mode."""

    def runtest(self) -> None:
        """Replay the run; raise `ReplayFailed` when any outcome differs."""
        config = self.config
        spec = config.getoption("--tether-app") or config.getini("tether_app") or None
        policy = config.getini("tether_policy") or None
        recorded = RecordedRun.from_file(self.path)
        with ExitStack() as stack:
            loaded = None if spec is None else _load_app(str(spec))
            app = apps_for(loaded, stack).get(recorded)
            file = (
                Path(config.rootpath, str(policy))
                if policy
                else stack.enter_context(config_of(recorded))
            )
            replayer = (
                Replayer(app)
                if file is None
                else Replayer.for_file(app, file, mode="verify")
            )
            report = replayer.replay(recorded)
        if not report.ok:
            raise ReplayFailed(report)

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str | TerminalRepr:
        """Say what diverged, one line per divergence, instead of a traceback."""
        error = excinfo.value
        if isinstance(error, ReplayFailed):
            lines = [f"run {error.report.run_id} no longer replays the same:"]
            lines += [f"  {d.describe()}" for d in error.report.divergences]
            lines += [f"  note: {n}" for n in error.report.notes]
            return "\n".join(lines)
        if isinstance(error, TetherError):
            return error.message
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        """Where the test comes from, for pytest's report."""
        return self.path, 0, f"replay {self.path.name}"
