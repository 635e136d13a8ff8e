"""A just-accepted entry handed straight to the engine (``Warm``): delivered from
memory under the lock the receiving side took, within a memory bound, and let
go of cleanly when the engine stops first."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relay import engine as engine_module
from relay.audit import AuditError, AuditLog, verify
from relay.deliver import SENDER_REFUSED, attempt
from relay.engine import Attempt, Engine, Warm
from relay.policy.model import Policy, SuppressionSettings
from relay.record import Recorder
from relay.spool import QueueEntry, Spool, SpoolError, tools
from relay.spool.store import Stamp
from relay.suppression import SuppressionFile
from relay.upstream.smtp import NOT_SENT
from tests.spoolkit import make_entry, run_script
from tests.test_audit_fixture import read_all

TRY_LOCK = """
import sys
from pathlib import Path
from relay.spool import NoSuchEntry, Spool, SpoolBusy
try:
    with Spool(Path(sys.argv[1])).lock(sys.argv[2], blocking=False):
        print("locked")
except SpoolBusy:
    print("busy")
except NoSuchEntry:
    print("gone")
"""


def message(n: int, size: int = 0) -> bytes:
    return b"Subject: Invoice %d\r\n\r\n" % n + b"x" * size + b"\r\n"


def lock_elsewhere(spool: Spool, queue_id: str) -> str:
    """What another worker process gets when it tries the entry's lock."""
    return run_script(TRY_LOCK, str(spool.directory), queue_id).strip()


@pytest.fixture
def engine(spool: Spool, policy: Policy) -> Engine:
    """Not running yet: what is submitted waits until ``running``."""
    return Engine(spool, lambda: policy, attempt, Recorder(None))


@contextlib.asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Engine]:
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        await engine.stop(5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def queued_and_running(
    spool: Spool, entry: QueueEntry, engine: Engine
) -> AsyncIterator[Engine]:
    """``entry`` in the spool (its message ``message(1)``), then ``engine`` running."""
    assert spool.put_many([(entry, (message(1),))]) == [None]
    async with running(engine):
        yield engine


def accept(spool: Spool, entry: QueueEntry, data: bytes) -> Warm:
    """What the receiving side hands over: the entry stored and still locked."""
    assert spool.put_many([(entry, (data,))], hold=True) == [None]
    lock = spool.detach(entry.queue_id)
    assert lock is not None
    return Warm(lock, entry, data)


async def delivered(outbox: Path, count: int) -> list[bytes]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = sorted(outbox.glob("*.eml")) if outbox.exists() else []
        if len(found) >= count:
            return [path.read_bytes() for path in found]
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} messages delivered in time")


async def removals_durable(spool: Spool) -> None:
    """The engine's own fsync makes the removals durable within a few POLLs."""
    deadline = time.monotonic() + 3 * engine_module.POLL + 5
    while spool.removals_pending:
        assert time.monotonic() < deadline, "the removal was never made durable"
        await asyncio.sleep(0.05)


async def gone(spool: Spool) -> None:
    deadline = time.monotonic() + 20
    while spool.ids():
        assert time.monotonic() < deadline, f"still queued: {spool.ids()}"
        await asyncio.sleep(0.02)


async def test_a_handed_over_entry_stays_locked_until_its_attempt(
    engine: Engine, spool: Spool, outbox: Path
) -> None:
    entry = make_entry(size=len(message(1)))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
    assert lock_elsewhere(spool, entry.queue_id) == "busy"
    async with running(engine):
        assert await delivered(outbox, 1) == [message(1)]
        await gone(spool)
    assert lock_elsewhere(spool, entry.queue_id) == "gone"


async def test_beyond_the_memory_bound_entries_are_let_go_and_read_back(
    engine: Engine, spool: Spool, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "WARM_TOTAL", 3000)
    entries = [make_entry(size=len(message(n, 1000))) for n in range(3)]
    for n, entry in enumerate(entries):
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(n, 1000)))
    states = [lock_elsewhere(spool, entry.queue_id) for entry in entries]
    assert states == ["busy", "busy", "locked"]  # the third would pass the bound
    async with running(engine):
        assert sorted(await delivered(outbox, 3)) == sorted(message(n, 1000) for n in range(3))
        await gone(spool)


async def test_a_large_message_is_never_kept_in_memory(
    engine: Engine, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "WARM_MESSAGE", 500)
    entry = make_entry(size=len(message(1, 1000)))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1, 1000)))
    assert lock_elsewhere(spool, entry.queue_id) == "locked"


async def test_stopping_lets_go_of_entries_not_started(
    engine: Engine, spool: Spool, policy: Policy, outbox: Path
) -> None:
    entry = make_entry(size=len(message(1)))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
    await engine.stop(5)
    assert lock_elsewhere(spool, entry.queue_id) == "locked"
    async with running(Engine(spool, lambda: policy, attempt, Recorder(None))):
        assert await delivered(outbox, 1) == [message(1)]
        await gone(spool)


