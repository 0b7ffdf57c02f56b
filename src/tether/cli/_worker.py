"""`tether worker`: resume parked runs once a person has answered them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from tether.cli._common import (
    _clean,
    _console,
    _load_app,
    _styled,
    _warn_of_skew,
    cli,
)
from tether.errors import LeaseLost, StoreError, TetherError, UsageError

__all__: list[str] = []  # the command registers on `cli` on import

_WorkerApp = Annotated[
    str,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance with the runs' capabilities and planners "
        "registered (app.register_planner), as uvicorn names an app.",
        show_default=False,
    ),
]


@cli.command("worker")
def _worker(
    app: _WorkerApp,
    until_idle: Annotated[
        bool,
        typer.Option(
            "--until-idle", help="Exit once no parked run is ready, instead of waiting."
        ),
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            min=0.05,
            max=3600,
            help="Seconds between looks for ready runs (0.05 to 3600). On PostgreSQL a decided "
            "approval request wakes the worker at once (LISTEN/NOTIFY); the looks "
            "find runs ready by time (an orphaned run's lapsed lease, a breaker's "
            "cool-down).",
        ),
    ] = 1.0,
) -> None:
    """Resume parked runs as people answer them, one at a time, until stopped.

    A run parked in awaiting_approval is ready once none of the approval
    requests it made or waits on is still pending. Each is taken over (its lease epoch goes up, so
    two workers never run it together) and continued by its planner from its
    record, as `tether runs resume` does. A run it cannot resume (its planner
    is not registered here, say) is named with the reason, once, and left for
    a worker that can; the others go on. Stop with Ctrl-C.

    Example: tether worker --app myagent:app --until-idle
    """
    tether_app = _load_app(app)
    console = _console()
    _warn_of_skew(console, tether_app.clock_skew())
    given_up: set[str] = set()  # runs this worker cannot resume: said once, not retried
    while True:
        ready = [r for r in tether_app.ready_runs() if r not in given_up]
        resumed = 0
        for run_id in ready:
            try:
                run = tether_app.resume(run_id)
            except (UsageError, LeaseLost) as exc:  # another worker took it first
                console.print(
                    Text(f"skipped {run_id}: {_clean(exc.message)}", style="dim")
                )
                continue
            except StoreError as exc:  # the store is away: the next look tries again
                console.print(
                    Text(f"skipped {run_id}: error[{exc.code}] {_clean(exc.message)}")
                )
                continue
            except TetherError as exc:  # a planner not registered here, say: go on
                given_up.add(run_id)
                console.print(
                    Text(
                        f"cannot resume {run_id}: error[{exc.code}] "
                        f"{_clean(exc.message)}",
                        style="yellow",
                    )
                )
                continue
            resumed += 1
            console.print(
                Text.assemble("resumed ", run.id, " ", _styled(run.status.value))
            )
        if not resumed:  # nothing went on: none is ready, or none can go on here
            if until_idle:
                return
            tether_app.wait_for_news(interval)
