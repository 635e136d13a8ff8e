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
known is counted under ``UNKNOWN``.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from relay.audit import reader
from relay.audit.search import Repeats

UNKNOWN = "unknown"
RECENT = 50_000  # finished messages whose tenant is kept, for late bounces and complaints
#: Outcomes remembered to tell the copies a worker's replacement writes of the
#: outcomes of its last moments (relay.settle), which ``relay audit`` counts once too.
REPEAT_WINDOW = 50_000

#: audit event -> the ``status`` of ``relay_deliveries_total``, in Postfix's words
DELIVERY_STATUS = {
    "delivered": "sent",
    "deferred": "deferred",
    "failed": "bounced",
    "expired": "expired",
    "suppressed": "suppressed",
}
_FINAL = {"delivered", "failed", "expired"}  # a suppressed recipient is never in ``queued``


@dataclass
class Counts:
    received: collections.Counter[str] = field(default_factory=collections.Counter)  # tenant
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)  # 4xx/5xx
    deliveries: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )  # (tenant, status)
    bounces: collections.Counter[str] = field(default_factory=collections.Counter)
    complaints: collections.Counter[str] = field(default_factory=collections.Counter)
    records: int = 0
    unreadable: int = 0  # lines that are not a record: torn writes the relay ended


class AuditFollower:
    """Reads what was appended to the day files since the last call; not thread-safe."""

    def __init__(self, directory: Path, queued: Iterable[tuple[str, str, int]] = ()) -> None:
        """``queued``: (queue ID, tenant, recipients left) of the messages in the queue
        now, before anything delivers them."""
        self.directory = directory
        self.counts = Counts()
        self._pending: dict[str, list] = {qid: [tenant, left] for qid, tenant, left in queued}
        self._repeats = Repeats(REPEAT_WINDOW)
        self._recent: collections.OrderedDict[str, str] = collections.OrderedDict()
        files = self._files()
        self._file = files[-1].path if files else None
        self._offset = self._size(self._file)
        self._partial = b""

    def update(self) -> Counts:
        """Count every record appended since the last call, across a new day's file."""
        files = [f for f in self._files() if not f.compressed]
        if self._file is not None:
            files = [f for f in files if f.path.name >= self._file.name]
        for file in files:
            if file.path != self._file:
                self._file, self._offset, self._partial = file.path, 0, b""
            self._read_on()
        return self.counts

    def _files(self) -> list[reader.DayFile]:
        try:
            return reader.day_files(self.directory)
        except FileNotFoundError:
            return []

    @staticmethod
    def _size(path: Path | None) -> int:
        try:
            return 0 if path is None else os.stat(path).st_size
        except FileNotFoundError:
            return 0

    def _read_on(self) -> None:
        assert self._file is not None
        try:
            with open(self._file, "rb", buffering=0) as stream:
                size = os.fstat(stream.fileno()).st_size
                if size < self._offset:  # cut short by hand: what is left was counted
                    self._offset, self._partial = size, b""
                data = os.pread(stream.fileno(), size - self._offset, self._offset)
        except FileNotFoundError:
            return
        self._offset += len(data)
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
            self._pending[queue_id] = [tenant, 0]
        elif event == "queued":
            if queue_id in self._pending:
                self._pending[queue_id][1] = len(record.get("recipients") or ())
                self._finish_if_done(queue_id)
        elif event == "rejected":
            reply = str(record.get("reply") or "")
            counts.rejected["4xx" if reply.startswith("4") else "5xx"] += 1
        elif event in DELIVERY_STATUS:
            counts.deliveries[(self._tenant(queue_id), DELIVERY_STATUS[event])] += 1
            if event in _FINAL and queue_id in self._pending:
                self._pending[queue_id][1] -= 1
                self._finish_if_done(queue_id)
        elif event == "bounced":
            counts.bounces[self._tenant(queue_id)] += 1
        elif event == "complained":
            counts.complaints[self._tenant(queue_id)] += 1
        elif event == "notified":  # the failure notice, a message of its own, is the tenant's too
            notice = str(record.get("notice_queue_id") or "")
            self._pending[notice] = [self._tenant(queue_id), 1]
        elif event == "deleted" and queue_id in self._pending:
            self._pending[queue_id][1] = 0
            self._finish_if_done(queue_id)

    def _tenant(self, queue_id: str) -> str:
        if queue_id in self._pending:
            return self._pending[queue_id][0]
        return self._recent.get(queue_id, UNKNOWN)

    def _finish_if_done(self, queue_id: str) -> None:
        tenant, left = self._pending[queue_id]
        if left > 0:
            return
        del self._pending[queue_id]
        self._recent[queue_id] = tenant
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