async def test_a_message_accepted_while_the_engine_reads_the_spool_is_not_forgotten(
    spool: Spool, policy: Policy, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan's result used to replace the schedule, dropping what was submitted
    during it until the next scan a minute later (holding its lock all the while)."""
    scanning, go_on = threading.Event(), threading.Event()
    read = spool.stamps

    def slow_stamps() -> list[tuple[str, Stamp, Stamp | None]]:
        found = read()  # the directory as it was before the new message
        scanning.set()
        go_on.wait(10)
        return found

    monkeypatch.setattr(spool, "stamps", slow_stamps)
    async with running(Engine(spool, lambda: policy, attempt, Recorder(None))) as engine:
        assert await asyncio.to_thread(scanning.wait, 10)
        entry = make_entry(size=len(message(1)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
        go_on.set()
        assert await delivered(outbox, 1) == [message(1)]
        await gone(spool)


async def test_the_latest_plan_for_an_entry_is_the_one_kept(
    engine: Engine, spool: Spool, outbox: Path
) -> None:
    """Handed over for now, then planned for later before the engine got to it:
    it waits, still locked (the first plan is stale)."""
    later = time.time() + 3600
    entry = make_entry(size=len(message(1)), next_attempt=later)
    async with running(engine):
        await asyncio.sleep(0.2)  # past the engine's first look at the spool
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
        engine.submit(entry.queue_id, when=later)
        await asyncio.sleep(0.5)
        assert not outbox.exists() or not list(outbox.iterdir())
        assert lock_elsewhere(spool, entry.queue_id) == "busy"
        engine.submit(entry.queue_id)
        assert await delivered(outbox, 1) == [message(1)]


@pytest.mark.parametrize("bound", ["bytes", "files"])
async def test_entries_waiting_for_a_delivery_slot_still_count_against_the_bound(
    spool: Spool, policy: Policy, outbox: Path, monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """A slow upstream fills the slots; what waits for one keeps its bytes and
    counts against both bounds, but lets its lock go and is not among the
    attempts under way: counted, a stalled upstream's waiting attempts held
    every other upstream's mail back. Parked instead, each was read back
    from the spool at its turn, which cost a busy relay its rate."""
    if bound == "bytes":
        monkeypatch.setattr(engine_module, "WARM_TOTAL", 3000)
    else:
        monkeypatch.setattr(engine_module, "file_budget", lambda: 2)
    gate = asyncio.Event()

    async def slow_upstream(*args: Any, **_: Any) -> Any:
        await gate.wait()
        return await attempt(*args)

    one_slot = dataclasses.replace(policy, queue=dataclasses.replace(policy.queue, concurrency=1))
    async with running(Engine(spool, lambda: one_slot, slow_upstream, Recorder(None))) as engine:
        await asyncio.sleep(0.2)  # past the engine's first look at the spool
        entries = [make_entry(size=len(message(n, 1000))) for n in range(3)]
        for n, entry in enumerate(entries[:2]):
            engine.submit(entry.queue_id, warm=accept(spool, entry, message(n, 1000)))
        await asyncio.sleep(0.2)  # both started: one sending, one waiting for the slot
        assert lock_elsewhere(spool, entries[1].queue_id) == "locked"
        assert engine._warm_bytes == 2 * len(message(0, 1000))
        assert engine._tasks_in_line == {True: 1, False: 0}
        engine.submit(entries[2].queue_id, warm=accept(spool, entries[2], message(2, 1000)))
        assert lock_elsewhere(spool, entries[2].queue_id) == "locked"  # over the bound: let go
        gate.set()
        assert len(await delivered(outbox, 3)) == 3
        await gone(spool)


@pytest.mark.parametrize("ended", [False, True], ids=["cut-by-the-stop", "ended-in-the-grace"])
async def test_a_stop_leaves_no_attempt_waiting_for_a_slot_behind(
    spool: Spool,
    policy: Policy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ended: bool,
) -> None:
    """A slot the stop's cut attempt gave back went to a parked entry, which no
    look started any more: the attempts handed over at acceptance, waiting for
    a slot as tasks, waited out the stop's last 5 s and were logged at ERROR as
    delivery attempts that had not ended, though never tried. So did a slot
    given back by an attempt that ended while the transactions finished."""
    monkeypatch.setattr(engine_module, "CUT_WAIT", 1.0)
    hung = asyncio.Event()

    async def hanging_upstream(_: Any, __: str, rcpts: list[str], *___: Any, **____: Any) -> Any:
        await hung.wait()
        return Attempt(dict.fromkeys(rcpts, (451, "451 4.3.0 not now")))

    one_slot = dataclasses.replace(policy, queue=dataclasses.replace(policy.queue, concurrency=1))
    queued = [make_entry(size=len(message(n))) for n in range(4)]
    assert spool.put_many([(entry, (message(n),)) for n, entry in enumerate(queued)]) == [None] * 4
    engine = Engine(spool, lambda: one_slot, hanging_upstream, Recorder(None))
    task = asyncio.create_task(engine.run())
    try:
        await asyncio.sleep(0.3)  # one sending, three parked
        handed = [make_entry(size=len(message(n))) for n in range(4, 8)]
        for n, entry in enumerate(handed, 4):
            engine.submit(entry.queue_id, warm=accept(spool, entry, message(n)))
        await asyncio.sleep(0.2)  # each waiting for the slot as a task
        assert engine._tasks_in_line[True] == 4
        if ended:  # the signal to stop, then the attempt under way ends
            engine.wind_down()
            hung.set()
            await asyncio.sleep(0.3)
        await asyncio.wait_for(engine.stop(0.2), timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert "have not ended" not in caplog.text
    assert "has not ended" not in caplog.text
    assert sorted(spool.ids()) == sorted(e.queue_id for e in queued + handed)


async def test_a_backlog_due_at_once_holds_no_more_files_than_its_budget(
    spool: Spool, policy: Policy, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage, or at a restart, the whole queue is due: no more attempts
    start at once than the budget, and those that find the slot taken are parked
    in line. Only the one with the slot holds its entry's lock: one waiting for
    a slot is not being delivered, and ``relay queue delete`` or ``hold`` may
    take it meanwhile."""
    monkeypatch.setattr(engine_module, "file_budget", lambda: 2)
    gate = asyncio.Event()

    async def slow_upstream(*args: Any, **_: Any) -> Any:
        await gate.wait()
        return await attempt(*args)

    entries = [make_entry(size=len(message(n))) for n in range(5)]
    for n, entry in enumerate(entries):
        assert spool.put_many([(entry, (message(n),))]) == [None]
    one_slot = dataclasses.replace(policy, queue=dataclasses.replace(policy.queue, concurrency=1))
    async with running(Engine(spool, lambda: one_slot, slow_upstream, Recorder(None))) as engine:
        await asyncio.sleep(0.5)  # the scan found all five due
        held = [lock_elsewhere(spool, entry.queue_id) == "busy" for entry in entries]
        assert sum(held) == 1
        assert len(engine._busy) == 1  # the others parked in line for the slot
        gate.set()
        assert len(await delivered(outbox, 5)) == 5
        await gone(spool)


HOLD_AND_DELETE = """
import io, sys
from pathlib import Path
from relay.spool import Spool, tools
spool = Spool(Path(sys.argv[1]))
out, err = io.StringIO(), io.StringIO()
held = tools.hold(spool, [sys.argv[2]], out, err)
deleted = tools.delete(spool, [sys.argv[3]], out, err, record=lambda queue_id, entry: None)
print(held.code, deleted.code, err.getvalue().strip())
"""


async def test_entries_waiting_for_a_delivery_slot_can_be_held_or_deleted(
    spool: Spool, policy: Policy, outbox: Path
) -> None:
    """A slow upstream fills the slots: what waits for one, just accepted or read
    back from the spool, is no delivery under way. ``relay queue hold`` and
    ``delete`` said "being delivered right now" of every one, and it went."""
    gate, started = asyncio.Event(), asyncio.Event()

    async def slow_upstream(*args: Any, **_: Any) -> Any:
        started.set()
        await gate.wait()
        return await attempt(*args)

    sending, accepted, stored = (make_entry(size=len(message(n))) for n in range(3))
    one_slot = dataclasses.replace(policy, queue=dataclasses.replace(policy.queue, concurrency=1))
    async with running(Engine(spool, lambda: one_slot, slow_upstream, Recorder(None))) as engine:
        engine.submit(sending.queue_id, warm=accept(spool, sending, message(0)))
        await asyncio.wait_for(started.wait(), 10)  # it has the one slot
        engine.submit(accepted.queue_id, warm=accept(spool, accepted, message(1)))
        assert spool.put_many([(stored, (message(2),))]) == [None]
        engine.submit(stored.queue_id)  # read back from the spool
        await asyncio.sleep(0.3)
        script, directory = HOLD_AND_DELETE, str(spool.directory)
        tried = run_script(script, directory, accepted.queue_id, stored.queue_id)
        gate.set()
        assert len(await delivered(outbox, 1)) == 1
        await asyncio.sleep(0.5)
    assert tried.split(None, 2)[:2] == ["0", "0"], tried
    assert len(list(outbox.glob("*.eml"))) == 1
    assert spool.ids() == [accepted.queue_id] and spool.load(accepted.queue_id).held


async def test_a_quiet_engine_makes_its_removals_durable_and_leaves_no_free_file(
    engine: Engine, spool: Spool, outbox: Path
) -> None:
    """Delivered entries go without an fsync of their own; with no new message
    to share one, the engine's own follows within two POLLs, and its free
    files go when it stops."""
    entry = make_entry(size=len(message(1)))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
    async with running(engine):
        assert await delivered(outbox, 1) == [message(1)]
        await gone(spool)
        await removals_durable(spool)
        assert [p.name for p in (spool.directory / "msg").iterdir()] == [f".free.{entry.queue_id}"]
    assert list((spool.directory / "msg").iterdir()) == []


async def test_a_clock_set_back_holds_up_no_look(
    spool: Spool, policy: Policy, outbox: Path
) -> None:
    """The looks were paced by the wall clock: set back an hour once the engine
    ran, the fsync and removal of delivered mail (and ``relay queue retry``)
    waited for that hour."""
    back = [0.0]
    engine = Engine(
        spool, lambda: policy, attempt, Recorder(None), clock=lambda: time.time() - back[0]
    )
    async with running(engine):
        await asyncio.sleep(0.1)
        back[0] = 3600.0
        entry = make_entry(size=len(message(1)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
        assert await delivered(outbox, 1) == [message(1)]
        await gone(spool)
        await removals_durable(spool)  # not waiting for the clock to come back


async def test_a_spool_that_cannot_be_read_for_a_while_does_not_end_delivery(
    engine: Engine,
    spool: Spool,
    outbox: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The scan at start fails (the message directory is a file for a moment); the
    engine says so once, goes on, and finds the entry when the spool is back."""
    caplog.set_level(logging.INFO, logger="relay")
    monkeypatch.setattr(engine_module, "POLL", 0.1)
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    msg = spool.directory / "msg"
    msg.rename(spool.directory / "msg.away")
    msg.write_text("not a directory")
    async with running(engine):
        await asyncio.sleep(0.5)  # several looks, each scan failing
        failed = [m for m in caplog.messages if "cannot read the spool" in m]
        assert len(failed) == 1
        msg.unlink()
        (spool.directory / "msg.away").rename(msg)
        assert await delivered(outbox, 1) == [message(1)]
        await gone(spool)
    assert "spool readable again" in caplog.messages


async def test_a_fifo_in_the_queue_is_warned_of_once_not_at_every_scan(
    engine: Engine,
    spool: Spool,
    outbox: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each scan warned of it again: every minute and at every kick, by every
    worker. Gone and put back, it is said again; the mail beside it goes."""
    caplog.set_level(logging.INFO, logger="relay")
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "RESCAN", 0.1)
    fifo = spool.directory / "msg" / "0123456789ABCDEF"
    os.mkfifo(fifo)

    def warned() -> int:
        return sum("0123456789ABCDEF skipped unreadable queue entry" in m for m in caplog.messages)

    async def scanned(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline, "no scan saw it"
            await asyncio.sleep(0.02)

    async with running(engine):
        await asyncio.sleep(1.0)  # several scans
        assert warned() == 1
        fifo.unlink()
        await scanned(lambda: fifo.name not in engine._unreadable)
        os.mkfifo(fifo)
        entry = make_entry(size=len(message(1)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)))
        assert await delivered(outbox, 1) == [message(1)]
        await scanned(lambda: warned() == 2)
        await asyncio.sleep(0.5)  # more scans
        assert warned() == 2
    said = next(m for m in caplog.messages if "skipped unreadable" in m)
    assert said.endswith(f"{fifo}: a FIFO, not a regular file")


async def test_an_immediate_refusal_already_passed_back_is_not_turned_into_a_250(
    spool: Spool, policy: Policy, outbox: Path
) -> None:
    """The wait ran out just as the refusal came: its client must hear the refusal
    (the message is gone), not a 250; a delivered one is a 250 whenever it ends."""

    async def refusing(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        return Attempt({r: (550, "550 5.1.1 no such user") for r in rcpts})

    async with running(Engine(spool, lambda: policy, refusing, Recorder(None))) as engine:
        entry = make_entry(size=len(message(1)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
        task = engine.attempt_now(entry.queue_id, immediate=True)
        assert (await task).status == "refused"
        assert not engine.answered(entry.queue_id, task)
        assert spool.ids() == []
    async with running(Engine(spool, lambda: policy, attempt, Recorder(None))) as engine:
        entry = make_entry(size=len(message(2)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(2)), when=time.time() + 60)
        task = engine.attempt_now(entry.queue_id, immediate=True)
        assert (await task).status == "delivered"
        assert engine.answered(entry.queue_id, task)


async def test_an_immediate_client_hears_a_500_refusal_as_it_would_any_5xx(
    spool: Spool, policy: Policy
) -> None:
    """500 is a refusal for good like 550: its client, still waiting, is told it
    and the message is not kept; taken for anything else, the client heard 250
    for a document that was never delivered, and the sender a notice later."""
    syntax = "500 5.5.2 Syntax error"

    async def refusing(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        return Attempt({r: (500, syntax) for r in rcpts})

    async with running(Engine(spool, lambda: policy, refusing, Recorder(None))) as engine:
        entry = make_entry(size=len(message(1)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
        task = engine.attempt_now(entry.queue_id, immediate=True)
        assert await task == engine_module.Outcome("refused", syntax)
        assert not engine.answered(entry.queue_id, task)
        assert spool.ids() == []


@pytest.mark.parametrize(
    ("mail_from", "heard"),
    [
        ("", "550 5.7.1 null sender not accepted"),
        (
            "bounces@platform.example",
            "451 4.7.0 Upstream default refused the relay's envelope sender"
            " <bounces@platform.example> (550 5.7.1 null sender not accepted): a setting"
            " of the relay's, try again later",
        ),
    ],
    ids=["null-sender", "relays-sender"],
)
async def test_an_immediate_refusal_of_the_sender_is_temporary_only_for_the_relays_own(
    spool: Spool, policy: Policy, mail_from: str, heard: str
) -> None:
    """The relay's envelope sender refused is a setting of the relay's to mend, so
    its client hears a 4xx and sends again; the null sender is the client's own
    (a bounce the ERP passes on), and turned into a 4xx it was sent again and
    again, the ERP told of a sender of the relay's that was not in its message."""
    refused = "550 5.7.1 null sender not accepted"

    async def refusing(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        shared = dict.fromkeys(rcpts, SENDER_REFUSED)
        return Attempt({r: (550, refused) for r in rcpts}, shared=shared, sender_refused=refused)

    async with running(Engine(spool, lambda: policy, refusing, Recorder(None))) as engine:
        entry = make_entry(size=len(message(1)), mail_from=mail_from)
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
        task = engine.attempt_now(entry.queue_id, immediate=True)
        assert await task == engine_module.Outcome("refused", heard)
        assert spool.ids() == []


async def test_a_client_that_hangs_up_during_the_attempt_is_not_the_one_told(
    spool: Spool, policy: Policy
) -> None:
    """The client closed while the upstream weighed the message: the refusal is
    no longer its to hear, so the message ends as a queued one does (a notice
    for the refused customer), not as ``refused`` with the reply unread."""
    entry = make_entry(size=len(message(1)))
    customer, copy = (r.address for r in entry.recipients)
    hung_up = asyncio.Event()
    sent: list[list[str]] = []

    async def upstream(target: Any, sender: str, rcpts: Any, data: bytes, **kw: Any) -> Attempt:
        sent.append(list(rcpts))
        hung_up.set()
        if rcpts == [customer, copy]:
            return Attempt({customer: (550, "550 5.1.1 no such user"), copy: (451, NOT_SENT)})
        return Attempt(dict.fromkeys(rcpts, (250, "250 ok")))

    async with running(Engine(spool, lambda: policy, upstream, Recorder(None))) as engine:
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
        task = engine.attempt_now(entry.queue_id, immediate=True, hung_up=hung_up)
        assert (await task).status == "deferred"
        assert engine.answered(entry.queue_id, task)
        deadline = time.monotonic() + 10
        while [entry.notify_address] not in sent:
            assert time.monotonic() < deadline, sent
            await asyncio.sleep(0.02)


async def test_a_copy_held_back_for_a_client_no_longer_waiting_is_tried_again(
    spool: Spool, policy: Policy
) -> None:
    """The wait ran out while the RCPT replies were awaited: the client heard 250,
    so the refusal reaches the sender as a notice, as without the wait, and the
    automatic BCC copy held back with the message is not lost but deferred."""
    entry = make_entry(size=len(message(1)))
    customer, copy = (r.address for r in entry.recipients)
    tasks: list[asyncio.Task[Any]] = []
    sent: list[tuple[list[str], list[str]]] = []

    async def upstream(target: Any, sender: str, rcpts: Any, data: bytes, **kw: Any) -> Attempt:
        sent.append((list(rcpts), list(kw.get("needed", ()))))
        if rcpts == [customer, copy]:
            assert engine.answered(entry.queue_id, tasks[0])  # the client is told 250 now
            return Attempt({customer: (550, "550 5.1.1 no such user"), copy: (451, NOT_SENT)})
        return Attempt(dict.fromkeys(rcpts, (250, "250 ok")))

    async with running(Engine(spool, lambda: policy, upstream, Recorder(None))) as engine:
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
        tasks.append(engine.attempt_now(entry.queue_id, immediate=True))
        assert (await tasks[0]).status == "deferred"
        deadline = time.monotonic() + 10
        while len(sent) < 2:  # the failure notice
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    assert sent == [([customer, copy], [customer]), ([entry.notify_address], [])]
    stored = spool.load(entry.queue_id)
    assert [(r.status, r.reply) for r in stored.recipients] == [
        ("failed", "550 5.1.1 no such user"),
        ("pending", NOT_SENT),
    ]


async def test_an_immediate_refusal_the_audit_log_cannot_record_stays_queued(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """Removed, the message would end with no final record: it stays in the queue,
    its client is told 250, and the next attempt's refusal is recorded as usual."""

    async def refusing(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        return Attempt({r: (550, "550 5.1.1 no such user") for r in rcpts})

    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    async with running(Engine(spool, lambda: policy, refusing, recorder)) as engine:
        entry = make_entry(size=len(message(1)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
        shutil.rmtree(audit_dir)
        audit_dir.write_text("not a directory")  # every append fails, as on a full disk
        task = engine.attempt_now(entry.queue_id, immediate=True)
        assert (await task).status == "deferred"
        assert engine.answered(entry.queue_id, task)  # the client hears 250
        assert spool.ids() == [entry.queue_id]
        stored = spool.load(entry.queue_id)  # what another worker, or a restart, finds
        assert [r.status for r in stored.recipients] == ["pending"] * len(entry.recipients)
        assert stored.next_attempt >= time.time() + policy.queue.first_retry / 2
        audit_dir.unlink()
        recorder.audit = AuditLog(audit_dir)
        assert (await engine.attempt_now(entry.queue_id)).status == "later"
        with spool.lock(entry.queue_id):  # as `relay queue retry` does
            stored.next_attempt = 0.0
            spool.update(stored)
        assert (await engine.attempt_now(entry.queue_id)).status == "failed"
        await gone(spool)
    failed = [r for r in read_all(audit_dir) if r["event"] == "failed"]
    mine = [r["recipient"] for r in failed if r["queue_id"] == entry.queue_id]
    assert mine == [r.address for r in entry.recipients]


async def test_a_listing_made_while_the_audit_log_refused_is_recorded_when_it_takes_them(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """The refusal's records were dropped with its ``listed`` one while the list
    file kept the address; the next refusal found it listed already, and no
    record ever said why mail to it stopped."""

    async def refusing(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        return Attempt({r: (550, "550 5.1.1 no such user") for r in rcpts})

    listing = tmp_path / "suppression.jsonl"
    settings = SuppressionSettings(listing, frozenset({"5.1.1"}))
    policy = dataclasses.replace(policy, suppression=settings)
    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    listed = SuppressionFile(listing)
    engine = Engine(spool, lambda: policy, refusing, recorder, suppressions=listed)
    async with running(engine):
        entry = make_entry(size=len(message(1)))
        engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
        _break(audit_dir)
        assert (await engine.attempt_now(entry.queue_id, immediate=True)).status == "deferred"
        assert listed.current().find("customer@example.net", entry.tenant) is not None
        _mend(audit_dir, recorder)
        _due_now(spool, entry.queue_id)
        assert (await engine.attempt_now(entry.queue_id)).status == "failed"
        await gone(spool)
    mine = [r for r in read_all(audit_dir) if r["queue_id"] == entry.queue_id]
    on_the_list = sorted(e.address for e in SuppressionFile(listing).entries().entries)
    assert "customer@example.net" in on_the_list
    assert sorted(r["recipient"] for r in mine if r["event"] == "listed") == on_the_list
    failed = [r["recipient"] for r in mine if r["event"] == "failed"]
    assert failed == [r.address for r in entry.recipients]  # the first refusal's are not


async def _refused_and_listed(engine: Engine, spool: Spool, audit_dir: Path) -> QueueEntry:
    """An immediate refusal, both recipients listed, while the audit log refuses."""
    entry = make_entry(size=len(message(1)))
    engine.submit(entry.queue_id, warm=accept(spool, entry, message(1)), when=time.time() + 60)
    _break(audit_dir)
    assert (await engine.attempt_now(entry.queue_id, immediate=True)).status == "deferred"
    return entry


async def _bouncing(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
    return Attempt({r: (550, "550 5.1.1 no such user") for r in rcpts})


def _listing(policy: Policy, tmp_path: Path) -> Policy:
    listing = tmp_path / "suppression.jsonl"
    return dataclasses.replace(
        policy, suppression=SuppressionSettings(listing, frozenset({"5.1.1"}))
    )


async def test_a_refusal_kept_for_the_audit_log_names_its_next_attempt_with_date_and_offset(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The line gave a bare time of day: a next attempt after midnight, or in
    the hour that repeats when summer time ends, read as another."""
    caplog.set_level(logging.INFO, logger="relay")
    audit_dir = tmp_path / "audit"
    engine = Engine(spool, lambda: policy, _bouncing, Recorder(AuditLog(audit_dir)))
    async with running(engine):
        entry = await _refused_and_listed(engine, spool, audit_dir)
        planned = spool.load(entry.queue_id).next_attempt
    (line,) = [m for m in caplog.messages if "so not bounced: kept in the queue until" in m]
    until = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(planned))
    assert f"kept in the queue until {until}: " in line, line


@pytest.mark.parametrize("then", ["deleted", "restarted"])
async def test_a_listing_the_audit_log_refused_is_recorded_whatever_becomes_of_its_message(
    spool: Spool, policy: Policy, tmp_path: Path, then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its ``listed`` record waited for the message's next records: deleted by
    ``relay queue delete`` meanwhile, or its worker restarted, the message had
    none from that worker, and the list kept an address no record said why."""
    monkeypatch.setattr(engine_module, "POLL", 0.1)
    policy = _listing(policy, tmp_path)
    listing = tmp_path / "suppression.jsonl"
    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    engine = Engine(
        spool, lambda: policy, _bouncing, recorder, suppressions=SuppressionFile(listing)
    )
    async with running(engine):
        entry = await _refused_and_listed(engine, spool, audit_dir)
        _mend(audit_dir, recorder)
        if then == "deleted":  # as `relay queue delete` does, in a process of its own
            by = Recorder(AuditLog(audit_dir))

            def record(queue_id: str, gone: QueueEntry | None) -> None:
                by.deleted(queue_id, gone, "root")
                by.flush_sync(queue_id)

            out, err = io.StringIO(), io.StringIO()
            assert tools.delete(spool, [entry.queue_id], out, err, record=record).code == 0
            await asyncio.sleep(0.5)  # a few of the engine's looks
    if then == "restarted":
        recorder = Recorder(AuditLog(audit_dir))
        again = Engine(
            spool, lambda: policy, _bouncing, recorder, suppressions=SuppressionFile(listing)
        )
        async with running(again):
            _due_now(spool, entry.queue_id)
            assert (await again.attempt_now(entry.queue_id)).status == "failed"
            await gone(spool)
    mine = [r for r in read_all(audit_dir) if r["queue_id"] == entry.queue_id]
    on_the_list = sorted(e.address for e in SuppressionFile(listing).entries().entries)
    assert "customer@example.net" in on_the_list
    assert sorted(r["recipient"] for r in mine if r["event"] == "listed") == on_the_list, mine
    assert verify(audit_dir).ok


async def test_a_listing_the_audit_log_refuses_until_the_stop_is_named_there(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lost with the worker, it went unsaid: the list kept the address, and
    nothing told the sysadmin that the audit log does not say why."""
    caplog.set_level(logging.INFO, logger="relay")
    policy = _listing(policy, tmp_path)
    listing = SuppressionFile(tmp_path / "suppression.jsonl")
    engine = Engine(
        spool,
        lambda: policy,
        _bouncing,
        Recorder(AuditLog(tmp_path / "audit")),
        suppressions=listing,
    )
    async with running(engine):
        entry = await _refused_and_listed(engine, spool, tmp_path / "audit")
    (said,) = [m for m in caplog.messages if m.startswith("stopping before the audit log took")]
    assert "2 listings" in said and f"{entry.queue_id}:<customer@example.net>" in said, said


async def test_a_failure_is_told_once_even_when_its_deferral_cannot_be_stored(
    spool: Spool,
    policy: Policy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One recipient refused, one deferred, and the spool refuses the deferral's
    record (a disk in trouble): each retry finds the refused one pending again,
    and must not tell the sender again."""
    caplog.set_level(logging.INFO, logger="relay")
    entry = make_entry(size=len(message(1)))
    refused, deferred = (r.address for r in entry.recipients[:2])

    async def upstream(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        answers = {refused: (550, "550 5.1.1 no such user"), deferred: (451, "451 4.2.0 busy")}
        return Attempt({r: answers.get(r, (250, "250 ok")) for r in rcpts})

    def broken_update(changed: QueueEntry) -> None:
        raise SpoolError(spool.directory, "No space left on device")

    assert spool.put_many([(entry, (message(1),))]) == [None]
    monkeypatch.setattr(spool, "update", broken_update)
    async with running(Engine(spool, lambda: policy, upstream, Recorder(None))) as engine:
        for _ in range(3):
            await engine.attempt_now(entry.queue_id)
        told = [m for m in caplog.messages if f"{entry.queue_id}: failure notice to=" in m]
        assert len(told) == 1


async def test_a_failure_notice_the_spool_cannot_take_keeps_the_entry_until_it_can(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt that ends a message finds the disk full: the sender must still
    be told. The entry stays, locked (no other worker sends it again), with
    its records, until the notice is queued."""
    entry = make_entry(size=len(message(1)))
    refused, copy = (r.address for r in entry.recipients[:2])
    sent: list[tuple[list[str], bytes]] = []

    async def upstream(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        sent.append((list(rcpts), data))
        return Attempt(
            {r: (550, "550 5.1.1 no such user") if r == refused else (250, "ok") for r in rcpts}
        )

    full = True
    put = spool.put

    def put_unless_full(*args: Any) -> None:
        if full:
            raise SpoolError(spool.directory, "No space left on device")
        put(*args)

    monkeypatch.setattr(spool, "put", put_unless_full)
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    audit = tmp_path / "audit"
    async with queued_and_running(
        spool, entry, Engine(spool, lambda: policy, upstream, Recorder(AuditLog(audit)))
    ) as engine:
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
        assert spool.ids() == [entry.queue_id]
        assert lock_elsewhere(spool, entry.queue_id) == "busy"
        await asyncio.sleep(0.3)  # tried again meanwhile, still full
        assert spool.ids() == [entry.queue_id] and len(sent) == 1
        full = False
        await gone(spool)  # the notice, queued, delivered, and the entry gone
    assert [rcpts for rcpts, _ in sent] == [[refused, copy], [entry.notify_address]]
    assert b"no such user" in sent[1][1]
    story = [(r["event"], r.get("recipient")) for r in read_all(audit)]
    assert story.count(("failed", refused)) == 1
    assert story.count(("delivered", copy)) == 1
    assert story.count(("notified", entry.notify_address)) == 1


async def test_an_entry_waiting_for_its_notice_at_the_stop_ends_with_its_records(
    spool: Spool,
    policy: Policy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = make_entry(size=len(message(1)))

    async def upstream(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        return Attempt(dict.fromkeys(rcpts, (550, "550 5.1.1 no such user")))

    def full(*args: Any) -> None:
        raise SpoolError(spool.directory, "No space left on device")

    monkeypatch.setattr(spool, "put", full)
    audit = tmp_path / "audit"
    async with queued_and_running(
        spool, entry, Engine(spool, lambda: policy, upstream, Recorder(AuditLog(audit)))
    ) as engine:
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    assert spool.ids() == []
    assert f"{entry.queue_id}: the relay stops before the failure notice" in caplog.text
    failed = [r["recipient"] for r in read_all(audit) if r["event"] == "failed"]
    assert failed == [r.address for r in entry.recipients]


class Split:
    """The upstream takes the customer's copy and defers the archive's, until
    ``all_ok``."""

    def __init__(self) -> None:
        self.all_ok = False

    async def __call__(
        self, upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any
    ) -> Attempt:
        ok = (250, "250 2.0.0 ok")
        return Attempt(
            {
                r: ok if self.all_ok or r.startswith("customer@") else (451, "451 4.2.0 busy")
                for r in rcpts
            }
        )


@contextlib.asynccontextmanager
async def deferred_unrecorded(
    spool: Spool, policy: Policy, tmp_path: Path, upstream: Any
) -> AsyncIterator[tuple[Engine, QueueEntry, Recorder]]:
    """A message whose attempt ended deferred while the audit log (in ``tmp_path /
    "audit"``) refused its records, on an engine that stops at the end."""
    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    entry = make_entry(size=len(message(1)))
    engine = Engine(spool, lambda: policy, upstream, recorder)
    async with queued_and_running(spool, entry, engine) as running_engine:
        _break(audit_dir)
        assert (await running_engine.attempt_now(entry.queue_id)).status == "deferred"
        yield running_engine, entry, recorder


def _story(audit_dir: Path, queue_id: str) -> list[tuple[str, str]]:
    return [(r["event"], r["recipient"]) for r in read_all(audit_dir) if r["queue_id"] == queue_id]


async def _stored(spool: Spool, queue_id: str, statuses: list[str]) -> None:
    deadline = time.monotonic() + 20
    while [r.status for r in spool.load(queue_id).recipients] != statuses:
        assert time.monotonic() < deadline, "the deferral was never stored"
        await asyncio.sleep(0.02)


async def _let_go(spool: Spool, queue_id: str) -> None:
    """Until another process may lock the entry. Its stored record can be read
    before the engine's task, back on the loop, closes the lock: asked from the
    loop itself, blocking it, the lock was still held now and then."""
    deadline = time.monotonic() + 10
    while (state := await asyncio.to_thread(lock_elsewhere, spool, queue_id)) != "locked":
        assert state == "busy" and time.monotonic() < deadline, f"the entry is {state}"
        await asyncio.sleep(0.05)


async def _stored_then_sent_again(
    spool: Spool, engine: Engine, upstream: Any, queue_id: str
) -> None:
    """The kept deferral stored as its attempt left it, let go with its next
    attempt ahead, then, made due, sent to the deferred recipient alone."""
    await _stored(spool, queue_id, ["delivered", "pending"])
    await _let_go(spool, queue_id)
    assert spool.load(queue_id).next_attempt > time.time()
    upstream.all_ok = True
    _due_now(spool, queue_id)
    assert (await engine.attempt_now(queue_id)).status == "delivered"
    await gone(spool)


async def test_a_deferral_the_audit_log_refuses_waits_locked_until_its_records_are_written(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored as it stood, the deferral put a ``delivered`` on the spool that the
    log never got: a stop, or another worker finishing the message, lost it.
    It waits in memory, locked, with its records, and is stored once the log
    takes them."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "WAITING_MAX", 1)  # full, it still gets its turn
    upstream = Split()
    async with deferred_unrecorded(spool, policy, tmp_path, upstream) as (engine, entry, recorder):
        customer, archive = (r.address for r in entry.recipients)
        assert [r.status for r in spool.load(entry.queue_id).recipients] == ["pending"] * 2
        assert lock_elsewhere(spool, entry.queue_id) == "busy"  # relay queue: being delivered
        _mend(tmp_path / "audit", recorder)
        await _stored_then_sent_again(spool, engine, upstream, entry.queue_id)
    story = _story(tmp_path / "audit", entry.queue_id)
    assert story == [("delivered", customer), ("deferred", archive), ("delivered", archive)]


async def test_a_deferral_the_audit_log_refuses_until_the_stop_goes_again_at_the_next_start(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its outcome is on no record: the entry is left as last stored, and the
    next start sends it again and records that."""
    upstream = Split()
    async with deferred_unrecorded(spool, policy, tmp_path, upstream) as (_, entry, recorder):
        pass
    assert [r.status for r in spool.load(entry.queue_id).recipients] == ["pending"] * 2
    assert lock_elsewhere(spool, entry.queue_id) == "locked"
    _mend(tmp_path / "audit", recorder)
    upstream.all_ok = True
    async with running(Engine(spool, lambda: policy, upstream, recorder)) as engine:
        assert (await engine.attempt_now(entry.queue_id)).status == "delivered"
        await gone(spool)
    story = _story(tmp_path / "audit", entry.queue_id)
    assert story == [("delivered", r.address) for r in entry.recipients]
    assert f"{entry.queue_id}: the relay stops before the audit log took its last" in caplog.text


class Refusing:
    """The upstream refuses the customer for good and defers the archive, until
    ``all_ok``; it takes anything else (the sender's failure notices)."""

    def __init__(self) -> None:
        self.all_ok = False
        self.notices = 0
        self.sent: list[list[str]] = []  # the recipients of each try of the message

    async def __call__(
        self, upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any
    ) -> Attempt:
        if not sender:
            self.notices += 1
        else:
            self.sent.append(list(rcpts))
        replies = {}
        for r in rcpts:
            if r.startswith("customer@"):
                replies[r] = (550, "550 5.1.1 no such user")
            elif r.startswith("archive@") and not self.all_ok:
                replies[r] = (451, "451 4.2.0 busy")
            else:
                replies[r] = (250, "250 2.0.0 ok")
        return Attempt(replies)


async def test_a_deferral_lost_at_the_stop_takes_its_failure_notice_with_it(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The notice its attempt queued went out with no ``notified`` record, and the
    next start, refused again, told the sender a second time."""
    upstream = Refusing()
    async with deferred_unrecorded(spool, policy, tmp_path, upstream) as (_, entry, recorder):
        customer, archive = (r.address for r in entry.recipients)
        assert len(spool.ids()) == 2  # the message and its notice
    assert spool.ids() == [entry.queue_id]
    _mend(tmp_path / "audit", recorder)
    upstream.all_ok = True
    async with running(Engine(spool, lambda: policy, upstream, recorder)):
        await gone(spool)
    assert upstream.notices == 1
    story = _story(tmp_path / "audit", entry.queue_id)
    assert story == [
        ("failed", customer),
        ("delivered", archive),
        ("notified", entry.notify_address),
    ]
    assert "the relay stops before the audit log took its last" in caplog.text


async def test_a_deferral_kept_from_the_audit_log_is_stored_at_the_stop_if_it_takes_them(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    async with deferred_unrecorded(spool, policy, tmp_path, Split()) as (_, entry, recorder):
        customer, archive = (r.address for r in entry.recipients)
        _mend(tmp_path / "audit", recorder)  # its turn, a POLL later, does not come first
    assert [r.status for r in spool.load(entry.queue_id).recipients] == ["delivered", "pending"]
    assert _story(tmp_path / "audit", entry.queue_id) == [
        ("delivered", customer),
        ("deferred", archive),
    ]


class ListingThenRefusing(AuditLog):
    """Takes the records written with a listing, then refuses every write: its
    directory is moved aside, as ``_put_back`` finds it. The refusal shows at
    once, so that no other delivery (the failure notice) starts meanwhile."""

    def append_many(self, records: list[dict[str, Any]], sync: bool = True) -> int:
        written = super().append_many(records, sync)
        if any(record["event"] == "listed" for record in records):
            self.directory.rename(self.directory.with_name("audit.aside"))
            self.directory.write_text("not a directory")
            with contextlib.suppress(AuditError):
                self.probe()
        return written


def _put_back(audit_dir: Path, recorder: Recorder) -> None:
    audit_dir.unlink()
    audit_dir.with_name("audit.aside").rename(audit_dir)
    recorder.audit = AuditLog(audit_dir)


@contextlib.asynccontextmanager
async def listed_then_unrecorded(
    spool: Spool, policy: Policy, tmp_path: Path, upstream: Refusing
) -> AsyncIterator[tuple[Engine, QueueEntry, Recorder]]:
    """A message whose customer the upstream refused for good and listed, its
    archive deferred, the audit log refusing the records after the listing's:
    on an engine that stops at the end. ``policy`` lists 5.1.1 refusals."""
    recorder = Recorder(ListingThenRefusing(tmp_path / "audit"))
    listing = SuppressionFile(tmp_path / "suppression.jsonl")
    entry = make_entry(size=len(message(1)))
    engine = Engine(spool, lambda: policy, upstream, recorder, suppressions=listing)
    async with queued_and_running(spool, entry, engine) as running_engine:
        assert (await running_engine.attempt_now(entry.queue_id)).status == "deferred"
        assert listing.current().find("customer@example.net", entry.tenant) is not None
        yield running_engine, entry, recorder


async def test_a_refusal_written_with_its_listing_stays_failed_when_the_log_refuses_the_rest(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing's write took the refusal before the log refused the
    deferral's records: put back as stored, the refused recipient would be
    pending again, and the next attempt would go to an address the log says
    failed. Kept as the attempt left it, only the deferred one goes again."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    policy = _listing(policy, tmp_path)
    upstream = Refusing()
    async with listed_then_unrecorded(spool, policy, tmp_path, upstream) as (
        engine,
        entry,
        recorder,
    ):
        _put_back(tmp_path / "audit", recorder)
        await _stored(spool, entry.queue_id, ["failed", "pending"])
        await _let_go(spool, entry.queue_id)
        upstream.all_ok = True
        _due_now(spool, entry.queue_id)
        assert (await engine.attempt_now(entry.queue_id)).status == "failed"
        await gone(spool)
    _only_the_copy_sent_again(upstream, tmp_path / "audit", entry, deferral_recorded=True)


async def test_a_refusal_written_with_its_listing_is_stored_though_the_log_refuses_the_rest(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """Left as last stored at the stop, the refused recipient was pending: the
    next start found it listed and recorded it ``suppressed`` after the log
    had said it failed, and failed the automatic copy with it, unsent."""
    policy = _listing(policy, tmp_path)
    upstream = Refusing()
    async with listed_then_unrecorded(spool, policy, tmp_path, upstream) as (_, entry, recorder):
        pass  # attempted, the log refusing the deferral's records, and stopped
    assert [r.status for r in spool.load(entry.queue_id).recipients] == ["failed", "pending"]
    _put_back(tmp_path / "audit", recorder)
    upstream.all_ok = True
    listing = SuppressionFile(tmp_path / "suppression.jsonl")
    async with running(Engine(spool, lambda: policy, upstream, recorder, suppressions=listing)):
        await gone(spool)
    _only_the_copy_sent_again(upstream, tmp_path / "audit", entry, deferral_recorded=False)
    assert verify(tmp_path / "audit").ok


def _only_the_copy_sent_again(
    upstream: Refusing, audit_dir: Path, entry: QueueEntry, deferral_recorded: bool
) -> None:
    """The refused customer was not tried again, the sender told once; the
    deferral is on record where the log took it before the stop."""
    customer, archive = (r.address for r in entry.recipients)
    told = ("notified", entry.notify_address)
    then = (
        [("deferred", archive), told, ("delivered", archive)]
        if deferral_recorded
        else [("delivered", archive), told]
    )
    assert upstream.sent == [[customer, archive], [archive]]
    assert _story(audit_dir, entry.queue_id) == [("failed", customer), ("listed", customer), *then]
    assert upstream.notices == 1


async def test_an_attempt_the_relay_itself_fails_is_tried_later_not_at_every_scan(
    spool: Spool, policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug after the upstream took the message leaves the entry as stored:
    each look at the spool would send it again."""
    sent: list[str] = []

    async def faulty(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        sent.append(sender)
        raise RuntimeError("a bug")

    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    async with running(Engine(spool, lambda: policy, faulty, Recorder(None))) as engine:
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
        assert (await engine.attempt_now(entry.queue_id)).status == "later"
    assert len(sent) == 1
    assert f"{entry.queue_id}: delivery attempt failed in the relay itself" in caplog.text
    assert "RuntimeError: a bug" in caplog.text


async def test_the_wait_for_a_retry_runs_from_the_end_of_the_attempt(
    spool: Spool, policy: Policy
) -> None:
    """An upstream that answers only at its timeout: counted from the start, the
    wait was gone by the time the attempt ended, and the retry came at once."""

    async def slow(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        await asyncio.sleep(0.5)
        return Attempt(dict.fromkeys(rcpts, (451, "451 4.4.2 timeout")))

    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    engine = Engine(spool, lambda: policy, slow, Recorder(None), rng=lambda: 0.5)  # no jitter
    async with running(engine):
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
        ended = time.time()
    # from the start, the wait would end half a second (the attempt) earlier
    assert spool.load(entry.queue_id).next_attempt >= ended + policy.queue.first_retry - 0.25


def _break(audit_dir: Path) -> None:
    shutil.rmtree(audit_dir)
    audit_dir.write_text("not a directory")  # every append fails, as on a full disk


def _mend(audit_dir: Path, recorder: Recorder) -> None:
    audit_dir.unlink()
    recorder.audit = AuditLog(audit_dir)


async def test_an_attempt_given_its_slot_once_the_audit_log_refuses_sends_nothing(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """No delivery starts while the log refuses records, also one that waited
    for its delivery slot since before: sent then, its outcome could not be
    recorded, and the message, left queued, went again at every restart with
    the log naming none of those sends."""
    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    release, sent = asyncio.Event(), []

    async def gate(upstream: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        sent.append(list(rcpts))
        await release.wait()
        return Attempt(dict.fromkeys(rcpts, (250, "250 2.0.0 ok")))

    queue = dataclasses.replace(policy, queue=dataclasses.replace(policy.queue, concurrency=1))
    engine = Engine(spool, lambda: queue, gate, recorder)
    first, second = make_entry(size=len(message(1))), make_entry(size=len(message(2)))
    assert spool.put_many([(first, (message(1),)), (second, (message(2),))]) == [None, None]
    under_way = engine.attempt_now(first.queue_id)
    deadline = time.monotonic() + 10
    while not sent:
        assert time.monotonic() < deadline, "the first attempt never reached its upstream"
        await asyncio.sleep(0.01)
    waiting = engine.attempt_now(second.queue_id, immediate=True)  # in line for the slot
    await asyncio.sleep(0.05)
    _break(audit_dir)
    with contextlib.suppress(AuditError):
        recorder.probe()
    assert recorder.refusing is not None
    release.set()
    await under_way
    assert (await waiting).status == "busy"
    assert len(sent) == 1
    assert spool.load(second.queue_id).attempts == 0
    await engine.stop(1)


def _due_now(spool: Spool, queue_id: str) -> None:
    with spool.lock(queue_id):  # as `relay queue retry` does
        stored = spool.load(queue_id)
        stored.next_attempt = 0.0
        spool.update(stored)


async def test_a_message_file_cut_short_is_held_on_record_once_the_log_takes_it(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine held a damaged entry with an ERROR line and nothing in the
    audit log: a message delivered late after its release, or deleted, had
    no record of why it waited. While the log refuses the ``held`` record
    the entry is not held, and is held once the log takes it."""
    caplog.set_level(logging.INFO, logger="relay")

    async def unreached(*_: Any, **__: Any) -> Attempt:
        raise AssertionError("a damaged message must not be sent")

    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    entry = make_entry(size=len(message(1)) + 20)  # its file holds 20 bytes fewer
    assert spool.put_many([(entry, (message(1),))]) == [None]
    engine = Engine(spool, lambda: policy, unreached, recorder)
    _break(audit_dir)
    assert (await engine.attempt_now(entry.queue_id)).status == "busy"
    assert not spool.load(entry.queue_id).held  # put back: no hold off the record
    refused = [m for m in caplog.messages if "not put on hold" in m]
    assert len(refused) == 1 and "the audit log cannot record it" in refused[0], caplog.messages
    _mend(audit_dir, recorder)
    assert (await engine.attempt_now(entry.queue_id)).status == "held"
    await engine.stop(5)
    assert spool.load(entry.queue_id).held
    (held,) = [r for r in read_all(audit_dir) if r["queue_id"] == entry.queue_id]
    assert held["event"] == "held" and held["message_id"] == entry.message_id
    stored = len(message(1))
    assert held["by"] == f"relay: {stored} bytes of message stored, its record says {stored + 20}"


async def test_a_stop_while_the_outcomes_on_record_are_stored_leaves_the_whole_deferral(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored in a thread on a slow disk, the part the log had landed after the
    stop had let the kept entry go and stored it whole: its attempt and its
    sender's notice were lost from the spool, and the sender was told twice."""
    policy = _listing(policy, tmp_path)
    upstream = Refusing()
    recorder = Recorder(ListingThenRefusing(tmp_path / "audit"))
    listing = SuppressionFile(tmp_path / "suppression.jsonl")
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    started = threading.Event()
    update = spool.update

    def slow_first_update(stored: QueueEntry) -> None:
        if not started.is_set():
            started.set()
            time.sleep(1.0)
        update(stored)

    monkeypatch.setattr(spool, "update", slow_first_update)
    engine = Engine(spool, lambda: policy, upstream, recorder, suppressions=listing)
    run = asyncio.create_task(engine.run())
    try:
        tried = engine.attempt_now(entry.queue_id)
        assert await asyncio.to_thread(started.wait, 10)
        _put_back(tmp_path / "audit", recorder)
        await engine.stop(0.1)
        assert (await asyncio.wait_for(tried, 10)).status == "deferred"
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    stored = spool.load(entry.queue_id)
    assert [r.status for r in stored.recipients] == ["failed", "pending"]
    assert stored.attempts == 1 and not stored.recipients[0].notify
    upstream.all_ok = True
    _due_now(spool, entry.queue_id)
    async with running(Engine(spool, lambda: policy, upstream, recorder, suppressions=listing)):
        await gone(spool)
    assert upstream.notices == 1


class FillingUp(Split):
    """``Split``, the spool's records refused from its first try on: the
    ``env`` directory gives out while the first ``out`` messages are out,
    until ``_mend_spool``."""

    def __init__(self, spool: Spool, out: int = 1) -> None:
        super().__init__()
        self.spool = spool
        self.out = out
        self.sent: list[list[str]] = []
        self.all_out = asyncio.Event()

    async def __call__(
        self, upstream: Any, sender: str, rcpts: Any, data: bytes, **kwargs: Any
    ) -> Attempt:
        self.sent.append(list(rcpts))
        if len(self.sent) == self.out:
            env = self.spool.directory / "env"
            env.rename(env.with_name("env.aside"))
            env.write_text("not a directory")  # every record stored fails, as on a full disk
            self.all_out.set()
        await asyncio.wait_for(self.all_out.wait(), 10)
        return await super().__call__(upstream, sender, rcpts, data, **kwargs)


def _mend_spool(spool: Spool) -> None:
    env = spool.directory / "env"
    env.unlink()
    env.with_name("env.aside").rename(env)


def _locked_here(spool: Spool, queue_id: str) -> bool:
    """Whether another worker finds the entry locked; asked of its file directly,
    the spool being no queue to open while its ``env`` is gone."""
    fd = os.open(spool.message_path(queue_id), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def test_outcomes_on_record_the_spool_refuses_keep_the_entry_locked_until_it_takes_them(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The customer's ``delivered`` on record, the spool said it was pending,
    and the entry, let go, was due as last stored: another worker, a restart,
    or this one a backoff later sent the customer a second copy, recorded a
    second time. Kept locked, it is stored once the spool takes it."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    audit_dir = tmp_path / "audit"
    upstream = FillingUp(spool)
    entry = make_entry(size=len(message(1)))
    customer, archive = (r.address for r in entry.recipients)
    engine = Engine(spool, lambda: policy, upstream, Recorder(AuditLog(audit_dir)))
    async with queued_and_running(spool, entry, engine):
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
        assert _locked_here(spool, entry.queue_id)
        await asyncio.sleep(0.4)  # its turns come, and find the spool refusing
        assert _locked_here(spool, entry.queue_id)
        _mend_spool(spool)
        await _stored_then_sent_again(spool, engine, upstream, entry.queue_id)
    assert upstream.sent == [[customer, archive], [archive]]
    story = _story(audit_dir, entry.queue_id)
    assert story == [("delivered", customer), ("deferred", archive), ("delivered", archive)]


async def test_outcomes_on_record_the_spool_refuses_until_the_stop_are_named(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing stores them now: the sysadmin learns which message, and whose
    outcomes, the next start may repeat."""
    upstream = FillingUp(spool)
    entry = make_entry(size=len(message(1)))
    customer, archive = (r.address for r in entry.recipients)
    engine = Engine(spool, lambda: policy, upstream, Recorder(AuditLog(tmp_path / "audit")))
    async with queued_and_running(spool, entry, engine):
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    assert not _locked_here(spool, entry.queue_id)
    _mend_spool(spool)
    (said,) = [m for m in caplog.messages if m.startswith(f"{entry.queue_id}: the relay stops")]
    assert f"<{customer}>" in said and archive not in said, said
    assert "the spool stored" in said


async def test_outcomes_on_record_are_stored_at_the_stop_if_the_spool_takes_them(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    upstream = FillingUp(spool)
    entry = make_entry(size=len(message(1)))
    engine = Engine(spool, lambda: policy, upstream, Recorder(AuditLog(tmp_path / "audit")))
    async with queued_and_running(spool, entry, engine):
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
        _mend_spool(spool)  # its turn, a POLL later, does not come first
    assert [r.status for r in spool.load(entry.queue_id).recipients] == ["delivered", "pending"]
    assert spool.load(entry.queue_id).next_attempt > time.time()


async def test_a_kept_entry_gone_at_the_stop_leaves_the_others_stored(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its trouble ended the stop's loop over the kept entries: the one after
    it was left unstored and unnamed, its customer on record as delivered and
    pending on the spool."""
    upstream = FillingUp(spool, out=2)
    first, second = make_entry(size=len(message(1))), make_entry(size=len(message(1)))
    assert spool.put_many([(second, (message(1),))]) == [None]
    engine = Engine(spool, lambda: policy, upstream, Recorder(AuditLog(tmp_path / "audit")))
    async with queued_and_running(spool, first, engine):
        tried = [engine.attempt_now(entry.queue_id) for entry in (first, second)]
        assert [o.status for o in await asyncio.gather(*tried)] == ["deferred", "deferred"]
        _mend_spool(spool)
        spool.message_path(first.queue_id).unlink()  # a sysadmin's rm, say
    assert [r.status for r in spool.load(second.queue_id).recipients] == ["delivered", "pending"]
    assert any(
        m.startswith(f"{first.queue_id}: gone from the queue before the stop")
        for m in caplog.messages
    ), caplog.messages


async def test_a_deferral_with_no_outcome_on_record_stores_none_when_the_log_refuses_it(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every recipient deferred, the log and the spool refusing: nothing on record
    to store, yet the spool was read for it and its refusal logged as outcomes
    on record that could not be stored."""

    class AllDeferred(FillingUp):
        async def __call__(self, *args: Any, **kwargs: Any) -> Attempt:
            sent = await super().__call__(*args, **kwargs)
            return Attempt({r: (451, "451 4.2.0 busy") for r in sent.replies})

    async with deferred_unrecorded(spool, policy, tmp_path, AllDeferred(spool)):
        pass
    assert any("AUDIT LOG WRITE FAILED, the deferral kept" in m for m in caplog.messages)
    assert not [m for m in caplog.messages if "outcomes on record" in m]


async def test_a_deferral_the_audit_log_takes_late_stays_locked_while_the_spool_refuses_it(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its records written at last, it was let go unstored all the same: the
    customer on record as delivered, pending on the spool."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    upstream = FillingUp(spool)
    audit_dir = tmp_path / "audit"
    async with deferred_unrecorded(spool, policy, tmp_path, upstream) as (_, entry, recorder):
        customer, archive = (r.address for r in entry.recipients)
        _mend(audit_dir, recorder)
        deadline = time.monotonic() + 10
        while len(_story(audit_dir, entry.queue_id)) < 2:
            assert time.monotonic() < deadline, "the records were never written"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # its turns come again, and find the spool refusing
        assert _locked_here(spool, entry.queue_id)
        _mend_spool(spool)
        await _stored(spool, entry.queue_id, ["delivered", "pending"])
    assert upstream.sent == [[customer, archive]]
    assert _story(audit_dir, entry.queue_id) == [("delivered", customer), ("deferred", archive)]


def test_the_wait_between_a_kept_entrys_turns_stays_bounded_however_many_tries() -> None:
    """A day of a failing disk is over a thousand turns: the doubling overflowed
    a float there, and every turn after failed in the relay itself."""
    again_in = engine_module._again_in
    assert again_in(0) == engine_module.POLL
    assert again_in(3) == min(8 * engine_module.POLL, engine_module.RESCAN)
    assert again_in(1024) == again_in(100_000) == engine_module.RESCAN


async def test_kept_entries_that_hold_delivery_back_are_said_once_each_way(
    spool: Spool,
    policy: Policy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As many kept as may be, nothing new starts: on a full spool disk all
    delivery stopped, and nothing in the log said so."""
    caplog.set_level(logging.INFO, logger="relay")
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "WAITING_MAX", 1)
    upstream = FillingUp(spool)
    entry = make_entry(size=len(message(1)))
    engine = Engine(spool, lambda: policy, upstream, Recorder(AuditLog(tmp_path / "audit")))
    async with queued_and_running(spool, entry, engine):
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
        await asyncio.sleep(0.3)  # a few looks
        held_up = "no delivery starts while 1 message waits,"
        held = [m for m in caplog.messages if m.startswith(held_up)]
        assert len(held) == 1, caplog.messages
        _mend_spool(spool)
        await _stored(spool, entry.queue_id, ["delivered", "pending"])
        await asyncio.sleep(0.3)
    back = [m for m in caplog.messages if m.startswith("messages kept for the audit log")]
    assert len(back) == 1 and "down to 0" in back[0], caplog.messages


@pytest.mark.parametrize("hung", [False, True])
async def test_a_kept_entry_still_being_stored_when_the_grace_ends_is_let_go_and_named(
    spool: Spool,
    policy: Policy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    hung: bool,
) -> None:
    """Its turn took it out of the kept ones, the stop let the rest go, and the
    failed store kept it again: nothing let it go, and nothing said whose
    outcomes the next start may repeat. Still storing once the stop has waited
    for it too (``hung``), it is named as an attempt that has not ended."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    if hung:
        monkeypatch.setattr(engine_module, "CUT_WAIT", 0.1)
    upstream = FillingUp(spool)
    entry = make_entry(size=len(message(1)))
    customer = entry.recipients[0].address
    update = spool.update
    slow = threading.Event()

    def slow_update(stored: QueueEntry) -> None:
        if slow.is_set():
            time.sleep(1.0)
        update(stored)

    monkeypatch.setattr(spool, "update", slow_update)
    engine = Engine(spool, lambda: policy, upstream, Recorder(AuditLog(tmp_path / "audit")))
    async with queued_and_running(spool, entry, engine):
        assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
        slow.set()
        await asyncio.sleep(0.3)  # its next turn is storing it
        assert entry.queue_id not in engine._untold
        await engine.stop(0.2)
        if hung:
            (named,) = [m for m in caplog.messages if m.startswith("stopping while 1 delivery")]
            assert entry.queue_id in named and "1 delivery attempt has not ended" in named
            await asyncio.sleep(1.5)  # its store ends and keeps it: the stop is over
            assert entry.queue_id in engine._untold and _locked_here(spool, entry.queue_id)
            return  # the daemon's process ends now; here the harness stops it again
        assert not _locked_here(spool, entry.queue_id)
    _mend_spool(spool)
    (said,) = [m for m in caplog.messages if m.startswith(f"{entry.queue_id}: the relay stops")]
    assert f"<{customer}>" in said
