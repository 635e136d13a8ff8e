"""Finding records: filters, a message's timeline, and per-tenant reports.

Only ``received`` names the tenant, user and document type; later events
carry the queue ID (a ``rejected`` record, which has none, names its tenant
and user itself where the relay knew them). Filtering on those therefore
joins on the queue ID: the scan starts ``lookback_days`` before ``since`` so
a message received last month but bounced this week still counts, and in
those early files only the ``received`` lines that mention the tenant are
decoded. A failure notice
has no ``received`` record: it belongs to the tenant and user of the message
its ``notified`` record names, with type ``notice``, as in the report.

Speed comes from never decoding a line that cannot match: whole day files
outside the window are skipped by name, and every line must contain the
JSON text of each exact filter (``"event":"failed"``) before ``json.loads``
sees it. The decoded record is then checked exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from relay.audit import events, reader
from relay.identify import a_label_address

LOOKBACK_DAYS = 30
#: The operational log's Postfix words with no event of that name: a sysadmin
#: reading ``status=sent`` there searched for it here and was only refused.
LOG_WORDS = {"sent": " (the log's status=sent is delivered here)"}
_RECEIVED = b'"event":"received"'
_NOTIFIED = b'"event":"notified"'
_RELATIVE = re.compile(r"(\d+)([dhm])")
_TORN = reader.TORN_END.rstrip(b"\n")
_HEAD = re.compile(rb'"time":"([^"]*)","event":"([a-z_]+)","queue_id":(?:"([^"\\]*)"|null)')
_STRING = rb'"((?:[^"\\]|\\.)*)"'
_WHO = re.compile(rb'"tenant":%s,"user":%s,"doc_type":%s' % (_STRING, _STRING, _STRING))
_NOTICE = re.compile(rb'"notice_queue_id":"([^"\\]*)"')
# One record, one recipient; a ``deleted`` record names each recipient it removed.
COUNTED = {
    "delivered": "delivered",
    "failed": "failed",
    "expired": "expired",
    "bounced": "bounced",
    "suppressed": "suppressed",
    "complained": "complaints",
}
DELETED = "deleted"
LISTED = "listed"  # addresses the relay put on the suppression list
REPORT_COLUMNS = ("tenant", "doc_type", "sent", *COUNTED.values(), DELETED, LISTED)
#: The records the relay may write twice (docs/audit-log.md: after a crash, or a
#: failed fsync): the copy is the same record but for its seq, time, prev and hash.
REPEATABLE = frozenset({b"delivered", b"failed", b"expired", b"suppressed", b"notified", b"listed"})
#: How many outcomes after an outcome its copy can come: a restart rewrites
#: outcomes it read in the last 128 MiB of the log (relay.settle), records of
#: well over a hundred bytes each; a failed fsync's are rewritten within seconds.
REPEAT_SPAN = 1 << 20
_EVENT = b'"event":"'
_COUNTED_LATER = (b"deleted", b"listed")  # columns after the others, added since
_PREV = b',"prev":"'


class Repeats:
    """Tells a copy of an outcome the relay wrote again from the outcome itself,
    so each (message, recipient, attempt) counts once. Only the last
    ``REPEAT_SPAN`` outcomes are held: a year's search needs no more."""

    def __init__(self, span: int | None = REPEAT_SPAN) -> None:
        self._seen: set[bytes] = set()
        self._order: deque[bytes] = deque()
        self._span = span

    def copy(self, line: bytes) -> bool:
        """Whether the stored line (without its newline) repeats an outcome met before."""
        event = line.find(_EVENT) + len(_EVENT)
        if line[event : line.find(b'"', event)] not in REPEATABLE:
            return False
        return self.seen(line[event - len(_EVENT) : line.rfind(_PREV)])

    def seen(self, content: bytes) -> bool:
        """Whether ``content`` (a record from its event to its ``prev``) was met before."""
        digest = hashlib.blake2b(content, digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        if self._span is not None:
            self._order.append(digest)
            if len(self._order) > self._span:
                self._seen.discard(self._order.popleft())
        return False


def parse_when(
    text: str | date | None, *, end: bool = False, now: datetime | None = None
) -> datetime | None:
    """A point in time from the command line: a day, an ISO time, or ``7d``/``12h``/``30m`` ago.

    A bare day given as the end of a range includes that whole day, which
    is what ``--since 2024-05-01 --until 2024-05-07`` means to a person.
    """
    if text is None:
        return None
    try:
        moment = _parse_when(text, end=end, now=now)
        if moment is not None and not _EARLIEST <= moment.astimezone(UTC) <= _LATEST:
            raise OverflowError
    except OverflowError:
        raise OutOfRange(
            f"{text!r} is out of range: give a time between 0001-01-02 and 9999-12-30"
        ) from None
    return moment


class OutOfRange(ValueError):
    """A time the calendar holds no day for (``99999999d`` ago, the end of year 9999)."""


# A day's margin each side keeps the window's own arithmetic in range.
_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 31, tzinfo=UTC)  # the end of 9999-12-30


