"""The sysadmin's queue commands, shaped after Postfix's postqueue and postsuper.

Output mimics ``mailq`` and ``postqueue -j`` so habits and scripts carry
over. Every change takes the entry's lock without waiting: an entry being
delivered right now is reported and skipped rather than stalling the command
behind a slow upstream; an error only when named, so that ``hold ALL`` from
cron does not fail on a queue that is busy. The commands that change entries return the entries
they changed so the caller can write the audit record of who did what; delete,
hold and release have it written under the entry's lock: a deletion's before
the message goes, a hold's or release's once it is stored, and a change the
audit log refuses is undone.
Given who ran them, they leave a note of each change for the relay's log.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import BinaryIO, NamedTuple, TextIO

from relay.audit import AuditError
from relay.headers import signature_tags
from relay.listinput import read_lines
from relay.quantity import quantity
from relay.queueid import queue_id_time
from relay.spool.entry import QueueEntry
from relay.spool.notes import Notes
from relay.spool.store import NO_ENTRY, NoSuchEntry, NotAPlainFile, Spool, SpoolBusy, SpoolError

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# a subject or a reply in the record: JSON escapes what is below 0x20 only
_C1 = re.compile(r"[\x7f-\x9f\u2028\u2029]")
_NOT_ASCII = re.compile(r"[^\x00-\x7e]")
_ID_WIDTH = 17  # 16-character ID and the hold mark
_WHEN_WIDTH = 26  # mailq's 20, and the UTC offset
_RCPT_INDENT = " " * (_ID_WIDTH + 8 + 1 + _WHEN_WIDTH + 1)
_HEADER = (
    f"{'-Queue ID-':<{_ID_WIDTH}}{'--Size--':>8} {'-------Arrival Time-------':<{_WHEN_WIDTH}}"
    " -Sender/Recipient-------"
)
_MAX_HEADER_BYTES = 1 << 20
#: A worker holds the lock while it delivers, and, for as long as the disk
#: refuses, while it keeps an entry whose last attempt the audit log or the
#: spool did not take: "being delivered right now" said so for hours then.
LOCKED = (
    "locked by the relay: being delivered right now, or kept until the audit log"
    " or the spool takes what its last attempt did (the relay's log says which)"
)
_MAX_SIGNATURE_LINE = 8192


class Outcome(NamedTuple):
    """Exit code for the shell, and the entries actually changed, for the audit log."""

    code: int
    entries: list[QueueEntry]


class _Skip(Exception):
    """This entry is left as it is; an error only if the user named it."""


def list_queue(spool: Spool, out: TextIO, *, as_json: bool = False) -> int:
    """``relay queue list [--json]``: like ``mailq`` / ``postqueue -j``. An entry
    whose record cannot be read is listed as unreadable, with why, and counted:
    ``relay status`` and the metrics count it, and the listing left it out.
    Each entry is written as it is read: with 50,000 queued, ``| head`` waited
    for all of them (3 to 6 s), and the listing held them all (150 MB)."""
    items = (
        entry if isinstance(entry, QueueEntry) else _Unreadable.of(spool, queue_id, entry)
        for queue_id, entry in spool.loaded()
    )
    if as_json:
        for item in items:
            out.write(json.dumps(_json_line(spool, item)) + "\n")
        return 0
    count = total = 0
    for item in items:
        if not count:
            out.write(_HEADER + "\n")
        count, total = count + 1, total + item.size
        if isinstance(item, _Unreadable):
            item.write(out)
        else:
            _write_entry(item, out)
    if not count:
        out.write("Mail queue is empty\n")
        return 0
    out.write(f"-- {total // 1024} Kbytes in {quantity(count, 'Request')}.\n")
    return 0


def _json_line(spool: Spool, item: QueueEntry | _Unreadable) -> dict[str, object]:
    if isinstance(item, _Unreadable):
        return item.json_record()
    record = _json_record(item)
    record["dkim"] = _signed_with(spool, item)
    return record


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    """An entry in the queue whose record cannot be read, as far as the spool
    tells without it: its file's size and whether its record changed, as
    ``Spool.census`` counts it, and its arrival from its queue ID."""

    queue_id: str
    error: SpoolError
    size: int
    changed: bool

    @classmethod
    def of(cls, spool: Spool, queue_id: str, error: SpoolError) -> _Unreadable:
        try:
            size = os.stat(spool.message_path(queue_id)).st_size
        except OSError:
            size = 0
        return cls(queue_id, error, size, spool.changed(queue_id))

    def json_record(self) -> dict[str, object]:
        """``_json_record``'s keys, those the record would give null, and why."""
        arrival = queue_id_time(self.queue_id)
        return {
            "queue_name": "deferred" if self.changed else "active",
            "queue_id": self.queue_id,
            "arrival_time": None if arrival is None else int(arrival),
            "next_attempt_time": None,
            "message_size": self.size,
            "sender": None,
            "recipients": [],
            "tenant": None,
            "user": None,
            "doc_type": None,
            "upstream": None,
            "dkim": [],
            "unreadable": str(self.error),
        }

    def write(self, out: TextIO) -> None:
        arrival = queue_id_time(self.queue_id)
        when = "" if arrival is None else _when(arrival)
        out.write(
            f"{self.queue_id:<{_ID_WIDTH}}{self.size:>8} {when:<{_WHEN_WIDTH}}"
            " (unreadable queue entry)\n"
            f"{' ' * _ID_WIDTH}({_printable(str(self.error))})\n\n"
        )


