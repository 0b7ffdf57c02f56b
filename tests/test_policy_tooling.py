"""Policy tooling: errors with line numbers, `tether policy check`, `tether policy test`."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest

import tether
from tether import config as config_module
from tether.capability import Registry
from tether.cli import main
from tether.config import (
    Settings,
    check_config,
    check_policy_tests,
    load_policy_tests,
    load_settings,
)
from tether.policy import PolicySet, RuleSet
from tether.policy.testing import PolicyTests, run_cases
from tether.testing import FakeClock, temporary_app

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")
"""The command under test: `TETHER_CLI` (the wheel test sets it), else the venv's."""
CORPUS = Path(__file__).parent / "policy_corpus"
VALID = CORPUS / "valid"
BROKEN = sorted(CORPUS.glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (\d+): (.+)$")


def expectations(path: Path) -> list[tuple[int, str]]:
    """Return the `# expect: LINE: fragment` lines that open a corpus file."""
    found = []
    for line in path.read_text().splitlines():
        match = _EXPECT.match(line)
        if match is None:
            break
        found.append((int(match.group(1)), match.group(2)))
    return found


def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, list[str], str]:
    """Run `tether` in this process; return the exit code, stderr lines and stdout."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


# -- the corpus of broken files ------------------------------------------------------------


def test_the_corpus_is_large_and_every_file_says_what_it_expects() -> None:
    """At least twenty broken files, each opening with its expected line and message."""
    assert len(BROKEN) >= 20
    assert all(expectations(path) for path in BROKEN)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_load_settings_rejects_a_broken_file_in_one_line(path: Path) -> None:
    """`load_settings` raises one line naming the file, the first problem's line and what is wrong."""
    line, fragment = expectations(path)[0]

    with pytest.raises(tether.ConfigError) as caught:
        load_settings(path)

    message = caught.value.message
    assert caught.value.code == "config_invalid"
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_policy_check_lists_each_problem_on_its_own_line(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether policy check` exits 1 with exactly one stderr line per problem, in line order."""
    expected = expectations(path)

    code, lines, out = run_cli(capsys, "policy", "check", str(path))

    assert code == 1
    assert out == ""
    assert len(lines) == len(expected), lines
    for got, (line, fragment) in zip(lines, expected, strict=True):
        assert got.startswith(f"error[config_invalid] {path}:{line}: "), got
        assert fragment in got


def test_check_config_reports_every_problem_and_load_settings_counts_the_rest() -> None:
    """A file with three mistakes gives three problems; the one-line error says two more wait."""
    path = CORPUS / "several_mistakes.yaml"

    checked = check_config(path)
    with pytest.raises(tether.ConfigError) as caught:
        load_settings(path)

    assert [p.line for p in checked.problems] == [7, 11, 16]
    assert [p.item_id for p in checked.problems] == [
        "big-refunds",
        "no-prod-deletes",
        None,
    ]
    assert checked.value is None
    assert checked.version is None
    assert caught.value.message.endswith(
        f"(and 2 more problems: `tether policy check {path}` lists them all)"
    )


def test_policy_check_json_lists_the_problems_with_their_places(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--json` prints one document whose errors carry line, path, rule id and message."""
    path = CORPUS / "several_mistakes.yaml"

    code, lines, out = run_cli(capsys, "policy", "check", str(path), "--json")

    doc = json.loads(out)
    assert code == 1
    assert lines == []
    assert (doc["format"], doc["ok"]) == (1, False)
    assert doc["errors"][1] == {
        "file": str(path),
        "line": 11,
        "path": "rules[1].when",
        "id": "no-prod-deletes",
        "message": "condition does not compile: unknown name(s) 'env'; a condition "
        "may read args, principal, context, capability, run",
        "text": f"{path}:11: rules[1] (id 'no-prod-deletes'): when: condition does "
        "not compile: unknown name(s) 'env'; a condition may read args, principal, "
        "context, capability, run",
    }


# -- files that are not what they seem ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        pytest.param(
            b"rules:\n  - id: a\n    reason: \xff\n",
            3,
            "not valid YAML: unacceptable character #x00ff: invalid start byte; save "
            "the file as UTF-8 text",
            id="not-utf8",
        ),
        pytest.param(
            b"rules: &r\n  - *r\n",
            1,
            "an alias refers to a node that contains it",
            id="recursive-alias",
        ),
        pytest.param(
            b"a: &a [1,1,1,1,1,1,1,1,1,1]\n"
            + b"".join(
                f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n".encode()
                for p, n in zip("abcde", "bcdef", strict=True)
            ),
            1,
            "expands to over 100000 values",
            id="alias-bomb",
        ),
        pytest.param(
            b"rules:\n  - big-refunds\n",
            2,
            "rules[0]: expected a mapping, got 'big-refunds'",
            id="rule-is-text",
        ),
        pytest.param(
            b"version: 2\n", 1, "version: unknown value 2; use one of: 1", id="version"
        ),
        pytest.param(
            b"rules: !!python/object/apply:os.system [true]\n",
            1,
            "not valid YAML: could not determine a constructor",
            id="python-tag",
        ),
    ],
)
def test_files_that_are_not_plain_config_are_rejected_with_a_line(
    tmp_path: Path, text: bytes, line: int, fragment: str
) -> None:
    """Bad encodings, alias tricks and foreign tags fail with one line naming where."""
    path = tmp_path / "tether.yaml"
    path.write_bytes(text)

    with pytest.raises(tether.ConfigError) as caught:
        load_settings(path)

    assert caught.value.message.startswith(f"{path}:{line}: "), caught.value.message
    assert fragment in caught.value.message


def test_an_empty_file_and_shared_anchors_inside_rules_load(tmp_path: Path) -> None:
    """An empty file is all defaults; a YAML anchor reused inside the rules list is fine."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "rules:\n"
        "  - &deny {id: a, decision: deny, reason: never, match: {capability: x.a}}\n"
        "  - <<: *deny\n"
        "    id: b\n"
    )

    settings, _ = load_settings(empty)
    rules, _ = load_settings(shared)

    assert settings.rules == ()
    assert [r.id for r in rules.rules] == ["a", "b"]


