"""The `tether` command line: a thin face over the public API.

Each command parses its flags, calls what a user would call (`Tether`,
`run_agent`, `Tether.verify`, `Tether.export`) and renders the answer: Rich for
people, one JSON document (with a `format` key) for `--json`. Errors are one
line on stderr, `error[<code>] <message>`: exit 2 when the command could not
run, 1 when it ran and the answer is no. Anything an agent controls (args,
outputs, requests, messages) is escaped before it reaches the terminal.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated

import typer

from tether.cli import (  # noqa: F401  # their commands register on import
    _approvals,
    _policy,
    _replay,
    _runs,
    _status,
    _worker,
)
from tether.cli._common import (
    JSON_FORMAT,
    _error,
    _help_if_bare,
    _json_errors,
    _runs_cli,
    _version,
    cli,
)
from tether.errors import TetherError

__all__ = ["JSON_FORMAT", "cli", "main"]

# -- commands ---------------------------------------------------------------------------


@cli.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """tether: the runtime control plane for production AI agents.

    Commands that use the database take --db URL; with --json a command prints
    one JSON document on stdout. Errors are one line on stderr (with --json,
    also a JSON document on stdout): exit 2 when a command could not run, 1
    when it ran and the answer is no, 130 when interrupted (Ctrl-C).

    Example: tether demo
    """
    _help_if_bare(ctx)


@_runs_cli.callback(invoke_without_command=True)
def _runs_group(ctx: typer.Context) -> None:
    """List, show, export, resume and abort recorded runs.

    Example: tether runs list --limit 5
    """
    _help_if_bare(ctx)


# -- entry point -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `tether` command and return its exit code.

    Exit codes: 0 done, 1 the command ran and the answer is no (`verify` found
    a bad record, `demo` did not succeed), 2 the command could not run.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    given = args[: args.index("--")] if "--" in args else args
    _json_errors["on"] = "--json" in given
    debug = os.environ.get("TETHER_DEBUG") == "1"
    try:
        command = typer.main.get_command(cli)
        result = command.main(args=args, prog_name="tether", standalone_mode=False)
    except KeyboardInterrupt:
        return _interrupted()
    except typer.TyperException as exc:
        # Click's usage errors (typer vendors Click; they derive from this class).
        where = getattr(getattr(exc, "ctx", None), "command_path", None) or "tether"
        _error("usage_error", f"{where}: {exc.format_message()} (see {where} --help)")
        return 2
    except typer.Abort:  # end of input at a prompt
        return _interrupted()
    except TetherError as exc:
        if debug:
            traceback.print_exc()
        _error(exc.code, exc.message)
        return 2
    except OSError as exc:
        if debug:
            traceback.print_exc()
        _error("io_error", f"{exc.strerror or exc}: {exc.filename or ''}".strip(": "))
        return 2
    except Exception as exc:  # noqa: BLE001  # the last line of defence: one line, not a trace
        if debug:
            traceback.print_exc()
        _error(
            "internal",
            f"{type(exc).__name__}: {exc} (a bug in tether; set TETHER_DEBUG=1 for "
            "the traceback and report it)",
        )
        return 2
    if result == 130:  # typer's answer to Ctrl-C (KeyboardInterrupt) in a command
        return _interrupted()
    return result if isinstance(result, int) else 0


def _interrupted() -> int:
    _error(
        "interrupted",
        "stopped by Ctrl-C before the command finished; run it again to "
        "finish (whatever it had already recorded is kept)",
    )
    return 130


if __name__ == "__main__":  # pragma: no cover  # `python -m tether.cli`
    sys.exit(main())