def _json_record(entry: QueueEntry) -> dict[str, object]:
    recipients: list[dict[str, str]] = []
    for rcpt in entry.pending():
        # Like postqueue -j, delay_reason is absent until an attempt gave one.
        item = {"address": rcpt.address}
        if rcpt.reply:
            item["delay_reason"] = rcpt.reply
        recipients.append(item)
    return {
        "queue_name": _queue_name(entry),
        "queue_id": entry.queue_id,
        "arrival_time": int(entry.arrival),
        # 0 is `relay queue retry`'s "due now"; epoch 0 would read as decades overdue
        "next_attempt_time": int(_next_attempt(entry, time.time()) or time.time()),
        "message_size": entry.size,
        "sender": entry.mail_from,
        "recipients": recipients,
        "tenant": entry.tenant,
        "user": entry.user,
        "doc_type": entry.doc_type,
        "upstream": entry.upstream,
    }


def _signed_with(spool: Spool, entry: QueueEntry) -> list[str]:
    """The ``domain/selector`` of each DKIM signature the message waits with: it
    is sent with them however late, so an old selector's DNS record is needed
    until no message lists it. A notice the relay signs anew as it sends it
    (``relay bounce``'s) lists those it is stored with too: where it cannot
    be signed anew it goes with them. Empty for an entry gone meanwhile, as
    for an unsigned message: a script reads one shape."""
    try:
        with spool.open_message(entry.queue_id) as message:
            fields = _leading_signatures(message)
    except SpoolError:
        return []
    return [_signer(field) for field in fields]


def _leading_signatures(message: BinaryIO) -> list[bytes]:
    """The DKIM-Signature fields' values the message begins with, where the relay
    puts its own; read a line at a time, so a listing reads no message whole.
    Its ``Received`` field comes next, so an ERP's own signature, below it, is
    not read as the relay's."""
    fields: list[bytes] = []
    while line := message.readline(_MAX_SIGNATURE_LINE):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        elif line[:15].lower() == b"dkim-signature:":
            fields.append(line[15:])
        else:
            break
    return fields


def _signer(field: bytes) -> str:
    tags = signature_tags(field.decode("ascii", "replace"))
    return f"{tags.get('d', '')}/{tags.get('s', '')}"


def _next_attempt(entry: QueueEntry, now: float) -> float:
    """The stored next attempt, or for an entry stored before the clock was set
    back the latest the engine tries it: its wait from now."""
    wait = entry.wait_after_step(now)
    return entry.next_attempt if wait is None else now + wait


def _queue_name(entry: QueueEntry) -> str:
    """postqueue -j's names: what monitoring that counts deferred mail expects."""
    if entry.held:
        return "hold"
    if entry.attempts or any(rcpt.reply for rcpt in entry.pending()):
        return "deferred"
    return "active"


