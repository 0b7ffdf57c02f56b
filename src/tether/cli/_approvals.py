"""`tether approvals ...`: list, show, approve and deny approval requests."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tether import _canonical
from tether.app import Tether
from tether.cli._common import (
    JSON_FORMAT,
    _clean,
    _console,
    _Db,
    _decided,
    _emit_json,
    _fitted_table,
    _help_if_bare,
    _Json,
    _opened,
    cli,
)
from tether.errors import UsageError
from tether.principal import check_text
from tether.store import ApprovalRow, ApprovalStatus

__all__: list[str] = []  # commands register on `cli` on import

_approvals_cli = typer.Typer(rich_markup_mode=None)
cli.add_typer(_approvals_cli, name="approvals")

_STATUSES = ", ".join(s.value for s in ApprovalStatus)
_STATUS_STYLE = {
    "pending": "yellow",
    "approved": "green",
    "used": "green",
    "denied": "red",
    "expired": "dim",
}
_IdArg = Annotated[
    str,
    typer.Argument(
        metavar="ID",
        help="An approval request id, or a unique prefix of 6+ characters.",
        show_default=False,
    ),
]
_Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="The tether.yaml whose approvers: may decide; default: "
        "$TETHER_CONFIG, else ./tether.yaml.",
        dir_okay=False,
        show_default=False,
    ),
]
_AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance (myapp:app): its database, tether.yaml "
        "and clock are used instead of --db and --config.",
        show_default=False,
    ),
]
_As = Annotated[
    str,
    typer.Option(
        "--as",
        metavar="NAME",
        help="Who decides: a name under approvers: in tether.yaml.",
        show_default=False,
    ),
]


@_approvals_cli.callback(invoke_without_command=True)
def _approvals(ctx: typer.Context) -> None:
    """List, show, approve and deny the requests of steps that need a person.

    Example: tether approvals list --status pending
    """
    _help_if_bare(ctx)


# -- opening the app --------------------------------------------------------------------


# -- the document ------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _document(row: ApprovalRow) -> dict[str, Any]:
    """Return an approval request as the JSON-ready mapping `--json` prints."""
    return row.describe()


def _history(app: Tether, row: ApprovalRow) -> list[dict[str, Any]]:
    """Return the requesting run's events about this request, in record order."""
    found = []
    for event in app.store.events(row.run_id):
        data = event.data()
        if data.get("approval_id") == row.id:
            found.append(data)
    return found


# -- rendering --------------------------------------------------------------------------


