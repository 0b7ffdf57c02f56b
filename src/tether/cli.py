"""The `tether` command line: a thin face over the public API.

Each command parses its flags, calls what a user would call (`Tether`,
`run_agent`, `Tether.verify`, `Tether.export`) and renders the answer: Rich for
people, one JSON document (with a `format` key) for `--json`. Errors are one
line on stderr, `error[<code>] <message>`: exit 2 when the command could not
run, 1 when it ran and the answer is no. Anything an agent controls (args,
outputs, requests, messages) is escaped before it reaches the terminal.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tether import _canonical
from tether._version import __version__
from tether.agent import run_agent
from tether.app import Tether
from tether.config import (
    DEFAULT_DB,
    ConfigProblem,
    check_config,
    check_policy_tests,
    load_settings,
    resolve_config_path,
    resolve_db,
)
from tether.errors import ConfigError, NotFound, TetherError, UsageError
from tether.policy import RuleSet, Verdict
from tether.policy.testing import PolicyTestReport, run_cases
from tether.run import RunState
from tether.scenarios import SCENARIOS
from tether.status import RetryStatus, StatusReport, status
from tether.store import sqlite_path

__all__ = ["JSON_FORMAT", "cli", "main"]

JSON_FORMAT = 1
"""Version of every `--json` document this command prints."""

_OK_STATUSES = ("executed", "dry_run", "idempotent_hit")
_STYLE = {
    "executed": "green",
    "dry_run": "cyan",
    "idempotent_hit": "green",
    "refused": "yellow",
    "invalid": "yellow",
    "failed": "red",
    "in_doubt": "bold red",
    "succeeded": "bold green",
    "failed_run": "bold red",
}
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)
"""Control characters, and the invisible and bidirectional marks that can make a
terminal show something else than the text holds."""

cli = typer.Typer(
    name="tether",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_runs_cli = typer.Typer(rich_markup_mode=None)
cli.add_typer(_runs_cli, name="runs")
_policy_cli = typer.Typer(rich_markup_mode=None)
cli.add_typer(_policy_cli, name="policy")

_Db = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        help=f"Database URL; default: $TETHER_DB, else {DEFAULT_DB}.",
        show_default=False,
    ),
]
_Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout.")
]
_RunArg = Annotated[
    str,
    typer.Argument(
        help="A run id, or a unique prefix of 6+ characters.", show_default=False
    ),
]


# -- escaping and small formatting ------------------------------------------------------


def _clean(value: object, limit: int | None = None) -> str:
    """Return `value` as text safe for a terminal: control characters escaped.

    Args:
        value: anything; non-text is converted with `str`.
        limit: cut to this many characters (with an ellipsis), when given.
    """
    text = value if isinstance(value, str) else str(value)
    text = _UNSAFE.sub(_escape_char, text)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _brief(value: object, limit: int = 60) -> str:
    """Return a short one-line view of an output or args mapping."""
    if isinstance(value, Mapping):
        parts = []
        for key, item in value.items():
            if isinstance(item, Mapping):
                shown = "{…}"
            elif isinstance(item, list):
                shown = f"[{len(item)} items]"
            else:
                shown = str(item)
            parts.append(f"{key}={shown}")
        return _clean(" ".join(parts), limit)
    return _clean(value, limit)


def _ms(duration_us: int | None) -> str:
    if duration_us is None:
        return ""
    if duration_us >= 1_000_000:
        return f"{duration_us / 1_000_000:.2f} s"
    return f"{duration_us / 1000:.1f} ms"


def _console() -> Console:
    console = Console(highlight=False, soft_wrap=False, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # a pipe or a file has no width; 80 would cut the timeline
    return console


def _emit_json(doc: Mapping[str, Any]) -> None:
    # ensure_ascii: every non-ASCII and control character leaves as an escape,
    # so a terminal showing the document cannot be steered by agent text.
    print(json.dumps(doc, indent=2, default=str))


def _styled(status: str | None) -> Text:
    text = _clean(status or "")
    return Text(text, style=_STYLE.get(text, ""))


# -- opening the app ----------------------------------------------------------------------


@contextmanager
def _open(db: str | None, *, must_exist: bool = False) -> Iterator[Tether]:
    url = resolve_db(db)
    path = sqlite_path(url)
    if must_exist and path and not Path(path).is_file():
        raise NotFound(
            f"no database at {path}; run `tether demo` first or pass --db "
            "(or set TETHER_DB)"
        )
    with Tether(db=url) as app:
        yield app


def _with_scenario(app: Tether, run_id: str) -> None:
    """Register the capabilities of the built-in scenario a run came from, if any.

    Export and the timeline then know each capability's declaration and effect.
    """
    events = app.store.events(app.store.get_run(run_id).run_id)
    if not events:
        return
    first = events[0].data()
    context = first.get("context")
    name = context.get("scenario") if isinstance(context, Mapping) else None
    scenario = SCENARIOS.get(name) if isinstance(name, str) else None
    if scenario is not None:
        scenario.setup(app)


# -- reading a run back -----------------------------------------------------------------


def _step_status(event: Mapping[str, Any]) -> str:
    stage = event.get("stage")
    if event.get("error_code") == "in_doubt":
        return "in_doubt"
    if stage in ("validate", "resolve"):
        return "invalid"
    if stage in ("execute", "output"):
        return "failed"
    return "refused"


def _timeline(app: Tether, run_id: str) -> dict[str, Any]:
    """Return a run, its steps and its events as one JSON-ready document.

    Raises:
        NotFound: no such run.
    """
    row = app.store.get_run(run_id)
    events = [
        {**ev.data(), "hash": ev.hash.hex()} for ev in app.store.events(row.run_id)
    ]
    steps: dict[int, dict[str, Any]] = {}
    proposed: list[object] = []
    answer = message = None
    for ev in events:
        kind = ev.get("kind")
        if kind == "plan_proposed":
            proposed = list(ev.get("steps") or [])
            if ev.get("finish"):
                answer = ev.get("answer")
        elif kind == "run_finished":
            message = ev.get("message")
        number = ev.get("step")
        if not isinstance(number, int):
            continue
        step = steps.get(number)
        if step is None:
            first = proposed.pop(0) if proposed else None
            plan: Mapping[str, Any] = first if isinstance(first, Mapping) else {}
            step = steps[number] = {
                "step": number,
                "capability": plan.get("capability"),
                "version": None,
                "effect": None,
                "args": plan.get("args"),
                "rationale": plan.get("rationale"),
                "decision": None,
                "status": None,
                "duration_ms": None,
                "output": None,
                "error_code": None,
                "error": None,
            }
        _apply(step, ev)
    for step in steps.values():
        try:
            step["effect"] = app.capabilities.get(str(step["capability"])).effect.value
        except NotFound:
            step["effect"] = None  # recorded under a capability this app lacks
    return {
        "run_id": row.run_id,
        "status": row.status,
        "tenant": row.tenant,
        "principal": row.principal_id,
        "request": row.request,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "error_code": row.error_code,
        "message": message,
        "answer": answer,
        "head_seq": row.head_seq,
        "head": row.head_hash.hex(),
        "steps": [steps[n] for n in sorted(steps)],
        "events": events,
    }


def _apply(step: dict[str, Any], ev: Mapping[str, Any]) -> None:
    kind = ev.get("kind")
    if kind == "validated":
        step["capability"] = ev.get("capability")
        step["version"] = ev.get("version")
        step["args"] = ev.get("args")
    elif kind == "decided":
        step["decision"] = ev.get("verdict")
    elif kind == "executed":
        step["status"] = "dry_run" if ev.get("dry_run") else "executed"
        step["output"] = ev.get("output")
        step["duration_ms"] = _duration_ms(ev)
    elif kind == "idempotent_hit":
        step["status"] = "idempotent_hit"
        step["output"] = ev.get("output")
    elif kind == "failed":
        step["status"] = _step_status(ev)
        step["error_code"] = ev.get("error_code")
        step["error"] = ev.get("message")
        step["duration_ms"] = _duration_ms(ev)
    elif kind == "in_doubt":
        step["status"] = "in_doubt"
        step["error_code"] = "in_doubt"
        step["error"] = ev.get("message")
        step["duration_ms"] = _duration_ms(ev)


def _duration_ms(ev: Mapping[str, Any]) -> float | None:
    us = ev.get("duration_us")
    return None if not isinstance(us, int) else round(us / 1000, 3)


def _steps_table(steps: Sequence[Mapping[str, Any]], width: int) -> Table:
    rows = []
    for s in steps:
        duration = s["duration_ms"]
        rows.append(
            [
                str(s["step"]),
                _clean(s["capability"] or "?", 40),
                _clean(s["effect"] or "?"),
                _clean(s["decision"] or "-"),
                _clean(s["status"] or "?"),
                _ms(None if duration is None else int(duration * 1000)),
            ]
        )
    headers = ["#", "capability", "effect", "decision", "status", "duration"]
    fixed = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    # The output column alone gives way on a narrow terminal: cut it to what is left
    # (two spaces between columns), so the table never wraps or squeezes the rest.
    room = max(width - sum(fixed) - 2 * len(fixed), 12)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header in headers:
        table.add_column(
            header,
            no_wrap=True,
            justify="right" if header in ("#", "duration") else "left",
        )
    table.add_column("output", no_wrap=True)
    for s, row in zip(steps, rows, strict=True):
        if s["status"] in _OK_STATUSES:
            out = _brief(s["output"], room)
        else:
            out = _clean(f"{s['error_code']}: {s['error']}", room)
        table.add_row(
            *(Text(cell) for cell in row[:4]),
            _styled(row[4]),
            row[5],
            Text(out),
        )
    return table


def _event_detail(ev: Mapping[str, Any]) -> str:  # one line per kind
    kind = ev.get("kind")
    if kind == "run_started":
        principal = ev.get("principal")
        if not isinstance(principal, Mapping):
            return ""
        return f"by {principal.get('id')} (tenant {principal.get('tenant')})"
    if kind == "run_status":
        return f"{ev.get('previous')} -> {ev.get('status')}"
    if kind == "plan_proposed":
        names = ", ".join(
            str(s.get("capability") if isinstance(s, Mapping) else s)
            for s in ev.get("steps") or []
        )
        done = f"finish: {ev.get('answer')}" if ev.get("finish") else ""
        return " ".join(p for p in (names, done) if p) or "(nothing)"
    if kind == "validated":
        return (
            f"{ev.get('capability')}@{ev.get('version')} {_brief(ev.get('args'), 200)}"
        )
    if kind == "precondition_checked":
        checks = ", ".join(str(c) for c in ev.get("checks") or [])
        if ev.get("failed"):
            return f"{ev.get('failed')} failed: {ev.get('reason')}"
        return f"held: {checks}" if checks else "none"
    if kind == "decided":
        rules = ", ".join(str(r) for r in ev.get("rule_ids") or []) or "default"
        reasons = "; ".join(str(r) for r in ev.get("reasons") or [] if r)
        why = f": {reasons}" if reasons else ""
        return f"{ev.get('verdict')} ({rules}; policy {ev.get('policy_version')}){why}"
    if kind == "plan_admitted":
        verdicts = ", ".join(
            f"{s.get('capability')}={s.get('error_code') or s.get('verdict')}"
            for s in ev.get("steps") or []
            if isinstance(s, Mapping)
        )
        left = ev.get("budget_left")
        budget = "" if left is None else f"; budget left {left}"
        return f"{ev.get('status')}: {verdicts} (cost {ev.get('total_cost')}{budget})"
    if kind == "intent":
        key = ev.get("key")
        return f"{ev.get('capability')}" + (f" key={key}" if key else "")
    if kind == "executed":
        dry = "dry run " if ev.get("dry_run") else ""
        return f"{dry}{_ms(ev.get('duration_us'))} {_brief(ev.get('output'), 200)}"
    if kind == "failed":
        return f"{ev.get('stage')}: {ev.get('error_code')}: {ev.get('message')}"
    if kind == "idempotent_hit":
        return (
            f"stored result of {ev.get('original_run')} step {ev.get('original_step')}"
        )
    if kind == "run_finished":
        code = ev.get("error_code")
        return f"{ev.get('status')}" + (
            f" ({code}: {ev.get('message')})" if code else ""
        )
    rest = {
        k: v for k, v in ev.items() if k not in ("kind", "seq", "at", "step", "hash")
    }
    return _canonical.dumps(rest).decode()


def _events_table(events: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("seq", justify="right")
    table.add_column("time")
    table.add_column("step", justify="right")
    table.add_column("event")
    table.add_column("detail", overflow="fold")
    for ev in events:
        at = str(ev.get("at", ""))
        table.add_row(
            Text(_clean(ev.get("seq"))),
            Text(_clean(at[11:23] if len(at) >= 23 else at)),
            Text("" if ev.get("step") is None else _clean(ev.get("step"))),
            Text(_clean(ev.get("kind"))),
            Text(_clean(_event_detail(ev), 300)),
        )
    return table


def _summary(doc: Mapping[str, Any]) -> Text:
    status = str(doc["status"])
    line = Text("run ")
    line.append(_clean(doc["run_id"]), style="bold")
    line.append(" ")
    line.append(
        status,
        style=_STYLE["succeeded"] if status == "succeeded" else _STYLE["failed_run"],
    )
    line.append(f" · {len(doc['steps'])} steps · {doc['head_seq']} events")
    if doc.get("error_code"):
        line.append(
            _clean(f" · {doc['error_code']}: {doc.get('message') or ''}", 200),
            style="red",
        )
    return line


def _field(console: Console, label: str, value: object, limit: int = 400) -> None:
    line = Text(f"{label:<10}", style="dim")
    line.append(_clean(value, limit))
    console.print(line)


# -- commands ---------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        print(f"tether {__version__}")
        raise typer.Exit


def _help_if_bare(ctx: typer.Context) -> None:
    # A bare `tether` or `tether runs` asks what there is: answer with the help.
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit


@cli.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """tether: the runtime control plane for production AI agents.

    Commands that read the database take --db URL and prints one JSON document with --json.
    Errors are one line on stderr: exit 2 when a command could not run, 1 when
    it ran and the answer is no.

    Example: tether demo
    """
    _help_if_bare(ctx)


@_runs_cli.callback(invoke_without_command=True)
def _runs(ctx: typer.Context) -> None:
    """List, show and export recorded runs.

    Example: tether runs list --limit 5
    """
    _help_if_bare(ctx)


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
        run = run_agent(
            app,
            chosen.planner(),
            principal=chosen.principal,
            request=chosen.request,
            context=chosen.context,
        )
        doc = _timeline(app, run.id)
        url = app.store.url  # the store's URL carries no secrets
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
            }
        )
    else:
        console = _console()
        console.print(Text(f"{chosen.name}: {chosen.description}", style="bold"))
        _field(console, "request", doc["request"])
        _field(console, "agent", _principal_line(chosen.principal.describe()))
        console.print()
        console.print(_steps_table(doc["steps"], console.width))
        console.print()
        if doc["answer"]:
            _field(console, "answer", doc["answer"])
        console.print(_summary(doc))
        db_flag = "" if db is None else f" --db {db}"
        _field(console, "verify", f"tether verify {doc['run_id']}{db_flag}")
        _field(console, "inspect", f"tether runs show {doc['run_id']}{db_flag}")
        if db is None:
            _field(console, "database", url)
    if doc["status"] != RunState.SUCCEEDED.value:
        raise typer.Exit(1)


def _principal_line(principal: Mapping[str, Any]) -> str:
    who = f"{principal.get('id')} (tenant {principal.get('tenant')}"
    if principal.get("on_behalf_of"):
        who += f", on behalf of {principal.get('on_behalf_of')}"
    return who + ")"


@_runs_cli.command("list")
def _runs_list(
    limit: Annotated[
        int,
        typer.Option(
            "--limit", "-n", min=1, max=10_000, help="At most this many runs."
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
    with _open(db, must_exist=True) as app:
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
        console.print("no runs yet; try `tether demo`")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("run", "status", "created (UTC)", "principal", "events", "request"):
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    for item in items:
        table.add_row(
            Text(_clean(item["run_id"])),
            _styled(item["status"]),
            Text(_clean(_short_time(item["created_at"]))),
            Text(_clean(item["principal"], 30)),
            Text(str(item["events"])),
            Text(_clean(item["request"], 50)),
        )
    console.print(table)


def _short_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


@_runs_cli.command("show")
def _runs_show(
    run: _RunArg,
    as_json: _Json = False,
    db: _Db = None,
) -> None:
    """Show a run: who asked what, each step's decision and outcome, every event.

    Example: tether runs show run_0190f3a2c4
    """
    with _open(db, must_exist=True) as app:
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


@_runs_cli.command("export")
def _runs_export(
    run: _RunArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write to FILE instead of stdout.",
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
    with _open(db, must_exist=True) as app:
        _with_scenario(app, run)
        lines = list(app.export(run))
    data = b"".join(line + b"\n" for line in lines)
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
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

    Example: tether verify run_0190f3a2c4 --head 3fa1...e9
    """
    if head is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", head):
        raise UsageError(
            f"--head must be 64 hex digits (the `head` of an export), got "
            f"{_clean(head, 80)!r}"
        )
    with _open(db, must_exist=True) as app:
        row = app.store.get_run(run)
        report = app.verify(row.run_id, head=head)
        signed = app.store.record_key is not None and row.head_sig is not None
    anchored = signed or head is not None
    if as_json:
        _emit_json({**report.to_json(), "format": JSON_FORMAT, "anchored": anchored})
    else:
        console = _console()
        if report.ok:
            line = Text("intact ", style="bold green")
            line.append(
                f"run {report.run_id}: {report.events} events, head {report.head}"
            )
            console.print(line)
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
            console.print(line)
    if not report.ok:
        raise typer.Exit(1)


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
        url = resolve_db(db)
        path = resolve_config_path(config)
        sqlite = sqlite_path(url)
        read = url
        if sqlite and not Path(sqlite).is_file():
            settings, _ = load_settings(path)
            if settings.limits or settings.breakers or settings.retry_budget:
                raise NotFound(
                    f"no database at {sqlite}; pass --db (or set TETHER_DB) to "
                    "the database your app records to"
                )
            read = "memory://"  # nothing configured, nothing recorded: not created
        with Tether(db=read, config=path) as opened:
            report = status(opened)
            if read == url:
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
        return
    _field(console, "as of", f"{_utc(report.at)} UTC")
    _field(console, "config", report.config or "(none)")
    _field(console, "database", url)
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


