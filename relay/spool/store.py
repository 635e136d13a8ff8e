"""The durable queue: once ``put`` returns, the message survives a crash.

Layout under the spool directory (mode 0700)::

    msg/ID        the entry: its first record (the QueueEntry as one JSON line),
                  then the signed message bytes; its presence means the entry
                  is complete; written once, never replaced; the entry's lock
    env/ID.json   the record as changed since (attempts, replies, hold), which
                  takes the place of the first one
    msg/.free.ID  a delivered entry's file, kept to be overwritten by a new one
    kick          touched by ``relay queue retry`` to wake the delivery engine
    notes/        what the queue tools did, for the relay's log (``relay.spool.notes``)

Every file is written to a temp name in its final directory, fsynced, renamed
and the directory fsynced, so a new entry costs one file and two fsyncs (the
directory's shared by a batch: ``put_many`` and ``remove_many`` are group
commits); only a deferral or a hold writes a second file. Removal unlinks the
message first, so a crash leaves at most a changed record without its entry,
which ``recover`` removes; the engine's removals of delivered entries wait
for the next fsync of the directory instead of making their own
(``remove_many(lazy=True)``). The message file carries the ``flock`` that the
daemon's workers and the queue tools take: no lock file per message.

Files of delivered entries are recycled, as PostgreSQL recycles its WAL
segments: ``remove_many(recycle=True)`` renames the file to ``msg/.free.ID``
and the next ``put`` overwrites it in place instead of creating a file.
Creating a file costs an inode and new blocks; on ext4 without a journal
every creation also walks the inodes freed in the last half minute, which
made a new entry cost several times what an overwrite does. A free file is
private to the process that freed it and offered for reuse only once its
rename is durable; one not reused within ``RECYCLE_TTL`` seconds is removed
at the engine's next scan, and all of them when the engine stops
(``trim_recycled``), so a delivered message does not linger in the spool.

The delivery engine polls ``last_kick()`` (one stat) between its regular
scans and rescans at once when it is newer than the last it saw; a kick only shortens the
wait, since a retried entry is due anyway (``next_attempt = 0``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from relay import diskwait, statefiles
from relay.errors import RelayError
from relay.quantity import quantity
from relay.queueid import queue_id_time
from relay.spool.entry import QueueEntry

log = logging.getLogger("relay")

_ID = re.compile(r"[0-9A-Z]{16}")
# Starts an entry's file, before its first record. No message can start with
# it (the ingress refuses a first line that is not a header field), so an
# entry queued with the message alone in msg/ID is still read correctly.
RECORD_MARK = b"relay-queue-entry 1 "
_TMP_SUFFIX = ".tmp"
_FREE_PREFIX = ".free."
_IOV_MAX = 1024
#: Free files kept per process: a few more than the entries one process has
#: between their 250 and their delivery at full speed.
RECYCLE_MAX = 64
#: A bigger file is removed, not kept: reusing it would save little.
RECYCLE_SIZE = 1 << 20
#: Seconds a free file (a delivered message's bytes) may wait to be reused.
RECYCLE_TTL = 30.0
#: The queue's directories the relay writes in (the queue directory itself
#: only when it makes them): what has to be writable for it to take mail.
WRITTEN_IN = ("msg", "env")


#: A file's inode, size, mtime and ctime (ns): any write or rename in its
#: place changes one of them, but for a write in the tick of the last.
Stamp = tuple[int, int, int, int]


@dataclass
class Waiting:
    """Messages of one state in the queue: how many, their files' bytes, and the
    age of the oldest in seconds (0 when there is none)."""

    count: int = 0
    size: int = 0
    oldest: float = 0.0


class SpoolError(RelayError):
    """The spool could not be read or written; the message must not be acknowledged."""

    def __init__(self, path: Path | str, strerror: str) -> None:
        super().__init__(f"{path}: {strerror}")
        self.path = str(path)
        self.strerror = strerror

    @classmethod
    def from_os(cls, exc: OSError, path: Path | str) -> SpoolError:
        if isinstance(exc, statefiles.NotAFile):
            return NotAPlainFile(path, exc.strerror or str(exc))
        return cls(path, exc.strerror or str(exc))


Failure = SpoolError | None


class SpoolBusy(SpoolError):
    """Another process (usually the delivery engine) holds the entry's lock."""


