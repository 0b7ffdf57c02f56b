"""One conformance suite for every store backend (RELIABILITY.md F.37).

Each test runs against every backend through the `store` fixture; a backend
that behaves differently from the others fails here, on a laptop, before any
call path notices. The PostgreSQL cases use the server of `_postgres.py`, each
on a fresh schema.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tether
from tether import record
from tether._chain import StoredEvent
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Claim,
    Committed,
    KeyId,
    KeyRecord,
    KeyState,
    KeyUpdate,
    NewRun,
    RunRow,
    Store,
    open_store,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = timedelta(minutes=5)
RETENTION = timedelta(hours=24)
KEY = KeyId(tenant="acme", principal_id="pay-bot", capability="pay.charge", key="k-1")
ARGS_FP = b"\x01" * 32
OTHER_FP = b"\x02" * 32


BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each backend."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    else:
        url = "memory://"
    s = open_store(url, record_key=b"conformance-key")
    yield s
    s.close()


# -- helpers -------------------------------------------------------------------------


def create_run(
    store: Store,
    run_id: str,
    *,
    epoch: int = 1,
    at: datetime = T0,
    claim: Claim | None = None,
    status: str = "executing",
    lease_until: datetime | None = None,
) -> Committed:
    """Create a run in `status` with its first two events (its lease, if given)."""
    return store.commit(
        Batch(
            run_id=run_id,
            epoch=epoch,
            base_seq=0,
            base_hash=record.genesis(run_id),
            events=[
                record.RunStarted(at=at, request="charge", principal={"id": "pay-bot"}),
                record.RunStatus(at=at, previous="pending", status=status),
            ],
            new_run=NewRun(
                tenant="acme",
                principal_id="pay-bot",
                request="charge",
                status=status,
                created_at=at,
            ),
            claim=claim,
            lease_until=lease_until,
            at=at,
        )
    )


def append(
    store: Store,
    run_id: str,
    events: Sequence[record.Event] = (),
    *,
    epoch: int = 1,
    base_seq: int | None = None,
    claim: Claim | None = None,
    key_update: KeyUpdate | None = None,
    status: str | None = None,
    at: datetime = T0,
) -> Committed:
    """Append a batch to a run, extending its current head unless told otherwise."""
    row = store.get_run(run_id)
    return store.commit(
        Batch(
            run_id=run_id,
            epoch=epoch,
            base_seq=row.head_seq if base_seq is None else base_seq,
            base_hash=row.head_hash,
            events=list(events),
            claim=claim,
            key_update=key_update,
            status=status,
            at=at,
        )
    )


def intent(step: int, at: datetime = T0) -> record.Intent:
    """The intent event of a `pay.charge` step."""
    return record.Intent(
        at=at, step=step, capability="pay.charge", version="1", key=KEY.key
    )


def claim(
    run_id: str,
    *,
    step: int = 1,
    at: datetime = T0,
    fingerprint: bytes = ARGS_FP,
    take_over_stale: bool = True,
) -> Claim:
    """A claim of `KEY` by a run's step at time `at`."""
    return Claim(
        id=KEY,
        fingerprint=fingerprint,
        run_id=run_id,
        step=step,
        now=at,
        lease_until=at + TTL,
        retention=RETENTION,
        take_over_stale=take_over_stale,
    )


def settle(
    store: Store, run_id: str, state: KeyState, *, step: int = 1, at: datetime = T0
) -> None:
    """Settle the key claimed by `run_id`'s step to `state`."""
    output = b'{"charge_id":"ch-1"}' if state is KeyState.COMPLETED else None
    append(
        store,
        run_id,
        [record.Executed(at=at, step=step, output={}, duration_us=1)],
        key_update=KeyUpdate(
            id=KEY, run_id=run_id, step=step, state=state, output=output, now=at
        ),
        at=at,
    )