def _parse_when(
    text: str | date, *, end: bool = False, now: datetime | None = None
) -> datetime | None:
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    if isinstance(text, date):
        moment = datetime.combine(text, time(), UTC)
        return moment + timedelta(days=1) if end else moment
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[relative.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(relative.group(1))})
    day = _day(text.strip())
    if day is not None:
        return _parse_when(day, end=end)
    return _parse_when(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))


def _day(text: str) -> date | None:
    """A day without a time in any form ``date.fromisoformat`` reads (``20241204``
    too): ``datetime`` would take it as that day's midnight, and ``--until``
    would then leave the whole day out."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Window:
    since: str
    until: str
    first_day: date | None
    last_day: date | None

    @classmethod
    def of(cls, since: str | date | None, until: str | date | None) -> _Window:
        start, stop = parse_when(since), parse_when(until, end=True)
        last_day = None
        if stop is not None:
            last_day = (stop - timedelta(microseconds=1)).astimezone(UTC).date()
        return cls(
            events.timestamp(start) if start else "",
            events.timestamp(stop) if stop else "~",
            start.astimezone(UTC).date() if start else None,
            last_day,
        )

    def contains(self, record: dict[str, Any]) -> bool:
        return self.since <= str(record.get("time")) < self.until


def _back(day: date, days: int) -> date:
    """``days`` before ``day``, or the first day there is."""
    return day - timedelta(days=days) if day - date.min > timedelta(days=days) else date.min


def _text(value: str) -> bytes:
    """How a string appears inside the stored JSON, without its quotes."""
    return json.dumps(value, ensure_ascii=False)[1:-1].encode()


def _folded_part(needle: bytes) -> bytes:
    """The longest ASCII run of a lowered needle, to find in a lowered block:
    ``bytes.lower`` folds only ASCII, so ``MÜLLER`` in the log lowers to
    ``mÜller`` and a search for ``müller`` would pass its line over. The
    record found is checked as text, whole (``matches``)."""
    return max(re.split(rb"[\x80-\xff]+", needle.lower()), key=len)


def recipients_of(record: dict[str, Any]) -> list[str]:
    for key in ("recipient", "rcpt_tos", "recipients"):
        value = record.get(key)
        if value is not None:
            return [value] if isinstance(value, str) else list(value)
    return []


def search(
    directory: Path,
    since: str | date | None = None,
    until: str | date | None = None,
    tenant: str | None = None,
    user: str | None = None,
    recipient: str | None = None,
    doc_type: str | None = None,
    status: str | None = None,
    message_id: str | None = None,
    queue_id: str | None = None,
    *,
    lookback_days: int = LOOKBACK_DAYS,
) -> Iterator[dict[str, Any]]:
    """Records matching every given filter, in log order.

    ``status`` is an event name; ``recipient`` (case-insensitive) matches
    ``recipient``, ``rcpt_tos`` or ``recipients``; ``message_id`` matches
    with or without angle brackets.

    The join holds the queue IDs of the messages whose ``received`` record
    matched, and of their notices, met in their ``notified`` records (which
    come after the ``received``). For ``doc_type`` ``notice`` with a tenant or
    user, it holds that tenant's or user's messages as well, as a search on
    the tenant alone would, to know whose notice each link names.
    """
    if status is not None and status not in events.SCHEMA:
        hint = LOG_WORDS.get(status, "")
        raise ValueError(f"unknown status {status!r}{hint}: one of {', '.join(events.SCHEMA)}")
    _not_empty(
        queue_id=queue_id,
        message_id=message_id,
        recipient=recipient,
        tenant=tenant,
        user=user,
        doc_type=doc_type,
    )
    window = _Window.of(since, until)
    join = {k: v for k, v in (("tenant", tenant), ("user", user), ("doc_type", doc_type)) if v}
    joining = bool(join) and status != "received"
    join_needles = [b'"%s":"%s"' % (k.encode(), _text(v)) for k, v in join.items()]
    notices = joining and doc_type in (None, events.NOTICE_TYPE)
    senders = {k: v for k, v in join.items() if k != "doc_type"}
    needles = []
    if status is not None:
        needles.append(b'"event":"%s"' % status.encode())
    if queue_id is not None:
        needles.append(b'"queue_id":"%s"' % _text(queue_id))
    bare_id = _bare(message_id) if message_id is not None else None
    if bare_id is not None:
        needles.append(_text(bare_id))
    address = _address(recipient) if recipient is not None else None
    rcpt = address.lower() if address is not None else None
    rcpt_needle = _folded_part(_text(address)) if address is not None else b""

    def matches(record: dict[str, Any]) -> bool:
        return (
            window.contains(record)
            and (status is None or record.get("event") == status)
            and (queue_id is None or record.get("queue_id") == queue_id)
            and (bare_id is None or _bare(record.get("message_id")) == bare_id)
            and (rcpt is None or any(r.lower() == rcpt for r in recipients_of(record)))
        )

    # The rarest exact text drives the scan; the other filters check its lines.
    if queue_id is not None or bare_id is not None:
        driver: bytes | None = needles[1 if status is not None else 0]
    elif rcpt is not None:
        driver = rcpt_needle
    elif join and not joining:
        driver = join_needles[0]
    else:
        driver = needles[0] if needles else None
    lowered = rcpt is not None and driver is rcpt_needle

    wanted: set[str | None] = set()
    # Whose notices are wanted: the wanted messages, unless the type names the notices.
    parents = wanted if doc_type is None else set()
    parent_needles = join_needles[: len(senders)] if notices and parents is not wanted else None
    first = window.first_day
    rewritten: set[date] = set()  # days before the window whose outcomes may have copies in it
    if first is not None:
        rewritten = _rewritten_days(directory, first, _back(first, lookback_days))
        first = _back(first, lookback_days) if joining else min(rewritten, default=first)
    repeats = Repeats()
    for file in reader.day_files(directory, first, window.last_day, window.until):
        early = window.first_day is not None and file.day < window.first_day
        if early and not joining and file.day not in rewritten:
            continue
        for block in reader.chunks(file):
            low = block.lower() if rcpt is not None else block
            if early:
                starts: list[int] | None = []
                if file.day in rewritten:
                    starts = (
                        _starts(low if lowered else block, driver)
                        if driver is not None
                        else [i for event in REPEATABLE for i in _starts(block, _EVENT + event)]
                    )
                if joining:
                    starts += _starts(block, join_needles[0])
            elif driver is None:
                starts = None
            else:
                starts = _starts(low if lowered else block, driver)
                if joining:
                    starts = [*starts, *_starts(block, join_needles[0])]
            if notices and starts is not None:
                starts += _starts(block, _NOTIFIED)
            if (joining or early) and starts is not None:
                starts = sorted(set(starts))
            for start, line in _lines(block, starts):
                if join and _RECEIVED in line and _may_own(line, join_needles, parent_needles):
                    record = _decode(line)
                    if record is None:
                        continue
                    if parent_needles is not None and _owns(record, senders):
                        parents.add(record.get("queue_id"))
                    if not _owns(record, join):
                        continue
                    wanted.add(record.get("queue_id"))
                    if not early and matches(record):
                        yield record
                    continue
                if notices and _NOTIFIED in line:
                    notice = _notice_of(line, parents if senders else None)
                    if notice is not None:
                        wanted.add(notice)
                if not all(n in line for n in needles):
                    continue
                if rcpt is not None and rcpt_needle not in low[start : start + len(line)]:
                    continue
                if early:  # an outcome before the window: its copies in it are not listed
                    repeats.copy(line)
                    continue
                if joining:
                    head = _HEAD.search(line)
                    if head is None or (
                        head.group(2) != b"rejected"
                        and (head.group(3) or b"").decode() not in wanted
                    ):
                        continue
                record = _decode(line)
                if record is None:
                    continue
                if str(record.get("time", "")) < window.since:
                    repeats.copy(line)
                    continue
                if not matches(record):
                    continue
                if join and not _joined(record, join, wanted):
                    continue
                if repeats.copy(line):
                    continue
                yield record


def _rewritten_days(directory: Path, before: date, first: date) -> set[date]:
    """The days before ``before`` (from ``first``) whose outcomes a restart may
    have written again later: the day files within ``reader.REWRITE_REACH``
    bytes of the log before that day, as ``relay.settle`` reads no further back
    (a compressed file counted at ten times its size, about what gzip saves)."""
    days: set[date] = set()
    reach = reader.REWRITE_REACH
    for file in reversed(reader.day_files(directory, first, before - timedelta(days=1))):
        if reach <= 0:
            break
        days.add(file.day)  # compressed since, perhaps: its records were plain then
        with contextlib.suppress(OSError):  # compressed meanwhile: the .gz is read instead
            reach -= file.path.stat().st_size * (10 if file.compressed else 1)
    return days


def _bare(message_id: object) -> str:
    """A Message-ID without its brackets, and without what is around them: the
    space that records written before it was unfolded may hold (`` <id>``), and
    a comment an ERP writes after it (``<id> (generated by Sage)``), kept in the
    record as the message has it."""
    text = str(message_id or "")
    found = _MSG_ID.search(text)
    return found.group(1) if found else text.strip().strip("<>")


_MSG_ID = re.compile(r"<([^<>]*)>")


def _address(text: str) -> str:
    """An address as the records hold it: bare, though given as ``<a@b>``, the
    form of an envelope, a header and the records' own Message-IDs; its domain
    in the xn-- form the relay sends to (it takes no other), where a helpdesk
    pastes ``kunde@bücher.example`` from the customer's mail and found nothing."""
    text = text.strip()
    bare = text[1:-1].strip() if text.startswith("<") and text.endswith(">") else text
    return a_label_address(bare) or bare


