"""The scratch store a replay writes to, seeded with what other runs left behind.

A recorded step may have met state that other runs made: a budget they had
spent, a pending approval request for the same call, a finished call under the
same idempotency key. The scratch store starts empty, so before each step the
walk tells it what the record says the step met, and the store puts exactly
that in place when the step's write arrives, keyed by what today's code asks
for (the limit's scope and window, the request's digest). Today's code then
decides against that state: a lowered budget refuses where the record shows
room, a raised one admits where the record shows a refusal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from tether import _canonical
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Committed,
    KeyId,
    KeyRecord,
    KeyState,
)
from tether.store._breakers import BreakerRow, BreakerSpec, BreakerState, breaker_view
from tether.store._limits import LimitKind, to_us
from tether.store.memory import MemoryStore

__all__ = ["Met", "ScratchStore", "breaker_met", "met_by"]

_APPROVAL_ID = re.compile(r"\bapr_[0-9A-Za-z]+")
_TRIAL = re.compile(r"^trial call (\d+) of \d+$")
"""A trial call's `breaker_checked` reason (`tether.store._breakers.admit_breaker`)."""
_PAST_BREAKER = frozenset(
    {"executed", "failed", "in_doubt", "retry_scheduled", "idempotent_hit"}
)
"""Kinds a step writes after its breaker check (or instead of it); its intent
comes before the check's event, which the store appends to the same write."""


@dataclass(slots=True, kw_only=True)
class Met:
    """What one recorded step met that its own run did not make."""

    limits: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    """Recorded refusals by limit id: `used` and `held` as the step saw them."""
    pending: str | None = None
    """Another run's pending approval request the step waited on."""
    key_output: Mapping[str, Any] | None = None
    """A finished call's output the step was answered with (an idempotent hit)."""
    key_origin: tuple[str, int] | None = None
    grant: Mapping[str, Any] | None = None
    """Another run's approved request the step ran under (its `approval_used`)."""
    key_conflict: bool = False
    """The step's key was first used with other secrets (which the record masks)."""


_OTHER_SECRETS = b"replay: first used with other secret values"
"""A fingerprint no call makes: the key's first call had other secrets."""


def met_by(
    recorded: Sequence[Mapping[str, Any]],
    own_requests: set[str],
    *,
    secret_args: bool = False,
) -> Met:
    """Read from a step's recorded events what it met outside its run.

    Args:
        recorded: the step's recorded events.
        own_requests: the approval requests the run made itself.
        secret_args: the capability takes secrets, which the record masks: the
            replay cannot tell two calls' secrets apart, so a key conflict the
            record shows is the world's answer.
    """
    met = Met()
    for e in recorded:
        kind = e["kind"]
        if (
            secret_args
            and kind == "failed"
            and e.get("stage") == "idempotency"
            and e.get("error_code") == "idempotency_error"
        ):
            met.key_conflict = True
        elif kind == "limit_refused":
            met.limits[str(e["limit"])] = e
        elif kind == "approval_used" and str(e["approval_id"]) not in own_requests:
            met.grant = e
        elif kind == "idempotent_hit" and e.get("original_run"):
            met.key_output = e.get("output")
            met.key_origin = (str(e["original_run"]), int(e["original_step"]))
        elif (
            kind == "failed"
            and e.get("stage") == "policy"
            and e.get("error_code") == "approval_required"
            and not any(x["kind"] == "approval_requested" for x in recorded)
        ):
            found = _APPROVAL_ID.search(str(e.get("message", "")))
            if found and found.group() not in own_requests:
                met.pending = found.group()
    return met