def _write_entry(entry: QueueEntry, out: TextIO) -> None:
    mark = "!" if entry.held else " "
    sender = _printable(entry.mail_from) or "MAILER-DAEMON"
    out.write(
        f"{entry.queue_id + mark:<{_ID_WIDTH}}{entry.size:>8}"
        f" {_when(entry.arrival):<{_WHEN_WIDTH}} {sender}\n"
    )
    last_reason = None
    for rcpt in entry.pending():
        if rcpt.reply and rcpt.reply != last_reason:
            out.write(f"{' ' * _ID_WIDTH}({_printable(rcpt.reply)})\n")
        last_reason = rcpt.reply
        out.write(f"{_RCPT_INDENT}{_printable(rcpt.address)}\n")
    now = time.time()
    wait = entry.wait_after_step(now)
    if not entry.held and wait is not None:
        out.write(
            f"{' ' * _ID_WIDTH}(next attempt at most {round(wait)} s after the relay saw it:"
            f" stored before the clock was set back, as {_when(entry.next_attempt)})\n"
        )
    elif not entry.held and entry.next_attempt > now:
        out.write(f"{' ' * _ID_WIDTH}(next attempt {_when(entry.next_attempt)})\n")
    out.write("\n")


def _when(epoch: float) -> str:
    """asctime's layout, as mailq prints it, and the UTC offset, as the relay's
    log has it: ``Sun Oct 25 02:30:00 +0200``. In the hour a fall back to
    winter time repeats, mailq's time named two moments, an hour apart."""
    t = time.localtime(epoch)
    return f"{time.strftime('%a %b', t)} {t.tm_mday:2d} {time.strftime('%H:%M:%S %z', t)}"


def _printable(text: str) -> str:
    """Addresses and upstream replies come from outside; no escape sequences reach the tty."""
    return _CONTROL.sub("?", text)


RESIGNED = (
    "(relay bounce signed this notice with the policy file's keys; the running relay"
    " signs it anew with its own as it sends it, in place of the DKIM-Signature fields"
    " below, and where it cannot, sends it with them)"
)


def show(spool: Spool, queue_id: str, out: TextIO, err: TextIO) -> int:
    """``relay queue show ID``: the record and the message headers, never the body."""
    queue_id = _normalise(queue_id)
    try:
        entry = spool.load(queue_id)
        headers = _read_headers(spool, queue_id)
    except SpoolError as exc:
        _report(err, spool, queue_id, exc)
        return 1
    record = _readable(json.loads(entry.to_json()))
    out.write(_json_for(out, json.dumps(record, indent=2, ensure_ascii=False)) + "\n\n")
    if entry.sign_again is not None:
        out.write(RESIGNED + "\n\n")
    text = headers.decode("utf-8", errors="replace").replace("\r\n", "\n")
    out.write(_CONTROL_BUT_NEWLINE.sub("?", text))
    return 0


def _json_for(out: TextIO, text: str) -> str:
    """JSON all the same on a terminal: control characters as JSON's escapes,
    and on one that is not UTF-8 every character past ASCII too, as jq reads
    its input as UTF-8: a Latin-1 locale wrote an emoji as Python's
    ``\\U0001f600``, which jq refuses, and ``ü`` as a byte it garbled."""
    encoding = codecs.lookup(getattr(out, "encoding", None) or "utf-8").name
    outside = _C1 if encoding == "utf-8" else _NOT_ASCII
    return outside.sub(lambda found: json.dumps(found.group())[1:-1], text)


def _readable(record: dict[str, object]) -> dict[str, object]:
    """Each epoch time followed by the same time as local ISO 8601 (``arrival_local``);
    the numbers stay as they are for scripts."""
    shown: dict[str, object] = {}
    for key, value in record.items():
        shown[key] = value
        if key in ("arrival", "next_attempt", "updated") and isinstance(value, float | int):
            shown[f"{key}_local"] = _iso(value)
        elif key == "recipients" and isinstance(value, list):
            shown[key] = [_readable(item) for item in value]
    return shown


