"""What the relay hears and says between binding its listeners and serving.

Reading the spool there (its recovery, the audit log's settling) takes
seconds with a large queue: about 7 s for 50,000 messages on a cold disk. A
SIGTERM then (``systemctl stop`` or ``restart`` during a slow start) had its
default action: the relay died without a line and reset the clients the
kernel had queued for it. The stop
signals are held from ``relay serve``'s start (``relay.cli``) and taken here,
by a thread, so that one is said at once even while the main thread waits on
the disk; the start honours it once the spool is read, as recovery renames
and settles files and is not cut off half-way. The same thread says that a
long read goes on: the log was silent for all of it, read as a hang.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import TracebackType

from relay.quantity import quantity

log = logging.getLogger("relay")

STOPS = frozenset({signal.SIGTERM, signal.SIGINT})
PROGRESS = 5.0  # seconds between the lines saying that a long read goes on
TICK = 0.2  # seconds the thread waits for a signal before it looks at the time
#: Entries from which reading the spool, or its records, is said as it begins and
#: ends: about 0.2 s a thousand on a cold disk, so from here on a second or more
#: of silence; below it the lines would be noise at every start of a quiet relay.
LARGE_QUEUE = 1000


class StartWatch:
    """The stop signals taken while the relay starts, and the long steps said."""

    def __init__(self) -> None:
        self.asked: str | None = None  # the stop signal taken, by name
        self._on_stop: Callable[[], None] | None = None
        self._step: tuple[str, float] | None = None  # what is read, since when (monotonic)
        self._said = 0.0
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="start-watch", daemon=True)

    def __enter__(self) -> StartWatch:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)  # the thread inherits it
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.end()

    def on_stop(self, said: Callable[[], None]) -> None:
        """``said`` is called once a stop is taken, from this thread, or now
        if one was: ``/readyz`` and ``relay status`` say the relay stops from
        the signal on, not from the end of the spool's reading."""
        self._on_stop = said
        if self.asked is not None:
            said()

    def reading(self, what: str | None) -> None:
        """``what`` (``spool /var/lib/erp-relay/queue``) is being read: said
        every ``PROGRESS`` seconds until the next call; None ends it."""
        self._step = None if what is None else (what, time.monotonic())
        self._said = time.monotonic()

    def end(self) -> str | None:
        """The thread ended, and the stop signal taken by then, if any: one sent
        after it is held, for the serving process's own handling."""
        if self._thread.is_alive():
            self._ended.set()
            self._thread.join()
        self._step = None
        return self.asked

    def _watch(self) -> None:
        while not self._ended.is_set():
            info = signal.sigtimedwait(STOPS, TICK)
            if info is not None:
                self._heard(signal.Signals(info.si_signo).name)
            step = self._step
            now = time.monotonic()
            if step is not None and now - self._said >= PROGRESS:
                self._said = now
                log.info("%s: still reading, for %s so far", step[0], _seconds(now - step[1]))

    def _heard(self, name: str) -> None:
        if self.asked is not None:
            log.info("%s while starting: already stopping", name)
            return
        self.asked = name
        log.info(
            "%s while starting: stopping before serving; a spool being read is read to the"
            " end first (its recovery is not cut off half-way)",
            name,
        )
        said = self._on_stop
        if said is not None:
            said()


def _seconds(seconds: float) -> str:
    return quantity(round(seconds), "second")