def kinds(store: Store, run_id: str) -> list[tuple[int, str]]:
    """Return a run's events as (seq, kind) pairs."""
    return [(e.seq, e.data()["kind"]) for e in store.events(run_id)]


# -- commits ----------------------------------------------------------------------------


def test_batches_append_events_in_order_under_one_verifying_chain(store: Store) -> None:
    """Committed batches append their events in order, move the head, and the chain verifies."""
    create_run(store, "run_a")

    committed = append(
        store,
        "run_a",
        [intent(1), record.Executed(at=T0, step=1, output={}, duration_us=5)],
    )

    row = store.get_run("run_a")
    events = store.events("run_a")
    assert committed.conflict is None
    assert committed.head_seq == row.head_seq == 4
    assert kinds(store, "run_a") == [
        (1, "run_started"),
        (2, "run_status"),
        (3, "intent"),
        (4, "executed"),
    ]
    report = record.verify(
        "run_a",
        events,
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        key=store.record_key,
    )
    assert report.ok, report.reason


def test_runs_keep_their_own_records_when_commits_interleave(store: Store) -> None:
    """Interleaved commits to two runs leave each run its own events, numbered from 1 without gaps."""
    create_run(store, "run_a")
    create_run(store, "run_b")

    for step in (1, 2):
        append(store, "run_a", [intent(step)])
        append(store, "run_b", [intent(step), intent(step)])

    assert [s for s, _ in kinds(store, "run_a")] == [1, 2, 3, 4]
    assert [s for s, _ in kinds(store, "run_b")] == [1, 2, 3, 4, 5, 6]
    assert store.events("run_missing") == []


def test_a_batch_with_a_stale_epoch_is_refused_and_writes_nothing(store: Store) -> None:
    """A batch whose lease epoch is not the run's raises `LeaseLost`; neither its events nor its claim are written."""
    create_run(store, "run_a", epoch=2)
    before = store.get_run("run_a")

    with pytest.raises(tether.LeaseLost):
        append(store, "run_a", [intent(1)], epoch=1, claim=claim("run_a"))

    assert store.get_run("run_a").head_seq == before.head_seq
    assert len(store.events("run_a")) == 2
    assert store.lookup_key(KEY) is None


def test_a_batch_from_a_stale_head_is_refused_and_writes_nothing(store: Store) -> None:
    """A batch that extends an old chain head raises `StoreError` (not `LeaseLost`); neither its events nor its claim are written."""
    create_run(store, "run_a")
    append(store, "run_a", [intent(1)])

    with pytest.raises(tether.StoreError) as caught:
        append(store, "run_a", [intent(2)], base_seq=2, claim=claim("run_a", step=2))

    assert not isinstance(caught.value, tether.LeaseLost)
    assert store.get_run("run_a").head_seq == 3
    assert len(store.events("run_a")) == 3
    assert store.lookup_key(KEY) is None


def test_creating_a_run_that_exists_is_refused_and_keeps_its_record(
    store: Store,
) -> None:
    """A batch that creates a run under an id already taken raises `StoreError` and leaves the first run's record whole."""
    create_run(store, "run_a")
    append(store, "run_a", [intent(1)])

    with pytest.raises(tether.StoreError):
        create_run(store, "run_a", at=T0 + timedelta(hours=1))

    assert [k for _, k in kinds(store, "run_a")] == [
        "run_started",
        "run_status",
        "intent",
    ]
    assert store.get_run("run_a").created_at == T0


# -- idempotency keys ---------------------------------------------------------------------


def test_a_fresh_claim_is_unique(store: Store) -> None:
    """A second claim of a key in progress conflicts with the first and writes none of its batch."""
    create_run(store, "run_a", claim=claim("run_a"))
    create_run(store, "run_b")

    second = append(store, "run_b", [intent(1)], claim=claim("run_b"))

    assert second.conflict is not None
    assert (second.conflict.state, second.conflict.run_id) == (
        KeyState.IN_PROGRESS,
        "run_a",
    )
    assert len(store.events("run_b")) == 2
    held = store.lookup_key(KEY)
    assert held is not None
    assert held.run_id == "run_a"


