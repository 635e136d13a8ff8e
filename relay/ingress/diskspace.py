"""Refusing new mail while the state directory's file system is nearly full.

The spool and the audit log share the disk, and a delivered message leaves
the spool only once the audit log has its outcome on disk (docs/queue.md).
A spool that took the last blocks left the log no room for those records:
delivered mail then stayed queued, new mail kept getting 451, and a restart
sent it all again, until space was freed by hand. So, as Postfix's smtpd
does (``queue_minfree``), a client is told ``452 4.3.1 Insufficient system
storage`` at MAIL FROM, before it sends its message, while the free space
left would fall below a reserve kept for the records that let queued mail
leave; and once more at the end of DATA, with the message's real size.

Each directory's free space is read at most once a second (a ``statvfs``
per message would be a system call more on every one) while it is more
than twice the reserve; what a worker accepts in between is taken off its
reading. Closer to the reserve it is read for every check: the workers
each keep their own reading, and one worker's burst within another's
second took the disk past the reserve to its last block.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from relay.errors import SmtpReply

log = logging.getLogger("relay")

INSUFFICIENT_STORAGE = SmtpReply(452, "4.3.1", "Insufficient system storage, try again later")
#: Seconds a reading of the free space is used for.
FRESH = 1.0
#: Seconds between two log lines saying mail is refused for want of space.
LOG_EVERY = 60.0
#: The least reserve in bytes, whatever the listener's size limit: room for
#: a few thousand final audit records (a few hundred bytes each) and notices.
MIN_RESERVE = 1 << 20
#: Free inodes kept: a failure notice is a new spool file, and a new day of
#: the audit log a new file; a deferral record that finds none waits in memory.
INODE_RESERVE = 100

StatFs = Callable[[str], os.statvfs_result]


def reserve_for(max_message_size: int) -> int:
    """Bytes to keep free for a listener: 1.5 times its largest message, as
    Postfix keeps 1.5 times ``message_size_limit``. A message let in just above
    the reserve may take up to its limit; what is left, half a message or
    ``MIN_RESERVE`` at least, holds the audit records and notices with which
    queued mail leaves the spool, and each message that leaves frees its file.
    With the default 25 MiB limit that is 37.5 MiB: a nearly full disk, not
    a small one."""
    return max(MIN_RESERVE, max_message_size * 3 // 2)


@dataclass
class _Reading:
    at: float
    free: int  # bytes an unprivileged writer may still use
    inodes: int | None  # free inodes; None where the file system has no count


def _short_of(reading: _Reading, reserve: int, size: int) -> bool:
    short_of_inodes = reading.inodes is not None and reading.inodes < INODE_RESERVE
    return reading.free - size < reserve or short_of_inodes


def free_space(directory: Path) -> tuple[int, int | None]:
    """The bytes an unprivileged writer may still use on ``directory``'s file
    system, and its free inodes (None where it keeps no count), read as
    ``DiskGuard`` reads them, so that what the metrics show is what mail is
    refused by."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize, (st.f_favail if st.f_files else None)


def capacity(directory: Path) -> int:
    """The most bytes an unprivileged writer could ever have free on the file
    system that holds, or will hold, ``directory`` (``relay check`` runs before
    ``relay serve`` makes it): a reserve over this refuses every message
    however much is deleted. Blocks kept for root are never free to the relay."""
    existing = next(p for p in (directory, *directory.parents) if os.path.exists(p))
    st = os.statvfs(existing)
    return (st.f_blocks - (st.f_bfree - st.f_bavail)) * st.f_frsize


def shortage(directory: Path, reserve: int) -> str | None:
    """What keeps every message out of ``directory``'s file system now, as
    ``DiskGuard`` judges it for a reserve of ``reserve`` bytes (the readiness
    check: a relay answering every MAIL with 452 is not ready for mail)."""
    try:
        reading = _Reading(0.0, *free_space(directory))
    except OSError:
        return None  # the writability check says why
    if not _short_of(reading, reserve, 0):
        return None
    inodes = "" if reading.inodes is None else f" and {reading.inodes} inodes"
    return (
        f"{directory} has {max(reading.free, 0)} bytes{inodes} free, under the {reserve}"
        f" bytes and {INODE_RESERVE} inodes kept free: mail is refused (452 4.3.1)"
    )