def _may_own(line: bytes, needles: list[bytes], parent_needles: list[bytes] | None) -> bool:
    return all(n in line for n in needles) or (
        parent_needles is not None and all(n in line for n in parent_needles)
    )


def _owns(record: dict[str, Any], fields: dict[str, str]) -> bool:
    return all(record.get(k) == v for k, v in fields.items())


def _joined(record: dict[str, Any], join: dict[str, str], wanted: set[str | None]) -> bool:
    """Whether a record other than a ``received`` belongs to the messages
    searched for: a refusal by the sender it names (it has no queue ID to
    join on), any other by its message's."""
    if record.get("event") == "rejected":
        return _owns(record, join)
    return record.get("event") != "received" and record.get("queue_id") in wanted


def _notice_of(line: bytes, parents: set[str | None] | None) -> str | None:
    """The queue ID of the notice a ``notified`` line names, if it is about one
    of ``parents`` (None: about any message)."""
    head, link = _HEAD.search(line), _NOTICE.search(line)
    if head is None or head.group(2) != b"notified" or link is None:
        return None
    if parents is not None and (head.group(3) or b"").decode() not in parents:
        return None
    return _unescape(link.group(1))


def _not_empty(**given: str | None) -> None:
    """An empty value (an unset shell variable) drove the scan with an empty
    needle, found at every byte: the search ran until memory ran out. An
    empty tenant, user or type was no filter at all: every record matched."""
    for name, value in given.items():
        if value is not None and not value.strip().strip("<>"):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is empty: give the value to look for, or leave it out")


