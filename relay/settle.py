"""Finished entries between their final audit records and their removal.

The audit log may name an outcome the spool has not caught up with after a
crash, never the other way round: an entry leaves the spool only once its
final records (delivered, failed, expired) are on disk. They get no fsync
of their own: nobody waits for them, and that fsync per finished batch
lengthened every 250 queued behind it on the disk (two sittings of four
side-by-side runs: the accept p99 at half the full rate 37 -> 31 and 49 ->
40 ms, one session +8 and +7 % messages/s). Instead the entry stays in the
spool, and locked, so no engine delivers it again, until an fsync of the
audit log by this process has covered its records: usually the next
accepted batch's, whose writing thread removes the small entries it covered
right away (``remove_covered``), else the engine's own, asked for once a POLL and
at stop. Records the audit log refused, or that a failed fsync put in
doubt, are written again first. The removal itself is lazy too (see
``Spool.remove_many``): the next fsync of the spool directory makes it
durable. A crashed worker's waiting entries are settled from the records it
wrote (``settle_recorded``): by the supervisor before it starts the
replacement, and at the next start.

The engine's finishing thread runs ``finish_many``, one batch at a time
(``relay.groupcommit``); the accepting thread only removes what is covered,
and only when the finishing thread is not at work. For a lone SMTP session
both run on the event loop instead, one after the other (``inline``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from relay.audit import AuditError, AuditLog, events, reader
from relay.queueid import queue_id_time
from relay.record import Recorder
from relay.spool import QueueEntry, Spool
from relay.spool.store import RECYCLE_SIZE, NoSuchEntry, SpoolError, UnsyncedRemovals

log = logging.getLogger("relay")

WAITING_MAX = 64  # finished entries that may wait, locked, for an fsync of the audit log
SMALL = RECYCLE_SIZE // 2  # surely kept for reuse, record and all: removed without an fsync
UNWRITTEN = -1  # the ticket of records the audit log refused: write them again
#: ``suppressed`` too: a recipient listed while its message waited ends so
#: (``Engine._drop_listed``); not taken for final, a restart tried it again,
#: with a second record and a second notice.
FINAL_EVENTS = ("delivered", "failed", "expired", "suppressed")
#: The records that say where a recipient's delivery stands; others name a
#: recipient too (``notified``: the sender told, who may also be a recipient).
ATTEMPT_EVENTS = (*FINAL_EVENTS, "deferred")


class EntryLock:
    """The open, flocked file of one entry; whoever ``take``s it closes it."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd

    def take(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd

    def close(self) -> None:
        fd = self.take()
        if fd is not None:
            os.close(fd)


@dataclass(eq=False)
class Finished:
    """An entry whose outcome is final, with the records that say so."""

    queue_id: str
    records: list[dict[str, Any]]
    lock: EntryLock
    size: int  # of the message: a large one's file is not kept for reuse
    ticket: int = UNWRITTEN


@dataclass(frozen=True)
class Settle:
    """Settle what waits now (a quiet relay's POLL); with ``final`` (the stop) also
    let go of what cannot be, and settle what finishes later at once."""

    final: bool = False


class Settler:
    def __init__(self, spool: Spool, recorder: Recorder) -> None:
        self.spool = spool
        self.recorder = recorder
        self._waiting: list[Finished] = []
        self._final = False
        self._lock = threading.Lock()
        self._stuck: set[str] = set()  # delivered, but the spool refused their removal
        self._stuck_error: str | None = None

    @property
    def waiting(self) -> int:
        """How many entries wait; read from other threads, it is a hint."""
        return len(self._waiting)

    @property
    def rewriting(self) -> bool:
        """Whether records the audit log refused wait to be written again: tried at
        every look, they tell when it takes records again. Read from other
        threads, it is a hint."""
        return any(self.recorder.synced(item.ticket) is None for item in self._waiting)

    def stuck(self, queue_id: str) -> bool:
        """Whether the entry was finished and waits for its removal: not to be planned."""
        return queue_id in self._stuck

    @property
    def full(self) -> bool:
        return len(self._waiting) >= WAITING_MAX

    def remove_covered(self) -> None:
        """Remove the entries whose records an fsync has covered since, unless the
        finishing thread is at work (it does that too); for the thread that just
        made such an fsync, so that entries wait for the length of one batch, not
        until the next delivery finishes (when only a worker crashes, the
        others deliver its waiting entries again). Only as many small entries as
        files are kept for reuse: any other file is unlinked, and that unlink's
        fsync would hold up the batch's 250s (after a backlog drains, say, when
        the worker keeps all the free files it may)."""
        if self._waiting and self._lock.acquire(blocking=False):
            try:
                self._remove_settled(SMALL, self.spool.recycle_room)
            finally:
                self._lock.release()

    def finish_many(self, items: list[Finished | Settle]) -> list[Exception | None]:
        """One batch of the finishing thread. A ``Settle`` item gets the error that
        kept what waits from being settled, or None; a ``Finished`` one, None."""
        with self._lock:
            return self._finish_many(items)

    def _finish_many(self, items: list[Finished | Settle]) -> list[Exception | None]:
        finished = [item for item in items if isinstance(item, Finished)]
        asked = len(finished) < len(items)
        final = self._final or any(isinstance(item, Settle) and item.final for item in items)
        self._waiting += finished  # first: whatever fails below, their locks are not lost
        if finished:
            self._write(finished)
        error: Exception | None = None
        if asked or final or self.full:
            error = self._make_durable()
            if error is not None and not asked:
                log.error("delivered messages stay in the queue for now: %s", error)
        self._remove_settled()
        if (asked or final) and error is None:
            try:
                self.spool.sync_removals()
            except SpoolError as exc:
                error = exc
        if final:
            self._final = True
            for item in self._waiting:  # for the next start: settle_recorded, or delivered again
                item.lock.close()
            self._waiting = []
            self._stuck.clear()
        return [None if isinstance(item, Finished) else error for item in items]

    def _write(self, finished: list[Finished]) -> None:
        try:
            ticket = self.recorder.write(
                [record for item in finished for record in item.records], sync=False
            )
        except AuditError as exc:
            ids = ", ".join(item.queue_id for item in finished)
            log.error("%s: AUDIT LOG WRITE FAILED, kept in the queue: %s", ids, exc)
            return
        for item in finished:
            item.ticket = ticket

    def _make_durable(self) -> AuditError | None:
        """Records not yet on disk fsynced; refused ones, and those an fsync
        failure put in doubt, written again (perhaps twice in the log, never
        missing)."""
        lost = [item for item in self._waiting if self.recorder.synced(item.ticket) is None]
        try:
            if lost:
                self.recorder.write([record for item in lost for record in item.records])
                for item in lost:
                    item.ticket = 0
            else:
                self.recorder.sync()
        except AuditError as exc:
            return exc
        return None

    def _remove_settled(self, largest: int | None = None, most: int | None = None) -> None:
        """``largest`` and ``most``: leave larger entries, and any beyond the first
        ``most``, to the finishing thread. Their files are unlinked, not kept for
        reuse, and an unlink is fsynced at once. An entry whose file cannot be
        removed stays waiting, locked, and is tried again with the next removals:
        let go, it was delivered again at every scan of the spool, by every worker."""
        settled: list[Finished] = []
        waiting: list[Finished] = []
        for item in self._waiting:
            small = largest is None or item.size <= largest
            room = most is None or len(settled) < most
            ready = small and room and self.recorder.synced(item.ticket)
            (settled if ready else waiting).append(item)
        self._waiting = waiting
        if not settled:
            return
        failures: list[SpoolError | None] = [None] * len(settled)
        try:
            failures = self.spool.remove_many(
                [item.queue_id for item in settled], recycle=True, lazy=True
            )
        except UnsyncedRemovals as exc:  # removed, not durably; those not removed stay
            failures = exc.failures
            log.error("delivered messages removed, not yet durably: %s", exc)
        finally:
            for item, failure in zip(settled, failures, strict=True):
                if failure is None or isinstance(failure, NoSuchEntry):
                    item.lock.close()
                    self._stuck.discard(item.queue_id)
                else:
                    self._waiting.append(item)
                    self._report_stuck(item.queue_id, failure)
        if not self._stuck and self._stuck_error is not None:
            log.info("delivered messages leave the queue again")
            self._stuck_error = None

    def _report_stuck(self, queue_id: str, failure: SpoolError) -> None:
        """Once, not per entry and retry: a queue directory that refuses removals
        refuses them all, every time they are tried."""
        self._stuck.add(queue_id)
        if self._stuck_error != failure.strerror:
            log.error(
                "delivered messages cannot be removed from the queue; they stay, locked,"
                " and are removed once that works again: %s",
                failure,
            )
        self._stuck_error = failure.strerror


RECENT = 16 << 20  # how much of the audit log's end a restart reads for outcomes
WIDER = reader.REWRITE_REACH // RECENT  # read once more when RECENT covered too little time
#: How much later than the oldest record read an entry must have been made
#: for a missing record to mean it was never written. A record written after
#: the entry's could only carry an earlier time if the clock was set back in
#: between: by less than this, it cannot make an acknowledged message look
#: unrecorded (the part of the log read may span minutes or seconds; that
#: does not matter).
MARGIN = 2.0


@dataclass
class Settled:
    """What ``settle_recorded`` removed."""

    finished: list[str] = field(default_factory=list)  # every outcome on record
    unrecorded: list[str] = field(default_factory=list)  # stored, never acknowledged
    # the log's last seq and its witness's, when the log lost records it had (a
    # restore from an older copy): what it does not name is kept, not removed
    behind: tuple[int, int] | None = None


@dataclass
class _Tail:
    """What the end of the audit log says about the entries in the spool."""

    latest: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)  # queue IDs any record names
    oldest: float | None = None  # when the oldest record read was written

    @classmethod
    def read(cls, directory: Path, queued: set[str], budget: int) -> _Tail:
        tail = cls()
        oldest: str | None = None
        for record in reader.recent(directory, budget):
            when = record.get("time")
            if isinstance(when, str) and (oldest is None or when < oldest):
                oldest = when
            queue_id, recipient, seq = (record.get(k) for k in ("queue_id", "recipient", "seq"))
            tail.named.update(_named(record, queued))
            if not (
                isinstance(queue_id, str) and isinstance(recipient, str) and isinstance(seq, int)
            ):
                continue
            if record.get("event") not in ATTEMPT_EVENTS:
                continue
            if queue_id in queued and seq > tail.latest.get((queue_id, recipient), {}).get(
                "seq", -1
            ):
                tail.latest[(queue_id, recipient)] = record
        if oldest is not None:
            with contextlib.suppress(ValueError):
                tail.oldest = datetime.fromisoformat(oldest).timestamp()
        return tail

    def unrecorded(self, queue_id: str) -> bool | None:
        """Whether the log would name the entry if its records had been written:
        True (it does not), False (it does), None (it covers too little time)."""
        if queue_id in self.named:
            return False
        made = queue_id_time(queue_id)
        if made is None or self.oldest is None or made < self.oldest + MARGIN:
            return None
        return True


