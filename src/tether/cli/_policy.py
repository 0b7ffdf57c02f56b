"""`tether policy check` and `tether policy test`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tether.cli._common import (
    JSON_FORMAT,
    _App,
    _clean,
    _console,
    _emit_json,
    _error,
    _field,
    _help_if_bare,
    _Json,
    _load_app,
    _policy_cli,
)
from tether.config import (
    ConfigProblem,
    check_config,
    check_policy_tests,
    load_settings,
    policy_from,
)
from tether.errors import ConfigError
from tether.policy import RuleSet, Verdict
from tether.policy.testing import PolicyTestReport, run_cases

__all__: list[str] = []  # commands register on `cli` on import


# -- policy ----------------------------------------------------------------------------

_PolicyFile = Annotated[
    Path,
    typer.Argument(
        metavar="FILE", help="The policy file (tether.yaml).", show_default=False
    ),
]
_TestFile = Annotated[
    Path,
    typer.Argument(
        metavar="FILE",
        help="The policy test file (tether.test.yaml).",
        show_default=False,
    ),
]


@_policy_cli.callback(invoke_without_command=True)
def _policy(ctx: typer.Context) -> None:
    """Check and test policy files before they ship.

    Example: tether policy check tether.yaml
    """
    _help_if_bare(ctx)


def _problems_found(
    problems: Sequence[ConfigProblem], as_json: bool, doc: Mapping[str, Any]
) -> typer.Exit:
    """Print each problem (one line each, or in the JSON document); return exit 1."""
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                **doc,
                "ok": False,
                "errors": [p.to_json() for p in problems],
            }
        )
    else:
        for problem in problems:
            _error(ConfigError.code, str(problem))
    return typer.Exit(1)


@_policy_cli.command("check")
def _policy_check(file: _PolicyFile, as_json: _Json = False) -> None:
    """Validate a policy file and compile its conditions; exit 1 listing every problem.

    On success prints the number of rules, how many take each decision, the
    defaults per effect and the policy version decisions will record. Each
    problem is one line on stderr: FILE:LINE: where in the file: what is wrong.

    Example: tether policy check tether.yaml
    """
    checked = check_config(file)
    if checked.value is None:
        raise _problems_found(checked.problems, as_json, {"file": str(file)})
    settings = checked.value
    RuleSet(settings.rules)  # compile and index exactly as the app will
    counts = {verdict.value: 0 for verdict in Verdict}
    for rule in settings.rules:
        counts[rule.decision.value] += 1
    defaults = settings.defaults.model_dump(mode="json")
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "file": str(file),
                "ok": True,
                "version": checked.version,
                "rules": len(settings.rules),
                "decisions": counts,
                "defaults": defaults,
                "errors": [],
            }
        )
        return
    console = _console()
    line = Text("ok ", style="bold green")
    rules = len(settings.rules)
    line.append(
        _clean(f"{file}: {rules} rule{'' if rules == 1 else 's'}, policy version ")
    )
    line.append(str(checked.version), style="bold")
    console.print(line)
    _field(console, "decisions", " · ".join(f"{v} {n}" for v, n in counts.items()))
    _field(console, "defaults", " · ".join(f"{e} {v}" for e, v in defaults.items()))


@_policy_cli.command("test")
def _policy_test(file: _TestFile, app: _App = None, as_json: _Json = False) -> None:
    """Run policy unit tests written in YAML; exit 1 if a case fails.

    The test file names the policy it tests (policy: tether.yaml, relative to
    the test file) and lists cases: each is one step (capability, effect,
    scopes, args, principal, context, run) and the decision it expects
    (expect: {decision: deny, rules: [rule-id]}). Cases are decided as the app
    decides them: scopes first, then the rules, then the defaults per effect.

    With --app, each case is a real step of the app's capability: its args are
    validated and recorded as the gateway records them, its effect, scopes and
    version are the capability's, and the app's Python policies take part,
    beside the rules of the policy file the test file names. A case that cannot
    be such a step (unknown capability, invalid args) fails. See docs/policy.md.

    Example: tether policy test tether.test.yaml --app myapp:app
    """
    loaded = None if app is None else _load_app(app)
    checked = check_policy_tests(file)
    if checked.value is None:
        raise _problems_found(checked.problems, as_json, {"file": str(file)})
    tests = checked.value
    policy_checked = check_config(tests.policy)
    if policy_checked.value is None:
        doc = {"file": str(file), "policy": str(tests.policy)}
        raise _problems_found(policy_checked.problems, as_json, doc)
    # The file's policy alone: no store, no webhook (whose variable, with
    # `webhook_env`, a test shell may lack), as an app would decide with it.
    settings, version = load_settings(tests.policy)
    policy = policy_from(settings, version, has_file=tests.policy)
    own_rules = False
    if loaded is not None:
        own_rules = loaded.config_path is not None and _same_file(
            loaded.config_path, tests.policy
        )
        if own_rules:
            policy = loaded.current_policy()
        else:  # the app's Python policies, the test file's rules
            policy = loaded.current_policy().replace(
                rules=policy.rules, defaults=policy.defaults, version=policy.version
            )
    report = run_cases(
        policy, tests, capabilities=None if loaded is None else loaded.capabilities
    )
    if as_json:
        _emit_json(
            {
                "format": JSON_FORMAT,
                "file": str(file),
                "policy": str(tests.policy),
                "policy_version": report.policy_version,
                **({} if app is None else {"app": app}),
                "ok": report.ok,
                "passed": report.passed,
                "failed": report.failed,
                "cases": [
                    {
                        "name": r.case.name,
                        "expected": {
                            "decision": r.case.expect.decision.value,
                            "rules": None
                            if r.case.expect.rules is None
                            else list(r.case.expect.rules),
                        },
                        "got": None
                        if r.decision is None
                        else {
                            "decision": r.decision.verdict.value,
                            "rules": list(r.decision.rule_ids),
                            "reasons": list(r.decision.reasons),
                        },
                        **({} if r.problem is None else {"problem": r.problem}),
                        "passed": r.passed,
                    }
                    for r in report.results
                ],
                "errors": [],
            }
        )
    else:
        note = None
        if loaded is not None:
            note = f"{app}: its capabilities and Python policies" + (
                ""
                if own_rules
                else f"; rules from the policy above, not the app's "
                f"{loaded.config_path or '(no policy file)'}"
            )
        _print_policy_report(file, tests.policy, report, app=note)
    if not report.ok:
        raise typer.Exit(1)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _print_policy_report(
    file: Path, policy: Path, report: PolicyTestReport, *, app: str | None = None
) -> None:
    console = _console()
    _field(console, "tests", file)
    _field(console, "policy", f"{policy} ({report.policy_version})")
    if app is not None:
        _field(console, "app", app)
    console.print()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("case", "expected", "got", "rules", "result"):
        table.add_column(name, overflow="fold")
    for r in report.results:
        expected = r.case.expect.decision.value
        if r.case.expect.rules is not None:
            expected += f" [{', '.join(r.case.expect.rules) or 'default'}]"
        got = r.decision
        table.add_row(
            Text(_clean(r.case.name, 60)),
            Text(_clean(expected, 60)),
            Text("error") if got is None else Text(_clean(got.verdict.value)),
            Text("")
            if got is None
            else Text(_clean(", ".join(got.rule_ids) or "default", 60)),
            Text("pass", style="green") if r.passed else Text("FAIL", style="bold red"),
        )
    console.print(table)
    for r in report.results:
        if r.problem is not None:
            detail = Text("FAIL ", style="bold red")
            detail.append(_clean(f"{r.case.name}: {r.problem}", 400))
            console.print(detail, soft_wrap=True)  # one line a failure, to grep
        elif r.decision is not None and not r.passed and r.decision.reasons:
            detail = Text("FAIL ", style="bold red")
            detail.append(
                _clean(f"{r.case.name}: {'; '.join(r.decision.reasons)}", 400)
            )
            console.print(detail, soft_wrap=True)
        elif r.decision is not None and not r.passed and not r.decision.rule_ids:
            # The default decided: no reason to show, so say that, and what the
            # table's `[default]` is written as.
            why = (
                f"no rule matched; the default for {r.case.effect} decided "
                f"{r.decision.verdict.value}"
            )
            if r.case.expect.rules == ("default",):
                why += " (expect `rules: []` for the default)"
            detail = Text("FAIL ", style="bold red")
            detail.append(_clean(f"{r.case.name}: {why}", 400))
            console.print(detail, soft_wrap=True)
    console.print()
    summary = Text(
        f"{report.passed} passed, {report.failed} failed",
        style="bold green" if report.ok else "bold red",
    )
    console.print(summary)
