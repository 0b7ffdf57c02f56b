"""A person's answer to a step in doubt: did the call act upstream or not.

A step is in doubt when it may have acted and tether cannot know: a `none`
write that failed or timed out after it started, or a step a run was cut off
in (its process died, or the run was aborted). Nothing runs it again on its
own: its key, if it has one, refuses every retry (`InDoubt`, or `KeyInUse`
while a cut-off claim is live). Someone checks the upstream, then says what
they found here, and the key is settled by it:

- did not act: the key is `failed`, so a retry under it runs the call again;
- acted: the key is `completed` with the result the person gives, so a retry
  under it gets that result (an idempotent hit) and never acts twice.

The answer is recorded in the step's run (`in_doubt_resolved`) together with
the key's change, in one write, whether the run is still going or has ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from tether import _canonical, record
from tether._approvals import Approver, as_of, why_not_resolve
from tether._stages import validate_output
from tether.capability import Registry
from tether.errors import InvalidOutput, NotAllowedToApprove, NotFound, UsageError
from tether.handle import IN_DOUBT_RULE
from tether.principal import check_text
from tether.store import ApprovalStatus, KeyId, KeyState, KeyUpdate, RunRow, Store

__all__ = ["Resolution", "resolve_in_doubt"]

_OPEN_KEY_STATES = (KeyState.IN_DOUBT, KeyState.IN_PROGRESS)
"""Key states a step in doubt leaves its key in (in progress: a cut-off claim)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolution:
    """What resolving a step in doubt did."""

    run_id: str
    step: int
    capability: str
    acted: bool
    key: str | None
    """The step's idempotency key, if it had one."""
    key_state: str | None
    """What the key became (`completed`, `failed`); None: nothing to settle."""
    seq: int
    """The `in_doubt_resolved` event's place in the run's record."""


def resolve_in_doubt(  # the person's whole answer, by keyword
    store: Store,
    registry: Registry,
    run_id: str,
    step: int,
    *,
    now: datetime,
    acted: bool,
    by: str,
    reason: str,
    output: Mapping[str, Any] | BaseModel | None = None,
    approvers: Mapping[str, Approver] | None,
) -> Resolution:
    """Record a person's answer to a step in doubt and settle its key (see the module).

    `now` is when the answer is recorded (the app's clock; a replay's, the
    recorded time). `by` must be one of `approvers` who decides for the
    run's tenant, and not the run's principal nor whom it acts for; None:
    not checked (a replay applies a recorded answer, checked when it was made).

    Raises:
        NotFound: no such run.
        NotAllowedToApprove: `by` may not answer for this run's steps.
        UsageError: the step is not in doubt, was resolved already, or the
            answer is incomplete (no reason; `acted` with a key and no output;
            an output that does not fit the capability's output schema).
    """
    check_text(by, "who resolves the step (by)", name=True)
    if not check_text(reason, "the reason").strip():
        raise UsageError(
            "a resolution needs a reason: say what you found upstream, for the record"
        )
    if type(step) is not int or step < 1:  # a bool is no step number
        raise UsageError(f"step must be a step number from 1, got {step!r}")
    if output is not None and not acted:
        raise UsageError(
            "an output is the result of a call that acted; drop it, or say it acted"
        )
    row = store.get_run(run_id)
    found = _in_doubt_step(store, row, step)
    if approvers is not None:
        refused = why_not_resolve(
            by,
            approvers,
            run_id=row.run_id,
            tenant=row.tenant,
            callers=(row.principal_id, found.on_behalf_of),
        )
        if refused is not None:
            raise NotAllowedToApprove(refused)
    capability, key = found.capability, found.key
    if found.request is not None:
        answer = as_of(store.get_approval(found.request), now)
        if answer.status is ApprovalStatus.PENDING:
            # The worker that found the step cut off asked about it already:
            # one question, one answer, or the two could disagree.
            raise UsageError(
                f"run {row.run_id} step {step} ({capability}) waits on approval "
                f"request {found.request}: decide it instead (approve: it did not "
                "act, run it again; deny: it acted or must not run again)"
            )
    key_id, open_key, claim_until = _open_key(store, row, step, capability, key)
    if claim_until is not None and claim_until > now and not acted:
        # Its handler may still be in the call (a timed-out thread, or a
        # process an abort fenced off from its record, not from its
        # upstream): a retry now could act a second time.
        raise UsageError(
            f"run {row.run_id} step {step} ({capability}) may still be "
            f"running: its key's claim is live until {claim_until.isoformat()}; "
            "check the upstream again after that, when nothing can still act"
        )
    data = _output_data(registry, capability, output)
    if open_key is not None and acted and data is None:
        raise UsageError(
            f"run {row.run_id} step {step} ({capability}) has idempotency key "
            f"{open_key!r:.80}: give the call's result (--output JSON), which a "
            "retry under the key gets instead of acting again"
        )
    update = None
    state = KeyState.COMPLETED if acted else KeyState.FAILED
    if key_id is not None:
        update = KeyUpdate(
            id=key_id,
            run_id=row.run_id,
            step=step,
            state=state,
            output=None if data is None else _canonical.dumps(data),
            now=now,
        )
    made: list[record.InDoubtResolved] = []

    def event(settled: bool) -> record.Event:
        # The key is settled only if no call took it over since it was read.
        made.append(
            record.InDoubtResolved(
                acted=acted,
                at=now,
                by=by,
                key=open_key if open_key is not None else key,
                key_state=state.value if settled else None,
                output=data,
                reason=reason,
                step=step,
            )
        )
        return made[-1]

    # The answer is appended at the run's head in the store's transaction,
    # not fenced by a head read here: a live run writing steps would keep
    # moving it. Its writer takes the event up at its next write.
    seq = store.resolve_step(
        row.run_id,
        step=step,
        seen_seq=found.last_seq,
        key=update,
        event=event,
        at=now,
    )
    return Resolution(
        run_id=row.run_id,
        step=step,
        capability=capability,
        acted=acted,
        key=made[-1].key,
        key_state=made[-1].key_state,
        seq=seq,
    )