def test_null_values_inside_free_form_args_are_data_not_mistakes(
    tmp_path: Path,
) -> None:
    """A key with no value is an error in the schema's fields, but `args: {note: null}` is data."""
    path = tmp_path / "tether.test.yaml"
    path.write_text(
        "policy: tether.yaml\n"
        "cases:\n"
        "  - name: a null note\n"
        "    capability: notes.add\n"
        "    effect: write\n"
        "    args: {note: null}\n"
        "    principal: {id: bot, on_behalf_of: null}\n"
        "    expect: {decision: allow}\n"
    )

    checked = check_policy_tests(path)

    assert [str(p) for p in checked.problems] == [
        f"{path}:7: cases[0] (name 'a null note'): principal.on_behalf_of: no value; "
        "write one or leave out `on_behalf_of`"
    ]


# -- the valid file ----------------------------------------------------------------------


def test_a_valid_file_loads_and_check_prints_its_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A valid file loads, and `policy check` exits 0 with the rules, decisions and version."""
    settings, version = load_settings(VALID / "tether.yaml")

    code, lines, out = run_cli(capsys, "policy", "check", str(VALID / "tether.yaml"))
    json_code, _, json_out = run_cli(
        capsys, "policy", "check", str(VALID / "tether.yaml"), "--json"
    )

    doc = json.loads(json_out)
    assert (code, json_code, lines) == (0, 0, [])
    assert f"3 rules, policy version {version}" in out
    assert "require_approval 1 · deny 2" in out
    assert doc == {
        "format": 1,
        "file": str(VALID / "tether.yaml"),
        "ok": True,
        "version": version,
        "rules": len(settings.rules),
        "decisions": {"allow": 0, "dry_run_only": 0, "require_approval": 1, "deny": 2},
        "defaults": {
            "read": "allow",
            "write": "allow",
            "destructive": "require_approval",
        },
        "errors": [],
    }
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", version)


def test_a_missing_file_is_the_answer_no_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy check` on a file that is not there exits 1 with one line."""
    missing = tmp_path / "nope.yaml"

    code, lines, _ = run_cli(capsys, "policy", "check", str(missing))

    assert code == 1
    assert lines == [
        f"error[config_invalid] {missing}: cannot read the config file "
        "(No such file or directory)"
    ]


