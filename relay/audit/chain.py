"""The hash chain: how a record is sealed, and how the whole log is checked.

Each record's ``hash`` covers its own content and, through ``prev``, every
record before it, so changing, removing, inserting or reordering any line
breaks the chain from that point on. Plain SHA-256 catches accidents and
clumsy edits; someone who can rewrite the files can also recompute a plain
chain, which is what the optional HMAC key (kept off the log's disk) stops.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import hmac
import json
import os
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from relay import statefiles
from relay.audit import reader

GENESIS = "erp-relay audit log v1"
GENESIS_HASH = hashlib.sha256(GENESIS.encode()).hexdigest()


def canonical(record: dict[str, Any]) -> str:
    """Compact JSON in the record's own key order, UTF-8 kept as is."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def digest(prev: str, body: str, key: bytes | None = None) -> str:
    """``body`` is the canonical JSON of the record without ``hash``."""
    data = f"{prev}\n{body}".encode()
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def seal(record: dict[str, Any], key: bytes | None = None) -> tuple[str, str]:
    """The stored line (without its newline) and hash of a record ending in ``prev``."""
    body = canonical(record)
    value = digest(record["prev"], body, key)
    return f'{body[:-1]},"hash":"{value}"}}', value


def load_key(path: Path) -> bytes:
    """The HMAC key as the policy reads it: the file's bytes, surrounding whitespace removed."""
    return path.read_bytes().strip()


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        """Where, unless the problem is of no file: an empty log's."""
        return f"{self.file} line {self.line}: {self.message}" if self.file else self.message


@dataclass
class VerifyResult:
    files: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None  # hash of the newest record: write it down to anchor the log
    problem: Problem | None = None
    # the problem is the chain's start, found once every record after it was checked
    at_start: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Lines:
    """Numbered lines of one file with a one-line look-ahead for diagnosis."""

    def __init__(self, file: reader.DayFile) -> None:
        self.name = file.name
        self.file = file
        self._it: Iterator[bytes] = reader.lines(file)
        self._next: bytes | None = None
        self.number = 0
        self._offset = 0  # where the line ``_read`` returns next begins, in a plain file

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> bytes:
        if self._next is not None:
            line, self._next = self._next, None
        else:
            line = self._read()
        self.number += 1
        return line

    def peek(self) -> dict[str, Any] | None:
        if self._next is None:
            try:
                self._next = self._read()
            except StopIteration:
                return None
        return reader.parse(self._next)

    def _read(self) -> bytes:
        try:
            line = next(self._it)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            problem = Problem(self.name, self.number + 1, f"the compressed file is damaged: {exc}")
            raise _Tampered(problem) from exc
        if not line.endswith(b"\n") and not self.file.compressed:
            line = self._finished(line)
        self._offset += len(line)
        return line

    def _finished(self, torn: bytes) -> bytes:
        """A last line read while the relay was appending it: read again once the
        append is over (the writers' lock, held for one append), so a running
        relay's log does not look cut off. Still torn then, it is what it is.
        The lines appended since are left to the next verify."""
        lock = self.file.path.parent / ".lock"
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | statefiles.NOFOLLOW)
        except OSError:
            return torn  # a copy of the log: nobody writes it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with statefiles.open_read(self.file.path) as stream:
                stream.seek(self._offset)
                line = stream.readline()
        finally:
            os.close(fd)
        if line.endswith(b"\n"):
            if isinstance(self._it, Generator):
                self._it.close()
            self._it = iter(())
            return line
        return torn


