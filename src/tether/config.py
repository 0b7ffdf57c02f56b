"""Where settings come from, read in one place: flags, `TETHER_*` variables, files.

Precedence, for every setting: flag > `TETHER_*` variable > `tether.yaml` >
default. The database: `--db`, then `TETHER_DB`, then
`sqlite:///.tether/tether.db`. The key that signs record chain heads:
`TETHER_RECORD_KEY`, else a key file beside the SQLite database (created on
first use, mode 0600).

What loaded settings make is built here too (`policy_from`, `guards_from`,
`webhook_from`), and `misfits` says where capabilities and settings cannot
work together, so an app and a replay build them alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic

from tether._guards import Guards
from tether._units import Duration, parse_duration
from tether._yaml_check import ConfigCheck, ConfigProblem, check_file
from tether.capability import Capability
from tether.clock import Clock
from tether.errors import ConfigError
from tether.limits import Limit, LimitSet
from tether.notify import Webhook
from tether.policy import PolicySet, RuleSet
from tether.policy.rules import RulesConfig
from tether.policy.testing import PolicyTests
from tether.resilience import Breaker, BreakerSet, RetryBudget
from tether.store import sqlite_path

__all__ = [
    "DEFAULT_DB",
    "ConfigCheck",
    "ConfigFile",
    "ConfigProblem",
    "Settings",
    "check_config",
    "check_policy_tests",
    "guards_from",
    "load_policy_tests",
    "load_settings",
    "misfits",
    "parse_duration",
    "policy_from",
    "record_key",
    "resolve_config_path",
    "resolve_db",
    "webhook_from",
]

DEFAULT_DB = "sqlite:///.tether/tether.db"


class IdempotencySettings(pydantic.BaseModel, extra="forbid", frozen=True):
    """How long keys live."""

    retention: Duration = timedelta(hours=24)
    """How long a completed call's result answers retries under its key."""
    claim_ttl: Duration = timedelta(minutes=5)
    """How long an in-progress claim holds before another worker may take it over."""


class Approver(pydantic.BaseModel, extra="forbid", frozen=True):
    """A person who may decide approval requests: their roles, and whose requests."""

    roles: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    """The tenants whose requests they may decide; empty: every tenant."""


def _as_approver(value: object) -> object:
    # `alice: [sre, finance]` is short for `alice: {roles: [sre, finance]}`.
    if isinstance(value, (list, tuple)):
        return {"roles": value}
    return value


class ApprovalSettings(pydantic.BaseModel, extra="forbid", frozen=True):
    """How approval requests behave."""

    ttl: Duration = timedelta(hours=24)
    """How long a request waits for a decision; undecided, it expires (a denial, recorded)."""
    webhook: str | None = pydantic.Field(default=None, pattern=r"^https?://")
    """A URL that gets a JSON POST when a request is made and when it is decided."""
    webhook_env: str | None = pydantic.Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
    )
    """The environment variable that holds the webhook's URL, for a URL that
    carries a token: the file (which `tether runs export` copies) never holds it."""
    webhook_retries: int = pydantic.Field(default=3, ge=0, le=10)

    @pydantic.model_validator(mode="after")
    def _one_webhook(self) -> ApprovalSettings:
        if self.webhook is not None and self.webhook_env is not None:
            raise ValueError(
                "give the webhook's URL (webhook) or the variable that holds it "
                "(webhook_env), not both"
            )
        return self


class Settings(RulesConfig, extra="forbid", frozen=True):
    """The contents of `tether.yaml` that this version understands.

    Each concept owns its section's model (`rules` and `defaults` come from
    `tether.policy.rules`); this class only assembles them.
    """

    version: Literal[1] = 1
    """Format version of the file."""
    idempotency: IdempotencySettings = IdempotencySettings()
    limits: tuple[Limit, ...] = ()
    """Quotas, budgets, concurrency caps and rate limits (`tether.limits`)."""
    breakers: tuple[Breaker, ...] = ()
    """Circuit breakers per resource (`tether.resilience`)."""
    retry_budget: RetryBudget | None = None
    """Retries tether makes itself; none without this section."""
    approvals: ApprovalSettings = ApprovalSettings()
    approvers: dict[
        str, Annotated[Approver, pydantic.BeforeValidator(_as_approver)]
    ] = pydantic.Field(default_factory=dict)
    """Who may decide approval requests, with which roles: `{alice: [sre, finance]}`,
    or `{bob: {roles: [sre], tenants: [acme]}}` for one tenant's requests only.
    Only people named here may decide."""

    @pydantic.model_validator(mode="after")
    def _ids_are_unique_in_the_file(self) -> Settings:
        seen: dict[str, str] = {
            rule.id: f"rules[{i}]" for i, rule in enumerate(self.rules)
        }
        places = [(lim.id, f"limits[{i}]") for i, lim in enumerate(self.limits)]
        places += [(b.id, f"breakers[{i}]") for i, b in enumerate(self.breakers)]
        for ident, place in places:
            if ident in seen:
                raise ValueError(
                    f"id {ident!r} is used twice: {seen[ident]} and {place}; give "
                    "each rule, limit and breaker its own id"
                )
            seen[ident] = place
        return self

    @pydantic.field_validator("breakers")
    @classmethod
    def _one_breaker_per_resource(
        cls, breakers: tuple[Breaker, ...]
    ) -> tuple[Breaker, ...]:
        resources: dict[str, int] = {}
        for i, b in enumerate(breakers):
            if b.resource in resources:
                raise ValueError(
                    f"resource {b.resource!r} has two breakers: "
                    f"breakers[{resources[b.resource]}] and breakers[{i}]; keep one"
                )
            resources[b.resource] = i
        return breakers


