"""Tell people about approval requests: a JSON POST to a webhook, with retries.

Sent from the process that made or decided the request, in a background
thread, so the call path never waits on the receiver. Delivery is at least
once while that process lives (each try has a timeout; failures are retried
with backoff, then logged as `approvals.webhook_failed`): a receiver should
use the `id` and `event` to drop repeats. It is a notification, not the
source of truth: `tether approvals list` always is.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Webhook"]

logger = logging.getLogger(__name__)


class Webhook:
    """POST JSON documents to one URL, in order, from one background thread, with retries.

    Args:
        url: where to POST (`http://` or `https://`).
        retries: tries after the first one fails.
        timeout: seconds each try may take.
        sleep: how to wait between tries (the app clock's, so tests need no real waits).
    """

    def __init__(
        self,
        url: str,
        *,
        retries: int = 3,
        timeout: float = 5.0,
        sleep: Callable[[float], None],
    ) -> None:
        self.url = url
        self.retries = retries
        self.timeout = timeout
        self._sleep = sleep
        self._queue: queue.Queue[bytes] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, document: Mapping[str, Any]) -> None:
        """Deliver `document` in the background, after the ones sent before it."""
        self._queue.put(json.dumps(document, default=str, sort_keys=True).encode())
        # Under the lock the sender, when idle, checks the queue before it stops
        # (`_run`): a document put here is either seen by it or starts a new one.
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="tether-webhook", daemon=True
                )
                self._thread.start()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the documents sent so far are delivered or given up (at most `timeout`)."""
        waiter = threading.Thread(target=self._queue.join, daemon=True)
        waiter.start()
        waiter.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                body = self._queue.get(timeout=5)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return  # idle: the next send starts a thread again
                continue  # a send landed as the wait ended: deliver it too
            try:
                self._deliver(body)
            finally:
                self._queue.task_done()

    def _deliver(self, body: bytes) -> None:
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(min(0.5 * 2 ** (attempt - 1), 30.0))
            request = urllib.request.Request(  # noqa: S310  # the operator's configured URL
                self.url,
                data=body,
                headers={"Content-Type": "application/json", "User-Agent": "tether"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310
                    if 200 <= answer.status < 300:
                        return
                    error = f"HTTP {answer.status}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except (
                urllib.error.URLError,
                OSError,
                http.client.HTTPException,
                ValueError,
            ) as exc:
                # A reply that is not HTTP (BadStatusLine, ...) or a URL urllib
                # cannot use (InvalidURL) is a failed try too, not the end of the
                # sender thread and of the documents queued behind this one.
                error = str(exc) or type(exc).__name__
        shown = _shown(self.url)
        logger.warning(
            "approvals.webhook_failed",
            extra={
                "tether.url": shown,
                "tether.error": error.replace(self.url, shown),
            },
        )


def _shown(url: str) -> str:
    """The URL as logs may show it: its scheme and host, never its path or query.

    A webhook's path or query often is its token (a chat's incoming webhook),
    which is why `approvals.webhook_env` keeps it out of the file.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    number = _port(parts)
    port = "" if number is None else f":{number}"
    rest = "/..." if parts.path.strip("/") or parts.query else "/"
    return f"{parts.scheme}://{host}{port}{rest}"


def _port(parts: urllib.parse.SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:  # not a number: nothing to show
        return None
