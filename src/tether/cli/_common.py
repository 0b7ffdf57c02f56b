"""What every `tether` command shares: the app, options, escaping, output."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tether._version import __version__
from tether.app import Tether
from tether.config import (
    DEFAULT_DB,
    load_settings,
    resolve_config_path,
    resolve_db,
)
from tether.errors import (
    ApprovalClosed,
    NotAllowedToApprove,
    NotFound,
    TetherError,
    UsageError,
)
from tether.scenarios import SCENARIOS
from tether.store import safe_url, skew_problem, sqlite_path

__all__ = [
    "JSON_FORMAT",
    "_OK_STATUSES",
    "_STYLE",
    "_App",
    "_Db",
    "_Json",
    "_RunArg",
    "_brief",
    "_clean",
    "_console",
    "_db_url",
    "_decided",
    "_emit_json",
    "_error",
    "_escape_char",
    "_field",
    "_help_if_bare",
    "_json_errors",
    "_load_app",
    "_ms",
    "_no_database",
    "_open",
    "_opened",
    "_opening",
    "_policy_cli",
    "_runs_cli",
    "_styled",
    "_version",
    "_warn_of_skew",
    "_with_scenario",
    "cli",
]

JSON_FORMAT = 1
"""Version of every `--json` document this command prints."""

_json_errors = {"on": False}
"""Whether an error also goes to stdout as a JSON document (`main` sets it when
the command line holds --json)."""

_OK_STATUSES = ("executed", "dry_run", "idempotent_hit")
_STYLE = {
    "executed": "green",
    "dry_run": "cyan",
    "idempotent_hit": "green",
    "refused": "yellow",
    "invalid": "yellow",
    "failed": "red",
    "in_doubt": "bold red",
    "succeeded": "bold green",
    "failed_run": "bold red",
}
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)
"""Control characters, and the invisible and bidirectional marks that can make a
terminal show something else than the text holds."""

cli = typer.Typer(
    name="tether",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_runs_cli = typer.Typer(rich_markup_mode=None)
cli.add_typer(_runs_cli, name="runs")
_policy_cli = typer.Typer(rich_markup_mode=None)
cli.add_typer(_policy_cli, name="policy")

_Db = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        help=f"Database URL; default: $TETHER_DB, else {DEFAULT_DB}.",
        show_default=False,
    ),
]
_Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout.")
]
_RunArg = Annotated[
    str,
    typer.Argument(
        metavar="RUN",
        help="A run id, or a unique prefix of 6+ characters.",
        show_default=False,
    ),
]


# -- escaping and small formatting ------------------------------------------------------


def _clean(value: object, limit: int | None = None) -> str:
    """Return `value` as text safe for a terminal: control characters escaped.

    Args:
        value: anything; non-text is converted with `str`.
        limit: cut to this many characters (with an ellipsis), when given.
    """
    text = value if isinstance(value, str) else str(value)
    text = _UNSAFE.sub(_escape_char, text)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _brief(value: object, limit: int = 60) -> str:
    """Return a short one-line view of an output or args mapping."""
    if isinstance(value, Mapping):
        parts = []
        for key, item in value.items():
            if isinstance(item, Mapping):
                shown = "{…}"
            elif isinstance(item, list):
                shown = f"[{len(item)} items]"
            else:
                shown = str(item)
            parts.append(f"{key}={shown}")
        return _clean(" ".join(parts), limit)
    return _clean(value, limit)


def _ms(duration_us: int | None) -> str:
    if duration_us is None:
        return ""
    if duration_us >= 1_000_000:
        return f"{duration_us / 1_000_000:.2f} s"
    return f"{duration_us / 1000:.1f} ms"


def _console() -> Console:
    console = Console(highlight=False, soft_wrap=False, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # a pipe or a file has no width; 80 would cut the timeline
    return console


def _emit_json(doc: Mapping[str, Any]) -> None:
    # ensure_ascii: every non-ASCII and control character leaves as an escape,
    # so a terminal showing the document cannot be steered by agent text.
    print(json.dumps(doc, indent=2, default=str))


def _styled(status: str | None) -> Text:
    text = _clean(status or "")
    return Text(text, style=_STYLE.get(text, ""))


Column = tuple[str, int | None]
"""A list's column: its header and how narrow it may get (None: never narrower
than its text, as ids, which are what other commands take)."""


def _fitted_table(
    columns: Sequence[Column],
    give_way: Sequence[str],
    cells: Sequence[Sequence[str]],
    width: int,
    *,
    status: Callable[[str], Text],
    right: str,
) -> tuple[Table, int]:
    """Return `cells` as a table that fits `width` where it can, and its width.

    Columns narrow in `give_way` order, each to its minimum; text folds and
    times wrap at their space. The second column is a status (`status` styles
    it); `right` is right-aligned. When even the narrowest table is wider than
    `width`, the returned width says how wide it is (the terminal wraps it).
    """
    widths = [
        max([len(header), *(len(row[i]) for row in cells)])
        for i, (header, _) in enumerate(columns)
    ]
    over = sum(widths) + 2 * (len(widths) - 1) - width  # two spaces between columns
    headers = [header for header, _ in columns]
    for name in give_way:
        if over <= 0:
            break
        i = headers.index(name)
        cut = min(over, max(widths[i] - (columns[i][1] or widths[i]), 0))
        widths[i] -= cut
        over -= cut
    table = Table(box=None, pad_edge=False, header_style="bold")
    for (header, least), fitted in zip(columns, widths, strict=True):
        table.add_column(
            header,
            width=None if least is None else fitted,
            no_wrap=least is None,
            overflow="fold",
            justify="right" if header == right else "left",
        )
    for row in cells:
        table.add_row(Text(row[0]), status(row[1]), *(Text(cell) for cell in row[2:]))
    return table, sum(widths) + 2 * (len(widths) - 1)


# -- opening the app ----------------------------------------------------------------------


def _db_url(db: str | None) -> str:
    """Return the database URL a command uses: --db, else $TETHER_DB, else the default.

    Raises:
        UsageError: --db was given empty.
    """
    if db is not None and not db.strip():
        raise UsageError(
            "--db is empty; give a database URL (sqlite:///path/to/file.db, "
            "postgresql://..., memory://), or leave --db out for $TETHER_DB, "
            f"else {DEFAULT_DB}"
        )
    return resolve_db(db)


@contextmanager
def _opening(db: str | None) -> Iterator[None]:
    """Say, in any tether error raised inside, that the URL came from TETHER_DB.

    Wrap only the opening of the database: an error there is about the URL.
    """
    given = os.environ.get("TETHER_DB")
    try:
        yield
    except TetherError as exc:
        if db is None and given:
            exc.message = f"TETHER_DB={safe_url(given)!r}: {exc.message}"
            exc.args = (exc.message,)
        raise


@contextmanager
def _open(
    db: str | None,
    *,
    must_exist: bool = False,
    read_only: bool = False,
    config: Path | None = None,
) -> Iterator[Tether]:
    """Open the app on the database `db` names (see `_db_url`).

    `read_only`, for commands that only read: a SQLite file must exist and be a
    tether database of this schema; it is not migrated, written, nor given a
    record key file.
    """
    with _opening(db):
        url = _db_url(db)
        path = sqlite_path(url)
        if (must_exist or read_only) and path and not Path(path).is_file():
            raise _no_database(
                path, "run `tether demo` first or pass --db (or set TETHER_DB)"
            )
    # The configuration first, outside `_opening`: its errors are about the
    # file, and must not be blamed on a URL that came from TETHER_DB.
    load_settings(resolve_config_path(config))
    with _opening(db):
        app = Tether(db=url, config=config, read_only=read_only)
    with app:
        yield app


_T = TypeVar("_T")


def _decided(decide: Callable[[], _T]) -> _T:
    """Return `decide()`; a person's refused decision is the answer no: one line, exit 1.

    Not an approver (`approvals approve`/`deny`, `runs resolve`), or the
    request closed: the command ran, and the answer is no.
    """
    try:
        return decide()
    except (NotAllowedToApprove, ApprovalClosed) as exc:
        _error(exc.code, exc.message)
        raise typer.Exit(1) from exc


@contextmanager
def _opened(
    db: str | None, config: Path | None, app: str | None, *, read_only: bool = False
) -> Iterator[Tether]:
    """Yield the user's app (`--app`), or one on `--db` and `--config`: a command's app.

    `read_only` (list, show): the database is opened without migrating or
    writing it (see `_open`).

    Raises:
        UsageError: `--app` together with `--db` or `--config`, or a bad `--app`.
        NotFound: no database at the SQLite path (a read never creates one).
    """
    if app is not None:
        if db is not None or config is not None:
            raise UsageError(
                "--app reads the app's own database and tether.yaml; drop --db "
                "and --config, or drop --app"
            )
        yield _load_app(app)  # the user's app: theirs to close
        return
    with _opening(db):
        path = sqlite_path(_db_url(db))
        if path and not Path(path).is_file():
            raise _no_database(
                path,
                "pass --db (or set TETHER_DB) to the database your app records to",
            )
    with _open(db, read_only=read_only, config=resolve_config_path(config)) as opened:
        yield opened


def _no_database(path: str, fix: str) -> NotFound:
    """Say that no SQLite database is at `path` (a folder is named as one); `fix` says what to do."""
    if Path(path).is_dir():
        return NotFound(
            f"{path} is a folder, not a database file; pass --db "
            "sqlite:///path/to/file.db (or set TETHER_DB)"
        )
    return NotFound(f"no database at {path}; {fix}")


def _with_scenario(app: Tether, run_id: str) -> None:
    """Register the capabilities of the built-in scenario a run came from, if any.

    Export and the timeline then know each capability's declaration and effect.
    """
    events = app.store.events(app.store.get_run(run_id).run_id)
    if not events:
        return
    first = events[0].data()
    context = first.get("context")
    name = context.get("scenario") if isinstance(context, Mapping) else None
    scenario = SCENARIOS.get(name) if isinstance(name, str) else None
    if scenario is not None:
        scenario.setup(app)


_App = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Your tether.Tether instance, as uvicorn names an app (myapp:app); "
        "cases are then decided as real steps of its capabilities, with its "
        "Python policies.",
        show_default=False,
    ),
]


def _load_app(spec: str) -> Tether:
    """Import `MODULE:ATTR` (the current folder first on `sys.path`); return the app.

    Raises:
        UsageError: the value is malformed, the module or attribute is missing,
            or it is not a `tether.Tether`.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(
            f"--app {spec!r}: write MODULE:ATTR, e.g. myapp:app (the module and "
            "the name of your tether.Tether in it)"
        )
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        # A path, not a module name: `import` would fail with a riddle.
        named = Path(module_name)
        short = (named.stem if named.suffix == ".py" else named.name) or "myapp"
        raise UsageError(
            f"--app {spec!r}: MODULE is a module name, not a file path; run from "
            f"the folder that holds {short}.py and write --app {short}:{attr}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise UsageError(
                f"--app {spec!r}: no module {module_name!r} in {cwd} or on the "
                "path; run from the folder that holds it"
            ) from exc
        raise UsageError(
            f"--app {spec!r}: importing {module_name!r} failed: {exc}"
        ) from exc
    except TetherError:
        raise  # the app's own setup failed (a bad tether.yaml, ...): its own code
    except Exception as exc:  # user code ran: report it in one line
        raise UsageError(
            f"--app {spec!r}: importing {module_name!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    value: object = module
    for name in attr.split("."):
        if not hasattr(value, name):
            raise UsageError(
                f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}"
            )
        value = getattr(value, name)
    if not isinstance(value, Tether):
        raise UsageError(
            f"--app {spec!r}: {attr!r} is a {type(value).__name__}, not a "
            "tether.Tether; name the app instance"
        )
    return value


