"""The approvals webhook: a real HTTP server gets a JSON POST when a request is made and decided."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.testing import FakeClock, write_config


class Receiver(ThreadingHTTPServer):
    """Records each POSTed document; answers 500 to the first `fail` posts."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail = fail
        self.tries = 0
        self.documents: list[dict[str, Any]] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.tries += 1
            failing = self.server.tries <= self.server.fail
            if not failing:
                self.server.documents.append(json.loads(body))
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # the base class's name
        pass  # quiet tests


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(fail=getattr(request, "param", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class RefundIn(BaseModel):
    cents: int


class RefundOut(BaseModel):
    refunded: int


@tether.capability("pay.refund", effect="write", idempotency="keyed")
def refund(args: RefundIn) -> RefundOut:
    """Refund."""
    return RefundOut(refunded=args.cents)


def _app(tmp_path: Path, receiver: Receiver) -> tether.Tether:
    port = receiver.server_address[1]
    config = tmp_path / "tether.yaml"
    config.write_text(
        "rules:\n"
        "  - {id: big, match: {capability: pay.refund}, decision: require_approval,\n"
        "     reason: refunds need finance, approvers: [finance]}\n"
        "approvers: {alice: [finance]}\n"
        f"approvals: {{webhook: 'http://127.0.0.1:{port}/hook', webhook_retries: 3}}\n"
    )
    app = tether.Tether(db="memory://", config=config, clock=FakeClock(), env={})
    app.register(refund)
    return app


def test_a_request_and_its_decision_are_posted(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Made: `approval.requested`; decided: `approval.decided`; a coalesced ask posts nothing."""
    with _app(tmp_path, receiver) as app:
        with app.run(principal=tether.Principal("bot"), request="refund") as run:
            first = run.step("pay.refund", {"cents": 5})
            run.step("pay.refund", {"cents": 5})  # coalesced onto the same request
        assert isinstance(first.error, tether.ApprovalRequired)
        request_id = first.error.approval_id
        assert request_id is not None
        app.approve(request_id, by="alice", note="fine")
        assert app.webhook is not None
        app.webhook.flush(timeout=10)

    events = [
        (d["event"], d["approval"]["id"], d["approval"]["status"])
        for d in receiver.documents
    ]
    assert events == [
        ("approval.requested", request_id, "pending"),
        ("approval.decided", request_id, "approved"),
    ]
    assert receiver.documents[1]["approval"]["decided_by"] == "alice"
    assert receiver.documents[0]["approval"]["args"] == {"cents": 5}


@pytest.mark.parametrize("receiver", [2], indirect=True)
def test_a_failing_receiver_is_retried(tmp_path: Path, receiver: Receiver) -> None:
    """Two 500s, then accepted: delivered once, on the third try."""
    with _app(tmp_path, receiver) as app:
        with app.run(principal=tether.Principal("bot"), request="refund") as run:
            run.step("pay.refund", {"cents": 5})
        assert app.webhook is not None
        app.webhook.flush(timeout=10)

    assert receiver.tries == 3
    assert [d["event"] for d in receiver.documents] == ["approval.requested"]


@pytest.mark.parametrize("receiver", [10], indirect=True)
def test_a_receiver_that_keeps_failing_is_given_up_and_logged(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """After the retries the delivery is dropped with a warning; the call path never waited on it."""
    with (
        caplog.at_level("WARNING", logger="tether.notify"),
        _app(tmp_path, receiver) as app,
    ):
        with app.run(principal=tether.Principal("bot"), request="refund") as run:
            outcome = run.step("pay.refund", {"cents": 5})
        assert app.webhook is not None
        app.webhook.flush(timeout=10)

    assert outcome.status == "refused"
    assert receiver.tries == 4  # the first try and 3 retries
    assert any(r.getMessage() == "approvals.webhook_failed" for r in caplog.records)


# -- a URL that carries a token lives in the environment ---------------------------

_RULES = (
    "rules:\n"
    "  - {id: big, match: {capability: pay.refund}, decision: require_approval,\n"
    "     reason: refunds need finance, approvers: [finance]}\n"
    "approvers: {alice: [finance]}\n"
)


def test_the_webhook_url_can_come_from_the_environment_and_stays_out_of_exports(
    tmp_path: Path, receiver: Receiver
) -> None:
    """`webhook_env` names the variable: requests are posted there, and the export never holds the URL."""
    port = receiver.server_address[1]
    url = f"http://127.0.0.1:{port}/hook/T0K3N-s3cret"
    config = tmp_path / "tether.yaml"
    config.write_text(_RULES + "approvals: {webhook_env: APPROVALS_HOOK}\n")
    env = {"APPROVALS_HOOK": url}
    with tether.Tether(
        db="memory://", config=config, clock=FakeClock(), env=env
    ) as app:
        app.register(refund)
        with app.run(principal=tether.Principal("bot"), request="refund") as run:
            asked = run.step("pay.refund", {"cents": 5})
        assert app.webhook is not None
        app.webhook.flush(timeout=10)
        exported = list(app.export(run.id))

    assert isinstance(asked.error, tether.ApprovalRequired)
    assert [d["event"] for d in receiver.documents] == ["approval.requested"]
    header = json.loads(exported[0])
    assert "webhook_env: APPROVALS_HOOK" in header["config"]  # the file, for replay
    assert not [line for line in exported if b"T0K3N" in line]


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "approvals.webhook_env names APPROVALS_HOOK, which is not set"),
        ({"APPROVALS_HOOK": ""}, "which is not set"),
        ({"APPROVALS_HOOK": "ftp://h/T0K3N"}, "holds no http:// or https:// URL"),
    ],
)
def test_an_unset_or_bad_webhook_variable_is_a_config_error_that_never_shows_it(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    config = tmp_path / "tether.yaml"
    config.write_text(_RULES + "approvals: {webhook_env: APPROVALS_HOOK}\n")

    with pytest.raises(tether.ConfigError, match=says) as raised:
        tether.Tether(db="memory://", config=config, env=env)
    assert "T0K3N" not in raised.value.message


def test_a_webhook_and_its_variable_together_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "tether.yaml"
    config.write_text(
        _RULES + "approvals: {webhook: 'http://h/x', webhook_env: APPROVALS_HOOK}\n"
    )

    with pytest.raises(tether.ConfigError, match="not both"):
        tether.Tether(db="memory://", config=config, env={"APPROVALS_HOOK": "http://h"})


def test_a_reload_whose_webhook_variable_is_unset_keeps_the_last_good_settings(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    port = receiver.server_address[1]
    config = tmp_path / "tether.yaml"
    config.write_text(_RULES + f"approvals: {{webhook: 'http://127.0.0.1:{port}/a'}}\n")
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:
        app.register(refund)
        before = app.current_policy().version
        write_config(config, _RULES + "approvals: {webhook_env: NOT_SET_HERE}\n")
        after = app.current_policy().version
        kept = app.webhook

    assert after == before
    assert kept is not None
    failed = [r for r in caplog.records if r.getMessage() == "policy.reload_failed"]
    assert failed
    assert "NOT_SET_HERE, which is not set" in str(failed[0].__dict__["tether.error"])
