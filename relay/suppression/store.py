"""The suppression list: addresses the relay no longer sends to, and why.

An address lands on it when an upstream refuses it permanently as one that
does not exist (the policy's ``suppression.hard_bounce`` codes), or when a
sysadmin adds it (``relay suppression add``, for a complaint, say). Mailing
such an address again is what gets a platform's mail marked as spam, so the
relay drops it from every later message and tells the sending user why.

The file is append-only JSON lines in the state directory, shared by every
worker and the tools: each change is one line saying who made it and when,
so the list carries its own history, and the last line for an address and
scope wins. A reader holds what it read and reads only what was appended
since (one ``stat`` a message), so a 100,000-entry list costs its parse once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

from relay.errors import RelayError

log = logging.getLogger("relay")

VERSION = 1
BOUNCE = "bounce"  # a permanent refusal of the address by a receiving server
COMPLAINT = "complaint"  # the recipient reported the mail as spam
MANUAL = "manual"
REASONS = (BOUNCE, COMPLAINT, MANUAL)

_Key = tuple[str, str | None]  # (address in lower case, tenant or None for all)


class SuppressionError(RelayError):
    """The list could not be read or written; says which file and why."""


@dataclass(frozen=True)
class Suppression:
    """One address the relay does not send to. ``tenant`` None: for every
    tenant (a mailbox that does not exist is gone for all of them); a tenant's
    id: for that tenant's mail only (one company's customer who complained)."""

    address: str
    tenant: str | None
    reason: str
    since: str  # UTC, as the audit log writes times
    detail: str = ""  # the refusal that put it there, or the sysadmin's note
    queue_id: str | None = None  # the message whose refusal put it there
    by: str = "relay"

    @property
    def key(self) -> _Key:
        return (self.address.lower(), self.tenant)

    def describe(self) -> str:
        """For the sending user's notice and the preview's reasons."""
        scope = "" if self.tenant is None else f" for {self.tenant}"
        detail = f": {self.detail}" if self.detail else ""
        return f"on the suppression list{scope} since {self.since} ({self.reason}{detail})"


class SuppressionList:
    """A snapshot: what ``decide`` looks addresses up in. It never changes, so a
    message is decided against one list whatever the file does meanwhile."""

    def __init__(self, entries: Mapping[_Key, Suppression]) -> None:
        self._entries = entries

    def find(self, address: str, tenant: str) -> Suppression | None:
        """What keeps ``address`` from ``tenant``'s mail: its own entry, else the one for all."""
        key = address.lower()
        return self._entries.get((key, tenant)) or self._entries.get((key, None))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Suppression]:
        return iter(sorted(self._entries.values(), key=lambda s: (*s.key[:1], s.tenant or "")))


EMPTY = SuppressionList(MappingProxyType({}))