def test_a_conflicting_claim_does_not_create_its_run(store: Store) -> None:
    """A run-creating batch whose claim conflicts writes nothing: the run does not exist afterwards."""
    create_run(store, "run_a", claim=claim("run_a"))

    got = create_run(store, "run_b", claim=claim("run_b"))

    assert got.conflict is not None
    assert got.conflict.run_id == "run_a"
    assert [r.run_id for r in store.list_runs()] == ["run_a"]
    with pytest.raises(tether.NotFound):
        store.get_run("run_b")


@dataclass(frozen=True)
class Case:
    """A key left in `state` at T0, and a new claim at `T0 + later`."""

    state: KeyState
    later: timedelta
    fingerprint: bytes = ARGS_FP
    take_over_stale: bool = True


REPLACE_CASES = {
    "completed within retention": (
        Case(KeyState.COMPLETED, RETENTION - timedelta(seconds=1)),
        False,
    ),
    "completed after retention": (
        Case(KeyState.COMPLETED, RETENTION + timedelta(seconds=1)),
        True,
    ),
    "completed after retention, other args": (
        Case(KeyState.COMPLETED, RETENTION + timedelta(seconds=1), OTHER_FP),
        True,
    ),
    "in progress within its ttl": (
        Case(KeyState.IN_PROGRESS, TTL - timedelta(seconds=1)),
        False,
    ),
    "in progress, stale, take over": (
        Case(KeyState.IN_PROGRESS, TTL + timedelta(seconds=1)),
        True,
    ),
    "in progress, stale, no take over": (
        Case(KeyState.IN_PROGRESS, TTL + timedelta(seconds=1), take_over_stale=False),
        False,
    ),
    "failed, same args": (Case(KeyState.FAILED, timedelta(seconds=1)), True),
    "failed, other args": (
        Case(KeyState.FAILED, timedelta(seconds=1), OTHER_FP),
        False,
    ),
    "in doubt": (Case(KeyState.IN_DOUBT, timedelta(seconds=1)), False),
    "in doubt, a month later": (Case(KeyState.IN_DOUBT, timedelta(days=30)), False),
}


@pytest.mark.parametrize(
    ("case", "replaced"), REPLACE_CASES.values(), ids=REPLACE_CASES.keys()
)
def test_a_claim_replaces_a_key_record_only_when_may_replace_allows(
    store: Store, case: Case, replaced: bool
) -> None:
    """A claim on a key with a record takes it over exactly when the record's state, age and fingerprint allow."""
    create_run(store, "run_a", claim=claim("run_a"))
    if case.state is not KeyState.IN_PROGRESS:
        settle(store, "run_a", case.state)
    previous = store.lookup_key(KEY)
    at = T0 + case.later
    create_run(store, "run_b", at=at)

    got = append(
        store,
        "run_b",
        [intent(1, at)],
        claim=claim(
            "run_b",
            at=at,
            fingerprint=case.fingerprint,
            take_over_stale=case.take_over_stale,
        ),
        at=at,
    )

    now_held = store.lookup_key(KEY)
    assert now_held is not None
    if replaced:
        assert got.conflict is None
        assert got.took_over == previous
        assert (now_held.state, now_held.run_id, now_held.fingerprint) == (
            KeyState.IN_PROGRESS,
            "run_b",
            case.fingerprint,
        )
        assert len(store.events("run_b")) == 3
    else:
        assert got.conflict == previous
        assert now_held == previous
        assert len(store.events("run_b")) == 2