def resolve_db(flag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Return the database URL: `flag`, else `TETHER_DB`, else the default."""
    env = os.environ if env is None else env
    return flag or env.get("TETHER_DB") or DEFAULT_DB


def resolve_config_path(
    flag: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """Return the config file: `flag`, else `TETHER_CONFIG`, else `./tether.yaml` if present."""
    env = os.environ if env is None else env
    if flag is not None:
        return Path(flag)
    if env.get("TETHER_CONFIG"):
        return Path(env["TETHER_CONFIG"])
    default = Path("tether.yaml")
    return default if default.is_file() else None


def load_settings(path: Path | None) -> tuple[Settings, str]:
    """Load and validate a config file; return it and its version hash.

    The whole file loads or nothing does. The version is `sha256:` and the first
    16 hex digits of the file's SHA-256.

    Raises:
        ConfigError: the file cannot be read or is invalid. The message is one
            line, `FILE:LINE: path.in.file: what is wrong`, for the first problem;
            `check_config` returns them all.
    """
    if path is None:
        return Settings(), "none"
    checked = check_config(path)
    if checked.value is None or checked.version is None:
        raise ConfigError(
            _first_problem(checked.problems, hint=f"tether policy check {path}")
        )
    return checked.value, checked.version


def check_config(path: Path) -> ConfigCheck[Settings]:
    """Read and validate a config file, collecting every problem instead of the first.

    Example:
        ```python
        checked = check_config(Path("tether.yaml"))
        for problem in checked.problems:
            print(problem)
        ```
    """
    return check_file(path, Settings, "the config file")


def _first_problem(problems: Sequence[ConfigProblem], *, hint: str) -> str:
    first = str(problems[0])
    more = len(problems) - 1
    if more:
        first += f" (and {more} more problem{'s' if more > 1 else ''}: `{hint}` lists them all)"
    return first


def record_key(
    db_url: str,
    env: Mapping[str, str] | None = None,
    *,
    create: bool = True,
    has_runs: Callable[[], bool] | None = None,
) -> bytes | None:
    """Return the key that signs chain heads for the database at `db_url`.

    `TETHER_RECORD_KEY` wins (hex, or any text); else, for a SQLite file, the
    key file beside it, created on first use with mode 0600 (with `create`
    False, as a read asks, a missing file gives None); else None, and
    chain heads are left unsigned. A PostgreSQL database gets no key file: its
    workers run on many hosts, which must all sign with one key, so the key is
    `TETHER_RECORD_KEY`, set alike on every host (kept outside the database).

    A key file is never made for a database that already holds runs
    (`has_runs`): they were signed with a key that is missing now (a database
    copied without its key file, say), and a new one would make every one of
    them fail `tether verify`.

    Raises:
        ConfigError: the key is unreadable or too short, or it is missing for
            a database that holds runs.
    """
    env = os.environ if env is None else env
    given = env.get("TETHER_RECORD_KEY")
    if given:
        try:
            key = bytes.fromhex(given)
        except ValueError:
            key = given.encode()
        if len(key) < 32:
            raise ConfigError(
                f"TETHER_RECORD_KEY is {len(key)} bytes; use at least 32 (64 hex "
                "digits), e.g. from `python -c 'import os; print(os.urandom(32).hex())'`"
            )
        return key
    path = sqlite_path(db_url)
    if not path:
        return None
    key_file = Path(path + ".key")
    if not key_file.exists():
        if not create:
            return None  # a read never makes a key: it could only mismatch
        if has_runs is not None and has_runs():
            raise ConfigError(
                f"{key_file} is missing, and {path} holds runs signed with it: "
                "copy the key file beside the database (or set "
                "TETHER_RECORD_KEY); a new key would fail every earlier run's "
                "`tether verify`"
            )
    try:
        if not key_file.exists():
            _create_key_file(key_file)
        return bytes.fromhex(key_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{key_file}: cannot read the record key ({exc}); set TETHER_RECORD_KEY "
            "or fix the file"
        ) from exc


def _create_key_file(key_file: Path) -> None:
    # Written aside, then linked into place: link fails if another process won the
    # race, and no reader ever sees a half-written key. mkstemp makes the file
    # aside anew (O_EXCL, mode 0600, an unguessable name): a fixed name could be
    # a symlink someone planted, or another process's file of the same pid (two
    # containers sharing the folder), and the key would be written into it.
    folder = key_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f"{key_file.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, key_file)
    finally:
        tmp.unlink(missing_ok=True)


SETTLE_NS = 50_000_000
"""How long (ns) a changed file must go unwritten before a hot reload takes it."""

RACY_NS = 2_000_000_000
"""The coarsest modification-time granularity allowed for (ns): FAT's 2 s
(ext3, HFS+ and ext4 with small inodes keep whole seconds). A file taken
within this of its last write may be rewritten in place at the same size and
keep the same time, which its stamp cannot show (see `ConfigFile`)."""


class ConfigFile:
    """A config file watched for changes, for hot reload.

    `changed()` costs one `stat` call; a step asks it before its decision. A
    file edited in place is taken only once it has gone unwritten for
    `SETTLE_NS` (by its modification time), and only when nothing wrote it
    while it was read: a half-written file can parse (cut after a rule, say),
    and would decide steps without the rules still to come.

    The stamp (modification time, size, inode) misses one change: an in-place
    rewrite of the same size on a file system that keeps times coarser than
    the settling wait, within one tick of the write taken. So, as git does for
    its "racily clean" files, a file taken within `RACY_NS` of its last write
    is read once more when that much time has passed (a read and a hash, once
    per such load): if its content changed under the same stamp, it is
    changed. After that a rewrite cannot keep the old time.
    """

    __slots__ = ("_name", "_recheck_at", "_stamp", "_taken", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        # os.stat of a str: Path.stat's own Python costs as much as the syscall.
        self._name = os.fspath(path)
        self._stamp = self._read_stamp()
        self._taken: str | None = None
        """The content hash (a policy version's form) of what was last taken."""
        self._recheck_at: int | None = None
        """When to read the file once more, in ns (None: no need)."""

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._name)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _digest(self) -> str | None:
        """Return the file's content hash, as a policy version (None: unreadable)."""
        try:
            raw = self.path.read_bytes()
        except OSError:
            return None
        return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]

    def took(self, version: str) -> None:
        """Note that the file, as stamped when this watcher was made, loaded as `version`."""
        self._note(self._stamp, version)

    def _note(self, stamp: tuple[int, int, int] | None, taken: str | None) -> None:
        self._stamp, self._taken, self._recheck_at = stamp, taken, None
        if stamp is None:
            return
        now = time.time_ns()
        if now - stamp[0] < RACY_NS:  # a time ahead of this host's is racy too
            self._recheck_at = max(now, stamp[0]) + RACY_NS

    def changed(self) -> bool:
        """Tell whether the file changed since the last `load`, and has settled."""
        stamp = self._read_stamp()
        if stamp != self._stamp:
            return _settled(stamp)
        if self._recheck_at is None or time.time_ns() < self._recheck_at:
            return False
        self._recheck_at = None
        if self._digest() == self._taken:
            return False
        # Rewritten under the same stamp: forget the stamp, so the file reads
        # as changed until a load takes it (the caller asks twice, under a lock).
        self._stamp = _UNSEEN
        return _settled(stamp)

    def load(self) -> tuple[Settings, str] | None:
        """Load the file as it is now (see `load_settings`); remember its stamp.

        Returns:
            The settings and their version, or None when the file was written
            while it was read, or since `changed()` found it settled (it is
            read again at a later step).

        Raises:
            ConfigError: the file is invalid; the stamp is remembered anyway, so a
                broken file is reported once, not at every step.
        """
        stamp = self._read_stamp()
        if not _settled(stamp):
            return None  # written again since `changed()` said it had settled
        before = self._digest()  # what a broken file held, for the recheck
        try:
            loaded = load_settings(self.path)
        except ConfigError:
            if self._read_stamp() != stamp:
                return None  # cut off by a write, most likely: read it again
            self._note(stamp, before)
            raise
        if self._read_stamp() != stamp:
            return None
        self._note(stamp, loaded[1])
        return loaded


