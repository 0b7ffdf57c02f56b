"""`tether demo`, `tether runs ...` and `tether verify`: running and reading runs."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from tether import _canonical
from tether.cli._common import (
    JSON_FORMAT,
    _clean,
    _console,
    _Db,
    _decided,
    _emit_json,
    _field,
    _fitted_table,
    _Json,
    _load_app,
    _open,
    _opened,
    _RunArg,
    _runs_cli,
    _styled,
    _with_scenario,
    cli,
)
from tether.cli._timeline import (
    _events_table,
    _principal_line,
    _short_time,
    _steps_table,
    _summary,
    _timeline,
)
from tether.errors import NotFound, UsageError
from tether.run import RunState
from tether.scenarios import SCENARIOS
from tether.store import sqlite_path

__all__: list[str] = []  # commands register on `cli` on import


@cli.command("demo")
def _demo(
    scenario: Annotated[
        str,
        typer.Option(
            "--scenario",
            metavar="NAME",
            help=f"Built-in scenario: {', '.join(sorted(SCENARIOS))}.",
        ),
    ] = "cloud-ops",
    as_json: _Json = False,
    db: _Db = None,
) -> None:
    """Run a built-in scenario end to end and show its timeline.

    The scripted agent plans, the gateway checks and executes each step, and
    the run is recorded in the database; exit 1 if the run did not succeed.

    Example: tether demo --scenario cloud-ops --db sqlite:///demo.db
    """
    chosen = SCENARIOS.get(scenario)
    if chosen is None:
        raise UsageError(
            f"unknown scenario {_clean(scenario, 60)!r}; choose one of: "
            f"{', '.join(sorted(SCENARIOS))}"
        )
    with _open(db) as app:
        chosen.setup(app)
        run = chosen.run(app)
        doc = _timeline(app, run.id)
        url = app.store.url  # the store's URL carries no secrets
        config = None if app.config_path is None else str(app.config_path)
        policy_version = app.policy.version
    kept = not url.startswith("memory:")
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "scenario": chosen.name,
                "run_id": doc["run_id"],
                "status": doc["status"],
                "answer": doc["answer"],
                "error_code": doc["error_code"],
                "steps": doc["steps"],
                "config": config,
                "policy_version": policy_version,
                "database": url if kept else None,
            }
        )
    else:
        console = _console()
        console.print(Text(f"{chosen.name}: {chosen.description}", style="bold"))
        _field(console, "request", doc["request"])
        _field(console, "agent", _principal_line(chosen.principal.describe()))
        _field(
            console,
            "config",
            "none (no tether.yaml here, no TETHER_CONFIG): only the scenario's "
            "own rules apply; every other step is allowed"
            if config is None
            else f"{config} (policy version {policy_version}); its rules, limits "
            "and breakers apply to this run",
        )
        console.print()
        console.print(_steps_table(doc["steps"], console.width))
        console.print()
        if doc["answer"]:
            _field(console, "answer", doc["answer"])
        console.print(_summary(doc))
        if not kept:
            _field(console, "database", f"{url}: nothing was kept, the run is gone")
        else:
            db_flag = "" if db is None else f" --db {shlex.quote(db)}"
            _field(console, "verify", f"tether verify {doc['run_id']}{db_flag}")
            _field(console, "inspect", f"tether runs show {doc['run_id']}{db_flag}")
            if db is None:
                _field(console, "database", url)
    if doc["status"] != RunState.SUCCEEDED.value:
        raise typer.Exit(1)


@_runs_cli.command("list")
def _runs_list(
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            "-n",
            metavar="N",
            min=1,
            max=10_000,
            help="At most this many runs.",
        ),
    ] = 20,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help=f"Only runs in this status: {', '.join(s.value for s in RunState)}.",
        ),
    ] = None,
    as_json: _Json = False,
    db: _Db = None,
) -> None:
    """List recorded runs, newest first.

    Example: tether runs list --status failed --limit 10
    """
    if status is not None and status not in {s.value for s in RunState}:
        raise UsageError(
            f"unknown status {_clean(status, 40)!r}; use one of: "
            f"{', '.join(s.value for s in RunState)}"
        )
    with _open(db, read_only=True) as app:
        rows = app.store.list_runs(limit=limit, status=status)
    items: list[dict[str, Any]] = [
        {
            "run_id": r.run_id,
            "status": r.status,
            "tenant": r.tenant,
            "principal": r.principal_id,
            "request": r.request,
            "created_at": r.created_at.isoformat(),
            "updated_at": r.updated_at.isoformat(),
            "events": r.head_seq,
            "error_code": r.error_code,
        }
        for r in rows
    ]
    if as_json:
        _emit_json({"format": JSON_FORMAT, "runs": items})
        return
    console = _console()
    if not items:
        if status is None:
            console.print("no runs yet; try `tether demo`")
        else:
            console.print(f"no runs match --status {status}")
        return
    table, needed = _runs_table(items, console.width)
    if needed <= console.width:
        console.print(table)
        return
    # Too narrow for the columns: two lines a run, wrapped, rather than cut an id.
    for item in items:
        line = Text(_clean(item["run_id"]), style="bold")
        line.append("  ")
        line.append_text(_styled(item["status"]))
        line.append(f"  {_clean(_short_time(item['created_at']))}")
        line.append(f"  {item['events']} events")
        console.print(line)
        said = f"{_clean(item['principal'], 60)}: {_clean(item['request'], 200)}"
        console.print(Padding(Text(said), (0, 0, 0, 2)))


_RUN_COLUMNS = (
    ("run", None), ("status", None), ("created (UTC)", 10), ("principal", 9),
    ("events", None), ("request", 16),
)  # fmt: skip
"""The list's columns, each with how narrow it may get (None: never narrower
than its text). Run ids stay whole: they are what `show` and `verify` take."""
_RUN_GIVE_WAY = ("request", "principal", "created (UTC)")
"""On a narrow terminal, which columns narrow first (each to its minimum)."""


def _runs_table(items: list[dict[str, Any]], width: int) -> tuple[Table, int]:
    """Return the runs as a table that fits `width` where it can, and its width.

    Ids are never cut: when even the narrowest table is wider than `width`,
    the returned width says how wide it is.
    """
    cells = [
        [
            _clean(item["run_id"]),
            _clean(item["status"]),
            _clean(_short_time(item["created_at"])),
            _clean(item["principal"], 60),
            str(item["events"]),
            _clean(item["request"], 200),
        ]
        for item in items
    ]
    return _fitted_table(
        _RUN_COLUMNS, _RUN_GIVE_WAY, cells, width, status=_styled, right="events"
    )


@_runs_cli.command("show")
def _runs_show(
    run: _RunArg,
    as_json: _Json = False,
    db: _Db = None,
) -> None:
    """Show a run: who asked what, each step's decision and outcome, every event.

    Example: tether runs show run_0190f3a2c4
    """
    with _open(db, read_only=True) as app:
        _with_scenario(app, run)
        doc = _timeline(app, run)
    if as_json:
        summary = {k: v for k, v in doc.items() if k not in ("steps", "events")}
        _emit_json(
            {
                "format": JSON_FORMAT,
                "run": summary,
                "steps": doc["steps"],
                "events": doc["events"],
            }
        )
        return
    console = _console()
    _field(console, "run", doc["run_id"])
    _field(console, "status", doc["status"])
    _field(console, "request", doc["request"])
    started = doc["events"][0] if doc["events"] else {}
    principal = started.get("principal") if isinstance(started, Mapping) else None
    _field(
        console,
        "agent",
        _principal_line(principal)
        if isinstance(principal, Mapping)
        else doc["principal"],
    )
    _field(console, "created", doc["created_at"])
    _field(console, "head", f"event {doc['head_seq']}, {doc['head']}")
    if doc["answer"]:
        _field(console, "answer", doc["answer"])
    if doc["error_code"]:
        _field(console, "error", f"{doc['error_code']}: {doc['message'] or ''}")
    if doc["steps"]:
        console.print()
        console.print(_steps_table(doc["steps"], console.width))
    console.print()
    console.print(_events_table(doc["events"]))


_ResumeApp = Annotated[
    str,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance with the run's capabilities and its "
        "planner registered (app.register_planner), as uvicorn names an app.",
        show_default=False,
    ),
]


@_runs_cli.command("resume")
def _runs_resume(run_id: _RunArg, app: _ResumeApp, as_json: _Json = False) -> None:
    """Continue a run parked in awaiting_approval, here, until it ends or parks again.

    The run is taken over (a process still holding it can no longer write),
    then its planner continues from the record: steps taken are not taken
    again, and the parked step runs under its grant once a person approved
    it. Exit 0 when the run succeeded, 1 when it parked again or failed.

    Example: tether runs resume run_01... --app myagent:app
    """
    tether_app = _load_app(app)
    run = tether_app.resume(run_id)
    status = run.status.value
    if as_json:
        _emit_json({"format": JSON_FORMAT, "run_id": run.id, "status": status})
    else:
        _console().print(
            Text.assemble("run ", run.id, " ", _styled(status), f" · {run.steps} steps")
        )
    if status != "succeeded":
        raise typer.Exit(1)


_RunConfig = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="The tether.yaml to use (its approvers: may resolve a step in "
        "doubt or stop a run; an abort's closed requests reach its approvals "
        "webhook); "
        "default: $TETHER_CONFIG, else ./tether.yaml.",
        dir_okay=False,
        show_default=False,
    ),
]


@_runs_cli.command("abort")
def _runs_abort(
    run: _RunArg,
    by: Annotated[
        str,
        typer.Option(
            "--as",
            metavar="NAME",
            help="Who stops the run: a name under approvers: in tether.yaml "
            "who decides for the run's tenant.",
            show_default=False,
        ),
    ],
    reason: Annotated[
        str,
        typer.Option(
            "--reason",
            metavar="TEXT",
            help="Why (required): the record and the process running it get it.",
            show_default=False,
        ),
    ],
    as_json: _Json = False,
    db: _Db = None,
    config: _RunConfig = None,
) -> None:
    """Stop a run for good: end it aborted, whoever holds it.

    Works on a run in any state short of a final one: parked (awaiting
    approval, degraded) or live in another process or worker, whose next
    write is then refused, saying who aborted the run and why. The record
    gets a run_status event (who, why) and run_finished, after an in_doubt
    event for a step cut off mid-call (its outcome is unknown); the run's
    pending approval requests are closed undecided (expired) in the same
    name, so the same call made again asks a person anew. A run that
    already ended is an error (exit 2); a NAME not under approvers: for the
    run's tenant is refused (exit 1).

    Example: tether runs abort run_0190f3a2c4 --as alice --reason "looping on restarts"
    """
    if not by.strip():
        raise UsageError(
            "--as is empty; give the name of the person stopping the run (e.g. --as alice)"
        )
    if not reason.strip():
        raise UsageError(
            "--reason is empty; say why the run is stopped, for the record and "
            "for whoever ran it"
        )
    with _open(db, must_exist=True, config=config) as app:
        row = _decided(lambda: app.abort(run, by=by, reason=reason))
        # A step the run was cut off in (recorded in doubt by the abort, in
        # its write, just before its run_status): whoever stops it must check.
        events = [e.data() for e in app.store.events(row.run_id)]
        moved = max(i for i, e in enumerate(events) if e["kind"] == "run_status")
        prior = events[moved - 1]
        doubt = (
            prior
            if prior["kind"] == "in_doubt" and prior["at"] == events[moved]["at"]
            else None
        )
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "run_id": row.run_id,
                "status": row.status,
                "by": by,
                "reason": reason,
                "tenant": row.tenant,
                "principal": row.principal_id,
                "request": row.request,
                "updated_at": row.updated_at.isoformat(),
                "events": row.head_seq,
                "error_code": row.error_code,
                "in_doubt": None
                if doubt is None
                else {"step": doubt["step"], "message": doubt["message"]},
            }
        )
        return
    line = Text.assemble("run ", _clean(row.run_id), " ", _styled(row.status))
    line.append(_clean(f" by {by}: {reason}", 300))
    _console().print(line, soft_wrap=True)
    if doubt is not None:
        _console().print(
            Text(f"in doubt: {_clean(doubt['message'], 300)}", style="yellow"),
            soft_wrap=True,
        )


@_runs_cli.command("resolve")
def _runs_resolve(
    run: _RunArg,
    step: Annotated[
        int,
        typer.Argument(
            metavar="STEP",
            help="The step in doubt, by its number (runs show lists them).",
            min=1,
            show_default=False,
        ),
    ],
    acted: Annotated[
        bool,
        typer.Option(
            "--acted/--not-acted",
            help="What you found upstream: the call acted, or it did not.",
            show_default=False,
        ),
    ],
    by: Annotated[
        str,
        typer.Option(
            "--as",
            metavar="NAME",
            help="Who checked: a name under approvers: in tether.yaml who "
            "decides for the run's tenant (not the run's own principal).",
            show_default=False,
        ),
    ],
    reason: Annotated[
        str,
        typer.Option(
            "--reason",
            metavar="TEXT",
            help="What you found (required), for the record.",
            show_default=False,
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            metavar="JSON",
            help="With --acted: the call's result, a JSON object; a retry "
            "under the step's key gets it instead of acting again. Needs --app.",
            show_default=False,
        ),
    ] = None,
    app: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:ATTR",
            help="Your tether.Tether instance (myapp:app), which registers the "
            "step's capability: --output is checked against its output schema "
            "and its secrets masked. Its database is used instead of --db.",
            show_default=False,
        ),
    ] = None,
    as_json: _Json = False,
    db: _Db = None,
    config: _RunConfig = None,
) -> None:
    """Say whether a step in doubt acted upstream, once you have checked.

    A step is in doubt when it may have acted and tether cannot know (a
    `none` write that failed or timed out after it started, or a step its
    run was cut off in). Its idempotency key refuses every retry until this
    says what happened: --not-acted leaves the key failed, so a retry under
    it runs the call again (refused while a timed-out or cut-off call's
    claim is live: it may still be running); --acted --output JSON --app MODULE:ATTR leaves it
    completed with that result, checked by your app, which a retry gets
    instead of acting twice. The answer is recorded in the step's run
    (in_doubt_resolved), also once it has ended. Who may answer is
    approvers: in the tether.yaml read (--config), as for approval requests;
    the run's own principal may not. A step not in doubt, or resolved
    already, is an error (exit 2).

    Example: tether runs resolve run_0190f3a2c4 3 --not-acted --as alice --reason "no charge in the ledger"

    Example: tether runs resolve run_0190f3a2c4 3 --acted --output '{"charge_id": "ch_1"}' --app myapp:app --as alice --reason "ch_1 is in the ledger"
    """
    if not by.strip():
        raise UsageError(
            "--as is empty; give the name of the person who checked (e.g. --as alice)"
        )
    data = None
    if output is not None:
        try:
            data = _canonical.loads_strict(output)
        except _canonical.CanonicalError as exc:
            raise UsageError(
                f"--output is not JSON ({exc}); give the call's result as a JSON "
                'object, e.g. --output \'{"charge_id": "ch_1"}\''
            ) from None
        if not isinstance(data, dict):
            raise UsageError(
                f"--output must be a JSON object, got {type(data).__name__}"
            )
    with _opened(db, config, app) as opened:
        done = _decided(
            lambda: opened.resolve_in_doubt(
                run, step, acted=acted, by=by, reason=reason, output=data
            )
        )
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "run_id": done.run_id,
                "step": done.step,
                "capability": done.capability,
                "acted": done.acted,
                "key": done.key,
                "key_state": done.key_state,
                "seq": done.seq,
            }
        )
        return
    found = "acted" if acted else "did not act"
    line = Text.assemble("run ", _clean(done.run_id), f" step {done.step} ")
    line.append(_clean(f"({done.capability}) {found}, by {by}: {reason}", 300))
    _console().print(line, soft_wrap=True)
    if done.key is None:
        said = "it has no idempotency key: nothing else changes"
    elif done.key_state is None:
        said = f"key {done.key!r} is no longer this step's: left as it is"
    elif done.key_state == "failed":
        said = f"key {done.key!r} is failed: a retry under it runs the call again"
    else:
        said = f"key {done.key!r} is completed: a retry under it gets this result"
    _console().print(Text(_clean(said, 300)), soft_wrap=True)


@_runs_cli.command("export")
def _runs_export(
    run: _RunArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write to FILE instead of stdout (- is stdout).",
            dir_okay=False,
        ),
    ] = None,
    db: _Db = None,
) -> None:
    """Export a run's record as JSON lines: a header, then one line per event.

    The header holds the run, its chain head (`head`, for `tether verify
    --head`) and the declarations of the capabilities it called.

    Example: tether runs export run_0190f3a2c4 -o incident.jsonl
    """
    with _open(db, read_only=True) as app:
        _with_scenario(app, run)
        lines = list(app.export(run))
    data = b"".join(line + b"\n" for line in lines)
    if output is None or str(output) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if not output.parent.is_dir():
        raise UsageError(
            f"cannot write {_clean(output)}: there is no folder "
            f"{_clean(output.parent)!r}; create it first (mkdir -p "
            f"{_clean(shlex.quote(str(output.parent)))}) or choose another -o FILE"
        )
    try:
        output.write_bytes(data)
    except OSError as exc:
        raise UsageError(
            f"cannot write {_clean(output)}: {exc.strerror}; choose another -o FILE"
        ) from exc
    head = _canonical.loads(lines[0]).get("head", "")
    print(f"exported {len(lines) - 1} events to {_clean(output)} (head {head})")


@cli.command("verify")
def _verify(
    run: _RunArg,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            metavar="HASH",
            help="The chain head from an earlier export (64 hex digits); the "
            "record must end exactly there.",
        ),
    ] = None,
    as_json: _Json = False,
    db: _Db = None,
) -> None:
    """Check a run's hash chain and its signed head; exit 1 naming the first bad event.

    Every event's hash covers the one before it, and the chain head is signed
    with the record key (TETHER_RECORD_KEY, else the key file beside the
    database). Limitation: without the record key or an exported head (--head),
    a consistent rewrite of the whole chain by someone with database write
    access cannot be detected; such a run is reported as unanchored.

    A signed run whose record key is not found (no TETHER_RECORD_KEY, no key
    file beside the database, as when only the database was copied) cannot be
    checked: exit 2 saying where the key must be, unless --head is given, in
    which case the chain is checked against it and the signature is reported
    as unchecked. A read never creates a key.

    Example: tether verify run_0190f3a2c4 --head 3fa1...e9
    """
    if head is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", head):
        raise UsageError(
            f"--head must be 64 hex digits (the `head` of an export), got "
            f"{_clean(head, 80)!r}"
        )
    with _open(db, read_only=True) as app:
        row = app.store.get_run(run)
        keyless = app.store.record_key is None and row.head_sig is not None
        if keyless and head is None:
            raise NotFound(_no_key(row.run_id, app.store.url))
        report = app.verify(row.run_id, head=head)
        signed = app.store.record_key is not None and row.head_sig is not None
    anchored = signed or head is not None
    signature = "checked" if signed else "unchecked" if keyless else "unsigned"
    if as_json:
        _emit_json(
            {
                **report.to_json(),
                "format": JSON_FORMAT,
                "anchored": anchored,
                "signature": signature,
            }
        )
    else:
        console = _console()
        if report.ok:
            line = Text("intact ", style="bold green")
            line.append(
                f"run {report.run_id}: {report.events} events, head {report.head}"
            )
            console.print(line, soft_wrap=True)  # one line: scripts grep it
            if keyless:
                console.print(
                    Text(
                        "signature unchecked: no record key was found; the chain "
                        "was checked against the --head given",
                        style="yellow",
                    )
                )
            if not anchored:
                console.print(
                    Text(
                        "unanchored: no record key signs this run and no --head was "
                        "given, so a consistent rewrite of the whole chain would "
                        "also pass",
                        style="yellow",
                    )
                )
        else:
            line = Text("NOT intact ", style="bold red")
            where = (
                ""
                if report.first_bad_seq is None
                else f" (first bad event {report.first_bad_seq})"
            )
            line.append(_clean(f"run {report.run_id}{where}: {report.reason}", 400))
            console.print(line, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def _no_key(run_id: str, url: str) -> str:
    path = sqlite_path(url)
    where = (
        "set TETHER_RECORD_KEY to the key it was signed with"
        if path is None
        else "set TETHER_RECORD_KEY, or copy the key file from beside the "
        f"original database to {path}.key"
    )
    return (
        f"run {run_id}: its head is signed, but no record key was found, so the "
        f"signature cannot be checked (this is not proof of tampering); {where}; "
        "or pass --head HASH from an export to check the chain against that"
    )
