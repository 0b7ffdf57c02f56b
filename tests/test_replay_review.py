"""Replay under review: records where replay's promise broke, built from real runs.

Each run is recorded by a real app on a SQLite file in the test's folder, with
real capabilities and `tether.yaml` files, and replayed by `tether.replay` or
the real `tether replay` command. A run cut off by its process's death is
recorded by a child process that dies mid-call (`os._exit`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import tether
from tether import _canonical, _chain
from tether.cli import main
from tether.replay import RecordedRun, Replayer, ReplayError, ReplayReport
from tether.testing import FakeClock

BOT = tether.Principal("bot", tenant="acme")


class Item(BaseModel):
    """A numbered thing to write."""

    n: int


class Written(BaseModel):
    """What a write answered."""

    n: int


class Token(BaseModel):
    """A call carrying a secret."""

    token: SecretStr
    n: int


def app_on(folder: Path, config: str | None = None, **kwargs: Any) -> tether.Tether:
    """An app on `folder`'s SQLite file, under `config` as its `tether.yaml`."""
    path = None
    if config is not None:
        path = folder / "tether.yaml"
        path.write_text(config)
    return tether.Tether(
        db=f"sqlite:///{folder / 'tether.db'}",
        config=path,
        clock=kwargs.pop("clock", FakeClock()),
        env={},
        **kwargs,
    )


def replayed(app: tether.Tether, run_id: str) -> ReplayReport:
    """Replay a run from the app's store in verify mode."""
    return Replayer(app).replay(RecordedRun.from_store(app.store, run_id))


def divergences(report: ReplayReport) -> list[str]:
    """The report's divergences, one readable line each."""
    return [d.describe() for d in report.divergences]


@pytest.fixture
def no_tether_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The test's folder as the working folder, with none of the caller's TETHER_*."""
    for name in list(os.environ):
        if name.startswith("TETHER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- a tampered record ---------------------------------------------------------------

DENY_BIG = """\
rules:
  - id: big-writes
    match: {capability: shop.write}
    when: "args.n > 100"
    decision: deny
    reason: writes that big need a ticket
"""


def write_cap() -> tether.Capability[Item, Written]:
    """`shop.write`: a keyed write that answers with its number."""

    @tether.capability("shop.write", effect="write", idempotency="keyed")
    def write(args: Item) -> Written:
        return Written(n=args.n)

    return write


def test_a_record_edited_in_the_database_is_refused_not_replayed(
    no_tether_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose args were edited in the database is refused, not replayed as a changed decision."""
    folder = no_tether_env
    app = app_on(folder, DENY_BIG)
    app.register(write_cap())
    with app.run(principal=BOT, request="a big write") as run:
        run.step("shop.write", {"n": 500})
    app.close()
    with sqlite3.connect(folder / "tether.db") as db:
        db.execute(
            "UPDATE events SET body = CAST(replace(CAST(body AS TEXT), "
            "'\"n\":500', '\"n\":50') AS BLOB) "
            "WHERE kind = 'validated' AND run = (SELECT id FROM runs WHERE run_id = ?)",
            (run.id,),
        )
    app = app_on(folder, DENY_BIG)
    app.register(write_cap())

    with pytest.raises(ReplayError) as refused:
        RecordedRun.from_store(app.store, run.id)
    code = main(["replay", run.id, "--db", f"sqlite:///{folder / 'tether.db'}"])
    err = capsys.readouterr().err

    assert "does not verify" in refused.value.message
    assert code == 2
    assert err.startswith("error[replay_impossible] ")
    assert len(err.splitlines()) == 1


# -- a key reused with another secret --------------------------------------------------


def test_a_key_reused_with_another_secret_replays_as_the_conflict_it_was(
    tmp_path: Path,
) -> None:
    """A key reused with another secret was a conflict, and replays as one, with no clear secret."""

    @tether.capability("vault.rotate", effect="write", idempotency="keyed")
    def rotate(args: Token) -> Written:
        return Written(n=args.n)

    app = app_on(tmp_path)
    app.register(rotate)
    with app.run(principal=BOT, request="rotate twice") as run:
        first = run.step(
            "vault.rotate", {"token": "CANARY-one", "n": 1}, idempotency_key="k"
        )
        again = run.step(
            "vault.rotate", {"token": "CANARY-one", "n": 1}, idempotency_key="k"
        )
        other = run.step(
            "vault.rotate", {"token": "CANARY-two", "n": 1}, idempotency_key="k"
        )
    assert (first.status, again.status) == ("executed", "idempotent_hit")
    assert isinstance(other.error, tether.IdempotencyConflict)

    report = replayed(app, run.id)

    assert divergences(report) == []
    assert "CANARY" not in json.dumps(report.to_json())


# -- a run cut off by its process's death ----------------------------------------------