_UNSEEN = (-1, -1, -1)
"""A stamp no file has: the file's content changed under its stamp."""


def _settled(stamp: tuple[int, int, int] | None) -> bool:
    """Tell whether a file stamped so has gone unwritten for `SETTLE_NS` (a gone one has)."""
    # A modification time ahead of this host's clock (another host's file
    # system) cannot be waited out: taken as settled.
    return stamp is None or not 0 <= time.time_ns() - stamp[0] < SETTLE_NS


def check_policy_tests(path: Path) -> ConfigCheck[PolicyTests]:
    """Read and validate a policy test file (see `tether.policy.testing`).

    The value's `policy` is resolved against the test file's folder.
    """
    checked = check_file(path, PolicyTests, "the policy test file")
    if checked.value is None:
        return checked
    target = path.parent / checked.value.policy
    return replace(checked, value=checked.value.model_copy(update={"policy": target}))


def load_policy_tests(path: Path) -> PolicyTests:
    """Load a policy test file; its `policy` is resolved against the file's folder.

    Raises:
        ConfigError: the file cannot be read or is invalid; one line, as for
            `load_settings`.
    """
    checked = check_policy_tests(path)
    if checked.value is None:
        raise ConfigError(
            _first_problem(checked.problems, hint=f"tether policy test {path}")
        )
    return checked.value


