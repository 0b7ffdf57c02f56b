"""Adversarial review of the one call path: what it promises a caller.

Each test breaks a promise the gateway made (idempotency, exact records,
secrets, sync and async) on real parts: a SQLite file store, real
capabilities, several processes where the hash seed matters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import tether
from tether.testing import FakeClock

CANARY = "sk-live-CANARY7Q2"


def _app(tmp_path: Path) -> tether.Tether:
    return tether.Tether(
        db=f"sqlite:///{tmp_path / 'tether.db'}", env={}, clock=FakeClock()
    )


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tether.Tether]:
    a = _app(tmp_path)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def principal() -> tether.Principal:
    return tether.Principal("ops-bot", roles=["agent"], tenant="acme")


def _stored_text(folder: Path) -> str:
    """Everything the store wrote (database, WAL), as text."""
    return "".join(
        p.read_bytes().decode("latin-1") for p in folder.iterdir() if p.is_file()
    )


# -- a set argument retried from another process -----------------------------------

_SET_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from pydantic import BaseModel
    import tether

    class TagIn(BaseModel):
        host: str
        tags: set[str]

    class TagOut(BaseModel):
        pid: int

    effects = Path(sys.argv[2])

    @tether.capability("hosts.tag", effect="write", idempotency="keyed")
    def tag(args: TagIn) -> TagOut:
        with effects.open("a") as f:
            f.write("tagged\\n")
        import os
        return TagOut(pid=os.getpid())

    app = tether.Tether(db=sys.argv[1], env={})
    app.register(tag)
    who = tether.Principal("ops-bot", tenant="acme")
    tags = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    with app.run(principal=who, request="tag") as run:
        try:
            out = run.call("hosts.tag", {"host": "db-1", "tags": tags},
                           idempotency_key="tag-db-1")
            print(json.dumps({"ok": out.model_dump()}))
        except tether.TetherError as exc:
            print(json.dumps({"error": exc.code}))
    app.close()
    """
)


def test_a_set_argument_retried_from_another_process_returns_the_stored_result(
    tmp_path: Path,
) -> None:
    # A set's JSON order follows the hash seed: each process saw other args.
    script = tmp_path / "tag.py"
    script.write_text(_SET_SCRIPT)
    effects = tmp_path / "effects.txt"
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    replies = []
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, str(script), db, str(effects)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        replies.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert effects.read_text().count("tagged") == 1
    assert all(r == replies[0] for r in replies), replies
    assert "ok" in replies[0]


# -- secrets where no schema declares them -----------------------------------------


class NoteIn(BaseModel):
    host: str
    extra: dict[str, Any] = {}


class NoteOut(BaseModel):
    n: int


def test_a_secret_in_a_free_form_field_is_fingerprinted_under_its_key(
    app: tether.Tether, principal: tether.Principal, tmp_path: Path
) -> None:
    ran: list[str] = []

    @tether.capability("hosts.note", effect="write", idempotency="keyed")
    def note(args: NoteIn) -> NoteOut:
        ran.append(args.extra["token"].get_secret_value())
        return NoteOut(n=len(ran))

    app.register(note)
    with app.run(principal=principal, request="note") as run:
        first = {"host": "a", "extra": {"token": SecretStr(CANARY)}}
        assert run.call(note, first, idempotency_key="k").n == 1
        # The same key, the same call: the stored result.
        assert run.call(note, first, idempotency_key="k").n == 1
        # The same key with another secret is other args, never a silent replay.
        other = {"host": "a", "extra": {"token": SecretStr("sk-live-OTHER")}}
        with pytest.raises(tether.IdempotencyConflict):
            run.call("hosts.note", other, idempotency_key="k")
    assert ran == [CANARY]
    assert CANARY not in _stored_text(tmp_path)


class TokenIn(BaseModel):
    host: str
    token: SecretStr


class TokenOut(BaseModel):
    ok: bool


def _parse_cost(args: TokenIn) -> int:
    return int(args.token.get_secret_value())  # ValueError quoting the token


def test_a_cost_function_error_never_shows_or_stores_the_secret(
    app: tether.Tether, principal: tether.Principal, tmp_path: Path
) -> None:
    @tether.capability("hosts.login", effect="write", cost=_parse_cost)
    def login(args: TokenIn) -> TokenOut:
        return TokenOut(ok=True)

    app.register(login)
    with app.run(principal=principal, request="login") as run:
        outcome = run.step("hosts.login", {"host": "a", "token": CANARY})
    assert outcome.error is not None
    assert outcome.error.code == "usage_error"
    assert CANARY not in outcome.error.message
    assert "cost function raised ValueError" in outcome.error.message
    assert CANARY not in _stored_text(tmp_path)


def test_a_usage_error_raised_by_a_handler_never_shows_or_stores_the_secret(
    app: tether.Tether, principal: tether.Principal, tmp_path: Path
) -> None:
    @tether.capability("hosts.connect", effect="write", idempotency="keyed")
    def connect(args: TokenIn) -> TokenOut:
        raise tether.UsageError(f"token {args.token.get_secret_value()} is revoked")

    app.register(connect)
    with app.run(principal=principal, request="connect") as run:
        outcome = run.step("hosts.connect", {"host": "a", "token": CANARY})
    assert isinstance(outcome.error, tether.UsageError)
    assert CANARY not in outcome.error.message
    assert CANARY not in str(outcome.error)
    assert CANARY not in _stored_text(tmp_path)


class FeeOut(BaseModel):
    api_key: SecretStr


