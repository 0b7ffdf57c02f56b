"""`tether approvals`: a person lists, reads and decides the requests of held steps.

The scene: an agent (`bot`, acting for `carol`) asks for a refund above the
rule's threshold, so the step is held and an approval request is stored.
The CLI then decides it, in this process (`tether.cli.main`) and in a separate
one (the installed `tether`), and the same call is tried again under the grant.
The abuse cases of RELIABILITY G.41 go through the CLI too: each is refused
with one line, exit 1, and recorded in the requesting run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import tether
import tether.cli
from tether import _canonical
from tether.store import ApprovalRow
from tether.testing import FakeClock

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")
"""The command under test: `TETHER_CLI` (the wheel test sets it), else the venv's."""

CONFIG = """\
rules:
  - id: big-refunds
    match: {capability: pay.refund}
    when: args.cents > 100
    decision: require_approval
    approvers: [finance]
    reason: refunds over $1 need finance
approvers:
  alice: [finance]
  dave: [finance, sre]
  bob: [sre]
  carol: [finance]
  bot: [finance]
"""
"""`carol` is the person the agent acts for and `bot` the agent itself: both are
named approvers, and still may never decide their own request."""

AGENT = tether.Principal("bot", tenant="acme", on_behalf_of="carol")
CANARY = "sk-canary-7f3a9b"
HOSTILE = "clear\x1b[2J [bold red]markup[/] \u202eevil\r\n"
ARGS = {"order": f"o-1 {HOSTILE}", "cents": 500, "api_key": CANARY}


class RefundIn(BaseModel, extra="forbid"):
    order: str
    cents: int
    api_key: SecretStr


class RefundOut(BaseModel):
    order: str
    refunded_cents: int


@dataclass
class Scene:
    """An app whose run is still open, with one pending approval request."""

    app: tether.Tether
    clock: FakeClock
    run: tether.Run
    approval_id: str
    db: str
    config: Path
    folder: Path
    refunds: list[int] = field(default_factory=list)
    """The cents of each refund the handler really made."""

    def kinds(self) -> list[str]:
        """Return the kinds of the run's events about approvals and execution."""
        wanted = {"approval_requested", "approval_decided", "approval_used"}
        wanted |= {"intent", "executed"}
        return [
            kind
            for e in self.app.store.events(self.run.id)
            if (kind := e.data()["kind"]) in wanted
        ]

    def decisions(self) -> list[tuple[str, str]]:
        """Return (outcome, by) of each `approval_decided` event in the run."""
        return [
            (data["outcome"], data["by"])
            for e in self.app.store.events(self.run.id)
            if (data := e.data())["kind"] == "approval_decided"
        ]


def make_app(
    db: str, config: Path, clock: FakeClock, refunds: list[int]
) -> tether.Tether:
    """An app with `pay.refund`, whose dry run previews the refund."""

    def preview(args: RefundIn) -> RefundOut:
        return RefundOut(order=args.order, refunded_cents=args.cents)

    @tether.capability(
        "pay.refund", effect="write", idempotency="keyed", dry_run=preview
    )
    def refund(args: RefundIn) -> RefundOut:
        refunds.append(args.cents)
        return RefundOut(order=args.order, refunded_cents=args.cents)

    app = tether.Tether(db=db, config=config, clock=clock, env={})
    app.register(refund)
    return app


def open_scene(
    folder: Path, start: datetime, *, ttl: str | None = None
) -> Iterator[Scene]:
    """Make the request in an open run and yield the scene; close it after."""
    config = folder / "tether.yaml"
    config.write_text(CONFIG + (f"approvals: {{ttl: {ttl}}}\n" if ttl else ""))
    db = f"sqlite:///{folder / 'tether.db'}"
    clock = FakeClock(start)
    refunds: list[int] = []
    app = make_app(db, config, clock, refunds)
    with app.run(principal=AGENT, request="refund order o-1") as run:
        held = run.step("pay.refund", ARGS)
        assert isinstance(held.error, tether.ApprovalRequired), held
        assert held.error.approval_id is not None
        yield Scene(
            app=app,
            clock=clock,
            run=run,
            approval_id=held.error.approval_id,
            db=db,
            config=config,
            folder=folder,
            refunds=refunds,
        )
    app.close()


