"""What the process serving the metrics knows of itself: reloads, workers, liveness.

Set by whoever runs the relay (the supervisor, or the one process when there
are no workers) and read by the metrics thread; plain values, replaced whole,
so the thread never sees half of a change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Status:
    reload_ok: bool = True
    reload_success_at: float = 0.0  # Unix time the running policy was loaded
    workers_running: int = 0
    workers_expected: int = 0
    worker_restarts: int = 0  # workers that ended other than by the relay's stop
    beat: float = 0.0  # monotonic time the main loop last came round
    stopping: bool = False  # from the signal to stop on: no longer ready for mail


STATUS = Status()
ALIVE_WITHIN = 30.0  # seconds: a main loop that has not come round for longer is stuck


def loaded() -> None:
    """A policy was loaded and is in use: at the start or by a reload."""
    STATUS.reload_ok = True
    STATUS.reload_success_at = time.time()


def reload_failed() -> None:
    STATUS.reload_ok = False


def workers(running: int, expected: int) -> None:
    STATUS.workers_running, STATUS.workers_expected = running, expected


def worker_ended() -> None:
    """A worker ended while the relay runs (it crashed, was killed, or a reload
    replaced it): it is started again, and a crash loop stops the relay."""
    STATUS.worker_restarts += 1


def stopping() -> None:
    STATUS.stopping = True


def beat() -> None:
    STATUS.beat = time.monotonic()


def alive() -> bool:
    return time.monotonic() - STATUS.beat < ALIVE_WITHIN
