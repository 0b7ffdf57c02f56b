"""What a review of the escalating breakers' closing (4cbbb01) found, each now fixed.

- A policy rule (or a Python policy) could take an id of the form tether gives
  its own decisions (`breaker:ID`): a breaker's closing then closed that rule's
  requests too. Such ids are refused.
- Records made before it, whose call a breaker request's denial refused after
  the request's TTL, replayed as a new request: a closed denial is now
  `expired` by the closing write itself, and a denial otherwise stands as it
  always did.
- A breaker's grant that a step was spending as the breaker closed, given
  back later (the step never ran), came back approved: it comes back
  `expired` once its breaker is closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tether
from test_escalate_requests import BOT, BREAKER, COOL_DOWN, UpIn, UpOut
from tether import record
from tether.policy import Decision, DecisionRequest
from tether.replay import RecordedRun, Replayer
from tether.store import Batch, NewRun
from tether.store._breakers import BreakerState
from tether.testing import FakeClock


@tether.capability("up.call", effect="write", idempotency="keyed", resource="up")
def up_call(args: UpIn) -> UpOut:
    """The upstream behind the escalating breaker: fails when asked to."""
    if args.fail:
        raise ConnectionError("upstream 503")
    return UpOut(n=args.n)


@tether.capability("side.call", effect="write", idempotency="keyed")
def side_call(args: UpIn) -> UpOut:
    """A capability no breaker watches, which a policy rule sends to a person."""
    return UpOut(n=args.n)


BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextlib.contextmanager
def _app(
    backend: str, folder: Path, request: pytest.FixtureRequest, config: str
) -> Iterator[tuple[tether.Tether, FakeClock]]:
    if backend == "memory":
        db = "memory://"
    elif backend == "sqlite":
        db = f"sqlite:///{folder / 'tether.db'}"
    else:
        db = str(request.getfixturevalue("postgres_url"))
    path = folder / "tether.yaml"
    path.write_text(config)
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    with tether.Tether(db=db, config=path, clock=clock, env={}) as app:
        app.register(up_call)
        app.register(side_call)
        yield app, clock


def _open_breaker(app: tether.Tether) -> None:
    with app.run(principal=BOT, request="break it") as run:
        run.step("up.call", {"n": 1, "fail": True})
        run.step("up.call", {"n": 2, "fail": True})
    assert app.store.breaker_row(BREAKER).state is BreakerState.OPEN


def _close_breaker(app: tether.Tether, clock: FakeClock) -> None:
    clock.advance(COOL_DOWN)
    with app.run(principal=BOT, request="probe") as run:
        run.call("up.call", {"n": 3})
    assert app.store.breaker_row(BREAKER).state is BreakerState.CLOSED


# -- 4cbbb01: a policy rule whose id looks like a breaker's ---------------------------------

RULE_NAMED_LIKE_A_BREAKER = f"""\
defaults: {{read: allow, write: allow, destructive: allow}}
rules:
  - id: "breaker:{BREAKER}"
    match: {{capability: side.call}}
    decision: require_approval
    reason: a person checks side calls
    approvers: [sre]
breakers:
  - {{id: {BREAKER}, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,
     open_for: 30s, half_open_calls: 1, on_open: escalate}}
approvers: {{alice: [sre]}}
"""


@pytest.mark.parametrize(
    "rule_id", [f"breaker:{BREAKER}", "capability:x", "tether:scopes"]
)
def test_a_rule_named_like_tethers_own_decisions_is_refused(
    tmp_path: Path, rule_id: str
) -> None:
    """A rule may not take an id tether gives its own decisions: a breaker's closing would close its requests."""
    config = tmp_path / "tether.yaml"
    config.write_text(RULE_NAMED_LIKE_A_BREAKER.replace(f"breaker:{BREAKER}", rule_id))

    with pytest.raises(tether.ConfigError, match="tether's own kind of id") as refused:
        tether.Tether(db="memory://", config=config, env={})

    assert rule_id in str(refused.value)


@pytest.mark.parametrize("policy_id", ["breaker", "capability", "tether:mine"])
def test_a_python_policy_named_like_tethers_own_decisions_is_refused(
    policy_id: str,
) -> None:
    """A Python policy's rule ids are `ID:rule`: an id such as `breaker` would make a breaker's."""

    class Named:
        id = policy_id

        def evaluate(self, request: DecisionRequest) -> Decision | None:
            return None

    with (
        tether.Tether(db="memory://", env={}) as app,
        pytest.raises(tether.UsageError, match="is tether's own"),
    ):
        app.add_policy(Named())


# -- 4cbbb01: a record made before, whose breaker denial had lapsed -------------------------

OLD_CONFIG = """\
defaults: {read: allow, write: allow, destructive: allow}
breakers:
  - {id: up-br, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,
     open_for: 1h, half_open_calls: 1, on_open: escalate}
approvers: {alice: [sre]}
approvals: {ttl: 1m}
"""
"""The tether.yaml the old record was made under (its hash is the record's policy version)."""