def test_only_the_claiming_run_and_step_settle_a_key(store: Store) -> None:
    """A key update from another run or another step leaves the key as it was; the claimer's update settles it."""
    create_run(store, "run_a", claim=claim("run_a"))
    create_run(store, "run_b")
    claimed = store.lookup_key(KEY)

    settle(store, "run_b", KeyState.COMPLETED)
    settle(store, "run_a", KeyState.COMPLETED, step=2)
    after_strangers = store.lookup_key(KEY)
    settle(store, "run_a", KeyState.COMPLETED, at=T0 + timedelta(seconds=3))

    assert after_strangers == claimed
    settled = store.lookup_key(KEY)
    assert settled is not None
    assert settled.state is KeyState.COMPLETED
    assert settled.output == b'{"charge_id":"ch-1"}'
    assert settled.completed_at == T0 + timedelta(seconds=3)
    assert (settled.run_id, settled.step, settled.fingerprint) == ("run_a", 1, ARGS_FP)


@pytest.mark.parametrize("ends_claim", [False, True])
def test_a_key_in_doubt_keeps_its_claim_unless_the_call_is_known_to_have_stopped(
    store: Store, ends_claim: bool
) -> None:
    """A settle that ends the claim moves its end to now; else it keeps the claimed end."""
    create_run(store, "run_a", claim=claim("run_a"))
    stopped = T0 + timedelta(seconds=2)

    append(
        store,
        "run_a",
        [record.Executed(at=stopped, step=1, output={}, duration_us=1)],
        key_update=KeyUpdate(
            id=KEY,
            run_id="run_a",
            step=1,
            state=KeyState.IN_DOUBT,
            now=stopped,
            ends_claim=ends_claim,
        ),
        at=stopped,
    )

    held = store.lookup_key(KEY)
    assert held is not None
    assert held.state is KeyState.IN_DOUBT
    assert held.lease_until == (stopped if ends_claim else T0 + TTL)


def test_an_unknown_key_has_no_record(store: Store) -> None:
    """Looking up a key nobody claimed returns None, even when a sibling key of another scope exists."""
    create_run(store, "run_a", claim=claim("run_a"))

    others = [
        KeyId(
            tenant="other",
            principal_id=KEY.principal_id,
            capability=KEY.capability,
            key=KEY.key,
        ),
        KeyId(
            tenant=KEY.tenant,
            principal_id="other",
            capability=KEY.capability,
            key=KEY.key,
        ),
        KeyId(
            tenant=KEY.tenant,
            principal_id=KEY.principal_id,
            capability="pay.other",
            key=KEY.key,
        ),
        KeyId(
            tenant=KEY.tenant,
            principal_id=KEY.principal_id,
            capability=KEY.capability,
            key="k-2",
        ),
    ]

    assert [store.lookup_key(k) for k in others] == [None] * 4
    assert isinstance(store.lookup_key(KEY), KeyRecord)


# -- runs -----------------------------------------------------------------------------------


def test_list_runs_returns_the_newest_first_with_limit_and_status_filter(
    store: Store,
) -> None:
    """`list_runs` orders by creation, newest first, honours `limit`, and filters by status."""
    for i, run_id in enumerate(["run_1", "run_2", "run_3"]):
        create_run(store, run_id, at=T0 + timedelta(seconds=i))
    append(store, "run_2", [], status="succeeded", at=T0 + timedelta(seconds=9))

    newest = [r.run_id for r in store.list_runs()]
    two = [r.run_id for r in store.list_runs(limit=2)]
    succeeded = [r.run_id for r in store.list_runs(status="succeeded")]
    executing = [r.run_id for r in store.list_runs(status="executing")]

    assert newest == ["run_3", "run_2", "run_1"]
    assert two == ["run_3", "run_2"]
    assert succeeded == ["run_2"]
    assert executing == ["run_3", "run_1"]
    assert store.list_runs(status="failed") == []


def test_get_run_finds_a_run_by_id_or_unique_prefix(store: Store) -> None:
    """`get_run` takes a full id or a unique prefix of six or more characters."""
    for run_id in ["run_aaaaaa1", "run_aaaaaa2", "run_bbbbbb1"]:
        create_run(store, run_id)

    by_id = store.get_run("run_aaaaaa2")
    by_prefix = store.get_run("run_bbb")

    assert by_id.run_id == "run_aaaaaa2"
    assert by_prefix.run_id == "run_bbbbbb1"
    assert (by_prefix.tenant, by_prefix.principal_id, by_prefix.status) == (
        "acme",
        "pay-bot",
        "executing",
    )


