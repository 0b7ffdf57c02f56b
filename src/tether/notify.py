"""Tell people about approval requests: a JSON POST to a webhook, with retries.

Sent from the process that made or decided the request, in a background
thread, so the call path never waits on the receiver. Delivery is at least
once while that process lives (each try has a timeout; failures are retried
with backoff, then logged as `approvals.webhook_failed`): a receiver should
use the `id` and `event` to drop repeats. It is a notification, not the
source of truth: `tether approvals list` always is.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Webhook"]

logger = logging.getLogger(__name__)


class Webhook:
    """POST JSON documents to one URL, each in its own daemon thread, with retries.

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
        self._threads: list[threading.Thread] = []

    def send(self, document: Mapping[str, Any]) -> None:
        """Deliver `document` in the background."""
        body = json.dumps(document, default=str, sort_keys=True).encode()
        thread = threading.Thread(
            target=self._deliver, args=(body,), name="tether-webhook", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def flush(self, timeout: float | None = None) -> None:
        """Wait for deliveries in flight (on close, and in tests)."""
        for thread in list(self._threads):
            thread.join(timeout)

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
            except (urllib.error.URLError, OSError) as exc:
                error = str(exc)
        logger.warning(
            "approvals.webhook_failed",
            extra={"tether.url": self.url, "tether.error": error},
        )