def _starts(block: bytes, needle: bytes) -> list[int]:
    """Where each line containing ``needle`` begins."""
    found = []
    position = block.find(needle)
    while position >= 0:
        found.append(block.rfind(b"\n", 0, position) + 1)
        position = block.find(needle, block.index(b"\n", position))
    return found


def _lines(block: bytes, starts: list[int] | None) -> Iterator[tuple[int, bytes]]:
    """The lines at ``starts`` (every line when None), without their newline."""
    if starts is None:
        start = 0
        for line in block.split(b"\n")[:-1]:
            yield start, line
            start += len(line) + 1
        return
    for start in starts:
        yield start, block[start : block.index(b"\n", start)]


def _unescape(text: bytes) -> str:
    return json.loads(b'"%s"' % text) if b"\\" in text else text.decode()


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def show(
    directory: Path,
    ident: str,
    since: str | date | None = None,
    until: str | date | None = None,
) -> list[dict[str, Any]]:
    """Every record of a message, by queue ID (in any case, as the queue tools
    take it) or Message-ID, in log order.

    A failure notice's story includes the ``notified`` record that links it to
    the message it is about: it is the notice's only record of where it came
    from. Found by the notice's Message-ID, the link comes before the records
    that name the notice's queue ID, so a second pass looks for it.
    """
    bare = _bare(ident)
    if not bare:
        return []
    window = _Window.of(since, until)
    queue_id = bare.upper()
    needles = {_text(bare), _text(queue_id)}
    found = _show_scan(directory, window, needles, queue_id, bare, {queue_id})
    unlinked = _unlinked(found)
    if unlinked:
        needles = {b'"notice_queue_id":"%s"' % _text(q) for q in unlinked}
        links = _show_scan(directory, window, needles, None, None, unlinked)
        found = sorted([*found, *links], key=lambda r: r.get("seq") or 0)
    return found


