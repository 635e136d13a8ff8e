"""One relay per state directory.

Two relays on one spool would both recover it, both deliver its mail and
both extend its audit chain: a second ``relay serve`` started by hand next to
the service, or a copy of the policy with other ports, must not start. The
lock is an ``flock`` on the state directory and on ``relay.pid``, which names
the holder for the message. Forked workers inherit the descriptors, so the
lock lasts while any process of the relay is alive, and the kernel drops it
with the last one, however it ends. The directory's is what a
``relay.pid`` removed as a stale PID file, or replaced, leaves: the file
keeps its lock, but a second relay opening it by its name found another
file. The running relay writes such a file again within seconds. For
``relay status`` the file goes on with the policy in use, the holder's
start and the policy file it reads, and then what a reload left for a
restart, a line each; it is rewritten at each reload.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from relay import statefiles
from relay.errors import RelayError

LOCK_NAME = "relay.pid"
REREADS = 20  # reads of a lock file found without its last line end, REREAD_WAIT apart
REREAD_WAIT = 0.005
# the running policy's text, kept by a relay with workers for the queue and audit tools
CHECKED_NAME = "policy.checked.yaml"
# its version and the files it read, for a tool to know the file unchanged since
CHECKED_FILES = "policy.checked.files"
# the last of the lock file's notes from the signal to stop on: ``relay status`` says so
STOPPING = "stopping"
# the lock file's note from the lock taken until the relay serves: ``relay status`` says so
STARTING = "starting"
# what a reload left for the restart, as its note in the lock file begins
WAITS = "waits for a restart: "

log = logging.getLogger("relay")


class StateBusy(RelayError):
    def __init__(self, directory: Path, holder: str) -> None:
        self.directory = directory
        self.holder = holder
        if not holder:
            who = "another relay"
        elif _alive(int(holder)):
            who = f"the relay with PID {holder}"
        else:  # its workers outlive it for their stop's grace, holding the lock
            who = f"the workers of a relay whose supervisor (PID {holder}) is gone"
        super().__init__(
            f"state directory {directory} is in use by {who}: two relays on one"
            " spool would deliver its mail twice; stop that one first"
        )


def _alive(pid: int) -> bool:
    """A process killed but not yet reaped by its parent (a zombie) is not: a
    supervisor killed with SIGKILL stays one until its parent waits for it,
    which an init or wrapper that never does leaves it forever."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # there, under another user
    return _stat(pid)[:1] != ["Z"]


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command's name, from the
    state on; empty where there is no such file (not Linux, or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


class Lock:
    """The locked state directory and lock file, as this relay holds them; forked
    workers inherit both descriptors, so the locks last while any of them runs."""

    def __init__(self, directory: Path, whole: int, file: int) -> None:
        self.directory = directory
        self.whole = whole
        self.file = file
        self._said = False  # that the file cannot be written again, once until it can

    def close(self) -> None:
        os.close(self.file)
        os.close(self.whole)

    def keep(self, digest: str, pending: Sequence[str] = (), source: Path | None = None) -> None:
        """Writes the lock file again where it was removed (a "stale PID file"
        cleanup) or replaced: ``relay status`` reads it by its name, and said
        "not running" for the rest of the relay's life."""
        path = self.directory / LOCK_NAME
        if self._ours(path):
            return
        try:
            fd = _made_again(path, digest, pending, source)
        except OSError as exc:
            if not self._said:
                log.warning(
                    "%s was removed or replaced, and cannot be written again: %s", path, exc
                )
            self._said = True
            return
        log.warning("%s was removed or replaced while the relay runs: written again", path)
        self._said = False
        os.close(self.file)
        self.file = fd

    def _ours(self, path: Path) -> bool:
        """True too where it cannot be told: nothing is written over on a guess."""
        try:
            found = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        held = os.fstat(self.file)
        return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def hold(directory: Path, digest: str, source: Path | None = None) -> Lock:
    """The locks of ``directory`` and its lock file, made if need be, naming this
    process, ``digest``, the policy it serves, and ``source``, the file a
    reload reads, noted as ``STARTING`` until the relay serves (``note_policy``
    then); the caller keeps them for as long as it serves. Raises
    StateBusy, NotALockFile or another OSError."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return _hold(directory, digest, source)
    except BlockingIOError:
        raise StateBusy(directory, _named(directory)) from None
    except statefiles.NotAFile as exc:
        raise NotALockFile(directory / LOCK_NAME, exc) from exc


class NotALockFile(OSError):
    """Something else in the lock file's place, said as for every other state
    file (``PATH: a directory, not a regular file``), where ``relay serve``
    said Python's ``Is a directory``."""

    def __init__(self, path: Path, found: statefiles.NotAFile) -> None:
        super().__init__(found.errno, found.strerror, os.fspath(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def _hold(directory: Path, digest: str, source: Path | None) -> Lock:
    """The directory's first: a relay refused leaves the file as it found it.
    Raises BlockingIOError where another process holds either."""
    with contextlib.ExitStack() as undo:
        whole = _locked(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        undo.callback(os.close, whole)
        # not through a symbolic link: whoever may write the directory would choose the file
        opened = statefiles.open_plain(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        file = _locked(opened)  # an earlier version locks only this
        undo.callback(os.close, file)
        _write(file, digest, (STARTING,), source)
        undo.pop_all()
    return Lock(directory, whole, file)


def _locked(fd: int) -> int:
    """``fd`` locked, or closed. Raises BlockingIOError or OSError."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _made_again(path: Path, digest: str, pending: Sequence[str], source: Path | None) -> int:
    """The lock file made anew and locked, put in place whole: a status reading
    it meanwhile finds the old one or the new, never half of it."""
    new = path.with_name(f".{LOCK_NAME}.tmp")
    new.unlink(missing_ok=True)
    fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write(fd, digest, pending, source)
        os.rename(new, path)
    except BaseException:
        os.close(fd)
        new.unlink(missing_ok=True)
        raise
    return fd


def _named(directory: Path) -> str:
    """The PID to name for the relay holding the lock: as this process sees it,
    where the file's is another PID namespace's (a container's init is 1, the
    host's init here), else as the file has it."""
    try:
        running = holder(directory)
    except StateUnreadable:
        running = None
    if running is not None:
        return str(running.pid)
    try:
        fd = statefiles.open_plain(directory / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return ""
    try:
        written = os.pread(fd, 32, 0).decode("ascii", "replace").split("\n")[0].strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
    return written if written.isdigit() else ""


def note_policy(
    directory: Path, digest: str, pending: Sequence[str] = (), source: Path | None = None
) -> None:
    """A reload of ``source`` put ``digest`` in use, and left ``pending`` (a line
    each) not taken up; said in the log if the file cannot take it."""
    try:
        fd = statefiles.open_plain(directory / LOCK_NAME, os.O_WRONLY)
    except OSError as exc:
        log.warning(
            "cannot note the policy in use in %s: %s", directory / LOCK_NAME, exc.strerror or exc
        )
        return
    try:
        _write(fd, digest, pending, source)
    except OSError as exc:
        log.warning(
            "cannot note the policy in use in %s: %s", directory / LOCK_NAME, exc.strerror or exc
        )
    finally:
        os.close(fd)


def _write(fd: int, digest: str, pending: Sequence[str] = (), source: Path | None = None) -> None:
    """PID, policy digest, the process's start (for ``holder`` to tell it from
    a later process given the same PID) and the policy file at its end, then
    what a reload left pending. The file goes last on the start line, where an
    older ``holder`` reads nothing after the inode: on a line of its own, it
    read it as a note left for a restart."""
    pid = os.getpid()
    start = " ".join(_start(pid) or ("-", "-"))
    inode = os.fstat(fd).st_ino
    lines = [
        str(pid),
        digest,
        f"start {start} {inode}{_source_text(source)}",
        *(" ".join(note.split()) for note in pending),
    ]
    os.ftruncate(fd, 0)
    os.pwrite(fd, "".join(f"{line}\n" for line in lines).encode(), 0)


def _source_text(source: Path | None) -> str:
    """`` PATH``, absolute, as a reload opens it: its links and ``..`` kept (a
    link switched to another release is the file it reads then, and
    ``link/..`` is the link's target's parent); status compares the files the
    names lead to. Nothing for a name the line cannot hold whole, as an older
    relay wrote."""
    if source is None:
        return ""
    try:  # a relay changes no directory; one since removed has no name for a relative one
        path = os.fspath(source) if os.path.isabs(source) else os.path.join(os.getcwd(), source)
    except OSError:
        return ""
    return f" {path}" if path.isprintable() and path == path.strip() else ""


class Holder(NamedTuple):
    pid: int
    digest: str  # the policy in use
    pending: tuple[str, ...] = ()  # what its file says that a reload did not take up
    source: str = ""  # the policy file it reads, absolute; "" where an older relay wrote none


def holder(directory: Path) -> Holder | None:
    """The relay the lock file names, or None when it names no relay alive (no
    relay, or one that was killed and left its file, its PID since given to
    another program); with the file removed or replaced, the relay holding
    the directory's lock, its policy unknown until it writes the file again.
    Raises StateUnreadable."""
    path = directory / LOCK_NAME
    try:
        fd = statefiles.open_plain(path, os.O_RDONLY)
    except FileNotFoundError:
        return _holding_directory(directory)
    except OSError as exc:
        # something else in its place: the relay holding the directory writes
        # the file again; none may be an older one, holding the file alone
        found = _holding_directory(directory) if isinstance(exc, statefiles.NotAFile) else None
        if found is not None:
            return found
        raise StateUnreadable(path, exc) from exc
    try:
        lines = _read_whole(fd).decode("utf-8", "replace").split("\n")
        inode = os.fstat(fd).st_ino
    except OSError as exc:
        raise StateUnreadable(path, exc) from exc
    finally:
        os.close(fd)
    recorded = None
    source = ""
    if len(lines) > 2 and lines[2].startswith("start "):
        words = lines[2].split(maxsplit=4)
        recorded = tuple(words[1:3])
        if words[3:4] not in ([], [str(inode)]):
            # a copy (cp -a of a live state directory, or of the file into a live one)
            return _holding_directory(directory)
        source = words[4] if len(words) > 4 else ""
        del lines[2]
    pid = int(lines[0]) if lines[0].isdigit() else None
    if pid is None or not _serving(pid, recorded):
        pid = _seen_from_here(directory, recorded)
    if pid is None:
        return None
    digest = lines[1] if len(lines) > 1 else ""
    return Holder(pid, digest, tuple(line for line in lines[2:] if line), source)


def _read_whole(fd: int) -> bytes:
    """The file as ``_write`` left it: a reload rewrites it (emptied, then written),
    and a status read in between found it empty, said the supervisor was gone
    and exited 1, 359 times in 360 right."""
    data = os.pread(fd, 1 << 16, 0)
    for _ in range(REREADS):
        if data.endswith(b"\n"):
            break
        time.sleep(REREAD_WAIT)
        data = os.pread(fd, 1 << 16, 0)
    return data


def _seen_from_here(directory: Path, recorded: tuple[str, ...] | None) -> int | None:
    """The relay's PID as this process sees it, where the file's is another PID
    namespace's: a relay in a container writes its own (1, as its init), and
    the host's PID 1 is another program. The lock's holder, as /proc/locks
    gives it here, is the relay when it started when the file says it did."""
    if recorded is None or "-" in recorded:
        return None
    for pid in _lock_holders(directory):
        if pid and _serving(pid, recorded):
            return pid
    return None


def _holding_directory(directory: Path) -> Holder | None:
    """The relay holding the directory's lock, where its file names none: one
    whose ``relay.pid`` was removed writes it again within seconds."""
    for pid in _lock_holders(directory, file=False):
        if pid and _serving(pid, None):
            return Holder(pid, "")
    return None


def held(directory: Path) -> bool:
    """Whether a process holds the lock, as the kernel's /proc/locks lists it:
    workers outlive a supervisor killed with SIGKILL for their stop's grace,
    serving, while the PID the file names is gone. Looked up, not tried: a
    lock taken to test it, however briefly, could make a relay starting at
    that moment refuse to. False when it cannot be told."""
    return bool(_lock_holders(directory))


def _lock_holders(directory: Path, file: bool = True) -> list[int]:
    """The PIDs, as this process's namespace numbers them, that /proc/locks says
    hold a flock on the directory, or on its lock file unless ``file`` is
    False (an earlier version locked the file alone); none when it cannot be
    told."""
    inodes = {_inode(directory, follow=True)}
    if file:
        inodes.add(_inode(directory / LOCK_NAME, follow=False))
    inodes.discard("")
    try:  # bytes: a relay that gave up root may no longer import the ascii codec
        table = Path("/proc/locks").read_bytes().decode("ascii", "replace")
    except OSError:
        return []
    holders = []
    for line in table.splitlines():
        fields = line.split()
        inode = next((field for field in fields if field in inodes), None)
        if "FLOCK" in fields and inode is not None:
            pid = fields[fields.index(inode) - 1]
            holders.append(int(pid) if pid.isdigit() else 0)
    return holders


def _inode(path: Path, follow: bool) -> str:
    """``path``'s device and inode as /proc/locks writes them; "" where it has none."""
    try:
        info = os.stat(path, follow_symlinks=follow)
    except OSError:
        return ""
    return f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"


class StateUnreadable(RelayError):
    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(f"cannot read {path}: {error.strerror or error}")


def _serving(pid: int, recorded: tuple[str, ...] | None) -> bool:
    """Alive and the process that wrote the file: after a reboot the PID of a
    relay killed before it may be any other program's, another relay's
    included. Its start (in clock ticks since boot, and the boot's id, as
    the file has them) tells; no wall clock, which a first time sync moves.
    Where that cannot be read, a live ``relay serve`` is taken for it."""
    if not _alive(pid):
        return False
    now = _start(pid)
    if recorded is not None and "-" not in recorded and now is not None:
        return now == recorded
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc, or not ours to read: alive is all that is known
    return b"serve" in argv


def _start(pid: int) -> tuple[str, str] | None:
    """``pid``'s start in clock ticks since boot, and the boot's id (Linux)."""
    try:
        ticks = _stat(pid)[19]
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return None
    return ticks, boot


def started_at(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), from /proc; None where there is none."""
    start = _start(pid)
    try:
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError):
        return None
    return None if start is None else boot + int(start[0]) / os.sysconf("SC_CLK_TCK")
