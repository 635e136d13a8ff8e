"""The log's lines about writes to the disk that do not finish.

Looked at once a second by the supervisor's loop (or, in a relay of one
process, by a thread of its own): a worker whose fsync has waited ``SLOW``
gets a WARNING, at most one every ``EVERY`` (the next counts those not
logged), and an INFO line once that write has ended. The supervisor's own
fsyncs block the loop that would say so: they are said when it comes round,
or as it exits, for one that ended while a stop waited for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay import diskwait
from relay.diskwait import EVERY, SLOW, DiskWaits

log = logging.getLogger("relay")


@dataclass
class _Said:
    """What the log has said of one process's writes."""

    began: int = 0  # the write warned of and not yet ended; 0: none
    pid: int = 0  # the process whose write that is
    seen: int = 0  # when that write was last seen waiting
    at: float = -EVERY  # monotonic time of the last warning
    unsaid: int = 0  # slow writes not warned of since
    counted: int = 0  # the last of them counted, so that it counts once

    def took(self, now: int) -> str:
        """How long the write warned of took, as far as the looks can tell: a
        look that came round late (the supervisor's own write held its loop)
        said 40 s of a write of 7."""
        least, most = round((self.seen - self.began) / 1e9), round((now - self.began) / 1e9)
        return f"about {most}s" if most - least <= 1 else f"{least}s to {most}s"


class DiskWatch:
    def __init__(self, waits: DiskWaits, state: Callable[[], Path]) -> None:
        """``state``: the state directory, whose disk the lines name."""
        self.waits = waits
        self.state = state
        self._said: dict[int, _Said] = {}

    def look(self, now: int | None = None, last: bool = False) -> None:
        """``now``: ``time.monotonic_ns()``, unless given. ``last``: the supervisor's
        look as it exits: its own slow writes that ended during the stop are said
        even within the minute, as no look comes after it to say them."""
        now = time.monotonic_ns() if now is None else now
        for index in range(self.waits.workers):  # the supervisor's own: below
            self._look_at(index, now)
        said = self._said.setdefault(self.waits.supervisor, _Said())
        for began, ended in diskwait.ended():
            if not last and now / 1e9 - said.at < EVERY:
                said.unsaid += 1
                continue
            more = f" ({said.unsaid} more since the last such line, not logged)"
            log.warning(
                "%s: a write to the disk took %ds to finish, its main loop waiting meanwhile"
                " (reloads, workers to start again); the disk under %s is slow or not"
                " answering%s",
                self.waits.name(self.waits.supervisor, os.getpid()),
                round((ended - began) / 1e9),
                self.state(),
                more if said.unsaid else "",
            )
            said.at, said.unsaid = now / 1e9, 0

    def _look_at(self, index: int, now: int) -> None:
        said = self._said.setdefault(index, _Said())
        waiting = self.waits.oldest(index)
        if said.began and (waiting is None or waiting.began != said.began):
            name = self.waits.name(index, said.pid)
            if self.waits.words[index * self.waits.width] == said.pid:
                log.info(
                    "%s: the write to the disk that waited ended after %s", name, said.took(now)
                )
            else:  # the process ended, its write finished first or not: the log says how
                log.info(
                    "%s has ended; its write to the disk was still waiting when last looked at,"
                    " after %ds",
                    name,
                    round((said.seen - said.began) / 1e9),
                )
            said.began = 0
        if waiting is not None and said.began == waiting.began:
            said.seen = now
        if waiting is None or said.began or waiting.seconds(now) < SLOW:
            return
        if now / 1e9 - said.at < EVERY:
            if said.counted != waiting.began:
                said.unsaid += 1
                said.counted = waiting.began
            return
        unsaid = said.unsaid - (said.counted == waiting.began)
        more = f" ({unsaid} more since the last such line, not logged)" if unsaid > 0 else ""
        log.warning(
            "%s: a write to the disk has not finished for %ds: its clients wait for their 250"
            " meanwhile; the disk under %s is slow or not answering%s",
            self.waits.name(index, waiting.pid),
            waiting.seconds(now),
            self.state(),
            more,
        )
        said.began, said.pid, said.at, said.seen = waiting.began, waiting.pid, now / 1e9, now
        said.unsaid = said.counted = 0

    def every_second(self, stop: threading.Event) -> None:
        """For a relay of one process: its event loop may be the thread waiting."""
        while not stop.wait(1.0):
            self.look()