OLD_RECORD = (
    '{"capabilities":{"up.call":null},"config":null,"created_at":"2026-11-01T00:00:00Z","format":1,"head":"1d61e32006aee53ff172a45a99fb8e78d7fc91e4356fb83a4129c7ca38ffb7f5","head_seq":14,"policy_version":"sha256:452cb03948555bdb","principal":"ops-bot","request":"the call","run_id":"run_01a19467e8004a9ff6bc51705e8ed89f","status":"succeeded","tenant":"acme","type":"tether.run"}',
    '{"event":{"at":"2026-11-01T00:00:00Z","budget":null,"context":{},"format":1,"kind":"run_started","max_steps":null,"planner":null,"principal":{"id":"ops-bot","on_behalf_of":null,"roles":["agent"],"scopes":[],"tenant":"acme"},"request":"the call","step":null},"hash":"1311f010e5f7a0fe120bf84e74883ef8c32cf19c48d5f68a0b9decd392b123ee","seq":1}',
    '{"event":{"at":"2026-11-01T00:00:00Z","by":null,"kind":"run_status","previous":"pending","reason":null,"status":"executing","step":null},"hash":"38f91fa9c7e436984afb52db096ff75c09b5c49e24074be128b7f24c74b0916b","seq":2}',
    '{"event":{"args":{"fail":false,"n":7},"at":"2026-11-01T00:00:00Z","capability":"up.call","dry_run":false,"effect":"write","key":null,"kind":"validated","step":1,"timeout":null,"version":"1"},"hash":"43c4d1b454701b296abff60d04c7dadce7ef7b040ca475034b0dbd47fe1eaff3","seq":3}',
    '{"event":{"at":"2026-11-01T00:00:00Z","kind":"decided","on_behalf_of":null,"policy_version":"sha256:452cb03948555bdb","principal":"ops-bot","reasons":[],"rule_ids":[],"step":1,"verdict":"allow"},"hash":"22613e2d1fc33cab2fa65102e0227d042c8167bcb47b2411d7f9e7d15e6abc50","seq":4}',
    '{"event":{"admitted":false,"at":"2026-11-01T00:00:00Z","breaker":"up-br","kind":"breaker_checked","mode":"escalate","reason":"breaker up-br of up is open","state":"open","step":1},"hash":"9a292328d43707e5d540e7943394b9ec4b7e6cac912b2e63f55d0d3b7f62a3a2","seq":5}',
    '{"event":{"approval_id":"apr_01a19467e800e9474bd943e3bff6f6ea","approvers":[],"args":{"fail":false,"n":7},"at":"2026-11-01T00:00:00Z","capability":"up.call","digest":"1dca37f84fd3408936faff78b412a8377ea2a693f6f14f699f635468e60d05ec","expires_at":"2026-11-01T00:01:00Z","kind":"approval_requested","preview":null,"reasons":["breaker up-br of up is open: go ahead anyway?"],"rule_ids":["breaker:up-br"],"step":1,"version":"1"},"hash":"d892c0280bb80e3fa88f6cae3945338a4adbd23f0260f045d2bc5d7de6ca6286","seq":6}',
    '{"event":{"approval_id":"apr_01a19467e800e9474bd943e3bff6f6ea","at":"2026-11-01T00:00:00Z","duration_us":null,"error_code":"approval_required","error_type":"ApprovalRequired","kind":"failed","message":"up.call: needs a person\'s approval (breaker:up-br: breaker up-br of up is open: go ahead anyway?); approval request apr_01a19467e800e9474bd943e3bff6f6ea waits for a person (`tether approvals show apr_01a19467e800e9474bd943e3bff6f6ea`)","stage":"breaker","step":1},"hash":"f676edfe3a2a6bfa6ba65c0c5001af13867c3f2256aff7a95ed6e085ca0e345d","seq":7}',
    '{"event":{"approval_id":"apr_01a19467e800e9474bd943e3bff6f6ea","at":"2026-11-01T00:00:00Z","by":"alice","kind":"approval_decided","note":"no","outcome":"denied","reason":null,"step":1},"hash":"83076e78f3ad73d0384942e1bef3680e601a8adf98c50caa002b47134b08efe0","seq":8}',
    '{"event":{"args":{"fail":false,"n":7},"at":"2026-11-01T00:02:00Z","capability":"up.call","dry_run":false,"effect":"write","key":null,"kind":"validated","step":2,"timeout":null,"version":"1"},"hash":"5da99ce9525937300ea644fe4ed930691663103b6cea047cb4f41a519e1a081c","seq":9}',
    '{"event":{"at":"2026-11-01T00:02:00Z","kind":"decided","on_behalf_of":null,"policy_version":"sha256:452cb03948555bdb","principal":"ops-bot","reasons":[],"rule_ids":[],"step":2,"verdict":"allow"},"hash":"d6c49c5f026dce8dc4d3b3183f631dcdb906bcec185f424e7e5173a1761d4b60","seq":10}',
    '{"event":{"admitted":false,"at":"2026-11-01T00:02:00Z","breaker":"up-br","kind":"breaker_checked","mode":"escalate","reason":"breaker up-br of up is open","state":"open","step":2},"hash":"fd731380a8ee19487d0e2f466bd7a5d83de7f7c3f02102dd8cdabb24af674403","seq":11}',
    '{"event":{"approval_id":null,"at":"2026-11-01T00:02:00Z","duration_us":null,"error_code":"policy_denied","error_type":"Denied","kind":"failed","message":"up.call: alice denied approval request apr_01a19467e800e9474bd943e3bff6f6ea: no; a changed call (other args) asks again","stage":"breaker","step":2},"hash":"720cc76dfde594b4ec22eed75c2fe40454ac4df096d50a0e8fad50f8e4ef2a8f","seq":12}',
    '{"event":{"at":"2026-11-01T00:02:00Z","by":null,"kind":"run_status","previous":"executing","reason":null,"status":"succeeded","step":null},"hash":"ffe192797dedd382f57a998841f8ef7867dfa8fb5c7a330579146e59aca128dd","seq":13}',
    '{"event":{"at":"2026-11-01T00:02:00Z","error_code":null,"kind":"run_finished","message":null,"status":"succeeded","step":null},"hash":"1d61e32006aee53ff172a45a99fb8e78d7fc91e4356fb83a4129c7ca38ffb7f5","seq":14}',
)
"""`tether runs export` of a run made by the code of 343d025 (before 4cbbb01).

While breaker up-br is open, the run's call `up.call {"n": 7}` escalates
(request apr_...), alice denies it, two minutes pass (past `approvals.ttl`, the
breaker still open), and the same call is made again: the code of the day
refused it `policy_denied` (a denial stood for good).
"""


