"""What the relay says between binding its listeners and serving.

Reading the spool there (its recovery, the audit log's settling) takes
seconds with a large queue: about 7 s for 50,000 messages on a cold disk,
with the listeners bound and no client greeted. The log was silent for all
of it, read as a hang; a thread now says that a long read goes on, even
while the main thread waits on the disk.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from relay.quantity import quantity

log = logging.getLogger("relay")

PROGRESS = 5.0  # seconds between the lines saying that a long read goes on
TICK = 0.2  # seconds between the thread's looks at the time
#: Entries from which reading the spool, or its records, is said as it begins and
#: ends: about 0.2 s a thousand on a cold disk, so from here on a second or more
#: of silence; below it the lines would be noise at every start of a quiet relay.
LARGE_QUEUE = 1000


class StartWatch:
    """The long steps of the start, said as they go on."""

    def __init__(self) -> None:
        self._step: tuple[str, float] | None = None  # what is read, since when (monotonic)
        self._said = 0.0
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="start-watch", daemon=True)

    def __enter__(self) -> StartWatch:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.end()

    def reading(self, what: str | None) -> None:
        """``what`` (``spool /var/lib/erp-relay/queue``) is being read: said
        every ``PROGRESS`` seconds until the next call; None ends it."""
        self._step = None if what is None else (what, time.monotonic())
        self._said = time.monotonic()

    def end(self) -> None:
        """The thread ended."""
        if self._thread.is_alive():
            self._ended.set()
            self._thread.join()
        self._step = None

    def _watch(self) -> None:
        while not self._ended.wait(TICK):
            step = self._step
            now = time.monotonic()
            if step is not None and now - self._said >= PROGRESS:
                self._said = now
                log.info("%s: still reading, for %s so far", step[0], _seconds(now - step[1]))


def _seconds(seconds: float) -> str:
    return quantity(round(seconds), "second")
