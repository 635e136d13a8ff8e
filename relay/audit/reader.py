"""Finding and reading the daily files, plain or gzip-compressed.

Lines are read as bytes and split on ``\\n`` only: records are compact JSON
with every control character escaped, but the text may hold U+2028 and
friends, which ``str.splitlines`` would wrongly treat as line ends. Search
relies on getting bytes so its substring pre-filter runs before any decode.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

from relay import statefiles
from relay.quantity import quantity

_NAME = re.compile(r"audit-(\d{4}-\d{2}-\d{2})\.jsonl(\.gz)?")
_CHUNK = 1 << 16
#: A stored record's start, with its seq: how the tools find one without decoding it.
SEQ = re.compile(rb'\{"v":\d+,"seq":(\d+),')


@dataclass(frozen=True)
class DayFile:
    day: date
    path: Path

    @property
    def compressed(self) -> bool:
        return self.path.suffix == ".gz"

    @property
    def name(self) -> str:
        return self.path.name


def file_name(day: date, compressed: bool = False) -> str:
    return f"audit-{day.isoformat()}.jsonl" + (".gz" if compressed else "")


def day_files(
    directory: Path,
    since: date | None = None,
    until: date | None = None,
    before: str | None = None,
) -> list[DayFile]:
    """The day files in day order, one per day; from ``since``'s and up to
    ``until``'s day, and with ``before`` (a record time) the later ones that may
    hold records before it.

    A record is never in an earlier day's file than its time's, but it may be
    in a later one: the writer never goes back to an older file when the clock
    steps back, and moves to the next day's name when today's was compressed.
    A window that skipped those by name lost their records from every report,
    the year after a clock that started a year ahead most of all.

    When both a day's plain and compressed file exist, compression was
    interrupted after the ``.gz`` was complete but before the plain file was
    removed; the plain file is the original, so it wins.
    """
    statefiles.check_directory(Path(directory))
    by_day: dict[date, DayFile] = {}
    for name in os.listdir(directory):
        match = _NAME.fullmatch(name)
        if not match:
            continue
        try:
            day = date.fromisoformat(match.group(1))
        except ValueError:
            continue
        if since and day < since:
            continue
        found = DayFile(day, Path(directory) / name)
        if day not in by_day or by_day[day].compressed:
            by_day[day] = found
    stepped = read_stepped(directory) if before is not None and until is not None else None
    return [
        by_day[d]
        for d in sorted(by_day)
        if until is None
        or d <= until
        or (before is not None and _may_hold_before(by_day[d], before, stepped))
    ]


def unread(directory: Path) -> list[str]:
    """Why each file of the directory that looks like part of the log is not
    read, one line each. A sysadmin's logrotate renames the newest records
    away (``audit-D.jsonl.1.gz``) and leaves an empty day file behind: the
    log then looked whole and shorter, and report counted less, without a word."""
    names = sorted(os.listdir(directory))
    found = {name for name in names if _NAME.fullmatch(name)}
    why = []
    for name in names:
        if name.startswith(".") or "audit-" not in name:
            continue
        match = _NAME.fullmatch(name)
        if match is None:
            why.append(f"{name} is not read: not a day file's name (rotated by logrotate?)")
        elif not _is_day(match.group(1)):
            why.append(f"{name} is not read: not a day in the calendar")
        elif match.group(2) and name[: -len(".gz")] in found:
            why.append(f"{name} is not read: {name[: -len('.gz')]} of the same day is, instead")
    return why


def day_of(name: str) -> date | None:
    """The day a day file's name stands for, or None for any other name."""
    match = _NAME.fullmatch(name)
    return date.fromisoformat(match.group(1)) if match and _is_day(match.group(1)) else None