def _show_scan(
    directory: Path,
    window: _Window,
    needles: set[bytes],
    queue_id: str | None,
    bare: str | None,
    notices: set[str],
) -> list[dict[str, Any]]:
    """The records of ``queue_id`` or of Message-ID ``bare``, and the links to
    the notices named in ``notices``."""
    found = []
    repeats = Repeats(span=None)  # one message's records: all of them held
    for file in reader.day_files(directory, window.first_day, window.last_day, window.until):
        for block in reader.chunks(file):
            starts = sorted({s for n in needles for s in _starts(block, n)})
            for _, line in _lines(block, starts):
                record = _decode(line)
                if record is None or not window.contains(record) or repeats.copy(line):
                    continue
                message_id = _bare(record.get("message_id"))
                link = record.get("notice_queue_id") if record.get("event") == "notified" else None
                if (
                    (queue_id is not None and record.get("queue_id") == queue_id)
                    or (bare is not None and message_id == bare)
                    or link in notices
                ):
                    found.append(record)
    return found


def _unlinked(records: list[dict[str, Any]]) -> set[str]:
    """Queue IDs found with neither a ``received`` record nor a link: perhaps notices."""
    told = {r.get("queue_id") for r in records if r.get("event") == "received"}
    told |= {r.get("notice_queue_id") for r in records if r.get("event") == "notified"}
    return {q for r in records if isinstance(q := r.get("queue_id"), str) and q not in told}