def test_an_actual_cost_error_logs_no_secret(
    app: tether.Tether,
    principal: tether.Principal,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @tether.capability(
        "hosts.issue",
        effect="write",
        idempotency="keyed",
        actual_cost=lambda out: int(out.api_key.get_secret_value()),
    )
    def issue(args: NoteIn) -> FeeOut:
        return FeeOut(api_key=SecretStr(CANARY))

    app.register(issue)
    with (
        caplog.at_level(logging.WARNING, logger="tether"),
        app.run(principal=principal, request="issue") as run,
    ):
        run.call("hosts.issue", {"host": "a"})
    logged = [
        f"{r.getMessage()} {getattr(r, 'tether.error', '')}" for r in caplog.records
    ]
    assert any("actual_cost" in line for line in logged)
    assert not any(CANARY in line for line in logged)


# -- values a record cannot keep exactly ---------------------------------------------


class Reading(BaseModel):
    value: float


class BlobIn(BaseModel):
    data: dict[str, Any] = {}


class BlobOut(BaseModel):
    ok: bool


@pytest.mark.parametrize(
    "data",
    [
        {"s": {float("nan")}},
        {"s": frozenset([float("inf")])},
        {"r": Reading(value=float("nan"))},
        {"rs": [Reading(value=float("-inf"))]},
    ],
    ids=["nan-in-set", "inf-in-frozenset", "nan-in-model", "inf-in-listed-model"],
)
def test_nan_hidden_in_a_set_or_model_is_refused_not_recorded_as_null(
    app: tether.Tether, principal: tether.Principal, data: dict[str, Any]
) -> None:
    ran: list[object] = []

    @tether.capability("blobs.put", effect="write")
    def put(args: BlobIn) -> BlobOut:
        ran.append(args)
        return BlobOut(ok=True)

    app.register(put)
    with app.run(principal=principal, request="put") as run:
        with pytest.raises(tether.ValidationFailed, match="NaN or Infinity"):
            run.call("blobs.put", {"data": data})
        run_id = run.id
    assert ran == []
    kinds = [e.data()["kind"] for e in app.store.events(run_id)]
    assert "validated" not in kinds


class GaugeOut(BaseModel):
    reading: float | None = None


def test_a_nan_output_is_invalid_not_replayed_as_null(
    app: tether.Tether, principal: tether.Principal
) -> None:
    @tether.capability("gauges.read_and_reset", effect="write", idempotency="keyed")
    def read_and_reset(args: NoteIn) -> GaugeOut:
        return GaugeOut(reading=float("nan"))

    app.register(read_and_reset)
    with app.run(principal=principal, request="gauge") as run:
        # The caller would get NaN, the record (and a retry) None: refused instead.
        with pytest.raises(tether.ValidationFailed, match="NaN or Infinity"):
            run.call("gauges.read_and_reset", {"host": "a"}, idempotency_key="g")
        run_id = run.id
    outputs = [
        e.data().get("output")
        for e in app.store.events(run_id)
        if e.data()["kind"] == "executed"
    ]
    assert outputs == []


def test_a_value_json_cannot_carry_is_named_not_called_too_deep(
    app: tether.Tether, principal: tether.Principal
) -> None:
    @tether.capability("blobs.keep", effect="write")
    def keep(args: BlobIn) -> BlobOut:
        return BlobOut(ok=True)

    app.register(keep)
    with app.run(principal=principal, request="keep") as run:
        for value in (b"\xff\xfe", object()):
            with pytest.raises(tether.ValidationFailed) as caught:
                run.call("blobs.keep", {"data": {"v": value}})
            assert "nested too deeply" not in caught.value.message
            assert "JSON cannot carry" in caught.value.message


# -- async handlers called from sync code ----------------------------------------------


class PingIn(BaseModel):
    host: str


class PingOut(BaseModel):
    up: bool


def test_a_dry_run_of_an_async_read_inside_an_event_loop_says_use_acall(
    app: tether.Tether, principal: tether.Principal
) -> None:
    ran: list[str] = []

    @tether.capability("net.aping")
    async def aping(args: PingIn) -> PingOut:
        ran.append(args.host)
        return PingOut(up=True)

    app.register(aping)

    async def inside_a_loop() -> None:
        with app.run(principal=principal, request="ping") as run:
            with pytest.raises(tether.UsageError, match="acall"):
                run.call("net.aping", {"host": "a"}, dry_run=True)
            assert (
                await run.acall("net.aping", {"host": "b"}, dry_run=True)
            ) == PingOut(up=True)

    asyncio.run(inside_a_loop())
    assert ran == ["b"]


class IssuedOut(BaseModel):
    data: dict[str, Any]
    """Free-form: a SecretStr in it is masked by no schema."""


def test_a_secret_in_a_free_form_output_is_never_returned_as_its_mask(
    app: tether.Tether, principal: tether.Principal, tmp_path: Path
) -> None:
    """The first call returns the credential; the record keeps it masked, so a
    retry under the key cannot return it, and says so instead of handing back
    the mask as if it were the credential."""

    @tether.capability("keys.issue", effect="write", idempotency="keyed")
    def issue(args: NoteIn) -> IssuedOut:
        return IssuedOut(data={"token": SecretStr(CANARY)})

    app.register(issue)
    with app.run(principal=principal, request="issue") as run:
        first = run.call(issue, {"host": "a", "extra": {}}, idempotency_key="k")
        with pytest.raises(tether.IdempotencyConflict) as again:
            run.call(issue, {"host": "a", "extra": {}}, idempotency_key="k")

    assert first.data["token"].get_secret_value() == CANARY
    assert "holds secrets" in again.value.message
    assert CANARY not in _stored_text(tmp_path)
