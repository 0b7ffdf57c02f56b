"""Adversarial review of the approval flow: real SQLite files, real capabilities,
the real CLI in a subprocess and a real local HTTP server for the webhook."""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.notify import Webhook
from tether.testing import FakeClock

POLICY = """\
rules:
  - id: big
    match: {capability: pay.refund}
    when: "args.cents > 100"
    decision: require_approval
    reason: big refund
    approvers: [finance]
approvals: {ttl: 1h}
approvers:
  alice: [finance]
  dave: [finance]
"""


class RefundIn(BaseModel, extra="forbid"):
    order: str
    cents: int


class RefundOut(BaseModel):
    refunded: int


def _refund_cap(ran: list[int]) -> tether.Capability[RefundIn, RefundOut]:
    def refund(args: RefundIn) -> RefundOut:
        ran.append(args.cents)
        return RefundOut(refunded=args.cents)

    return tether.capability("pay.refund", effect="write", idempotency="keyed")(refund)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[tether.Tether, list[int]]]:
    config = tmp_path / "tether.yaml"
    config.write_text(POLICY)
    ran: list[int] = []
    the_app = tether.Tether(
        db=f"sqlite:///{tmp_path / 'tether.db'}",
        config=config,
        clock=FakeClock(),
        env={},
    )
    the_app.register(_refund_cap(ran))
    try:
        yield the_app, ran
    finally:
        the_app.close()


def test_a_grant_for_a_call_made_for_one_person_does_not_run_the_call_made_for_another(
    app: tuple[tether.Tether, list[int]],
) -> None:
    """Alice approves the request the agent made acting for dave; the agent acting
    for alice, waiting on the same call, must not run under it: that would be
    alice approving her own call through an agent."""
    the_app, ran = app
    args = {"order": "o-1", "cents": 500}
    with the_app.run(
        principal=tether.Principal("bot", on_behalf_of="dave"), request="r"
    ) as run:
        held = run.step("pay.refund", args)
    assert isinstance(held.error, tether.ApprovalRequired)
    request_id = held.error.approval_id
    assert request_id is not None
    for_alice = tether.Principal("bot", on_behalf_of="alice")
    with the_app.run(principal=for_alice, request="r") as run:
        waiting = run.step("pay.refund", args)  # before: coalesced onto dave's request
    assert isinstance(waiting.error, tether.ApprovalRequired)

    the_app.approve(request_id, by="alice")
    with the_app.run(principal=for_alice, request="r") as run:
        again = run.step("pay.refund", args)

    assert ran == []  # before: [500], the call acting for alice ran on alice's word
    assert isinstance(again.error, tether.ApprovalRequired)
    own = again.error.approval_id
    assert own is not None
    assert own != request_id
    assert the_app.approval(own).on_behalf_of == "alice"
    with pytest.raises(tether.TetherError) as refused:
        the_app.approve(own, by="alice")
    assert refused.value.code == "not_an_approver"
    assert (
        the_app.approval(request_id).status == "approved"
    )  # still dave's call's, unspent


# -- the webhook --------------------------------------------------------------------------


class _GarbageServer:
    """A TCP server that answers every connection with a line that is not HTTP."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.tries = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.tries += 1
                conn.recv(65536)
                conn.sendall(b"SPAM not http\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def test_a_receiver_answering_garbage_is_retried_then_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that is not HTTP is a failed try like any other: retried, then logged."""
    server = _GarbageServer()
    hook = Webhook(
        f"http://127.0.0.1:{server.port}/hook", retries=2, sleep=lambda _: None
    )
    errors: list[BaseException | None] = []

    def hook_errors(raised: threading.ExceptHookArgs) -> None:
        errors.append(raised.exc_value)

    monkeypatch.setattr(threading, "excepthook", hook_errors)
    try:
        with caplog.at_level(logging.WARNING, logger="tether.notify"):
            hook.send({"event": "approval.requested", "approval": {"id": "apr_1"}})
            hook.flush(timeout=10)
    finally:
        server.close()
    assert errors == []  # before: http.client.BadStatusLine killed the sender thread
    assert server.tries == 3  # before: 1, no retry
    assert any(r.getMessage() == "approvals.webhook_failed" for r in caplog.records)


class _Receiver:
    """A real HTTP server that records each POSTed document."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        documents: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                documents.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.documents = documents
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_document_sent_as_the_idle_sender_stops_is_still_delivered() -> None:
    """The sender thread stops when idle; a send landing in that moment must not be lost."""
    receiver = _Receiver()
    hook = Webhook(receiver.url, retries=0, sleep=lambda _: None)
    late = {"event": "approval.decided", "approval": {"id": "apr_late"}}
    raced = threading.Event()

    class _Queue(queue.Queue[bytes]):
        """Idles at once; as it does, another thread sends (the race, made certain)."""

        def get(self, block: bool = True, timeout: float | None = None) -> bytes:
            if self.qsize() or timeout is None:
                return super().get(block, timeout)
            self.get = super().get  # type: ignore[method-assign]  # only the first idle
            sender = threading.Thread(target=hook.send, args=(late,))
            sender.start()
            sender.join()
            raced.set()
            raise queue.Empty

    hook._queue = _Queue()
    try:
        hook.send({"event": "approval.requested", "approval": {"id": "apr_first"}})
        assert raced.wait(10)
        hook.flush(timeout=5)
        ids = [d["approval"]["id"] for d in receiver.documents]
    finally:
        receiver.close()
    assert ids == ["apr_first", "apr_late"]  # before: ["apr_first"], apr_late lost
