"""The pytest plugin installed with tether: exported runs in a tests folder are tests.

Each case runs pytest in a subprocess on a fresh folder, as a team's own suite
would run: the plugin is found through its entry point, not imported here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tether
from tether.scenarios import SCENARIOS

RULE = """\
rules:
  - id: wide-log-searches
    match: {capability: logs.search}
    when: "args.limit > LIMIT"
    decision: deny
    reason: searches that wide load the log cluster
"""


def export_demo(folder: Path, policy: str | None) -> Path:
    """Run the cloud-ops demo under `policy` (if any) and export it into `folder`."""
    config = None
    if policy is not None:
        config = folder / "recorded.yaml"
        config.write_text(policy)
    scenario = SCENARIOS["cloud-ops"]
    with tether.Tether(db="memory://", config=config, env={}) as app:
        scenario.setup(app)
        run = scenario.run(app)
        target = folder / "tests" / "incident.tether.jsonl"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"".join(line + b"\n" for line in app.export(run.id)))
    return target


def pytest_in(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pytest in `folder`, as a team's CI would, with none of our TETHER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(180)
def test_an_exported_run_is_a_passing_test(tmp_path: Path) -> None:
    export_demo(tmp_path, RULE.replace("LIMIT", "50"))

    done = pytest_in(tmp_path, "tests")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


@pytest.mark.timeout(180)
def test_a_policy_change_fails_the_test_naming_rule_and_step(tmp_path: Path) -> None:
    export_demo(tmp_path, RULE.replace("LIMIT", "50"))
    (tmp_path / "proposed.yaml").write_text(RULE.replace("LIMIT", "10"))
    (tmp_path / "pytest.ini").write_text("[pytest]\ntether_policy = proposed.yaml\n")

    done = pytest_in(tmp_path, "tests")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout
    assert (
        "step 2 decided: verdict was 'allow', now 'deny' (rules: wide-log-searches)"
        in done.stdout
    )


@pytest.mark.timeout(180)
def test_an_app_without_the_capability_fails_with_one_clear_line(
    tmp_path: Path,
) -> None:
    export_demo(tmp_path, None)
    (tmp_path / "bare.py").write_text(
        "import tether\napp = tether.Tether(db='memory://', env={})\n"
    )

    done = pytest_in(tmp_path, "tests", "--tether-app", "bare:app")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "which this app does not register" in done.stdout
    assert "Traceback" not in done.stdout


@pytest.mark.timeout(180)
def test_a_tampered_export_fails_instead_of_replaying(tmp_path: Path) -> None:
    target = export_demo(tmp_path, None)
    text = target.read_text()
    target.write_text(text.replace('"service":"checkout"', '"service":"payments"', 1))

    done = pytest_in(tmp_path, "tests")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "does not match its hash" in done.stdout
