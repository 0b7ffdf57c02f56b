"""An agent app written into a test's folder, and the `tether worker` processes serving it.

`AGENT` is a module (`agentapp.py`) that opens its `Tether` on `TETHER_DB`
and `TETHER_RECORD_KEY`, as a deployment's workers do, and registers planner
`ops`: `AGENT_STEPS` scripted steps of the keyed write `ops.step`, except the
step numbers in `AGENT_GATED`, which call `ops.gated` (the same write, which a
test's `tether.yaml` may make need an approval). Their handler is the
"upstream": it appends one line per call (`PID KEY`) to `calls`, sleeps
`AGENT_PAUSE` seconds, and applies each key's effect once, appending the key to
`effects` under an exclusive file lock, as a payments API deduplicates by
idempotency key. The parent counts both files, outside the database. With
`AGENT_GO` set, importing the module waits for that file (after touching
`waiting-PID`), so that workers start together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

from ._backends import Backend

__all__ = [
    "AGENT",
    "CLI",
    "Calls",
    "agent_env",
    "calls",
    "effects",
    "start_worker",
    "stop",
    "worker_output",
]

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")

AGENT = textwrap.dedent(
    """
    import fcntl, os, time
    from pathlib import Path
    from pydantic import BaseModel
    import tether

    HERE = Path(os.environ["AGENT_HOME"])
    STEPS = int(os.environ["AGENT_STEPS"])
    PAUSE = float(os.environ["AGENT_PAUSE"])
    GATED = {int(n) for n in os.environ.get("AGENT_GATED", "").split()}

    class StepIn(BaseModel):
        n: int

    class StepOut(BaseModel):
        n: int

    def _line(name, text):
        fd = os.open(HERE / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (text + "\\n").encode())  # one write: lines never interleave
        finally:
            os.close(fd)

    def _once(key):
        with open(HERE / "effects", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            if key not in f.read().split():
                f.write(key + "\\n")
                f.flush()
                os.fsync(f.fileno())

    def act(args: StepIn, ctx: tether.CallContext) -> StepOut:
        _line("calls", f"{os.getpid()} {ctx.idempotency_key}")
        time.sleep(PAUSE)
        _once(ctx.idempotency_key)  # the upstream dedups by key
        return StepOut(n=args.n)

    step = tether.capability("ops.step", effect="write", idempotency="keyed")(act)
    gated = tether.capability("ops.gated", effect="write", idempotency="keyed")(act)

    app = tether.Tether(config=HERE / "tether.yaml")  # TETHER_DB, TETHER_RECORD_KEY
    app.register(step, gated)
    app.register_planner(
        "ops",
        tether.ScriptedPlanner(
            [("ops.gated" if i in GATED else "ops.step", {"n": i}) for i in range(STEPS)]
        ),
    )

    go = os.environ.get("AGENT_GO")
    if go:  # workers start together when told
        (HERE / f"waiting-{os.getpid()}").touch()
        while not os.path.exists(go):
            time.sleep(0.005)
    """
)


def agent_env(
    home: Path, backend: Backend, *, steps: int, pause: float, **extra: str
) -> dict[str, str]:
    """Return the environment every process of the agent's deployment runs in."""
    return backend.child_env(
        AGENT_HOME=str(home),
        AGENT_STEPS=str(steps),
        AGENT_PAUSE=str(pause),
        PYTHONPATH=str(home),
        TETHER_DB=backend.db,
        TETHER_CONFIG=str(home / "tether.yaml"),
        **extra,
    )


def start_worker(
    home: Path, env: Mapping[str, str], *args: str
) -> subprocess.Popen[str]:
    """Start `tether worker --app agentapp:app ARGS` in `home`.

    Its stdout and stderr go to `worker-PID.out` and `worker-PID.err` there.
    """
    out, err = home / "worker-new.out", home / "worker-new.err"
    with out.open("w") as o, err.open("w") as e:  # the child holds its own copies
        proc = subprocess.Popen(  # our own CLI
            [CLI, "worker", "--app", "agentapp:app", *args],
            cwd=home,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=o,
            stderr=e,
            text=True,
        )
    out.rename(home / f"worker-{proc.pid}.out")
    err.rename(home / f"worker-{proc.pid}.err")
    return proc


def worker_output(home: Path, proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Return what a worker started by `start_worker` printed: `(stdout, stderr)`."""
    return (
        (home / f"worker-{proc.pid}.out").read_text(),
        (home / f"worker-{proc.pid}.err").read_text(),
    )


def stop(proc: subprocess.Popen[str]) -> int:
    """SIGKILL `proc` if it still runs; reap it and return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=10)


class Calls:
    """The `calls` file, read as it grows: one `(pid, key)` per call that reached the upstream."""

    def __init__(self, home: Path) -> None:
        self.path = home / "calls"
        self.seen: list[tuple[int, str]] = []

    def read(self) -> list[tuple[int, str]]:
        """Return every call so far (a half-written last line waits for the next read)."""
        text = self.path.read_text() if self.path.exists() else ""
        lines = text.split("\n")[:-1]  # the part after the last newline is unfinished
        self.seen = [(int(pid), key) for pid, key in (x.split() for x in lines)]
        return self.seen

    def wait_for_new(self, after: int, deadline: float) -> tuple[int, str] | None:
        """Wait until `deadline` for a call past the first `after`; return it, or None."""
        while time.monotonic() < deadline:
            found = self.read()
            if len(found) > after:
                return found[after]
            time.sleep(0.005)
        return None


def calls(home: Path) -> list[tuple[int, str]]:
    """Return every call that reached the upstream, as `(pid, key)`."""
    return Calls(home).read()


def effects(home: Path) -> list[str]:
    """Return the keys whose effect the upstream applied, one line each."""
    path = home / "effects"
    return path.read_text().split() if path.exists() else []