def settle_recorded(spool: Spool, audit: AuditLog, budget: int = RECENT) -> Settled:
    """Remove the entries whose every pending recipient's last record in the
    audit log is an outcome, and those the log has never heard of.

    For a restart, and after a worker died, before any worker delivers:
    a crashed worker's waiting entries had their records written, which the
    kernel keeps, so they are settled here rather than delivered again. Only
    the log's end is read: such entries finished moments before the crash.
    The records relied on are appended again, fsynced, before the entries
    go: an fsync that failed before the crash may have kept them off the
    disk, and no fsync now would say so (the log may then name such an
    outcome twice, never not at all; ``relay audit`` counts it once:
    ``relay.audit.search.Repeats``).

    A worker that died between storing a message and writing its
    ``received`` and ``queued`` records left an entry nobody acknowledged:
    its client got no 250 and sends it again. Delivered, it would reach the
    recipient twice, once with no audit trail; it is removed instead, when
    no record names it though the part of the log read began well before
    its queue ID was made, nor any written since that read once its lock is
    held: a live worker may have acknowledged it meanwhile (the supervisor
    settles while the other workers accept). An entry already attempted (with its changed
    record beside it), or a failure notice, is left to the engine; so is
    every entry the log does not name when it is behind its witness
    (``AuditLog.behind``): its audit directory restored from an older copy,
    as the relay's refusal to start without one advises, the mail accepted
    since was removed as never acknowledged, every 250 of it lost.
    """
    queued = set(spool.ids())
    if not queued:
        return Settled()
    behind = audit.behind()
    end = reader.mark(audit.directory)
    tail = _Tail.read(audit.directory, queued, budget)
    fresh = set() if behind else {q for q in queued if q not in tail.named and not spool.changed(q)}
    if any(tail.unrecorded(q) is None for q in fresh):
        tail = _Tail.read(audit.directory, queued, budget * WIDER)
    outcomes: dict[str, dict[str, dict[str, Any]]] = {}
    for (queue_id, recipient), record in tail.latest.items():
        if record.get("event") in FINAL_EVENTS:
            outcomes.setdefault(queue_id, {})[recipient] = record
    settled = Settled(behind=behind)
    held: list[tuple[str, int]] = []
    again: list[dict[str, Any]] = []
    try:
        for queue_id in sorted(outcomes.keys() | {q for q in fresh if tail.unrecorded(q)}):
            try:
                fd = spool.acquire(queue_id, blocking=False)
            except SpoolError:
                continue  # busy or gone: not ours to settle
            held.append((queue_id, fd))
            try:
                entry: QueueEntry | None = spool.load(queue_id)
            except SpoolError:
                entry = None  # unreadable: the engine reports it
            known = outcomes.get(queue_id, {})
            if entry is not None and known and {r.address for r in entry.pending()} <= known.keys():
                again += [_as_built(known[r.address]) for r in entry.pending()]
                settled.finished.append(queue_id)
            elif entry is not None and not known and not entry.is_notice:
                settled.unrecorded.append(queue_id)
            else:
                os.close(held.pop()[1])
        late = _named_since(audit.directory, end, set(settled.unrecorded))
        settled.unrecorded = [q for q in settled.unrecorded if q not in late]
        held = _let_go(held, late)
        if not held:
            return settled
        if again:
            audit.append_many(again)
        failures = spool.remove_many([queue_id for queue_id, _ in held])
    finally:
        for _, fd in held:
            os.close(fd)
    kept = {queue_id for (queue_id, _), failure in zip(held, failures, strict=True) if failure}
    settled.finished = [q for q in settled.finished if q not in kept]
    settled.unrecorded = [q for q in settled.unrecorded if q not in kept]
    return settled


def _named(record: dict[str, Any], among: set[str]) -> set[str]:
    """The queue IDs of ``among`` a record names: its message's, or its notice's."""
    return {
        name for name in (record.get("queue_id"), record.get("notice_queue_id")) if name in among
    }


def _named_since(directory: Path, end: reader.Mark, candidates: set[str]) -> set[str]:
    """Those of ``candidates`` a record written since ``end`` names. Read with
    their locks held: a live worker writes its ``received`` and ``queued``
    records before its 250, and lets go of the lock only after, so a message
    it acknowledged while the log was being read is named now."""
    named: set[str] = set()
    if candidates:
        for record in reader.since(directory, end):
            named |= _named(record, candidates)
    return named


def _let_go(held: list[tuple[str, int]], kept: set[str]) -> list[tuple[str, int]]:
    """``held`` without the entries of ``kept``, whose locks are closed."""
    for queue_id, fd in held:
        if queue_id in kept:
            os.close(fd)
    return [(queue_id, fd) for queue_id, fd in held if queue_id not in kept]


def _as_built(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record as its builder made it, to be appended again."""
    return {k: v for k, v in record.items() if k not in (*events.HEAD[:3], *events.TAIL)}