def _utc(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _minute(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M")


def _styled(status: ApprovalStatus) -> Text:
    return Text(status.value, style=_STATUS_STYLE.get(status.value, ""))


def _requester(row: ApprovalRow) -> str:
    who = row.principal_id
    if row.on_behalf_of:
        who += f" for {row.on_behalf_of}"
    return who


def _roles(row: ApprovalRow) -> str:
    return ", ".join(row.approvers) if row.approvers else "any approver"


def _line(console: Console, label: str, value: object, limit: int = 400) -> None:
    line = Text(f"{label:<13}", style="dim")
    line.append(_clean(value, limit))
    console.print(line)


def _block(console: Console, label: str, value: object) -> None:
    """Print `value` as indented JSON under `label`, each line escaped."""
    console.print(Text(label, style="dim"))
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    for line in text.splitlines():
        console.print(Text("  " + _clean(line, 2000)))


def _decision_line(row: ApprovalRow) -> str:
    if row.status is ApprovalStatus.PENDING:
        return "undecided"
    if row.status is ApprovalStatus.EXPIRED:
        if row.decided_by is not None and row.decided_at is not None:
            # closed early, undecided: its run was aborted (`Tether.abort`)
            return f"closed undecided by {row.decided_by} at {_utc(row.decided_at)} UTC"
        return f"expired undecided at {_utc(row.expires_at)} UTC"
    verb = "approved" if row.status is ApprovalStatus.USED else row.status.value
    return f"{verb} by {row.decided_by} at {_utc(row.decided_at)} UTC"


def _print_request(console: Console, row: ApprovalRow, history: list[Any]) -> None:
    line = Text("approval request ")
    line.append(_clean(row.id), style="bold")
    line.append(" ")
    line.append(_styled(row.status))
    console.print(line)
    _line(console, "run", f"{row.run_id} step {row.step}")
    _line(console, "capability", f"{row.capability} (version {row.version})")
    who = f"{row.principal_id} (tenant {row.tenant}"
    if row.on_behalf_of:
        who += f", on behalf of {row.on_behalf_of}"
    _line(console, "requested by", who + ")")
    if row.rule_ids:
        for rule_id, reason in zip(row.rule_ids, row.reasons, strict=False):
            _line(console, "rule", f"{rule_id}: {reason}")
    else:
        _line(console, "rule", "none: the default for the capability's effect")
    _line(console, "approvers", _roles(row))
    _line(console, "policy", row.policy_version)
    _line(console, "created", f"{_utc(row.created_at)} UTC")
    _line(console, "expires", f"{_utc(row.expires_at)} UTC")
    _line(console, "decision", _decision_line(row))
    if row.note is not None:
        label = "reason" if row.status is ApprovalStatus.DENIED else "note"
        _line(console, label, row.note, 2000)
    if row.status is ApprovalStatus.USED:
        _line(console, "grant", "spent by the call it was made for")
    _block(console, "args (secrets masked)", _canonical.loads(row.args))
    if row.preview is None:
        _line(console, "preview", "none: the capability has no dry-run handler")
    else:
        _block(
            console,
            "preview (what the dry run said the call would do)",
            _canonical.loads(row.preview),
        )
    if history:
        console.print(Text("events in the run's record", style="dim"))
        for ev in history:
            console.print(Text("  " + _clean(_event_line(ev), 400)))


def _event_line(ev: Mapping[str, Any]) -> str:
    at = str(ev.get("at", ""))[:19].replace("T", " ")
    seq = ev.get("seq")
    kind = ev.get("kind")
    if kind == "approval_requested":
        detail = f"for step {ev.get('step')}"
    elif kind == "approval_decided":
        detail = f"{ev.get('outcome')} by {ev.get('by')}"
        why = ev.get("reason") or ev.get("note")
        if why:
            detail += f": {why}"
    elif kind == "approval_used":
        detail = f"step {ev.get('step')} ran under it"
    else:
        detail = ""
    return f"{seq:>4} {at} {kind} {detail}".rstrip()


_COLUMNS = (
    ("id", None), ("status", None), ("capability", 8), ("run", 9), ("step", None),
    ("requested by", 9), ("created (UTC)", 10), ("expires (UTC)", 10),
    ("approvers", 9),
)  # fmt: skip
"""The list's columns, each with how narrow it may get (None: never narrower
than its text). Ids stay whole: they are what `show` and `approve` take; names
fold and times wrap at their space."""
_GIVE_WAY = (
    "run",
    "created (UTC)",
    "expires (UTC)",
    "requested by",
    "approvers",
    "capability",
)
"""On a narrow terminal, which columns narrow first (each to its minimum)."""


def _table(rows: list[ApprovalRow], width: int) -> Table:
    """Return the list as a table that fits `width` where it can."""
    cells = [
        [
            _clean(r.id),
            r.status.value,
            _clean(r.capability, 60),
            _clean(r.run_id),
            str(r.step),
            _clean(_requester(r), 60),
            _minute(r.created_at),
            _minute(r.expires_at),
            _clean(_roles(r), 60),
        ]
        for r in rows
    ]
    table, _ = _fitted_table(
        _COLUMNS,
        _GIVE_WAY,
        cells,
        width,
        status=lambda s: Text(s, style=_STATUS_STYLE.get(s, "")),
        right="step",
    )
    return table


# -- commands ---------------------------------------------------------------------------


@_approvals_cli.command("list")
def _approvals_list(
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help=f"Only requests in this status: {_STATUSES}.",
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            "-n",
            metavar="N",
            min=1,
            max=10_000,
            help="At most this many requests.",
        ),
    ] = 50,
    as_json: _Json = False,
    db: _Db = None,
    config: _Config = None,
    app: _AppOption = None,
) -> None:
    """List approval requests, newest first.

    A pending request past its expiry is listed as expired: it can no longer be
    decided, and the step asks again when it is retried.

    Example: tether approvals list --status pending --limit 10
    """
    if status is not None and status not in {s.value for s in ApprovalStatus}:
        raise UsageError(
            f"unknown status {_clean(status, 40)!r}; use one of: {_STATUSES}"
        )
    with _opened(db, config, app, read_only=True) as opened:
        rows = opened.approvals(status=status, limit=limit)
    if as_json:
        _emit_json({"format": JSON_FORMAT, "approvals": [_document(r) for r in rows]})
        return
    console = _console()
    if not rows:
        which = "" if status is None else f"{status} "
        console.print(f"no {which}approval requests")
        return
    console.print(_table(rows, console.width))


