"""Review of hot reload's settling (`ConfigFile`) and of `approvals.webhook_env`."""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import _cli as cli
import tether
from tether.config import SETTLE_NS, ConfigFile
from tether.errors import ConfigError
from tether.testing import write_config

ALLOW = "defaults: {write: allow}\n"
DENY = "defaults: {write: deny}\n"
WHOLE = (
    "defaults: {write: allow}\n"
    "rules:\n"
    "  - id: no-writes\n"
    "    match: {effect: write}\n"
    "    decision: deny\n"
    "    reason: frozen\n"
)
OLD_NS = 1_000_000_000  # 1970: a modification time long past


def _wait_settled() -> None:
    time.sleep(SETTLE_NS / 1e9 * 2)


def _default(app: tether.Tether) -> str:
    return str(app.current_policy().defaults.write.value)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tether.yaml"
    write_config(path, ALLOW)
    return path


# -- settling -----------------------------------------------------------------------


def test_a_write_begun_after_the_change_settled_is_not_read_half_written(
    config: Path,
) -> None:
    """`changed()` found the file settled; a new write began before `load()` read it.

    Before: `load()` took the half-written file (the defaults without the rule
    still to come), since the write paused while it was read.
    """
    watched = ConfigFile(config)
    write_config(config, DENY)
    assert watched.changed()
    with config.open("w") as out:  # the next edit starts, and pauses
        out.write(WHOLE[: WHOLE.index("rules:")])
        out.flush()
        loaded = watched.load()
        assert loaded is None or loaded[0].rules  # never the cut file
        out.write(WHOLE[WHOLE.index("rules:") :])
    _wait_settled()
    assert watched.changed()
    whole = watched.load()
    assert whole is not None
    assert [r.id for r in whole[0].rules] == ["no-writes"]


def test_a_file_renamed_over_with_an_old_mtime_is_taken_at_once(
    config: Path, tmp_path: Path
) -> None:
    """`mv` of a finished file (`cp -p`'d, say): a rename is whole, no wait."""
    with tether.Tether(db="memory://", config=config, env={}) as app:
        assert _default(app) == "allow"
        new = tmp_path / "new.yaml"
        new.write_text(DENY)
        os.utime(new, ns=(OLD_NS, OLD_NS))
        os.replace(new, config)
        assert _default(app) == "deny"


def test_a_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as `tether.yaml -> ..data/tether.yaml`, and
    swaps `..data` to a new folder on an update."""
    mount = tmp_path / "mount"
    first = mount / "..2026_01_01"
    first.mkdir(parents=True)
    (first / "tether.yaml").write_text(ALLOW)
    (mount / "..data").symlink_to(first.name)
    (mount / "tether.yaml").symlink_to("..data/tether.yaml")
    with tether.Tether(db="memory://", config=mount / "tether.yaml", env={}) as app:
        assert _default(app) == "allow"
        second = mount / "..2026_01_02"
        second.mkdir()
        (second / "tether.yaml").write_text(DENY)
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        shutil.rmtree(first)
        _wait_settled()
        assert _default(app) == "deny"


def test_a_file_deleted_keeps_the_policy_and_its_return_is_taken(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tether.Tether(db="memory://", config=config, env={}) as app:
        caplog.set_level(logging.WARNING, logger="tether.app")
        config.unlink()
        assert _default(app) == "allow"  # the last good policy stays
        assert _default(app) == "allow"
        assert [r.message for r in caplog.records].count("policy.reload_failed") == 1
        config.write_text(DENY)
        _wait_settled()
        assert _default(app) == "deny"


def test_a_file_from_the_future_is_taken_at_once(config: Path) -> None:
    """An mtime ahead of this host's clock cannot be waited out."""
    with tether.Tether(db="memory://", config=config, env={}) as app:
        config.write_text(DENY)
        ahead = time.time_ns() + 3600 * 10**9
        os.utime(config, ns=(ahead, ahead))
        assert _default(app) == "deny"


def test_write_config_twice_at_once_is_taken_each_time(config: Path) -> None:
    """Two rewrites of the same size, one step apart: each is taken."""
    same_size = ALLOW.replace("allow", "deny ")
    assert len(same_size) == len(ALLOW)
    with tether.Tether(db="memory://", config=config, env={}) as app:
        for text, want in [(same_size, "deny"), (ALLOW, "allow")] * 3:
            write_config(config, text)
            assert _default(app) == want


# -- webhook_env --------------------------------------------------------------------