class Owners:
    """The tenant, user and type of later events, for the table, read in step with the search.

    A second reader follows the ``received`` lines in log order, as far as the
    last record asked about (by ``seq``: a message is received before anything
    else happens to it), and forgets messages received more than
    ``lookback_days`` before the day of the record asked about. What it holds is
    bounded by the log's traffic over the look-back, not by how many records
    matched: a year's search needs no more than a month's. A failure notice,
    which has no ``received`` record, is known from its ``notified`` link
    and held as long: its type is ``notice``, its tenant and user those of the
    message it is about (unknown when that was received before the look-back).
    """

    def __init__(
        self,
        directory: Path,
        since: str | date | None = None,
        until: str | date | None = None,
        *,
        lookback_days: int = LOOKBACK_DAYS,
    ) -> None:
        window = _Window.of(since, until)
        first = _back(window.first_day, lookback_days) if window.first_day else None
        self._ahead = _owner_lines(directory, first, window.last_day, window.until)
        self._next: _OwnerLine | None = None
        self._known: dict[str, tuple[str, _Who]] = {}
        self._order: deque[tuple[str, str]] = deque()
        self._lookback_days = lookback_days
        self._day, self._since = "", ""

    def __call__(self, record: dict[str, Any]) -> dict[str, str | None] | None:
        """The owner of ``record``'s message; ask in log order."""
        seq, queue_id = record.get("seq"), record.get("queue_id")
        horizon = self._horizon(str(record.get("time"))[:10])
        if isinstance(seq, int):
            self._read_through(seq, horizon)
        self._forget_before(horizon)
        known = self._known.get(queue_id) if isinstance(queue_id, str) else None
        if known is None:
            return None
        return dict(zip(("tenant", "user", "doc_type"), known[1], strict=True))

    def _horizon(self, day: str) -> str:
        """The earliest time a message ``day``'s events can come from, as text."""
        if day != self._day:
            try:
                self._day = day
                self._since = _back(date.fromisoformat(day), self._lookback_days).isoformat()
            except ValueError:
                self._since = ""
        return self._since

    def _read_through(self, seq: int, horizon: str) -> None:
        """Messages received before ``horizon`` are passed over, not held: the
        first record asked about may come a year into the search."""
        while True:
            if self._next is None:
                self._next = next(self._ahead, None)
                if self._next is None:
                    return
            line_seq, moment, queue_id, who = self._next
            if line_seq > seq:
                return
            if moment >= horizon:
                if isinstance(who, _About):
                    parent = self._known.get(who.queue_id)
                    tenant, user = parent[1][:2] if parent else (None, None)
                    who = (tenant, user, events.NOTICE_TYPE)
                self._known[queue_id] = (moment, who)
                self._order.append((moment, queue_id))
            self._next = None

    def _forget_before(self, horizon: str) -> None:
        while self._order and self._order[0][0] < horizon:
            moment, queue_id = self._order.popleft()
            known = self._known.get(queue_id)
            if known is not None and known[0] == moment:
                del self._known[queue_id]


@dataclass(frozen=True)
class _About:
    """A notice's owner is its message's: ``queue_id`` names that message."""

    queue_id: str


_Who = tuple[str | None, str | None, str]
_OwnerLine = tuple[int, str, str, "_Who | _About"]


def _owner_lines(
    directory: Path, first: date | None, last: date | None, before: str
) -> Iterator[_OwnerLine]:
    """seq, time, queue ID and (tenant, user, type) of each ``received`` line, and
    of each notice a ``notified`` line names (the message it is about), in log
    order, without decoding the rest of the line."""
    for file in reader.day_files(directory, first, last, before):
        for block in reader.chunks(file):
            starts = sorted([*_starts(block, _RECEIVED), *_starts(block, _NOTIFIED)])
            for _, line in _lines(block, starts):
                seq, head = reader.SEQ.match(line), _HEAD.search(line)
                if seq is None or head is None or head.group(3) is None or _torn(line, head):
                    continue
                found = _owner_of(head, line)
                if found is not None:
                    yield (int(seq.group(1)), head.group(1).decode(), *found)


def _owner_of(head: re.Match[bytes], line: bytes) -> tuple[str, _Who | _About] | None:
    if head.group(2) == b"notified":
        link = _NOTICE.search(line, head.end())
        if link is None:
            return None
        return _unescape(link.group(1)), _About(head.group(3).decode())
    who = _WHO.search(line, head.end())
    if head.group(2) != b"received" or who is None:
        return None
    return head.group(3).decode(), (
        sys.intern(_unescape(who.group(1))),
        sys.intern(_unescape(who.group(2))),
        sys.intern(_unescape(who.group(3))),
    )


def _removed(block: bytes, head: re.Match[bytes]) -> int:
    """How many recipients the ``deleted`` record at ``head`` names: deletions are
    rare, so the line is decoded."""
    start = block.rfind(b"\n", 0, head.start()) + 1
    record = _decode(block[start : block.index(b"\n", head.end())])
    recipients = record.get("recipients") if record is not None else None
    return len(recipients) if isinstance(recipients, list) else 0