def breaker_met(
    recorded: Sequence[Mapping[str, Any]],
    breaker_id: str,
    known: str,
    *,
    passes_open: bool = False,
) -> tuple[Mapping[str, Any] | None, bool, str]:
    """Read whether other runs moved a shared breaker before this step met it.

    `known` is where this run's own record last left the breaker (its checks
    and the transitions its steps made or saw; `closed` before any). A step
    that met it elsewhere than that (a check in another state, a closed
    breaker passed, a transition from a state this run never saw) met what
    other runs did: the breaker is put there. What this run's own calls did
    is left to today's settings, so a changed threshold still shows.

    `passes_open`: the step is a read and the breaker degrades to read-only,
    so it goes through an open or half-open breaker without a check: passing
    tells nothing of where the breaker stood.

    Returns:
        The `breaker_checked` event the step met (None: it passed a closed
        breaker, which writes nothing), whether to put the breaker there,
        and where the step left it (the next step's `known`).
    """
    checked = None
    seed = False
    state = known
    reached = False
    for e in recorded:
        kind = e["kind"]
        if kind in ("intent", "executed", "in_doubt") or (
            kind == "failed" and e.get("stage") in ("execute", "output")
        ):
            reached = True
        if kind in _PAST_BREAKER:
            break
        if e.get("breaker") != breaker_id:
            continue
        if kind == "breaker_transition":  # a time move this step saw
            seed = seed or e.get("previous") != state
            state = str(e.get("state"))
        elif kind == "breaker_checked":
            checked, reached = e, True
            seed = seed or e.get("state") != state
            break
    passed_closed = reached and checked is None and not passes_open
    if passed_closed:
        seed = seed or state != BreakerState.CLOSED.value
    after = state if checked is None else str(checked.get("state"))
    if passed_closed:
        after = BreakerState.CLOSED.value
    for e in recorded:  # what the step's own outcome did to it
        if e["kind"] == "breaker_transition" and e.get("breaker") == breaker_id:
            after = str(e.get("state"))
    return checked, seed and reached, after


