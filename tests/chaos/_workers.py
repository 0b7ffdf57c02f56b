"""Worker processes for the chaos tests, and the capability they share with the parent.

Run as a script (`python _workers.py COMMAND ...`): each command opens its own
`Tether` on a SQLite file the parent names, prints marker lines on stdout for the
parent to wait on, and acts. The handler appends one line per call to an
effects file with `O_APPEND` (one `write`, so lines from several processes never
interleave): the parent counts side effects there, outside the database.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

import tether

READY = "READY"
START_S = 60.0
"""How long interpreters may take to start: not under test, and slow on a busy 2-core machine."""
STEP_RETURNED = "STEP-RETURNED "
IN_HANDLER = "IN-HANDLER "
RESULT = "RESULT "
ARGS = {"order_id": "o-1", "amount_cents": 1200}
PRINCIPAL = tether.Principal("pay-bot", tenant="acme")
RECORD_KEY_VAR = "TETHER_RECORD_KEY"


def worker_env() -> dict[str, str]:
    """Return the `env=` a worker opens its `Tether` with: only the record key, if set.

    Every process on one PostgreSQL database must sign chain heads with the same
    key, which no key file can share; on SQLite the key file beside the database
    does, and the variable is unset.
    """
    return {k: v for k, v in os.environ.items() if k == RECORD_KEY_VAR}


class ChargeIn(BaseModel, extra="forbid"):
    order_id: str
    amount_cents: int


class ChargeOut(BaseModel):
    charge_id: str
    order_id: str
    amount_cents: int
    key: str | None


def append_effect(effects: Path, line: str) -> None:
    """Append one line to the effects file in a single `O_APPEND` write."""
    fd = os.open(effects, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def effect_lines(effects: Path) -> list[str]:
    """Return the side effects recorded so far."""
    return effects.read_text().splitlines() if effects.exists() else []


def make_charge(
    effects: Path,
    *,
    idempotency: str = "keyed",
    hold: float = 0.0,
    hang: bool = False,
) -> tether.Capability[ChargeIn, ChargeOut]:
    """Declare `pay.charge`: record the effect, then hold, hang, or answer."""

    def charge(args: ChargeIn, ctx: tether.CallContext) -> ChargeOut:
        append_effect(effects, f"{os.getpid()} {ctx.run_id} {ctx.idempotency_key}")
        if hang:
            print(f"{IN_HANDLER}{ctx.run_id}", flush=True)
            time.sleep(60)  # the parent SIGKILLs us here
        time.sleep(hold)
        return ChargeOut(
            charge_id=f"ch-{os.getpid()}-{ctx.run_id}-{ctx.step}",
            order_id=args.order_id,
            amount_cents=args.amount_cents,
            key=ctx.idempotency_key,
        )

    return tether.capability("pay.charge", effect="write", idempotency=idempotency)(
        charge
    )


# -- the worker's side -------------------------------------------------------------


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no go signal at {path} within {timeout}s")
        time.sleep(0.002)


def same_key(opts: argparse.Namespace) -> None:
    """Fire the same key from several threads once the go file appears.

    The threads get `--within` seconds to finish; one still calling then is
    missing from the `RESULT` line, which the parent counts.
    """
    app = tether.Tether(db=opts.db, env=worker_env())
    app.register(make_charge(Path(opts.effects), hold=opts.hold))
    outcomes: list[dict[str, str | None]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(opts.threads)

    def fire() -> None:
        barrier.wait(timeout=10)
        try:
            with app.run(principal=PRINCIPAL, request="charge o-1") as run:
                outcome = run.step("pay.charge", ARGS, idempotency_key=opts.key)
        except tether.TetherError as exc:  # reported to the parent, which fails
            entry = {
                "status": "raised",
                "code": exc.code,
                "output": None,
                "message": str(exc),
            }
        else:
            entry = {
                "status": outcome.status.value,
                "code": None if outcome.error is None else outcome.error.code,
                "output": None
                if outcome.output is None
                else outcome.output.model_dump_json(),
            }
        with lock:
            outcomes.append(entry)

    threads = [threading.Thread(target=fire) for _ in range(opts.threads)]
    print(READY, flush=True)
    _wait_for(Path(opts.go), timeout=START_S)
    for t in threads:
        t.start()
    within = time.monotonic() + opts.within
    for t in threads:
        t.join(timeout=max(0.0, within - time.monotonic()))
    with lock:
        print(RESULT + json.dumps(outcomes), flush=True)
    app.close()


def step_then_hang(opts: argparse.Namespace) -> None:
    """Take one durable keyed write step, say so, then wait to be killed."""
    app = tether.Tether(db=opts.db, env={})
    app.register(make_charge(Path(opts.effects)))
    run = app.run(principal=PRINCIPAL, request="charge o-1").__enter__()
    run.call("pay.charge", ARGS, idempotency_key=opts.key)
    print(f"{STEP_RETURNED}{run.id}", flush=True)
    time.sleep(60)  # the parent SIGKILLs us here


def die_in_handler(opts: argparse.Namespace) -> None:
    """Call a capability whose handler hangs after acting, until the parent kills us."""
    app = tether.Tether(db=opts.db, env={})
    app.register(
        make_charge(Path(opts.effects), idempotency=opts.idempotency, hang=True)
    )
    with app.run(principal=PRINCIPAL, request="charge o-1") as run:
        run.call("pay.charge", ARGS, idempotency_key=opts.key)


def main(argv: Sequence[str]) -> None:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(prog="_workers.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("same-key", "step-then-hang", "die-in-handler"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--db", required=True)
        cmd.add_argument("--effects", required=True)
        cmd.add_argument("--key", default="charge-o-1")
        if name == "same-key":
            cmd.add_argument("--go", required=True)
            cmd.add_argument("--threads", type=int, default=8)
            cmd.add_argument("--hold", type=float, default=0.0)
            cmd.add_argument("--within", type=float, default=20.0)
        if name == "die-in-handler":
            cmd.add_argument("--idempotency", default="keyed")
    opts = parser.parse_args(argv)
    {
        "same-key": same_key,
        "step-then-hang": step_then_hang,
        "die-in-handler": die_in_handler,
    }[opts.command](opts)


# -- the parent's side ----------------------------------------------------------


class Worker:
    """One worker process; its stdout is read line by line in a thread."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path,
        command: Sequence[str] = (sys.executable, __file__),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout as lines:
            for line in lines:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr as lines:
            self._stderr.extend(lines)

    def expect(self, prefix: str, deadline: float) -> str:
        """Wait until `deadline` (`time.monotonic()`) for a line starting with `prefix`; return its rest."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"worker {self.proc.pid} printed no {prefix!r} in time; "
                    f"stderr: {''.join(self._stderr)[-2000:]}"
                ) from None
            if line is None:
                code = self.proc.wait(timeout=5)
                raise AssertionError(
                    f"worker {self.proc.pid} exited {code} before {prefix!r}; "
                    f"stderr: {''.join(self._stderr)[-2000:]}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :]

    def kill(self) -> int:
        """SIGKILL this worker (if it still runs), reap it and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=5)
        for pump in self._pumps:
            pump.join(timeout=5)
        return code

    def wait(self, deadline: float) -> int:
        """Wait until `deadline` for the worker to exit; kill it if it does not."""
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker {self.proc.pid} did not exit in time"
            ) from None


