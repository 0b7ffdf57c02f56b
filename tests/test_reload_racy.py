"""Hot reload on a file system with coarse file times: a same-size rewrite under the same stamp.

On FAT (2 s), ext3, HFS+ or ext4 with small inodes (1 s), a file rewritten in
place, at the same size, within one tick of the write hot reload took, keeps
its modification time, size and inode: its stamp does not move, and before
this the new text was never taken. A test cannot choose its file system, so
it stands one in: after the rewrite it sets the modification time back to
what it was, as such a file system would have left it. `RACY_NS` is shortened
so the tests need not wait two seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tether
from tether import config as tether_config
from tether.testing import write_config

ALLOW = "defaults: {write: allow}\n"
DENY = "defaults: {write: deny} \n"  # the same size as ALLOW
BROKEN = "defaults: {write: maybe}\n"  # the same size, and invalid
RACY_S = 0.3


@pytest.fixture(autouse=True)
def short_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tether_config, "RACY_NS", int(RACY_S * 1e9))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tether.yaml", ALLOW)


@pytest.fixture
def app(config: Path) -> Iterator[tether.Tether]:
    with tether.Tether(db="memory://", config=config, env={}) as app:
        yield app


def rewrite_keeping_the_stamp(path: Path, text: str) -> None:
    """Rewrite `path` in place as a coarse-timed file system would: same size, same time, same inode."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    with path.open("r+", encoding="utf-8") as f:  # in place: the inode stays
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_ino,
    )


def write_default(app: tether.Tether) -> str:
    return str(app.current_policy().defaults.write.value)


def test_a_same_size_rewrite_under_the_same_stamp_is_taken_once_the_window_passes(
    app: tether.Tether, config: Path
) -> None:
    """The rewrite cannot be seen by its stamp; the one read after the window finds it."""
    assert write_default(app) == "allow"
    rewrite_keeping_the_stamp(config, DENY)

    assert write_default(app) == "allow"  # the stamp has not moved: not yet seen
    time.sleep(RACY_S * 1.5)

    assert write_default(app) == "deny"
    assert (
        app.policy.version == "sha256:" + hashlib.sha256(DENY.encode()).hexdigest()[:16]
    )


def test_a_same_size_rewrite_after_a_reload_is_taken_too(
    app: tether.Tether, config: Path
) -> None:
    """A reload (not only the app's start) opens the window: each write, then its same-stamp rewrite, is taken."""
    for written, rewritten in [(DENY, ALLOW), (ALLOW, DENY)]:
        write_config(config, written)
        assert write_default(app) == written.split()[2].rstrip("}")
        rewrite_keeping_the_stamp(config, rewritten)
        time.sleep(RACY_S * 1.5)
        assert write_default(app) == rewritten.split()[2].rstrip("}")


def test_an_unchanged_file_is_not_reloaded_after_the_window(
    app: tether.Tether, caplog: pytest.LogCaptureFixture
) -> None:
    """The read after the window finds the same text: no reload, the same version."""
    version = app.policy.version
    caplog.set_level(logging.INFO, logger="tether.app")
    time.sleep(RACY_S * 1.5)

    assert write_default(app) == "allow"
    assert write_default(app) == "allow"
    assert app.policy.version == version
    assert [r.message for r in caplog.records] == []


def test_a_broken_file_is_reported_once_and_its_same_size_fix_is_taken(
    app: tether.Tether, config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Broken, then fixed under the same stamp: one failure logged, then the fix in force."""
    caplog.set_level(logging.WARNING, logger="tether.app")
    write_config(config, BROKEN)
    assert write_default(app) == "allow"  # the last good policy stays
    rewrite_keeping_the_stamp(config, DENY)
    assert write_default(app) == "allow"
    time.sleep(RACY_S * 1.5)

    assert write_default(app) == "deny"
    assert [r.message for r in caplog.records].count("policy.reload_failed") == 1


def test_a_broken_file_left_as_it_is_is_not_reported_again_after_the_window(
    app: tether.Tether, config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The read after the window finds the same broken text: no second report."""
    caplog.set_level(logging.WARNING, logger="tether.app")
    write_config(config, BROKEN)
    assert write_default(app) == "allow"
    time.sleep(RACY_S * 1.5)

    assert write_default(app) == "allow"
    assert [r.message for r in caplog.records].count("policy.reload_failed") == 1