def test_a_record_refused_by_a_lapsed_breaker_denial_before_the_change_replays_the_same(
    tmp_path: Path,
) -> None:
    """A record from before 2026-12-03 replays without divergence under today's code."""
    export = tmp_path / "run.jsonl"
    export.write_text("\n".join(OLD_RECORD) + "\n")
    config = tmp_path / "tether.yaml"
    config.write_text(OLD_CONFIG)
    recorded = RecordedRun.from_file(export)

    with tether.Tether(db="memory://", config=config, env={}) as app:
        app.register(up_call)
        report = Replayer(app).replay(recorded)

    assert report.divergences == []
    assert report.ok


# -- 4cbbb01: a grant given back after its breaker closed ------------------------------------

ESCALATING = f"""\
defaults: {{read: allow, write: allow, destructive: allow}}
breakers:
  - {{id: {BREAKER}, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,
     open_for: 30s, half_open_calls: 1, on_open: escalate}}
approvers: {{alice: [sre]}}
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("meanwhile", "comes_back"),
    [
        ("closed", "expired"),
        ("closed-and-opened-again", "expired"),
        ("still-open", "approved"),
    ],
)
def test_a_breaker_grant_given_back_after_the_breaker_closed_comes_back_withdrawn(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    meanwhile: str,
    comes_back: str,
) -> None:
    """A grant whose step gave it back (it never ran) once its outage was over is withdrawn, as an unspent one is at the closing, also when the breaker has opened again since (another outage); within its outage it comes back approved."""
    with _app(backend, tmp_path, request, ESCALATING) as (app, clock):
        _open_breaker(app)
        with app.run(principal=BOT, request="the call") as run:
            asked = run.step("up.call", {"n": 7})
        assert isinstance(asked.error, tether.ApprovalRequired), asked
        grant = asked.error.approval_id
        assert grant is not None
        app.approve(grant, by="alice", note="go ahead")
        now = clock.now()
        run_id = "run_review_grant_back"
        # The intent of a step spending the grant lands (its answer lost with the
        # connection: `RunWriter._never_ran` gives the grant back on the next write).
        spent = app.store.commit(
            Batch(
                run_id=run_id,
                epoch=1,
                base_seq=0,
                base_hash=record.genesis(run_id),
                events=[
                    record.RunStarted(
                        at=now, request="the call", principal={"id": "ops-bot"}
                    ),
                    record.RunStatus(at=now, previous="pending", status="executing"),
                ],
                new_run=NewRun(
                    tenant="acme",
                    principal_id="ops-bot",
                    request="the call",
                    status="executing",
                    created_at=now,
                ),
                at=now,
                use_grant=grant,
                lease_until=now + timedelta(minutes=5),
            )
        )
        assert spent.blocked is None, spent
        assert app.approval(grant).status == "used"
        if meanwhile != "still-open":
            _close_breaker(app, clock)  # the outage is over meanwhile
        if meanwhile == "closed-and-opened-again":
            _open_breaker(app)  # another outage: the grant was not given for it

        back = app.store.commit(
            Batch(
                run_id=run_id,
                epoch=1,
                base_seq=spent.head_seq,
                base_hash=spent.head_hash,
                events=[
                    record.RunStatus(
                        at=clock.now(), previous="executing", status="planning"
                    )
                ],
                at=clock.now(),
                return_grant=grant,
            )
        )

        assert back.blocked is None, back
        assert app.approval(grant).status == comes_back