class NotAPlainFile(SpoolError):
    """An entry's file or record that is not a plain file (a FIFO, a device, a
    directory, a socket, a symbolic link): no entry, and left where it is for
    the sysadmin to look at."""


class NoSuchEntry(SpoolError):
    """No complete entry with this ID: never queued, already finished, or deleted."""


class DamagedEntry(SpoolError):
    """The entry's file holds a message of another length than its record says:
    cut short, or written over. Sent, it went out cut off and was recorded as
    delivered."""


NO_ENTRY = "no such queue entry"  # a NoSuchEntry's strerror, where the ID is one


class UnsyncedRemovals(SpoolError):
    """``remove_many`` removed entries but could not fsync their directory;
    ``failures`` still says, per entry, which were not removed at all."""

    def __init__(self, error: SpoolError, failures: list[Failure]) -> None:
        super().__init__(error.path, error.strerror)
        self.failures = failures


class Spool:
    """One spool directory. Safe to use from several processes at once if each
    change to an existing entry happens under ``lock`` and loads after locking.

    When root runs a queue tool on a spool owned by the daemon's user, new
    files are handed to that user so the daemon can still open them.
    """

    def __init__(self, directory: Path, create: bool = True) -> None:
        """Without ``create`` (the queue tools) a spool that is not there is an
        error: an empty one made up in its place would say the queue is empty."""
        self.directory = Path(directory)
        self._msg, self._env = (self.directory / name for name in WRITTEN_IN)
        self._kick = self.directory / "kick"
        self._held: dict[str, int] = {}  # queue ID -> locked message file, see put_many
        # (path, when freed) of this process's free files, oldest first; deque
        # operations are atomic, and the writing threads share it
        self._free: collections.deque[tuple[str, float]] = collections.deque()
        # removals no fsync of msg/ has covered yet, and the free files among
        # them, not to be reused before one has; see remove_many(lazy=True)
        self._sync_lock = threading.Lock()
        self._unsynced: list[str] = []
        self._removals = 0  # counted, and how many of them a finished fsync covers
        self._synced = 0
        with _translated(self.directory):  # a queue tool run by a user who may not look in
            created = not self.directory.exists()
            if not create and (created or not (self._msg.is_dir() and self._env.is_dir())):
                raise SpoolError(
                    self.directory, "no queue here (has the relay run with this policy?)"
                )
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            statefiles.check_directory(self.directory)
            self._owner = statefiles.owner_for(os.stat(self.directory))
            for sub in (self._msg, self._env):
                try:
                    sub.mkdir(mode=0o700)
                except FileExistsError:
                    with _translated(sub):  # named itself, not the queue's directory
                        statefiles.check_directory(sub)
                    continue
                if self._owner:
                    os.chown(sub, *self._owner, follow_symlinks=False)
        if create:  # for what was made; the queue tools make nothing, and must work read-only
            _fsync_dir(self.directory)
        if created:
            _fsync_dir(self.directory.parent)

    def message_path(self, queue_id: str) -> Path:
        return self._msg / _checked(queue_id)

    def _env_path(self, queue_id: str) -> Path:
        return self._env / f"{_checked(queue_id)}.json"

    def changed(self, queue_id: str) -> bool:
        """Whether the entry's record was changed since it was stored (an attempt, a hold)."""
        return self._env_path(queue_id).exists()

    def put(self, entry: QueueEntry, data: bytes) -> None:
        """Durably store a new entry; only after this returns may the client get 250."""
        self.put_stream(entry, (data,))

    def put_stream(self, entry: QueueEntry, chunks: Iterable[bytes]) -> None:
        """``put`` for a message that arrives in pieces, so it need not sit in memory twice."""
        error = self.put_many([(entry, chunks)])[0]
        if error is not None:
            raise error

    def put_many(
        self, items: Sequence[tuple[QueueEntry, Iterable[bytes]]], hold: bool = False
    ) -> list[Failure]:
        """``put`` for several entries with one fsync per directory (group commit).

        Returns, per entry, None when it is stored or the SpoolError that kept
        it out; an entry that failed leaves nothing behind. With ``hold`` each
        stored entry stays locked, from before its record exists, until
        ``release``: no engine in another process can take it while its client
        still waits for the answer.
        """
        seen: set[str] = set()
        failures: list[Failure] = [self._taken(entry.queue_id, seen) for entry, _ in items]
        taken_before = list(failures)

        def each(step: Callable[[QueueEntry, Iterable[bytes]], None]) -> None:
            for i, (entry, chunks) in enumerate(items):
                if failures[i] is None:
                    try:
                        step(entry, chunks)
                    except SpoolError as exc:
                        failures[i] = exc
                        self._discard(entry.queue_id)
                    except Exception as exc:  # one entry's bad data fails that entry alone
                        path = self.message_path(entry.queue_id)
                        failures[i] = SpoolError(path, f"cannot store it: {exc!r}")
                        self._discard(entry.queue_id)

        def sync() -> None:
            if all(failures):
                return
            try:
                self._sync_msg()
            except SpoolError as exc:
                for i, (entry, _) in enumerate(items):
                    if failures[i] is None:
                        failures[i] = exc
                        self._discard(entry.queue_id)

        def write_entry(entry: QueueEntry, chunks: Iterable[bytes]) -> None:
            record = RECORD_MARK + entry.to_json().encode() + b"\n"
            path = self.message_path(entry.queue_id)
            held = self._write_atomic(path, itertools.chain((record,), chunks), hold, reuse=True)
            if held is not None:
                self._held[entry.queue_id] = held

        try:
            each(write_entry)
            sync()
        except BaseException:
            for (entry, _), taken in zip(items, taken_before, strict=True):
                if taken is None:
                    self._discard(entry.queue_id)
            raise
        return failures

    def _taken(self, queue_id: str, seen: set[str]) -> Failure:
        """A new entry never overwrites, nor on failure removes, one already there
        or earlier in the same batch."""
        try:
            taken = queue_id in seen or self.message_path(queue_id).exists()
            taken = taken or self._env_path(queue_id).exists()
        except SpoolError as exc:
            return exc
        seen.add(queue_id)
        return (
            SpoolError(self._env_path(queue_id), "queue ID already in the spool") if taken else None
        )

    def _discard(self, queue_id: str) -> None:
        """Undo a ``put`` that did not complete."""
        _unlink_quietly(self.message_path(queue_id))
        self.release(queue_id)

    def detach(self, queue_id: str) -> int | None:
        """Take over the lock ``put_many(hold=True)`` kept: the open descriptor
        holding the entry's flock, now the caller's to close."""
        return self._held.pop(queue_id, None)

    def release(self, queue_id: str) -> None:
        """Let go of an entry ``put_many(hold=True)`` kept locked."""
        fd = self._held.pop(queue_id, None)
        if fd is not None:
            os.close(fd)

    def load(self, queue_id: str, first: QueueEntry | None = None) -> QueueEntry:
        """The changed record if there is one, else the first, from the entry's file.
        ``first`` is the first record as its writer holds it, returned instead of
        read again: it is written once and never replaced."""
        path = self._env_path(queue_id)
        try:
            with statefiles.read_plain(path) as record:
                raw = record.read()
        except FileNotFoundError:
            if first is not None and first.queue_id == queue_id:
                return first
            path = self.message_path(queue_id)  # the record read is the first one, in msg/
            raw = self._first_record(queue_id)
        except OSError as exc:
            raise SpoolError.from_os(exc, path) from exc
        try:
            entry = QueueEntry.from_json(raw)
        except ValueError as exc:
            raise SpoolError(path, f"unreadable queue record: {exc}") from exc
        if entry.queue_id != queue_id:
            raise SpoolError(path, f"record is for queue ID {entry.queue_id}")
        return entry

    def _first_record(self, queue_id: str) -> bytes:
        path = self.message_path(queue_id)
        with _translated(path, queue_id), statefiles.read_plain(path) as entry_file:
            line = entry_file.readline()
            _still_named(entry_file.fileno(), path, queue_id)
        if not line.startswith(RECORD_MARK):
            raise SpoolError(path, "unreadable queue record: no record in the entry's file")
        return line[len(RECORD_MARK) :]

    def read_message(self, queue_id: str, size: int | None = None) -> bytes:
        """The message in one buffer of its size: a buffered read after the record
        line would hold a 25 MB message twice. With ``size`` (the record's), one
        of another length raises DamagedEntry."""
        path = self.message_path(queue_id)
        with _translated(path, queue_id), statefiles.read_plain(path, buffering=0) as raw:
            start = _message_start(raw)
            raw.seek(start)
            left = os.fstat(raw.fileno()).st_size - start
            data = raw.read(left)
            while data is not None and len(data) < left:  # a short read: rare, but allowed
                more = raw.read(left - len(data))
                if not more:
                    break
                data += more
            _still_named(raw.fileno(), path, queue_id)
        data = data or b""
        if size is not None and len(data) != size:
            raise DamagedEntry(
                path, f"{quantity(len(data), 'byte')} of message stored, its record says {size}"
            )
        return data

    @contextlib.contextmanager
    def open_message(self, queue_id: str) -> Iterator[BinaryIO]:
        """The message, past the entry's first record, for reading without the lock.

        Leaving the block raises NoSuchEntry if the entry was removed
        meanwhile: its file may have been recycled, and what was read may
        be another message. A file without the mark is all message: an entry
        queued before records moved into the entry's file (its record is in
        env/ID.json).
        """
        path = self.message_path(queue_id)
        with _translated(path, queue_id), statefiles.read_plain(path) as message:
            if not message.readline().startswith(RECORD_MARK):
                message.seek(0)
            yield message
            _still_named(message.fileno(), path, queue_id)

    def update(self, entry: QueueEntry) -> None:
        """Replace the record atomically; call it with the entry's lock held."""
        if not self.message_path(entry.queue_id).exists():
            raise NoSuchEntry(entry.queue_id, NO_ENTRY)
        self._write_atomic(self._env_path(entry.queue_id), (entry.to_json().encode(),))
        _fsync_dir(self._env)

    def remove(self, queue_id: str) -> None:
        """The entry's file goes first and durably; a changed record left behind
        by a crash has no entry any more and is cleaned by ``recover``."""
        error = self.remove_many([queue_id])[0]
        if error is not None:
            raise error

    def remove_many(
        self, queue_ids: Sequence[str], recycle: bool = False, lazy: bool = False
    ) -> list[Failure]:
        """``remove`` for several entries with one fsync of the directory.

        With ``recycle`` the files of small entries are kept for the next
        ``put`` of this process (see the module's docstring): only for
        entries whose message has reached its final state, since the file
        keeps the message's bytes until it is reused or trimmed.

        With ``lazy`` the directory is not fsynced for files moved aside for
        reuse: the next ``put`` (whose fsync covers these removals too) or
        ``sync_removals`` makes them durable. Until then a power loss can
        bring an entry back, and it is delivered again: only for entries
        already delivered, like Postfix, which never fsyncs the removal of a
        delivered message. An unlinked file is fsynced away at once even so:
        its inode may be reused by the next file, and a name that came back
        after a power loss would then name another entry's bytes.
        """
        failures: list[Failure] = [None] * len(queue_ids)
        unlinked = False
        for i, queue_id in enumerate(queue_ids):
            try:
                path = self.message_path(queue_id)
                with _translated(path, queue_id), self._sync_lock:
                    free = self._recycle(os.fspath(path), queue_id) if recycle else None
                    if free is None:
                        path.unlink()
                        unlinked = True
                    else:
                        self._unsynced.append(free)
                    self._removals += 1
            except SpoolError as exc:
                failures[i] = exc
        if not all(failures) and (unlinked or not lazy):
            try:
                self._sync_msg()
            except SpoolError as exc:
                raise UnsyncedRemovals(exc, failures) from exc
        for queue_id, failure in zip(queue_ids, failures, strict=True):
            if failure is None:
                _unlink_quietly(self._env_path(queue_id))
        return failures

    @property
    def recycle_room(self) -> int:
        """How many more delivered entries' files this process would keep for reuse
        now, rather than unlink (and fsync at once); a hint, read without a lock."""
        return max(0, RECYCLE_MAX - len(self._free) - len(self._unsynced))

    @property
    def removals_pending(self) -> bool:
        """Whether a ``remove_many(lazy=True)`` awaits its directory fsync."""
        return self._removals != self._synced

    def sync_removals(self) -> None:
        """Make the removals of ``remove_many(lazy=True)`` durable, unless an
        fsync of the directory since has done it already."""
        if self.removals_pending:
            self._sync_msg()

    def _sync_msg(self) -> None:
        """fsync msg/. It also makes every removal done before it durable, so the
        free files among them may be reused from now on; if it fails they are
        removed instead, since their renames may not have landed. Removals are
        pending until an fsync that started after the last of them succeeds."""
        with self._sync_lock:
            pending, self._unsynced = self._unsynced, []
            seen = self._removals
        try:
            _fsync_dir(self._msg)
        except SpoolError:
            for free in pending:
                _unlink_quietly(Path(free))
            raise
        with self._sync_lock:
            self._synced = max(self._synced, seen)
        now = time.monotonic()
        self._free.extend((free, now) for free in pending)

    def _recycle(self, path: str, queue_id: str) -> str | None:
        """Move an entry's file aside for reuse; its new name, or None when it is
        not worth keeping. Call it with ``_sync_lock`` held."""
        kept = len(self._free) + len(self._unsynced)
        if kept >= RECYCLE_MAX or os.stat(path).st_size > RECYCLE_SIZE:
            return None
        free = f"{self._msg}/{_FREE_PREFIX}{queue_id}"
        os.rename(path, free)
        return free

    def _reuse(self) -> tuple[int, str] | None:
        """A free file opened for overwriting, with its name; None when there is none.

        One whose lock is still held (the engine that delivered it has not
        closed it yet, or a queue tool is about to find the entry gone) goes
        back to the end of the line.
        """
        for _ in range(len(self._free)):
            try:
                name, freed = self._free.popleft()
            except IndexError:
                return None
            if time.monotonic() - freed > RECYCLE_TTL:
                _unlink_quietly(Path(name))
                continue
            fd = None
            try:
                fd = statefiles.open_plain(name, os.O_WRONLY)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _names(name, fd):
                    return fd, name
            except BlockingIOError:
                self._free.append((name, freed))
            except OSError:
                _unlink_quietly(Path(name))
            if fd is not None:
                os.close(fd)
        return None

    def trim_recycled(self, keep: float = RECYCLE_TTL, orphans: bool = True) -> int:
        """Remove this process's free files kept longer than ``keep`` seconds and,
        with ``orphans``, any other free file freed more than twice ``RECYCLE_TTL``
        ago (left by a worker that died: nobody will reuse it); returns how many went.

        Called by the delivery engine at each scan of the spool and, with
        ``keep=0``, when it stops, so a delivered message's bytes do not linger;
        and by a worker short of disk space, without the orphans, whose search
        lists the whole spool (half a second for 100,000 entries) on its event loop.
        """
        trimmed = 0
        cutoff = time.monotonic() - keep
        for _ in range(len(self._free)):
            try:
                name, freed = self._free.popleft()
            except IndexError:
                break
            if freed <= cutoff:
                _unlink_quietly(Path(name))
                trimmed += 1
            else:
                self._free.append((name, freed))
        if not orphans:
            return trimmed
        orphaned = time.time() - 2 * RECYCLE_TTL
        for name in self._listdir(self._msg):
            path = self._msg / name
            with contextlib.suppress(FileNotFoundError):
                if name.startswith(_FREE_PREFIX) and path.stat().st_ctime < orphaned:
                    trimmed += _unlink_unlocked(path)
        return trimmed

    def ids(self) -> list[str]:
        """Queue IDs start with the arrival time, so sorted IDs are oldest first."""
        return sorted(name for name in self._listdir(self._msg) if _ID.fullmatch(name))

    def census(self) -> list[tuple[str, int, bool]]:
        """(queue ID, size of its file, whether its record changed: tried or held)
        for every entry, from two directory listings and a stat each. The
        metrics take this at every scrape: ``entries`` reads every record, about
        a second and a half for 10,000 entries."""
        changed = {n.removesuffix(".json") for n in self._listdir(self._env)}
        return [(queue_id, info.st_size, queue_id in changed) for queue_id, info in self._stats()]

    def stamps(self) -> list[tuple[str, Stamp, Stamp | None]]:
        """(queue ID, its file's stamp, its changed record's stamp or None) for
        every entry, oldest first, from two listings and a stat for each file:
        what ``relay.spool.reread`` compares to read again only the records
        that changed."""
        changed = {n.removesuffix(".json") for n in self._listdir(self._env)}
        found = []
        for queue_id, info in self._stats():
            record = None
            if queue_id in changed:
                with contextlib.suppress(FileNotFoundError):  # released, or finished
                    record = stamp(os.lstat(self._env / f"{queue_id}.json"))
            found.append((queue_id, stamp(info), record))
        found.sort()
        return found

    def _stats(self) -> list[tuple[str, os.stat_result]]:
        """Each entry's file's stat, from one listing: an entry delivered and
        removed meanwhile is left out."""
        found = []
        with _translated(self._msg), os.scandir(self._msg) as listing:
            for item in listing:
                if _ID.fullmatch(item.name):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((item.name, item.stat(follow_symlinks=False)))
        return found

    def waiting(
        self, now: float, came: Callable[[float], float] | None = None
    ) -> dict[str, Waiting]:
        """``census`` by state, ``active`` (not tried yet) and ``deferred`` (tried,
        or held), for the metrics and ``relay status``. ``came``: when a message
        that arrived at a time came, on the clock as it reads now
        (``ClockSteps.arrival``), so that the ages are those the engine counts
        lifetimes by. A step forward moves every message before it alike, so
        the first queue ID is still the oldest message."""
        found = {"active": Waiting(), "deferred": Waiting()}
        first: dict[str, list[str]] = {"active": [], "deferred": []}
        for queue_id, on_disk, changed in self.census():
            state = "deferred" if changed else "active"
            found[state].count += 1
            found[state].size += on_disk
            first[state].append(queue_id)
        for state, ids in first.items():  # decoding every ID took a third of a scrape
            times = (queue_id_time(queue_id) for queue_id in sorted(ids))
            arrival = next((t for t in times if t is not None), None)
            if arrival is not None:
                found[state].oldest = max(0.0, now - (arrival if came is None else came(arrival)))
        return found

    def entries(self) -> Iterator[QueueEntry]:
        """A damaged record is logged and skipped so one bad file cannot stop the queue."""
        for queue_id, entry in self.loaded():
            if isinstance(entry, SpoolError):
                log.warning("%s skipped unreadable queue entry: %s", queue_id, entry)
            else:
                yield entry

    def loaded(self) -> Iterator[tuple[str, QueueEntry | SpoolError]]:
        """Each entry, oldest first, with its record or what keeps it from being read
        (a damaged record, a FIFO named like an entry): ``census`` counts those too,
        and a listing that left them out disagreed with ``relay status``."""
        for queue_id in self.ids():
            try:
                yield queue_id, self.load(queue_id)
            except NoSuchEntry:
                continue
            except SpoolError as exc:
                yield queue_id, exc

    def recover(
        self, min_age: float = 60.0, read: Callable[[QueueEntry], object] | None = None
    ) -> int:
        """Clean up what a crash left behind; returns the number of complete entries.

        Files younger than ``min_age`` seconds may belong to a put in progress in
        another process and are left alone; pass 0 only when no daemon runs.
        ``read`` gets the record of each complete entry that can be read: the
        check opens every entry's file anyway, and the start's metrics count
        the queue from them rather than open 50,000 files again.
        """
        cutoff = time.time() - min_age
        complete = set(self.complete(read))
        for path in self._leftovers(complete):
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                # a free file's mtime is its message's; the rename that freed it set ctime
                freed = path.name.startswith(_FREE_PREFIX)
                if (info.st_ctime if freed else info.st_mtime) >= cutoff:
                    continue
                if self._complete_now(path) or not _unlink_unlocked(path):
                    continue  # a live write's, or put since the listing: not its age's to say
                log.info("spool recovery removed %s", path)
        with contextlib.suppress(OSError):
            (self.directory / "lock").rmdir()  # lock files of an earlier layout, emptied above
        return len(complete)

    def complete(self, read: Callable[[QueueEntry], object] | None = None) -> list[str]:
        """The IDs of entries with their record: a message file without one is what
        a crash mid-put left, which ``recover`` removes. ``read``: see ``recover``."""
        return [q for q in self.ids() if self._has_record(q, read)]

    def _has_record(self, queue_id: str, read: Callable[[QueueEntry], object] | None) -> bool:
        """A message queued before records moved into the entry's file has its
        record beside it; without one it is what a crash mid-put left then."""
        if self._env_path(queue_id).exists():
            if read is not None:
                with contextlib.suppress(SpoolError):  # the engine says why, and skips it
                    read(self.load(queue_id))
            return True
        try:
            with statefiles.read_plain(self.message_path(queue_id)) as entry_file:
                if entry_file.read(len(RECORD_MARK)) != RECORD_MARK:
                    return False
                line = entry_file.readline() if read is not None else b""
        except OSError:
            return False
        if read is not None:
            with contextlib.suppress(ValueError):
                entry = QueueEntry.from_json(line)
                if entry.queue_id == queue_id:
                    read(entry)
        return True

    def _complete_now(self, path: Path) -> bool:
        """Whether ``path`` is an entry's message or record, and the entry complete
        now: one put between the two listings of ``recover`` was taken for an
        orphan, and with the clock ahead of the files' times, its age did not
        keep it from being removed after its 250."""
        entry = path.name.removesuffix(".json") if path.parent == self._env else path.name
        return bool(_ID.fullmatch(entry)) and (
            self.message_path(entry).exists() and self._has_record(entry, None)
        )

    def _leftovers(self, complete: set[str]) -> Iterator[Path]:
        """Temp and free files anywhere, changed records whose entry is gone,
        messages without a record, and lock files of an earlier layout."""
        old_locks = self.directory / "lock"
        directories = [self._msg, self._env, *([old_locks] if old_locks.is_dir() else [])]
        for directory in directories:
            for name in self._listdir(directory):
                temp = name.startswith(".") and name.endswith(_TMP_SUFFIX)
                temp = temp or name.startswith(_FREE_PREFIX)
                entry = name.removesuffix(".json") if directory is self._env else name
                orphan = directory is old_locks or (_ID.fullmatch(entry) and entry not in complete)
                if temp or orphan:
                    yield directory / name

    @contextlib.contextmanager
    def lock(self, queue_id: str, blocking: bool = True) -> Iterator[None]:
        """Exclusive use of one entry across processes. The delivery engine, in
        an event loop, should pass ``blocking=False`` and skip busy entries."""
        fd = self.acquire(queue_id, blocking)
        try:
            yield
        finally:
            os.close(fd)

    def acquire(self, queue_id: str, blocking: bool = True) -> int:
        """``lock`` for a holder that lets go later: the entry stays locked until
        the returned descriptor is closed."""
        path = self.message_path(queue_id)
        with _translated(path, queue_id):
            fd = statefiles.open_plain(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise SpoolBusy(path, "in use by another process") from exc
            except OSError as exc:
                raise SpoolError.from_os(exc, path) from exc
            with _translated(path, queue_id):
                _still_named(fd, path, queue_id)  # removed (or recycled) while we waited
        except BaseException:
            os.close(fd)
            raise
        return fd

    def kick(self) -> None:
        """Ask a running daemon to rescan the queue now."""
        with _translated(self._kick):
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | statefiles.NOFOLLOW
            fd = os.open(self._kick, flags, 0o600)
            try:
                self._adopt(fd)
                os.utime(fd)
            finally:
                os.close(fd)

    def last_kick(self) -> float:
        """The mtime of the last kick, 0.0 if never; remember it before a scan."""
        with _translated(self._kick):
            try:
                return os.stat(self._kick).st_mtime
            except FileNotFoundError:
                return 0.0

    def _write_atomic(
        self, target: Path, chunks: Iterable[bytes], hold: bool = False, reuse: bool = False
    ) -> int | None:
        """With ``hold``, the file comes back locked: an open descriptor holding its flock.
        With ``reuse``, a free file is overwritten if this process has one."""
        tmp: str | None = None
        fd: int | None = None
        held: int | None = None
        name = os.fspath(target)  # once: a Path makes its string anew for every call
        try:
            reused = self._reuse() if reuse else None  # locked already
            fd, tmp = reused if reused is not None else _create_temporary(name)
            if hold:
                held = os.dup(fd)  # shares its lock
            self._adopt(fd)
            size = _write_all(fd, chunks)
            if reused is not None:
                os.ftruncate(fd, size)  # the old entry may have been longer
            _fsync_file(fd)
            os.replace(tmp, name)  # locked through it: no sweep takes the file meanwhile
            os.close(fd)
            fd = None
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            if held is not None:
                os.close(held)
            if tmp is not None:
                _unlink_quietly(Path(tmp))
            if isinstance(exc, OSError):
                raise SpoolError.from_os(exc, target) from exc
            raise
        return held

    def _adopt(self, fd: int) -> None:
        statefiles.adopt(fd, self._owner)

    def _listdir(self, directory: Path) -> list[str]:
        with _translated(directory):
            return os.listdir(directory)


def _message_start(raw: BinaryIO) -> int:
    """Where the message begins in an entry's file: after the marked record line,
    or at 0 in a file of the earlier layout."""
    head = raw.read(len(RECORD_MARK))
    if head != RECORD_MARK:
        return 0
    position = len(head)
    while chunk := raw.read(1 << 16):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(chunk)
    return position


def _create_temporary(target: str) -> tuple[int, str]:
    """The file a write goes to before its rename: named after its target, which
    is unique while its writer holds it (a new ID, or an entry's lock); a name
    left by a crash gets a random neighbour instead."""
    for _ in range(2):
        fd, tmp = _new_temporary(target)
        if _names(tmp, fd):
            return fd, tmp
        os.close(fd)  # swept between its making and its lock, by a clock ahead: made again
    return _new_temporary(target)  # swept twice: its rename fails, and the message is refused


def _new_temporary(target: str) -> tuple[int, str]:
    directory, _, name = target.rpartition("/")
    tmp = f"{directory}/.{name}{_TMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=_TMP_SUFFIX)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until its rename: a live write, whatever its age
    return fd, tmp


def _names(path: str | Path, fd: int) -> bool:
    """Whether ``path`` still names the file open at ``fd``: a sweep of another
    process may have removed it before ``fd`` was locked, or a recycling given
    the file another name."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _write_all(fd: int, chunks: Iterable[bytes]) -> int:
    """All the chunks, in as few system calls as the kernel allows, without joining
    them; returns how many bytes that was."""
    pending = [memoryview(chunk) for chunk in chunks if chunk]
    size = sum(len(view) for view in pending)
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        if not written:
            raise OSError(errno.EIO, "the file system took none of the data")
        while written:
            if written >= len(pending[0]):
                written -= len(pending.pop(0))
            else:
                pending[0] = pending[0][written:]
                written = 0
    return size


def _still_named(fd: int, path: Path, queue_id: str) -> None:
    """NoSuchEntry unless ``path`` still names the file open as ``fd``: an entry's
    file outlives its removal when it is recycled, and then holds another entry."""
    if not _names(path, fd):
        raise NoSuchEntry(queue_id, NO_ENTRY)


def _checked(queue_id: str) -> str:
    """IDs reach the file system from the command line: nothing like ``../x`` may pass."""
    if not isinstance(queue_id, str) or not _ID.fullmatch(queue_id):
        raise NoSuchEntry(str(queue_id), "not a queue ID")
    return queue_id


def stamp(info: os.stat_result) -> Stamp:
    """What ``Stamp`` says of a file, from its stat."""
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@contextlib.contextmanager
def _translated(path: Path, queue_id: str | None = None) -> Iterator[None]:
    """OSError becomes SpoolError; a missing file, NoSuchEntry when it is an entry's."""
    try:
        yield
    except FileNotFoundError as exc:
        if queue_id is None:
            raise SpoolError.from_os(exc, path) from exc
        raise NoSuchEntry(queue_id, NO_ENTRY) from exc
    except OSError as exc:
        raise SpoolError.from_os(exc, path) from exc


def _unlink_unlocked(path: Path) -> int:
    """Remove a free file nobody holds (1), under its lock; 0 when a process holds
    it. Its age is its ctime against this process's clock, which a clock stepped
    forward (or a file server's behind) makes look old: a live worker reusing it
    then found it gone at its rename, and refused the message."""
    try:
        fd = statefiles.open_plain(path)
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:  # held (BlockingIOError), or already renamed by its worker
        return 0
    finally:
        os.close(fd)
    return 1


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _fsync_file(fd: int) -> None:
    diskwait.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    with _translated(directory):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            diskwait.fsync(fd)
        finally:
            os.close(fd)
