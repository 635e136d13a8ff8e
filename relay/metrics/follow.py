"""Counters taken from the audit log as it grows.

The audit log already has one record for every message received or refused
and for every recipient's outcome, written by every worker and by ``relay
bounce``; counting them there, at the time of a scrape, costs the workers
nothing and makes the metrics agree with what an auditor reads. Counting
starts at the end of the log as it is when the relay starts, as a counter
of any process starts at zero (Prometheus's ``rate`` takes the restart).

The per-recipient records name the message, not its tenant: the tenant is
taken from the message's ``received`` record (or, for a message received
before the start, from its queue entry) and kept while the message has
recipients left, then among the most recent ones, for the bounces and
complaints that come back later. An outcome whose tenant is no longer
known is counted under ``UNKNOWN``. A failure notice's tenant comes from
the ``notified`` record that links it to its message, which may come after
the notice's own outcomes (see ``UNLINKED_WAIT``).
"""

from __future__ import annotations

import collections
import gzip
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from relay.audit import reader
from relay.audit.search import Repeats
from relay.engine import RESCAN

UNKNOWN = "unknown"
CHUNK = 1 << 20  # bytes of the log read at a time
RECENT = 20_000  # finished messages whose tenant is kept, for late bounces and complaints
#: Outcomes remembered to tell the copies a worker's replacement writes of the
#: outcomes of its last moments (relay.settle), which ``relay audit`` counts once too.
REPEAT_WINDOW = 30_000
#: Seconds the outcomes of a message not known yet wait for a ``notified`` record
#: to name it, before they count under ``UNKNOWN``. A deferral whose records the
#: audit log refused has them written again at its kept entry's turn, up to
#: ``RESCAN`` later, and the failure notice its attempt queued may be delivered,
#: and recorded, first: counted as read, the notice's delivery was ``UNKNOWN``'s,
#: and the notice, linked after its end, was remembered for good.
UNLINKED_WAIT = 2 * RESCAN
UNLINKED_MAX = 1_000  # messages whose outcomes wait so; past it the oldest count as ``UNKNOWN``

#: audit event -> the ``status`` of ``relay_deliveries_total``, in Postfix's words
DELIVERY_STATUS = {
    "delivered": "sent",
    "deferred": "deferred",
    "failed": "bounced",
    "expired": "expired",
    "suppressed": "suppressed",
}
_FINAL = {"delivered", "failed", "expired"}


@dataclass
class Counts:
    received: collections.Counter[str] = field(default_factory=collections.Counter)  # tenant
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)  # 4xx/5xx
    deliveries: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )  # (tenant, status)
    bounces: collections.Counter[str] = field(default_factory=collections.Counter)
    complaints: collections.Counter[str] = field(default_factory=collections.Counter)
    signatures: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )  # (domain, selector)
    records: int = 0
    unreadable: int = 0  # lines that are not a record: torn writes the relay ended


