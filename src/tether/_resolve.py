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
from tether._stages import validate_output
from tether.capability import Registry
from tether.errors import HeadMoved, InvalidOutput, LeaseLost, NotFound, UsageError
from tether.principal import check_text
from tether.store import Batch, KeyId, KeyState, KeyUpdate, RunRow, Store

__all__ = ["Resolution", "resolve_in_doubt"]

_RACES = 20
"""How many times a resolution re-reads a run whose record grew meanwhile."""

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
) -> Resolution:
    """Record a person's answer to a step in doubt and settle its key (see the module).

    `now` is when the answer is recorded (the app's clock; a replay's, the
    recorded time).

    Raises:
        NotFound: no such run.
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
    for tries in range(_RACES, -1, -1):
        row = store.get_run(run_id)
        capability, key = _in_doubt_step(store, row, step)
        key_id, open_key, claim_until = _open_key(store, row, step, capability, key)
        if claim_until is not None and claim_until > now and not acted:
            # Its process may still be in the call (an abort fences off its
            # record, not its handler): a retry now could act a second time.
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
        key_state = None
        update = None
        if key_id is not None and open_key is not None:
            state = KeyState.COMPLETED if acted else KeyState.FAILED
            key_state = state.value
            update = KeyUpdate(
                id=key_id,
                run_id=row.run_id,
                step=step,
                state=state,
                output=None if data is None else _canonical.dumps(data),
                now=now,
            )
        event = record.InDoubtResolved(
            acted=acted,
            at=now,
            by=by,
            key=open_key if open_key is not None else key,
            key_state=key_state,
            output=data,
            reason=reason,
            step=step,
        )
        try:
            committed = store.commit(
                Batch(
                    run_id=row.run_id,
                    events=[event],
                    at=now,
                    epoch=row.epoch,
                    base_seq=row.head_seq,
                    base_hash=row.head_hash,
                    key_update=update,
                )
            )
        except (HeadMoved, LeaseLost):
            # The run's writer (or a person deciding its approval) wrote since
            # it was read; a writer holding it takes this event up at its next
            # write (`RunWriter`). Read again and write after them.
            if not tries:
                raise
            continue
        return Resolution(
            run_id=row.run_id,
            step=step,
            capability=capability,
            acted=acted,
            key=event.key,
            key_state=key_state,
            seq=committed.head_seq,
        )
    raise AssertionError("the loop returns or raises")  # pragma: no cover


def _in_doubt_step(store: Store, row: RunRow, step: int) -> tuple[str, str | None]:
    """Return the capability and explicit key of `row`'s step `step`, if it is in doubt.

    Raises:
        UsageError: the run has no such step, it is not in doubt, or it was
            resolved already.
    """
    capability = None
    key = None
    doubted = False
    for ev in store.events(row.run_id):
        data = ev.data()
        if data.get("step") != step:
            continue
        kind = data["kind"]
        if kind == "validated":
            capability, key = str(data["capability"]), data.get("key")
        elif kind == "in_doubt":
            doubted = True
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
    return capability, None if key is None else str(key)


def _open_key(
    store: Store, row: RunRow, step: int, capability: str, key: str | None
) -> tuple[KeyId | None, str | None, datetime | None]:
    """Return the step's key, its name and its claim's end if it is still this step's, unsettled.

    The claim's end is None unless the key is still claimed (in progress).

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
            claimed = found.state is KeyState.IN_PROGRESS
            return key_id, name, found.lease_until if claimed else None
    return None, None, None


def _output_data(
    registry: Registry,
    capability: str,
    output: Mapping[str, Any] | BaseModel | None,
) -> dict[str, Any] | None:
    """Return the output's JSON form, checked against the capability's schema when it is registered.

    Raises:
        UsageError: the output does not fit the schema, or is not a JSON object.
    """
    if output is None:
        return None
    try:
        cap = registry.get(capability)
    except NotFound:
        cap = None
    if cap is not None:
        try:
            _, data = validate_output(cap, output)
        except InvalidOutput as exc:  # the person's mistake, said as theirs
            raise UsageError(
                f"{exc.message}; give the result the call returned"
            ) from exc
        return data
    if isinstance(output, BaseModel):
        output = output.model_dump(mode="json")
    if not isinstance(output, Mapping):
        raise UsageError(
            f"the output must be a JSON object, got {type(output).__name__}"
        )
    try:
        return dict(_canonical.loads(_canonical.dumps(dict(output))))
    except (_canonical.CanonicalError, TypeError) as exc:
        raise UsageError(f"the output has no exact JSON form: {exc}") from exc
