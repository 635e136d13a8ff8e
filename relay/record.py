"""The record stage: one place that reports what happened to a message.

Sysadmins and auditors read different streams. The operational log (the
``relay`` logger, stderr or journald) gets one line per event with
Postfix's field names (``to= relay= delay= dsn= status=``) so existing
habits and tools carry over; the audit log gets a structured, chained
record for the same event. Every stage reports through here, so the two
can never disagree about what happened.

Audit records are collected per message and written together by ``flush``
(one fsync for all recipients of an attempt). Each message has its own
buffer, so one session's flush can never write, or lose, another's records.
They are written before the spool records the new state:
after a crash the audit log may hold an event the spool forgot, never the
other way round.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relay.audit import AuditError, AuditLog
from relay.audit import events as ev
from relay.clocksteps import ClockSteps
from relay.groupcommit import GroupCommit
from relay.policy.model import AuditSettings
from relay.spool import QueueEntry
from relay.suppression.entry import Suppression

log = logging.getLogger("relay")
_DSN = re.compile(r"^\d{3}[ -](\d\.\d{1,3}\.\d{1,3})\b")


def dsn(reply: str) -> str:
    found = _DSN.match(reply)
    return found.group(1) if found else "-"


def audit_log(settings: AuditSettings, create: bool = False) -> AuditLog:
    """``create``: only for a new state directory (see ``AuditLog``)."""
    return AuditLog(
        settings.directory,
        hmac_key=settings.hmac_key,
        compress_after_days=settings.compress_after_days,
        retention_days=settings.retention_days,
        create=create,
        witness=settings.directory.parent / AUDIT_WITNESS,
    )


#: beside the audit directory, in the state directory: ``AuditLog``'s witness
AUDIT_WITNESS = "audit.head"


def operator() -> str:
    """Who ran a queue command: the sudo caller when there is one."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


