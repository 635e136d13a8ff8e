"""What the queue tools did, left in ``notes/`` for the running relay to log.

The tools are processes of their own, and the relay's log is its standard
error, the unit's journal or a file the tools cannot know of: a note in the
queue's directory reaches it wherever it goes. Each worker looks at every
turn of its engine; the one whose removal of a note succeeds logs it, so it
is logged once. A note left while the relay is stopped is logged at its next
start, with the time the tool ran.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from relay import statefiles
from relay.oplog import local_time
from relay.spool.store import Spool, SpoolError

#: The tool's verb, and how the log says what it did (postsuper's words where it has them).
DONE = {
    "delete": "removed",
    "hold": "placed on hold",
    "release": "released from hold",
    "retry": "scheduled for retry",
}
_ID = re.compile(r"[0-9A-Z]{16}")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


@dataclass(frozen=True)
class Note:
    queue_id: str
    verb: str
    by: str
    at: float

    def line(self, now: float) -> str:
        """The log line's text after the queue ID; a note older than a look or two
        says when the tool ran, as the line's own time does not."""
        late = ""
        if now - self.at > LATE:
            late = f" at {local_time(self.at)}"
        return f"{DONE[self.verb]} (relay queue {self.verb} by {self.by}{late})"


LATE = 10.0  # seconds: past the engine's looks, a note was left while no relay ran
LAST = 253402300799  # 9999-12-31T23:59:59Z, a note's latest time


class Notes:
    def __init__(self, spool: Spool) -> None:
        """Under the queue's directory; as root, new files go to its owner, as the
        spool's own do, for the relay to take them."""
        self.directory = spool.directory / "notes"
        try:
            self._owner = statefiles.owner_for(os.stat(spool.directory))
        except OSError as exc:
            raise SpoolError.from_os(exc, spool.directory) from exc

    def leave(self, queue_ids: list[str], verb: str, by: str) -> None:
        """One note per entry, each whole when it appears: written under a dot
        name and renamed."""
        if not queue_ids:
            return
        try:
            self._make_directory()
            for queue_id in queue_ids:
                self._write(Note(queue_id, verb, _UNPRINTABLE.sub("?", by), time.time()))
        except OSError as exc:
            raise SpoolError.from_os(exc, self.directory) from exc

    def stamp(self) -> int:
        """Changes whenever a note is left or taken: one stat a look."""
        try:
            return os.stat(self.directory).st_mtime_ns
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SpoolError.from_os(exc, self.directory) from exc

    def take(self) -> list[Note]:
        """The notes this process removed, oldest first; another worker's are its own.
        One that does not read as a note is removed and not returned."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if not n.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SpoolError.from_os(exc, self.directory) from exc
        taken = [self._take(self.directory / name) for name in names]
        return sorted((note for note in taken if note is not None), key=lambda n: n.at)

    def _take(self, path: Path) -> Note | None:
        """An entry that cannot be read or removed (a directory, a link) is
        passed over: raised, it kept every later note out of the log."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO's open would wait for ever
                return None
            with statefiles.open_read(path) as file:
                text = file.read(4096)
            os.unlink(path)
        except OSError:  # FileNotFoundError: another worker's
            return None
        return _parsed(text)

    def _make_directory(self) -> None:
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            statefiles.check_directory(self.directory)
            return
        if self._owner:
            os.chown(self.directory, *self._owner, follow_symlinks=False)

    def _write(self, note: Note) -> None:
        name = f"{time.time_ns()}.{note.queue_id}.{os.getpid()}"
        temporary = self.directory / f".{name}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | statefiles.NOFOLLOW
        fd = os.open(temporary, flags, 0o600)
        try:
            statefiles.adopt(fd, self._owner)
            text = {"queue_id": note.queue_id, "verb": note.verb, "by": note.by, "at": note.at}
            os.write(fd, json.dumps(text).encode())
            os.replace(temporary, self.directory / name)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)


def _parsed(text: bytes) -> Note | None:
    try:
        fields = json.loads(text)
        note = Note(str(fields["queue_id"]), str(fields["verb"]), str(fields["by"]), fields["at"])
    except (ValueError, KeyError, TypeError):
        return None
    if not _ID.fullmatch(note.queue_id) or note.verb not in DONE:
        return None
    if not isinstance(note.at, int | float) or not 0 <= note.at <= LAST:
        return None  # -Infinity, or a time localtime cannot show, ended the engine
    return Note(note.queue_id, note.verb, _UNPRINTABLE.sub("?", note.by), float(note.at))