# -- policy ----------------------------------------------------------------------------

_PolicyFile = Annotated[
    Path,
    typer.Argument(
        metavar="FILE", help="The policy file (tether.yaml).", show_default=False
    ),
]
_TestFile = Annotated[
    Path,
    typer.Argument(
        metavar="FILE",
        help="The policy test file (tether.test.yaml).",
        show_default=False,
    ),
]


_App = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance, as uvicorn names an app (myapp:app); "
        "cases are then decided as real steps of its capabilities, with its "
        "Python policies.",
        show_default=False,
    ),
]


def _load_app(spec: str) -> Tether:
    """Import `MODULE:ATTR` (the current folder first on `sys.path`); return the app.

    Raises:
        UsageError: the value is malformed, the module or attribute is missing,
            or it is not a `tether.Tether`.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(
            f"--app {spec!r}: write MODULE:ATTR, e.g. myapp:app (the module and "
            "the name of your tether.Tether in it)"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise UsageError(
                f"--app {spec!r}: no module {module_name!r} in {cwd} or on the "
                "path; run from the folder that holds it"
            ) from exc
        raise UsageError(
            f"--app {spec!r}: importing {module_name!r} failed: {exc}"
        ) from exc
    except TetherError:
        raise  # the app's own setup failed (a bad tether.yaml, ...): its own code
    except Exception as exc:  # user code ran: report it in one line
        raise UsageError(
            f"--app {spec!r}: importing {module_name!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    value: object = module
    for name in attr.split("."):
        if not hasattr(value, name):
            raise UsageError(
                f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}"
            )
        value = getattr(value, name)
    if not isinstance(value, Tether):
        raise UsageError(
            f"--app {spec!r}: {attr!r} is a {type(value).__name__}, not a "
            "tether.Tether; name the app instance"
        )
    return value


@_policy_cli.callback(invoke_without_command=True)
def _policy(ctx: typer.Context) -> None:
    """Check and test policy files before they ship.

    Example: tether policy check tether.yaml
    """
    _help_if_bare(ctx)


def _problems_found(
    problems: Sequence[ConfigProblem], as_json: bool, doc: Mapping[str, Any]
) -> typer.Exit:
    """Print each problem (one line each, or in the JSON document); return exit 1."""
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                **doc,
                "ok": False,
                "errors": [p.to_json() for p in problems],
            }
        )
    else:
        for problem in problems:
            _error(ConfigError.code, str(problem))
    return typer.Exit(1)


@_policy_cli.command("check")
def _policy_check(file: _PolicyFile, as_json: _Json = False) -> None:
    """Validate a policy file and compile its conditions; exit 1 listing every problem.

    On success prints the number of rules, how many take each decision, the
    defaults per effect and the policy version decisions will record. Each
    problem is one line on stderr: FILE:LINE: where in the file: what is wrong.

    Example: tether policy check tether.yaml
    """
    checked = check_config(file)
    if checked.value is None:
        raise _problems_found(checked.problems, as_json, {"file": str(file)})
    settings = checked.value
    RuleSet(settings.rules)  # compile and index exactly as the app will
    counts = {verdict.value: 0 for verdict in Verdict}
    for rule in settings.rules:
        counts[rule.decision.value] += 1
    defaults = settings.defaults.model_dump(mode="json")
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "file": str(file),
                "ok": True,
                "version": checked.version,
                "rules": len(settings.rules),
                "decisions": counts,
                "defaults": defaults,
                "errors": [],
            }
        )
        return
    console = _console()
    line = Text("ok ", style="bold green")
    rules = len(settings.rules)
    line.append(
        _clean(f"{file}: {rules} rule{'' if rules == 1 else 's'}, policy version ")
    )
    line.append(str(checked.version), style="bold")
    console.print(line)
    _field(console, "decisions", " · ".join(f"{v} {n}" for v, n in counts.items()))
    _field(console, "defaults", " · ".join(f"{e} {v}" for e, v in defaults.items()))


@_policy_cli.command("test")
def _policy_test(file: _TestFile, app: _App = None, as_json: _Json = False) -> None:
    """Run policy unit tests written in YAML; exit 1 if a case fails.

    The test file names the policy it tests (policy: tether.yaml, relative to
    the test file) and lists cases: each is one step (capability, effect,
    scopes, args, principal, context, run) and the decision it expects
    (expect: {decision: deny, rules: [rule-id]}). Cases are decided as the app
    decides them: scopes first, then the rules, then the defaults per effect.

    With --app, each case is a real step of the app's capability: its args are
    validated and recorded as the gateway records them, its effect, scopes and
    version are the capability's, and the app's Python policies take part,
    beside the rules of the policy file the test file names. A case that cannot
    be such a step (unknown capability, invalid args) fails. See docs/policy.md.

    Example: tether policy test tether.test.yaml --app myapp:app
    """
    loaded = None if app is None else _load_app(app)
    checked = check_policy_tests(file)
    if checked.value is None:
        raise _problems_found(checked.problems, as_json, {"file": str(file)})
    tests = checked.value
    policy_checked = check_config(tests.policy)
    if policy_checked.value is None:
        doc = {"file": str(file), "policy": str(tests.policy)}
        raise _problems_found(policy_checked.problems, as_json, doc)
    with Tether(db="memory://", config=tests.policy, env={}) as from_file:
        policy = from_file.policy
    own_rules = False
    if loaded is not None:
        own_rules = loaded.config_path is not None and _same_file(
            loaded.config_path, tests.policy
        )
        if own_rules:
            policy = loaded.current_policy()
        else:  # the app's Python policies, the test file's rules
            policy = loaded.current_policy().replace(
                rules=policy.rules, defaults=policy.defaults, version=policy.version
            )
    report = run_cases(
        policy, tests, capabilities=None if loaded is None else loaded.capabilities
    )
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "file": str(file),
                "policy": str(tests.policy),
                "policy_version": report.policy_version,
                **({} if app is None else {"app": app}),
                "ok": report.ok,
                "passed": report.passed,
                "failed": report.failed,
                "cases": [
                    {
                        "name": r.case.name,
                        "expected": {
                            "decision": r.case.expect.decision.value,
                            "rules": None
                            if r.case.expect.rules is None
                            else list(r.case.expect.rules),
                        },
                        "got": None
                        if r.decision is None
                        else {
                            "decision": r.decision.verdict.value,
                            "rules": list(r.decision.rule_ids),
                            "reasons": list(r.decision.reasons),
                        },
                        **({} if r.problem is None else {"problem": r.problem}),
                        "passed": r.passed,
                    }
                    for r in report.results
                ],
                "errors": [],
            }
        )
    else:
        note = None
        if loaded is not None:
            note = f"{app}: its capabilities and Python policies" + (
                ""
                if own_rules
                else f"; rules from the policy above, not the app's "
                f"{loaded.config_path or '(no policy file)'}"
            )
        _print_policy_report(file, tests.policy, report, app=note)
    if not report.ok:
        raise typer.Exit(1)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _print_policy_report(
    file: Path, policy: Path, report: PolicyTestReport, *, app: str | None = None
) -> None:
    console = _console()
    _field(console, "tests", file)
    _field(console, "policy", f"{policy} ({report.policy_version})")
    if app is not None:
        _field(console, "app", app)
    console.print()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("case", "expected", "got", "rules", "result"):
        table.add_column(name, overflow="fold")
    for r in report.results:
        expected = r.case.expect.decision.value
        if r.case.expect.rules is not None:
            expected += f" [{', '.join(r.case.expect.rules) or 'default'}]"
        got = r.decision
        table.add_row(
            Text(_clean(r.case.name, 60)),
            Text(_clean(expected, 60)),
            Text("error") if got is None else Text(_clean(got.verdict.value)),
            Text("")
            if got is None
            else Text(_clean(", ".join(got.rule_ids) or "default", 60)),
            Text("pass", style="green") if r.passed else Text("FAIL", style="bold red"),
        )
    console.print(table)
    for r in report.results:
        if r.problem is not None:
            detail = Text("FAIL ", style="bold red")
            detail.append(_clean(f"{r.case.name}: {r.problem}", 400))
            console.print(detail)
        elif r.decision is not None and not r.passed and r.decision.reasons:
            detail = Text("FAIL ", style="bold red")
            detail.append(
                _clean(f"{r.case.name}: {'; '.join(r.decision.reasons)}", 400)
            )
            console.print(detail)
    console.print()
    summary = Text(
        f"{report.passed} passed, {report.failed} failed",
        style="bold green" if report.ok else "bold red",
    )
    console.print(summary)


# -- entry point -----------------------------------------------------------------------


def _error(code: str, message: str) -> None:
    text = _clean(" ".join(message.split()))  # one line, whatever the message held
    sys.stderr.write(f"error[{_clean(code, 60)}] {text}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `tether` command and return its exit code.

    Exit codes: 0 done, 1 the command ran and the answer is no (`verify` found
    a bad record, `demo` did not succeed), 2 the command could not run.
    """
    command = typer.main.get_command(cli)
    debug = os.environ.get("TETHER_DEBUG") == "1"
    try:
        result = command.main(
            args=list(sys.argv[1:] if argv is None else argv),
            prog_name="tether",
            standalone_mode=False,
        )
    except typer.TyperException as exc:
        # Click's usage errors (typer vendors Click; they derive from this class).
        where = getattr(getattr(exc, "ctx", None), "command_path", None) or "tether"
        _error("usage_error", f"{where}: {exc.format_message()} (see {where} --help)")
        return 2
    except typer.Abort:
        _error("interrupted", "stopped before finishing")
        return 130
    except TetherError as exc:
        if debug:
            traceback.print_exc()
        _error(exc.code, exc.message)
        return 2
    except OSError as exc:
        if debug:
            traceback.print_exc()
        _error("io_error", f"{exc.strerror or exc}: {exc.filename or ''}".strip(": "))
        return 2
    except Exception as exc:  # noqa: BLE001  # the last line of defence: one line, not a trace
        if debug:
            traceback.print_exc()
        _error(
            "internal",
            f"{type(exc).__name__}: {exc} (a bug in tether; set TETHER_DEBUG=1 for "
            "the traceback and report it)",
        )
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover  # `python -m tether.cli`
    sys.exit(main())