CHILD = """\
import os, sys
from datetime import timedelta
from pathlib import Path
from pydantic import BaseModel
import tether
from tether.testing import FakeClock

class Item(BaseModel):
    n: int

class Written(BaseModel):
    n: int

folder, mode, kind = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

@tether.capability("shop.write", effect="write", idempotency=kind, cost=lambda a: a.n)
def write(args: Item) -> Written:
    if args.n == 7 and mode == "die":
        os._exit(3)
    return Written(n=args.n)

clock = FakeClock()
app = tether.Tether(
    db=f"sqlite:///{folder / 'tether.db'}", config=folder / "tether.yaml",
    clock=clock, env={},
)
app.register(write)
app.register_planner("script", tether.ScriptedPlanner(
    [("shop.write", {"n": 1}), ("shop.write", {"n": 7}), ("shop.write", {"n": 3})]
))
bot = tether.Principal("bot", tenant="acme")
if mode == "die":
    app.start("write three", planner="script", principal=bot)
else:
    clock.advance(timedelta(minutes=10))  # past the dead writer's claim
    (run,) = app.store.list_runs(limit=1)
    app.resume(run.run_id)
    for request in app.approvals(status="pending"):
        app.approve(request.id, by="dana")
        app.resume(run.run_id)
"""

GUARDED = """\
approvers: {dana: [sre]}
limits:
  - {id: spend, kind: budget, per: day, amount: 1000, capability: shop.write}
  - {id: one-at-a-time, kind: concurrency, max: 1, capability: shop.write}
"""