@pytest.mark.parametrize("ref", ["run_aaa", "run_b", "nope-1234", ""])
def test_get_run_refuses_an_ambiguous_short_or_unknown_id(
    store: Store, ref: str
) -> None:
    """`get_run` raises `NotFound` for an ambiguous prefix, a prefix under six characters, or an unknown id."""
    for run_id in ["run_aaaaaa1", "run_aaaaaa2", "run_bbbbbb1"]:
        create_run(store, run_id)

    with pytest.raises(tether.NotFound) as caught:
        store.get_run(ref)

    assert caught.value.code == "not_found"


# -- lease renewal (the heartbeat of a live writer) ------------------------------------


def test_renew_lease_extends_a_live_runs_lease_and_its_steps_claim(
    store: Store,
) -> None:
    """A live writer's heartbeat moves its run's lease and its running step's key
    claim forward (never back), so neither looks abandoned; a writer whose run
    was taken over renews nothing."""
    create_run(store, "run_live01", claim=claim("run_live01"))
    later = T0 + timedelta(hours=1)

    renewed = store.renew_lease("run_live01", epoch=1, until=later, claim=(KEY, 1))
    not_back = store.renew_lease("run_live01", epoch=1, until=T0, claim=(KEY, 1))
    run = store.get_run("run_live01")
    key = store.lookup_key(KEY)
    other_step = store.renew_lease(
        "run_live01", epoch=1, until=later + TTL, claim=(KEY, 2)
    )
    key_after_other_step = store.lookup_key(KEY)
    store.take_over("run_live01", parked=("executing",))
    fenced = store.renew_lease(
        "run_live01", epoch=1, until=later + 2 * TTL, claim=(KEY, 1)
    )
    after_take_over = store.get_run("run_live01")
    key_after_take_over = store.lookup_key(KEY)

    assert (renewed, not_back, other_step, fenced) == (True, True, True, False)
    assert run.lease_until == later
    assert key is not None
    assert key.lease_until == later
    assert key_after_other_step is not None
    assert key_after_other_step.lease_until == later  # not that step's claim
    assert after_take_over.lease_until == later + TTL
    assert key_after_take_over is not None
    assert key_after_take_over.lease_until == later


# -- a person's answer to a step in doubt (Store.resolve_step) -------------------------


def answer(settled: list[bool], *, step: int = 1) -> record.InDoubtResolved:
    return record.InDoubtResolved(
        acted=False,
        at=T0,
        by="alice",
        key=KEY.key,
        key_state="failed" if settled and settled[-1] else None,
        reason="not in the ledger",
        step=step,
    )


def resolve(
    store: Store, run_id: str, key: KeyUpdate | None, *, seen_seq: int
) -> tuple[int, bool]:
    """Resolve step 1 of `run_id`; return the answer's seq and whether the key settled."""
    settled: list[bool] = []

    def event(was: bool) -> record.Event:
        settled.append(was)
        return answer(settled)

    seq = store.resolve_step(
        run_id, step=1, seen_seq=seen_seq, key=key, event=event, at=T0
    )
    return seq, settled[-1]


def failing(run_id: str) -> KeyUpdate:
    return KeyUpdate(id=KEY, run_id=run_id, step=1, state=KeyState.FAILED, now=T0)


