"""The suppression list: addresses the relay no longer sends to, and why.

An address lands on it when an upstream refuses it permanently as one that
does not exist (the policy's ``suppression.hard_bounce`` codes), or when a
sysadmin adds it (``relay suppression add``, for a complaint, say). Mailing
such an address again is what gets a platform's mail marked as spam, so the
relay drops it from every later message and tells the sending user why.

The file is append-only JSON lines in the state directory, shared by every
worker and the tools: each change is one line saying who made it and when,
so the list carries its own history, and the last line for an address and
scope wins. A worker holds the list compactly (``index``) and reads only
what was appended since (one ``stat`` a message), so a 100,000-entry list
costs its parse once; the tools read the whole file, details and all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relay import diskwait, statefiles
from relay.errors import RelayError
from relay.quantity import quantity
from relay.suppression.entry import (
    VERSION,
    Key,
    Suppression,
    change,
    has_unknown_key,
    now,
    read_line,
    unknown_key,
)
from relay.suppression.index import EMPTY, Builder, SuppressionList

log = logging.getLogger("relay")

MARK = 64  # bytes before the point read to, compared at the next read


class SuppressionError(RelayError):
    """The list could not be read or written; says which file and why."""


@dataclass
class Listing:
    """The whole list with every detail, for the tools: sorted by address."""

    entries: list[Suppression] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: why", lines skipped or odd
    unfinished: bool = False  # the last line has no line end: cut short, or being written


class SuppressionFile:
    """The list's file, for the daemon's workers and the tools alike."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._builder = Builder()
        self._snapshot = EMPTY
        self._seen: tuple[int, int, int] | None = None  # (inode, bytes read, mtime)
        self._offset = 0  # bytes read
        self._mark = b""  # the last of them, to tell the same file from another
        self._partial = b""  # a last line still being written
        self._line = 0
        self._odd = _Odd()  # this reading's entries taken without a key they have

    def current(self) -> SuppressionList:
        """The list as the file has it now; raises SuppressionError if it cannot be read.

        A missing file is an empty list: nothing was ever suppressed. A file
        replaced (``mv``, even onto a reused inode number) or rewritten in place
        is read again from its start: what was read last must still be there,
        byte for byte, for the rest to be read from where it stopped."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._seen is not None:
                self._reset()
            return self._snapshot
        except OSError as exc:
            raise _failed("read", self.path, exc) from exc
        if self._seen == (st.st_ino, st.st_size, st.st_mtime_ns):
            return self._snapshot
        changed = False
        self._odd = _Odd()
        try:
            with statefiles.read_plain(self.path) as f:
                st = os.fstat(f.fileno())
                if not self._continues(f.fileno(), st.st_ino, st.st_size):
                    self._reset()
                f.seek(self._offset)
                for line in f:  # not read whole: a large list's bytes would stay in memory
                    if not line.endswith(b"\n"):
                        self._partial += line  # still being written, or cut short
                        break
                    if self._partial:
                        line, self._partial = self._partial + line, b""
                    self._line += 1
                    if line.strip():
                        changed |= self._apply(self._line, line)
                self._offset = f.tell()
                self._mark = os.pread(f.fileno(), MARK, max(0, self._offset - MARK))
            if said := self._odd.said():
                log.warning("%s", said)
        except FileNotFoundError:
            return self._snapshot
        except OSError as exc:
            raise _failed("read", self.path, exc) from exc
        self._seen = (st.st_ino, self._offset, st.st_mtime_ns)
        if changed or self._snapshot is EMPTY:
            self._snapshot = self._builder.snapshot()
        return self._snapshot

    def _continues(self, fd: int, inode: int, size: int) -> bool:
        """Whether the open file is the one read so far, grown at most. One that
        changed without growing was written over in place (an editor, ``cp``):
        an edit keeping the length left the last bytes read as they were."""
        if self._seen is None or self._seen[0] != inode or size <= self._offset:
            return False
        start = max(0, self._offset - len(self._mark))
        return os.pread(fd, len(self._mark), start) == self._mark

    def entries(self, addresses: Collection[str] | None = None) -> Listing:
        """The whole file, read now, with each entry's detail and who made it; with
        ``addresses``, only their entries (and only their lines' problems).

        The addresses are looked for in the file's bytes first, and only the
        lines naming them are parsed: parsing every line of a 500,000-entry
        list took ``relay suppression add`` 4 s and 600 MB for one address."""
        try:
            with statefiles.read_plain(self.path) as whole:
                chunk = whole.read()
        except FileNotFoundError:
            chunk = b""
        except OSError as exc:
            raise _failed("read", self.path, exc) from exc
        listing = Listing(unfinished=not chunk.endswith(b"\n") and bool(chunk))
        wanted = None if addresses is None else {a.lower() for a in addresses}
        found: dict[Key, Suppression] = {}
        odd = _Odd()
        for number, line in _lines(chunk, wanted):
            if not line.strip():
                continue
            try:
                record = read_line(line)
                taken = change(record)
            except ValueError as exc:
                listing.problems.append(_skipped(self.path, number, exc))
                continue
            key = taken.key if isinstance(taken, Suppression) else (taken[0].lower(), taken[1])
            if wanted is not None and key[0] not in wanted:
                continue
            if isinstance(taken, Suppression):
                found[key] = taken
                if has_unknown_key(record):
                    odd.add(self.path, number, record)
            else:
                found.pop(key, None)
        if said := odd.said():
            listing.problems.append(said)
        listing.entries = sorted(found.values(), key=lambda e: (e.key[0], e.tenant or ""))
        return listing

    def _reset(self) -> None:
        self._builder = Builder()
        self._snapshot = EMPTY
        self._seen = None
        self._offset = 0
        self._mark = b""
        self._partial = b""
        self._line = 0

    def _apply(self, number: int, line: bytes) -> bool:
        try:
            record = read_line(line)
            if record["op"] == "add":
                self._builder.add(
                    record["address"], record["tenant"], record["reason"], record["since"]
                )
                if has_unknown_key(record):
                    self._odd.add(self.path, number, record)
            else:
                self._builder.remove(record["address"], record.get("tenant"))
        except ValueError as exc:
            log.warning("%s", _skipped(self.path, number, exc))
            return False
        return True

    def add(self, entries: Iterable[Suppression]) -> None:
        self._append({"v": VERSION, "op": "add", **asdict(e)} for e in entries)

    def add_unlisted(
        self,
        entries: Sequence[Suppression],
        replaces: Replaces | None = None,
        *,
        every_tenant: bool = False,
    ) -> Listing:
        """Adds those of ``entries`` whose address is not listed for their scope yet,
        deciding under the file's lock; returns what it read there (the entries'
        addresses only), from which ``added`` tells what was added. Decided
        before the lock, two adds at once listed an address twice, and an add
        beside a bounce replaced the bounce's entry, its first date and reason
        with it. ``replaces``: whether an entry replaces the one listed (the
        relay's first refusal of an address, one written later); ``every_tenant``:
        whether an entry for all tenants is one listed for each (``added``)."""
        read = Listing()

        def unlisted() -> Iterator[dict]:
            nonlocal read
            read = self.entries({e.address for e in entries})
            for entry in added(entries, read, replaces, every_tenant=every_tenant):
                yield {"v": VERSION, "op": "add", **asdict(entry)}

        self._append(unlisted)
        return read

    def remove(self, keys: Iterable[Key], by: str) -> None:
        when = now()
        self._append(
            {"v": VERSION, "op": "remove", "address": a, "tenant": t, "time": when, "by": by}
            for a, t in keys
        )

    def create(self) -> None:
        """Make the (empty) file now, as the relay's user: a tool run as root
        would otherwise create one the daemon could not add bounces to."""
        self._append(())

    def _append(self, records: Iterable[dict] | Callable[[], Iterable[dict]]) -> None:
        """Append whole lines under the file's lock, then fsync: an entry the
        relay or a sysadmin made is not lost to a crash. A line left half
        written by one is ended first, so it spoils no other line. A callable
        gives the lines once the lock is held."""
        try:
            fd = _open_for_append(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                data = b"".join(
                    json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                    for r in (records() if callable(records) else records)
                )
                size = os.fstat(fd).st_size
                if data and size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data
                    _said_cut(self.path, fd, size)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                diskwait.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _failed("write", self.path, exc) from exc


Replaces = Callable[[Suppression, Suppression], bool]  # (listed, entry)


def added(
    entries: Sequence[Suppression],
    read: Listing,
    replaces: Replaces | None = None,
    *,
    every_tenant: bool = False,
) -> list[Suppression]:
    """Those of ``entries`` ``add_unlisted`` adds, given what it read."""
    listed = {e.key: e for e in read.entries}
    return [
        e
        for e in entries
        if (found := listed_for(e, listed, every_tenant=every_tenant)) is None
        or (replaces is not None and replaces(found, e))
    ]


def listed_for(
    entry: Suppression, listed: Mapping[Key, Suppression], *, every_tenant: bool = False
) -> Suppression | None:
    """The entry ``listed`` has for ``entry``'s address and scope. With
    ``every_tenant``, a tenant's is else the one for all tenants, which keeps
    the address from its mail too (``SuppressionList.find``): the relay's own
    listings wrote a tenant's entry beside it, logged and recorded as a new
    listing. ``relay suppression add`` leaves that to the sysadmin."""
    found = listed.get(entry.key)
    if found is None and every_tenant and entry.tenant is not None:
        found = listed.get((entry.key[0], None))
    return found


_ADDRESS = re.compile(rb'"address"[ \t\r]*:[ \t\r]*"([^"\\\n]*)"')  # as JSON writes it
# the line end before a line that names no address as _ADDRESS reads one
_KEYLESS = re.compile(rb"\n(?![^\n]*?%s)" % _ADDRESS.pattern)
# what may spell an address otherwise: an escape (PHP writes "/" as "\/"), a
# Kelvin sign (U+212A, the one character beyond ASCII that lower-cases into
# ASCII, to k)
_SPELLED = (b"\\", "\u212a".encode())


def _lines(chunk: bytes, wanted: set[str] | None) -> Iterator[tuple[int, bytes]]:
    """The file's whole lines, numbered from 1; with ``wanted``, those that may
    name one of them: whose address is one, or that have an escape. A line's
    address is looked up among them, so that many cost what one does: past
    64 every line was parsed, and a message to 65 recipients at a dead domain
    held the list's lock 1.3 s on a 100,000-entry list. An address a JSON
    string must escape, and every line comes. So does a line that names no
    address in that form (a key misspelt by hand, ``adress``), which may be
    one of them: left out, it was not said to be damaged, and the address
    it meant was "not on the list". Such lines are looked for only when the
    addresses found do not number the lines, as they do in a list the
    relay wrote."""
    if wanted is None or not all(_plain(a) for a in wanted):
        yield from enumerate(chunk.split(b"\n")[: -1 if chunk else 0], 1)
        return
    if not wanted:
        return
    names = {a.encode("ascii") for a in wanted}
    found, keyed = [], 0
    for match in _ADDRESS.finditer(chunk, 0, chunk.rfind(b"\n") + 1):  # whole lines only
        keyed += 1
        if match[1].lower() in names:
            found.append(match.start())
    starts = {chunk.rfind(b"\n", 0, at) + 1 for at in (*found, *_spelled(chunk))}
    if keyed != chunk.count(b"\n"):
        starts.update(_keyless(chunk))
    number, counted = 1, 0
    for start in sorted(starts):
        end = chunk.find(b"\n", start)
        if end >= 0:
            number += chunk.count(b"\n", counted, start)
            counted = start
            yield number, chunk[start:end]


def _keyless(chunk: bytes) -> Iterator[int]:
    """Where the lines that name no address as ``_ADDRESS`` reads one begin."""
    if _ADDRESS.search(chunk, 0, max(chunk.find(b"\n"), 0)) is None:
        yield 0
    for match in _KEYLESS.finditer(chunk):
        yield match.end()


def _spelled(chunk: bytes) -> Iterator[int]:
    """Where a line spells an address otherwise, once a line: searched for
    with a pattern, they took twice what the addresses did."""
    for mark in _SPELLED:
        at = chunk.find(mark)
        while at >= 0:
            yield at
            end = chunk.find(b"\n", at)
            at = -1 if end < 0 else chunk.find(mark, end)


def _plain(address: str) -> bool:
    return address.isascii() and address.isprintable() and not ('"' in address or "\\" in address)


def _said_cut(path: Path, fd: int, size: int) -> None:
    """The line a writer without the lock left unended (a hand edit, a crash) takes
    effect once ended, as the next line is added: the log says so, and which."""
    tail = os.pread(fd, min(size, 4096), max(0, size - 4096)).rpartition(b"\n")[2]
    log.warning(
        "suppression list %s: its last line had no line end (a hand edit, or a write cut"
        " short); ended now, so it is read from here on: %s",
        path,
        tail[:300].decode("utf-8", "replace").encode("unicode_escape").decode("ascii"),
    )


def _failed(verb: str, path: Path, exc: OSError) -> SuppressionError:
    return SuppressionError(f"cannot {verb} the suppression list {path}: {exc.strerror or exc}")


def _open_for_append(path: Path) -> int:
    """Open, creating the file (and fsyncing its directory) if it is new, owned
    like the directory it is in."""
    flags = os.O_RDWR | os.O_APPEND  # read: its last byte
    with contextlib.suppress(FileNotFoundError):
        return statefiles.open_plain(path, flags)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"no state directory {path.parent} yet (relay serve creates it)"
        )
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        statefiles.adopt(fd, statefiles.owner_for(os.stat(path.parent)))
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            diskwait.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        os.close(fd)
        raise
    return fd


def _skipped(path: Path, number: int, exc: ValueError) -> str:
    return f"{path}:{number}: not a suppression entry, skipped: {exc}"


class _Odd:
    """The entries of one reading taken without a key they have, said once: a
    list brought over from another system with a key of its own on every
    line put a warning a line in the log, 300,000 from each worker, and
    held the workers' start 27 s."""

    def __init__(self) -> None:
        self.first: str | None = None
        self.count = 0

    def add(self, path: Path, number: int, record: dict[str, Any]) -> None:
        self.count += 1
        if self.first is None:
            self.first = f"{path}:{number}: an entry, taken without its {unknown_key(record)}"

    def said(self) -> str | None:
        if self.count <= 1:
            return self.first
        more = quantity(self.count - 1, "more entry", "more entries")
        return f"{self.first}; and {more} with keys the relay does not know"