@_approvals_cli.command("show")
def _approvals_show(
    approval: _IdArg,
    as_json: _Json = False,
    db: _Db = None,
    config: _Config = None,
    app: _AppOption = None,
) -> None:
    """Show one approval request: the call, its preview, why, who may decide, its fate.

    The args are shown as recorded (secrets masked); the preview is what the
    capability's dry-run handler said the call would do. Then the events about
    the request in the requesting run's record, refused attempts included.

    Example: tether approvals show apr_0190f3a2c4
    """
    with _opened(db, config, app, read_only=True) as opened:
        row = opened.approval(approval)
        history = _history(opened, row)
    if as_json:
        _emit_json(
            {"format": JSON_FORMAT, "approval": _document(row), "events": history}
        )
        return
    _print_request(_console(), row, history)


@_approvals_cli.command("approve")
def _approvals_approve(
    approval: _IdArg,
    by: _As,
    note: Annotated[
        str | None,
        typer.Option(
            "--note", metavar="TEXT", help="Why, for the record.", show_default=False
        ),
    ] = None,
    as_json: _Json = False,
    db: _Db = None,
    config: _Config = None,
    app: _AppOption = None,
) -> None:
    """Approve a pending request: the call it was made for may then run once.

    The grant is bound to that exact call (capability and version, args,
    policy version, preview) and spent by the first call that matches: the
    agent's next attempt of the call runs under it. The decision is recorded
    in the requesting run. Who may decide is approvers: in the tether.yaml
    read (--config, else $TETHER_CONFIG, else ./tether.yaml), or your app's
    (--app).

    Exit 0 when the decision is recorded. Exit 1 when the command ran and the
    answer is no, with one line on stderr: NAME may not decide this request
    (not_an_approver: the requester or whom it acts for, not under approvers:,
    or without a role the rules ask for), or the request is already decided,
    used or expired (approval_closed); the attempt is recorded in the
    requesting run too. Exit 2 when it could not run: no such request
    (not_found), a bad flag, database or tether.yaml.

    Example: tether approvals approve apr_0190f3a2c4 --as alice --note "ticket 42"
    """
    by = _decider(by)
    with _opened(db, config, app) as opened:
        row = _decided(lambda: opened.approve(approval, by=by, note=note))
    _print_decision(row, by, as_json)


@_approvals_cli.command("deny")
def _approvals_deny(
    approval: _IdArg,
    by: _As,
    reason: Annotated[
        str,
        typer.Option(
            "--reason",
            metavar="TEXT",
            help="Why not (required): the agent and the record get it.",
            show_default=False,
        ),
    ],
    as_json: _Json = False,
    db: _Db = None,
    config: _Config = None,
    app: _AppOption = None,
) -> None:
    """Deny a pending request: the call it was made for is refused with the reason.

    The same call asked again stays denied; a changed call (other args) makes
    a new request. The decision is recorded in the requesting run. Who may
    decide is approvers: in the tether.yaml read (--config, else
    $TETHER_CONFIG, else ./tether.yaml), or your app's (--app).

    Exit 0 when the decision is recorded. Exit 1 when the command ran and the
    answer is no, with one line on stderr: NAME may not decide this request
    (not_an_approver), or the request is already decided, used or expired
    (approval_closed); the attempt is recorded in the requesting run too.
    Exit 2 when it could not run: no such request (not_found), an empty
    reason, a bad flag, database or tether.yaml.

    Example: tether approvals deny apr_0190f3a2c4 --as alice --reason "not this order"
    """
    by = _decider(by)
    with _opened(db, config, app) as opened:
        row = _decided(lambda: opened.deny(approval, by=by, reason=reason))
    _print_decision(row, by, as_json)


def _decider(by: str) -> str:
    """Return the --as name; a blank or unprintable one is a usage error, nothing recorded."""
    if not by.strip():
        raise UsageError(
            "--as is empty; give the name of the person deciding, as listed under "
            "approvers: in tether.yaml (e.g. --as alice)"
        )
    return check_text(by, "--as", name=True)


def _print_decision(row: ApprovalRow, by: str, as_json: bool) -> None:
    if as_json:
        _emit_json({"format": JSON_FORMAT, "approval": _document(row)})
        return
    console = _console()
    _line(console, row.status.value, f"{row.id} by {by}")
    _line(console, "call", f"{row.capability}, run {row.run_id} step {row.step}")
    if row.status is ApprovalStatus.APPROVED:
        next_step = "the agent's next attempt of this exact call runs under it, once"
        _line(console, "next", next_step)
    elif row.note is not None:
        _line(console, "reason", row.note, 2000)