def now() -> str:
    when = datetime.now(UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"


class SuppressionFile:
    """The list's file, for the daemon's workers and the tools alike."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[_Key, Suppression] = {}
        self._snapshot = EMPTY
        self._seen: tuple[int, int] | None = None  # (inode, bytes read)
        self._partial = b""  # a last line still being written
        self._line = 0
        self.problems: list[str] = []  # lines that are not entries, as "FILE:LINE: why"

    @property
    def unfinished(self) -> bool:
        """The file ends in a line with no line end, left unread: cut short by a
        crash, or still being written. The next change ends it."""
        return bool(self._partial)

    def current(self) -> SuppressionList:
        """The list as the file has it now; raises SuppressionError if it cannot be read.

        A missing file is an empty list: nothing was ever suppressed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._seen is not None:
                self._reset()
            return self._snapshot
        except OSError as exc:
            raise _failed("read", self.path, exc) from exc
        if self._seen is not None and self._seen == (st.st_ino, st.st_size):
            return self._snapshot
        if self._seen is None or self._seen[0] != st.st_ino or st.st_size < self._seen[1]:
            self._reset()  # replaced or cut: read from the start
        self._read_from(self._seen[1] if self._seen else 0)
        return self._snapshot

    def _reset(self) -> None:
        self._entries = {}
        self._snapshot = EMPTY
        self._seen = None
        self._partial = b""
        self._line = 0
        self.problems = []

    def _read_from(self, offset: int) -> None:
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                f.seek(offset)
                chunk = f.read()
        except OSError as exc:
            raise _failed("read", self.path, exc) from exc
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # b"" when the data ends with a line end
        changed = False
        for raw in lines:
            self._line += 1
            if raw.strip():
                changed |= self._apply(raw)
        self._seen = (inode, offset + len(chunk))
        if changed:
            self._snapshot = SuppressionList(MappingProxyType(dict(self._entries)))

    def _apply(self, raw: bytes) -> bool:
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            op = record.get("op")
            if op == "add":
                entry = _entry(record)
                self._entries[entry.key] = entry
            elif op == "remove":
                address, tenant = record["address"], record.get("tenant")
                if not isinstance(address, str) or not isinstance(tenant, str | None):
                    raise ValueError("address or tenant is not text")
                self._entries.pop((address.lower(), tenant), None)
            else:
                raise ValueError(f"op {op!r} is neither add nor remove")
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"{self.path}:{self._line}: not a suppression entry, skipped: {exc}"
            self.problems.append(problem)
            log.warning("%s", problem)
            return False
        return True

    def add(self, entries: Iterable[Suppression]) -> None:
        self._append({"v": VERSION, "op": "add", **asdict(e)} for e in entries)

    def remove(self, keys: Iterable[_Key], by: str) -> None:
        when = now()
        self._append(
            {"v": VERSION, "op": "remove", "address": a, "tenant": t, "time": when, "by": by}
            for a, t in keys
        )

    def create(self) -> None:
        """Make the (empty) file now, as the relay's user: a tool run as root
        would otherwise create one the daemon could not add bounces to."""
        self._append(())

    def _append(self, records: Iterable[dict]) -> None:
        """Append whole lines under the file's lock, then fsync: an entry the
        relay or a sysadmin made is not lost to a crash. A line left half
        written by one is ended first, so it spoils no other line."""
        data = b"".join(
            json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            for r in records
        )
        try:
            fd = _open_for_append(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if data and size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _failed("write", self.path, exc) from exc


def _failed(verb: str, path: Path, exc: OSError) -> SuppressionError:
    return SuppressionError(f"cannot {verb} the suppression list {path}: {exc.strerror or exc}")


def _open_for_append(path: Path) -> int:
    """Open, creating the file (and fsyncing its directory) if it is new, owned
    like the directory it is in."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW  # read: its last byte
    with contextlib.suppress(FileNotFoundError):
        return os.open(path, flags)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"no state directory {path.parent} yet (relay serve creates it)"
        )
    fd = os.open(path, flags | os.O_CREAT, 0o640)
    try:
        parent = os.stat(path.parent)
        if os.geteuid() == 0 and (parent.st_uid, parent.st_gid) != (0, 0):
            os.fchown(fd, parent.st_uid, parent.st_gid)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        os.close(fd)
        raise
    return fd


def _entry(record: dict) -> Suppression:
    fields = {k: record[k] for k in ("address", "tenant", "reason", "since")}
    for name in ("detail", "queue_id", "by"):
        if name in record:
            fields[name] = record[name]
    entry = Suppression(**fields)
    text = (entry.address, entry.reason, entry.since, entry.detail, entry.by)
    if not all(isinstance(v, str) for v in text) or "@" not in entry.address:
        raise ValueError("address, reason, since, detail and by must be text, with an address")
    if not isinstance(entry.tenant, str | None) or not isinstance(entry.queue_id, str | None):
        raise ValueError("tenant and queue_id must be text or null")
    if entry.reason not in REASONS:
        raise ValueError(f"reason {entry.reason!r} is not one of {', '.join(REASONS)}")
    return entry