class DiskGuard:
    """The free space of the state directories, cached; one per worker.

    ``reclaim`` lets go of space held for reuse (the spool's files of delivered
    messages, kept to be overwritten: up to 64 MiB a worker) and says how many
    files went; it is tried, at most once a ``FRESH`` period, before mail is
    refused, as that space would be lost to mail while nothing came to reuse it.
    """

    def __init__(
        self,
        statvfs: StatFs | None = None,
        clock: Callable[[], float] = time.monotonic,
        reclaim: Callable[[], int] | None = None,
    ) -> None:
        self._statvfs = statvfs
        self._clock = clock
        self._reclaim = reclaim
        self._reclaimed = float("-inf")  # when reclaim was last tried
        self._readings: dict[str, _Reading] = {}
        self._logged: dict[tuple[int, bool], float] = {}  # (reserve, short) -> when logged
        # reserves below which the free space was, as logged, until a check passes
        self._short: set[int] = set()

    def refusal(self, directories: Iterable[Path], reserve: int, size: int = 0) -> SmtpReply | None:
        """``INSUFFICIENT_STORAGE`` if storing ``size`` bytes would leave less
        than ``reserve`` bytes (or ``INODE_RESERVE`` inodes) free in one of
        ``directories``; None otherwise, also when a directory cannot be read
        (the write itself then fails, and says why)."""
        for directory in directories:
            reading = self._read(os.fspath(directory), 2 * reserve + size)
            if reading is None:
                continue
            if _short_of(reading, reserve, size) and self._reclaimed_some():
                reading = self._read(os.fspath(directory), 2 * reserve + size, fresh=False)
                if reading is None:
                    continue
            if _short_of(reading, reserve, size):
                short = _short_of(reading, reserve, 0)  # not just this message
                self._log_short(directory, reading, reserve, size, short)
                return INSUFFICIENT_STORAGE
        if reserve in self._short:
            self._short.discard(reserve)
            self._logged.pop((reserve, True), None)  # the next refusal is said, not left unsaid
            log.warning("free space is back above the %d bytes kept free: accepting mail", reserve)
        return None

    def _reclaimed_some(self) -> bool:
        now = self._clock()
        if self._reclaim is None or now - self._reclaimed < FRESH:
            return False
        self._reclaimed = now
        return self._reclaim() > 0

    def charge(self, directories: Iterable[Path], size: int) -> None:
        """Count ``size`` bytes about to be stored against the cached readings."""
        for directory in directories:
            reading = self._readings.get(os.fspath(directory))
            if reading is not None:
                reading.free -= size

    def _read(self, directory: str, plenty: int, fresh: bool = True) -> _Reading | None:
        """The cached reading while it is ``fresh`` and shows at least ``plenty``
        bytes free; else a new one."""
        now = self._clock()
        reading = self._readings.get(directory)
        if fresh and reading is not None and now - reading.at < FRESH and reading.free >= plenty:
            return reading
        try:
            st = (self._statvfs or os.statvfs)(directory)
        except OSError:
            self._readings.pop(directory, None)
            return None
        inodes = st.f_favail if st.f_files else None
        self._readings[directory] = reading = _Reading(now, st.f_bavail * st.f_frsize, inodes)
        return reading

    def _log_short(
        self, directory: Path, reading: _Reading, reserve: int, size: int, short: bool
    ) -> None:
        now = self._clock()
        key = (reserve, short)  # a message too big for the room left does not hide a full disk
        if now - self._logged.get(key, now - LOG_EVERY) < LOG_EVERY:
            return
        self._logged[key] = now
        if short:
            self._short.add(reserve)
        inodes = "" if reading.inodes is None else f" and {reading.inodes} inodes"
        message = f" after a message of {size} bytes" if size else ""
        log.warning(
            "refusing mail (452 4.3.1) for want of space: %s has %d bytes%s free;"
            " %d bytes and %d inodes are kept free%s, for the records that let"
            " queued mail leave the spool",
            directory,
            max(reading.free, 0),
            inodes,
            reserve,
            INODE_RESERVE,
            message,
        )