class ScratchStore(MemoryStore):
    """A memory store that puts in place, at a step's write, what the step met."""

    def __init__(self) -> None:
        super().__init__()
        self.met = Met()
        self.on_behalf_of: str | None = None
        """Whom the replayed run acts for: another run's grant it used was
        for the same call, so for the same person."""

    def commit(self, batch: Batch) -> Committed:
        """Seed what the current step met, then commit as the memory store does."""
        met = self.met
        if met.limits and batch.reserve:
            self._seed_limits(batch, met.limits)
        pending = met.pending
        if pending is not None and batch.approval and pending not in self._approvals:
            # Another run's request for the same call: same digest, still pending.
            self._approvals[pending] = replace(batch.approval, id=pending)
        if met.key_output is not None and batch.claim is not None:
            self._seed_key(batch, met)
        if met.key_conflict and batch.claim is not None:
            existing = self._keys.get(batch.claim.id)
            if existing is not None:
                return Committed(
                    head_seq=batch.base_seq,
                    head_hash=batch.base_hash,
                    conflict=replace(existing, fingerprint=_OTHER_SECRETS),
                )
        return super().commit(batch)

    def seed_breaker(
        self, spec: BreakerSpec, checked: Mapping[str, Any] | None, now: datetime
    ) -> None:
        """Put a shared breaker where the record shows the step found it.

        Other runs' calls move a breaker too, and their outcomes are not in
        this record: a `breaker_checked` event says where it stood (open, or
        half-open with a trial slot free or not); a step that passed with none
        found it closed. The scratch breaker is moved there only when this
        run's own replayed calls did not already leave it so; today's settings
        then decide what that state does to the step (its mode, its trials).
        """
        at_us = to_us(now)
        with self._lock:
            row, _ = breaker_view(self._tables.breaker(spec.id), spec, at_us)
            state = BreakerState.CLOSED if checked is None else _state(checked)
            generation = row.generation + 1
            if state is BreakerState.HALF_OPEN:
                assert checked is not None
                trial = _TRIAL.match(str(checked.get("reason", "")))
                taken = (
                    int(trial.group(1)) - 1
                    if checked.get("admitted") and trial
                    else spec.probes
                )
                if row.state is state and row.probes == taken:
                    return
                seeded = BreakerRow(
                    state=state,
                    since=at_us,
                    generation=generation,
                    probes=taken,
                    probe_admits=(at_us,) * taken,
                    probe_deadline=at_us + spec.probe_timeout_us if taken else 0,
                )
            elif row.state is state:
                return
            else:
                seeded = BreakerRow(state=state, since=at_us, generation=generation)
            self._tables.set_breaker(spec.id, seeded)

    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the key's record; as first used with other secrets, if it was."""
        existing = super().lookup_key(key)
        if existing is not None and self.met.key_conflict:
            return replace(existing, fingerprint=_OTHER_SECRETS)
        return existing

    def latest_approval(
        self,
        tenant: str,
        principal_id: str,
        digest: bytes,
        rule_ids: tuple[str, ...],
        *,
        on_behalf_of: str | None,
    ) -> ApprovalRow | None:
        """Answer as the store did: with another run's approved request, if one was used."""
        used = self.met.grant
        if used is not None and str(used["approval_id"]) not in self._approvals:
            when = datetime.fromisoformat(str(used["at"]).replace("Z", "+00:00"))
            self._approvals[str(used["approval_id"])] = ApprovalRow(
                id=str(used["approval_id"]),
                run_id="replay:other-run",
                step=0,
                tenant=tenant,
                principal_id=principal_id,
                on_behalf_of=self.on_behalf_of,
                capability="",
                version="",
                args=b"{}",
                preview=None,
                digest=digest,  # made for exactly this call, as the grant was
                policy_version="",
                rule_ids=rule_ids,  # asked by the same rules, as the grant was
                reasons=(),
                approvers=(),
                status=ApprovalStatus.APPROVED,
                created_at=when,
                expires_at=when + timedelta(days=1),
                decided_by=str(used.get("decided_by")),
                decided_at=when,
            )
        return super().latest_approval(
            tenant, principal_id, digest, rule_ids, on_behalf_of=on_behalf_of
        )

    def events_since(self, run_id: str, start: int) -> list[dict[str, Any]]:
        """The run's events from position `start` on, as JSON data.

        `events()` encodes and chains the whole record each time: a walk that
        reads after every step would be quadratic in the run's length.
        """
        with self._lock:
            new = self._runs[run_id].events[start:]
        return [_canonical.loads(_canonical.dumps_fields(e)) for e in new]

    def _seed_limits(
        self, batch: Batch, refused: Mapping[str, Mapping[str, Any]]
    ) -> None:
        tables = self._tables
        now = to_us(batch.at)
        for r in batch.reserve:
            seen = refused.get(r.limit_id)
            if seen is None or r.kind is LimitKind.RATE:
                continue  # a rate limit's state is a time, not a count: not seeded
            want_used = Decimal(str(seen.get("used", 0)))
            want_held = Decimal(str(seen.get("held", 0)))
            if r.kind is LimitKind.CONCURRENCY:
                used, held, _ = tables.usage(r.limit_id, r.scope, r.window, now)
                for n in range(int(want_used) - int(used + held)):
                    tables.add_hold(
                        r.limit_id, r.scope, r.window, "replay:other", n,
                        Decimal(1), r.hold_until or now + 1, charged=False,
                    )  # fmt: skip
                continue
            self.seed_counter(
                (r.limit_id, r.scope, r.window),
                used=want_used,
                held=want_held,
                at_us=now,
                hold_until=r.hold_until or now + 1,
            )

    def seed_counter(
        self,
        key: tuple[str, str, int],
        *,
        used: Decimal,
        held: Decimal,
        at_us: int,
        hold_until: int,
    ) -> None:
        """Raise a counter to what the record says a refusal met (other runs' use).

        `key` is (limit id, scope, window start in µs). Only raises: what this
        run itself charged already counts.
        """
        tables = self._tables
        have_used, have_held, _ = tables.usage(*key, at_us)
        if used > have_used:
            tables.set_counter(*key, used, at_us)
        if held > have_held:
            tables.add_hold(
                *key, "replay:other", 0, held - have_held, hold_until, charged=False
            )

    def _seed_key(self, batch: Batch, met: Met) -> None:
        claim = batch.claim
        assert claim is not None
        assert met.key_origin is not None
        if claim.id in self._keys:
            return
        run_id, step = met.key_origin
        self._keys[claim.id] = KeyRecord(
            state=KeyState.COMPLETED,
            fingerprint=claim.fingerprint,  # the same args: it answered the step
            run_id=run_id,
            step=step,
            output=_canonical.dumps(met.key_output),
            claimed_at=claim.now,
            lease_until=claim.lease_until,
            completed_at=claim.now,
        )


def _state(checked: Mapping[str, Any]) -> BreakerState:
    try:
        return BreakerState(str(checked.get("state")))
    except ValueError:
        return BreakerState.CLOSED  # not a state this tether knows: as if passed
