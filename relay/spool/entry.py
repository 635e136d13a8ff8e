"""The spooled envelope: everything needed to deliver, retry and notify after a restart.

The message bytes live beside it in their own file; this record is the part
that changes (per-recipient state, the next attempt, hold). It is JSON so a
sysadmin can read it with ``cat`` and an older or newer relay can still load it.
"""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import dataclass, fields
from typing import Any

VERSION = 1

# an entry written further ahead of the clock was written before a step back
SET_BACK = 1.0
# 9999-12-31, the last day ``datetime`` shows in any time zone: the record's
# floats are all epoch times, and listings show each of them
LAST_TIME = 253_402_214_400.0
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
EXPIRED = "expired"
SUPPRESSED = "suppressed"  # on the suppression list when the message came, or listed since
STATUSES = (PENDING, DELIVERED, FAILED, EXPIRED, SUPPRESSED)


@dataclass
class RecipientState:
    """One envelope recipient. ``notify`` is False for the relay's own BCC copy:
    the sending user never asked for it, so its failure must not bother them."""

    address: str
    status: str
    notify: bool
    attempts: int = 0
    reply: str | None = None
    updated: float | None = None


@dataclass
class QueueEntry:
    """A message accepted with 250 and not yet finished.

    ``subject``, ``message_id`` and ``date`` are copied out of the message so
    failure notices and queue listings need not parse it again.
    """

    queue_id: str
    arrival: float
    mail_from: str
    recipients: list[RecipientState]
    upstream: str
    tenant: str
    user: str
    notify_address: str
    doc_type: str
    subject: str
    message_id: str
    date: str
    size: int
    client_address: str
    auth_login: str | None
    next_attempt: float
    attempts: int = 0
    held: bool = False
    is_notice: bool = False
    # a notice ``relay bounce`` queued: the size of the DKIM-Signature fields it
    # was signed with, which the relay makes anew as it sends it (``relay.notice``)
    sign_again: int | None = None
    # the account address its From and envelope sender were decided for, "" the
    # platform's; None in a record of an earlier version (``relay.engine``)
    sends_as: str | None = None
    # a notice's: the queue ID of the message it is about, whose sender it tells;
    # None for any other message, and in a notice of an earlier version
    about: str | None = None

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == PENDING]

    @property
    def last_written(self) -> float:
        """When the last attempt deferred it, or else when it arrived: ahead of the
        clock once the wall clock is set back. An attempt notes every pending
        recipient, so the earliest of theirs is that attempt's once one is made
        after the step, whatever the arrival and the finished ones say."""
        times = [
            r.updated for r in self.recipients if r.status == PENDING and r.updated is not None
        ]
        return min(times) if times else self.arrival

    def wait_after_step(self, now: float) -> float | None:
        """For an entry written before the wall clock was set back (ahead of
        ``now``), its wait: the engine tries it that long after it first sees
        it so (``relay.engine``), not at its stored next attempt, a day off
        after a step back of a day. None for any other entry, and for one
        ``relay queue retry`` made due (next attempt 0)."""
        written = self.last_written
        if written - now <= SET_BACK or not self.next_attempt:
            return None
        return max(0.0, self.next_attempt - written)

    @property
    def finished(self) -> bool:
        """True once every recipient has a final status: the entry can go."""
        return not self.pending()

    def to_json(self) -> str:
        """``asdict`` without its deep copy: written for every message, and the
        members are all plain values but the recipients."""
        record = {
            "version": VERSION,
            **vars(self),
            "recipients": [dict(vars(r)) for r in self.recipients],
        }
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> QueueEntry:
        """Unknown members are ignored so a record written by a newer relay still loads.

        Anything malformed raises ValueError, whatever the underlying cause.
        Types are checked here, on what comes from disk, and not on every
        entry the relay builds itself: that cost a few percent of the CPU.
        """
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            version = raw.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"bad version {version!r}")
            recipients = raw.get("recipients")
            if not isinstance(recipients, list) or not all(isinstance(r, dict) for r in recipients):
                raise ValueError("recipients is not a list of objects")
            known = _known(cls, raw)
            known["recipients"] = [RecipientState(**_known(RecipientState, r)) for r in recipients]
            entry = cls(**known)
        except (TypeError, KeyError, UnicodeDecodeError) as exc:
            raise ValueError(f"bad queue record: {exc}") from exc
        _check_types(entry)
        for rcpt in entry.recipients:
            _check_types(rcpt)
            if rcpt.status not in STATUSES:
                raise ValueError(f"recipient status {rcpt.status!r} is not one of {STATUSES}")
        return entry


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = _names(cls)
    return {k: v for k, v in raw.items() if k in names}


@functools.cache
def _names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.init)


@functools.cache
def _checks(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """Each member's name and the types its hint allows, worked out once:
    ``relay queue list`` and a start read every record, 50,000 of them on a
    large queue, and reading the hints again for each was a third of it."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (name, typing.get_args(hint) or (hint,))
        for name, hint in hints.items()
        if name != "recipients"
    )


def _check_types(obj: object) -> None:
    """A hand-edited or truncated record must fail at load, not later inside a listing."""
    for name, options in _checks(type(obj)):
        value = getattr(obj, name)
        if not _accepts(options, value):
            raise ValueError(f"{name} {_wrong(options, value)}")


def _accepts(options: tuple[Any, ...], value: object) -> bool:
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if option is float and isinstance(value, int | float):
            return _a_time(value)
        if option in (int, str) and isinstance(value, option):
            return True
    return False


def _a_time(value: float) -> bool:
    """``NaN``, ``Infinity`` and ``1e300`` are JSON numbers Python reads; a listing
    then failed on them (``timestamp out of range``), and with them on the whole
    queue, where a damaged record is skipped."""
    return 0 <= value <= LAST_TIME


def _wrong(options: tuple[Any, ...], value: object) -> str:
    """A number where a time goes is of the right type: ``NaN`` said "wrong type"."""
    if float in options and isinstance(value, int | float) and not isinstance(value, bool):
        return f"is not a time: {value!r}"
    return f"has the wrong type: {value!r}"