def test_an_answer_settles_an_open_key_and_lands_at_the_head_of_a_moved_run(
    store: Store,
) -> None:
    """The key in doubt is settled, and the answer extends the head as it is, not as read."""
    create_run(store, "run_a", claim=claim("run_a"))
    settle(store, "run_a", KeyState.IN_DOUBT)
    seen = store.get_run("run_a").head_seq
    append(store, "run_a", [intent(2)])  # the live run writes meanwhile

    seq, settled = resolve(store, "run_a", failing("run_a"), seen_seq=seen)

    found = store.lookup_key(KEY)
    row = store.get_run("run_a")
    assert settled
    assert found is not None
    assert found.state is KeyState.FAILED
    assert seq == row.head_seq == seen + 2
    assert kinds(store, "run_a")[-1] == (seq, "in_doubt_resolved")
    report = record.verify(
        "run_a",
        store.events("run_a"),
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        key=store.record_key,
    )
    assert report.ok, report
    assert append(store, "run_a", [intent(3)]).head_seq == seq + 1  # chained after it


def test_an_answer_leaves_a_key_another_run_took_and_one_that_completed(
    store: Store,
) -> None:
    """Only this step's open key is settled; the answer still lands, saying so."""
    create_run(store, "run_a", claim=claim("run_a"))
    create_run(store, "run_b")
    later = T0 + TTL + timedelta(seconds=1)
    append(store, "run_b", [intent(1, later)], claim=claim("run_b", at=later), at=later)

    _, taken = resolve(
        store, "run_a", failing("run_a"), seen_seq=store.get_run("run_a").head_seq
    )
    found = store.lookup_key(KEY)
    assert not taken
    assert found is not None
    assert (found.run_id, found.state) == ("run_b", KeyState.IN_PROGRESS)

    settle(store, "run_b", KeyState.COMPLETED, at=later)
    _, done = resolve(
        store,
        "run_b",
        KeyUpdate(id=KEY, run_id="run_b", step=1, state=KeyState.FAILED, now=later),
        seen_seq=0,
    )
    found = store.lookup_key(KEY)
    assert not done
    assert found is not None
    assert found.state is KeyState.COMPLETED


def test_of_two_answers_to_one_step_the_second_is_refused(store: Store) -> None:
    """An answer recorded after what the second answerer read refuses it; nothing lands."""
    create_run(store, "run_a", claim=claim("run_a"))
    settle(store, "run_a", KeyState.IN_DOUBT)
    seen = store.get_run("run_a").head_seq
    resolve(store, "run_a", failing("run_a"), seen_seq=seen)
    head = store.get_run("run_a").head_seq

    with pytest.raises(tether.UsageError, match="resolved already"):
        resolve(store, "run_a", None, seen_seq=seen)

    assert store.get_run("run_a").head_seq == head
    with pytest.raises(tether.NotFound):
        resolve(store, "run_nope", None, seen_seq=0)


# -- grants given back ---------------------------------------------------------------


def pending_request(
    request_id: str,
    run_id: str,
    *,
    principal_id: str = "pay-bot",
    digest: bytes = b"\x07" * 32,
    at: datetime = T0,
) -> ApprovalRow:
    """A pending approval request for a `pay.charge` step 1 of `run_id`, open an hour."""
    return ApprovalRow(
        id=request_id,
        run_id=run_id,
        step=1,
        tenant="acme",
        principal_id=principal_id,
        on_behalf_of=None,
        capability="pay.charge",
        version="1",
        args=b"{}",
        preview=None,
        digest=digest,
        policy_version="p1",
        rule_ids=("big",),
        reasons=("big charges need a human",),
        approvers=(),
        status=ApprovalStatus.PENDING,
        created_at=at,
        expires_at=at + timedelta(hours=1),
    )


def _approved_request(store: Store, run_id: str) -> str:
    """Ask for approval in `run_id` and approve it; return the request's id."""
    row = store.get_run(run_id)
    request = pending_request(f"apr_{run_id}", run_id)
    asked = store.commit(
        Batch(
            run_id=run_id,
            epoch=row.epoch,
            base_seq=row.head_seq,
            base_hash=row.head_hash,
            events=[intent(1)],
            approval=request,
            at=T0,
        )
    )
    assert asked.blocked is None
    store.decide_approval(
        request.id,
        status=ApprovalStatus.APPROVED,
        by="alice",
        note=None,
        now=T0,
        event=lambda r, refused: record.ApprovalDecided(
            approval_id=r.id, at=T0, by="alice", outcome="approved", reason=refused
        ),
    )
    return request.id


