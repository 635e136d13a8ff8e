"""The engine's rescans read again only the records whose files changed."""

from __future__ import annotations

import asyncio
import collections
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from relay.deliver import Attempt, attempt
from relay.engine import Engine, Warm
from relay.policy.model import Policy
from relay.record import Recorder
from relay.spool import QueueEntry, Spool, tools
from tests.spoolkit import make_entry

if TYPE_CHECKING:
    from relay.spool.store import Stamp

MESSAGE = b"Subject: Invoice 7\r\n\r\nThe invoice.\r\n"


def _queued(spool: Spool, n: int) -> list[QueueEntry]:
    entries = [make_entry(size=len(MESSAGE), next_attempt=time.time() + 3600) for _ in range(n)]
    for entry in entries:
        spool.put(entry, MESSAGE)
    return entries


def _counted(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """How many times each entry's record is read from here on."""
    reads: collections.Counter[str] = collections.Counter()
    read = spool.load

    def counting(queue_id: str, first: QueueEntry | None = None) -> QueueEntry:
        reads[queue_id] += 1
        return read(queue_id, first)

    monkeypatch.setattr(spool, "load", counting)
    return reads


def test_a_rescan_reads_only_the_records_held_or_deferred_since(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every record was parsed once a minute: with 50,000 queued that held the
    GIL for seconds, and mail was neither taken nor delivered meanwhile."""
    unchanged, held, deferred = _queued(spool, 3)
    clock = [time.time() + 60]  # the files were written a minute before the scans
    engine = Engine(spool, lambda: policy, attempt, Recorder(None), clock=lambda: clock[0])
    reads = _counted(spool, monkeypatch)
    engine._read_schedule()
    assert set(reads) == {unchanged.queue_id, held.queue_id, deferred.queue_id}

    tools.hold(spool, [held.queue_id], io.StringIO(), io.StringIO())
    deferred.next_attempt += 600
    deferred.recipients[0].attempts = 1
    spool.update(deferred)
    clock[0] += 60
    reads.clear()
    schedule, on_hold, _ = engine._read_schedule()
    assert reads == {held.queue_id: 1, deferred.queue_id: 1}
    assert on_hold == {held.queue_id}
    assert schedule[deferred.queue_id][0] == deferred.next_attempt
    assert unchanged.queue_id in schedule

    reads.clear()
    clock[0] += 60
    assert engine._read_schedule()[0] == schedule
    assert not reads


def test_a_record_changed_in_the_tick_it_was_read_in_is_read_again(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system whose clock ticks coarsely (a second, two on FAT) a
    record rewritten in the tick of its read, in place or in a file that got
    the old one's inode, keeps the stamp it was read with: read at the next
    scan anyway, once, its change is not missed for as long as it stays."""
    (entry,) = _queued(spool, 1)
    entry.next_attempt = 1_800_000_000.25
    spool.update(entry)
    tick = time.time_ns()  # every file's time, while the file system's clock stands

    def coarse() -> list[tuple[str, Stamp, Stamp | None]]:
        found = Spool.stamps(spool)
        return [
            (q, (e[0], e[1], tick, tick), None if r is None else (r[0], r[1], tick, tick))
            for q, e, r in found
        ]

    monkeypatch.setattr(spool, "stamps", coarse, raising=False)
    clock = [tick / 1e9]
    engine = Engine(spool, lambda: policy, attempt, Recorder(None), clock=lambda: clock[0])
    reads = _counted(spool, monkeypatch)
    engine._read_schedule()
    assert reads == {entry.queue_id: 1}

    record = spool.directory / "env" / f"{entry.queue_id}.json"
    _rewrite_in_place(record, b"1800000000.25", b"1800000900.25")
    clock[0] += 60
    reads.clear()
    schedule = engine._read_schedule()[0]
    assert reads == {entry.queue_id: 1}
    assert schedule[entry.queue_id][0] == 1_800_000_900.25

    clock[0] += 60
    reads.clear()
    assert engine._read_schedule()[0] == schedule
    assert not reads


def test_a_record_rewritten_with_its_inode_and_size_is_read_again_by_its_times(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4 gives every second rewrite of a record the inode it had, and a
    deferral leaves the size as it was: only the file's times tell the change."""
    (entry,) = _queued(spool, 1)
    entry.next_attempt = 1_800_000_000.25
    spool.update(entry)
    clock = [time.time() + 60]
    engine = Engine(spool, lambda: policy, attempt, Recorder(None), clock=lambda: clock[0])
    reads = _counted(spool, monkeypatch)
    engine._read_schedule()
    assert reads == {entry.queue_id: 1}

    record = spool.directory / "env" / f"{entry.queue_id}.json"
    time.sleep(0.01)  # a tick of the file system's clock, fine-grained here
    _rewrite_in_place(record, b"1800000000.25", b"1800000500.25")
    clock[0] += 60
    reads.clear()
    assert engine._read_schedule()[0][entry.queue_id][0] == 1_800_000_500.25
    assert reads == {entry.queue_id: 1}


def _rewrite_in_place(path: Path, old: bytes, new: bytes) -> None:
    """The same inode and size, as a write in the same tick of the clock leaves it."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    with path.open("r+b") as record:
        record.write(data.replace(old, new))


async def test_a_backlog_due_at_once_starts_in_slices(spool: Spool, policy: Policy) -> None:
    """Released after an outage, every waiting message was started in one turn of
    the event loop, each reading its record there: with 50,000 waiting, nothing
    was accepted or delivered for seconds."""
    entries = [make_entry(size=len(MESSAGE)) for _ in range(300)]
    for entry in entries:
        spool.put(entry, MESSAGE)
    engine = Engine(spool, lambda: policy, attempt, Recorder(None))
    assert await engine._rescan()
    engine._start_due()
    started = len(engine._busy)
    assert 0 < started <= 20
    assert engine._sleep() == 0.0  # the rest at the next turn
    await engine.stop(10)


async def test_a_message_handed_over_at_acceptance_is_not_read_at_the_next_rescan(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its record is what the receiving side stored: read again, each worker read
    every message accepted since its last rescan, 20,000 of them after a burst."""
    later = time.time() + 3600
    entry = make_entry(size=len(MESSAGE), next_attempt=later)
    assert spool.put_many([(entry, (MESSAGE,))], hold=True) == [None]
    lock = spool.detach(entry.queue_id)
    assert lock is not None
    engine = Engine(spool, lambda: policy, attempt, Recorder(None))
    engine.submit(entry.queue_id, when=later, warm=Warm(lock, entry, MESSAGE))
    reads = _counted(spool, monkeypatch)
    schedule = engine._read_schedule()[0]
    assert not reads
    assert schedule[entry.queue_id][0] == later
    await engine.stop(10)


async def test_mail_goes_out_while_the_first_scan_reads_a_large_queue(
    spool: Spool, policy: Policy
) -> None:
    """At a start every record was read before the first delivery: with 50,000
    queued, mail accepted just after the start waited 2.5 to 4.5 s for the
    read, and the backlog as long. Now the oldest records read are delivered
    while the scan reads on, and new mail as soon as it is handed over."""
    count = 5000
    backlog = [make_entry(size=len(MESSAGE), arrival=time.time() - 600) for _ in range(count)]
    for start in range(0, count, 500):
        assert not any(spool.put_many([(e, (MESSAGE,)) for e in backlog[start : start + 500]]))
    fresh = make_entry(size=len(MESSAGE))
    spool.put(fresh, MESSAGE)
    engine: Engine
    read_when_sent: dict[str, int] = {}
    sent = asyncio.Event()

    async def sending(*args: Any, envelope_id: str, **kw: Any) -> Attempt:
        """The relay's own attempt, noting how many records were read when it began."""
        read_when_sent.setdefault(envelope_id, engine._records.reads)
        if len(read_when_sent) >= 2 and fresh.queue_id in read_when_sent:
            sent.set()
        return await attempt(*args, envelope_id=envelope_id, **kw)

    engine = Engine(spool, lambda: policy, sending, Recorder(None))
    running = asyncio.ensure_future(engine.run())
    engine.submit(fresh.queue_id)
    await asyncio.wait_for(sent.wait(), 60)
    await engine.stop(10)
    await running
    assert read_when_sent[fresh.queue_id] < count
    oldest = min(e.queue_id for e in backlog)  # the first the scan reads
    assert read_when_sent[oldest] < count, sorted(read_when_sent)[:3]