def _is_day(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _may_hold_before(file: DayFile, time: str, stepped: Stepped | None) -> bool:
    """A file ``.stepped`` vouches holds only records of its own day is skipped
    unread; any other is scanned."""
    if stepped is not None and not stepped.may_hold_earlier(file.day):
        return False
    return _holds_before(file, time)


#: Blocks that stay in the processor's cache: a scan of 8 MiB ones took twice as long.
_SCAN = 1 << 20


def _holds_before(file: DayFile, time: str) -> bool:
    """Whether a file named after a window may hold records of it: any record
    earlier than its end. The clock may have stepped back anywhere in the file,
    for any number of records, so only the whole file tells: its first and last
    records missed those stepped back for between later ones. A file that
    cannot be read is looked into."""
    try:
        info = os.stat(file.path)
    except OSError:
        return True
    return _scanned(file, time, (info.st_ino, info.st_size, info.st_mtime_ns))


@functools.lru_cache(maxsize=1024)
def _scanned(file: DayFile, time: str, identity: tuple[int, int, int]) -> bool:
    """``_holds_before`` of the file as ``identity`` names it: a report asks for
    each file twice (its records, and their owners), and the scan costs about
    what reading the file does. Only times not of the file's own day are
    decoded, and the ordinary file has none."""
    other = _times_not_of(file.day)
    end = time.encode("ascii", "replace")
    try:
        with open_file(file) as stream:
            rest = b""
            while block := _read(file, stream, _SCAN):
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest = block[cut:]
                if any(found.group(1) < end for found in other.finditer(block, 0, cut)):
                    return True
    except (OSError, DamagedFile):
        return True
    return False


def _times_not_of(day: date) -> re.Pattern[bytes]:
    """A record's time that is not on ``day``, matched in C: the ordinary file has none."""
    return re.compile(rb'"time":"(?!%s)([^"]*)"' % re.escape(day.isoformat().encode() + b"T"))


def open_file(file: DayFile | Path) -> BinaryIO:
    path = file.path if isinstance(file, DayFile) else file
    raw = statefiles.open_read(path)
    if path.suffix == ".gz":
        unpacked = gzip.GzipFile(fileobj=raw, mode="rb")
        unpacked.myfileobj = raw  # closed with it, as gzip.open's own file is
        return unpacked  # type: ignore[return-value]
    return raw


TORN_END = b" [torn write, ended by the relay]\n"

#: Seq and hash of the newest record any writer made durable (relay.audit.writer).
HEAD_FILE = ".head"
HEAD_SIZE = 103  # 20 digits of seq, the hash, the check, separators and newline


def head_line(seq: int, value: str) -> bytes:
    return b"%020d %s %s\n" % (seq, value.encode(), _head_check(seq, value))


def parse_head(data: bytes) -> tuple[int, str] | None:
    """Seq and hash from ``.head``'s content; None when empty or torn by a crash."""
    fields = data.split()
    if len(data) != HEAD_SIZE or len(fields) != 3 or not fields[0].isdigit():
        return None
    head = (int(fields[0]), fields[1].decode("ascii", "replace"))
    return head if fields[2] == _head_check(*head) else None


def read_head(directory: Path) -> tuple[int, str] | None:
    """``.head`` of a log directory, if it has a whole one (a copy of the log may not)."""
    try:
        with statefiles.open_read(Path(directory) / HEAD_FILE) as stream:
            return parse_head(stream.read(HEAD_SIZE + 1))
    except OSError:
        return None


def _head_check(seq: int, value: str) -> bytes:
    """What tells a whole ``.head`` from one torn by a crash mid-write."""
    return hashlib.sha256(b"%d %s" % (seq, value.encode())).hexdigest()[:16].encode()


#: Which day files hold a record dated before their day (relay.audit.writer).
STEPPED_FILE = ".stepped"
#: The most of it read: a mark is 19 bytes, one per such file of the days covered.
STEPPED_SIZE = 1 << 18


@dataclass(frozen=True)
class Stepped:
    """What ``.stepped`` vouches for: each day file from ``since`` through
    ``through`` was begun by a writer that names in ``days``, before writing
    it, every one it puts a record dated before its day into. Files outside
    that run were written before any such writer (or by an older version
    since, or lost their coverage in a crash), so nothing is known of them."""

    since: date
    through: date
    days: frozenset[date] = frozenset()

    def covers(self, day: date) -> bool:
        return self.since <= day <= self.through

    def may_hold_earlier(self, day: date) -> bool:
        """Whether ``day``'s file may hold a record dated before its day."""
        return not self.covers(day) or day in self.days


def stepped_text(stepped: Stepped) -> bytes:
    body = b"covers %s %s\n" % (
        stepped.since.isoformat().encode(),
        stepped.through.isoformat().encode(),
    )
    body += b"".join(b"stepped %s\n" % d.isoformat().encode() for d in sorted(stepped.days))
    return body + b"check %s\n" % _stepped_check(body)


def parse_stepped(data: bytes) -> Stepped | None:
    """``.stepped``'s content; None when it is not whole (then every file is scanned)."""
    body, _, last = data.rstrip(b"\n").rpartition(b"\n")
    body += b"\n"
    if last != b"check " + _stepped_check(body) or not data.endswith(b"\n"):
        return None
    try:
        lines = [line.decode("ascii").split(" ") for line in body.splitlines()]
        (head, since, through), *marks = lines
        days = frozenset(date.fromisoformat(day) for word, day in marks if word == "stepped")
        if head != "covers" or len(days) != len(marks):
            return None
        return Stepped(date.fromisoformat(since), date.fromisoformat(through), days)
    except ValueError:
        return None


def read_stepped(directory: Path) -> Stepped | None:
    """``.stepped`` of a log directory, if it has a whole one: a log an older
    version wrote, or a copy without it, has none."""
    try:
        with statefiles.open_read(Path(directory) / STEPPED_FILE) as stream:
            data = stream.read(STEPPED_SIZE + 1)
    except OSError:
        return None
    return parse_stepped(data) if len(data) <= STEPPED_SIZE else None


def _stepped_check(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest()[:16].encode()


def lines(file: DayFile | Path) -> Iterator[bytes]:
    """Raw lines with their ``\\n``; a last line without one was cut short."""
    with open_file(file) as stream:
        yield from stream


def chunks(file: DayFile | Path, size: int = 1 << 23) -> Iterator[bytes]:
    """Blocks of whole lines, each ending in a newline; a torn last line is left out.

    Search scans these with ``bytes.find`` rather than line by line: C speed
    until a line can match.
    """
    with open_file(file) as stream:
        rest = b""
        while block := _read(file, stream, size):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                yield block[:cut]


class DamagedFile(ValueError):
    """A compressed day file that does not decompress (cut short, overwritten)."""


def _read(file: DayFile | Path, stream: BinaryIO, size: int) -> bytes:
    try:
        return stream.read(size)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        path = file.path if isinstance(file, DayFile) else file
        raise DamagedFile(f"{path}: the compressed file is damaged: {exc}") from exc


def records(
    directory: Path, since: date | None = None, until: date | None = None
) -> Iterator[dict[str, Any]]:
    """Every parseable record in order; ``relay audit verify`` judges the rest."""
    for file in day_files(directory, since, until):
        for line in lines(file):
            record = parse(line)
            if record is not None:
                yield record


def parse(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


#: The most of the log's end a restart reads for the outcomes it writes again
#: (``relay.settle``): a record's copy is never further from it than this.
REWRITE_REACH = 128 << 20


def recent(directory: Path, budget: int) -> Iterator[dict[str, Any]]:
    """The records in the last ``budget`` bytes of the plain day files, newest
    file first, each file's in order: what happened just before now, without
    reading a day's log from its start."""
    for file in reversed(day_files(directory)):
        if budget <= 0 or file.compressed:
            return
        with statefiles.open_read(file.path, buffering=0) as stream:
            size = os.fstat(stream.fileno()).st_size
            start = max(0, size - budget)
            before = min(start, 1)  # the byte before says whether a line begins at start
            tail = os.pread(stream.fileno(), size - start + before, start - before)
        budget -= size - start
        if start > 0:  # from the first line that begins in the tail, if one does
            cut = tail.find(b"\n")
            tail = tail[cut + 1 :] if cut >= 0 else b""
        for line in tail.split(b"\n")[:-1]:  # after the last: nothing, or a torn line
            record = parse(line + b"\n")
            if record is not None:
                yield record


@dataclass(frozen=True)
class Mark:
    """Where the log ended at a moment: its newest plain day file and that file's
    size then (None and 0 when it had none)."""

    name: str | None = None
    size: int = 0


def mark(directory: Path) -> Mark:
    """The log's end now, for ``since``; taken before a read of its end, so that
    whatever that read missed is after it."""
    plain = [file for file in day_files(directory) if not file.compressed]
    if not plain:
        return Mark()
    try:
        return Mark(plain[-1].name, os.stat(plain[-1].path).st_size)
    except FileNotFoundError:  # compressed meanwhile: its successor is read whole
        return Mark(plain[-1].name, 0)


def since(directory: Path, start: Mark) -> Iterator[dict[str, Any]]:
    """The records written after ``start``, and the one being written then: what
    another process appended while this one read the log, without reading again
    what it read. Only the newest files are read, from the line ``start`` fell in;
    the marked file compressed since (a compressor of the sysadmin's) is read
    whole, and one removed since is passed over."""
    for file in day_files(directory):
        if start.name is not None and file.name.removesuffix(".gz") < start.name:
            continue
        if file.compressed and start.name is None:
            continue  # the log had no plain file: nothing was written since to one
        try:
            yield from _records_after(file, start)
        except FileNotFoundError:
            continue


def _records_after(file: DayFile, start: Mark) -> Iterator[dict[str, Any]]:
    if file.compressed:
        blocks: Iterable[bytes] = chunks(file)
    else:
        with statefiles.open_read(file.path, buffering=0) as stream:
            fd = stream.fileno()
            begin = _line_start(fd, start.size) if file.name == start.name else 0
            blocks = [os.pread(fd, max(0, os.fstat(fd).st_size - begin), begin)]
    for block in blocks:
        for line in block.split(b"\n")[:-1]:
            record = parse(line + b"\n")
            if record is not None:
                yield record


def _line_start(fd: int, position: int) -> int:
    """Where the line holding the byte at ``position`` begins: a record may have
    been half written when the mark was taken."""
    while position > 0:
        step = min(_CHUNK, position)
        newline = os.pread(fd, step, position - step).rfind(b"\n")
        if newline >= 0:
            return position - step + newline + 1
        position -= step
    return 0


def last_line(path: Path) -> tuple[bytes | None, bool]:
    """The last complete line of a file, and whether a torn line follows it.

    A plain file is read backwards in chunks: the writer needs only its tail
    to continue the chain, however large the day has grown. A torn line the
    writer has already ended (``TORN_END``) is passed over: it stays in the
    file as evidence, and the chain goes on from the record before it.
    """
    if path.suffix == ".gz":
        last, torn = None, False
        for line in lines(path):
            if not line.endswith(b"\n"):
                torn = True
            elif not line.endswith(TORN_END):
                last, torn = line, False
        return last, torn
    with statefiles.open_read(path, buffering=0) as stream:
        return last_line_of(stream.fileno(), os.fstat(stream.fileno()).st_size)


def last_line_of(fd: int, size: int) -> tuple[bytes | None, bool]:
    """``last_line`` of a plain file open for reading whose size is ``size``: the
    writer follows another process's appends on its own descriptor, without
    opening the file by name each time."""
    position = size
    tail = b""
    while (found := _last_complete(tail, position == 0)) is None and position > 0:
        step = min(_CHUNK, position)
        position -= step
        tail = os.pread(fd, step, position) + tail
    return found, bool(tail) and not tail.endswith(b"\n")


def _last_complete(tail: bytes, whole: bool) -> bytes | None:
    """The last complete line in ``tail`` not ended by the writer, if ``tail`` shows all of it."""
    end = tail.rfind(b"\n") + 1
    while end > 0:
        start = tail.rfind(b"\n", 0, end - 1) + 1
        if start == 0 and not whole:
            return None  # the line may begin before the tail
        if not tail.endswith(TORN_END, 0, end):
            return tail[start:end]
        end = start
    return None


def retention_age(pruned: dict[str, Any]) -> str:
    """How old the records a ``pruned`` record names were, as its
    ``retention_days`` says: ``1 day``, ``90 days``."""
    days = pruned.get("retention_days")
    return quantity(days, "day") if isinstance(days, int) else f"{days} days"
