"""`tether replay` and `tether policy what-if`: re-check recorded runs with today's code."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tether.app import Tether
from tether.cli._common import (
    JSON_FORMAT,
    _clean,
    _console,
    _Db,
    _emit_json,
    _Json,
    _load_app,
    _open,
    _policy_cli,
    cli,
)
from tether.errors import NotFound, UsageError
from tether.replay import (
    DecisionChange,
    Mode,
    RecordedRun,
    Replayer,
    ReplayError,
    ReplayReport,
)
from tether.scenarios import SCENARIOS

__all__ = ["apps_for", "config_of", "scenario_of"]

_Target = Annotated[
    str,
    typer.Argument(
        metavar="RUN|FILE",
        help="A run id in the database, or a file written by `tether runs export`.",
        show_default=False,
    ),
]
_Policy = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        metavar="FILE",
        help="Replay under this policy file instead of the one in force "
        "(the app's, or the one an exported file carries).",
        show_default=False,
    ),
]
_ReplayApp = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance (myapp:app), whose capabilities and "
        "Python policies the run used; default: the built-in scenario the run "
        "came from.",
        show_default=False,
    ),
]


def scenario_of(recorded: RecordedRun) -> str | None:
    """The built-in scenario a run came from, if it names one in its context."""
    context = recorded.events[0].get("context") if recorded.events else None
    name = context.get("scenario") if isinstance(context, Mapping) else None
    return name if isinstance(name, str) and name in SCENARIOS else None


class apps_for:  # used like a function: apps_for(...).get(run)
    """The app each run replays against: the user's (--app) or a scenario's."""

    def __init__(self, loaded: Tether | None, stack: ExitStack) -> None:
        self.loaded = loaded
        self.stack = stack
        self._by_scenario: dict[str | None, Tether] = {}

    def get(self, recorded: RecordedRun) -> Tether:
        if self.loaded is not None:
            return self.loaded
        name = scenario_of(recorded)
        app = self._by_scenario.get(name)
        if app is None:
            app = self.stack.enter_context(Tether(db="memory://"))
            if name is not None:
                SCENARIOS[name].setup(app)
            self._by_scenario[name] = app
        return app


@contextmanager
def config_of(recorded: RecordedRun) -> Iterator[Path | None]:
    """The policy file an exported run carries, as a file, if it carries one."""
    text = recorded.header.get("config")
    if not isinstance(text, str):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="tether-replay-") as folder:
        path = Path(folder) / "tether.yaml"
        path.write_text(text, encoding="utf-8")
        yield path


def _load(target: str, db: str | None) -> RecordedRun:
    path = Path(target)
    if path.is_file() or target.endswith(".jsonl"):
        return RecordedRun.from_file(path)
    with _open(db, read_only=True) as app:
        return RecordedRun.from_store(app.store, target)


@cli.command("replay")
def _replay(
    target: _Target,
    app: _ReplayApp = None,
    policy: _Policy = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Also ask each executed step's dry-run handler what it would do, "
            "and report where that differs from what happened.",
        ),
    ] = False,
    as_json: _Json = False,
    db: _Db = None,
) -> None:
    """Re-check a recorded run with today's code; exit 1 when any outcome differs.

    Every step is driven again through the call path: its args validated, its
    preconditions checked, policy asked, limits and breakers consulted, all by
    today's code and configuration. Nothing is executed: each handler's result
    comes from the record, the clock reads the record's times, and a scratch
    store stands in for the database. Any outcome that differs from the record
    is a divergence, reported with its step, stage and the rule or version
    that changed.

    A FILE from `tether runs export` replays on any machine with the same
    capabilities (--app), under the policy it carries unless --policy is given.

    Example: tether replay run_0190f3a2c4 --policy proposed.yaml
    """
    mode: Mode = "dry_run" if dry_run else "verify"
    recorded = _load(target, db)
    with ExitStack() as stack:
        loaded = None if app is None else _load_app(app)
        replay_app = apps_for(loaded, stack).get(recorded)
        file = (
            policy if policy is not None else stack.enter_context(config_of(recorded))
        )
        replayer = (
            Replayer(replay_app, mode=mode)
            if file is None
            else Replayer.for_file(replay_app, file, mode=mode)
        )
        report = replayer.replay(recorded)
    if as_json:
        _emit_json({"format": JSON_FORMAT, **report.to_json()})
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_report(report: ReplayReport) -> None:
    console = _console()
    if report.ok:
        line = Text("same ", style="bold green")
        line.append(
            f"run {report.run_id}: {report.events} events, {report.steps} steps "
            "re-checked, every outcome as recorded"
        )
        console.print(line, soft_wrap=True)  # one line: scripts grep it
    else:
        line = Text("DIVERGES ", style="bold red")
        line.append(_clean(f"run {report.run_id}: {report.divergences[0].describe()}"))
        console.print(line, soft_wrap=True)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("step", "stage", "field", "recorded", "now", "rules"):
            table.add_column(column, overflow="fold")
        for d in report.divergences:
            table.add_row(
                "run" if d.step is None else str(d.step),
                d.kind,
                d.field or "",
                _clean(d.recorded, 80),
                _clean(d.now, 80),
                _clean(", ".join(d.rule_ids), 80),
            )
        console.print(table)
    for note in report.notes:
        console.print(Text(_clean(note, 400), style="yellow"))
    if report.predictions:
        table = Table(
            title="dry-run predictions", box=None, pad_edge=False, header_style="bold"
        )
        for column in ("step", "capability", "prediction"):
            table.add_column(column, overflow="fold")
        for p in report.predictions:
            if p.error is not None:
                said = Text(_clean(f"no prediction: {p.error}", 200), style="yellow")
            elif p.differs:
                said = Text(
                    _clean(
                        "; ".join(
                            f"{k}: predicted {pred!r}, was {rec!r}"
                            for k, (rec, pred) in p.differs.items()
                        ),
                        300,
                    ),
                    style="red",
                )
            else:
                said = Text("as happened", style="green")
            table.add_row(str(p.step), p.capability, said)
        console.print(table)


# -- what-if -------------------------------------------------------------------------

_WhatIfApp = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance (myapp:app), whose capabilities and "
        "Python policies the runs used; default: the built-in scenario each run "
        "came from. The runs are still read from --db.",
        show_default=False,
    ),
]


@_policy_cli.command("what-if")
def _what_if(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="The proposed policy file.", show_default=False
        ),
    ],
    runs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[RUN...]",
            help="Runs to replay (ids); default: the last --last runs.",
            show_default=False,
        ),
    ] = None,
    last: Annotated[
        int | None,
        typer.Option(
            "--last",
            metavar="N",
            min=1,
            max=10_000,
            help="Replay the N newest runs; default: 50, or with "
            "--since every run since DATE (up to 10000).",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="DATE",
            help="Only runs created at or after DATE (ISO 8601, UTC unless it says).",
            show_default=False,
        ),
    ] = None,
    app: _WhatIfApp = None,
    as_json: _Json = False,
    db: _Db = None,
) -> None:
    """Replay past runs under a proposed policy; report which decisions would change.

    Each run is replayed as `tether replay` does, under FILE instead of the
    policy in force, and every policy decision (each step's, and each plan
    admission's) is compared with the recorded one. The report counts, per
    rule, the changes (allow -> deny, allow -> require_approval, ...) and names
    the runs. Nothing is executed and the database is not written.

    Example: tether policy what-if proposed.yaml --last 200
    """
    cutoff = _since(since)
    with ExitStack() as stack:
        store_app = stack.enter_context(_open(db, read_only=True))
        loaded = None if app is None else _load_app(app)
        apps = apps_for(loaded, stack)
        if runs:
            ids = [store_app.store.get_run(r).run_id for r in runs]
        else:
            # --since alone picks runs by date (DESIGN: --last N | --since DATE),
            # so it is not cut at the 50 newest.
            newest = last if last is not None else 50 if cutoff is None else 10_000
            rows = store_app.store.list_runs(limit=newest)
            ids = [r.run_id for r in rows if cutoff is None or r.created_at >= cutoff]
        replayers: dict[int, Replayer] = {}
        reports: list[ReplayReport] = []
        skipped: list[dict[str, str]] = []
        checked = 0
        for run_id in ids:
            recorded = RecordedRun.from_store(store_app.store, run_id)
            replay_app = apps.get(recorded)
            replayer = replayers.get(id(replay_app))
            if replayer is None:
                replayer = replayers[id(replay_app)] = Replayer.for_file(
                    replay_app, file, mode="what_if"
                )
            try:
                reports.append(replayer.replay(recorded))
            except (ReplayError, NotFound) as exc:
                skipped.append({"run_id": run_id, "reason": exc.message})
                continue
            checked += _decisions_in(recorded)
    changes = [c for r in reports for c in r.decisions]
    groups = _by_rule(changes)
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "policy": str(file),
                "runs": len(reports),
                "decisions_checked": checked,
                "changed": len(changes),
                "by_rule": groups,
                "changes": [c.to_json() for c in changes],
                "skipped": skipped,
            }
        )
        return
    console = _console()
    head = Text("what-if ", style="bold")
    head.append(
        f"{file}: {len(reports)} runs, {checked} decisions re-made, "
        f"{len(changes)} would change"
    )
    console.print(head)
    if groups:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("rule", "change", "steps", "plans", "runs"):
            table.add_column(column, overflow="fold")
        for g in groups:
            table.add_row(
                _clean(g["rule"], 80),
                f"{g['recorded']} -> {g['now']}",
                str(g["count"]),
                str(g["plans"]),
                _clean(", ".join(g["runs"]), 200),
            )
        console.print(table)
    for s in skipped:
        reason = s["reason"].removeprefix(f"run {s['run_id']}: ")  # said once is enough
        console.print(
            Text(_clean(f"skipped {s['run_id']}: {reason}", 300), style="yellow"),
            soft_wrap=True,
        )


def _decisions_in(recorded: RecordedRun) -> int:
    count = 0
    for e in recorded.events:
        if e.get("kind") == "decided":
            count += 1
        elif e.get("kind") == "plan_admitted":
            count += len(e.get("steps") or ())
    return count


def _by_rule(changes: Sequence[DecisionChange]) -> list[dict[str, Any]]:
    """Changes grouped by (rule, recorded verdict, new verdict), most first."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for c in changes:
        for rule in c.rule_ids:
            g = groups.setdefault(
                (rule, c.recorded, c.now),
                {"rule": rule, "recorded": c.recorded, "now": c.now, "count": 0,
                 "plans": 0, "runs": []},
            )  # fmt: skip
            if c.source == "step":
                g["count"] += 1
            else:
                g["plans"] += 1
            if c.run_id not in g["runs"]:
                g["runs"].append(c.run_id)
    return sorted(groups.values(), key=lambda g: (-g["count"], g["rule"]))


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(
            f"--since {text!r} is not a date; write it as ISO 8601, e.g. 2026-11-30 "
            "or 2026-11-30T14:00"
        ) from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
