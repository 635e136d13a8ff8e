"""A delivered entry leaves the spool only once its outcome is on disk in the audit
log: its final records get no fsync of their own, so it waits, still locked, for
one that covers them (the next accepted message's, or the engine's own)."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from relay import engine as engine_module
from relay import settle as settle_module
from relay.audit import AuditLog, events, reader, verify
from relay.deliver import attempt
from relay.engine import Engine
from relay.policy.model import Policy, SuppressionSettings
from relay.queueid import new_queue_id
from relay.record import Recorder
from relay.settle import Settled, settle_recorded
from relay.spool import QueueEntry, Spool
from relay.spool import store as store_module
from relay.suppression import MANUAL, Suppression, SuppressionFile, now
from tests import minimal_policy
from tests.readonly import read_only
from tests.spoolkit import make_entry, run_script
from tests.test_engine_warm import accept, delivered, lock_elsewhere, message, running

DELIVERED = [("delivered", "customer@example.net"), ("delivered", "archive@acme.example")]


def outcomes(audit: Path, queue_id: str) -> list[tuple[str, str | None]]:
    return [
        (r["event"], r.get("recipient"))
        for r in reader.records(audit)
        if r.get("queue_id") == queue_id
    ]


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_delivered_entry_stays_locked_until_its_records_are_fsynced(
    spool: Spool, policy: Policy, outbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "POLL", 3600.0)  # no quiet-relay fsync meanwhile
    audit = AuditLog(tmp_path / "audit")
    audit.append(events.failed(queue_id="OLDER", message_id=None, recipient="a@b", reply="550"))
    engine = Engine(spool, lambda: policy, attempt, Recorder(audit))
    first, second = (make_entry(size=len(message(n))) for n in (1, 2))
    engine.submit(first.queue_id, warm=accept(spool, first, message(1)))
    async with running(engine):
        assert await delivered(outbox, 1) == [message(1)]
        await until(lambda: outcomes(audit.directory, first.queue_id) == DELIVERED, "records")
        assert spool.ids() == [first.queue_id]
        assert lock_elsewhere(spool, first.queue_id) == "busy"  # nobody delivers it again
        # what an accepted message's fsync does: it covers the first entry's records
        audit.append(events.failed(queue_id="NEWER", message_id=None, recipient="a@b", reply="550"))
        engine.submit(second.queue_id, warm=accept(spool, second, message(2)))
        assert len(await delivered(outbox, 2)) == 2
        await until(lambda: spool.ids() == [second.queue_id], "the first one removed")
        assert lock_elsewhere(spool, second.queue_id) == "busy"
    assert spool.ids() == []  # the stop made the second one's records durable, then removed it
    assert outcomes(audit.directory, second.queue_id) == DELIVERED
    assert verify(audit.directory).ok


def fsyncs_of(monkeypatch: pytest.MonkeyPatch, failing: Callable[[str], bool]) -> list[str]:
    """The names of the files fsynced from now on; an fsync of a name ``failing``
    accepts fails, as a disk's I/O error would."""
    names: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        names.append(name)
        if failing(name):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return names


async def test_a_quiet_engine_settles_its_delivered_entries_within_a_poll(
    spool: Spool, policy: Policy, outbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "POLL", 0.2)
    audit = AuditLog(tmp_path / "audit")
    entry = make_entry(size=len(message(1)))
    engine = Engine(spool, lambda: policy, attempt, Recorder(audit))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
    msg = str(spool.directory / "msg")

    def removed_after_its_records() -> bool:
        """The entry gone, and msg/ fsynced after the audit file: waited for as
        one, since the entry's file is renamed away before the spool counts the
        removal, and the count read between the two said nothing was pending."""
        files = reader.day_files(audit.directory)
        if spool.ids() or not files or str(files[-1].path) not in fsynced:
            return False
        return msg in fsynced[fsynced.index(str(files[-1].path)) + 1 :]

    async with running(engine):
        fsynced = fsyncs_of(monkeypatch, lambda name: False)
        assert await delivered(outbox, 1) == [message(1)]
        await until(removed_after_its_records, "settled, durably, after its records", timeout=5)
        await until(lambda: not spool.removals_pending, "the removal counted durable", timeout=5)
    assert outcomes(audit.directory, entry.queue_id) == DELIVERED


