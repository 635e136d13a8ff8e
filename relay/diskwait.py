"""Writes to the disk that have not finished, seen from another process.

An fsync on a disk that is slow or hangs blocks its thread without a word:
the ERP's clients wait for their 250 while the log, ``/readyz`` and the
metrics said nothing. Each process that fsyncs for mail (the workers, and
the supervisor for its audit records) notes in memory shared before the
fork when each fsync in progress began, one word a thread, so that the
supervisor's loop and the metrics threads, which never wait on that disk,
can tell how long the oldest one has waited. One word a thread, not one a
process: overlapping fsyncs under load would otherwise read as one write
as long as the busy spell.

A row is a process's: its pid, then ``THREADS`` words, each the
``CLOCK_MONOTONIC`` time (ns, the same in every process) an fsync in
progress began, 0 for none. A thread takes a word at its first fsync and
gives it back as it ends. The relay's command-line tools note nothing.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("relay")

THREADS = 64  # words a process's row has: the threads of it that fsync at once
SLOW = 5.0  # seconds an fsync may take before the log, /readyz and the gauge say so
EVERY = 60.0  # seconds between warnings about one process's writes

_words: memoryview | None = None  # the table's, once this process has a row
_row = 0  # the first word of this process's row
_free: list[int] = []  # words of the row no thread holds
_lock = threading.Lock()
_local = threading.local()
_generation = 0  # a fork's new row: words taken before it are not given back into it
_ended: list[tuple[int, int]] | None = None  # (began, ended) of slow fsyncs, if kept


class _Held:
    """A thread's word in the row, given back when the thread ends."""

    def __init__(self, at: int, generation: int) -> None:
        self.at = at
        self.generation = generation

    def __del__(self, lock: threading.Lock = _lock, free: list[int] = _free) -> None:
        # bound here: at the interpreter's end the module's names are None before
        # the last thread's word is given back ("Exception ignored" after "stopped")
        if self.generation == _generation:
            with lock:
                free.append(self.at)


def fsync(fd: int) -> None:
    """``os.fsync``, its start noted for as long as it takes."""
    words = _words
    if words is None:
        os.fsync(fd)
        return
    try:
        at = _local.held.at
    except AttributeError:
        at = _take()
        if at is None:
            os.fsync(fd)
            return
    began = time.monotonic_ns()
    words[at] = began
    try:
        os.fsync(fd)
    finally:
        words[at] = 0
        if _ended is not None:
            _note_end(began)


def _take() -> int | None:
    """This thread's word; None when every one is held (not noted then)."""
    with _lock:
        if not _free:
            return None
        at = _free.pop()
    _local.held = _Held(at, _generation)
    return at


def _note_end(began: int) -> None:
    """For the supervisor, whose own loop cannot see its write while it waits."""
    ended = time.monotonic_ns()
    if _ended is not None and ended - began >= SLOW * 1e9:
        _ended.append((began, ended))


def _forgotten() -> None:
    """A forked child notes nothing until it is given its row (``use``)."""
    global _words, _ended
    _words, _ended = None, None


os.register_at_fork(after_in_child=_forgotten)


@dataclass(frozen=True)
class Waiting:
    """The oldest fsync in progress in one process."""

    index: int  # its row
    pid: int
    began: int  # ns, CLOCK_MONOTONIC

    def seconds(self, now: int) -> float:
        return max(0.0, (now - self.began) / 1e9)


class DiskWaits:
    """The shared table: row i is worker i's, the last the supervisor's."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.rows = workers + 1
        self.width = 1 + THREADS
        self._map = mmap.mmap(-1, self.rows * self.width * 8)
        self.words = memoryview(self._map).cast("Q")

    @property
    def supervisor(self) -> int:
        return self.workers

    def use(self, index: int, keep_ended: bool = False) -> None:
        """This process notes its fsyncs in row ``index`` from now on; one before
        it in that row (killed in its fsync) is forgotten. ``keep_ended``: slow
        fsyncs that ended are kept for ``ended``."""
        global _words, _row, _generation, _ended, _local
        base = index * self.width
        with _lock:
            _generation += 1
            self.words[base : base + self.width] = _zeros(self.width)
            self.words[base] = os.getpid()
            _free[:] = range(base + self.width - 1, base, -1)
            _local = threading.local()
            _row = base
            _ended = [] if keep_ended else None
            _words = self.words

    def clear(self, index: int) -> None:
        """Worker ``index`` ended: its fsyncs ended with it, and the row is no
        process's until its replacement takes it."""
        base = index * self.width
        self.words[base : base + self.width] = _zeros(self.width)

    def name(self, index: int, pid: int) -> str:
        """How the log and ``/readyz`` name row ``index``'s process."""
        if index == self.supervisor:
            return f"the supervisor (pid {pid})"
        if self.workers == 1:
            return f"the relay (pid {pid})"
        return f"worker {index} (pid {pid})"

    def oldest(self, index: int) -> Waiting | None:
        """Row ``index``'s oldest fsync in progress."""
        base = index * self.width
        starts = [w for w in self.words[base + 1 : base + self.width] if w]
        if not starts:
            return None
        return Waiting(index, self.words[base], min(starts))

    def longest(self) -> Waiting | None:
        """The oldest fsync in progress in any process."""
        found = [w for w in map(self.oldest, range(self.rows)) if w is not None]
        return min(found, key=lambda w: w.began, default=None)


def ended() -> list[tuple[int, int]]:
    """This process's slow fsyncs that ended since the last call (``use`` with
    ``keep_ended``): (began, ended), ns."""
    found = _ended
    if not found:
        return []
    taken = found[:]
    del found[: len(taken)]  # one appended meanwhile stays
    return taken


def _zeros(count: int) -> memoryview:
    return memoryview(bytes(8 * count)).cast("Q")
