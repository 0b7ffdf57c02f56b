"""The record standing in for the world: clock, ids, and every handler's result."""

from __future__ import annotations

import copy
import itertools
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from tether import record
from tether._effects import Execute, Executed, Flow, Sleep
from tether.capability import Capability
from tether.errors import UsageError
from tether.replay._records import at

__all__ = [
    "Attempt",
    "FirstRng",
    "ReplayClock",
    "ReplayIds",
    "attempts",
    "call_of",
    "drive",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_IN_DOUBT = re.compile(r"did not finish cleanly \((.*)\); its effect is unknown", re.S)
"""The handler's own error inside an `in_doubt` message (gateway.step writes it)."""
_TIMED_OUT = re.compile(r": did not (finish|start) within its [0-9.e+]+s timeout")


class ReplayClock:
    """A clock that reads the record: the walk sets it to each event's time."""

    __slots__ = ("_now",)

    def __init__(self, start: datetime) -> None:
        self._now = start

    def set(self, at: datetime) -> None:
        self._now = at

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return (self._now - _EPOCH).total_seconds()

    def sleep(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


class ReplayIds:
    """Ids in the order the record used them; made-up ones past its end."""

    __slots__ = ("_given", "_made")

    def __init__(self, given: Mapping[str, Iterable[str]]) -> None:
        self._given = {prefix: deque(ids) for prefix, ids in given.items()}
        self._made = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        queue = self._given.get(prefix)
        if queue:
            return queue.popleft()
        return f"{prefix}replay{next(self._made):026d}"


class FirstRng:
    """Retry jitter in a replay: the delay is the world's, and not compared."""

    def uniform(self, a: float, b: float) -> float:
        return a


class _NotAnOutput:
    """Stands in for a recorded output that failed the output schema."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<an output the record shows failed its schema>"


_NOT_AN_OUTPUT = _NotAnOutput()


class _RecordedFailure(Exception):
    """Stands in for a recorded handler error; renamed to the recorded type."""


_failure_types: dict[str, type[Exception]] = {}


def _failure(type_name: str, text: str) -> Exception:
    cls = _failure_types.get(type_name)
    if cls is None:
        cls = _failure_types[type_name] = type(type_name, (_RecordedFailure,), {})
    return cls(text)


@dataclass(slots=True)
class Attempt:
    kind: Literal["ok", "failed"]
    event: dict[str, Any]


def call_of(
    recorded: Sequence[dict[str, Any]], proposal: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any], str | None, bool] | None:
    """The call that made a step: capability, args, key and the caller's dry_run."""
    by_kind = {e["kind"]: e for e in reversed(recorded)}  # the first of each kind
    validated = by_kind.get("validated")
    if validated is not None:
        name, args = str(validated["capability"]), dict(validated["args"])
    elif proposal is not None:
        name, args = str(proposal["capability"]), dict(proposal.get("args") or {})
    else:
        return None
    if validated is not None and "key" in validated:
        # Since the record keeps the caller's key and dry-run flag, they are read
        # as given; older records have them only where the step got far enough.
        return name, args, validated["key"], bool(validated.get("dry_run"))
    key = None
    if "intent" in by_kind:
        key = by_kind["intent"].get("key")
    elif "idempotent_hit" in by_kind:
        key = by_kind["idempotent_hit"].get("key")
    elif proposal is not None:
        key = proposal.get("idempotency_key")
    if proposal is not None and "dry_run" in proposal:
        dry_run = bool(proposal["dry_run"])
    else:
        executed = by_kind.get("executed")
        decided = by_kind.get("decided")
        forced = decided is not None and decided.get("verdict") == "dry_run_only"
        dry_run = bool(executed and executed.get("dry_run")) and not forced
    return name, args, key, dry_run


def attempts(recorded: Sequence[dict[str, Any]]) -> Iterator[Attempt]:
    """The handler's recorded results, attempt by attempt."""
    for e in recorded:
        kind = e["kind"]
        if kind == "executed":
            yield Attempt("ok", e)
        elif kind in ("retry_scheduled", "in_doubt") or (
            kind == "failed" and e.get("stage") in ("execute", "output")
        ):
            yield Attempt("failed", e)


def recorded_checks(
    cap: Capability[Any, Any], recorded: Sequence[dict[str, Any]]
) -> Capability[Any, Any]:
    """The capability with each precondition answering as the record says it did.

    A precondition reads live state (is the version still the one expected?):
    asked again it would read today's world, or call the upstream. So its
    outcome is the world's and comes from the record; what replay checks is
    that today's capability runs the same checks, in the same order.
    """
    checked = next((e for e in recorded if e["kind"] == "precondition_checked"), {})
    failed, reason = checked.get("failed"), checked.get("reason")

    def stand_in(name: str) -> Callable[[object], bool | str]:
        def check(_args: object) -> bool | str:
            return str(reason or f"{name} does not hold") if name == failed else True

        check.__name__ = name
        return check

    twin = copy.copy(cap)
    twin.preconditions = tuple(
        stand_in(getattr(c, "__name__", type(c).__name__)) for c in cap.preconditions
    )
    return twin


def drive(
    flow: Flow,
    cap: Capability[Any, Any],
    attempts: deque[Attempt],
    preview: Mapping[str, Any] | None,
    clock: ReplayClock,
    *,
    cut_off: bool = False,
) -> record.Outcome | None:
    """Drive a step with the record standing in for every handler call.

    With `cut_off` (the step's process died mid-call: the record ends at its
    intent), the step stops where the record does, at the call with no
    recorded answer, and None is returned.
    """
    reply: object = None
    while True:
        try:
            effect = flow.send(reply)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]  # the flow's return value
        if isinstance(effect, Execute) and effect.preview:
            reply = _recorded_preview(cap, preview)
        elif isinstance(effect, Execute) and cut_off and not attempts:
            flow.close()  # the process died here: nothing after it was written
            return None
        elif isinstance(effect, Execute):
            reply = _recorded_result(cap, attempts, clock)
        elif isinstance(effect, Sleep):
            clock.sleep(effect.seconds)
            reply = None
        else:
            reply = effect.perform()  # the scratch store


def _recorded_preview(
    cap: Capability[Any, Any], preview: Mapping[str, Any] | None
) -> Executed:
    """An approval request's preview, as the record kept it."""
    if preview is not None and isinstance(preview.get("output"), Mapping):
        # The data as recorded: the call path checks it against today's output
        # schema, so a changed schema is a divergence, not a crash.
        return Executed(value=dict(preview["output"]), duration_us=0)
    if preview is not None and "error" in preview:
        message = str(preview.get("message", ""))
        if preview["error"] == "step_timeout":
            return Executed(timed_out=True, duration_us=0)
        type_name, text = _split_failure(cap.name, message, None)
        return Executed(error=_failure(type_name, text), duration_us=0)
    return Executed(
        error=_failure("NotInRecord", "the record has no preview for this request"),
        duration_us=0,
    )


def _recorded_result(
    cap: Capability[Any, Any], attempts: deque[Attempt], clock: ReplayClock
) -> Executed:
    if not attempts:
        # No answer in the record: the call never ran, or it answered and was
        # refused after (a read charged after it answers drops the answer).
        # Either way a retry would invent attempts the record never had, so
        # the stand-in failure is one tether never retries.
        return Executed(
            error=UsageError(
                f"{cap.name}: the record has no result for this call (it never "
                "ran, or its answer was dropped when a limit refused it after)"
            ),
            duration_us=0,
        )
    attempt = attempts.popleft()
    e = attempt.event
    clock.set(at(e))
    duration = int(e.get("duration_us") or 0)
    if attempt.kind == "ok":
        # The data as recorded: the call path checks it against today's output
        # schema, so a changed schema is a divergence, not a crash.
        return Executed(value=dict(e["output"]), duration_us=duration)
    code = e.get("error_code")
    message = str(e.get("message", ""))
    if code == "step_timeout":
        started = "did not start" not in message
        return Executed(
            timed_out=True,
            started=started,
            still_running=started and "may still be running" in message,
            duration_us=duration,
        )
    if code == "usage_error":
        return Executed(error=UsageError(message), duration_us=duration)
    if code == "invalid_output" or e.get("error_type") == "InvalidOutput":
        # The record keeps the error, not the output that caused it: an answer no
        # output schema accepts fails the call path's output check again.
        return Executed(value=_NOT_AN_OUTPUT, duration_us=duration)
    if e["kind"] == "in_doubt":
        inner = _IN_DOUBT.search(message)
        message = inner.group(1) if inner else message
        if _TIMED_OUT.search(message):
            running = "may still be running" in message
            return Executed(timed_out=True, still_running=running, duration_us=duration)
    type_name, text = _split_failure(cap.name, message, e.get("error_type"))
    return Executed(error=_failure(type_name, text), duration_us=duration)


def _split_failure(name: str, message: str, error_type: object) -> tuple[str, str]:
    """Recover the handler's error type and text from `NAME: Type: text`."""
    rest = message.removeprefix(f"{name}: ")
    type_name, sep, text = rest.partition(": ")
    if isinstance(error_type, str) and error_type and error_type != type_name and sep:
        return error_type, text
    if not sep or not type_name.isidentifier():
        return (error_type if isinstance(error_type, str) else "Exception"), rest
    return type_name, text