def now_utc() -> datetime:
    """The wall clock, whole seconds: a separate `tether` process decides by it."""
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the caller's TETHER_* settings, and a wide terminal (one row per line)."""
    for name in ("TETHER_DB", "TETHER_CONFIG", "TETHER_RECORD_KEY", "TETHER_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture
def scene(tmp_path: Path, clean_env: None) -> Iterator[Scene]:
    """A pending request made now (by the wall clock), its run still open."""
    yield from open_scene(tmp_path, now_utc())


@pytest.fixture
def as_app(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The scene's own app as `--app approvalsapp:app` (its fake clock comes along)."""
    monkeypatch.setitem(
        sys.modules, "approvalsapp", types.SimpleNamespace(app=scene.app)
    )
    return ["--app", "approvalsapp:app"]


def files(scene: Scene) -> list[str]:
    """`--db` and `--config` naming the scene's database and tether.yaml."""
    return ["--db", scene.db, "--config", str(scene.config)]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `tether` in this process (the one error handler included)."""
    code = tether.cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_tether(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `tether` in a separate process, with none of our TETHER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["COLUMNS"] = "250"
    return subprocess.run(
        [CLI, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def document(row: ApprovalRow) -> dict[str, Any]:
    """What `--json` should say about a request, written out from the API's row."""
    return {
        "id": row.id,
        "status": row.status.value,
        "run_id": row.run_id,
        "step": row.step,
        "tenant": row.tenant,
        "principal": row.principal_id,
        "on_behalf_of": row.on_behalf_of,
        "capability": row.capability,
        "version": row.version,
        "args": _canonical.loads(row.args),
        "preview": None if row.preview is None else _canonical.loads(row.preview),
        "rule_ids": list(row.rule_ids),
        "reasons": list(row.reasons),
        "approvers": list(row.approvers),
        "policy_version": row.policy_version,
        "digest": row.digest.hex(),
        "created_at": row.created_at.isoformat(),
        "expires_at": row.expires_at.isoformat(),
        "decided_by": row.decided_by,
        "decided_at": None if row.decided_at is None else row.decided_at.isoformat(),
        "note": row.note,
    }


def assert_refused(code: int, out: str, err: str, error: str) -> None:
    """The command ran and the answer is no: exit 1, one `error[...]` line, no output."""
    assert code == 1, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error[{error}] "), lines[0]


def assert_escaped(text: str) -> None:
    """Agent text reached the output escaped: no raw control or bidi character."""
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "\r" not in text
    assert "\\x1b[2J" in text
    assert "\\u202e" in text


# -- reading ------------------------------------------------------------------------------


def test_list_shows_one_row_per_request_with_its_approvers(
    scene: Scene, as_app: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The held call asked twice is one pending row: id, run, step, who asked, roles."""
    again = scene.run.step("pay.refund", ARGS)

    code, out, err = run_cli(capsys, "approvals", "list", *as_app)

    assert isinstance(again.error, tether.ApprovalRequired)
    assert again.error.approval_id == scene.approval_id  # coalesced, no new request
    assert (code, err) == (0, "")
    made = scene.clock.now()
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows == [
        [
            scene.approval_id,
            "pending",
            "pay.refund",
            scene.run.id,
            "1",
            "bot",
            "for",
            "carol",
            *f"{made:%Y-%m-%d %H:%M}".split(),  # created (UTC): date, time
            *f"{made + timedelta(hours=24):%Y-%m-%d %H:%M}".split(),  # expires
            "finance",
        ]
    ]


def test_list_filters_by_status_and_says_when_there_is_none(
    scene: Scene, as_app: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--status approved` lists nothing before the decision and the request after it."""
    before = run_cli(capsys, "approvals", "list", "--status", "approved", *as_app)
    scene.app.approve(scene.approval_id, by="alice")

    after = run_cli(capsys, "approvals", "list", "--status", "approved", *as_app)
    pending = run_cli(capsys, "approvals", "list", "--status", "pending", *as_app)

    assert before == (0, "no approved approval requests\n", "")
    assert after[0] == 0
    assert scene.approval_id in after[1]
    assert pending == (0, "no pending approval requests\n", "")


def test_the_expired_filter_finds_requests_behind_newer_ones(
    scene: Scene, as_app: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`list --status expired --limit 1` lists an expired request under a newer pending one."""
    scene.clock.advance(timedelta(hours=25))
    scene.run.step("pay.refund", {**ARGS, "cents": 700})  # a new, pending request

    code, out, _ = run_cli(
        capsys,
        "approvals",
        "list",
        "--status",
        "expired",
        "--limit",
        "1",
        "--json",
        *as_app,
    )

    assert code == 0
    assert [a["id"] for a in json.loads(out)["approvals"]] == [scene.approval_id]


def test_show_prints_the_call_its_preview_and_who_may_decide(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    """`show` gives run and step, capability and version, masked args, preview, rule, roles."""
    code, out, err = run_cli(
        capsys, "approvals", "show", scene.approval_id[:16], *files(scene)
    )

    assert (code, err) == (0, "")
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0] == f"approval request {scene.approval_id} pending"
    for expected in (
        f"run {scene.run.id} step 1",
        "capability pay.refund (version 1)",
        "requested by bot (tenant acme, on behalf of carol)",
        "rule big-refunds: refunds over $1 need finance",
        "approvers finance",
        "decision undecided",
        '"api_key": "**********",',
        '"refunded_cents": 500',
        f"expires {(scene.clock.now() + timedelta(hours=24)):%Y-%m-%d %H:%M:%S} UTC",
    ):
        assert expected in lines, (expected, out)
    assert lines.index('"refunded_cents": 500') > lines.index(
        "preview (what the dry run said the call would do)"
    )
    assert CANARY not in out


def test_agent_text_in_args_is_escaped_in_the_table_and_show(
    tmp_path: Path, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Control characters, bidi marks and Rich markup from the agent are shown, not obeyed."""
    hostile = tether.Principal("bot", on_behalf_of=f"carol{HOSTILE}")
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    app = make_app(db, config, FakeClock(now_utc()), [])
    with app.run(principal=hostile, request="refund") as run:
        held = run.step("pay.refund", ARGS)
    app.close()
    assert isinstance(held.error, tether.ApprovalRequired)
    flags = ["--db", db, "--config", str(config)]

    listed = run_cli(capsys, "approvals", "list", *flags)
    shown = run_cli(capsys, "approvals", "show", str(held.error.approval_id), *flags)

    for code, out, err in (listed, shown):
        assert (code, err) == (0, "")
        assert_escaped(out)
    assert "[bold red]markup[/]" in shown[1]


# -- --json ---------------------------------------------------------------------------------


def test_json_documents_match_the_api(
    scene: Scene, as_app: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`list`, `show` and `approve --json` each print one document matching `app.approval`."""
    listed = run_cli(capsys, "approvals", "list", "--json", *as_app)
    shown = run_cli(capsys, "approvals", "show", scene.approval_id, "--json", *as_app)
    pending = scene.app.approval(scene.approval_id)
    approved = run_cli(
        capsys,
        "approvals",
        "approve",
        scene.approval_id,
        "--as",
        "alice",
        "--note",
        "ticket 42",
        "--json",
        *as_app,
    )

    assert [code for code, _, _ in (listed, shown, approved)] == [0, 0, 0]
    assert json.loads(listed[1]) == {"format": 1, "approvals": [document(pending)]}
    shown_doc = json.loads(shown[1])
    assert shown_doc["approval"] == document(pending)
    assert [e["kind"] for e in shown_doc["events"]] == [
        "approval_requested",
        "failed",
    ]  # asked; the step parked on it
    decided = scene.app.approval(scene.approval_id)
    assert json.loads(approved[1]) == {"format": 1, "approval": document(decided)}
    assert (decided.status, decided.decided_by, decided.note) == (
        "approved",
        "alice",
        "ticket 42",
    )
    assert CANARY not in listed[1] + shown[1] + approved[1]


# -- deciding ------------------------------------------------------------------------------


def test_approved_in_the_cli_the_same_call_runs_once_under_the_grant(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `approve`, the retried call executes once; the record shows it all in order."""
    code, out, err = run_cli(
        capsys,
        "approvals",
        "approve",
        scene.approval_id,
        "--as",
        "alice",
        *files(scene),
    )
    ran = scene.run.step("pay.refund", ARGS)
    again = scene.run.step("pay.refund", ARGS)

    assert (code, err) == (0, "")
    assert [" ".join(line.split()) for line in out.splitlines()[:2]] == [
        f"approved {scene.approval_id} by alice",
        f"call pay.refund, run {scene.run.id} step 1",
    ]
    assert ran.status is tether.OutcomeStatus.EXECUTED
    assert isinstance(again.error, tether.ApprovalRequired)  # the grant is spent
    assert again.error.approval_id != scene.approval_id
    assert scene.refunds == [500]
    assert scene.kinds() == [
        "approval_requested",
        "approval_decided",
        "approval_used",
        "intent",
        "executed",
        "approval_requested",
    ]
    assert scene.decisions() == [("approved", "alice")]
    assert scene.app.approval(scene.approval_id).status == "used"


def test_denied_in_the_cli_the_same_call_is_refused_with_the_reason(
    scene: Scene, as_app: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`deny --reason` closes the request; the call asked again is `Denied` saying why."""
    code, out, err = run_cli(
        capsys,
        "approvals",
        "deny",
        scene.approval_id,
        "--as",
        "dave",
        "--reason",
        "order o-1 was already refunded",
        *as_app,
    )
    retried = scene.run.step("pay.refund", ARGS)

    assert (code, err) == (0, "")
    assert " ".join(out.split()) == (
        f"denied {scene.approval_id} by dave call pay.refund, run {scene.run.id} "
        "step 1 reason order o-1 was already refunded"
    )
    assert isinstance(retried.error, tether.Denied)
    assert "order o-1 was already refunded" in retried.error.message
    assert scene.refunds == []
    assert scene.decisions() == [("denied", "dave")]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("bot", "asked for approval request"),  # the agent itself
        ("carol", "asked for approval request"),  # the person it acts for
        ("bob", "holds none of the roles"),  # an approver, not of finance
        ("zed", "is not an approver"),  # nobody in approvers:
    ],
)
def test_who_may_not_decide_is_refused_and_recorded(
    scene: Scene,
    as_app: list[str],
    capsys: pytest.CaptureFixture[str],
    name: str,
    why: str,
) -> None:
    """Self-approval, approval for oneself through an agent, no role, no name: exit 1, recorded."""
    approve = run_cli(
        capsys, "approvals", "approve", scene.approval_id, "--as", name, *as_app
    )
    deny = run_cli(
        capsys,
        "approvals",
        "deny",
        scene.approval_id,
        "--as",
        name,
        "--reason",
        "no",
        *as_app,
    )

    for code, out, err in (approve, deny):
        assert_refused(code, out, err, "not_an_approver")
        assert why in err
    assert scene.app.approval(scene.approval_id).status == "pending"
    assert scene.decisions() == [("refused", name), ("refused", name)]


def test_a_decided_request_stays_closed(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    """Approving twice, or denying after approval, is refused naming who decided: exit 1."""
    first = run_cli(
        capsys,
        "approvals",
        "approve",
        scene.approval_id,
        "--as",
        "alice",
        *files(scene),
    )
    twice = run_cli(
        capsys,
        "approvals",
        "approve",
        scene.approval_id,
        "--as",
        "alice",
        *files(scene),
    )
    overruled = run_cli(
        capsys,
        "approvals",
        "deny",
        scene.approval_id,
        "--as",
        "dave",
        "--reason",
        "changed my mind",
        *files(scene),
    )

    assert first[0] == 0
    for code, out, err in (twice, overruled):
        assert_refused(code, out, err, "approval_closed")
        assert "is approved by alice; a decision is final" in err
    row = scene.app.approval(scene.approval_id)
    assert (row.status, row.decided_by) == ("approved", "alice")
    assert scene.decisions() == [
        ("approved", "alice"),
        ("refused", "alice"),
        ("refused", "dave"),
    ]


def test_an_expired_request_cannot_be_approved(
    scene: Scene, as_app: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Past its expiry a request lists as expired and approving it exits 1, recorded."""
    scene.clock.advance(timedelta(hours=24))

    listed = run_cli(capsys, "approvals", "list", "--status", "expired", *as_app)
    code, out, err = run_cli(
        capsys, "approvals", "approve", scene.approval_id, "--as", "alice", *as_app
    )
    lapsed = scene.run.step("pay.refund", ARGS)
    retried = scene.run.step("pay.refund", ARGS)

    assert listed[0] == 0
    assert listed[1].splitlines()[1].split()[:2] == [scene.approval_id, "expired"]
    assert_refused(code, out, err, "approval_closed")
    assert f"approval request {scene.approval_id} expired at" in err
    assert scene.decisions()[0] == ("refused", "alice")
    assert isinstance(lapsed.error, tether.Denied)  # expiry is a no for that call
    assert isinstance(retried.error, tether.ApprovalRequired)  # the next asks again
    assert retried.error.approval_id != scene.approval_id
    assert scene.refunds == []


def test_a_denial_needs_a_reason(
    scene: Scene, as_app: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`deny` without `--reason`, or with a blank one, exits 2 and records nothing."""
    events = len(scene.app.store.events(scene.run.id))

    missing = run_cli(
        capsys, "approvals", "deny", scene.approval_id, "--as", "alice", *as_app
    )
    blank = run_cli(
        capsys,
        "approvals",
        "deny",
        scene.approval_id,
        "--as",
        "alice",
        "--reason",
        "  ",
        *as_app,
    )

    for code, out, err in (missing, blank):
        assert code == 2
        assert out == ""
        assert len(err.splitlines()) == 1
        assert err.startswith("error[usage_error] ")
    assert "--reason" in missing[2]
    assert "a denial needs a reason" in blank[2]
    assert scene.app.approval(scene.approval_id).status == "pending"
    assert len(scene.app.store.events(scene.run.id)) == events


@pytest.mark.parametrize(
    ("args", "error", "says"),
    [
        (["approve", "apr_nonexistent", "--as", "alice"], "not_found", "see `tether"),
        (["show", "apr_nonexistent"], "not_found", "no approval request"),
        (["list", "--status", "maybe"], "usage_error", "unknown status 'maybe'"),
        (["approve", "ID"], "usage_error", "--as"),
    ],
)
def test_a_command_that_cannot_run_exits_2_with_one_line(
    scene: Scene,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    error: str,
    says: str,
) -> None:
    """An unknown request or a bad flag: exit 2, one `error[...]` line."""
    code, out, err = run_cli(capsys, "approvals", *args, *files(scene))

    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error[{error}] ")
    assert says in err


def test_app_and_files_together_or_a_missing_database_exit_2(
    scene: Scene,
    as_app: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--app` with `--db` is a usage error; a missing database is not created."""
    both = run_cli(capsys, "approvals", "list", *as_app, "--db", scene.db)
    absent = tmp_path / "absent.db"
    missing = run_cli(capsys, "approvals", "list", "--db", f"sqlite:///{absent}")

    assert both[0] == missing[0] == 2
    assert both[2].startswith("error[usage_error] --app reads the app's own")
    assert missing[2].startswith("error[not_found] no database at ")
    assert not absent.exists()


@pytest.mark.parametrize("command", ["", "list", "show", "approve", "deny"])
def test_every_approvals_command_teaches_with_an_example(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """`--help` prints an example; approve and deny also say what each exit code means."""
    code, out, _ = run_cli(capsys, "approvals", *([command] if command else []), "-h")

    text = " ".join(out.split())
    assert code == 0
    assert "Example: tether approvals" in text
    if command in ("approve", "deny"):
        assert "Exit 1 when the command ran and the answer is no" in text
        assert "Exit 2 when it could not run" in text


# -- in a separate process ------------------------------------------------------------------


def test_approved_by_the_tether_command_in_another_process(scene: Scene) -> None:
    """The installed `tether` approves; back here the call runs once, the record in order."""
    listed = run_tether(scene.folder, "approvals", "list", "--json", *files(scene))
    pending = [scene.app.approval(scene.approval_id)]
    approved = run_tether(
        scene.folder,
        "approvals",
        "approve",
        scene.approval_id,
        "--as",
        "alice",
        "--note",
        "checked the order",
        *files(scene),
    )
    ran = scene.run.step("pay.refund", ARGS)

    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {
        "format": 1,
        "approvals": [document(r) for r in pending],
    }
    assert approved.returncode == 0, approved.stderr
    assert ran.status is tether.OutcomeStatus.EXECUTED
    assert scene.refunds == [500]
    assert scene.kinds() == [
        "approval_requested",
        "approval_decided",
        "approval_used",
        "intent",
        "executed",
    ]
    row = scene.app.approval(scene.approval_id)
    assert (row.status, row.decided_by, row.note) == (
        "used",
        "alice",
        "checked the order",
    )
    assert scene.app.verify(scene.run.id).ok


def test_two_approvers_racing_in_two_processes_one_decision_wins(
    scene: Scene,
) -> None:
    """`approve` by alice and `deny` by dave at once: exactly one applies, the other exits 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    commands = [
        ["approve", scene.approval_id, "--as", "alice"],
        ["deny", scene.approval_id, "--as", "dave", "--reason", "no"],
    ]
    racing = [
        subprocess.Popen(
            [CLI, "approvals", *command, *files(scene)],
            cwd=scene.folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    outputs = [p.communicate(timeout=30) for p in racing]
    codes = [p.returncode for p in racing]

    assert sorted(codes) == [0, 1], outputs
    loser_err = outputs[codes.index(1)][1]
    assert loser_err.startswith("error[approval_closed] "), loser_err
    row = scene.app.approval(scene.approval_id)
    assert row.decided_by is not None
    outcome = {"alice": "approved", "dave": "denied"}
    other = {"alice": "dave", "dave": "alice"}[row.decided_by]
    assert row.status == outcome[row.decided_by]
    assert sorted(scene.decisions()) == sorted(
        [(outcome[row.decided_by], row.decided_by), ("refused", other)]
    )


def test_abuse_through_the_tether_command_is_refused_and_recorded(
    tmp_path: Path, clean_env: None
) -> None:
    """In another process: self-approval, no role and an expired request exit 1, recorded.

    The request is made on a fake clock two days back, so by the wall clock the
    separate process reads, it expired a day ago.
    """
    opened = open_scene(tmp_path, now_utc() - timedelta(days=2))
    scene = next(opened)
    try:
        own = run_tether(
            tmp_path,
            "approvals",
            "approve",
            scene.approval_id,
            "--as",
            "carol",
            *files(scene),
        )
        no_role = run_tether(
            tmp_path,
            "approvals",
            "deny",
            scene.approval_id,
            "--as",
            "bob",
            "--reason",
            "no",
            *files(scene),
        )
        late = run_tether(
            tmp_path,
            "approvals",
            "approve",
            scene.approval_id,
            "--as",
            "alice",
            *files(scene),
        )
        listed = run_tether(tmp_path, "approvals", "list", *files(scene))

        for done, error in (
            (own, "not_an_approver"),
            (no_role, "not_an_approver"),
            (late, "approval_closed"),
        ):
            assert_refused(done.returncode, done.stdout, done.stderr, error)
        assert "expired at" in late.stderr
        assert listed.stdout.splitlines()[1].split()[:2] == [
            scene.approval_id,
            "expired",
        ]
        assert scene.decisions() == [
            ("refused", "carol"),
            ("refused", "bob"),
            ("refused", "alice"),
        ]
    finally:
        next(opened, None)  # the run ends, the app closes


def test_approved_after_the_run_ended_a_later_run_uses_the_grant(
    tmp_path: Path, clean_env: None
) -> None:
    """The agent's run ended while it waited; approved later, its next run makes the call.

    Both records verify: the decision is appended to the ended run's record,
    the use and the execution are in the new run's.
    """
    opened = open_scene(tmp_path, now_utc())
    scene = next(opened)
    next(opened, None)  # the run ends and the app closes: the agent's process moved on

    approved = run_tether(
        tmp_path,
        "approvals",
        "approve",
        scene.approval_id,
        "--as",
        "alice",
        *files(scene),
    )
    with make_app(scene.db, scene.config, scene.clock, scene.refunds) as app:
        with app.run(principal=AGENT, request="refund order o-1, approved") as later:
            ran = later.step("pay.refund", ARGS)
        ended = [e.data()["kind"] for e in app.store.events(scene.run.id)]
        used = [e.data()["kind"] for e in app.store.events(later.id)]
        verified = (app.verify(scene.run.id).ok, app.verify(later.id).ok)

    assert approved.returncode == 0, approved.stderr
    assert ran.status is tether.OutcomeStatus.EXECUTED
    assert scene.refunds == [500]
    assert ended[-3:] == ["run_status", "run_finished", "approval_decided"]
    assert used[used.index("approval_used") :][:3] == [
        "approval_used",
        "intent",
        "executed",
    ]
    assert verified == (True, True)


@pytest.mark.parametrize("name", ["", "   ", "al\tice"])
def test_a_blank_or_unprintable_decider_is_a_usage_error_and_records_nothing(
    scene: Scene, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """`--as ''` (or blank, or with a control character) exits 2; no event is recorded."""
    events = len(scene.app.store.events(scene.run.id))

    approve = run_cli(
        capsys, "approvals", "approve", scene.approval_id, "--as", name, *files(scene)
    )
    deny = run_cli(
        capsys,
        "approvals",
        "deny",
        scene.approval_id,
        "--as",
        name,
        "--reason",
        "no",
        *files(scene),
    )

    for code, out, err in (approve, deny):
        assert code == 2, err
        assert out == ""
        assert len(err.splitlines()) == 1
        assert err.startswith("error[usage_error] --as "), err
    assert len(scene.app.store.events(scene.run.id)) == events
    assert scene.app.approval(scene.approval_id).status == "pending"