# -- what settings make --------------------------------------------------------------


def policy_from(settings: Settings, version: str, *, has_file: object) -> PolicySet:
    """Return the policy `settings` declare (allow-all when there is no file)."""
    rules = RuleSet(settings.rules) if settings.rules else None
    if has_file is None:
        return PolicySet(rules=rules, version=version)  # no policy file: allow all
    return PolicySet(rules=rules, defaults=settings.defaults, version=version)


def misfits(
    settings: Settings, capabilities: Sequence[Capability[Any, Any]]
) -> list[str]:
    """Say where capabilities' timeouts and the settings cannot work together."""
    problems = []
    ttl = settings.idempotency.claim_ttl
    breakers = BreakerSet(settings.breakers)
    for cap in capabilities:
        timeout = cap.timeout
        if timeout is None:
            continue
        if timeout > ttl:
            problems.append(
                f"capability {cap.name!r}: its timeout {timeout} is longer than "
                f"idempotency.claim_ttl ({ttl}), so a retry could take its key over "
                "while it still runs; shorten the timeout or raise claim_ttl"
            )
        watch = breakers.for_resource(cap.resource)
        if watch is not None and watch[0].probe_timeout < timeout:
            problems.append(
                f"capability {cap.name!r}: its timeout {timeout} is longer than the "
                f"probe_timeout ({watch[0].probe_timeout}) of breaker {watch[0].id!r}, "
                "so a slow trial call would reopen the breaker while it still runs; "
                "raise probe_timeout or shorten the timeout"
            )
    return problems


def webhook_from(
    settings: Settings, clock: Clock, env: Mapping[str, str]
) -> Webhook | None:
    """Return where approval news goes, if `settings` name a webhook.

    Raises:
        ConfigError: `approvals.webhook_env` names a variable that is unset,
            holds no http(s) URL, or one with credentials before its host (the
            value is never shown: it may be secret).
    """
    approvals = settings.approvals
    url = approvals.webhook
    if approvals.webhook_env is not None:
        name = approvals.webhook_env
        # A value read from a secret file keeps its last newline (`kubectl
        # create secret --from-file`): no URL ends in white space.
        url = (env.get(name) or "").strip()
        if not url:
            raise ConfigError(
                f"approvals.webhook_env names {name}, which is not set; set it to "
                "the webhook's http(s) URL, or remove webhook_env"
            )
        if not url.startswith(("http://", "https://")) or not url.isprintable():
            raise ConfigError(
                f"{name} (approvals.webhook_env) holds no http:// or https:// URL; "
                "set it to the webhook's URL"
            )
        if "@" in urlsplit(url).netloc:
            # urllib takes `user:token@` for part of the host name: every
            # announcement would fail to resolve it.
            raise ConfigError(
                f"{name} (approvals.webhook_env) holds a URL with a user name or "
                "password before its host (user:token@host), which tether cannot "
                "send; put the token in the URL's path or query instead"
            )
    if url is None:
        return None
    return Webhook(url, retries=settings.approvals.webhook_retries, sleep=clock.sleep)


def guards_from(settings: Settings) -> Guards | None:
    """Return the limits, breakers and retry budget `settings` declare, or None."""
    guards = Guards(
        limits=LimitSet(settings.limits, default_ttl=settings.idempotency.claim_ttl),
        breakers=BreakerSet(settings.breakers),
        retry=settings.retry_budget,
    )
    return guards if guards else None