class _Tampered(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


@dataclass(frozen=True)
class Anchor:
    """A head ``relay audit verify`` printed once, written down elsewhere: the
    log must still hold that record. Only this catches records removed from
    the end, which leaves a shorter chain that is still whole."""

    seq: int
    hash: str


def verify(
    directory: Path,
    hmac_key: bytes | None = None,
    since: date | None = None,
    anchor: Anchor | None = None,
) -> VerifyResult:
    """Check every file from ``since`` (or the start) on; stop at the first problem.

    A torn write the relay ended is a note, not a problem: see ``_Verifier.torn``.

    Raises OSError when the directory or a file cannot be read at all: that
    is a question for the sysadmin, not evidence of tampering.
    """
    result = VerifyResult()
    verifier = _Verifier(result, hmac_key, None if anchor is None else anchor.seq)
    # read before the files: every record it names is in them by then
    verifier.written = reader.read_head(directory)
    try:
        files = reader.day_files(directory, since=since)
        unread = reader.unread(directory)
        result.notes += unread
        for file in files:
            result.files += 1
            verifier.file(file)
        try:
            verifier.finish(since)
        except _Tampered as start:
            # retention writes its record into the newest file: gone, the start looks cut
            verifier.ended(since, bool(unread), start.problem)
            raise
        verifier.ended(since, bool(unread))
        if anchor is not None:
            verifier.anchored(anchor, since)
    except _Tampered as exc:
        result.problem = exc.problem
    if result.records == 0 and result.problem is None:
        result.notes.append(
            "the log is empty: no records to verify"
            if since is None
            else f"no records from {since.isoformat()} on to verify"
        )
    return result


def _span(first: int, last: int) -> str:
    return f"record {first}" if first == last else f"records {first}..{last}"


class _Verifier:
    def __init__(self, result: VerifyResult, key: bytes | None, anchor_seq: int | None) -> None:
        self.r = result
        self.key = key
        self.last: dict[str, Any] | None = None
        self.before_last: str | None = None  # hash of the record before ``last``
        self.last_file = ""
        self.last_line = 0
        self.start: tuple[str, int, str] | None = None  # file, seq, prev of an unproven start
        self.pruned: dict[tuple[Any, Any], dict[str, Any]] = {}
        self.anchor_seq = anchor_seq
        self.at_anchor: tuple[str, str, int] | None = None  # its hash, file, line
        self.written: tuple[int, str] | None = None  # the relay's .head: its newest durable record
        self.at_written: tuple[str, str, int] | None = None  # that seq's hash, file, line

    def file(self, file: reader.DayFile) -> None:
        lines = _Lines(file)
        torn = 0  # the number of the torn line just before, if it was
        for raw in lines:
            if raw.endswith(reader.TORN_END):
                self.torn(lines)
                torn = lines.number
                continue
            record = self.record(lines, raw)
            try:
                self.link(lines, record)
            except _Tampered as exc:
                if not torn:
                    raise
                message = (
                    f"{exc.problem.message}; the torn line before it (line {torn}) stands"
                    " for no record: the chain goes on from the record before a torn write"
                )
                raise _Tampered(Problem(lines.name, lines.number, message)) from None
            torn = 0
            self.r.records += 1
            if record["event"] == "pruned":
                self.pruned[(record.get("through_seq"), record.get("through_hash"))] = record
            self.before_last = self.last["hash"] if self.last else None
            self.last, self.last_file, self.last_line = record, file.name, lines.number
            if record["seq"] == self.anchor_seq:
                self.at_anchor = (record["hash"], file.name, lines.number)
            if self.written is not None and record["seq"] == self.written[0]:
                self.at_written = (record["hash"], file.name, lines.number)
            self.r.last_seq, self.r.head = record["seq"], record["hash"]
            if self.r.first_seq is None:
                self.r.first_seq = record["seq"]

    def torn(self, lines: _Lines) -> None:
        """The rest of a write a crash cut short, ended by the relay when it went on.

        The marker proves nothing (anyone can type it), and is not needed to:
        the writer went on from the record before the torn line, so the record
        after it must chain to that one, seq and hash, as if the line were not
        there. A record edited or removed and passed off as torn leaves that
        record missing from the chain, which the next line shows; a torn line
        with nothing after it is the log's end, which only an anchor vouches for.
        """
        self.r.notes.append(
            f"{lines.name} line {lines.number}: a write torn by a crash and ended by the"
            " relay, not a record: the chain goes on across it"
        )

    def record(self, lines: _Lines, raw: bytes) -> dict[str, Any]:
        def fail(message: str) -> _Tampered:
            return _Tampered(Problem(lines.name, lines.number, message))

        if not raw.endswith(b"\n"):
            raise fail("truncated record: the file ends in the middle of a line")
        record = reader.parse(raw)
        if record is None:
            raise fail("not a valid audit record (broken JSON or a cut-off line)")
        stored = record.pop("hash", None)
        if not (
            isinstance(stored, str)
            and isinstance(record.get("seq"), int)
            and isinstance(record.get("prev"), str)
            and "event" in record
        ):
            raise fail("not an audit record (seq, event, prev or hash missing)")
        line, expected = seal(record, self.key)
        seq = record["seq"]
        if line.encode() + b"\n" == raw and stored == expected:
            record["hash"] = stored
            return record
        ahead = lines.peek()
        if self.last and (
            (ahead and ahead.get("prev") == self.last["hash"])
            or seq != self.last["seq"] + 1  # fits nowhere: not an edit of the next record
            or (ahead is None and self._past_head())
        ):
            raise fail(f"this line (seq {seq}) was inserted: it is forged, its hash is wrong")
        if self.last is None:
            raise fail(
                f"record seq {seq} was changed: its hash does not match its content"
                " (or the log was written with a different HMAC key, or without one)"
            )
        raise fail(f"record seq {seq} was changed: its hash does not match its content")

    def _past_head(self) -> bool:
        """Whether the last record verified is the newest the relay made durable (its
        ``.head``): a line after it, at the end of a file, is one the relay never wrote
        (or its newest record, edited within the seconds before its fsync)."""
        return self.last is not None and self.written == (self.last["seq"], self.last["hash"])

    def link(self, lines: _Lines, record: dict[str, Any]) -> None:
        seq, prev, number = record["seq"], record["prev"], lines.number

        def fail(message: str) -> _Tampered:
            return _Tampered(Problem(lines.name, number, message))

        if self.last is None:
            if seq == 1 and prev != GENESIS_HASH:
                raise fail("seq 1 does not start from the genesis hash: the start was replaced")
            if seq != 1:
                self.start = (lines.name, seq, prev)
            return
        last_seq = self.last["seq"]
        if seq == last_seq + 1:
            if prev != self.last["hash"]:
                raise fail(
                    f"record seq {seq} does not chain to the record before it"
                    f" ({self.last_file} line {self.last_line}): one of them was replaced"
                )
            return
        if seq > last_seq + 1:
            gap = _span(last_seq + 1, seq - 1)
            if number == 1:
                raise fail(
                    f"{gap} missing between {self.last_file} and {lines.name}"
                    " (a file removed, or its end cut off)"
                )
            ahead = lines.peek()
            later = number + 1 if ahead and ahead.get("seq") == last_seq + 1 else None
            if later is None:
                later = _line_of(lines.file, last_seq + 1, number)
            if later is not None:
                raise fail(
                    f"lines {number} and {later} are out of order"
                    f" (seq {seq} comes before seq {last_seq + 1})"
                )
            raise fail(f"{gap} missing before this line (deleted)")
        if seq == last_seq and prev == self.before_last:
            raise fail(
                f"line {self.last_line} of {self.last_file} (seq {seq}) was inserted:"
                " this line chains to the record before it"
            )
        raise fail(
            f"record seq {seq} follows seq {last_seq}: a line was inserted, copied or moved here"
        )

    def anchored(self, anchor: Anchor, since: date | None = None) -> None:
        found = self.at_anchor
        if found is not None:
            stored, name, line = found
            if stored != anchor.hash:
                raise _Tampered(
                    Problem(name, line, f"record seq {anchor.seq} is not the one written down:"
                            f" its hash is {stored}, the anchor's {anchor.hash}")
                )  # fmt: skip
            self.r.notes.append(f"the anchor (seq {anchor.seq}) is in the log as written down")
        elif self.r.last_seq is None and since is not None:
            # the anchor may be in the days before --since, which were not read
            self.r.notes.append(
                f"the anchor (seq {anchor.seq}) is not checked: no records from --since {since} on"
            )
        elif self.r.last_seq is None or self.r.last_seq < anchor.seq:
            ends = "is empty" if self.r.last_seq is None else f"ends at seq {self.r.last_seq}"
            raise _Tampered(
                Problem(self.last_file or "", self.last_line,
                        f"the log {ends}, before the anchor's seq {anchor.seq}:"
                        " records were removed from its end")
            )  # fmt: skip
        else:
            self.r.notes.append(
                f"the anchor (seq {anchor.seq}) is older than the records verified: not checked"
            )

    def ended(self, since: date | None, unread: bool, start: Problem | None = None) -> None:
        """The log must reach the newest record the relay made durable (its
        ``.head``). Records a running relay adds meanwhile only make it longer.
        With ``--since`` and nothing read, the end may be in the days before.

        A ``start`` found unexplained is named second when the end is missing
        too: the ``pruned`` record that explains it may be among the records
        gone from the end, and an auditor sent after old records deleted
        would look in the wrong place."""
        if self.written is None or (since is not None and self.r.last_seq is None):
            return
        seq = self.written[0]
        last = self.r.last_seq or 0
        if last >= seq:
            self._as_written()
            return
        ends = "is empty" if self.r.last_seq is None else f"ends at seq {last}"
        how = "removed, or moved to a file not read: see the notes" if unread else "removed"
        if start is not None:
            self.r.at_start = False
            self.r.notes.append(
                f"{start} (going by the records read: a retention record among those"
                " missing from the end may explain it)"
            )
        raise _Tampered(
            Problem(self.last_file or "", self.last_line,
                    f"the log {ends}, but the relay wrote up to seq {seq} ({reader.HEAD_FILE}):"
                    f" {_span(last + 1, seq)} missing from its end ({how})")
        )  # fmt: skip

    def _as_written(self) -> None:
        """The record ``.head`` names must be the one the relay wrote: its newest,
        edited and its plain hash recomputed, leaves a chain as long and as whole."""
        if self.written is None or self.at_written is None:
            return
        stored, name, line = self.at_written
        seq, value = self.written
        if stored != value:
            raise _Tampered(
                Problem(name, line, f"record seq {seq} is not the one the relay wrote: its hash"
                        f" is {stored}, {reader.HEAD_FILE} names {value}: it was replaced")
            )  # fmt: skip

    def finish(self, since: date | None) -> None:
        if self.last is not None and self.start is None:
            self.r.notes.append("the chain starts at its genesis (seq 1)")
        if self.start is None:
            return
        name, seq, prev = self.start
        if since is not None:
            self.r.notes.append(
                f"verified from --since {since}: starts at seq {seq} in {name};"
                " earlier records not checked"
            )
            return
        pruned = self.pruned.get((seq - 1, prev))
        if pruned is not None:
            self.r.notes.append(
                f"starts after retention at seq {seq} in {name}: {_span(1, seq - 1)} were"
                f" deleted by retention (older than {reader.retention_age(pruned)})"
                f" at {pruned['time']}"
            )
            return
        earlier = [r for (n, _), r in self.pruned.items() if isinstance(n, int) and n < seq]
        if earlier:
            pruned = max(earlier, key=lambda r: r["through_seq"])
            through = pruned["through_seq"]
            if through == seq - 1:  # none missing: its link is not to what retention deleted
                message = (
                    f"the chain starts at seq {seq}, whose link to record {through} is not"
                    f" the hash retention recorded for it (at {pruned['time']}): the records"
                    " before it are not the ones retention deleted"
                )
            else:
                message = (
                    f"the chain starts at seq {seq}: {_span(through + 1, seq - 1)} missing"
                    f" before it; retention deleted only {_span(1, through)} (at"
                    f" {pruned['time']})"
                )
        else:
            message = (
                f"the chain starts at seq {seq}: {_span(1, seq - 1)} missing before it"
                " and no retention record explains it"
            )
        self.r.at_start = True
        raise _Tampered(Problem(name, 1, message))


def _line_of(file: reader.DayFile, seq: int, after: int) -> int | None:
    """The number of the line after line ``after`` that holds record ``seq``, if one
    does: read again only once the chain is found broken, to tell a record moved
    from one deleted."""
    try:
        for number, line in enumerate(reader.lines(file), 1):
            found = reader.SEQ.match(line) if number > after else None
            if found is not None and int(found.group(1)) == seq:
                return number
    except (OSError, EOFError, zlib.error):
        return None
    return None