def _grant_batch(store: Store, run_id: str, **grant: str) -> Batch:
    row = store.get_run(run_id)
    return Batch(
        run_id=run_id,
        epoch=row.epoch,
        base_seq=row.head_seq,
        base_hash=row.head_hash,
        events=[intent(1)],
        at=T0,
        **grant,  # type: ignore[arg-type]  # use_grant= or return_grant=
    )


@pytest.mark.parametrize("aborted", [False, True])
def test_a_grant_given_back_is_approved_again_unless_its_run_was_aborted(
    store: Store, aborted: bool
) -> None:
    """Given back by a step that never ran: approved again; expired once its asking run was aborted."""
    create_run(store, "run_a")
    create_run(store, "run_b")
    request_id = _approved_request(store, "run_a")
    spent = store.commit(_grant_batch(store, "run_b", use_grant=request_id))
    if aborted:
        append(
            store,
            "run_a",
            [record.RunStatus(at=T0, previous="executing", status="aborted")],
            status="aborted",
        )

    store.commit(_grant_batch(store, "run_b", return_grant=request_id))

    assert spent.blocked is None
    back = store.get_approval(request_id).status
    assert back is (ApprovalStatus.EXPIRED if aborted else ApprovalStatus.APPROVED)


# -- abort ---------------------------------------------------------------------------


def test_an_abort_takes_the_run_and_ends_it_in_one_write(store: Store) -> None:
    """Epoch up, the end's events at the head, status and error code aborted: the old writer is fenced off."""
    create_run(store, "run_a")
    append(store, "run_a", [intent(1)])
    later = T0 + timedelta(seconds=5)
    seen: list[tuple[str, list[int]]] = []

    def end(row: RunRow, stored: list[StoredEvent]) -> list[record.Event]:
        seen.append((row.status, [e.seq for e in stored]))
        return [
            record.RunStatus(
                at=later, previous=row.status, status="aborted", by="alice", reason="x"
            ),
            record.RunFinished(at=later, status="aborted", error_code="aborted"),
        ]

    ended = store.abort_run("run_a", abortable=("executing",), end=end, at=later)

    row = store.get_run("run_a")
    assert seen == [("executing", [1, 2, 3])]
    assert ended == row
    assert (row.status, row.error_code, row.epoch, row.head_seq) == (
        "aborted",
        "aborted",
        2,
        5,
    )
    assert row.updated_at == later
    assert kinds(store, "run_a")[-2:] == [(4, "run_status"), (5, "run_finished")]
    report = record.verify(
        "run_a",
        store.events("run_a"),
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        key=store.record_key,
    )
    assert report.ok, report.reason
    with pytest.raises(tether.LeaseLost):
        append(store, "run_a", [intent(2)], base_seq=3)  # the old writer's next
    assert store.get_run("run_a").head_seq == 5


def test_an_abort_of_a_run_past_aborting_writes_nothing(store: Store) -> None:
    """A run not in an abortable state is refused, its end never made; an unknown run is not found."""
    create_run(store, "run_a")
    append(
        store,
        "run_a",
        [record.RunFinished(at=T0, status="succeeded")],
        status="succeeded",
    )
    before = store.get_run("run_a")
    made: list[str] = []

    def end(row: RunRow, stored: list[StoredEvent]) -> list[record.Event]:
        made.append(row.status)
        return []

    with pytest.raises(tether.UsageError, match="already ended succeeded"):
        store.abort_run("run_a", abortable=("executing",), end=end, at=T0)
    with pytest.raises(tether.NotFound):
        store.abort_run("run_nope", abortable=("executing",), end=end, at=T0)

    assert made == []
    assert store.get_run("run_a") == before