@dataclass(frozen=True, slots=True)
class _Doubted:
    """A step in doubt, as its run's record says."""

    capability: str
    key: str | None
    """The caller's idempotency key, if it gave one."""
    request: str | None
    """The approval request a resume made about it (rule `in_doubt`), if one did."""
    last_seq: int
    """The last event read."""
    on_behalf_of: str | None
    """Whom the run's principal acts for, if anyone."""


def _in_doubt_step(store: Store, row: RunRow, step: int) -> _Doubted:
    """Return what `row`'s record says of its step `step`, if it is in doubt.

    Raises:
        UsageError: the run has no such step, it is not in doubt, or it was
            resolved already.
    """
    capability = None
    key = None
    request = None
    doubted = False
    last_seq = 0
    on_behalf_of = None
    for ev in store.events(row.run_id):
        last_seq = ev.seq
        data = ev.data()
        if data["kind"] == "run_started":
            on_behalf_of = data["principal"].get("on_behalf_of")
        if data.get("step") != step:
            continue
        kind = data["kind"]
        if kind == "validated":
            capability, key = str(data["capability"]), data.get("key")
        elif kind == "in_doubt":
            doubted = True
        elif kind == "approval_requested" and IN_DOUBT_RULE in data["rule_ids"]:
            request = str(data["approval_id"])
        elif kind == "in_doubt_resolved":
            found = "acted" if data["acted"] else "did not act"
            raise UsageError(
                f"run {row.run_id} step {step} was resolved already: {data['by']} "
                f"found it {found} ({data['reason']})"
            )
    if capability is None:
        raise UsageError(
            f"run {row.run_id} has no step {step}; `tether runs show {row.run_id}` "
            "lists its steps"
        )
    if not doubted:
        raise UsageError(
            f"run {row.run_id} step {step} ({capability}) is not in doubt; only a "
            "step recorded in_doubt needs a person's answer"
        )
    return _Doubted(
        capability=capability,
        key=None if key is None else str(key),
        request=request,
        last_seq=last_seq,
        on_behalf_of=on_behalf_of,
    )


def _open_key(
    store: Store, row: RunRow, step: int, capability: str, key: str | None
) -> tuple[KeyId | None, str | None, datetime | None]:
    """Return the step's key, its name and its claim's end if it is still this step's, unsettled.

    Until the claim's end, the step's handler may still be running: a key in
    doubt keeps the end of the claim its call held when a timed-out thread may
    still be in the call (a handler that raised ended it: `KeyUpdate.ends_claim`),
    and a claimed one is renewed while its run lives.

    A step's key is the caller's (`key` from its `validated` event) or, for
    a `keyed` capability called without one, `RUN/STEP`. A key a later call
    took over (its claim lapsed) is that call's now: it is left alone.
    """
    for name in (key,) if key is not None else (f"{row.run_id}/{step}",):
        key_id = KeyId(
            tenant=row.tenant,
            principal_id=row.principal_id,
            capability=capability,
            key=name,
        )
        found = store.lookup_key(key_id)
        if (
            found is not None
            and found.run_id == row.run_id
            and found.step == step
            and found.state in _OPEN_KEY_STATES
        ):
            return key_id, name, found.lease_until
    return None, None, None


def _output_data(
    registry: Registry,
    capability: str,
    output: Mapping[str, Any] | BaseModel | None,
) -> dict[str, Any] | None:
    """Return the output's JSON form, checked against the capability's output schema.

    Raises:
        UsageError: the capability is not registered here (its result could be
            neither checked nor have its secrets masked), or the output does
            not fit its schema.
    """
    if output is None:
        return None
    try:
        cap = registry.get(capability)
    except NotFound:
        raise UsageError(
            f"{capability} is not registered here, so the result you give can be "
            "neither checked against its output schema nor have its secrets "
            "masked; resolve from the app that registers it (tether runs "
            "resolve --app MODULE:ATTR)"
        ) from None
    try:
        _, data = validate_output(cap, output)
    except InvalidOutput as exc:  # the person's mistake, said as theirs
        raise UsageError(f"{exc.message}; give the result the call returned") from exc
    return data
