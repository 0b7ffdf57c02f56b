"""The effects the call path yields, and the two loops that perform them.

`gateway.step` decides; what touches the world is one of these values, yielded
and performed by `drive` (in this thread) or `adrive` (without blocking an event
loop). Effects never raise into a driver: `Execute` returns an `Executed` value
holding the handler's output or exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import anyio.to_thread

from tether.clock import Clock, SystemClock

if TYPE_CHECKING:
    from tether.record import Outcome

__all__ = [
    "Execute",
    "Executed",
    "Flow",
    "GatewayEffect",
    "Sleep",
    "StoreOp",
    "adrive",
    "drive",
]


class StoreOp:
    """A store call; run in a worker thread by `adrive` so the loop never blocks."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any], *args: object) -> None:
        self.fn = fn
        self.args = args

    def perform(self) -> Any:
        """Call the store."""
        return self.fn(*self.args)

    async def aperform(self) -> Any:
        """Call the store in a worker thread."""
        return await anyio.to_thread.run_sync(self.fn, *self.args)


@dataclass(slots=True, kw_only=True)
class Executed:
    """What a handler did: its return value or its exception; never raised."""

    value: object = None
    error: BaseException | None = None
    timed_out: bool = False
    """Tether's deadline fired (not a `TimeoutError` the handler raised itself)."""
    still_running: bool = False
    """The handler may still be acting: a sync handler's thread cannot be stopped."""
    started: bool = True
    """False when the deadline passed while the call still waited for a thread."""
    duration_us: int


@dataclass(slots=True, kw_only=True)
class Execute:
    """Run a handler (real or dry-run) with its timeout."""

    fn: Callable[..., Any]
    is_async: bool
    call_args: tuple[object, ...]
    timeout: timedelta | None
    clock: Clock
    pool: Callable[[], ThreadPoolExecutor]
    preview: bool = False
    """A dry run asked for an approval request's preview, not the step's own call
    (replay answers it from the request's recorded preview)."""

    def _done(
        self,
        start: float,
        value: object = None,
        error: BaseException | None = None,
        *,
        timed_out: bool = False,
        still_running: bool = False,
        started: bool = True,
    ) -> Executed:
        elapsed = int((self.clock.monotonic() - start) * 1e6)
        return Executed(
            value=value,
            error=error,
            timed_out=timed_out,
            still_running=still_running,
            started=started,
            duration_us=elapsed,
        )

    def _limit(self) -> float | None:
        return None if self.timeout is None else self.timeout.total_seconds()

    def perform(self) -> Executed:
        """Run the handler in this thread (a worker thread when it has a timeout)."""
        start = self.clock.monotonic()
        try:
            if self.is_async:
                value, timed_out = asyncio.run(self._acall())
                if timed_out:
                    return self._done(start, timed_out=True)
            elif self.timeout is not None:
                future = self.pool().submit(self.fn, *self.call_args)
                try:
                    value = future.result(self._limit())
                except FutureTimeout:
                    if future.done():  # the handler's own TimeoutError
                        raise
                    # A queued call that never started is cancelled; a started one
                    # cannot be stopped and may still act.
                    started = not future.cancel()
                    return self._done(
                        start, timed_out=True, still_running=started, started=started
                    )
            else:
                value = self.fn(*self.call_args)
        except Exception as exc:  # noqa: BLE001  # a user handler may raise anything
            return self._done(start, error=exc)
        return self._done(start, value=value)

    async def _acall(self) -> tuple[Any, bool]:
        with anyio.move_on_after(self._limit()) as scope:
            return await self.fn(*self.call_args), False
        return None, scope.cancelled_caught

    async def aperform(self) -> Executed:
        """Await the handler (a sync one in a worker thread)."""
        start = self.clock.monotonic()
        try:
            if self.is_async:
                value, timed_out = await self._acall()
                if timed_out:
                    return self._done(start, timed_out=True)
            else:
                with anyio.move_on_after(self._limit()) as scope:
                    value = await anyio.to_thread.run_sync(
                        self.fn, *self.call_args, abandon_on_cancel=True
                    )
                if scope.cancelled_caught:
                    return self._done(start, timed_out=True, still_running=True)
        except Exception as exc:  # noqa: BLE001  # a user handler may raise anything
            return self._done(start, error=exc)
        return self._done(start, value=value)


@dataclass(slots=True)
class Sleep:
    """Wait (a throttle's delay, a retry's backoff) on the run's clock."""

    seconds: float
    clock: Clock

    def perform(self) -> None:
        """Wait in this thread."""
        self.clock.sleep(self.seconds)

    async def aperform(self) -> None:
        """Wait without blocking the loop (a fake clock just moves)."""
        if isinstance(self.clock, SystemClock):
            await anyio.sleep(self.seconds)
        else:
            self.clock.sleep(self.seconds)


GatewayEffect: TypeAlias = StoreOp | Execute | Sleep
Flow: TypeAlias = "Generator[GatewayEffect, Any, Outcome]"


def drive(flow: Flow) -> Outcome:
    """Perform a flow's effects in this thread and return its outcome.

    If the handler is interrupted (Ctrl-C's `KeyboardInterrupt`, `SystemExit`),
    the step's outcome is still recorded, as `adrive` records a cancelled one,
    before the interruption propagates: the intent is on disk, and a record
    without its result would leave the key claimed and the effect unaccounted
    for.
    """
    reply: object = None
    interrupted: BaseException | None = None
    while True:
        try:
            effect = flow.send(reply)
        except StopIteration as done:
            if interrupted is not None:
                raise interrupted from None
            return done.value  # type: ignore[no-any-return]  # the flow's return value
        try:  # free when nothing is raised (3.11): the common path pays nothing
            reply = effect.perform()
        except (KeyboardInterrupt, SystemExit) as exc:  # mid-handler, say
            if not isinstance(effect, Execute):
                raise
            interrupted = exc
            # Tether did not see the handler end: like a timed-out one, it is not
            # retried, and its key and leases are held until their claims lapse
            # (a `none` write goes in doubt).
            reply = Executed(error=exc, still_running=True, duration_us=0)


async def adrive(flow: Flow) -> Outcome:
    """Perform a flow's effects without blocking the event loop.

    If the caller is cancelled while the handler runs, the step's outcome is
    still recorded (shielded from the cancellation) before it propagates: the
    intent is on disk, and a record without its result would leave the key
    claimed and the effect unaccounted for.
    """
    reply: object = None
    cancelled: BaseException | None = None
    while True:
        try:
            effect = flow.send(reply)
        except StopIteration as done:
            if cancelled is not None:
                raise cancelled from None
            return done.value  # type: ignore[no-any-return]  # the flow's return value
        if cancelled is not None:
            with anyio.CancelScope(shield=True):
                reply = await effect.aperform()
            continue
        try:
            reply = await effect.aperform()
        except BaseException as exc:
            if not isinstance(effect, Execute) or isinstance(exc, Exception):
                raise
            cancelled = exc  # cancellation (or KeyboardInterrupt) mid-handler
            # An awaited handler stops at the cancellation; a thread does not.
            reply = Executed(
                error=exc, still_running=not effect.is_async, duration_us=0
            )
