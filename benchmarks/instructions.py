"""Instructions per call of the memory call path, counted by valgrind: a figure noise cannot move.

`call_path.py` and `floor.py` time calls on the clock, which is right for the
bars but too noisy on a shared 2-core machine to tell a change of a
microsecond from the load of a neighbour. This counts the CPU instructions a
call executes in user space (valgrind's callgrind, `Ir`), which is the same
from run to run on one build: a change to the call path shows as a number
that moved, before the clock can tell.

Each case runs twice in a child process under callgrind: once with `--calls`
calls and once with none, after the same set-up and warm-up; the difference
over `--calls` is the instructions per call. Cases:

- `baseline.function`: the bare handler, `noop(Ping(n=1))`;
- `floor.typed`: `floor.py`'s typed step (args and output validated and
  dumped, the three events built), with nothing of tether's call path;
- `tether.memory.read` / `.write`: `run.call(...)` on `memory://`, as in
  `call_path.py` (the write under a fresh idempotency key each call).

    .venv/bin/python benchmarks/instructions.py                 # about 2 minutes
    .venv/bin/python benchmarks/instructions.py --top 25        # and where they go (C functions)

Needs valgrind (Debian: `apt-get install valgrind`); it runs the interpreter
about 50 times slower, so the counts use few calls. Instructions are not time
(a cache miss costs more than an add), so the bars stay on the clock; use this
to compare two versions of the code. Writes `benchmarks/results/instructions.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CASES = (
    "baseline.function",
    "floor.typed",
    "tether.memory.read",
    "tether.memory.write",
)
WARM_UP = 200


def _child(case: str, calls: int) -> None:
    """Set `case` up, warm it up, then make `calls` calls (run under callgrind)."""
    sys.path.insert(0, str(HERE))
    import tether
    from call_path import PING, PRINCIPAL, noop, write
    from floor import _typed

    if case == "baseline.function":
        fn = noop.handler.fn

        def one() -> None:
            fn(PING)

    elif case == "floor.typed":
        typed = _typed()
        events: list[object] = []

        def one() -> None:
            typed(events)  # type: ignore[arg-type]  # a list the step appends to

    else:
        app = tether.Tether(db="memory://")
        app.register(noop, write)
        run = app.run(principal=PRINCIPAL, request="bench")
        run.__enter__()
        if case == "tether.memory.read":

            def one() -> None:
                run.call(noop, PING)

        else:
            keys = count()

            def one() -> None:
                run.call(write, PING, idempotency_key=f"k-{next(keys)}")

    for _ in range(WARM_UP):
        one()
    gc.collect()  # both runs of a case start their calls from the same heap
    for _ in range(calls):
        one()


def _callgrind(case: str, calls: int, out: Path | None) -> int:
    """Run the child under callgrind; return the instructions it executed."""
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out or '/dev/null'}",
        sys.executable,
        __file__,
        "--child",
        case,
        str(calls),
    ]
    # One hash seed for every run: set and dict layouts (and so the
    # collector's work) do not change between two runs of one build.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(  # our own script
        command, capture_output=True, text=True, check=False, env=env
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(
            f"error: {case} failed under valgrind (exit {done.returncode}): "
            f"{done.stderr.strip().splitlines()[-1:]}"
        )
    return int(found.group(1))


def _by_function(path: Path) -> Counter[str]:
    """Instructions per C function (self cost) in one callgrind output file."""
    text = subprocess.run(
        [
            "callgrind_annotate",
            "--inclusive=no",
            "--threshold=100",
            str(path),
        ],  # valgrind's own tool, on PATH beside it
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: Counter[str] = Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S.*)$", line)
        if m is None or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r" \[.*\]$", "", m.group(2))
        name = re.sub(r"^.*/(?=[^/]+:)", "", name)  # the source file's name only
        costs[re.sub(r"'\d+$", "", name)] += int(m.group(1).replace(",", ""))
    return costs


def _measure(case: str, calls: int, folder: Path | None) -> dict[str, object]:
    zero = folder / f"{case}.0.out" if folder else None
    full = folder / f"{case}.n.out" if folder else None
    base, total = _callgrind(case, 0, zero), _callgrind(case, calls, full)
    result: dict[str, object] = {"calls": calls, "per_call": (total - base) / calls}
    if zero is not None and full is not None:
        before, after = _by_function(zero), _by_function(full)
        top = Counter({k: (v - before.get(k, 0)) / calls for k, v in after.items()})
        result["top"] = [[name, round(n)] for name, n in top.most_common(40)]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calls", type=int, default=2000, help="calls per case (default 2000)"
    )
    parser.add_argument(
        "--case", action="append", choices=CASES, help="only this case (repeatable)"
    )
    parser.add_argument(
        "--top",
        type=int,
        default=0,
        help="also show the K C functions that cost most per call",
    )
    parser.add_argument("--out", default=str(RESULTS / "instructions.json"))
    parser.add_argument(
        "--child", nargs=2, metavar=("CASE", "CALLS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    if shutil.which("valgrind") is None:
        print(
            "error: valgrind is not on PATH; install it (Debian: apt-get install valgrind)",
            file=sys.stderr,
        )
        return 2
    cases = args.case or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if args.top else None
        print(
            f"counting {', '.join(cases)} under callgrind ({args.calls} calls each) ...",
            file=sys.stderr,
        )
        with ThreadPoolExecutor(max_workers=2) as pool:  # a valgrind child per core
            results = dict(
                zip(
                    cases,
                    pool.map(lambda c: _measure(c, args.calls, folder), cases),
                    strict=True,
                )
            )
    bare = results.get("baseline.function", {}).get("per_call")
    print(f"{'case':24} {'instructions/call':>18} {'added over bare':>16}")
    for case, result in results.items():
        per = float(result["per_call"])
        added = "" if bare is None else f"{per - float(bare):16,.0f}"
        print(f"{case:24} {per:18,.0f} {added}")
    for case, result in results.items():
        if "top" in result:
            print(f"\n{case}: instructions per call by C function (self)")
            for name, n in result["top"][: args.top]:
                print(f"{n:10,}  {name}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "instructions",
        "at": datetime.now(UTC).isoformat(),
        "python": sys.version.split()[0],
        "cases": results,
    }
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
