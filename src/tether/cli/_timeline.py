"""A run read back from its record and rendered: the timeline and its tables.

`_timeline` turns a run's stored events into one JSON-ready document (the run,
its steps, its events); the rest render that document, or a run list's cells,
for people. The commands in `_runs` print them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from tether import _canonical
from tether.app import Tether
from tether.cli._common import _OK_STATUSES, _STYLE, _brief, _clean, _ms, _styled
from tether.errors import NotFound

__all__ = [
    "_events_table",
    "_principal_line",
    "_short_time",
    "_steps_table",
    "_summary",
    "_timeline",
]


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
                "resolved": None,
            }
        _apply(step, ev)
    for step in steps.values():
        if step["effect"] is not None:
            continue  # as recorded when the step was validated
        try:  # not validated (a refused or planned step): as the app declares it
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
        step["effect"] = ev.get("effect")
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
    elif kind == "in_doubt_resolved":  # the step stays in doubt; a person answered
        step["resolved"] = {
            "acted": ev.get("acted"),
            "by": ev.get("by"),
            "reason": ev.get("reason"),
            "key_state": ev.get("key_state"),
        }


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
        resolved = s.get("resolved")
        if s["status"] in _OK_STATUSES:
            out = _brief(s["output"], room)
        elif resolved is not None:  # what a person found beats the doubt
            found = "acted" if resolved["acted"] else "did not act"
            out = _clean(f"resolved: {found} ({resolved['by']})", room)
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
    if kind == "in_doubt_resolved":
        found = "acted" if ev.get("acted") else "did not act"
        key = ev.get("key_state")
        settled = f"; key {ev.get('key')} {key}" if key else ""
        return f"{found}, by {ev.get('by')}: {ev.get('reason')}{settled}"
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


def _principal_line(principal: Mapping[str, Any]) -> str:
    who = f"{principal.get('id')} (tenant {principal.get('tenant')}"
    if principal.get("on_behalf_of"):
        who += f", on behalf of {principal.get('on_behalf_of')}"
    return who + ")"


def _short_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso
