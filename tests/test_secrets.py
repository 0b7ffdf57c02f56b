"""Secret canaries (H.53): secrets never reach the database, its WAL, exports or logs.

Each test seeds canary secrets through one route (secret fields, nested models,
handler exceptions, preconditions, outputs, public tool specs), then greps every
place a secret could land for the canary and its base64 and URL-encoded forms.
"""

from __future__ import annotations

import base64
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel, SecretStr

import tether
from strategies import (
    capability_from_doc,
    public_name,
    tooltalk_doc,
    tooltalk_gold_calls,
)
from tether.store import sqlite_path

# Canaries in the formats scanners look for, each with characters that URL and
# base64 encoding change, so an encoded leak differs from the plain one.
API_KEY = "sk-live-CANARY1+api/key=Zq9!"
PASSWORD = "CANARY2 p@ss/w0rd+=&"
TOKEN = "ghp_CANARY3token/+==x"
PIN = "CANARY4-pin:4242?"
CANARIES = (API_KEY, PASSWORD, TOKEN, PIN)

logger = logging.getLogger("tests.user_agent")


class Creds(BaseModel, extra="forbid"):
    token: tether.Secret
    pin: SecretStr
    label: str = ""


class LoginIn(BaseModel, extra="forbid"):
    user: str
    password: SecretStr
    api_key: tether.Secret
    creds: Creds
    more: list[Creds] = []


class LoginOut(BaseModel):
    user: str
    session: tether.Secret


class LooseIn(BaseModel, extra="forbid"):
    maybe: tether.Secret | None = None
    many: list[tether.Secret] = []
    by_name: dict[str, tether.Secret] = {}


class Ok(BaseModel):
    ok: bool


def _login_args() -> dict[str, object]:
    return {
        "user": "alice",
        "password": PASSWORD,
        "api_key": API_KEY,
        "creds": {"token": TOKEN, "pin": PIN, "label": "primary"},
        "more": [{"token": TOKEN, "pin": PIN}],
    }


def _forms(secret: str) -> dict[str, str]:
    raw = secret.encode()
    return {
        "plain": secret,
        "url": urllib.parse.quote(secret, safe=""),
        "url-path": urllib.parse.quote(secret),
        "url-plus": urllib.parse.quote_plus(secret),
        "base64": base64.b64encode(raw).decode(),
        "base64-url": base64.urlsafe_b64encode(raw).decode(),
    }


@dataclass
class Haystack:
    """Everything a secret could leak into, read as bytes."""

    app: tether.Tether
    caplog: pytest.LogCaptureFixture

    def places(self, run_id: str) -> dict[str, bytes]:
        path = sqlite_path(self.app.db_url.partition("?")[0])
        assert path is not None
        files = {
            name: Path(f"{path}{suffix}")
            for name, suffix in [("db", ""), ("wal", "-wal")]
        }
        assert files["wal"].exists(), "the WAL is read while the app is open"
        out = {name: file.read_bytes() for name, file in files.items()}
        out["export"] = b"\n".join(self.app.export(run_id))
        out["logs"] = self.caplog.text.encode()
        return out

    def assert_clean(self, run_id: str, canaries: tuple[str, ...] = CANARIES) -> None:
        """Assert no canary in any form is anywhere, and the record still verifies."""
        found = [
            (place, secret, form)
            for place, data in self.places(run_id).items()
            for secret in canaries
            for form, text in _forms(secret).items()
            if text.encode() in data
        ]
        assert found == []
        report = self.app.verify(run_id)
        assert report.ok, report.reason


@pytest.fixture
def haystack(app: tether.Tether, caplog: pytest.LogCaptureFixture) -> Haystack:
    """The app, with every log record of every logger captured."""
    caplog.set_level(logging.DEBUG)
    return Haystack(app=app, caplog=caplog)


# -- capabilities ---------------------------------------------------------------------


@tether.capability("acct.login", effect="write", idempotency="keyed")
def login(args: LoginIn) -> LoginOut:
    """Log in and return a session secret."""
    return LoginOut(user=args.user, session=f"session-for-{args.api_key}")


def _leaky_message(args: LoginIn) -> str:
    return (
        f"401 for {args.user}: password={args.password.get_secret_value()} "
        f"api_key={args.api_key} token={args.creds.token} "
        f"pin={args.creds.pin.get_secret_value()}"
    )


@tether.capability("acct.login_fails", effect="write", idempotency="keyed")
def login_fails(args: LoginIn) -> LoginOut:
    """Fail with every secret in the message, as careless client libraries do."""
    raise PermissionError(_leaky_message(args))


@tether.capability("acct.login_in_doubt", effect="write")
def login_in_doubt(args: LoginIn) -> LoginOut:
    """Fail mid-call with the secrets in the message; the step is in doubt."""
    raise ConnectionResetError(_leaky_message(args))


@tether.capability("acct.login_read")
def login_read(args: LoginIn) -> LoginOut:
    """A read that fails with the secrets in the message."""
    raise LookupError(_leaky_message(args))


@tether.capability("acct.login_encoded", effect="write", idempotency="keyed")
def login_encoded(args: LoginIn) -> LoginOut:
    """Fail with the secrets URL-encoded in a URL and base64-encoded in a header."""
    key = args.api_key
    basic = base64.b64encode(args.password.get_secret_value().encode()).decode()
    raise RuntimeError(
        f"GET https://api.example.com/v1/me?key={urllib.parse.quote(key, safe='')} "
        f"failed; sent Authorization: Basic {basic}"
    )


@tether.capability("acct.loose", effect="write", idempotency="keyed")
def loose(args: LooseIn) -> Ok:
    """Fail with secrets held in an optional field, a list and a dict."""
    raise RuntimeError(f"bad {args.maybe} {args.many} {args.by_name}")


def _key_is_live(args: LoginIn) -> bool | str:
    if args.api_key.startswith("sk-live-"):
        return f"live key {args.api_key} may not be used here"
    return True


def _key_parses(args: LoginIn) -> bool:
    raise ValueError(f"cannot parse key {args.api_key}")


@tether.capability(
    "acct.login_checked",
    effect="write",
    idempotency="keyed",
    preconditions=[_key_is_live],
)
def login_checked(args: LoginIn) -> LoginOut:
    """Log in, once a precondition on the key holds."""
    return LoginOut(user=args.user, session="s")


@tether.capability(
    "acct.login_parsed",
    effect="write",
    idempotency="keyed",
    preconditions=[_key_parses],
)
def login_parsed(args: LoginIn) -> LoginOut:
    """Log in, once a precondition that raises holds."""
    return LoginOut(user=args.user, session="s")


class EchoOut(BaseModel):
    summary: str
    """Plain text: its type marks nothing secret, whatever it quotes."""
    lines: list[str]


@tether.capability("acct.login_echo", effect="write", idempotency="keyed")
def login_echo(args: LoginIn) -> EchoOut:
    """Log in and echo the secret args into plain text, as a careless summary does."""
    basic = base64.b64encode(args.password.get_secret_value().encode()).decode()
    return EchoOut(
        summary=_leaky_message(args),
        lines=[
            f"Authorization: Basic {basic}",
            f"https://api.example.com/v1/me?key={urllib.parse.quote(args.api_key, safe='')}",
        ],
    )


ALL = (
    login,
    login_echo,
    login_fails,
    login_in_doubt,
    login_read,
    login_encoded,
    loose,
    login_checked,
    login_parsed,
)


# -- routes ------------------------------------------------------------------------------


def test_secret_fields_never_reach_the_record(
    haystack: Haystack, principal: tether.Principal
) -> None:
    """SecretStr and tether.Secret fields, nested and in lists, are masked everywhere."""
    app = haystack.app
    app.register(*ALL)

    with app.run(principal=principal, request="log in") as run:
        first = run.call(login, _login_args(), idempotency_key="login-1")
        again = run.step("acct.login", _login_args(), idempotency_key="login-1")

    assert first.session == f"session-for-{API_KEY}"  # the caller gets the real value
    # The stored result cannot hold the secret, so a retry is refused, not replayed
    # with a masked value and not run again.
    assert isinstance(again.error, tether.IdempotencyConflict)
    assert "holds secrets" in again.error.message
    haystack.assert_clean(run.id, (*CANARIES, f"session-for-{API_KEY}"))


def test_secret_args_echoed_in_a_plain_output_never_reach_the_record(
    haystack: Haystack, principal: tether.Principal
) -> None:
    """A handler quoting its secret args in plain text fields: the record keeps them masked.

    The caller gets the output as the handler made it. Stored masked, the
    result is not the call's result any more: a retry under the key is refused
    as one whose result holds secrets, not answered with the masked text.
    """
    app = haystack.app
    app.register(*ALL)

    with app.run(principal=principal, request="log in") as run:
        first = run.call(login_echo, _login_args(), idempotency_key="echo-1")
        again = run.step("acct.login_echo", _login_args(), idempotency_key="echo-1")

    assert PASSWORD in first.summary  # the caller gets the real value
    assert isinstance(again.error, tether.IdempotencyConflict)
    assert "holds secrets" in again.error.message
    executed = [
        e.data() for e in app.store.events(run.id) if e.data()["kind"] == "executed"
    ]
    assert executed[0]["output"]["summary"].startswith("401 for alice: password=*")
    haystack.assert_clean(run.id)


def test_secret_args_as_json_text_never_reach_the_record(
    haystack: Haystack, principal: tether.Principal
) -> None:
    """Secrets sent as JSON text are masked like secrets sent as a mapping."""
    app = haystack.app
    app.register(*ALL)
    text = orjson.dumps(_login_args()).decode()

    with app.run(principal=principal, request="log in") as run:
        run.call("acct.login", text)

    haystack.assert_clean(run.id)