def _field(console: Console, label: str, value: object, limit: int = 400) -> None:
    line = Text(f"{label:<10}", style="dim")
    line.append(_clean(value, limit))
    console.print(line)


def _warn_of_skew(console: Console, skew: timedelta | None) -> bool:
    """Print a warning line if this host's clock is too far off the store's; tell whether it did."""
    problem = skew_problem(skew)
    if problem is not None:
        console.print(Text(f"warning: {problem}", style="yellow"))
    return problem is not None


def _version(value: bool) -> None:
    if value:
        print(f"tether {__version__}")
        raise typer.Exit


def _help_if_bare(ctx: typer.Context) -> None:
    # A bare `tether` or `tether runs` asks what there is: answer with the help.
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit


def _error(code: str, message: str) -> None:
    """Print the one `error[code] message` line on stderr.

    With --json the error is also one JSON document on stdout, so a script
    reading stdout always gets a document: `{"format": 1, "ok": false,
    "error": {"code": ..., "message": ...}}`.
    """
    line = " ".join(message.split())  # one line, whatever the message held
    sys.stderr.write(f"error[{_clean(code, 60)}] {_clean(line)}\n")
    sys.stderr.flush()
    if _json_errors["on"]:
        error = {"code": code, "message": line}
        _emit_json({"format": JSON_FORMAT, "ok": False, "error": error})
        sys.stdout.flush()