def _iso(epoch: float) -> str:
    """``now`` for an entry made due at once (``retry`` sets its next attempt to 0)."""
    if epoch <= 0:
        return "now"
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _read_headers(spool: Spool, queue_id: str) -> bytes:
    lines = []
    with spool.open_message(queue_id) as message:
        size = 0
        for line in message:
            if line in (b"\r\n", b"\n") or size > _MAX_HEADER_BYTES:
                break
            lines.append(line)
            size += len(line)
    return b"".join(lines)


#: Makes a deletion durable on record before the entry goes: given the queue ID
#: and the entry (None when its record is unreadable); raising keeps the entry.
Record = Callable[[str, QueueEntry | None], None]


def delete(
    spool: Spool,
    targets: Sequence[str],
    out: TextIO,
    err: TextIO,
    stdin: TextIO | None = None,
    *,
    record: Record,
    by: str | None = None,
) -> Outcome:
    """``relay queue delete ID...|-|ALL``: the returned entries are gone for good.

    Each is recorded first, under its lock: a message removed with no record
    would end nowhere in the audit log, while a record whose removal then
    fails is followed by the message's real end when it comes.
    """
    unreadable: list[str] = []
    outcome = _each(
        spool, targets, err, stdin, lambda entry: True, remove=record, unreadable=unreadable
    )
    _tell(spool, err, "delete", by, [e.queue_id for e in outcome.entries] + unreadable)
    _summary(out, "Deleted", outcome, len(unreadable))
    return outcome


def retry(
    spool: Spool,
    targets: Sequence[str],
    out: TextIO,
    err: TextIO,
    stdin: TextIO | None = None,
    *,
    by: str | None = None,
) -> Outcome:
    """``relay queue retry ID|ALL``: due now, and a running daemon is woken to try."""

    def change(entry: QueueEntry) -> bool:
        if entry.held:
            raise _Skip("on hold; release it first")
        entry.next_attempt = 0.0
        return True

    outcome = _each(spool, targets, err, stdin, change)
    _tell(spool, err, "retry", by, [e.queue_id for e in outcome.entries])
    return _finish(spool, out, err, "Scheduled for retry", outcome)


def hold(
    spool: Spool,
    targets: Sequence[str],
    out: TextIO,
    err: TextIO,
    stdin: TextIO | None = None,
    *,
    record: Record | None = None,
    by: str | None = None,
) -> Outcome:
    """``relay queue hold ID...``: kept, but not delivered until released. Each
    hold is ``record``ed once stored: a message delivered late with nothing in
    the audit log to say why is a gap an auditor cannot explain."""

    def change(entry: QueueEntry) -> bool:
        was, entry.held = entry.held, True
        return not was

    outcome = _each(
        spool, targets, err, stdin, change, record=record, verb="held", unchanged="already on hold"
    )
    _tell(spool, err, "hold", by, [e.queue_id for e in outcome.entries])
    _summary(out, "Placed on hold", outcome)
    return outcome


def release(
    spool: Spool,
    targets: Sequence[str],
    out: TextIO,
    err: TextIO,
    stdin: TextIO | None = None,
    *,
    record: Record | None = None,
    by: str | None = None,
) -> Outcome:
    """``relay queue release ID...``: back in the queue at its scheduled time,
    ``record``ed once stored, as ``hold`` is."""

    def change(entry: QueueEntry) -> bool:
        was, entry.held = entry.held, False
        return was

    outcome = _each(
        spool, targets, err, stdin, change, record=record, verb="released", unchanged="not on hold"
    )
    _tell(spool, err, "release", by, [e.queue_id for e in outcome.entries])
    return _finish(spool, out, err, "Released from hold", outcome)


def _tell(spool: Spool, err: TextIO, verb: str, by: str | None, queue_ids: list[str]) -> None:
    """Notes for the running relay's log (``relay.spool.notes``), when ``by`` says
    who acted. Done and on record in the audit log all the same when they
    cannot be left: said, and the exit status is not changed for it."""
    if by is None:
        return
    try:
        Notes(spool).leave(queue_ids, verb, by)
    except SpoolError as exc:
        err.write(f"relay queue: the relay's log will not say so: {exc}\n")


