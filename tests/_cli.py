"""Run the installed `tether` command in a subprocess, as a user does, and read its one error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")


def run(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `tether` in `folder` with none of the caller's TETHER_* (plus `env`)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    base.pop("COLUMNS", None)
    return subprocess.run(
        [CLI, *args],
        cwd=folder,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_error(done: subprocess.CompletedProcess[str], code: str, exit: int = 2) -> str:
    """Assert one `error[code]` line on stderr, no traceback; return the line."""
    assert done.returncode == exit, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error[{code}] "), lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]
