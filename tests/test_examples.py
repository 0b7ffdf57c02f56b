"""Docs are tests: every ```python block in README.md and docs/ runs, and its `#>` lines match."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize(
    "path", [p for p in FILES if _blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_code_blocks_run_and_print_what_they_say(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page's Python blocks run in order, printing exactly their `#>` lines."""
    monkeypatch.chdir(tmp_path)
    for name in ("TETHER_DB", "TETHER_CONFIG", "TETHER_RECORD_KEY"):
        monkeypatch.delenv(name, raising=False)
    namespace: dict[str, object] = {"__name__": "__docs__"}

    for number, code in enumerate(_blocks(path), 1):
        expected = [
            line.strip()[3:]
            for line in code.splitlines()
            if line.strip().startswith("#> ")
        ]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(
                compile(code, f"{path.name}[{number}]", "exec"), namespace
            )  # the docs' own code

        if expected:
            assert out.getvalue().splitlines() == expected, (
                f"{path.name} block {number}"
            )