def _hook_config(tmp_path: Path) -> Path:
    path = tmp_path / "tether.yaml"
    path.write_text(
        "defaults: {write: allow}\n"
        "approvers: {alice: [ops]}\n"
        "approvals: {webhook_env: HOOK_URL, webhook_retries: 0}\n"
    )
    return path


def test_webhook_env_is_read_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_URL", "https://hooks.example/approvals?token=s3cret")
    with tether.Tether(db="memory://", config=_hook_config(tmp_path)) as app:
        assert app.webhook is not None
        assert app.webhook.url == "https://hooks.example/approvals?token=s3cret"


def test_webhook_env_with_credentials_before_the_host_is_refused_at_start(
    tmp_path: Path, hook_server: tuple[str, list[bytes]]
) -> None:
    """urllib reads `user:token@host` as the host's name: no announcement would
    ever arrive. Before: the app started, and every delivery failed."""
    url, got = hook_server
    with_userinfo = url.replace("http://", "http://bot:s3cret@")
    with pytest.raises(ConfigError) as raised:
        tether.Tether(
            db="memory://",
            config=_hook_config(tmp_path),
            env={"HOOK_URL": with_userinfo},
        )
    assert "user:token@host" in raised.value.message
    assert "s3cret" not in raised.value.message
    assert got == []


def test_webhook_env_tolerates_the_newline_a_secret_file_ends_with(
    tmp_path: Path,
) -> None:
    """`kubectl create secret --from-file` keeps the file's last newline."""
    env = {"HOOK_URL": "https://hooks.example/approvals?token=abc\n"}
    with tether.Tether(db="memory://", config=_hook_config(tmp_path), env=env) as app:
        assert app.webhook is not None
        assert app.webhook.url == "https://hooks.example/approvals?token=abc"


def test_webhook_env_that_holds_no_url_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    env = {"HOOK_URL": "hooks.example/approvals?token=s3cret"}
    with pytest.raises(ConfigError) as raised:
        tether.Tether(db="memory://", config=_hook_config(tmp_path), env=env)
    assert "s3cret" not in raised.value.message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_failed_delivery_does_not_log_the_token_of_a_webhook_env_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"HOOK_URL": f"http://127.0.0.1:{_closed_port()}/x?token=t0ken"}
    caplog.set_level(logging.WARNING, logger="tether.notify")
    with tether.Tether(db="memory://", config=_hook_config(tmp_path), env=env) as app:
        assert app.webhook is not None
        app.webhook.send({"event": "test"})
        app.webhook.flush(timeout=10)
    failed = [r for r in caplog.records if r.message == "approvals.webhook_failed"]
    assert failed
    assert "t0ken" not in repr([vars(r) for r in failed])


def test_policy_test_runs_on_a_file_with_webhook_env(tmp_path: Path) -> None:
    _hook_config(tmp_path)
    (tmp_path / "tether.test.yaml").write_text(
        "policy: tether.yaml\n"
        "cases:\n"
        "  - name: a write\n"
        "    capability: notes.save\n"
        "    effect: write\n"
        "    principal: {id: bot, tenant: acme}\n"
        "    expect: {decision: allow, rules: []}\n"
    )
    done = cli.run(
        tmp_path,
        "policy",
        "test",
        "tether.test.yaml",
        env={"HOOK_URL": "https://hooks.example/x"},
    )
    assert done.returncode == 0, done.stderr
    assert "1 passed" in done.stdout


@pytest.fixture
def hook_server() -> Iterator[tuple[str, list[bytes]]]:
    got: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()
        server.server_close()


def test_a_reload_to_webhook_env_takes_the_url_from_the_environment(
    tmp_path: Path, hook_server: tuple[str, list[bytes]]
) -> None:
    url, got = hook_server
    config = tmp_path / "app.yaml"
    write_config(config, ALLOW)
    with tether.Tether(db="memory://", config=config, env={"HOOK_URL": url}) as app:
        app.current_policy()
        before = app.webhook
        write_config(config, _hook_config(tmp_path).read_text())
        app.current_policy()
        after = app.webhook
        assert before is None
        assert after is not None
        after.send({"event": "test"})
        after.flush(timeout=10)
    assert got


def test_status_runs_where_the_webhook_variable_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hook_config(tmp_path)
    monkeypatch.delenv("HOOK_URL", raising=False)
    done = cli.run(tmp_path, "status")
    assert done.returncode == 0, done.stderr
    assert "no limits" in done.stdout