def _torn(block: bytes, head: re.Match[bytes]) -> bool:
    """Whether the line of ``head`` is one a crash cut off, which the writer ended
    (``reader.TORN_END``): no record, as verify, search and show take it."""
    end = block.find(b"\n", head.end())
    end = len(block) if end < 0 else end
    return block.endswith(_TORN, 0, end)


def _repeated(repeats: Repeats, block: bytes, head: re.Match[bytes]) -> bool:
    end = block.rfind(_PREV, head.end(), block.index(b"\n", head.end()))
    return repeats.seen(block[head.start(2) - len(_EVENT) : end])


def report(
    directory: Path,
    since: str | date | None = None,
    until: str | date | None = None,
    *,
    lookback_days: int = LOOKBACK_DAYS,
) -> list[dict[str, Any]]:
    """Counts per tenant and document type, one row each, sorted.

    ``sent`` counts messages received in the window; the other columns
    count per-recipient events in the window, attributed through their
    queue ID to the message's tenant and type (``?`` when its ``received``
    record is older than the look-back). A failure notice has no ``received``
    record: its ``notified`` record names it, and it counts as a ``notice`` of
    the tenant of the message it is about. ``deleted`` counts the recipients
    ``relay queue delete`` removed before they were delivered: at the end, not
    beside the other final states, so the columns scripts know keep their
    places. A bounce or complaint with no queue ID (``relay bounce`` found no
    message, or several tenants') counts nowhere: anyone can write one, and
    a forged report naming thousands swelled the ``?`` row.
    """
    window = _Window.of(since, until)
    first = _back(window.first_day, lookback_days) if window.first_day else None
    owner: dict[str, tuple[str, str]] = {}
    counts: dict[tuple[str, str], Counter[str]] = {}
    unowned: dict[str, Counter[str]] = {}  # attributed at the end: a link may come later
    repeats = Repeats()  # the early days' outcomes too: a copy in the window counts not
    for file in reader.day_files(directory, first, window.last_day, window.until):
        early = window.first_day is not None and file.day < window.first_day
        for block in reader.chunks(file):
            for head in _HEAD.finditer(block):
                event = head.group(2)
                if _torn(block, head):
                    continue
                if event in REPEATABLE and _repeated(repeats, block, head):
                    continue
                if event == b"received":
                    owner_of = _WHO.search(block, head.end(), block.index(b"\n", head.end()))
                    if owner_of is None:
                        continue
                    key = (_unescape(owner_of.group(1)), _unescape(owner_of.group(3)))
                    owner[(head.group(3) or b"").decode()] = key
                    if not early and window.since <= head.group(1).decode() < window.until:
                        counts.setdefault(key, Counter())["sent"] += 1
                elif event == b"notified":
                    link = _NOTICE.search(block, head.end(), block.index(b"\n", head.end()))
                    if link is not None:
                        about = owner.get((head.group(3) or b"").decode(), ("?", "?"))
                        owner[link.group(1).decode()] = (about[0], events.NOTICE_TYPE)
                elif not early and (event.decode() in COUNTED or event in _COUNTED_LATER):
                    if not window.since <= head.group(1).decode() < window.until:
                        continue
                    if head.group(3) is None:  # a report about no message of the relay's
                        continue
                    queue_id = (head.group(3) or b"").decode()
                    key = owner.get(queue_id)
                    tally = (
                        counts.setdefault(key, Counter())
                        if key
                        else unowned.setdefault(queue_id, Counter())
                    )
                    if event == b"deleted":
                        tally[DELETED] += _removed(block, head)
                    elif event == b"listed":
                        tally[LISTED] += 1
                    else:
                        tally[COUNTED[event.decode()]] += 1
    for queue_id, tally in unowned.items():
        counts.setdefault(owner.get(queue_id, ("?", "?")), Counter()).update(tally)
    rows = []
    for (tenant, doc_type), counter in sorted(counts.items()):
        row: dict[str, Any] = {"tenant": tenant, "doc_type": doc_type}
        row.update({c: counter[c] for c in REPORT_COLUMNS[2:]})
        rows.append(row)
    return rows
