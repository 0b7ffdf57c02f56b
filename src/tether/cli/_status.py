"""`tether status`: limits, breakers and retry budgets as they stand."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tether.app import Tether
from tether.cli._common import (
    JSON_FORMAT,
    _clean,
    _console,
    _Db,
    _db_url,
    _emit_json,
    _field,
    _Json,
    _load_app,
    _no_database,
    _open,
    _opening,
    _warn_of_skew,
    cli,
)
from tether.config import (
    load_settings,
    resolve_config_path,
)
from tether.errors import UsageError
from tether.status import RetryStatus, StatusReport, status
from tether.store import sqlite_path

__all__: list[str] = []  # the command registers on `cli` on import


# -- status ----------------------------------------------------------------------------

_Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="The tether.yaml to read; default: $TETHER_CONFIG, else ./tether.yaml.",
        dir_okay=False,
        show_default=False,
    ),
]
_StatusApp = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance (myapp:app): its database, tether.yaml "
        "and clock are read instead of --db and --config.",
        show_default=False,
    ),
]
_NOTHING_CONFIGURED = (
    "no limits, breakers or retry budget are configured{where}; declare them "
    "under limits:, breakers: and retry_budget: in tether.yaml (see docs/limits.md)"
)


@cli.command("status")
def _status(
    as_json: _Json = False,
    db: _Db = None,
    config: _Config = None,
    app: _StatusApp = None,
) -> None:
    """Show where every limit, breaker and retry budget stands now.

    Limits: each live counter (whose, used, held by calls in flight, cap, what
    is left, when its window resets); a limit nothing counts against yet shows
    as unused. Breakers: the state as of now (an open breaker past its
    cool-down shows half_open), the failure and slow-call rates over its
    window, trial calls. Retry budgets: retries spent per run, per incident
    and per capability against its share of calls. Counters of limits no
    longer in tether.yaml are listed as unconfigured. Nothing is written.

    Example: tether status --config tether.yaml --db sqlite:///.tether/tether.db
    """
    if app is not None:
        if db is not None or config is not None:
            raise UsageError(
                "--app reads the app's own database and tether.yaml; drop --db "
                "and --config, or drop --app"
            )
        loaded = _load_app(app)
        report = status(loaded)
        url = loaded.store.url
    else:
        with _opening(db):
            url = _db_url(db)
        path = resolve_config_path(config)
        sqlite = sqlite_path(url)
        if sqlite and Path(sqlite).is_dir():
            with _opening(db):  # the error names TETHER_DB when the URL came from it
                raise _no_database(sqlite, "")
        if sqlite and not Path(sqlite).is_file():
            settings, _ = load_settings(path)
            if settings.limits or settings.breakers or settings.retry_budget:
                with _opening(db):
                    raise _no_database(
                        sqlite,
                        "pass --db (or set TETHER_DB) to the database your app "
                        "records to",
                    )
            # nothing configured, nothing recorded: not created
            with Tether(db="memory://", config=path, read_only=True) as opened:
                report = status(opened)
        else:
            with _open(db, read_only=True, config=path) as opened:
                report = status(opened)
                url = opened.store.url  # the store's URL carries no secrets
    if as_json:
        _emit_json({"format": JSON_FORMAT, "database": url, **report.to_json()})
    else:
        _print_status(report, url)


def _utc(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _per_second(rate: float) -> str:
    for unit, seconds in (("s", 1), ("m", 60), ("h", 3600)):
        per = rate * seconds
        if abs(per - round(per)) < 1e-9:
            return f"{round(per)}/{unit}"
    return f"{rate:.3g}/s"


_NAMES = ("limit", "whose", "breaker", "resource", "budget", "id")
"""Columns of names and ids: on a narrow terminal they fold (and times wrap at
their space), so the numbers stay whole."""


def _status_table(*headers: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header in headers:
        right = header in ("used", "held", "in flight", "cap", "left", "calls")
        table.add_column(
            header,
            no_wrap=header not in _NAMES and not header.endswith("(UTC)"),
            overflow="fold",
            justify="right" if right else "left",
        )
    return table


def _print_status(report: StatusReport, url: str) -> None:
    console = _console()
    if not (report.configured or report.unconfigured or report.unconfigured_breakers):
        where = "" if report.config is None else f" in {report.config}"
        print(
            _clean(_NOTHING_CONFIGURED.format(where=where))
        )  # one line, never wrapped
        _warn_of_skew(console, report.clock_skew)
        return
    _field(console, "as of", f"{_utc(report.at)} UTC")
    _field(console, "config", report.config or "(none)")
    _field(console, "database", url)
    _print_skew(console, report.clock_skew)
    sections = [
        ("Limits", _limits_table(report) if report.limits else None),
        ("Breakers", _breakers_table(report) if report.breakers else None),
        (
            "Retry budgets",
            None if report.retry_budget is None else _retry_table(report.retry_budget),
        ),
        (
            "Unconfigured (no longer in tether.yaml)",
            _unconfigured_table(report)
            if report.unconfigured or report.unconfigured_breakers
            else None,
        ),
    ]
    for title, table in sections:
        if table is not None:
            console.print()
            console.print(Text(title, style="bold"))
            console.print(table)
    if report.hidden:
        plural = "s" if report.hidden != 1 else ""
        console.print()
        console.print(
            Text(
                f"{report.hidden} counter{plural} of ended windows or finished runs "
                "not shown",
                style="dim",
            )
        )


def _print_skew(console: Console, skew: timedelta | None) -> None:
    """Show how far this host's clock is from the database server's, if it has one."""
    if skew is None or _warn_of_skew(console, skew):
        return
    way = "ahead of" if skew >= timedelta(0) else "behind"
    _field(
        console,
        "clock",
        f"{abs(skew).total_seconds():.3f} s {way} the database server's",
    )


def _limits_table(report: StatusReport) -> Table:
    table = _status_table(
        "limit", "kind", "whose", "used", "held", "in flight", "cap", "left",
        "resets (UTC)",
    )  # fmt: skip
    for lim in report.limits:
        name = Text(_clean(lim.id, 40))
        kind = lim.kind if lim.per is None else f"{lim.kind}/{lim.per}"
        if lim.rate is not None:
            kind = f"rate {_per_second(lim.rate)}"
            burst = f"burst {lim.burst}"
            table.add_row(name, kind, "-", "-", "-", "-", burst, "-", "-")
        elif not lim.counters:
            cap = str(lim.cap)
            table.add_row(name, kind, "unused", "0", "0", "0", cap, cap, "-")
        for c in lim.counters:
            table.add_row(
                name,
                kind,
                Text(_clean(c.scope, 40)),
                str(c.used),
                str(c.held),
                str(c.holds),
                str(c.cap),
                Text(str(c.left), style="" if c.left else "bold red"),
                _utc(c.window_end),
            )
    return table


_BREAKER_STYLE = {"open": "bold red", "half_open": "yellow", "closed": "green"}


def _breakers_table(report: StatusReport) -> Table:
    table = _status_table(
        "breaker", "resource", "state", "since (UTC)", "calls", "failed", "slow",
        "trials", "on open", "until (UTC)",
    )  # fmt: skip
    for b in report.breakers:
        half_open = b.state == "half_open"
        table.add_row(
            Text(_clean(b.id, 40)),
            Text(_clean(b.resource, 40)),
            Text(b.state, style=_BREAKER_STYLE.get(b.state, "")),
            _utc(b.since),
            str(b.calls) if half_open else f"{b.calls}/{b.window}",
            _share(b.failure_rate),
            _share(b.slow_rate),
            f"{b.probes}/{b.half_open_calls}" if half_open else "-",
            b.on_open,
            _utc(b.retry_at or b.probe_deadline),
        )
    return table


def _retry_table(retry: RetryStatus) -> Table:
    table = _status_table(
        "budget", "whose", "used", "allowed", "left", "calls", "resets (UTC)"
    )
    budgets = [("per run", retry.per_run, retry.runs)]
    if retry.per_incident is not None:
        budgets.append((f"per {retry.incident}", retry.per_incident, retry.incidents))
    for label, cap, counters in budgets:
        for r in counters:
            table.add_row(
                label,
                Text(_clean(r.scope, 40)),
                str(r.used),
                str(r.cap),
                Text(str(r.left), style="" if r.left else "bold red"),
                "-",
                "-",
            )
        if not counters:
            table.add_row(label, "unused", "0", str(cap), str(cap), "-", "-")
    ratio = f"{retry.ratio} of calls, min {retry.min_retries}"
    for c in retry.capabilities:
        table.add_row(
            ratio,
            Text(_clean(c.capability, 40)),
            str(c.retries),
            str(c.allowed),
            Text(str(c.left), style="" if c.left else "bold red"),
            str(c.calls),
            _utc(c.window_end),
        )
    if not retry.capabilities:
        table.add_row(ratio, "no retries yet", "0", "-", "-", "-", "-")
    return table


def _unconfigured_table(report: StatusReport) -> Table:
    table = _status_table(
        "id", "whose", "window (UTC)", "used", "held", "in flight", "state"
    )
    for u in report.unconfigured:
        table.add_row(
            Text(_clean(u.limit_id, 40)),
            Text(_clean(u.scope, 40)),
            _utc(u.window_start),
            str(u.used),
            str(u.held),
            str(u.holds),
            "-",
        )
    for gone in report.unconfigured_breakers:
        table.add_row(
            Text(_clean(gone.id, 40)), "-", _utc(gone.since), "-", "-", "-", gone.state
        )
    return table