def record_a_death(folder: Path, kind: str, *, resume: bool) -> str:
    """Run the script in a child that dies at its second write; resume it if asked."""
    (folder / "child.py").write_text(CHILD)
    (folder / "tether.yaml").write_text(GUARDED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    modes = ["die", "resume"] if resume else ["die"]
    for mode in modes:
        subprocess.run(
            [sys.executable, str(folder / "child.py"), str(folder), mode, kind],
            env=env,
            capture_output=True,
            check=mode == "resume",
            timeout=60,
        )
    with tether.Tether(db=f"sqlite:///{folder / 'tether.db'}", env={}) as app:
        (row,) = app.store.list_runs(limit=1)
        return row.run_id


@pytest.mark.parametrize("kind", ["keyed", "none"])
@pytest.mark.parametrize("resume", [False, True], ids=["died", "resumed"])
def test_a_run_whose_process_died_mid_step_replays_the_same(
    tmp_path: Path, kind: str, resume: bool
) -> None:
    """A run cut off mid-call (intent, no result), and later resumed, replays the same."""
    run_id = record_a_death(tmp_path, kind, resume=resume)
    app = app_on(tmp_path, GUARDED)

    @tether.capability(
        "shop.write", effect="write", idempotency=kind, cost=lambda a: a.n
    )
    def write(args: Item) -> Written:
        return Written(n=args.n)

    app.register(write)
    kinds = [e.data()["kind"] for e in app.store.events(run_id)]

    report = replayed(app, run_id)

    assert kinds.count("intent") == (4 if resume else 2)  # the cut-off step twice
    assert divergences(report) == []


def test_a_cut_off_run_still_shows_a_changed_limit(tmp_path: Path) -> None:
    """A cut-off run replayed under a smaller budget diverges where the budget refuses."""
    run_id = record_a_death(tmp_path, "keyed", resume=True)
    app = app_on(tmp_path, GUARDED.replace("amount: 1000", "amount: 10"))

    @tether.capability(
        "shop.write", effect="write", idempotency="keyed", cost=lambda a: a.n
    )
    def write(args: Item) -> Written:
        return Written(n=args.n)

    app.register(write)

    report = replayed(app, run_id)

    first = report.divergences[0]
    assert (first.step, first.kind) == (2, "limit_reserved")  # taken again: 1 + 7 + 7


# -- capability versions and output schemas --------------------------------------------


def test_a_step_that_called_an_older_version_replays_under_that_version(
    tmp_path: Path,
) -> None:
    """A call to version 1 while version 2 is registered replays the same, under version 1."""

    @tether.capability("shop.write", effect="write", idempotency="keyed", version="1")
    def v1(args: Item) -> Written:
        return Written(n=args.n)

    @tether.capability("shop.write", effect="write", idempotency="keyed", version="2")
    def v2(args: Item) -> Written:
        return Written(n=args.n)

    app = app_on(tmp_path)
    app.register(v1, v2)
    with app.run(principal=BOT, request="one of each") as run:
        run.call(v1, {"n": 1})
        run.call("shop.write", {"n": 2})

    report = replayed(app, run.id)

    assert divergences(report) == []


def test_a_removed_version_shows_as_a_changed_version(tmp_path: Path) -> None:
    """A run recorded under version 1 diverges, naming the version, once only 2 is registered."""
    app = app_on(tmp_path)
    app.register(write_cap())
    with app.run(principal=BOT, request="a write") as run:
        run.call("shop.write", {"n": 1})

    @tether.capability("shop.write", effect="write", idempotency="keyed", version="2")
    def v2(args: Item) -> Written:
        return Written(n=args.n)

    today = tether.Tether(db="memory://", env={})
    today.register(v2)

    report = Replayer(today).replay(RecordedRun.from_store(app.store, run.id))

    assert divergences(report) == ["step 1 validated: version was '1', now '2'"]


class Stricter(BaseModel):
    """`Written` with a field the recorded outputs lack."""

    n: int
    receipt: str


def test_a_changed_output_schema_diverges_at_the_output_instead_of_crashing(
    tmp_path: Path,
) -> None:
    """A recorded output today's schema rejects is a divergence at the step, not a crash."""
    app = app_on(tmp_path)
    app.register(write_cap())
    with app.run(principal=BOT, request="a write") as run:
        run.call("shop.write", {"n": 1})

    @tether.capability("shop.write", effect="write", idempotency="keyed")
    def stricter(args: Item) -> Stricter:
        return Stricter(n=args.n, receipt="r")

    today = tether.Tether(db="memory://", env={})
    today.register(stricter)

    report = Replayer(today).replay(RecordedRun.from_store(app.store, run.id))

    assert divergences(report) == [
        "step 1: recorded executed, now failed (stage output)"
    ]


@pytest.mark.parametrize(
    ("effect", "idempotency", "config", "status"),
    [
        ("write", "keyed", None, "failed"),
        ("read", "native", None, "failed"),
        ("write", "keyed", "retry_budget: {per_run: 5, max_attempts: 3}\n", "failed"),
        ("write", "none", None, "in_doubt"),
    ],
    ids=["failed", "read", "retried", "in-doubt"],
)
def test_an_output_that_failed_its_schema_replays_the_same(
    tmp_path: Path, effect: str, idempotency: str, config: str | None, status: str
) -> None:
    """A handler that answered outside its output schema replays with the same outcome."""

    @tether.capability("shop.sloppy", effect=effect, idempotency=idempotency)
    def sloppy(args: Item) -> Written:
        seven: Any = "seven"  # not an int: the output fails its schema
        return Written.model_construct(n=seven)

    app = app_on(tmp_path, config)
    app.register(sloppy)
    with app.run(principal=BOT, request="a sloppy answer") as run:
        outcome = run.step("shop.sloppy", {"n": 7})
    assert outcome.status == status

    report = replayed(app, run.id)

    assert divergences(report) == []


# -- a crafted export ------------------------------------------------------------------


def crafted(source: Path, target: Path, change: Any) -> Path:
    """Copy an export with its events changed by `change`, its chain made whole again."""
    lines = source.read_bytes().splitlines()
    header = _canonical.loads(lines[0])
    events = [_canonical.loads(line)["event"] for line in lines[1:] if line.strip()]
    change(events)
    previous = _chain.genesis(header["run_id"])
    out = []
    for seq, event in enumerate(events, start=1):
        previous = _chain.chain_hash(previous, seq, _canonical.dumps(event))
        out.append(
            _canonical.dumps({"seq": seq, "hash": previous.hex(), "event": event})
        )
    header["head"] = previous.hex()
    target.write_bytes(b"\n".join([_canonical.dumps(header), *out]) + b"\n")
    return target


def first_of(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The first event of `kind`."""
    return next(e for e in events if e["kind"] == kind)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda es: first_of(es, "decided").pop("kind"), "event 4"),
        (lambda es: first_of(es, "validated").update(args=[1, 2]), "validated.args"),
        (lambda es: first_of(es, "validated").update(at="yesterday"), "validated.at"),
        (lambda es: es[0].update(principal="bot"), "run_started.principal"),
        (lambda es: first_of(es, "executed").update(output="n"), "executed.output"),
        (
            lambda es: first_of(es, "validated").update(step=10**12),
            "step 1000000000000",
        ),
    ],
    ids=["no-kind", "args", "time", "principal", "output", "step-number"],
)
def test_a_crafted_export_is_refused_in_one_line(
    no_tether_env: Path, capsys: pytest.CaptureFixture[str], change: Any, said: str
) -> None:
    """An export whose chain holds but whose events are not tether's is refused in one line."""
    folder = no_tether_env
    app = app_on(folder)
    app.register(write_cap())
    with app.run(principal=BOT, request="a write") as run:
        run.call("shop.write", {"n": 1})
    export = folder / "run.tether.jsonl"
    export.write_bytes(b"\n".join(app.export(run.id)) + b"\n")
    bad = crafted(export, folder / "bad.tether.jsonl", change)

    code = main(["replay", str(bad), "--app", "app_module:app"])
    err = capsys.readouterr().err

    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error[replay_impossible] "), err
    assert said in err


@pytest.fixture(autouse=True)
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`app_module:app`, an app with `shop.write`, for `--app` in the test's folder."""
    (tmp_path / "app_module.py").write_text(
        textwrap.dedent(
            """\
            import tether
            from pydantic import BaseModel

            class Item(BaseModel):
                n: int

            class Written(BaseModel):
                n: int

            app = tether.Tether(db="memory://", env={})

            @app.register
            @tether.capability("shop.write", effect="write", idempotency="keyed")
            def write(args: Item) -> Written:
                return Written(n=args.n)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "app_module", raising=False)