def test_the_installed_command_checks_a_file(tmp_path: Path) -> None:
    """The `tether` executable exits 0 on a valid file and 1 with one line per problem."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}

    def tether_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    good = tether_cli("policy", "check", str(VALID / "tether.yaml"))
    bad = tether_cli("policy", "check", str(CORPUS / "several_mistakes.yaml"))
    helped = tether_cli("policy", "test", "--help")

    assert (good.returncode, good.stderr) == (0, "")
    assert good.stdout.startswith("ok ")
    assert bad.returncode == 1
    assert len(bad.stderr.splitlines()) == 3
    assert "Traceback" not in bad.stderr
    assert "Example: tether policy test" in helped.stdout


# -- bad configuration never half-loads ----------------------------------------------------


def test_an_app_refuses_a_broken_config() -> None:
    """`Tether(config=broken)` raises `ConfigError` naming the file and line."""
    path = CORPUS / "duplicate_ids.yaml"

    with pytest.raises(tether.ConfigError) as caught:
        tether.Tether(db="memory://", config=path, env={})

    assert caught.value.message.startswith(f"{path}:10: ")


class RefundIn(pydantic.BaseModel, extra="forbid"):
    """A refund request."""

    order_id: str
    amount_cents: int


class RefundOut(pydantic.BaseModel):
    """A refund made."""

    order_id: str


@tether.capability("payments.refund", effect="write")
def refund(args: RefundIn) -> RefundOut:
    """Refund an order."""
    return RefundOut(order_id=args.order_id)


def write_config(path: Path, text: str, stamp: int) -> None:
    """Write `text` with its own mtime, so a change is seen however fast the test runs."""
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))


FIRST = """\
rules:
  - id: big-refunds
    match: {capability: payments.refund}
    when: args.amount_cents > 50000
    decision: deny
    reason: too big
"""
BROKEN_EDIT = FIRST.replace("decision: deny", "desicion: allow")  # codespell:ignore
FIXED = FIRST.replace("> 50000", "> 5000")


@pytest.fixture
def reloading_app(tmp_path: Path) -> Iterator[tuple[tether.Tether, Path]]:
    """An app over a `tether.yaml` the test rewrites."""
    config = tmp_path / "tether.yaml"
    write_config(config, FIRST, 1_000_000_000)
    with temporary_app(clock=FakeClock(), config=config) as app:
        app.register(refund)
        yield app, config


def decided(app: tether.Tether, run_id: str) -> list[tuple[str, str]]:
    """Return each `decided` event's verdict and policy version."""
    events = [e.data() for e in app.store.events(run_id)]
    return [
        (e["verdict"], e["policy_version"]) for e in events if e["kind"] == "decided"
    ]