W = TypeVar("W", bound=Worker)


def spawner(
    cwd: Path, env: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Callable[..., Worker]]:
    """Yield a function that starts workers (with `env` added to ours); kill any still running on exit."""
    if not env:
        return spawning(cwd, Worker)
    return spawning(cwd, functools.partial(Worker, env={**os.environ, **env}))


def module_spawner(
    module: str, cwd: Path, env: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Callable[..., Worker]]:
    """Yield a function that starts workers running `python -m module` (with `env`
    added to ours); kill any still running on exit."""
    # The package root is on the child's path so `-m` finds the module under
    # the same name pytest imported it as (its relative imports work).
    root = Path(__file__).parents[len(module.split(".")) - 1]
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), full.get("PYTHONPATH", "")) if p
    )
    command = (sys.executable, "-m", module)
    return spawning(cwd, functools.partial(Worker, command=command, env=full))


@contextlib.contextmanager
def spawning(cwd: Path, make: Callable[..., W]) -> Iterator[Callable[..., W]]:
    """Yield a function that starts workers made by `make`; kill any still running on exit."""
    started: list[W] = []

    def spawn(*args: str) -> W:
        worker = make(args, cwd=cwd)
        started.append(worker)
        return worker

    try:
        yield spawn
    finally:
        for worker in started:
            worker.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
