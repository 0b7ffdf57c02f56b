"""Secret canaries in approval webhook payloads (H.53): never sent in clear.

A capability whose args hold secrets (`SecretStr`, `tether.Secret`, nested and
in a list) needs a person's approval; the approvals webhook points at a real
HTTP server on 127.0.0.1. Requests are made, approved, denied and closed by an
abort; every body the server received is searched for each canary in the
forms test_secrets.py looks for (plain, URL-encoded, base64) and the ones a
JSON body can hold it in (JSON-escaped, `\\u` escapes). The dry-run preview
quotes the secrets too, three ways: in a secret output field, in a plain text
field, and in the message of an exception it raises.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import tether
from tether.testing import FakeClock, temporary_app

# Canaries with characters that URL, base64 and JSON encoding each change, so an
# encoded leak differs from the plain one (the last one is not ASCII: the
# webhook's JSON writes it as `\u00e9`).
API_KEY = "sk-live-WHCANARY1+api/key=Zq9!"
PASSWORD = "WHCANARY2 p@ss/w0rd+=&"
TOKEN = "ghp_WHCANARY3token/+==x"
PIN = 'WHCANARY4 "pin"\\4242? \u00e9t\u00e9'
CANARIES = (API_KEY, PASSWORD, TOKEN, PIN)

# Non-secret args, each of which must reach the webhook.
USER = "svc-billing-7f3a"
HOST = "db-7f3a.internal.example"
LABEL = "label-7f3a"

POLICY = """\
rules:
  - id: vault-needs-security
    match: {capability: vault.connect}
    decision: require_approval
    reason: connecting with credentials needs security
    approvers: [security]
approvers:
  alice: [security]
"""


# -- the receiver ------------------------------------------------------------------------


class Receiver(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that keeps every POSTed body, raw."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        self.exported: list[bytes] = []
        """The runs' exported records (JSON lines), once the flow ran."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.bodies.append(body)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # the base class's name
        pass  # quiet tests


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# -- the capability ----------------------------------------------------------------------


class Creds(BaseModel, extra="forbid"):
    token: tether.Secret
    pin: SecretStr
    label: str = ""


class VaultIn(BaseModel, extra="forbid"):
    user: str
    host: str
    password: SecretStr
    api_key: tether.Secret
    creds: Creds
    more: list[Creds] = []


class Session(BaseModel):
    """An output whose `session` is a secret: the preview must say so, not show it."""

    user: str
    session: tether.Secret


class Summary(BaseModel):
    """An output of plain text, which a careless dry run fills with the secrets."""

    summary: str


def _quoted(args: VaultIn) -> str:
    """Every secret of the args, in clear and encoded, as careless code writes them."""
    password = args.password.get_secret_value()
    pin = args.creds.pin.get_secret_value()
    basic = base64.b64encode(f"{args.user}:{password}".encode()).decode()
    return (
        f"connect {args.user}@{args.host} password={password} "
        f"key={urllib.parse.quote(args.api_key, safe='')} token={args.creds.token} "
        f"pin={pin} Authorization: Basic {basic} "
        f"b64key={base64.b64encode(args.api_key.encode()).decode()}"
    )


def _secret_field_capability() -> tether.Capability[Any, Any]:
    def preview(args: VaultIn) -> Session:
        return Session(user=args.user, session=f"would-be-{args.api_key}-{TOKEN}")

    def connect(args: VaultIn) -> Session:
        return Session(user=args.user, session=f"session-{args.api_key}")

    return tether.capability(
        "vault.connect", effect="write", idempotency="keyed", dry_run=preview
    )(connect)


def _plain_text_capability() -> tether.Capability[Any, Any]:
    def preview(args: VaultIn) -> Summary:
        return Summary(summary=f"would {_quoted(args)}")

    def connect(args: VaultIn) -> Summary:
        return Summary(summary=f"connected {args.user}@{args.host}")

    return tether.capability(
        "vault.connect", effect="write", idempotency="keyed", dry_run=preview
    )(connect)


def _raising_capability() -> tether.Capability[Any, Any]:
    def preview(args: VaultIn) -> Summary:
        raise PermissionError(f"dry run refused: {_quoted(args)}")

    def connect(args: VaultIn) -> Summary:
        return Summary(summary=f"connected {args.user}@{args.host}")

    return tether.capability(
        "vault.connect", effect="write", idempotency="keyed", dry_run=preview
    )(connect)


def _args(n: int) -> dict[str, object]:
    """The call's args; `n` makes each call another request (a coalesced ask posts nothing)."""
    return {
        "user": USER,
        "host": HOST,
        "password": PASSWORD,
        "api_key": API_KEY,
        "creds": {"token": TOKEN, "pin": PIN, "label": f"{LABEL}-{n}"},
        "more": [{"token": TOKEN, "pin": PIN}],
    }


# -- searching ---------------------------------------------------------------------------


def _forms(secret: str) -> dict[str, str]:
    """The secret as test_secrets.py looks for it, and as a JSON body may carry it."""
    raw = secret.encode()
    b64 = base64.b64encode(raw).decode()
    b64url = base64.urlsafe_b64encode(raw).decode()
    return {
        "plain": secret,
        "url": urllib.parse.quote(secret, safe=""),
        "url-path": urllib.parse.quote(secret),
        "url-plus": urllib.parse.quote_plus(secret),
        "base64": b64,
        "base64-url": b64url,
        "base64-unpadded": b64.rstrip("="),
        "base64-url-unpadded": b64url.rstrip("="),
        "json": json.dumps(secret)[1:-1],
        "json-utf8": json.dumps(secret, ensure_ascii=False)[1:-1],
        "hex": raw.hex(),
    }


