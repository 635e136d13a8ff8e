"""Appending to the audit log: one chained write per call, fsynced unless asked not to.

The daemon answers 250 only after ``append`` returns, so a message the
client believes accepted always has its record on disk. Records nobody
waits for (a delivery's outcome) may be written without an fsync of their
own and given a ticket: the next fsync of this process covers them, and
``synced`` tells the writer when, so it can act on them only then. Several processes
append (the daemon, and the queue tools recording who deleted or held what),
so the chain's tail is shared state: every append holds an exclusive
``flock`` on ``.lock`` and re-reads the tail whenever another process may
have written since (the open file changed size, or the directory changed).

Each worker knows only the records it wrote itself, so ``.head`` beside the
log holds the seq and hash of the newest record any writer has made durable:
a log that ends before it lost its newest records behind the writers' backs.
It is written under the same lock, after the fsync that made that record
durable and never before, so after a crash it can only lag the log, never
lead it; it gets no fsync of its own. A torn ``.head`` fails its check
and is ignored: the writers then know as much as they did without it.

``.stepped`` names the day files holding a record dated before their day
(the clock stepped back), so that a search of a window in the past skips
the others unread. Each name is made durable before its record is written,
so a crash leaves a file named that needs not be, never the other way
round; a file begun before it existed (or by an older version) is outside
its coverage and always scanned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import logging
import os
import shutil
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from relay import diskwait, statefiles
from relay.audit import events, reader
from relay.audit.chain import GENESIS_HASH, seal
from relay.errors import RelayError

log = logging.getLogger("relay.audit")

#: Day files, plain and compressed: records name addresses, tenants and users.
FILE_MODE = 0o640
DIRECTORY_MODE = 0o750
HEAD_FILE = reader.HEAD_FILE
STEPPED_FILE = reader.STEPPED_FILE
#: the first day retention was held back for a clock far past the log's records
RETENTION_HELD_FILE = ".retention-held"
#: ``probe``'s file, removed at once: a crash's is removed by the next probe
PROBE_FILE = ".probe"
PROBE_SIZE = 4096  # a page: a full tmpfs, or a full disk, refuses it
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the stream


class AuditError(RelayError):
    """The audit record could not be made durable: answer 451, accept nothing."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    def __init__(
        self,
        directory: Path,
        hmac_key: bytes | None = None,
        compress_after_days: int | None = None,
        retention_days: int | None = None,
        clock: Callable[[], datetime] = _utcnow,
        create: bool = True,
        witness: Path | None = None,
    ) -> None:
        """``create``: make the directory if it is not there; the daemon does only
        at the start of a new state directory (``relay.server``). ``witness``: a
        copy of ``.head`` outside the directory, which a restore of the
        directory from an older copy does not take back (``behind``)."""
        self.directory = Path(directory)
        self.compress_after_days = compress_after_days
        self.retention_days = retention_days
        self._key = hmac_key
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._fd_day: date | None = None
        self._size = 0  # of the open file after our last write
        self._day: date | None = None  # of the newest file: never write to an older one
        self._seq = 0
        self._prev = GENESIS_HASH
        self._high = (0, GENESIS_HASH)  # the newest record this process wrote or read
        self._stamp: int | None = None  # directory mtime when the tail was last read
        self._writes = 0  # tickets: writes made without an fsync of their own
        self._durable = 0  # every ticket up to this one is on disk
        self._doubtful = (0, 0)  # an fsync failed with these tickets (lo, hi] unsynced
        self._unsynced: tuple[int, str] | None = None  # written, not yet fsynced: not shared
        self._due: tuple[int, str] | None = None  # fsynced, to be written to .head
        self._shared_seen: tuple[bytes, tuple[int, str] | None] = (b"", None)  # read, parsed
        self._marked: tuple[tuple[int, int, int] | None, date] | None = None  # .stepped, day
        self._witness = witness
        self._witnessed: tuple[int, str] | None = None  # read at the start, raised by us
        self._witness_fd: int | None = None
        self._refusing: str | None = None  # why the last write failed, until one works
        try:
            st = self._made() if create else self._there()
            statefiles.check_directory(self.directory)
            # root running a queue tool on the daemon's log: what it creates stays the daemon's
            self._owner = statefiles.owner_for(st)
            self._where = (st.st_dev, st.st_ino)
            self._lock_fd, self._head_fd = self._open_shared()
            with self._locked():
                self._load()
                self._open_witness()  # with the tail: a writer raises it after its records
        except OSError as exc:
            raise AuditError(f"audit log {self.directory}: {exc.strerror or exc}") from exc

    def behind(self) -> tuple[int, int] | None:
        """(the log's last seq, the witness's) when the witness names records the
        log no longer has: the directory was restored from an older copy, or made
        anew, and the log's silence about a queued message says nothing."""
        if self._witnessed is None or self._witnessed[0] <= self._high[0]:
            return None
        return self._high[0], self._witnessed[0]

    def _open_witness(self) -> None:
        """Failing is logged, not raised: without it, a restore goes unseen, as before."""
        if self._witness is None:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | statefiles.NOFOLLOW
        try:
            fd = os.open(self._witness, flags, FILE_MODE)
        except OSError as exc:
            log.warning("audit log %s: %s not opened: %s", self.directory, self._witness, exc)
            return
        try:
            self._adopt(fd)
            self._witnessed = reader.parse_head(os.pread(fd, reader.HEAD_SIZE + 1, 0))
        except OSError as exc:
            os.close(fd)
            log.warning("audit log %s: %s not read: %s", self.directory, self._witness, exc)
            return
        self._witness_fd = fd

    @property
    def head(self) -> tuple[int, str]:
        """Seq and hash of the last record this process knows of."""
        return self._seq, self._prev

    @property
    def refusing(self) -> str | None:
        """Why the last write (or fsync) failed, until a write works again, a
        ``probe`` included: the engine starts no delivery meanwhile, as it could
        not record its outcome (``relay.engine``)."""
        return self._refusing

    def probe(self) -> None:
        """Whether the log takes records again, for a writer with none of its own
        to write: a full disk shows only on a write, never on an fsync of what
        is written, so a block goes to a file of its own, removed at once.
        Out of inodes alone that file cannot be made while the day file's
        appends, which need none, still work: with blocks free, that is no
        refusal (deliveries stayed held). Raises AuditError while the log is
        refused."""
        path = self.directory / PROBE_FILE
        with self._writing():
            try:
                fd = self._create(path)  # one left by a crash, or planted, goes first
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) and self._blocks_free():
                    return  # an empty file's create wants an inode only
                raise
            try:
                os.write(fd, bytes(PROBE_SIZE))
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _blocks_free(self) -> bool:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize >= PROBE_SIZE

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Under the lock: a failure says why the log refuses records (``refusing``)
        until a later write works; raised as AuditError."""
        try:
            with self._locked():
                try:
                    yield
                except OSError as exc:
                    self._refusing = self._why(exc)
                    raise
                self._refusing = None
        except OSError as exc:
            raise AuditError(self._why(exc)) from exc

    def _why(self, error: OSError) -> str:
        return f"audit log {self.directory}: {error.strerror or error}"

    def append(self, record: dict[str, Any]) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict[str, Any]], sync: bool = True) -> int:
        """Write all records as one write and fsync it; raise AuditError on any failure.

        On failure nothing is left half-written: the file is cut back to its
        previous end, and the next call re-reads the tail from disk.

        With ``sync=False`` there is no fsync: the records are on disk once
        ``synced`` says so of the returned ticket (0 means on disk already).
        """
        for record in records:
            events.check(record)
        if not records:
            return 0
        with self._writing():
            return self._append(records, sync)

    def _append(self, records: list[dict[str, Any]], sync: bool) -> int:
        self._refresh()
        now = self._clock()
        day = max(now.astimezone(UTC).date(), self._day or date.min)
        if self._fd is None or self._fd_day != day:
            self._open(day)
        if now.astimezone(UTC).date() < day:
            self._mark(day)
        time = events.timestamp(now)
        seq, prev, lines = self._seq, self._prev, []
        for record in records:
            seq += 1
            line, prev = seal(
                {"v": events.VERSION, "seq": seq, "time": time, **record, "prev": prev},
                self._key,
            )
            lines.append(line)
        data = ("\n".join(lines) + "\n").encode()
        try:
            self._write(data, sync)
        except OSError:
            self._undo()
            raise
        self._seq, self._prev = self._high = seq, prev
        self._size += len(data)
        if sync:
            self._due = self._unsynced = None  # covered by this fsync
            self._share((seq, prev))
            return 0
        self._unsynced = (seq, prev)
        self._share(self._due)
        self._writes += 1
        return self._writes

    def synced(self, ticket: int) -> bool | None:
        """Whether the records of ``append_many(sync=False)`` are on disk: True,
        False (not yet: ``sync``), or None when an fsync failed before covering
        them, or the ticket is negative (never written): write them again."""
        if ticket < 0 or self._doubtful[0] < ticket <= self._doubtful[1]:
            return None
        return ticket <= self._durable

    def sync(self) -> None:
        """fsync what was written without; raise AuditError if that fails."""
        try:
            with self._lock:
                if self._durable < self._writes and self._fd is not None:
                    self._fsync()
                if self._due is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                    try:
                        self._share(self._due)
                    finally:
                        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except OSError as exc:
            self._refusing = self._why(exc)
            raise AuditError(self._refusing) from exc

    def maintain(self, now: datetime | None = None) -> list[str]:
        """Delete days past retention, then compress closed days; what was done.

        Before deleting, a ``pruned`` record names the files and the seq and
        hash of their last record, so verify can tell retention from
        someone removing the log's beginning. The newest day is never touched,
        and a clock far ahead of the log's records deletes nothing they vouch for.
        """
        today = (now or self._clock()).astimezone(UTC).date()
        done: list[str] = []
        try:
            files = reader.day_files(self.directory)
            if self.retention_days is not None and files:
                aged_from = self._aged_from(files, today, self.retention_days)
                cutoff = aged_from - timedelta(days=self.retention_days)
                doomed = [f for f in files[:-1] if f.day < cutoff]
                done += self._prune(doomed)
            if self.compress_after_days is not None:
                files = reader.day_files(self.directory)
                limit = today - timedelta(days=self.compress_after_days)
                for file in files[:-1]:
                    if not file.compressed and file.day <= limit:
                        done.append(self._compress(file.path))
        except OSError as exc:
            raise AuditError(f"audit log maintenance: {exc.strerror or exc}") from exc
        return done

    def close(self) -> None:
        with self._lock:
            self._close()
            if self._witness_fd is not None:
                os.close(self._witness_fd)
                self._witness_fd = None
            for fd in (self._lock_fd, self._head_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _there(self) -> os.stat_result:
        """A directory deleted while the relay runs must stay gone until someone
        restores it: made again (by a worker's replacement, or the supervisor
        settling what a dead worker left), mail was answered 250 again into a new
        chain, and a restore with ``cp -a`` went inside the new directory."""
        try:
            return os.stat(self.directory)
        except FileNotFoundError:
            raise AuditError(
                f"audit log {self.directory}: the directory is gone; restore it from a"
                " backup (its chain goes on), or make it empty (mkdir) for a new chain;"
                " either way, the mail queued since is kept (docs/queue.md, backing up)"
            ) from None

    def _made(self) -> os.stat_result:
        """The directory, made if need be. Made by root (``relay bounce`` or a queue
        tool before the relay first ran), it goes to the state directory's owner:
        left root's, the relay's start failed on it, and every restart after.
        Writable by the relay alone whatever the umask (its day files' group may
        read them): under a umask of 0 anyone could rename a day file and remove
        ``.head``, and ``relay audit verify`` found an intact log of 0 records."""
        try:
            self.directory.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:
            return os.stat(self.directory)
        except FileNotFoundError:
            self.directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
            return os.stat(self.directory)
        parent = os.stat(self.directory.parent)
        if os.geteuid() == 0 and parent.st_uid:
            os.chown(self.directory, parent.st_uid, parent.st_gid)
        return os.stat(self.directory)

    def _open_shared(self) -> tuple[int, int]:
        """``.lock`` and ``.head`` of the directory there now."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | statefiles.NOFOLLOW
        lock_fd = os.open(self.directory / ".lock", flags, 0o600)
        try:
            self._adopt(lock_fd)
            head_fd = os.open(self.directory / HEAD_FILE, flags, FILE_MODE)
        except OSError:
            os.close(lock_fd)
            raise
        self._adopt(head_fd)
        return lock_fd, head_fd

    def _refresh(self) -> None:
        """Re-read the tail if anyone else may have appended since our last write."""
        info = os.stat(self.directory)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(20, "Not a directory", str(self.directory))
        if (info.st_dev, info.st_ino) != self._where:
            self._move_in(info)
            self._load()
        elif self._fd is None or info.st_mtime_ns != self._stamp:
            # Without an open file, another writer's appends change nothing we know.
            self._load()
        elif (own := os.fstat(self._fd)).st_nlink == 0:
            self._load()  # deleted, and the directory's mtime put back by a restore
        elif own.st_size != self._size or self._behind():
            # the same size, yet another writer made newer records: ours cut back to it
            self._follow(own.st_size)

    def _move_in(self, info: os.stat_result) -> None:
        """The directory was replaced (restored from a backup after it was deleted,
        say): its files are written from now on, under its own lock. Its mtime
        may equal the old one's (``cp -a`` keeps it), and the records went on
        into the deleted files, answered 250, lost at the next restart. The old
        ``.head``, still open, names the newest record any writer made there:
        one this writer never saw must not have its seq taken again."""
        with contextlib.suppress(OSError):
            old = self._shared()
            if old is not None and old[0] > self._high[0]:
                self._high = old
        lock_fd, head_fd = self._open_shared()
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        except OSError:
            os.close(lock_fd)
            os.close(head_fd)
            raise
        for fd in (self._lock_fd, self._head_fd):
            with contextlib.suppress(OSError):
                os.close(fd)  # the old lock goes with its descriptor
        self._lock_fd, self._head_fd = lock_fd, head_fd
        self._where = (info.st_dev, info.st_ino)
        self._shared_seen = (b"", None)
        self._marked = None
        log.warning(
            "audit log %s: the directory was replaced; writing to the new one", self.directory
        )

    def _behind(self) -> bool:
        shared = self._shared()
        return shared is not None and shared[0] > self._seq

    def _shared(self) -> tuple[int, str] | None:
        """The newest record any writer made durable, from ``.head``; None when
        there is none or it is torn (a crash while it was written)."""
        data = os.pread(self._head_fd, reader.HEAD_SIZE + 1, 0)
        if data == self._shared_seen[0]:
            return self._shared_seen[1]  # mostly: the check costs more than the read
        found = reader.parse_head(data)
        self._shared_seen = (data, found)
        return found

    def _share(self, head: tuple[int, str] | None) -> None:
        """Tell the other writers of a record made durable (under the lock). A
        failure only leaves ``.head`` behind the log, which is safe: logged, not raised."""
        if head is None:
            return
        try:
            shared = self._shared()
            if shared is None or shared[0] < head[0]:
                line = reader.head_line(*head)
                os.pwrite(self._head_fd, line, 0)
                self._shared_seen = (line, head)
            self._due = None
        except OSError as exc:
            log.warning("audit log %s: %s not updated: %s", self.directory, HEAD_FILE, exc)
        self._witness_head(head)

    def _witness_head(self, head: tuple[int, str]) -> None:
        """Only ever raised (under the lock, as ``.head``: another writer may have
        raised it past this one's head since): a log restored from an older copy
        must not take the witness back with it."""
        if self._witness_fd is None or (self._witnessed and self._witnessed[0] >= head[0]):
            return
        try:
            now = reader.parse_head(os.pread(self._witness_fd, reader.HEAD_SIZE + 1, 0))
            if now is None or now[0] < head[0]:
                os.pwrite(self._witness_fd, reader.head_line(*head), 0)
                now = head
            self._witnessed = now
        except OSError as exc:
            log.warning("audit log %s: %s not updated: %s", self.directory, self._witness, exc)

    def _follow(self, size: int) -> None:
        """Another process appended to our day's file (now ``size`` bytes): continue
        from its last record, read through our own descriptor (a full reload would
        fsync the directory again)."""
        assert self._fd is not None and self._fd_day is not None
        path = self.directory / reader.file_name(self._fd_day)
        line, torn = reader.last_line_of(self._fd, size)
        if torn:
            self._terminate(path)
            size = os.fstat(self._fd).st_size
        if line is None:
            self._load()
            return
        self._resume(_head(line, path.name))  # a file cut in place shrinks: see _resume
        self._size = size

    def _load(self) -> None:
        """The tail from the disk, over every day file (see _resume)."""
        self._stamp = None  # until the tail is known again
        self._close()
        self._seq, self._prev, self._day = 0, GENESIS_HASH, None
        files = reader.day_files(self.directory)
        if files:
            newest = files[-1]
            # A plain file beside a compressed one for the same day would hide it.
            self._day = newest.day + timedelta(days=1) if newest.compressed else newest.day
        head = (0, GENESIS_HASH)
        for file in reversed(files):  # the newest with a record: files after it are empty
            line, torn = reader.last_line(file.path)
            if torn and not file.compressed:
                self._terminate(file.path)  # also one a crash left before an empty new day
            if line is None:
                continue
            head = _head(line, file.name)
            break
        self._resume(head)
        self._stamp = os.stat(self.directory).st_mtime_ns

    def _resume(self, head: tuple[int, str]) -> None:
        """Go on from the tail read from disk. One older than the records any
        writer knows were written (this process, or another through ``.head``)
        means the newest were removed behind their backs (a file moved, replaced
        or cut in place): that is said, and the chain goes on from the known
        head, so that verify shows the gap rather than a new chain that looks
        intact, and no removed seq is used again. A last record that is not the
        one ``.head`` names was replaced (edited, its plain hash recomputed):
        going on from it would write over ``.head``, the only evidence, so the
        chain goes on from the one written, and verify shows the break."""
        known = self._high  # what this process wrote or saw, kept through failed loads
        shared = self._shared()
        if shared is not None and shared[0] >= known[0]:
            known = shared  # durable: one this process wrote may have been lost since
        if head[0] == known[0] and head[1] != known[1] and known == shared:
            log.error(
                "audit log %s: its last record, seq %d, is not the one written (%s names"
                " another hash): it was replaced; the chain goes on from the one written",
                self.directory,
                head[0],
                HEAD_FILE,
            )
            head = known
        if head[0] < known[0]:
            log.error(
                "audit log %s: records up to seq %d were written, its files now end at"
                " seq %d: the newest were removed; the chain goes on from seq %d",
                self.directory,
                known[0],
                head[0],
                known[0],
            )
            head = known
        self._seq, self._prev = self._high = head

    def _terminate(self, path: Path) -> None:
        """Keep a torn last line (a crash mid-write) as evidence, but end it."""
        log.warning("audit log %s ends in a torn line; terminating it", path.name)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | statefiles.NOFOLLOW)
        try:
            os.write(fd, reader.TORN_END)
            diskwait.fsync(fd)
        finally:
            os.close(fd)

    def _open(self, day: date) -> None:
        self._close()
        path = self.directory / reader.file_name(day)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | statefiles.NOFOLLOW  # read: _follow
        if not os.path.exists(path):
            self._sync_older(day)
        try:
            self._fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
            self._adopt(self._fd)
            self._like_the_day_before(self._fd, day)
            _fsync_directory(self.directory)  # the new file's name must survive a crash too
            self._cover(day)
        except FileExistsError:
            self._fd = os.open(path, flags)
            self._adopt(self._fd)  # mends a day file an earlier root tool left as root's
            line, _ = reader.last_line(path)  # created by another writer since our last look?
            head = _head(line, path.name) if line is not None else None
            if head is not None and head[0] > self._seq:  # never back behind a known head
                self._resume(head)
        self._fd_day = self._day = day
        self._size = os.fstat(self._fd).st_size
        self._stamp = os.stat(self.directory).st_mtime_ns

    def _like_the_day_before(self, fd: int, day: date) -> None:
        """A new day's file takes the group's read of the newest before it (0640
        at most, the relay's own read and write always: a day before made
        read-only left the next unwritable to a second writer): ``relay
        bounce``, run by Postfix with a umask of 077, began a day 0600 where
        the sysadmin had the service's group read the others, and a log
        shipper in it lost that day."""
        older = [f for f in reader.day_files(self.directory) if f.day < day]
        if not older:
            return
        try:
            mode = stat.S_IMODE(os.stat(older[-1].path, follow_symlinks=False).st_mode)
            os.fchmod(fd, (mode & FILE_MODE) | stat.S_IRUSR | stat.S_IWUSR)
        except OSError as exc:
            log.warning("audit log %s: cannot give it the mode of the day before: %s", day, exc)

    def _cover(self, day: date) -> None:
        """Take the file just begun for ``day`` into ``.stepped``'s coverage:
        every record it gets from now on goes through ``_mark``. Only a run of
        such files is covered: after one begun without (by an older version,
        or a crash before this), the run starts again at ``day``. A failure
        leaves the file outside, scanned: logged, not raised."""
        try:
            stepped = reader.read_stepped(self.directory)
            older = [f.day for f in reader.day_files(self.directory) if f.day < day]
            if stepped is not None and older and stepped.covers(older[-1]):
                self._write_stepped(replace(stepped, through=day))
            else:
                self._write_stepped(reader.Stepped(day, day))
        except OSError as exc:
            log.warning("audit log %s: %s not updated: %s", self.directory, STEPPED_FILE, exc)

    def _mark(self, day: date) -> None:
        """Name ``day``'s file in ``.stepped`` before a record dated before its
        day is written to it, or, failing that, remove ``.stepped`` (every file
        is scanned then): a search must never skip the record unread."""
        path = self.directory / STEPPED_FILE
        known = _identity(path)
        if self._marked == (known, day):
            return  # mostly: a clock set back a year goes on into one file for a year
        stepped = reader.read_stepped(self.directory)
        if stepped is not None and not stepped.may_hold_earlier(day):
            try:
                self._write_stepped(replace(stepped, days=stepped.days | {day}))
            except OSError as exc:
                log.warning(
                    "audit log %s: %s not updated (%s): removed, so that search reads"
                    " every file after a window",
                    self.directory,
                    STEPPED_FILE,
                    exc,
                )
                os.unlink(path)
                _fsync_directory(self.directory)
        self._marked = (_identity(path), day)

    def _write_stepped(self, stepped: reader.Stepped) -> None:
        self._write_whole(self.directory / STEPPED_FILE, reader.stepped_text(stepped))

    def _write_whole(self, path: Path, data: bytes) -> None:
        """Replace a file beside the log whole and durably (under the lock): a
        reader sees the old or the new, and a crash keeps the new once this returns."""
        temporary = path.with_name(f"{path.name}.tmp")
        try:
            with open(self._create(temporary), "wb") as stream:
                stream.write(data)
                stream.flush()
                diskwait.fsync(stream.fileno())
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        _fsync_directory(self.directory)

    def _sync_older(self, day: date) -> None:
        """The day before's file made durable before a record goes to a new one.
        Another writer's outcome written there without an fsync of its own
        waits for that writer's next one, while an fsync of the new file
        covers only the new file: lost in a crash, the older record left a gap
        between the two files, which verify calls tampering, for good."""
        older = [f for f in reader.day_files(self.directory) if f.day < day and not f.compressed]
        if older:
            fd = os.open(older[-1].path, os.O_RDONLY | os.O_CLOEXEC | statefiles.NOFOLLOW)
            try:
                diskwait.fsync(fd)
            finally:
                os.close(fd)

    def _create(self, path: Path) -> int:
        """A new file as private as a day file, and as the log's owner's."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a crashed run's, with whatever mode it had
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | statefiles.NOFOLLOW
        fd = os.open(path, flags, FILE_MODE)
        try:
            self._adopt(fd)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _adopt(self, fd: int) -> None:
        statefiles.adopt(fd, self._owner)

    def _write(self, data: bytes, sync: bool) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if sync:
            self._fsync()

    def _fsync(self) -> None:
        """fsync the open file: it covers every ticket written to it so far. After
        a failed fsync the kernel may have dropped the unsynced pages, so no later
        one can vouch for those tickets (those an earlier fsync covered stay on disk)."""
        assert self._fd is not None
        upto, unsynced = self._writes, self._unsynced
        try:
            diskwait.fsync(self._fd)
        except OSError:
            low, high = self._doubtful
            self._doubtful = (min(low, self._durable) if high else self._durable, upto)
            self._unsynced = None  # perhaps lost: .head must not claim it
            raise
        self._durable = upto
        if unsynced is not None and self._unsynced == unsynced:
            self._due, self._unsynced = unsynced, None

    def _undo(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                self._fsync()
        self._close()
        self._stamp = None

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if self._durable < self._writes:
                    self._fsync()  # no later fsync of this process reaches this file
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = self._fd_day = None

    def _aged_from(self, files: list[reader.DayFile], today: date, retention_days: int) -> date:
        """The day retention measures age from: today, unless the clock is far past
        the log's newest days (see ``retention_day``), which is said; but not
        once this has been so at each upkeep for ``retention_days`` on end
        (``.retention-held``): a clock set right after a start a year ahead
        goes on writing into the file named a year on, no new day file made a
        run of the days since, and retention held for the year. The days must
        follow one another: a start days after the last upkeep (a stop, a VM
        booting ahead again, a restored copy) begins the count again, or the
        count left from before deleted the history the hold was for."""
        day, resumes = retention_day([f.day for f in files], today, retention_days)
        path = self.directory / RETENTION_HELD_FILE
        with self._locked():
            if day == today:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return today
            since, last = _held(path) or (today, today)
            if not timedelta(0) <= today - last <= _UPKEEP_DAYS:
                since = today
            self._write_whole(
                path, b"%s %s\n" % (since.isoformat().encode(), today.isoformat().encode())
            )
        if today - since >= timedelta(days=retention_days):
            return today
        log.warning(
            "audit log %s: the clock (%s) is more than retention_days (%d) past the"
            " log's records of %s and before: a clock set ahead (check it), or a long"
            " idle; until %s retention deletes only what was past it on %s",
            self.directory,
            today,
            retention_days,
            day,
            min(resumes, since + timedelta(days=retention_days)),
            day,
        )
        return day

    def _prune(self, doomed: list[reader.DayFile]) -> list[str]:
        last = None
        for file in reversed(doomed):
            line, _ = reader.last_line(file.path)
            last = reader.parse(line) if line else None
            if last is not None:
                break
        if last is not None and self.retention_days is not None:
            self.append(
                events.pruned(
                    files=[f.name for f in doomed],
                    through_seq=last["seq"],
                    through_hash=last["hash"],
                    retention_days=self.retention_days,
                )
            )
        for file in doomed:
            for name in (reader.file_name(file.day), reader.file_name(file.day, True)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
        if doomed:
            _fsync_directory(self.directory)
            self._forget(doomed[-1].day)
        return [f"deleted {f.name}" for f in doomed]

    def _forget(self, through: date) -> None:
        """Drop the marks of the days retention deleted, which keeps ``.stepped``
        as small as the log. One left behind costs nothing but its line."""
        with self._locked():
            stepped = reader.read_stepped(self.directory)
            if stepped is None or not any(day <= through for day in stepped.days):
                return
            kept = frozenset(day for day in stepped.days if day > through)
            try:
                self._write_stepped(replace(stepped, days=kept))
            except OSError as exc:
                log.warning("audit log %s: %s not updated: %s", self.directory, STEPPED_FILE, exc)

    def _compress(self, path: Path) -> str:
        """Write the .gz beside it, check it decompresses to the same bytes, then swap;
        what was done. A file changed meanwhile is left for the next upkeep; a .gz
        of the same day holding other records (a rotated file renamed back) is
        never replaced: its records would be gone."""
        target = path.with_name(path.name + ".gz")
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        before = os.stat(path)
        there = _identity(target)
        if there is not None and not _prefix_of(target, path):
            log.error(
                "audit log %s: %s holds records %s does not begin with: both kept, and only"
                " %s read; put them together by hand (docs/audit-log.md)",
                self.directory,
                target.name,
                path.name,
                path.name,
            )
            return f"left {path.name} as it is: {target.name} holds other records"
        try:
            with statefiles.open_read(path) as source, open(self._create(temporary), "wb") as raw:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
                    shutil.copyfileobj(source, packed, 1 << 20)
                raw.flush()
                diskwait.fsync(raw.fileno())
            if _changed(path, before):
                return f"left {path.name} as it is: written to meanwhile"
            with statefiles.open_read(path) as original, gzip.open(temporary, "rb") as copy:
                if _sha256(original) != _sha256(copy):
                    raise OSError(f"compressing {path.name} did not round-trip")
            # the swap under the lock: a writer whose clock still read that day
            # may have appended to it, and its record must not go with the file
            with self._locked():
                if _changed(path, before):
                    return f"left {path.name} as it is: written to meanwhile"
                if _identity(target) != there:
                    return f"left {path.name} as it is: {target.name} was written meanwhile"
                os.replace(temporary, target)
                _fsync_directory(self.directory)
                os.unlink(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        _fsync_directory(self.directory)
        return f"compressed {path.name}"


#: the most days between two upkeeps of a relay that runs on: one a day, a
#: little late across midnight
_UPKEEP_DAYS = timedelta(days=2)


def _held(path: Path) -> tuple[date, date] | None:
    """The first and the last day of upkeep retention was held back on, if
    ``.retention-held`` says them."""
    try:
        with statefiles.open_read(path) as stream:
            first, last = stream.read(64).decode("ascii").split()
        return date.fromisoformat(first), date.fromisoformat(last)
    except (OSError, ValueError):
        return None


def retention_day(days: list[date], today: date, retention_days: int) -> tuple[date, date]:
    """The day retention measures age from, and from when it measures from today again.

    A clock far ahead (a VM booting with a bad RTC, before NTP) must not delete
    a history minutes old, though the relay's first records are already dated
    by it. The log's days split into runs wherever more than ``retention_days``
    pass without a file; a run is trusted once it has gone on that long (or is
    the log's first), and age is measured from the end of the newest trusted
    one. A clock that was right throughout is always trusted: today. Days
    after today (a clock set back since) count as today: deleting less is safe.
    """
    span = timedelta(days=retention_days)
    points = sorted({min(day, today) for day in days} | {today})
    end = len(points) - 1
    start = current = _run_start(points, end, span)
    while start > 0 and points[end] - points[start] < span:
        end = start - 1
        start = _run_start(points, end, span)
    if end == len(points) - 1:
        return today, today
    return points[end], points[current] + span


def _run_start(points: list[date], end: int, span: timedelta) -> int:
    """Where the run of days ending at ``end`` begins: after a gap longer than ``span``."""
    start = end
    while start > 0 and points[start] - points[start - 1] <= span:
        start -= 1
    return start


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _prefix_of(packed: Path, plain: Path) -> bool:
    """Whether a .gz holds nothing the plain file does not begin with (a
    compression of it a crash cut off before the plain file went, or a
    killed ``gzip -k``, its stream ending early), so that replacing it loses
    no record. A damaged one may hold any."""
    try:
        with statefiles.open_read(packed) as raw, statefiles.open_read(plain) as original:
            for block in _unpacked(raw):
                if original.read(len(block)) != block:
                    return False
    except zlib.error:
        return False
    return True


def _unpacked(raw: BinaryIO) -> Iterator[bytes]:
    """A gzip file's bytes as far as its stream goes: gzip's reader raises
    EOFError at a stream cut off and gives none of the block it was in, so a
    partial copy could not be told from one holding other records."""
    inflate = zlib.decompressobj(_GZIP_WBITS)
    while chunk := raw.read(1 << 20):
        while chunk:
            yield inflate.decompress(chunk, 1 << 20)
            chunk = inflate.unconsumed_tail
            if inflate.eof:  # a member ends: another may follow, as gzip reads them
                chunk = inflate.unused_data
                inflate = zlib.decompressobj(_GZIP_WBITS)


def _head(line: bytes, name: str) -> tuple[int, str]:
    """Seq and hash of a file's last record, where the chain continues."""
    record = reader.parse(line)
    if not (record and isinstance(record.get("seq"), int) and "hash" in record):
        raise OSError(f"the last record of {name} is unreadable: run relay audit verify")
    return record["seq"], record["hash"]


def _changed(path: Path, before: os.stat_result) -> bool:
    after = os.stat(path)
    return (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)


def _sha256(stream: Any) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        diskwait.fsync(fd)
    finally:
        os.close(fd)