class Recorder:
    """Records are written by group commit (``relay.groupcommit``): every message
    flushed in one pass of the event loop shares one write and one fsync. A
    failed write writes none of them, so each caller can refuse its message."""

    def __init__(
        self,
        audit: AuditLog | None,
        clock: Callable[[], float] = time.time,
        steps: ClockSteps | None = None,
    ) -> None:
        """``steps``: the clock's steps the process knows of, so that a delivery's
        ``delay=`` is the time that passed (``relay.clocksteps``)."""
        self.audit = audit
        self.clock = clock
        self._steps = steps
        self._pending: dict[str | None, list[dict[str, Any]]] = {}
        self._write = GroupCommit(self._append, "audit")

    def add(self, record: dict[str, Any]) -> None:
        if self.audit is not None:
            self._pending.setdefault(record["queue_id"], []).append(record)

    async def flush(self, queue_id: str | None, keep: bool = False) -> None:
        """Write what was collected for one message; raises AuditError, the caller
        decides what that means. The buffer is taken here, on the event loop;
        with ``keep`` records that could not be written go back into it, to be
        written with the message's next ones."""
        records = self._pending.pop(queue_id, [])
        if records and self.audit is not None:
            try:
                await self._write(records)
            except AuditError:
                if keep:
                    self._pending[queue_id] = records + self._pending.get(queue_id, [])
                raise

    def flush_sync(self, queue_id: str | None) -> None:
        self.write(self.take(queue_id))

    def take(self, queue_id: str | None) -> list[dict[str, Any]]:
        """What was collected for one message, for the caller to ``write``."""
        return self._pending.pop(queue_id, [])

    def set_aside(self, queue_id: str | None, event: str) -> list[dict[str, Any]]:
        """The ``event`` records collected for one message, taken out of its
        buffer, the others left in it in their order: for records the audit
        log refused that must not wait for the message's next ones."""
        records = self._pending.pop(queue_id, [])
        left = [record for record in records if record["event"] != event]
        if left:
            self._pending[queue_id] = left
        return [record for record in records if record["event"] == event]

    def write(self, records: list[dict[str, Any]], sync: bool = True) -> int:
        """Append and fsync now, in the caller's thread; raises AuditError.

        With ``sync=False`` there is no fsync: ``synced`` says of the
        returned ticket when one has covered the records.
        """
        if records and self.audit is not None:
            return self.audit.append_many(records, sync=sync)
        return 0

    def synced(self, ticket: int) -> bool | None:
        """See ``AuditLog.synced``; without an audit log everything is."""
        return True if self.audit is None else self.audit.synced(ticket)

    def sync(self) -> None:
        """fsync what ``write(sync=False)`` left; raises AuditError."""
        if self.audit is not None:
            self.audit.sync()

    @property
    def refusing(self) -> str | None:
        """See ``AuditLog.refusing``; a flag read, so that checking it costs mail nothing."""
        return None if self.audit is None else self.audit.refusing

    def probe(self) -> None:
        """See ``AuditLog.probe``; raises AuditError."""
        if self.audit is not None:
            self.audit.probe()

    def _append(self, batches: list[list[dict[str, Any]]]) -> list[None]:
        assert self.audit is not None
        self.audit.append_many([record for records in batches for record in records])
        return [None] * len(batches)

    def _delivery_line(
        self,
        entry: QueueEntry,
        address: str,
        status: str,
        reply: str,
        sent: bool = False,
        via: str | None = None,
    ) -> None:
        """``sent``: a reply with no enhanced status (a directory upstream's ``written
        to``) says ``dsn=2.0.0``, as Postfix's lines of a delivery always do. ``via``:
        the upstream that answered, when not the entry's own (a fallback)."""
        code = dsn(reply)
        log.info(
            "%s: to=<%s>, relay=%s, delay=%.1f, dsn=%s, status=%s (%s)",
            entry.queue_id,
            address,
            via or entry.upstream,
            max(0.0, self.clock() - self._arrival(entry)),  # not below 0 after a clock set back
            "2.0.0" if sent and code == "-" else code,
            status,
            reply,
        )

    def _arrival(self, entry: QueueEntry) -> float:
        return entry.arrival if self._steps is None else self._steps.arrival(entry.arrival)

    def delivered(
        self, entry: QueueEntry, address: str, reply: str, via: str | None = None
    ) -> None:
        """``via``: the upstream that took it, when not the entry's own (a fallback)."""
        self._delivery_line(entry, address, "sent", reply, sent=True, via=via)
        attempts = next((r.attempts for r in entry.recipients if r.address == address), 0)
        self.add(
            ev.delivered(
                queue_id=entry.queue_id,
                message_id=entry.message_id,
                recipient=address,
                upstream=via or entry.upstream,
                reply=reply,
                attempts=attempts,
            )
        )

    def deferred(
        self,
        entry: QueueEntry,
        address: str,
        reply: str,
        next_attempt: float,
        via: str | None = None,
    ) -> None:
        self._delivery_line(entry, address, "deferred", reply, via=via)
        self.add(
            ev.deferred(
                queue_id=entry.queue_id,
                message_id=entry.message_id,
                recipient=address,
                reply=reply,
                next_attempt=datetime.fromtimestamp(next_attempt, UTC),
            )
        )

    def suppressed(self, entry: QueueEntry, address: str, reply: str) -> None:
        """Only the log line: the ``suppressed`` record goes with the message's ``received``."""
        self._delivery_line(entry, address, "suppressed", reply)

    def suppressed_later(self, entry: QueueEntry, address: str, item: Suppression) -> None:
        """A recipient listed after its message was accepted: the same line, and
        its record with the attempt's, its ``since`` after the ``received``."""
        self._delivery_line(entry, address, "suppressed", f"not sent: {item.describe()}")
        self.add(
            ev.suppressed(
                queue_id=entry.queue_id,
                message_id=entry.message_id,
                recipient=address,
                reason=item.reason,
                since=item.since,
            )
        )

    def listed(self, item: Suppression, message_id: str | None) -> None:
        """The audit log's word that the relay listed the address: the list file
        and the operational log were all an auditor had to say why mail to it
        stopped. ``item`` carries the message (its queue ID) that listed it."""
        self.add(
            ev.listed(
                queue_id=item.queue_id,
                message_id=message_id,
                recipient=item.address,
                reason=item.reason,
                since=item.since,
                for_tenant=item.tenant,
                detail=item.detail,
            )
        )

    def failed(self, entry: QueueEntry, address: str, reply: str, via: str | None = None) -> None:
        self._delivery_line(entry, address, "bounced", reply, via=via)
        self.add(
            ev.failed(
                queue_id=entry.queue_id, message_id=entry.message_id, recipient=address, reply=reply
            )
        )

    def expired(self, entry: QueueEntry, address: str, reply: str, via: str | None = None) -> None:
        self._delivery_line(entry, address, "expired", reply, via=via)
        self.add(
            ev.expired(
                queue_id=entry.queue_id,
                message_id=entry.message_id,
                recipient=address,
                reply=reply,
            )
        )

    def notice(self, entry: QueueEntry, notice: QueueEntry) -> None:
        log.info(
            "%s: failure notice to=<%s> queued as %s",
            entry.queue_id,
            notice.notify_address,
            notice.queue_id,
        )
        self.add(
            ev.notified(
                queue_id=entry.queue_id,
                message_id=entry.message_id,
                recipient=notice.notify_address,
                notice_queue_id=notice.queue_id,
            )
        )

    def held(self, entry: QueueEntry, why: str) -> None:
        """A hold the relay made itself: ``by`` is ``relay:`` and why, as the
        record has no field of its own for a reason."""
        self.add(ev.held(queue_id=entry.queue_id, message_id=entry.message_id, by=f"relay: {why}"))

    def deleted(self, queue_id: str, entry: QueueEntry | None, by: str) -> None:
        """``entry`` is None when its record could not be read: its message ID and
        recipients are not known."""
        log.info("%s: removed from the queue by %s", queue_id, by)
        pending = [] if entry is None else [r.address for r in entry.pending()]
        message_id = None if entry is None else entry.message_id
        self.add(ev.deleted(queue_id=queue_id, message_id=message_id, by=by, recipients=pending))