def test_a_broken_reload_keeps_the_last_good_policy_until_the_file_is_fixed(
    reloading_app: tuple[tether.Tether, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A broken edit leaves the old version deciding; the fix applies at the next step."""
    app, config = reloading_app
    caplog.set_level(logging.INFO, logger="tether.app")
    _, first_version = load_settings(config)
    bot = tether.Principal("support-bot", tenant="acme")
    small = {"order_id": "o-1", "amount_cents": 9000}

    with app.run(principal=bot, request="refunds") as run:
        before = run.step("payments.refund", small)
        write_config(config, BROKEN_EDIT, 2_000_000_000)
        during = run.step("payments.refund", small)
        write_config(config, FIXED, 3_000_000_000)
        after = run.step("payments.refund", small)

    _, fixed_version = load_settings(config)
    assert [o.status.value for o in (before, during, after)] == [
        "executed",
        "executed",
        "refused",
    ]
    assert decided(app, run.id) == [
        ("allow", first_version),
        ("allow", first_version),
        ("deny", fixed_version),
    ]
    assert fixed_version != first_version
    assert [r.getMessage() for r in caplog.records if r.name == "tether.app"] == [
        "policy.reload_failed",
        "policy.reloaded",
    ]


SETTLED = (
    FIRST.replace("> 50000", "> 5000")
    + """\
  - id: no-refunds-for-o-1
    match: {capability: payments.refund}
    when: args.order_id == "o-1"
    decision: deny
    reason: disputed order
defaults: {write: allow}
"""
)


def test_a_file_edited_in_place_is_taken_only_whole_and_settled(
    reloading_app: tuple[tether.Tether, Path],
) -> None:
    """A half-written file that parses (cut after a rule) never decides a step.

    Before: the step after the first half was written ran under the cut file.
    """
    app, config = reloading_app
    bot = tether.Principal("support-bot", tenant="acme")
    small = {"order_id": "o-1", "amount_cents": 1000}
    half = SETTLED.index("  - id: no-refunds-for-o-1")
    _, first_version = load_settings(config)

    with app.run(principal=bot, request="refunds") as run, config.open("w") as out:
        out.write(SETTLED[:half])  # a whole rule: this much parses
        out.flush()
        cut = run.step("payments.refund", small)
        out.write(SETTLED[half:])
        out.flush()
        fresh = run.step("payments.refund", small)
        time.sleep(config_module.SETTLE_NS / 1e9 * 1.5)
        settled = run.step("payments.refund", small)

    _, new_version = load_settings(config)
    assert [(v, ver == first_version) for v, ver in decided(app, run.id)] == [
        ("allow", True),  # the cut file (no deny for o-1, no default) is never taken
        ("allow", True),  # written a moment ago: maybe still being written
        ("deny", False),
    ]
    assert decided(app, run.id)[2][1] == new_version
    assert (cut.status.value, fresh.status.value, settled.status.value) == (
        "executed",
        "executed",
        "refused",
    )


def test_a_file_written_while_it_is_read_is_read_again(
    reloading_app: tuple[tether.Tether, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that lands during the read: that read is dropped, the next step reads again."""
    app, config = reloading_app
    bot = tether.Principal("support-bot", tenant="acme")
    small = {"order_id": "o-1", "amount_cents": 1000}
    half = SETTLED.index("  - id: no-refunds-for-o-1")
    write_config(config, SETTLED[:half], 2_000_000_000)
    real = config_module.load_settings
    reads: list[int] = []

    def read_while_written(path: Path | None) -> tuple[Settings, str]:
        loaded = real(path)
        if not reads:  # the rest of the file lands just after the read
            write_config(config, SETTLED, 3_000_000_000)
        reads.append(1)
        return loaded

    monkeypatch.setattr(config_module, "load_settings", read_while_written)
    with app.run(principal=bot, request="refunds") as run:
        during = run.step("payments.refund", small)
        after = run.step("payments.refund", small)

    assert len(reads) == 2
    assert (during.status.value, after.status.value) == ("executed", "refused")


# -- policy tests in YAML ----------------------------------------------------------------


def test_policy_test_passes_every_case_of_the_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The example test file passes: exit 0, a table with every case and a summary."""
    code, lines, out = run_cli(
        capsys, "policy", "test", str(VALID / "tether.test.yaml")
    )

    assert (code, lines) == (0, [])
    assert "a big refund needs a human" in out
    assert "require_approval [big-refunds]" in out
    assert "6 passed, 0 failed" in out
    assert "FAIL" not in out


def test_a_failing_case_exits_1_and_says_what_policy_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong expectation fails: FAIL in the table, the deciding rule's reason, exit 1."""
    shutil.copy(VALID / "tether.yaml", tmp_path / "tether.yaml")
    tests = tmp_path / "tether.test.yaml"
    tests.write_text(
        "policy: tether.yaml\n"
        "cases:\n"
        "  - name: drop in prod\n"
        "    capability: db.drop\n"
        "    effect: destructive\n"
        "    context: {environment: prod}\n"
        "    principal: {id: bot}\n"
        "    expect: {decision: allow}\n"
        "  - name: right verdict, other rule\n"
        "    capability: tickets.close\n"
        "    effect: write\n"
        "    principal: {id: intern-bot, roles: [intern]}\n"
        "    expect: {decision: deny, rules: [no-prod-deletes]}\n"
    )

    code, _, out = run_cli(capsys, "policy", "test", str(tests))
    json_code, _, json_out = run_cli(capsys, "policy", "test", str(tests), "--json")

    doc = json.loads(json_out)
    assert (code, json_code) == (1, 1)
    assert "FAIL drop in prod: nothing destructive in production" in out
    assert "0 passed, 2 failed" in out
    assert (doc["format"], doc["ok"], doc["passed"], doc["failed"]) == (1, False, 0, 2)
    assert doc["cases"][1] == {
        "name": "right verdict, other rule",
        "expected": {"decision": "deny", "rules": ["no-prod-deletes"]},
        "got": {
            "decision": "deny",
            "rules": ["interns-read-only"],
            "reasons": ["interns may only read"],
        },
        "passed": False,
    }


@pytest.mark.parametrize(
    ("case", "line", "fragment"),
    [
        pytest.param(
            "    effect: read\n    expect: {decisoin: deny}\n",
            8,
            "cases[1] (name 'second'): expect.decisoin: unknown field 'decisoin'; "
            "did you mean 'decision'?",
            id="typo",
        ),
        pytest.param(
            "    effect: read\n    expect: {decision: block}\n",
            8,
            "cases[1] (name 'second'): expect.decision: unknown value 'block'",
            id="verdict",
        ),
        pytest.param(
            "    effect: delete\n    expect: {decision: deny}\n",
            7,
            "cases[1] (name 'second'): effect: unknown value 'delete'",
            id="effect",
        ),
    ],
)
def test_an_invalid_test_file_names_the_case_and_the_problem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    line: int,
    fragment: str,
) -> None:
    """A mistake in a case exits 1 with one line naming the case, its line and the problem."""
    tests = tmp_path / "tether.test.yaml"
    tests.write_text(
        "policy: tether.yaml\n"
        "cases:\n"
        "  - {name: first, capability: a.b, effect: read, principal: {id: bot}, "
        "expect: {decision: allow}}\n"
        "  - name: second\n"
        "    capability: a.b\n"
        "    principal: {id: bot}\n" + case
    )

    code, lines, out = run_cli(capsys, "policy", "test", str(tests))

    assert (code, out) == (1, "")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error[config_invalid] {tests}:{line}: "), lines[0]
    assert fragment in lines[0]


def test_duplicate_case_names_name_both_places(tmp_path: Path) -> None:
    """Two cases with one name are an error naming both lines."""
    tests = tmp_path / "tether.test.yaml"
    case = "  - {name: same, capability: a.b, effect: read, principal: {id: bot}, expect: {decision: allow}}\n"
    tests.write_text("policy: tether.yaml\ncases:\n" + case + case)

    with pytest.raises(tether.ConfigError) as caught:
        load_policy_tests(tests)

    assert caught.value.message == (
        f"{tests}:4: cases[1] (name 'same'): name 'same' is used twice, by cases[0] "
        "(line 3) and cases[1] (line 4); give each its own name"
    )


def test_a_broken_or_missing_policy_under_test_is_the_answer_no(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy test` exits 1 with the policy file's own problems when it cannot load it."""
    tests = tmp_path / "tether.test.yaml"
    body = "cases:\n  - {name: a, capability: a.b, effect: read, principal: {id: bot}, expect: {decision: allow}}\n"
    tests.write_text(f"policy: {CORPUS / 'bad_glob.yaml'}\n{body}")
    missing = tmp_path / "missing.test.yaml"
    missing.write_text(f"policy: nope.yaml\n{body}")

    code, lines, _ = run_cli(capsys, "policy", "test", str(tests))
    missing_code, missing_lines, _ = run_cli(capsys, "policy", "test", str(missing))

    assert code == missing_code == 1
    assert len(lines) == 1
    assert f"{CORPUS / 'bad_glob.yaml'}:4: " in lines[0]
    assert missing_lines == [
        f"error[config_invalid] {tmp_path / 'nope.yaml'}: cannot read the config "
        "file (No such file or directory)"
    ]


def test_cases_read_run_time_and_dates_as_the_gateway_gives_them(
    tmp_path: Path,
) -> None:
    """`run`, `at` and YAML dates in args reach the CEL variables as a real step's would."""
    policy_file = tmp_path / "tether.yaml"
    policy_file.write_text(
        "rules:\n"
        "  - id: long-runs\n"
        "    when: run.steps >= 10 || run.cost > 20\n"
        "    decision: require_approval\n"
        "    reason: long runs need a look\n"
        "  - id: new-year\n"
        "    when: context.time >= timestamp('2027-01-01T00:00:00Z')\n"
        "    decision: deny\n"
        "    reason: frozen for the new year\n"
        "  - id: backdated\n"
        "    when: has(args.since) && args.since < '2026-01-01'\n"
        "    decision: deny\n"
        "    reason: no backdating\n"
    )
    tests = tmp_path / "tether.test.yaml"
    tests.write_text(
        "policy: tether.yaml\n"
        "cases:\n"
        "  - {name: short, capability: a.b, effect: write, principal: {id: bot}, "
        "at: '2026-06-01T00:00:00Z', expect: {decision: allow, rules: []}}\n"
        "  - {name: long, capability: a.b, effect: write, principal: {id: bot}, "
        "at: '2026-06-01T00:00:00Z', run: {steps: 10}, "
        "expect: {decision: require_approval, rules: [long-runs]}}\n"
        "  - {name: costly, capability: a.b, effect: write, principal: {id: bot}, "
        "at: '2026-06-01T00:00:00Z', run: {cost: 20.5}, "
        "expect: {decision: require_approval}}\n"
        "  - {name: frozen, capability: a.b, effect: write, principal: {id: bot}, "
        "at: '2027-01-02T00:00:00Z', expect: {decision: deny, rules: [new-year]}}\n"
        "  - {name: backdated, capability: a.b, effect: write, principal: {id: bot}, "
        "at: '2026-06-01T00:00:00Z', args: {since: 2025-12-01}, "
        "expect: {decision: deny, rules: [backdated]}}\n"
    )
    loaded = load_policy_tests(tests)
    settings, version = load_settings(loaded.policy)
    policy = PolicySet(
        rules=RuleSet(settings.rules), defaults=settings.defaults, version=version
    )

    report = run_cases(policy, loaded)

    assert [(r.case.name, r.passed) for r in report.results] == [
        ("short", True),
        ("long", True),
        ("costly", True),
        ("frozen", True),
        ("backdated", True),
    ]
    assert loaded.cases[2].run.cost == Decimal("20.5")
    assert report.policy_version == version


def test_a_case_is_decided_as_the_gateway_decides_the_same_step(
    tmp_path: Path,
) -> None:
    """The runner's decision equals the `decided` event of the same step through an app."""
    config = VALID / "tether.yaml"
    tests = load_policy_tests(VALID / "tether.test.yaml")
    case = tests.cases[1]  # a big refund needs a human
    principal = case.principal.build()

    with temporary_app(clock=FakeClock(), config=config) as app:
        app.register(refund)
        with app.run(principal=principal, request="refund") as run:
            run.step("payments.refund", case.args)
        events = [e.data() for e in app.store.events(run.id)]
        report = run_cases(app.policy, PolicyTests(policy=config, cases=(case,)))

    recorded: dict[str, Any] = next(e for e in events if e["kind"] == "decided")
    got = report.results[0].decision
    assert got is not None
    assert report.ok
    assert (recorded["verdict"], tuple(recorded["rule_ids"])) == (
        got.verdict.value,
        got.rule_ids,
    )
    assert recorded["policy_version"] == got.policy_version


# -- policy tests against an app (--app MODULE:ATTR) --------------------------------------

APP_MODULE = """
from decimal import Decimal

import pydantic
import tether


class PayIn(pydantic.BaseModel, extra="forbid"):
    order_id: str
    amount: Decimal
    channel: str = "web"


class PayOut(pydantic.BaseModel):
    ok: bool


@tether.capability(name="payments.pay", effect="write", scopes=["payments:write"])
def pay(args: PayIn) -> PayOut:
    return PayOut(ok=True)


class NoTestOrders:
    id = "no-test-orders"

    def evaluate(self, request):
        if str(request.args.get("order_id", "")).startswith("test-"):
            return tether.Decision(verdict="deny", rule_ids=["no-test-orders"],
                                   reasons=["test orders are never paid"])
        return None


app = tether.Tether(db="memory://", config=CONFIG)
app.register(pay)
app.add_policy(NoTestOrders())
not_an_app = 42
"""

APP_POLICY = (
    "rules:\n"
    "  - id: exact-amount\n"
    "    when: args.amount == '150'\n"
    "    decision: require_approval\n"
    "    reason: this amount is looked at\n"
    "  - id: web-payments\n"
    "    when: has(args.channel) && args.channel == 'web'\n"
    "    decision: dry_run_only\n"
    "    reason: web payments are rehearsed\n"
)

APP_CASES = (
    "policy: tether.yaml\n"
    "cases:\n"
    "  - name: a YAML number is Decimal text\n"
    "    capability: payments.pay\n"
    "    effect: write\n"
    "    args: {order_id: o-1, amount: 150, channel: shop}\n"
    "    principal: &bot {id: bot, scopes: ['payments:write']}\n"
    "    expect: {decision: require_approval, rules: [exact-amount]}\n"
    "  - name: the default channel is there\n"
    "    capability: payments.pay\n"
    "    effect: write\n"
    "    args: {order_id: o-2, amount: 10}\n"
    "    principal: *bot\n"
    "    expect: {decision: dry_run_only, rules: [web-payments]}\n"
    "  - name: the python policy denies\n"
    "    capability: payments.pay\n"
    "    effect: write\n"
    "    args: {order_id: test-3, amount: 10, channel: shop}\n"
    "    principal: *bot\n"
    "    expect: {decision: deny, rules: [no-test-orders]}\n"
    "  - name: the scope comes from the capability\n"
    "    capability: payments.pay\n"
    "    effect: write\n"
    "    args: {order_id: o-4, amount: 10, channel: shop}\n"
    "    principal: {id: bot}\n"
    "    expect: {decision: deny, rules: ['tether:scopes']}\n"
)


@pytest.fixture
def app_folder(tmp_path: Path) -> Path:
    """A folder with `shop.py` (an app: a capability and a Python policy), its policy and tests."""
    (tmp_path / "tether.yaml").write_text(APP_POLICY)
    (tmp_path / "tether.test.yaml").write_text(APP_CASES)
    (tmp_path / "shop.py").write_text(
        APP_MODULE.replace("CONFIG", repr(str(tmp_path / "tether.yaml")))
    )
    return tmp_path


def tether_in(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `tether` command in `folder`, without `TETHER_*` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [CLI, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_with_app_cases_are_decided_as_real_steps(app_folder: Path) -> None:
    """With --app, args are validated and recorded as a step's (Decimal text, defaults), scopes come from the capability and Python policies decide too."""
    done = tether_in(
        app_folder, "policy", "test", "tether.test.yaml", "--app", "shop:app"
    )
    as_json = tether_in(
        app_folder, "policy", "test", "tether.test.yaml", "--app", "shop:app", "--json"
    )
    without = tether_in(app_folder, "policy", "test", "tether.test.yaml", "--json")

    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert "4 passed, 0 failed" in done.stdout
    assert "shop:app: its capabilities and Python policies" in done.stdout
    assert "rules from" not in done.stdout
    doc = json.loads(as_json.stdout)
    assert (doc["ok"], doc["app"], doc["passed"]) == (True, "shop:app", 4)
    plain = {c["name"]: c["passed"] for c in json.loads(without.stdout)["cases"]}
    assert without.returncode == 1
    assert plain == {
        "a YAML number is Decimal text": False,
        "the default channel is there": False,
        "the python policy denies": False,
        "the scope comes from the capability": False,
    }


def test_with_app_a_case_that_is_no_real_step_fails_in_one_line(
    app_folder: Path,
) -> None:
    """An unknown capability, invalid args or another effect or scopes fail their case with one line naming why."""
    case = (
        "  - {{name: {name}, capability: {cap}, effect: {effect}, args: {args}, "
        "principal: {{id: bot}}, {extra}expect: {{decision: allow}}}}\n"
    )
    (app_folder / "bad.test.yaml").write_text(
        "policy: tether.yaml\ncases:\n"
        + case.format(
            name="unknown", cap="payments.lend", effect="write", args="{}", extra=""
        )
        + case.format(
            name="bad-args",
            cap="payments.pay",
            effect="write",
            args="{order_id: o-1, amount: lots}",
            extra="",
        )
        + case.format(
            name="other-effect",
            cap="payments.pay",
            effect="read",
            args="{order_id: o-1, amount: 1}",
            extra="",
        )
        + case.format(
            name="other-scopes",
            cap="payments.pay",
            effect="write",
            args="{order_id: o-1, amount: 1}",
            extra="scopes: [], ",
        )
    )

    done = tether_in(app_folder, "policy", "test", "bad.test.yaml", "--app", "shop:app")
    as_json = tether_in(
        app_folder, "policy", "test", "bad.test.yaml", "--app", "shop:app", "--json"
    )

    assert done.returncode == 1
    assert "0 passed, 4 failed" in done.stdout
    shown = " ".join(done.stdout.split())  # Rich wraps long lines
    for fail in [
        "FAIL unknown: unknown capability 'payments.lend'; registered: payments.pay",
        "FAIL bad-args: payments.pay: arguments: amount: Input should be a valid decimal",
        "FAIL other-effect: effect: the case says 'read' but capability "
        "'payments.pay' is 'write'; fix the case's effect",
        "FAIL other-scopes: scopes: the case says [] but capability 'payments.pay' "
        "requires ['payments:write']; fix or drop the case's scopes",
    ]:
        assert fail in shown
    cases = json.loads(as_json.stdout)["cases"]
    assert cases[0]["got"] is None
    assert cases[0]["problem"].startswith("unknown capability 'payments.lend'")


def test_with_app_and_another_policy_file_the_test_files_rules_decide(
    app_folder: Path,
) -> None:
    """When the app reads another policy file, the test file's rules decide beside the app's Python policies, and the header says so."""
    other = app_folder / "other"
    other.mkdir()
    (other / "tether.yaml").write_text("rules: []\n")
    (other / "tether.test.yaml").write_text(
        "policy: tether.yaml\ncases:\n"
        "  - {name: no rules, capability: payments.pay, effect: write, "
        "args: {order_id: o-1, amount: 150}, principal: {id: bot, scopes: ['payments:write']}, "
        "expect: {decision: allow, rules: []}}\n"
        "  - {name: python still, capability: payments.pay, effect: write, "
        "args: {order_id: test-1, amount: 1}, principal: {id: bot, scopes: ['payments:write']}, "
        "expect: {decision: deny, rules: [no-test-orders]}}\n"
    )

    done = tether_in(
        app_folder, "policy", "test", "other/tether.test.yaml", "--app", "shop:app"
    )

    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert "rules from the policy above, not the app's" in done.stdout
    assert "2 passed, 0 failed" in done.stdout


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        pytest.param("shop", "write MODULE:ATTR", id="no-colon"),
        pytest.param("nowhere:app", "no module 'nowhere'", id="no-module"),
        pytest.param("shop:missing", "has no attribute 'missing'", id="no-attribute"),
        pytest.param(
            "shop:not_an_app", "is a int, not a tether.Tether", id="not-an-app"
        ),
        pytest.param(
            "broken:app", "importing 'broken' failed: ZeroDivisionError", id="raises"
        ),
    ],
)
def test_a_bad_app_exits_2_in_one_line(
    app_folder: Path, spec: str, fragment: str
) -> None:
    """A malformed, missing or wrong --app value exits 2 with one `error[usage_error]` line."""
    (app_folder / "broken.py").write_text("1 / 0\n")

    done = tether_in(app_folder, "policy", "test", "tether.test.yaml", "--app", spec)

    assert (done.returncode, done.stdout) == (2, "")
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error[usage_error] --app {spec!r}: "), lines[0]
    assert fragment in lines[0]


def test_run_cases_with_capabilities_decides_only_real_steps() -> None:
    """Given a registry, `run_cases` decides a valid step of a named version and gives every other case its problem."""
    registry = Registry()
    registry.add(refund)
    cases: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
        ("ok", "write", {"order_id": "o-1", "amount_cents": 5}, {"version": "1"}),
        ("old", "write", {}, {"version": "0"}),
        ("args", "write", {"order_id": "o-1"}, {}),
        ("effect", "read", {}, {}),
        ("scopes", "write", {}, {"scopes": ["x"]}),
    ]
    tests = PolicyTests.model_validate(
        {
            "policy": "tether.yaml",
            "cases": [
                {
                    "name": name,
                    "capability": "payments.refund",
                    "effect": effect,
                    "args": args,
                    "principal": {"id": "bot"},
                    "expect": {"decision": "allow", "rules": []},
                    **extra,
                }
                for name, effect, args, extra in cases
            ],
        }
    )

    report = run_cases(PolicySet(), tests, capabilities=registry)

    assert [(r.case.name, r.passed) for r in report.results] == [
        ("ok", True),
        ("old", False),
        ("args", False),
        ("effect", False),
        ("scopes", False),
    ]
    assert [r.problem for r in report.results] == [
        None,
        "capability 'payments.refund' has no version '0'; registered: 1",
        "payments.refund: arguments: amount_cents: Field required",
        "effect: the case says 'read' but capability 'payments.refund' is 'write'; "
        "fix the case's effect",
        "scopes: the case says ['x'] but capability 'payments.refund' requires []; "
        "fix or drop the case's scopes",
    ]
    assert report.results[1].decision is None
