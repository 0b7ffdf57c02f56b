"""`tether worker`: resume parked runs once a person has answered them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from tether._ready import ORPHANABLE_STATES, PARKED_STATES
from tether.cli._common import (
    _clean,
    _console,
    _load_app,
    _styled,
    _warn_of_skew,
    cli,
)
from tether.errors import LeaseLost, NotFound, StoreError, TetherError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from tether.app import Tether

__all__: list[str] = []  # the command registers on `cli` on import

_BATCH = 100
"""Ready runs a worker asks for per look, beyond those it has given up on."""

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
    dealt_with = 0
    while True:
        # A look that only gave up on runs looks again at once: they may have
        # filled its batch, with runs this worker can resume behind them.
        went_on = _resume_ready(tether_app, console, given_up)
        dealt_with += went_on
        if not went_on:
            if until_idle:  # none is ready, or none can go on here
                console.print(
                    Text(
                        "idle: nothing more is ready to resume here"
                        if dealt_with
                        else "idle: no run is ready to resume here",
                        style="dim",
                    )
                )
                return
            tether_app.wait_for_news(interval)


def _resume_ready(tether_app: Tether, console: Console, given_up: set[str]) -> int:
    """Resume the runs ready now, one at a time; return how many went on or were given up.

    A run that cannot go on here is added to `given_up`, said once and not
    tried again while it stays parked; one that left the parked and orphanable
    states (another worker resumed it, say) is forgotten, so `given_up` holds
    what waits now, not every run this worker ever gave up on.
    """
    # Ask past the runs given up on, which would otherwise fill the batch.
    offered = tether_app.ready_runs(limit=_BATCH + len(given_up))
    given_up.intersection_update(
        {*offered, *_still_waiting(tether_app, given_up.difference(offered))}
    )
    dealt_with = 0
    for run_id in offered:
        if run_id in given_up:
            continue
        try:
            run = tether_app.resume(run_id)
        except (UsageError, LeaseLost) as exc:  # another worker took it first
            console.print(Text(f"skipped {run_id}: {_clean(exc.message)}", style="dim"))
            continue
        except StoreError as exc:  # the store is away: the next look tries again
            console.print(
                Text(f"skipped {run_id}: error[{exc.code}] {_clean(exc.message)}")
            )
            continue
        except TetherError as exc:  # a planner not registered here, say: go on
            given_up.add(run_id)
            dealt_with += 1
            console.print(
                Text(
                    f"cannot resume {run_id}: error[{exc.code}] {_clean(exc.message)}",
                    style="yellow",
                )
            )
            continue
        dealt_with += 1
        console.print(Text.assemble("resumed ", run.id, " ", _styled(run.status.value)))
    return dealt_with


def _still_waiting(tether_app: Tether, run_ids: set[str]) -> set[str]:
    """Return those of `run_ids` still parked or orphanable (not offered, but waiting)."""
    waiting = set()
    for run_id in run_ids:
        try:
            status = tether_app.store.get_run(run_id).status
        except NotFound:
            continue
        except StoreError:  # the store is away: forget nothing yet
            waiting.add(run_id)
            continue
        if status in PARKED_STATES or status in ORPHANABLE_STATES:
            waiting.add(run_id)
    return waiting
