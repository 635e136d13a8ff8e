"""Recycled entry files: a delivered entry's file is overwritten by the next put,
never read as anything but the new entry, and kept for a bounded time only."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from relay.spool import NoSuchEntry, Spool
from relay.spool import store as store_module
from tests.spoolkit import locked_elsewhere, make_entry, removed_while_waiting, swept_before_locked

LONG = b"From: a@example.com\r\nSubject: Invoice 1\r\n\r\n" + b"x" * 5000 + b"\r\n"
SHORT = b"From: b@example.com\r\nSubject: Invoice 2\r\n\r\nshort\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def names(spool: Spool) -> list[str]:
    return sorted(os.listdir(spool.directory / "msg"))


def failing_fsync(directory: Path) -> None:
    raise store_module.SpoolError(directory, "Input/output error")


def removed_lazily(spool: Spool) -> str:
    """A delivered entry, moved aside without a directory fsync; its queue ID."""
    entry = make_entry(size=len(SHORT))
    spool.put(entry, SHORT)
    spool.remove_many([entry.queue_id], recycle=True, lazy=True)
    return entry.queue_id


def test_a_delivered_entrys_file_is_overwritten_by_the_next_entry(spool: Spool) -> None:
    first = make_entry(size=len(LONG))
    spool.put(first, LONG)
    inode = spool.message_path(first.queue_id).stat().st_ino
    assert spool.remove_many([first.queue_id], recycle=True) == [None]
    assert names(spool) == [f".free.{first.queue_id}"]
    assert spool.ids() == [] and list(spool.entries()) == []

    second = make_entry(size=len(SHORT))
    spool.put(second, SHORT)
    path = spool.message_path(second.queue_id)
    assert path.stat().st_ino == inode  # the same file, not a new one
    # nothing of the longer message it replaced is left at the end
    assert path.read_bytes() == store_module.RECORD_MARK + second.to_json().encode() + b"\n" + SHORT
    assert spool.load(second.queue_id) == second
    assert spool.read_message(second.queue_id) == SHORT
    assert names(spool) == [second.queue_id]


def test_only_remove_many_with_recycle_keeps_a_file(spool: Spool) -> None:
    one = make_entry(size=len(SHORT))
    spool.put(one, SHORT)
    spool.remove(one.queue_id)  # the queue tools' and refusals' way: the bytes go
    assert names(spool) == []


def test_a_big_entry_is_removed_not_kept(spool: Spool) -> None:
    big = b"From: a@example.com\r\n\r\n" + b"y" * (store_module.RECYCLE_SIZE + 1)
    entry = make_entry(size=len(big))
    spool.put(entry, big)
    spool.remove_many([entry.queue_id], recycle=True)
    assert names(spool) == []


def test_no_more_free_files_than_the_limit(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "RECYCLE_MAX", 2)
    entries = [make_entry(size=len(SHORT)) for _ in range(4)]
    spool.put_many([(entry, (SHORT,)) for entry in entries])
    spool.remove_many([entry.queue_id for entry in entries], recycle=True)
    assert len(names(spool)) == 2
    assert all(name.startswith(".free.") for name in names(spool))


def test_free_files_kept_too_long_are_trimmed(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [make_entry(size=len(SHORT)) for _ in range(3)]
    spool.put_many([(entry, (SHORT,)) for entry in entries])
    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    spool.remove_many([entries[0].queue_id, entries[1].queue_id], recycle=True)
    clock[0] += store_module.RECYCLE_TTL / 2
    spool.remove_many([entries[2].queue_id], recycle=True)
    assert spool.trim_recycled() == 0
    clock[0] += store_module.RECYCLE_TTL / 2 + 1
    assert spool.trim_recycled() == 2
    assert names(spool) == [f".free.{entries[2].queue_id}"]
    # a put after the last one's time is up creates a new file instead
    clock[0] += store_module.RECYCLE_TTL
    fresh = make_entry(size=len(SHORT))
    spool.put(fresh, SHORT)
    assert names(spool) == [fresh.queue_id]
    assert spool.read_message(fresh.queue_id) == SHORT


def test_a_free_file_still_locked_is_passed_over(spool: Spool) -> None:
    first = make_entry(size=len(SHORT))
    spool.put(first, SHORT)
    with spool.lock(first.queue_id):  # the engine that delivered it still holds it
        spool.remove_many([first.queue_id], recycle=True)
        second = make_entry(size=len(SHORT))
        spool.put(second, SHORT)
        assert sorted(names(spool)) == sorted([f".free.{first.queue_id}", second.queue_id])
    third = make_entry(size=len(SHORT))
    spool.put(third, SHORT)  # now unlocked, it is taken
    assert sorted(names(spool)) == sorted([second.queue_id, third.queue_id])
    assert spool.read_message(third.queue_id) == SHORT


def test_a_free_file_locked_by_another_process_is_passed_over(spool: Spool) -> None:
    first = make_entry(size=len(SHORT))
    spool.put(first, SHORT)
    free = spool.directory / "msg" / f".free.{first.queue_id}"
    with locked_elsewhere(spool.directory, first.queue_id):
        spool.remove_many([first.queue_id], recycle=True)
        second = make_entry(size=len(SHORT))
        spool.put(second, SHORT)
        assert free.exists()
        assert spool.read_message(second.queue_id) == SHORT


def test_a_waiter_for_a_recycled_entry_finds_it_gone(spool: Spool) -> None:
    """The file lives on under another name: the waiter must not take it for its entry."""
    entry = make_entry(size=len(SHORT))
    spool.put(entry, SHORT)
    outcome = removed_while_waiting(
        spool, entry.queue_id, lambda: spool.remove_many([entry.queue_id], recycle=True)
    )
    assert len(outcome) == 1 and isinstance(outcome[0], NoSuchEntry)


def test_a_vanished_free_file_is_skipped(spool: Spool) -> None:
    first = make_entry(size=len(SHORT))
    spool.put(first, SHORT)
    spool.remove_many([first.queue_id], recycle=True)
    (spool.directory / "msg" / f".free.{first.queue_id}").unlink()  # a sysadmin cleaned up
    second = make_entry(size=len(SHORT))
    spool.put(second, SHORT)
    assert names(spool) == [second.queue_id]
    assert spool.read_message(second.queue_id) == SHORT


def test_recovery_removes_free_files_left_by_an_earlier_run(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = make_entry(size=len(SHORT))
    done = make_entry(size=len(SHORT))
    spool.put_many([(kept, (SHORT,)), (done, (SHORT,))])
    spool.remove_many([done.queue_id], recycle=True)
    free = spool.directory / "msg" / f".free.{done.queue_id}"
    assert Spool(spool.directory).recover() == 1  # just freed: may be a running process's
    assert free.exists()
    now = time.time()
    monkeypatch.setattr(store_module.time, "time", lambda: now + 120)
    assert Spool(spool.directory).recover() == 1
    assert names(spool) == [kept.queue_id]
    assert spool.read_message(kept.queue_id) == SHORT


def test_free_files_of_a_worker_that_died_are_swept(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = Spool(spool.directory)  # another process's, which will never reuse it
    entry = make_entry(size=len(SHORT))
    dead.put(entry, SHORT)
    dead.remove_many([entry.queue_id], recycle=True)
    assert spool.trim_recycled() == 0
    assert names(spool) == [f".free.{entry.queue_id}"]
    now = time.time()
    monkeypatch.setattr(store_module.time, "time", lambda: now + 2 * store_module.RECYCLE_TTL + 1)
    # not when short of space: the search lists the whole spool on the event loop
    assert spool.trim_recycled(0.0, orphans=False) == 0
    assert spool.trim_recycled() == 1
    assert names(spool) == []


def test_a_stopping_engine_leaves_no_free_file(spool: Spool) -> None:
    entries = [make_entry(size=len(SHORT)) for _ in range(3)]
    spool.put_many([(entry, (SHORT,)) for entry in entries])
    spool.remove_many([entry.queue_id for entry in entries], recycle=True)
    assert spool.trim_recycled(0.0) == 3
    assert names(spool) == []


def test_a_file_whose_rename_may_not_have_landed_is_never_reused(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_entry(size=len(SHORT))
    spool.put(first, SHORT)
    with monkeypatch.context() as patched:
        patched.setattr(store_module, "_fsync_dir", failing_fsync)
        with pytest.raises(store_module.SpoolError):
            spool.remove_many([first.queue_id], recycle=True)
    assert names(spool) == []  # neither the entry nor a free file
    second = make_entry(size=len(SHORT))
    spool.put(second, SHORT)
    assert names(spool) == [second.queue_id]


def test_a_reader_without_the_lock_hears_when_the_file_became_another_entry(
    spool: Spool,
) -> None:
    first = make_entry(size=len(LONG))
    spool.put(first, LONG)
    second = make_entry(size=len(SHORT))
    with pytest.raises(NoSuchEntry), spool.open_message(first.queue_id) as message:
        spool.remove_many([first.queue_id], recycle=True)
        spool.put(second, SHORT)  # written into the file the reader holds open
        message.read()
    with spool.open_message(second.queue_id) as message:
        assert message.read() == SHORT


def test_a_failed_overwrite_leaves_neither_entry_nor_free_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_entry(size=len(SHORT))
    spool.put(first, SHORT)
    spool.remove_many([first.queue_id], recycle=True)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_fsync_file", full)
    second = make_entry(size=len(LONG))
    failures = spool.put_many([(second, (LONG,))])
    assert failures[0] is not None and "No space left" in str(failures[0])
    assert names(spool) == []


def test_a_lazy_removal_is_made_durable_by_the_next_put(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its free file waits for a directory fsync before it may be reused."""
    synced: list[Path] = []
    real = store_module._fsync_dir

    def counted(directory: Path) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(store_module, "_fsync_dir", counted)
    first = make_entry(size=len(SHORT))
    spool.put(first, SHORT)
    inode = spool.message_path(first.queue_id).stat().st_ino
    synced.clear()
    spool.remove_many([first.queue_id], recycle=True, lazy=True)
    assert synced == [] and spool.removals_pending
    assert names(spool) == [f".free.{first.queue_id}"]
    second = make_entry(size=len(SHORT))
    spool.put(second, SHORT)  # its fsync covers the removal, but came after its write
    assert spool.message_path(second.queue_id).stat().st_ino != inode
    assert synced == [spool.directory / "msg"] and not spool.removals_pending
    third = make_entry(size=len(SHORT))
    spool.put(third, SHORT)
    assert spool.message_path(third.queue_id).stat().st_ino == inode