async def test_records_an_fsync_failure_put_in_doubt_are_written_again(
    spool: Spool, policy: Policy, outbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the kernel may have dropped the records: they are written
    again, so the log may name the outcome twice, but never lacks it."""
    monkeypatch.setattr(engine_module, "POLL", 0.2)
    audit = AuditLog(tmp_path / "audit")
    audit.append(events.failed(queue_id="OLDER", message_id=None, recipient="a@b", reply="550"))
    entry = make_entry(size=len(message(1)))
    engine = Engine(spool, lambda: policy, attempt, Recorder(audit))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
    broken = [True]
    fsynced = fsyncs_of(monkeypatch, lambda name: broken[0] and name.endswith(".jsonl"))
    async with running(engine):
        assert await delivered(outbox, 1) == [message(1)]
        await until(lambda: any(name.endswith(".jsonl") for name in fsynced), "a failed fsync")
        assert spool.ids() == [entry.queue_id]
        assert lock_elsewhere(spool, entry.queue_id) == "busy"
        broken[0] = False
        await until(lambda: spool.ids() == [], "removed once written again")
    assert outcomes(audit.directory, entry.queue_id) == DELIVERED + DELIVERED
    assert verify(audit.directory).ok


async def test_an_attempt_that_outlives_the_stop_settles_at_once(
    spool: Spool, policy: Policy, outbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "POLL", 3600.0)
    audit = AuditLog(tmp_path / "audit")
    gate, sending = asyncio.Event(), asyncio.Event()

    async def slow_upstream(*args: Any, **_: Any) -> Any:
        """Deaf to the stop's cancelling it: it outlives the stop."""
        sending.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            await gate.wait()
        return await attempt(*args)

    engine = Engine(spool, lambda: policy, slow_upstream, Recorder(audit))
    entry = make_entry(size=len(message(1)))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
    task = asyncio.create_task(engine.run())
    try:
        await asyncio.wait_for(sending.wait(), 10)
        await engine.stop(0.1)
        gate.set()
        assert await delivered(outbox, 1) == [message(1)]
        await until(lambda: spool.ids() == [], "removed after the stop")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert outcomes(audit.directory, entry.queue_id) == DELIVERED
    assert lock_elsewhere(spool, entry.queue_id) == "gone"


async def test_a_delivered_entry_its_removal_fails_for_is_not_delivered_again(
    spool: Spool,
    policy: Policy,
    outbox: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Let go when its removal failed, it was delivered again at every scan of the
    spool, by every worker, for as long as the queue directory refused removals."""
    caplog.set_level(logging.INFO, logger="relay")
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "RESCAN", 0.1)
    audit = AuditLog(tmp_path / "audit")
    entries = [make_entry(size=len(message(n))) for n in (1, 2)]
    stored = spool.put_many([(entry, (message(n),)) for n, entry in enumerate(entries, 1)])
    assert stored == [None, None]
    ids = [entry.queue_id for entry in entries]
    async with running(Engine(spool, lambda: policy, attempt, Recorder(audit))):
        with read_only(spool.directory / "msg", 0o500):
            assert len(await delivered(outbox, 2)) == 2
            await asyncio.sleep(1.0)  # a scan of the spool every 0.1 s
            assert len(list(outbox.glob("*.eml"))) == 2
            assert sorted(spool.ids()) == sorted(ids)
            assert [lock_elsewhere(spool, q) for q in ids] == ["busy", "busy"]  # other workers
        await until(lambda: spool.ids() == [], "removed once the directory lets them go")
    assert len(list(outbox.glob("*.eml"))) == 2
    assert len([m for m in caplog.messages if "cannot be removed" in m]) == 1
    assert "delivered messages leave the queue again" in caplog.messages
    for queue_id in ids:
        assert outcomes(audit.directory, queue_id) == DELIVERED


async def test_an_entry_not_removed_stays_when_the_directory_fsync_fails_too(
    spool: Spool, policy: Policy, outbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One removal round: a small entry's file cannot be moved aside and a large
    one's unlink cannot be fsynced (EIO, once each). The small one must stay
    locked and waiting, not be let go with the others and delivered again."""
    monkeypatch.setattr(engine_module, "POLL", 0.3)
    monkeypatch.setattr(engine_module, "RESCAN", 0.2)
    audit = AuditLog(tmp_path / "audit")
    small = make_entry(size=len(message(1)))
    large_data = message(2, size=store_module.RECYCLE_SIZE * 2)
    large = make_entry(size=len(large_data))
    fault = {"on": False}
    recycle, sync_msg = Spool._recycle, Spool._sync_msg

    def failing_recycle(self: Spool, path: str, queue_id: str) -> str | None:
        if fault["on"] and queue_id == small.queue_id:
            raise OSError(5, "Input/output error")
        return recycle(self, path, queue_id)

    def failing_sync(self: Spool) -> None:
        if fault["on"]:
            fault["on"] = False
            raise store_module.SpoolError(self.directory, "Input/output error")
        sync_msg(self)

    monkeypatch.setattr(Spool, "_recycle", failing_recycle)
    monkeypatch.setattr(Spool, "_sync_msg", failing_sync)
    engine = Engine(spool, lambda: policy, attempt, Recorder(audit))
    engine.submit(small.queue_id, warm=accept(spool, small, message(1)))
    engine.submit(large.queue_id, warm=accept(spool, large, large_data))
    fault["on"] = True
    async with running(engine):
        await delivered(outbox, 2)
        await until(lambda: not fault["on"], "the removal round")
        await asyncio.sleep(1.0)  # rescans every 0.2 s
        await until(lambda: spool.ids() == [], "removed at a later round")
    assert len(list(outbox.glob("*.eml"))) == 2
    assert outcomes(audit.directory, small.queue_id) == DELIVERED


def test_an_entry_whose_file_went_meanwhile_is_let_go_not_kept_as_stuck(
    spool: Spool, tmp_path: Path
) -> None:
    """Its outcome is on disk and nothing is left to remove: kept waiting, its
    lock was held for good, it was reported as an entry the queue refuses to
    remove, and it took a place among those that may wait."""
    audit = AuditLog(tmp_path / "audit")
    settler = settle_module.Settler(spool, Recorder(audit))
    entry = make_entry(size=len(message(1)))
    spool.put(entry, message(1))
    lock = settle_module.EntryLock(spool.acquire(entry.queue_id))
    records = [delivered_to(entry, r.address) for r in entry.recipients]
    finished = settle_module.Finished(entry.queue_id, records, lock, entry.size)
    spool.message_path(entry.queue_id).unlink()
    assert settler.finish_many([finished, settle_module.Settle()]) == [None, None]
    assert settler.waiting == 0 and not settler.stuck(entry.queue_id)
    assert lock.fd is None
    assert outcomes(audit.directory, entry.queue_id) == DELIVERED


def _settler_one_short_of_full(
    spool: Spool, audit: AuditLog
) -> tuple[settle_module.Settler, list[settle_module.Finished]]:
    """A settler holding ``WAITING_MAX`` - 1 finished entries, and the one that fills it."""
    settler = settle_module.Settler(spool, Recorder(audit))
    items = []
    for n in range(settle_module.WAITING_MAX):
        entry = make_entry(size=len(message(n)))
        spool.put(entry, message(n))
        lock = settle_module.EntryLock(spool.acquire(entry.queue_id))
        records = [delivered_to(entry, r.address) for r in entry.recipients]
        items.append(settle_module.Finished(entry.queue_id, records, lock, entry.size))
    assert settler.finish_many(items[:-1]) == [None] * (len(items) - 1)
    return settler, items


def test_the_entry_that_fills_the_settler_makes_the_records_durable_itself(
    spool: Spool, tmp_path: Path
) -> None:
    """The engine starts no delivery while ``WAITING_MAX`` entries wait: unless
    the batch that fills it fsyncs the audit log, deliveries stand still until
    the next quiet-relay poll, and the entries stay locked until then."""
    audit = AuditLog(tmp_path / "audit")
    settler, items = _settler_one_short_of_full(spool, audit)
    assert settler.waiting == len(items) - 1 and len(spool.ids()) == len(items)
    assert settler.finish_many(items[-1:]) == [None]
    assert settler.waiting == 0 and spool.ids() == []
    assert all(item.lock.fd is None for item in items)


def test_a_batch_that_fills_the_settler_says_when_it_cannot_make_its_records_durable(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing else says it: no look asked for that fsync, and with the settler
    full no delivery starts, so the sysadmin's only word of the stand-still is
    this line; the entries stay queued, locked, for the next try."""
    audit = AuditLog(tmp_path / "audit")
    settler, items = _settler_one_short_of_full(spool, audit)
    fsyncs_of(monkeypatch, lambda name: name.startswith(str(audit.directory)))
    assert settler.finish_many(items[-1:]) == [None]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert [line.split(": ")[0] for line in said] == [
        "delivered messages stay in the queue for now"
    ]
    assert "Input/output error" in said[0]
    assert settler.waiting == len(items) and len(spool.ids()) == len(items)
    assert all(item.lock.fd is not None for item in items)
    settler.finish_many([settle_module.Settle(final=True)])


async def test_another_worker_tries_an_entry_held_for_long_less_and_less_often(
    spool: Spool, policy: Policy, outbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose removals fail holds its delivered entries; another one
    found each locked and tried it again once a POLL, for as long as that lasted."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "RESCAN", 1.0)
    audit = AuditLog(tmp_path / "audit")
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    other = Spool(spool.directory)  # as another worker process opens it
    tries: list[str] = []
    acquire = other.acquire

    def counted(queue_id: str, blocking: bool = True) -> int:
        tries.append(queue_id)
        return acquire(queue_id, blocking)

    monkeypatch.setattr(other, "acquire", counted)
    first = Engine(spool, lambda: policy, attempt, Recorder(audit))
    async with running(first):
        with read_only(spool.directory / "msg", 0o500):
            await delivered(outbox, 1)
            await until(lambda: first._settler.stuck(entry.queue_id), "held, not removable")
            async with running(Engine(other, lambda: policy, attempt, Recorder(audit))):
                await asyncio.sleep(3.0)  # 60 tries once a POLL
    assert 0 < len(tries) < 15
    assert len(list(outbox.glob("*.eml"))) == 1


def refused(base: str, mode: str) -> None:
    """In a process of its own (a file-size limit is per process), the audit log
    refuses the final records. ``recover``: then takes them once there is room.
    ``stop``: never does; two entries wait, the third is due later, and the engine
    stops. ``slot``: the same, but the third has begun and waits for a slot, with
    room for one waiting entry only."""
    engine_module.POLL = 0.2
    if mode == "slot":
        settle_module.WAITING_MAX = 1  # full when one ends
    directory = Path(base)
    audit = AuditLog(directory / "audit")
    audit.append(events.failed(queue_id="OLDER", message_id=None, recipient="a@b", reply="550"))
    spool = Spool(directory / "spool")
    policy = minimal_policy.delivering_to(directory / "outbox")
    if mode == "slot":  # all three start at once; the third waits for a slot
        policy = dataclasses.replace(policy, queue=dataclasses.replace(policy.queue, concurrency=2))
    errors: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("relay").addHandler(handler)
    logging.getLogger("relay").setLevel(logging.INFO)
    entries = [make_entry(size=len(message(n))) for n in range(1 if mode == "recover" else 3)]
    warm = [accept(spool, entry, message(n)) for n, entry in enumerate(entries)]
    size = (directory / "audit" / reader.file_name(datetime.now(UTC).date())).stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 64, hard))  # the outbox files fit

    def locked() -> list[bool]:
        states = []
        for entry in entries:
            fd = os.open(spool.message_path(entry.queue_id), os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                states.append(False)
            except BlockingIOError:
                states.append(True)
            finally:
                os.close(fd)
        return states

    async def main() -> dict[str, object]:
        engine = Engine(spool, lambda: policy, attempt, Recorder(audit))
        first = len(entries) if mode == "slot" else 2
        for entry, handed in zip(entries[:first], warm[:first], strict=False):
            engine.submit(entry.queue_id, warm=handed)
        found: dict[str, object] = {"ids": [entry.queue_id for entry in entries]}
        async with running(engine):
            await delivered(directory / "outbox", min(len(entries), 2))
            for entry in entries[:2]:  # both wait: the third may not start

                def refused_for(queue_id: str = entry.queue_id) -> bool:
                    return any("AUDIT LOG WRITE FAILED" in e and queue_id in e for e in errors)

                await until(refused_for, "refused")
            for entry, handed in zip(entries[first:], warm[first:], strict=True):
                engine.submit(entry.queue_id, warm=handed)
            await asyncio.sleep(0.6)  # a few POLLs: each tries again, and fails
            found["delivered"] = len(list((directory / "outbox").glob("*.eml")))
            found["kept"] = spool.ids()
            found["locked"] = locked()
            if mode == "recover":
                resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
                await until(lambda: spool.ids() == [], "removed once written")
        found["after"] = spool.ids()
        found["locked_after"] = [] if mode == "recover" else locked()
        found["errors"] = errors
        return found

    print(json.dumps(asyncio.run(main())))


def run_refused(tmp_path: Path, mode: str) -> dict[str, Any]:
    script = "import sys\nfrom tests.test_engine_settle import refused\nrefused(*sys.argv[1:])\n"
    return json.loads(run_script(script, str(tmp_path), mode).splitlines()[-1])


def test_final_records_the_audit_log_refuses_are_written_again_before_removal(
    tmp_path: Path,
) -> None:
    found = run_refused(tmp_path, "recover")
    assert found["kept"] == found["ids"] and found["locked"] == [True]
    assert found["after"] == []
    assert outcomes(tmp_path / "audit", found["ids"][0]) == DELIVERED  # once: none was written
    assert verify(tmp_path / "audit").ok
    said = [e for e in found["errors"] if "audit log takes them" in e or "on record and" in e]
    assert len(said) == 2 and "leave the queue again" in said[1], found["errors"]


@pytest.mark.parametrize("mode", ["stop", "slot"])
def test_with_the_audit_log_refusing_deliveries_pause_and_the_stop_lets_go(
    tmp_path: Path, mode: str
) -> None:
    """Entries that cannot be settled are let go at the stop, to be delivered (and
    recorded) again after a restart, once the log takes records; and none starts
    after the log refused one, far below ``WAITING_MAX``, whether the next one is
    due later (``stop``) or already waits for a slot (``slot``)."""
    found = run_refused(tmp_path, mode)
    assert found["delivered"] == 2  # the third waits for the audit log
    assert sorted(found["kept"]) == sorted(found["ids"])
    # two delivered and waiting; the third handed over and not begun, or let go of
    # when its turn came (read back from the spool later)
    assert found["locked"] == [True, True, mode == "stop"]
    assert sorted(found["after"]) == sorted(found["ids"])
    assert found["locked_after"] == [False, False, False]
    assert any("stay in the queue until the audit log takes them" in e for e in found["errors"])


@pytest.mark.parametrize("left", ["", "large", "no room"], ids=["small", "large", "no-room"])
async def test_the_thread_that_fsyncs_the_log_removes_what_it_covered(
    spool: Spool,
    policy: Policy,
    outbox: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    left: str,
) -> None:
    """What the accepting thread does after its fsync: waiting entries go at once,
    not at the next finished delivery (a crash would have them delivered again);
    those whose files would be unlinked, and that unlink fsynced at once, are
    left to the finishing thread: large ones, and any when the process keeps
    as many free files as it may."""
    monkeypatch.setattr(engine_module, "POLL", 3600.0)
    if left == "large":
        monkeypatch.setattr(settle_module, "SMALL", len(message(1)) - 1)
    if left == "no room":
        monkeypatch.setattr(store_module, "RECYCLE_MAX", 0)
    audit = AuditLog(tmp_path / "audit")
    engine = Engine(spool, lambda: policy, attempt, Recorder(audit))
    entry = make_entry(size=len(message(1)))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
    async with running(engine):
        assert await delivered(outbox, 1) == [message(1)]
        await until(lambda: outcomes(audit.directory, entry.queue_id) == DELIVERED, "records")
        engine.remove_covered()  # nothing covered it yet
        assert spool.ids() == [entry.queue_id]
        audit.append(events.failed(queue_id="NEWER", message_id=None, recipient="a@b", reply="550"))
        for _ in range(200):  # the finishing thread may still be at work for a moment
            engine.remove_covered()
            if spool.ids() == []:
                break
            await asyncio.sleep(0.01)
        assert spool.ids() == ([entry.queue_id] if left else [])
    assert spool.ids() == []  # the one left: the stop's settling, in the finishing thread


def test_a_restart_removes_entries_whose_outcome_the_log_has_and_no_other(
    spool: Spool, tmp_path: Path
) -> None:
    """A crashed worker's waiting entries: delivered, on record, not yet removed."""
    audit = AuditLog(tmp_path / "audit")
    done, half, untouched, held, stale = (make_entry(size=len(message(n))) for n in range(5))
    for n, entry in enumerate((done, half, untouched, held, stale)):
        assert spool.put_many([(entry, (message(n),))]) == [None]
    recipients = [r.address for r in done.recipients]
    audit.append_many(
        [delivered_to(done, a) for a in recipients]
        + [delivered_to(half, recipients[0])]
        + [delivered_to(held, a) for a in recipients]
        + [delivered_to(stale, a) for a in recipients],
        sync=False,  # as a crashed worker left them: written, perhaps not fsynced
    )
    audit.append(  # a later attempt's outcome replaces the earlier one
        events.deferred(
            queue_id=stale.queue_id,
            message_id=None,
            recipient=recipients[0],
            reply="451 later",
            next_attempt=datetime.now(UTC),
        )
    )
    with spool.lock(held.queue_id):  # a live worker's entry
        assert settle_recorded(spool, audit).finished == [done.queue_id]
    assert sorted(spool.ids()) == sorted(e.queue_id for e in (half, untouched, held, stale))
    assert sorted(outcomes(audit.directory, done.queue_id)) == sorted(DELIVERED * 2)  # again
    assert settle_recorded(spool, audit).finished == [held.queue_id]
    assert verify(audit.directory).ok


def test_outcomes_a_restart_wrote_again_count_once_in_the_audit_tools(
    spool: Spool, tmp_path: Path
) -> None:
    """The records a restart relies on are appended again (a failed fsync before the
    crash may have kept them off the disk), with a new time: report, show and
    search counted each delivery twice, more than the upstream received."""
    from relay.audit.search import report, search, show
    from tests.test_audit_fixture import received

    audit = AuditLog(tmp_path / "audit")
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    recipients = [r.address for r in entry.recipients]
    ids = (entry.queue_id, "<m1@acme.example>")
    audit.append(received(ids, "acme", "jan", "invoice", recipients))
    audit.append_many([delivered_to(entry, a) for a in recipients], sync=False)
    assert settle_recorded(spool, audit).finished == [entry.queue_id]
    written = outcomes(audit.directory, entry.queue_id)[1:]
    assert sorted(written) == sorted(DELIVERED * 2)  # in the log twice
    assert [(r["tenant"], r["delivered"]) for r in report(audit.directory)] == [("acme", 2)]
    shown = [r["event"] for r in show(audit.directory, entry.queue_id)]
    assert shown == ["received", "delivered", "delivered"]
    assert len(list(search(audit.directory, status="delivered"))) == 2
    assert len(list(search(audit.directory, tenant="acme", status="delivered"))) == 2


def test_a_restart_settles_an_entry_whose_recipient_was_listed_while_it_waited(
    spool: Spool, tmp_path: Path
) -> None:
    """A recipient listed while its message waited ends ``suppressed``: not taken
    for an end, a restart tried the message again, with a second record and a
    second notice. The record written again counts once in the tools."""
    from relay.audit.search import show

    audit = AuditLog(tmp_path / "audit")
    entry = make_entry(size=len(message(1)))
    customer, sender = (r.address for r in entry.recipients)
    assert spool.put_many([(entry, (message(1),))]) == [None]
    late = events.suppressed(
        queue_id=entry.queue_id,
        message_id=None,
        recipient=customer,
        reason="complaint",
        since="2026-12-06T10:00:00.000Z",
    )
    audit.append_many([late, delivered_to(entry, sender)])
    assert settle_recorded(spool, audit).finished == [entry.queue_id]
    assert spool.ids() == []
    shown = [r["event"] for r in show(audit.directory, entry.queue_id)]
    assert shown.count("suppressed") == 1 and shown.count("delivered") == 1


def test_a_restart_settles_an_entry_whose_sender_was_told_and_got_the_copy(
    spool: Spool, tmp_path: Path
) -> None:
    """The failure notice's record names the sender, who is also the automatic
    BCC recipient: it says nothing of that copy's delivery, which stands."""
    audit = AuditLog(tmp_path / "audit")
    entry = make_entry(size=len(message(1)))
    customer, sender = (r.address for r in entry.recipients)
    assert spool.put_many([(entry, (message(1),))]) == [None]
    audit.append_many(
        [
            events.failed(
                queue_id=entry.queue_id, message_id=None, recipient=customer, reply="550 no"
            ),
            delivered_to(entry, sender),
            events.notified(
                queue_id=entry.queue_id,
                message_id=None,
                recipient=sender,
                notice_queue_id="NOTICE",
            ),
        ]
    )
    assert settle_recorded(spool, audit).finished == [entry.queue_id]
    assert spool.ids() == []


def delivered_to(entry: QueueEntry, address: str) -> dict[str, Any]:
    return events.delivered(
        queue_id=entry.queue_id,
        message_id=entry.message_id,
        recipient=address,
        upstream="default",
        reply="250 ok",
        attempts=1,
    )


def test_a_restart_reads_only_the_end_of_the_log(spool: Spool, tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit")
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    for address in (r.address for r in entry.recipients):
        audit.append(
            events.failed(
                queue_id=entry.queue_id, message_id=None, recipient=address, reply="550 no"
            )
        )
    later = [
        events.failed(queue_id=f"OTHER{n}", message_id=None, recipient="a@b", reply="550")
        for n in range(400)  # beyond the wider second read, too
    ]
    audit.append_many(later)
    assert settle_recorded(spool, audit, budget=2000) == Settled()  # older than what it read
    assert spool.ids() == [entry.queue_id]
    assert settle_recorded(spool, audit).finished == [entry.queue_id]
    assert spool.ids() == []


def queued(entry: QueueEntry) -> dict[str, Any]:
    """The record the accepting worker writes before its 250."""
    return events.queued(
        queue_id=entry.queue_id,
        message_id=entry.message_id,
        recipients=[r.address for r in entry.recipients],
        size=entry.size,
    )


def made_at(when: float, **changes: Any) -> QueueEntry:
    """An entry whose queue ID was made at ``when``, as the accepting worker makes it."""
    return make_entry(new_queue_id(int(when * 1e9)), arrival=when, **changes)


def test_a_restart_removes_what_was_stored_but_never_recorded(spool: Spool, tmp_path: Path) -> None:
    """A worker killed between the spool write and the audit write: no 250 went
    out, and delivering the message would send it twice, once with no trail."""
    now = time.time()
    clock = {"now": now - 60}
    audit = AuditLog(tmp_path / "audit", clock=lambda: datetime.fromtimestamp(clock["now"], UTC))
    audit.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="0" * 64))
    clock["now"] = now
    lost, acknowledged, attempted, notice, early, busy = (
        made_at(now - 30),
        made_at(now - 30),
        made_at(now - 30),
        made_at(now - 30, is_notice=True),
        made_at(now - 59),  # too close to the oldest record read to tell
        made_at(now - 30),
    )
    entries = (lost, acknowledged, attempted, notice, early, busy)
    for n, entry in enumerate(entries):
        assert spool.put_many([(entry, (message(n),))]) == [None]
    audit.append(queued(acknowledged))
    with spool.lock(attempted.queue_id):
        attempted.attempts = 1
        spool.update(attempted)
    before = len(list(reader.recent(audit.directory, 1 << 20)))
    with spool.lock(busy.queue_id):  # a live worker's, still waiting for its records
        assert settle_recorded(spool, audit) == Settled(unrecorded=[lost.queue_id])
    assert sorted(spool.ids()) == sorted(e.queue_id for e in entries if e is not lost)
    assert len(list(reader.recent(audit.directory, 1 << 20))) == before  # nothing to record
    assert settle_recorded(spool, audit) == Settled(unrecorded=[busy.queue_id])


def test_a_message_acknowledged_while_the_log_is_read_is_left_alone(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor settles a dead worker's entries while the others accept:
    one of them stored a message before the log was read, wrote its records,
    answered 250 and let go of the lock before the entry was locked here (at
    once for a message over 1 MiB). Removed as never acknowledged, it was lost."""
    now = time.time()
    clock = {"now": now - 60}
    audit = AuditLog(tmp_path / "audit", clock=lambda: datetime.fromtimestamp(clock["now"], UTC))
    audit.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="0" * 64))
    clock["now"] = now
    lost, accepted = made_at(now - 30), made_at(now - 1)
    assert spool.put_many([(lost, (message(1),))]) == [None]
    assert spool.put_many([(accepted, (message(2),))], hold=True) == [None]
    read = settle_module._Tail.read

    def read_meanwhile(directory: Path, queued_ids: set[str], budget: int) -> Any:
        tail = read(directory, queued_ids, budget)
        audit.append(queued(accepted))  # the live worker's records, its 250, its lock let go
        spool.release(accepted.queue_id)
        return tail

    monkeypatch.setattr(settle_module._Tail, "read", read_meanwhile)
    assert settle_recorded(spool, audit) == Settled(unrecorded=[lost.queue_id])
    assert spool.ids() == [accepted.queue_id]


def test_the_records_written_since_a_mark_are_read_from_the_line_it_fell_in(
    tmp_path: Path,
) -> None:
    audit = AuditLog(tmp_path / "audit")
    audit.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="0" * 64))
    (day,) = reader.day_files(audit.directory)
    whole = day.path.read_bytes()
    audit.append(queued(make_entry(queue_id="0000000000000001")))
    half = reader.Mark(day.name, len(whole) + 10)  # taken while that record was written
    assert [r["queue_id"] for r in reader.since(audit.directory, half)] == ["0000000000000001"]
    assert list(reader.since(audit.directory, reader.mark(audit.directory))) == []


def test_the_records_written_since_a_mark_are_read_from_its_file_compressed_since(
    tmp_path: Path,
) -> None:
    """A compressor of the sysadmin's (logrotate) gzipped the marked day file
    before the second read, which passed it over: an entry acknowledged in the
    meantime was taken for one never acknowledged. A file removed is passed over."""
    audit = AuditLog(tmp_path / "audit")
    audit.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="0" * 64))
    end = reader.mark(audit.directory)
    audit.append(queued(make_entry(queue_id="0000000000000001")))
    audit.close()
    (day,) = reader.day_files(audit.directory)
    subprocess.run(["gzip", str(day.path)], check=True, timeout=30)
    named = [r.get("queue_id") for r in reader.since(audit.directory, end)]
    assert "0000000000000001" in named, named
    gone = reader.Mark("audit-2000-01-01.jsonl", 0)
    assert "0000000000000001" in [r.get("queue_id") for r in reader.since(audit.directory, gone)]


def test_a_log_restored_from_an_older_copy_removes_no_message_it_does_not_name(
    spool: Spool, tmp_path: Path
) -> None:
    """The relay refuses to start without its audit directory and advises a
    restore from a backup: done, the mail accepted since the backup (250
    given) was removed as never acknowledged, with no record of it."""
    now = time.time()
    clock = {"now": now - 60}
    witness = tmp_path / "audit.head"
    audit = AuditLog(
        tmp_path / "audit",
        clock=lambda: datetime.fromtimestamp(clock["now"], UTC),
        witness=witness,
    )
    audit.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="0" * 64))
    shutil.copytree(tmp_path / "audit", tmp_path / "backup")
    clock["now"] = now
    accepted = made_at(now - 30)
    assert spool.put_many([(accepted, (message(1),))]) == [None]
    audit.append(queued(accepted))
    audit.close()
    shutil.rmtree(tmp_path / "audit")
    shutil.copytree(tmp_path / "backup", tmp_path / "audit")  # as the relay advised
    restored = AuditLog(tmp_path / "audit", witness=witness)
    assert restored.behind() == (1, 2)
    assert settle_recorded(spool, restored) == Settled(behind=(1, 2))
    assert spool.ids() == [accepted.queue_id]
    restored.close()
    unwitnessed = AuditLog(tmp_path / "audit")  # as before: the witness is what tells
    assert settle_recorded(spool, unwitnessed) == Settled(unrecorded=[accepted.queue_id])


def test_a_log_read_too_short_to_tell_is_read_further_back(spool: Spool, tmp_path: Path) -> None:
    now = time.time()
    clock = {"now": now - 60}
    audit = AuditLog(tmp_path / "audit", clock=lambda: datetime.fromtimestamp(clock["now"], UTC))
    audit.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="0" * 64))
    clock["now"] = now
    lost, acknowledged = made_at(now - 30), made_at(now - 30)
    assert spool.put_many([(lost, (message(1),)), (acknowledged, (message(2),))]) == [None, None]
    clock["now"] = now - 30
    audit.append(queued(acknowledged))
    clock["now"] = now
    audit.append_many(
        [
            events.failed(queue_id=f"OTHER{n}", message_id=None, recipient="a@b", reply="550")
            for n in range(40)
        ]
    )
    assert len(b"".join(f.path.read_bytes() for f in reader.day_files(audit.directory))) > 2000
    assert settle_recorded(spool, audit, budget=2000) == Settled(unrecorded=[lost.queue_id])
    assert spool.ids() == [acknowledged.queue_id]


async def test_two_workers_kept_bounces_list_the_first_refusal(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """Each worker keeps what the read-only list refused; the one that writes
    first listed its own, later refusal, and the other, finding the address
    listed, dropped the first: the list said the second."""
    listing = tmp_path / "suppression.jsonl"
    settings = SuppressionSettings(listing, frozenset({"5.1.1"}))
    policy = dataclasses.replace(policy, suppression=settings)

    def worker() -> Engine:
        listed = SuppressionFile(listing)
        return Engine(spool, lambda: policy, attempt, Recorder(None), suppressions=listed)

    first, second = worker(), worker()
    SuppressionFile(listing).create()
    with read_only(listing, 0o444):
        for engine, queue_id in ((first, "Q1"), (second, "Q2")):
            entry = dataclasses.replace(make_entry(), queue_id=queue_id)
            await engine._suppress(
                entry, policy, [("gone@example.org", "550 5.1.1 no such user")], {}
            )
            await asyncio.sleep(0.01)  # a later refusal, a later date
    await second._list_kept()  # the later refusal is written first
    await first._list_kept()
    (entry,) = SuppressionFile(listing).entries().entries
    assert entry.queue_id == "Q1"


async def test_two_workers_refused_the_same_address_at_once_list_it_once(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each looked the address up in the list as it last read it, found it
    not there, and appended its entry: two lines, two ``listed`` records and
    two "on the suppression list now". Decided under the file's lock, the
    second worker finds the first's entry."""
    listing = tmp_path / "suppression.jsonl"
    settings = SuppressionSettings(listing, frozenset({"5.1.1"}))
    policy = dataclasses.replace(policy, suppression=settings)
    engines, recorded = [], []
    for _ in range(2):
        listed = SuppressionFile(listing)
        engine = Engine(spool, lambda: policy, attempt, Recorder(None), suppressions=listed)
        engine.recorder.listed = lambda item, _id: recorded.append(item.queue_id)  # type: ignore[method-assign]
        engines.append(engine)
    first, second = engines
    SuppressionFile(listing).create()
    before = first._suppressions.current()  # type: ignore[union-attr]
    first._suppressions.current = lambda: before  # type: ignore[method-assign,union-attr]
    refused = [("gone@example.org", "550 5.1.1 no such user")]
    caplog.set_level(logging.INFO, logger="relay")
    for engine, queue_id in ((second, "Q2"), (first, "Q1")):
        entry = dataclasses.replace(make_entry(), queue_id=queue_id)
        await engine._suppress(entry, policy, refused, {})
    assert listing.read_bytes().count(b"\n") == 1
    (entry,) = SuppressionFile(listing).entries().entries
    assert entry.queue_id == "Q2"
    assert recorded == ["Q2"]
    said = [
        r.getMessage() for r in caplog.records if "on the suppression list now" in r.getMessage()
    ]
    assert [line.split(":")[0] for line in said] == ["Q2"]


async def test_a_refusal_adds_no_tenant_entry_beside_one_for_every_tenant(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The entry for every tenant, a sysadmin's added after the worker last
    read the list, keeps the address from the tenant's mail already: the
    worker wrote the tenant's entry beside it, logged it and recorded it as
    listed, where only the exact scope was looked for under the lock."""
    listing = tmp_path / "suppression.jsonl"
    settings = SuppressionSettings(listing, frozenset({"5.1.1"}))
    policy = dataclasses.replace(policy, suppression=settings)
    listed = SuppressionFile(listing)
    engine = Engine(spool, lambda: policy, attempt, Recorder(None), suppressions=listed)
    recorded: list[str | None] = []
    engine.recorder.listed = lambda item, _id: recorded.append(item.queue_id)  # type: ignore[method-assign]
    listed.create()
    before = listed.current()
    listed.current = lambda: before  # type: ignore[method-assign]
    sysadmin = Suppression("gone@example.org", None, MANUAL, now(), "asked", by="root")
    SuppressionFile(listing).add([sysadmin])
    caplog.set_level(logging.INFO, logger="relay")
    refused = [("gone@example.org", "550 5.1.1 no such user")]
    await engine._suppress(make_entry(), policy, refused, {})
    assert SuppressionFile(listing).entries().entries == [sysadmin]
    assert recorded == []
    assert not [r for r in caplog.records if "on the suppression list now" in r.getMessage()]