@pytest.mark.parametrize(
    ("capability", "status"),
    [
        ("acct.login_fails", tether.OutcomeStatus.FAILED),
        ("acct.login_in_doubt", tether.OutcomeStatus.IN_DOUBT),
        ("acct.login_read", tether.OutcomeStatus.FAILED),
    ],
)
def test_secrets_in_handler_exceptions_are_redacted(
    haystack: Haystack,
    principal: tether.Principal,
    capability: str,
    status: tether.OutcomeStatus,
) -> None:
    """A handler exception that quotes the secrets is recorded with them masked."""
    app = haystack.app
    app.register(*ALL)

    with app.run(principal=principal, request="log in") as run:
        outcome = run.step(capability, _login_args())

    assert outcome.status is status
    assert outcome.error is not None
    assert tether.record.SECRET_MASK in outcome.error.message
    assert not any(c in outcome.error.message for c in CANARIES)
    haystack.assert_clean(run.id)


def test_encoded_secrets_in_handler_exceptions_are_redacted(
    haystack: Haystack, principal: tether.Principal
) -> None:
    """A secret URL-encoded in a URL or base64-encoded in a header is masked too."""
    app = haystack.app
    app.register(*ALL)

    with app.run(principal=principal, request="log in") as run:
        outcome = run.step("acct.login_encoded", _login_args())

    assert outcome.status is tether.OutcomeStatus.FAILED
    haystack.assert_clean(run.id)


@pytest.mark.parametrize(
    "args",
    [{"maybe": TOKEN}, {"many": [TOKEN]}, {"by_name": {"github": TOKEN}}],
    ids=["optional", "list", "dict"],
)
def test_secrets_inside_containers_are_redacted_from_errors(
    haystack: Haystack, principal: tether.Principal, args: dict[str, object]
) -> None:
    """A tether.Secret held in an optional field, a list or a dict is masked in errors."""
    app = haystack.app
    app.register(*ALL)

    with app.run(principal=principal, request="loose") as run:
        outcome = run.step("acct.loose", args)

    assert outcome.status is tether.OutcomeStatus.FAILED
    haystack.assert_clean(run.id, (TOKEN,))


@pytest.mark.parametrize("capability", ["acct.login_checked", "acct.login_parsed"])
def test_secrets_in_precondition_reasons_are_redacted(
    haystack: Haystack, principal: tether.Principal, capability: str
) -> None:
    """A precondition that quotes a secret in its reason or its exception is masked."""
    app = haystack.app
    app.register(*ALL)

    with app.run(principal=principal, request="log in") as run:
        outcome = run.step(capability, _login_args())

    assert outcome.status is tether.OutcomeStatus.REFUSED
    assert isinstance(outcome.error, tether.PreconditionFailed)
    haystack.assert_clean(run.id)


def test_invalid_args_beside_secrets_leak_nothing(
    haystack: Haystack, principal: tether.Principal
) -> None:
    """Args rejected by the schema are recorded without the secrets they held."""
    app = haystack.app
    app.register(*ALL)
    bad = {**_login_args(), "user": 42, "extra": API_KEY}

    with app.run(principal=principal, request="log in") as run:
        outcome = run.step("acct.login", bad)

    assert outcome.status is tether.OutcomeStatus.INVALID
    haystack.assert_clean(run.id)


def test_logged_capability_error_carries_no_secret(
    haystack: Haystack, principal: tether.Principal
) -> None:
    """An agent that logs a failed call's error with its traceback logs no secret."""
    app = haystack.app
    app.register(*ALL)

    with app.run(principal=principal, request="log in") as run:
        try:
            run.call("acct.login_fails", _login_args())
        except tether.CapabilityFailed:
            logger.exception("step.failed")

    assert "step.failed" in haystack.caplog.text
    haystack.assert_clean(run.id)


def test_secret_model_repr_masks_tether_secret() -> None:
    """A model's repr and str mask tether.Secret fields, as they mask SecretStr."""
    args = LoginIn.model_validate(_login_args())

    shown = repr(args) + str(args) + repr(args.creds)

    assert not [c for c in CANARIES if c in shown]


def test_tooltalk_passwords_never_reach_the_record(
    haystack: Haystack, principal: tether.Principal
) -> None:
    """ToolTalk's gold ChangePassword and UserLogin calls keep passwords and tokens out."""
    app = haystack.app
    gold = [
        (api, args)
        for api, args in tooltalk_gold_calls()
        if api in {"ChangePassword", "UserLogin", "RegisterUser", "DeleteAccount"}
    ]
    for api in sorted({api for api, _ in gold}):
        app.register(capability_from_doc(tooltalk_doc(api), secrets=True))
    canaries = tuple(
        sorted(
            {
                str(v)
                for _, args in gold
                for k, v in args.items()
                if "password" in k or "token" in k
            }
        )
    )

    with app.run(principal=principal, request="account chores") as run:
        outcomes = [run.step(public_name(api), args) for api, args in gold]

    assert len(gold) == 4
    assert len(canaries) >= 4
    assert [o.status.value for o in outcomes] == ["executed"] * len(gold)
    haystack.assert_clean(run.id, canaries)