def test_sync_removals_makes_a_lazy_removal_durable_once(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(store_module, "_fsync_dir", synced.append)
    entries = [make_entry(size=len(SHORT)) for _ in range(2)]
    spool.put_many([(entry, (SHORT,)) for entry in entries])
    synced.clear()
    spool.remove_many([entry.queue_id for entry in entries], recycle=True, lazy=True)
    assert synced == []
    spool.sync_removals()
    spool.sync_removals()  # nothing left to make durable
    assert synced == [spool.directory / "msg"]
    assert spool.trim_recycled(0.0) == 2  # made reusable by that fsync


def test_a_lazy_removal_that_unlinks_is_fsynced_at_once(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A freed inode may be the next file's: its old name must not come back."""
    synced: list[Path] = []
    monkeypatch.setattr(store_module, "_fsync_dir", synced.append)
    monkeypatch.setattr(store_module, "RECYCLE_MAX", 1)
    entries = [make_entry(size=len(SHORT)) for _ in range(2)]
    spool.put_many([(entry, (SHORT,)) for entry in entries])
    synced.clear()
    spool.remove_many([entry.queue_id for entry in entries], recycle=True, lazy=True)
    assert synced == [spool.directory / "msg"]  # the second one was unlinked
    assert not spool.removals_pending
    assert names(spool) == [f".free.{entries[0].queue_id}"]


def test_a_rename_during_a_running_fsync_waits_for_the_next_one(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """That fsync may have read the directory before the rename: it proves nothing."""
    entries = [make_entry(size=len(SHORT)) for _ in range(2)]
    spool.put_many([(entry, (SHORT,)) for entry in entries])
    spool.remove_many([entries[0].queue_id], recycle=True, lazy=True)
    inside, go_on = threading.Event(), threading.Event()
    real = store_module._fsync_dir

    def slow(directory: Path) -> None:
        inside.set()
        assert go_on.wait(10)
        real(directory)

    monkeypatch.setattr(store_module, "_fsync_dir", slow)
    syncing = threading.Thread(target=spool.sync_removals)
    syncing.start()
    assert inside.wait(10)
    spool.remove_many([entries[1].queue_id], recycle=True, lazy=True)
    go_on.set()
    syncing.join(10)
    assert spool.removals_pending  # the second rename is not covered yet
    monkeypatch.setattr(store_module, "_fsync_dir", real)
    assert spool.trim_recycled(0.0) == 1  # only the first was made reusable
    spool.sync_removals()
    assert not spool.removals_pending
    assert spool.trim_recycled(0.0) == 1


def test_a_failed_sync_of_lazy_removals_drops_their_free_files_and_retries(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed_lazily(spool)
    with monkeypatch.context() as patched:
        patched.setattr(store_module, "_fsync_dir", failing_fsync)
        with pytest.raises(store_module.SpoolError):
            spool.sync_removals()
    assert names(spool) == []
    assert spool.removals_pending  # the next sync tries again
    spool.sync_removals()
    assert not spool.removals_pending
    assert spool.trim_recycled(0.0) == 0  # nothing was left to reuse


def test_a_sync_while_another_is_running_does_its_own(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running one may yet fail: a stopping engine must not take it for done."""
    removed_lazily(spool)
    calls: list[Path] = []
    go_on = threading.Event()

    def slow(directory: Path) -> None:
        calls.append(directory)
        assert go_on.wait(10)

    monkeypatch.setattr(store_module, "_fsync_dir", slow)
    first = threading.Thread(target=spool.sync_removals)
    first.start()
    deadline = time.monotonic() + 10
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = threading.Thread(target=spool.sync_removals)
    second.start()
    while len(calls) < 2:
        assert time.monotonic() < deadline, "the second sync returned without an fsync"
        time.sleep(0.01)
    go_on.set()
    first.join(10)
    second.join(10)
    assert not spool.removals_pending


def delivered(spool: Spool) -> None:
    """An entry delivered and its file kept for the next."""
    entry = make_entry(size=len(SHORT))
    spool.put(entry, SHORT)
    spool.remove_many([entry.queue_id], recycle=True)


def _freed_by_another_worker(spool: Spool) -> Path:
    other = Spool(spool.directory)
    entry = make_entry(size=len(SHORT))
    other.put(entry, SHORT)
    other.remove_many([entry.queue_id], recycle=True)
    return spool.directory / "msg" / f".free.{entry.queue_id}"


def test_a_free_file_a_worker_holds_is_not_swept_however_old_it_looks(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock stepped forward makes every free file look orphaned: the sweep
    removed the one a live worker was writing an entry into, whose rename
    then failed and refused the message."""
    free = _freed_by_another_worker(spool)
    now = time.time()
    monkeypatch.setattr(store_module.time, "time", lambda: now + 2 * store_module.RECYCLE_TTL + 1)
    fd = os.open(free, os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as that worker's reuse holds it
        assert spool.trim_recycled() == 0
        Spool(spool.directory).recover()  # a worker started in a dead one's place
        assert free.exists()
    finally:
        os.close(fd)
    assert spool.trim_recycled() == 1
    assert names(spool) == []


def test_a_reused_file_is_locked_until_it_has_its_entrys_name(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered(spool)
    seen: list[bool] = []
    replace = os.replace

    def watched(source: str, target: str) -> None:
        if Path(source).name.startswith(".free."):
            probe = os.open(source, os.O_RDONLY)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except BlockingIOError:
                seen.append(True)
            finally:
                os.close(probe)
        replace(source, target)

    monkeypatch.setattr(store_module.os, "replace", watched)
    entry = make_entry(size=len(SHORT))
    spool.put(entry, SHORT)
    assert seen == [True]
    assert spool.read_message(entry.queue_id) == SHORT


def test_a_free_file_swept_between_its_open_and_its_lock_is_not_written(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's sweep may land between this one's open and its lock:
    the entry then went into a file with no name, and its rename failed."""
    delivered(spool)
    swept = swept_before_locked(monkeypatch, ".free.")
    entry = make_entry(size=len(SHORT))
    spool.put(entry, SHORT)
    assert swept and Path(swept[0]).name.startswith(".free.")
    assert spool.read_message(entry.queue_id) == SHORT