def _finish(spool: Spool, out: TextIO, err: TextIO, verb: str, outcome: Outcome) -> Outcome:
    """The daemon is woken before the summary is written: the changes are made,
    and output that cannot be written (exit 74) left them to its next scan."""
    woken = True
    if outcome.entries:
        try:
            spool.kick()
        except SpoolError as exc:
            err.write(f"relay queue: could not wake the daemon: {exc}\n")
            woken = False
    _summary(out, verb, outcome)
    return outcome if woken else Outcome(1, outcome.entries)


def _each(
    spool: Spool,
    targets: Sequence[str],
    err: TextIO,
    stdin: TextIO | None,
    change: Callable[[QueueEntry], bool],
    *,
    remove: Record | None = None,
    unreadable: list[str] | None = None,
    record: Record | None = None,
    verb: str = "deleted",
    unchanged: str | None = None,
) -> Outcome:
    """Apply ``change`` to each target under its lock; ``change`` says whether it did anything.
    With ``remove`` each changed entry is recorded by it, then removed, and so is
    one whose record cannot be read (its ID goes into ``unreadable``). With
    ``record``, each changed entry is stored, then recorded by it. ``unchanged``
    is said of a named entry ``change`` left as it was: a summary of 0 messages
    alone did not say why. Not an error: a hold asked twice is done."""
    code = 0
    changed: list[QueueEntry] = []
    # all read first: IDs on stdin that cannot be read stop the command before
    # it changes what was named before them
    for queue_id, named in list(_resolve(spool, targets, stdin)):
        try:
            with spool.lock(queue_id, blocking=False):
                try:
                    entry = spool.load(queue_id)
                except SpoolError as exc:
                    if remove is None or isinstance(exc, NoSuchEntry | NotAPlainFile):
                        raise
                    # A damaged record must still be deletable; there is no entry to return.
                    remove(queue_id, None)
                    spool.remove(queue_id)
                    err.write(f"{queue_id}: deleted an unreadable record ({exc.strerror})\n")
                    if unreadable is not None:
                        unreadable.append(queue_id)
                    continue
                was = dataclasses.replace(entry)
                if not change(entry):
                    if named and unchanged is not None:
                        err.write(f"{queue_id}: {unchanged}, left as it was\n")
                    continue
                if remove is not None:
                    _remove(spool, entry, remove)
                elif record is not None:
                    _store(spool, entry, was, record)
                else:
                    spool.update(entry)
                changed.append(entry)
        except _Skip as skip:
            if named:
                err.write(f"{_printable(queue_id)}: {skip}\n")
                code = 1
        except NoSuchEntry as exc:
            # Under ALL an entry finishing meanwhile is not an error.
            if named:
                _report(err, spool, queue_id, exc)
                code = 1
        except SpoolBusy:
            # Under ALL, as postsuper: what was there to do is done; this one is
            # either delivered now or left queued as it was, and said so.
            if named:
                err.write(f"{queue_id}: {LOCKED}; skipped, try again\n")
                code = 1
            else:
                err.write(
                    f"{queue_id}: {LOCKED}; skipped: delivered now, or left queued as it was"
                    " (name it to try again)\n"
                )
        except NotAPlainFile as exc:
            # no entry: left for the sysadmin, also by delete, as the listings leave it
            if named:
                _report(err, spool, queue_id, exc)
                code = 1
            else:
                err.write(f"{queue_id} skipped unreadable queue entry: {exc}\n")
        except SpoolError as exc:
            _report(err, spool, queue_id, exc)
            code = 1
        except AuditError as exc:
            err.write(
                f"{queue_id}: not {verb}, the audit log cannot record it: {exc} (left as it was)\n"
            )
            code = 1
        except _Unrecorded as exc:
            err.write(f"{queue_id}: {exc}\n")
            code = 1
            if exc.changed is not None:
                changed.append(exc.changed)
    return Outcome(code, changed)


