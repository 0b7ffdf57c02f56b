"""A throwaway PostgreSQL cluster, for tests that stop, restart or crash the server.

`throwaway_cluster()` runs `initdb` into a fresh folder, starts the server on a
free port with its Unix socket in that folder (no TCP), and removes it all on
exit. The server binaries (`initdb`, `pg_ctl`) must be on PATH. `initdb`
refuses to run as root, so as root every server command runs as the
`postgres` user (`runuser`), which then owns the folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cluster", "throwaway_cluster"]

SERVER_USER = "postgres"
"""Who runs the server when the tests run as root."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A PostgreSQL server of the test's own, reached through a Unix socket."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        """The cluster's data folder."""
        return self.root / "data"

    @property
    def url(self) -> str:
        """The URL of its `postgres` database (trust auth, user `postgres`)."""
        return f"postgresql://postgres@/postgres?host={self.root}&port={self.port}"

    def _run(self, argv: Sequence[str]) -> None:
        command = list(argv)
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(  # fixed server binaries, our own folder
            command, capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()} {tail}"
            )

    def _pg_ctl(self, *args: str) -> None:
        self._run(
            ["pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), *args]
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=''"
        self._pg_ctl("-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: roll back open transactions; `immediate`: crash)."""
        self._pg_ctl("-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Restart the server: every open connection is cut."""
        self.stop()
        self.start()


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """Yield a started cluster in a fresh folder; stop it and remove the folder after."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        raise RuntimeError(
            "initdb and pg_ctl are not on PATH; install the PostgreSQL server "
            "binaries to run the tests that restart the server"
        )
    # Not under pytest's tmp_path: its parents are closed to the server's user.
    root = Path(tempfile.mkdtemp(prefix="tether-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(root, user.pw_uid, user.pw_gid)
    cluster = Cluster(root=root, port=_free_port())
    try:
        cluster._run(
            [
                "initdb",
                "-D",
                str(cluster.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        cluster.start()
        try:
            yield cluster
        finally:
            with contextlib.suppress(RuntimeError):  # already stopped
                cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