class AuditFollower:
    """Reads what was appended to the day files since the last call; not thread-safe."""

    def __init__(
        self,
        directory: Path,
        queued: Iterable[tuple[str, str, int]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``queued``: (queue ID, tenant, recipients left) of the messages in the queue
        now, before anything delivers them."""
        self.directory = directory
        self._clock = clock
        self.counts = Counts()
        # queue ID -> [tenant, recipients left, the queued ones (None: queued before the start)]
        self._pending: dict[str, list] = {qid: [tenant, left, None] for qid, tenant, left in queued}
        self._repeats = Repeats(REPEAT_WINDOW)
        self._recent: collections.OrderedDict[str, str] = collections.OrderedDict()
        # queue ID not known yet -> (when its first outcome was read, its outcomes)
        self._unlinked: collections.OrderedDict[str, tuple[float, list[dict]]] = (
            collections.OrderedDict()
        )
        files = self._files()
        newest = files[-1] if files else None
        self._day = None if newest is None else newest.day
        # a compressed newest day was over before the start: none of it is counted
        self._offset = -1 if newest is not None and newest.compressed else self._size(newest)
        self._partial = b""

    def update(self) -> Counts:
        """Count every record appended since the last call, across a new day's file,
        and the rest of a day whose file was compressed since."""
        for file in self._files():
            if self._day is not None and file.day < self._day:
                continue
            if file.day != self._day:
                self._day, self._offset, self._partial = file.day, 0, b""
            if self._offset >= 0:
                self._read_on(file)
        self._give_up_on_links(self._clock() - UNLINKED_WAIT)
        return self.counts

    def _files(self) -> list[reader.DayFile]:
        try:
            return reader.day_files(self.directory)
        except FileNotFoundError:
            return []

    @staticmethod
    def _size(file: reader.DayFile | None) -> int:
        try:
            return 0 if file is None else os.stat(file.path).st_size
        except FileNotFoundError:
            return 0

    def _read_on(self, file: reader.DayFile) -> None:
        """What the file gained, a ``CHUNK`` at a time: read whole, a scrape after
        a long gap (Prometheus down, a busy hour unscraped) took three times
        the backlog at once, and the supervisor kept that memory."""
        try:
            with reader.open_file(file) as stream:
                for data in self._chunks(stream, file.compressed):
                    self._offset += len(data)
                    self._take(data)
        except FileNotFoundError:  # compressed or pruned meanwhile: read at the next scrape
            return
        except (EOFError, zlib.error, gzip.BadGzipFile):  # a damaged file: audit verify's job
            self._offset = -1

    def _chunks(self, stream: BinaryIO, compressed: bool) -> Iterator[bytes]:
        if compressed:
            stream.seek(self._offset)
            while data := stream.read(CHUNK):
                yield data
            return
        size = os.fstat(stream.fileno()).st_size
        if size < self._offset:  # cut short by hand: what is left was counted
            self._offset, self._partial = size, b""
        offset = self._offset
        while offset < size:
            data = os.pread(stream.fileno(), min(CHUNK, size - offset), offset)
            if not data:
                return
            offset += len(data)
            yield data

    def _take(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        for line in data[:cut].split(b"\n")[:-1]:
            record = reader.parse(line + b"\n")
            if record is None:
                self.counts.unreadable += 1
            elif self._repeats.copy(line):
                self.counts.records += 1
            else:
                self._count(record)

    def _count(self, record: dict) -> None:
        counts = self.counts
        counts.records += 1
        event = record.get("event")
        queue_id = str(record.get("queue_id") or "")
        if event == "received":
            tenant = str(record.get("tenant") or UNKNOWN)
            counts.received[tenant] += 1
            self._pending[queue_id] = [tenant, 0, None]
            for key in record.get("dkim") or ():
                if isinstance(key, dict):
                    counts.signatures[(str(key.get("domain")), str(key.get("selector")))] += 1
        elif event == "queued":
            if queue_id in self._pending:
                recipients = [str(r).lower() for r in record.get("recipients") or ()]
                self._pending[queue_id][1:] = [len(recipients), set(recipients)]
                self._finish_if_done(queue_id)
        elif event == "rejected":
            reply = str(record.get("reply") or "")
            counts.rejected["4xx" if reply.startswith("4") else "5xx"] += 1
        elif event in DELIVERY_STATUS:
            if queue_id in self._pending or queue_id in self._recent:
                self._outcome(record)
            else:
                self._unlinked.setdefault(queue_id, (self._clock(), []))[1].append(record)
                if len(self._unlinked) > UNLINKED_MAX:
                    self._give_up(*self._unlinked.popitem(last=False))
        elif event == "bounced":
            counts.bounces[self._tenant(queue_id)] += 1
        elif event == "complained":
            counts.complaints[self._tenant(queue_id)] += 1
        elif event == "notified":  # the failure notice, a message of its own, is the tenant's too
            notice = str(record.get("notice_queue_id") or "")
            if notice in self._recent:  # given up on: what is counted stays, what comes is its
                self._recent[notice] = self._tenant(queue_id)
            else:
                self._pending[notice] = [self._tenant(queue_id), 1, None]
            self._outcomes(self._unlinked.pop(notice, (0.0, []))[1])
        elif event == "deleted" and queue_id in self._pending:
            self._pending[queue_id][1] = 0
            self._finish_if_done(queue_id)

    def _outcome(self, record: dict) -> None:
        event, queue_id = str(record.get("event")), str(record.get("queue_id") or "")
        self.counts.deliveries[(self._tenant(queue_id), DELIVERY_STATUS[event])] += 1
        if queue_id in self._pending and self._ends_one(event, record):
            self._pending[queue_id][1] -= 1
            self._finish_if_done(queue_id)

    def _outcomes(self, records: list[dict]) -> None:
        for record in records:
            self._outcome(record)

    def _give_up_on_links(self, before: float) -> None:
        """The outcomes of each message held since ``before`` count under
        ``UNKNOWN``: a ``notified`` record naming it would have come by now.
        One that comes later still finds it remembered: taken for a notice
        yet to end, it was kept waiting for good."""
        while self._unlinked:
            queue_id, (since, _) = next(iter(self._unlinked.items()))
            if since > before:
                return
            self._give_up(queue_id, self._unlinked.pop(queue_id))

    def _give_up(self, queue_id: str, held: tuple[float, list[dict]]) -> None:
        self._outcomes(held[1])
        self._remember(queue_id, UNKNOWN)

    def _tenant(self, queue_id: str) -> str:
        if queue_id in self._pending:
            return self._pending[queue_id][0]
        return self._recent.get(queue_id, UNKNOWN)

    def _ends_one(self, event: str, record: dict) -> bool:
        """Whether the record ends one of its message's queued recipients. A
        ``suppressed`` one does where it names one of them (listed while the
        message waited); one for a recipient suppressed at arrival, never
        queued, does not: counted, the message was let go early, and not
        counted, one listed later kept its message remembered for good."""
        if event in _FINAL:
            return True
        if event != "suppressed":
            return False
        waiting = self._pending[str(record.get("queue_id"))][2]
        return waiting is None or str(record.get("recipient") or "").lower() in waiting

    def _finish_if_done(self, queue_id: str) -> None:
        tenant, left, _ = self._pending[queue_id]
        if left > 0:
            return
        del self._pending[queue_id]
        self._remember(queue_id, tenant)

    def _remember(self, queue_id: str, tenant: str) -> None:
        self._recent[queue_id] = tenant
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