class _Unrecorded(Exception):
    """A change the audit log refused to record, which could not be undone
    either: the message says what state the entry is left in. ``changed`` is
    the entry when the change stands."""

    def __init__(
        self, state: str, refused: AuditError, undo: SpoolError, changed: QueueEntry | None
    ) -> None:
        super().__init__(
            f"{state}, with no record of it: the audit log cannot record it ({refused}),"
            f" and putting it back failed ({undo})"
        )
        self.changed = changed


def _store(spool: Spool, entry: QueueEntry, was: QueueEntry, record: Record) -> None:
    """Stored, then recorded: recorded first, a change whose storing then failed
    (a full disk, an immutable ``env/``) was in the audit log while the message
    stayed held, or was delivered. One the audit log refuses is put back."""
    spool.update(entry)
    try:
        record(entry.queue_id, entry)
    except AuditError as refused:
        _put_back(spool, was, refused, "held" if entry.held else "released", entry)
        raise


def _remove(spool: Spool, entry: QueueEntry, record: Record) -> None:
    """Recorded, then removed; put on hold first. A deletion cut off between
    its record and the removal (the tool killed) left the message queued, and
    the daemon sent what the audit log said was deleted: held, it is not sent,
    and ``relay queue list`` shows it to delete again. A record the audit log
    refuses leaves it as it was."""
    if not entry.held:
        spool.update(dataclasses.replace(entry, held=True))
    try:
        record(entry.queue_id, entry)
    except AuditError as refused:
        if not entry.held:
            _put_back(spool, entry, refused, "not deleted but held")
        raise
    spool.remove(entry.queue_id)


def _put_back(
    spool: Spool,
    was: QueueEntry,
    refused: AuditError,
    state: str,
    changed: QueueEntry | None = None,
) -> None:
    """The entry as it was before a change the audit log refused; where that
    cannot be stored either, the change stands unrecorded, and is said so."""
    try:
        spool.update(was)
    except SpoolError as undo:
        raise _Unrecorded(state, refused, undo, changed) from refused


def _resolve(
    spool: Spool, targets: Sequence[str], stdin: TextIO | None
) -> Iterator[tuple[str, bool]]:
    """IDs with whether the user named them; ``ALL`` and ``-`` as in postsuper."""
    seen: set[str] = set()
    for target in targets:
        if target == "ALL":
            found = [(queue_id, False) for queue_id in spool.ids()]
        elif target.strip().upper() == "ALL":
            found = [(target.strip(), True)]  # as typed: refused, and said how to write it
        elif target == "-":
            found = [(_normalise(line), True) for line in read_lines(stdin or sys.stdin)]
        else:
            found = [(_normalise(target), True)]
        for queue_id, named in found:
            if queue_id not in seen:
                seen.add(queue_id)
                yield queue_id, named


def _normalise(text: str) -> str:
    """Accept IDs pasted from ``mailq`` output: any case, with the ``!``/``*`` mark."""
    return text.strip().rstrip("!*").upper()


def _report(err: TextIO, spool: Spool, queue_id: str, exc: SpoolError) -> None:
    if isinstance(exc, NoSuchEntry):
        said = f"{queue_id}: {exc.strerror}{_looked_in(spool, exc)}{_all_hint(queue_id)}"
        err.write(f"{_printable(said)}\n")
    else:
        err.write(f"{_printable(queue_id)}: {exc}\n")


def _looked_in(spool: Spool, exc: NoSuchEntry) -> str:
    """Another relay's policy file (staging's, meaning production's) said only
    "no such queue entry", as for a message delivered since."""
    return f" in {spool.directory}" if exc.strerror == NO_ENTRY else ""


def _all_hint(queue_id: str) -> str:
    """``all`` reads as the keyword to a person; postsuper, and this, take ``ALL``
    only, and "ALL: not a queue ID" left them guessing why."""
    if queue_id != "ALL" and queue_id.upper() == "ALL":
        return " (for every message, type ALL in capitals)"
    return ""


def _summary(out: TextIO, verb: str, outcome: Outcome, more: int = 0) -> None:
    count = len(outcome.entries) + more
    out.write(f"{verb}: {quantity(count, 'message')}\n")