def _leaks(bodies: list[bytes]) -> list[tuple[int, str, str]]:
    """Return (body, canary, form) for each canary form found in a body.

    Each body is searched as sent, and as its JSON decoded and written back
    without escapes (so a secret hidden behind `\\u` escapes shows in clear).
    """
    found = []
    for i, body in enumerate(bodies):
        decoded = json.dumps(json.loads(body), ensure_ascii=False).encode()
        for secret in CANARIES:
            for form, text in _forms(secret).items():
                needle = text.encode()
                if needle in body or needle in decoded:
                    found.append((i, secret, form))
    return found


# -- the flow ----------------------------------------------------------------------------


def _park_then_abort(app: tether.Tether, bot: tether.Principal) -> None:
    """Park a run on a new request, then abort it (which closes the request)."""
    with app.run(principal=bot, request="connect, then stopped") as stopped:
        parked = stopped.step("vault.connect", _args(3))
        assert isinstance(parked.error, tether.ApprovalRequired)
        app.abort(stopped.id, by="alice", reason="wrong host")


def _flow(
    tmp_path: Path, receiver: Receiver, capability: tether.Capability[Any, Any]
) -> list[dict[str, Any]]:
    """Ask three times; approve one, deny one, abort the run of the third.

    Returns the documents the receiver got (their raw bodies stay on it).
    """
    config = tmp_path / "tether.yaml"
    config.write_text(
        POLICY + f"approvals: {{webhook: '{receiver.url}', webhook_retries: 0}}\n"
    )
    bot = tether.Principal("bot", roles=["agent"], tenant="acme")
    with temporary_app(clock=FakeClock(), config=config) as app:
        assert app.db_url.startswith("sqlite:")
        app.register(capability)
        with app.run(principal=bot, request="connect twice") as run:
            approved = run.step("vault.connect", _args(1))
            denied = run.step("vault.connect", _args(2))
        ids = []
        for outcome in (approved, denied):
            assert isinstance(outcome.error, tether.ApprovalRequired)
            assert outcome.error.approval_id is not None
            ids.append(outcome.error.approval_id)
        app.approve(ids[0], by="alice", note="ok for this host")
        app.deny(ids[1], by="alice", reason="not this one")

        # The run is stopped while this process still holds it: its own end is refused.
        with pytest.raises(tether.RunAborted):
            _park_then_abort(app, bot)
        assert app.webhook is not None
        app.webhook.flush(timeout=10)
        # The record holds the same previews: its export is searched too.
        receiver.exported = [
            line for r in app.store.list_runs() for line in app.export(r.run_id)
        ]

    with receiver.lock:
        return [json.loads(b) for b in receiver.bodies]


PREVIEWS: dict[str, Callable[[], tether.Capability[Any, Any]]] = {
    "secret-field": _secret_field_capability,
    "plain-text": _plain_text_capability,
    "raises": _raising_capability,
}


@pytest.mark.parametrize(
    "preview",
    [
        "secret-field",
        "plain-text",  # a plain str quoting the args' secrets: redacted by value
        "raises",
    ],
)
def test_webhook_bodies_never_carry_the_secrets(
    tmp_path: Path, receiver: Receiver, preview: str
) -> None:
    """Requested, approved, denied and abort-closed: no body holds a canary in any form."""
    documents = _flow(tmp_path, receiver, PREVIEWS[preview]())

    seen = sorted(
        {(d["event"], d["approval"]["status"]) for d in documents},
    )
    assert seen == [
        ("approval.decided", "approved"),
        ("approval.decided", "denied"),
        ("approval.decided", "expired"),
        ("approval.requested", "pending"),
    ]
    assert sum(d["event"] == "approval.requested" for d in documents) == 3
    assert _leaks(receiver.bodies) == []
    assert len(receiver.exported) > 3
    assert _leaks(receiver.exported) == []


@pytest.mark.parametrize("preview", list(PREVIEWS))
def test_webhook_bodies_carry_the_non_secret_args_and_mask_the_secret_ones(
    tmp_path: Path, receiver: Receiver, preview: str
) -> None:
    """Each body names the call: its plain args in clear, its secret args masked, a preview."""
    documents = _flow(tmp_path, receiver, PREVIEWS[preview]())

    assert len(documents) == 6  # 3 requested, 3 decided
    for document in documents:
        args = document["approval"]["args"]
        assert (args["user"], args["host"]) == (USER, HOST)
        assert args["creds"]["label"].startswith(LABEL)
        assert args["password"] == tether.record.SECRET_MASK
        assert args["api_key"] == tether.record.SECRET_MASK
        assert args["creds"]["token"] == tether.record.SECRET_MASK
        assert args["creds"]["pin"] == tether.record.SECRET_MASK
        assert args["more"] == [
            {
                "token": tether.record.SECRET_MASK,
                "pin": tether.record.SECRET_MASK,
                "label": "",
            }
        ]
        shown = document["approval"]["preview"]
        assert shown is not None
        if preview == "secret-field":
            assert shown == {"output": "the dry run's output holds secrets; not shown"}
        elif preview == "plain-text":
            assert USER in shown["output"]["summary"]
            assert HOST in shown["output"]["summary"]
        else:
            assert shown["error"]
            assert HOST in shown["message"]
            assert tether.record.SECRET_MASK in shown["message"]
    decided = {
        d["approval"]["status"]: d["approval"]
        for d in documents
        if d["event"] == "approval.decided"
    }
    assert decided["approved"]["decided_by"] == "alice"
    assert decided["denied"]["note"] == "not this one"
    assert "wrong host" in decided["expired"]["note"]
