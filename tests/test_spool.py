"""The spool on a real file system: round trips, crash leftovers, failures, locks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.queueid import new_queue_id
from relay.server import spool_upkeep
from relay.spool import (
    DELIVERED,
    NoSuchEntry,
    QueueEntry,
    Spool,
    SpoolBusy,
    SpoolError,
)
from relay.spool import store as store_module
from tests import minimal_policy
from tests.spoolkit import (
    locked_elsewhere,
    make_entry,
    removed_while_waiting,
    run_script,
    swept_before_locked,
)

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"From: a@example.com\r\nSubject: Invoice 7\r\n\r\nBody\r\n"


def all_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_put_load_round_trip(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    assert spool.load(entry.queue_id) == entry
    assert spool.read_message(entry.queue_id) == MESSAGE
    # one file: the first record on its own line, then the message
    stored = spool.message_path(entry.queue_id).read_bytes()
    assert stored == store_module.RECORD_MARK + entry.to_json().encode() + b"\n" + MESSAGE
    with spool.open_message(entry.queue_id) as file:
        assert file.read() == MESSAGE
    assert spool.ids() == [entry.queue_id]
    assert list(spool.entries()) == [entry]
    assert all_files(spool.directory) == [f"msg/{entry.queue_id}"]
    assert spool.directory.stat().st_mode & 0o777 == 0o700
    assert spool.recover() == 1


def test_the_first_record_its_writer_holds_is_not_read_again(spool: Spool) -> None:
    """Only a changed record is read; the first is written once, never replaced."""
    entry, other = make_entry(size=len(MESSAGE)), make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    spool.put(other, MESSAGE)
    assert spool.load(entry.queue_id, entry) is entry
    wrong = spool.load(entry.queue_id, other)  # another entry's record is no first one
    assert wrong == entry and wrong is not entry
    changed = dataclasses.replace(entry, held=True)
    spool.update(changed)
    assert spool.load(entry.queue_id, entry) == changed


def test_put_stream_and_ids_sorted_by_arrival(spool: Spool) -> None:
    ids = [new_queue_id(now_ns=t * 10**9) for t in (1_700_000_300, 1_700_000_100, 1_700_000_200)]
    for queue_id in ids:
        spool.put_stream(make_entry(queue_id), iter([b"From: a\r\n", b"\r\nx\r\n"]))
    assert spool.ids() == sorted(ids)
    assert spool.read_message(ids[0]) == b"From: a\r\n\r\nx\r\n"


def test_record_is_versioned_json_and_tolerates_unknown_fields() -> None:
    entry = make_entry(size=len(MESSAGE))
    record = json.loads(entry.to_json())
    assert record["version"] == 1
    assert record["recipients"][1]["notify"] is False
    record["added_in_version_2"] = {"x": 1}
    record["recipients"][0]["future"] = True
    assert QueueEntry.from_json(json.dumps(record)) == entry


def test_record_holds_every_field_in_declaration_order() -> None:
    """What a sysadmin reads with ``cat``: each member once, as the dataclasses declare them."""
    entry = make_entry(size=len(MESSAGE))
    entry.recipients[0].reply = "250 2.0.0 Ok"
    record = json.loads(entry.to_json())
    assert list(record) == ["version", *(f.name for f in dataclasses.fields(QueueEntry))]
    assert record["recipients"] == [dataclasses.asdict(r) for r in entry.recipients]
    assert {k: v for k, v in record.items() if k not in ("version", "recipients")} == {
        f.name: getattr(entry, f.name)
        for f in dataclasses.fields(QueueEntry)
        if f.name != "recipients"
    }


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.pop("queue_id"),
        lambda r: r.pop("version"),
        lambda r: r.update(version=0),
        lambda r: r.update(arrival="yesterday"),
        lambda r: r.update(arrival=float("nan")),
        lambda r: r.update(next_attempt=1e300),
        lambda r: r.update(held="no"),
        lambda r: r.update(attempts=True),
        lambda r: r["recipients"][0].update(status="lost"),
        lambda r: r["recipients"][0].pop("notify"),
        lambda r: r.update(recipients={"a": 1}),
    ],
)
def test_damaged_record_is_a_value_error(damage: object) -> None:
    record = json.loads(make_entry(size=len(MESSAGE)).to_json())
    damage(record)  # type: ignore[operator]
    with pytest.raises(ValueError):
        QueueEntry.from_json(json.dumps(record))
    with pytest.raises(ValueError):
        QueueEntry.from_json(b"\xff{")


def test_pending_and_finished() -> None:
    entry = make_entry(size=len(MESSAGE))
    assert [r.address for r in entry.pending()] == ["customer@example.net", "archive@acme.example"]
    entry.recipients[0].status = DELIVERED
    assert not entry.finished
    entry.recipients[1].status = "failed"
    assert entry.pending() == [] and entry.finished


def test_same_queue_id_twice_is_refused(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    with pytest.raises(SpoolError):
        spool.put(entry, b"other")
    assert spool.read_message(entry.queue_id) == MESSAGE


def test_what_a_crash_leaves_behind_recovery_removes(spool: Spool) -> None:
    """A put cut short leaves a temp file; a remove cut short, a changed record
    whose entry is gone. Young files may belong to a put or remove in progress."""
    kept = make_entry(size=len(MESSAGE))
    spool.put(kept, MESSAGE)
    gone = new_queue_id()
    stale_record = spool.directory / "env" / f"{gone}.json"
    stale_record.write_text(make_entry(gone).to_json())
    stale_temp = spool.directory / "env" / f".{gone}.json.abc.tmp"
    fresh_temp = spool.directory / "msg" / f".{gone}.def.tmp"
    stale_temp.write_bytes(b'{"version": 1')
    fresh_temp.write_bytes(b"partial")

    assert spool.ids() == [kept.queue_id]
    assert spool.recover() == 1  # everything is younger than a minute
    assert stale_record.exists()

    for path in (stale_record, stale_temp):
        age(path, 120)
    assert spool.recover() == 1
    assert all_files(spool.directory) == sorted([f"msg/{kept.queue_id}", f"msg/.{gone}.def.tmp"])
    assert spool.recover(min_age=0) == 1
    assert not fresh_temp.exists()
    assert spool.load(kept.queue_id) == kept


def test_recovery_hands_over_the_records_it_reads(spool: Spool) -> None:
    """The start's metrics counted the queued messages per tenant by reading
    every record again after the recovery had opened every entry's file: with
    50,000 queued, 2 s more before the relay served. The recovery gives them
    the records it reads: a message cut short by a crash, before records moved
    into the entry's file, is removed and not given; a record that cannot be
    read is not given, and its entry is kept for the engine to say why."""
    waiting, tried, damaged = (make_entry(size=len(MESSAGE)) for _ in range(3))
    for entry in (waiting, tried, damaged):
        spool.put(entry, MESSAGE)
    tried.recipients[0].status = DELIVERED
    spool.update(tried)
    (spool.directory / "env" / f"{damaged.queue_id}.json").write_text("{")
    cut_short = spool.message_path(new_queue_id())
    cut_short.write_bytes(MESSAGE)
    age(cut_short, 120)

    read: list[QueueEntry] = []
    assert spool.recover(read=read.append) == 3
    assert sorted((e.queue_id, len(e.pending())) for e in read) == sorted(
        [(waiting.queue_id, 2), (tried.queue_id, 1)]
    )
    assert not cut_short.exists()
    assert spool.ids() == sorted([waiting.queue_id, tried.queue_id, damaged.queue_id])


def test_a_changed_record_outlives_nothing(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    entry.attempts = 1
    spool.update(entry)
    spool.remove(entry.queue_id)
    assert all_files(spool.directory) == []
    with pytest.raises(NoSuchEntry):
        spool.load(entry.queue_id)
    with pytest.raises(NoSuchEntry):
        spool.read_message(entry.queue_id)


@pytest.mark.parametrize("broken", ["msg"])
def test_unwritable_directory_raises_and_leaves_nothing(spool: Spool, broken: str) -> None:
    # A regular file where the directory should be fails even for root.
    (spool.directory / broken).rmdir()
    (spool.directory / broken).write_bytes(b"")
    entry = make_entry(size=len(MESSAGE))
    with pytest.raises(SpoolError) as caught:
        spool.put(entry, MESSAGE)
    assert caught.value.strerror == "Not a directory"
    assert entry.queue_id in caught.value.path
    assert all_files(spool.directory) == [broken]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0500 directory anyway")
def test_read_only_spool_raises_and_leaves_nothing(spool: Spool) -> None:
    (spool.directory / "msg").chmod(0o500)
    try:
        with pytest.raises(SpoolError):
            spool.put(make_entry(size=len(MESSAGE)), MESSAGE)
    finally:
        (spool.directory / "msg").chmod(0o700)
    assert all_files(spool.directory) == []


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from relay.spool import Spool, SpoolError
    from tests.spoolkit import make_entry
    spool = Spool(Path(sys.argv[1]))
    if sys.argv[2] == "update":
        entry = spool.load(spool.ids()[0])
        entry.subject = "x" * 20000
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        if sys.argv[2] == "update":
            spool.update(entry)
        else:
            spool.put(make_entry(), b"x" * 100000)
    except SpoolError as exc:
        print(exc.strerror)
    """
)


@pytest.mark.parametrize("step", ["put", "update"])
def test_full_disk_raises_and_leaves_the_spool_as_it_was(spool: Spool, step: str) -> None:
    """RLIMIT_FSIZE makes writes fail like a full disk would, for root too."""
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    before = {name: (spool.directory / name).read_bytes() for name in all_files(spool.directory)}
    assert run_script(DISK_FULL, str(spool.directory), step).strip() == "File too large"
    assert {n: (spool.directory / n).read_bytes() for n in all_files(spool.directory)} == before
    assert spool.load(entry.queue_id) == entry


def test_update_replaces_the_record_atomically(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    entry.attempts = 1
    spool.update(entry)
    path = spool.directory / "env" / f"{entry.queue_id}.json"
    with path.open("rb") as reader_before:
        entry.recipients[0].status = DELIVERED
        entry.recipients[0].reply = "250 2.0.0 Ok"
        entry.attempts = 2
        spool.update(entry)
        # A reader that opened the old file still sees all of it: the new one was renamed in.
        assert QueueEntry.from_json(reader_before.read()).attempts == 1
    assert spool.load(entry.queue_id) == entry
    assert spool.read_message(entry.queue_id) == MESSAGE
    assert all_files(spool.directory) == [f"env/{entry.queue_id}.json", f"msg/{entry.queue_id}"]


def test_a_temporary_file_left_by_a_crash_does_not_block_the_next_write(spool: Spool) -> None:
    """Writes go through ``.NAME.tmp``; when a crash left one, the write takes another name."""
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    left = spool.directory / "env" / f".{entry.queue_id}.json.tmp"
    left.write_bytes(b'{"version": 1, "torn')
    entry.attempts = 3
    spool.update(entry)
    assert spool.load(entry.queue_id).attempts == 3
    assert left.read_bytes() == b'{"version": 1, "torn'  # recovery's to remove, when old enough
    assert [n for n in all_files(spool.directory) if not n.startswith("env/.")] == [
        f"env/{entry.queue_id}.json",
        f"msg/{entry.queue_id}",
    ]


def test_a_message_in_more_pieces_than_one_system_call_takes(spool: Spool) -> None:
    pieces = [b"Header-%d: x\r\n" % n for n in range(2500)] + [b"\r\nbody\r\n", b""]
    entry = make_entry(size=sum(map(len, pieces)))
    assert spool.put_many([(entry, iter(pieces))]) == [None]
    assert spool.read_message(entry.queue_id) == b"".join(pieces)


def test_update_of_a_removed_entry_does_not_resurrect_it(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    spool.remove(entry.queue_id)
    with pytest.raises(NoSuchEntry):
        spool.update(entry)
    assert spool.ids() == []


def test_remove_deletes_record_message_and_lock(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    with spool.lock(entry.queue_id):
        spool.remove(entry.queue_id)
    assert all_files(spool.directory) == []
    with pytest.raises(NoSuchEntry):
        spool.remove(entry.queue_id)
    with pytest.raises(NoSuchEntry):
        spool.load(entry.queue_id)


class Crash(BaseException):
    pass


def test_crash_during_remove_leaves_only_an_orphan_record(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    entry.attempts = 1
    spool.update(entry)

    def crash(directory: Path) -> None:
        raise Crash

    monkeypatch.setattr(store_module, "_fsync_dir", crash)
    with pytest.raises(Crash):
        spool.remove(entry.queue_id)
    monkeypatch.undo()
    assert spool.ids() == []  # the entry's file went first
    record = spool.directory / "env" / f"{entry.queue_id}.json"
    assert record.exists()
    age(record, 120)
    assert spool.recover() == 0
    assert all_files(spool.directory) == []


def test_a_record_copied_from_another_entry_is_not_loaded_as_this_one(spool: Spool) -> None:
    """A record copied over another's (a restore, a slip with ``cp``) would send
    this entry's message with the other's envelope and recipients."""
    first, second = make_entry(size=len(MESSAGE)), make_entry(size=len(MESSAGE))
    spool.put(first, MESSAGE)
    spool.put(second, MESSAGE)
    second.attempts = 1
    spool.update(second)
    env = spool.directory / "env"
    (env / f"{first.queue_id}.json").write_bytes((env / f"{second.queue_id}.json").read_bytes())
    with pytest.raises(SpoolError, match=f"record is for queue ID {second.queue_id}"):
        spool.load(first.queue_id)


def test_lock_held_by_another_process_is_busy(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    with (
        locked_elsewhere(spool.directory, entry.queue_id),
        pytest.raises(SpoolBusy),
        spool.lock(entry.queue_id, blocking=False),
    ):
        pass
    with spool.lock(entry.queue_id, blocking=False):
        assert spool.load(entry.queue_id) == entry


INCREMENTER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from relay.spool import Spool
    spool = Spool(Path(sys.argv[1]))
    for _ in range(int(sys.argv[3])):
        with spool.lock(sys.argv[2]):
            entry = spool.load(sys.argv[2])
            entry.attempts += 1
            spool.update(entry)
    """
)


def test_concurrent_updates_under_lock_lose_nothing(spool: Spool) -> None:
    """Two processes read-modify-write the same entry; the lock serialises them."""
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", INCREMENTER, str(spool.directory), entry.queue_id, "25"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(2)
    ]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    assert spool.load(entry.queue_id).attempts == 50


def test_waiting_for_a_lock_whose_entry_is_removed_meanwhile(spool: Spool) -> None:
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    outcome = removed_while_waiting(spool, entry.queue_id, lambda: spool.remove(entry.queue_id))
    assert len(outcome) == 1 and isinstance(outcome[0], NoSuchEntry)
    assert all_files(spool.directory) == []


def test_lock_on_unknown_or_malformed_id(spool: Spool) -> None:
    for queue_id in (new_queue_id(), "../../etc/passwd", "", "0" * 17):
        with pytest.raises(NoSuchEntry), spool.lock(queue_id):
            pass
        with pytest.raises(NoSuchEntry):
            spool.load(queue_id)
    assert all_files(spool.directory) == []


def test_unreadable_record_is_skipped_with_a_warning(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_entry(size=len(MESSAGE))
    spool.put(good, MESSAGE)
    bad = make_entry(size=len(MESSAGE))
    spool.put(bad, MESSAGE)
    bad = bad.queue_id
    (spool.directory / "env" / f"{bad}.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert list(spool.entries()) == [good]
    assert bad in caplog.text
    with pytest.raises(SpoolError, match="unreadable"):
        spool.load(bad)


def returns(call: Callable[[], object], fifos: list[Path]) -> object:
    """What ``call`` returns, within seconds; one that waits on a FIFO is freed
    (a writer opened) and fails the test."""
    result: list[object] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as exc:  # raised here, in the test's thread
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail(f"{call} waited on a FIFO")
    if raised:
        raise raised[0]
    return result[0]


def test_a_fifo_in_the_spool_is_skipped_not_waited_for(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    good, changed = make_entry(size=len(MESSAGE)), make_entry(size=len(MESSAGE))
    spool.put(good, MESSAGE)
    spool.put(changed, MESSAGE)
    fifos = [
        spool.directory / "msg" / "0123456789ABCDEF",
        spool.directory / "env" / f"{changed.queue_id}.json",
        spool.directory / "msg" / ".0123456789ABCDEG.tmp",
    ]
    for fifo in fifos:
        os.mkfifo(fifo)
        age(fifo, 7200)
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert returns(lambda: list(spool.entries()), fifos) == [good]
    assert "0123456789ABCDEF skipped unreadable queue entry" in caplog.text
    assert "0123456789ABCDEF: a FIFO, not a regular file" in caplog.text
    assert f"{changed.queue_id}.json: a FIFO, not a regular file" in caplog.text
    assert returns(lambda: spool.recover(min_age=60), fifos) == 2
    assert returns(spool.complete, fifos) == sorted([good.queue_id, changed.queue_id])
    with pytest.raises(SpoolError, match="a FIFO, not a regular file"):
        returns(lambda: spool.acquire("0123456789ABCDEF"), fifos)
    assert all(fifo.exists() for fifo in fifos)  # not the relay's to remove


def test_a_damaged_first_record_names_the_entrys_file(spool: Spool) -> None:
    """With no changed record beside it, the record read is msg/ID's: the error
    named env/ID.json, which is not there, at every scan."""
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    path = spool.message_path(entry.queue_id)
    path.write_bytes(b'relay-queue-entry 1 {"queue_id"')
    with pytest.raises(SpoolError, match="unreadable queue record") as raised:
        spool.load(entry.queue_id)
    assert raised.value.path == str(path)


def test_kick(spool: Spool) -> None:
    assert spool.last_kick() == 0.0
    spool.kick()
    assert spool.last_kick() > 0.0
    seen = spool.last_kick()
    assert spool.last_kick() <= seen
    age(spool.directory / "kick", 10)
    seen = spool.last_kick()
    spool.kick()
    assert spool.last_kick() > seen


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files for another user")
def test_root_hands_new_files_to_the_spool_owner(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    spool = Spool(directory)
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    with spool.lock(entry.queue_id):
        spool.update(entry)
    spool.kick()
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in directory.rglob("*")}
    assert owners == {(65534, 65534)}


TRY_LOCK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from relay.spool import Spool, SpoolBusy
    try:
        with Spool(Path(sys.argv[1])).lock(sys.argv[2], blocking=False):
            print("locked")
    except SpoolBusy:
        print("busy")
    """
)


def _lock_from_another_process(spool: Spool, queue_id: str) -> str:
    return run_script(TRY_LOCK, str(spool.directory), queue_id).strip()


def test_a_held_new_entry_is_locked_until_released(spool: Spool) -> None:
    """Another worker's engine must not take a message whose client awaits its answer."""
    entry = make_entry(size=len(MESSAGE))
    assert spool.put_many([(entry, (MESSAGE,))], hold=True) == [None]
    assert spool.ids() == [entry.queue_id]
    assert _lock_from_another_process(spool, entry.queue_id) == "busy"
    spool.release(entry.queue_id)
    assert _lock_from_another_process(spool, entry.queue_id) == "locked"
    assert not (spool.directory / "lock").exists()  # the message file is the lock


def test_an_entry_queued_in_the_earlier_layout_is_read_and_delivered_whole(spool: Spool) -> None:
    """Before records moved into the entry's file, msg/ID held the message alone
    and env/ID.json the record; a lock file each. Such a queue survives an upgrade."""
    entry = make_entry(size=len(MESSAGE))
    message = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n b=abc\r\n" + MESSAGE
    spool.message_path(entry.queue_id).write_bytes(message)
    (spool.directory / "env" / f"{entry.queue_id}.json").write_text(entry.to_json())
    (spool.directory / "lock").mkdir()
    (spool.directory / "lock" / f"{entry.queue_id}.lock").touch()
    crashed = new_queue_id()  # the earlier layout's crash between message and record
    spool.message_path(crashed).write_bytes(MESSAGE)
    age(spool.message_path(crashed), 120)
    age(spool.directory / "lock" / f"{entry.queue_id}.lock", 120)

    assert spool.recover() == 1
    assert spool.ids() == [entry.queue_id]
    assert spool.load(entry.queue_id) == entry
    assert spool.read_message(entry.queue_id) == message
    assert not (spool.directory / "lock").exists()
    entry.attempts = 1
    with spool.lock(entry.queue_id):
        spool.update(entry)
    assert spool.load(entry.queue_id) == entry
    spool.remove(entry.queue_id)
    assert all_files(spool.directory) == []


def test_the_daily_upkeep_removes_what_a_crash_left_once_it_is_old_enough(
    tmp_path: Path,
) -> None:
    """A restart right after a crash leaves its temp and free files: too young
    then to tell from a put in progress. The daily upkeep removes them later,
    keeping what a client silent mid-message (up to its idle timeout) may still write."""
    state = tmp_path / "state"
    policy = dataclasses.replace(
        minimal_policy.policy((minimal_policy.listener(idle_timeout=7200),)),
        queue=dataclasses.replace(minimal_policy.policy().queue, directory=state / "queue"),
    )
    spool = Spool(policy.queue.directory)
    kept = make_entry(size=len(MESSAGE))
    spool.put(kept, MESSAGE)
    gone = new_queue_id()
    left = [spool.directory / "msg" / f".{gone}.abc.tmp", spool.directory / "env" / f"{gone}.json"]
    writing = spool.directory / "msg" / f".{new_queue_id()}.def.tmp"
    for path in (*left, writing):
        path.write_bytes(b"partial")
    for path in left:
        age(path, 7300)
    age(writing, 7000)  # within the idle timeout: perhaps a client still sending
    spool_upkeep(policy)
    assert all_files(spool.directory) == sorted([f"msg/{kept.queue_id}", f"msg/{writing.name}"])


def test_the_queue_tools_open_a_spool_on_a_read_only_file_system(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening it fsynced the directory, which a read-only file system refuses:
    ``relay queue list`` failed exactly when an operator needed it (a disk gone read-only)."""
    assert spool.put_many([(make_entry(), (b"Subject: x\r\n\r\nx\r\n",))]) == [None]

    def read_only(path: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(store_module, "_fsync_dir", read_only)
    assert len(list(Spool(spool.directory, create=False).entries())) == 1


def test_an_entry_put_between_recoverys_listings_is_kept_whatever_the_clock(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daily upkeep lists the complete entries, then the files: one put in
    between was taken for a message without its record, and with the clock
    ahead of the files' times (a step forward, a file server's clock behind),
    removed after its 250."""
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    monkeypatch.setattr(spool, "complete", lambda read=None: [])  # as listed just before that put
    now = time.time()
    monkeypatch.setattr(store_module.time, "time", lambda: now + 7200)
    spool.recover(min_age=3600)
    assert spool.load(entry.queue_id) == entry
    assert spool.read_message(entry.queue_id) == MESSAGE


def test_a_put_under_way_keeps_its_file_from_recovery_whatever_the_clock(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its temp file went by its age alone: removed under the write, the put
    failed and the client was refused."""
    entry = make_entry(size=len(MESSAGE))
    writing, go_on = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def chunks() -> Iterator[bytes]:
        writing.set()
        assert go_on.wait(10)
        yield MESSAGE

    def put() -> None:
        try:
            spool.put_stream(entry, chunks())
        except SpoolError as exc:
            failed.append(exc)

    writer = threading.Thread(target=put)
    writer.start()
    try:
        assert writing.wait(10)
        temps = [n for n in os.listdir(spool.directory / "msg") if n.endswith(".tmp")]
        assert len(temps) == 1
        now = time.time()
        monkeypatch.setattr(store_module.time, "time", lambda: now + 7200)
        Spool(spool.directory).recover(min_age=3600)  # another process's daily upkeep
        assert (spool.directory / "msg" / temps[0]).exists()
    finally:
        go_on.set()
        writer.join(10)
    assert failed == []
    assert spool.read_message(entry.queue_id) == MESSAGE


def test_a_temp_file_swept_between_its_making_and_its_lock_is_made_again(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovery with its clock ahead may remove a temp file before its writer
    locks it: the put wrote into a file with no name, and its rename failed."""
    swept = swept_before_locked(monkeypatch, ".")  # its temp file, .ID.tmp
    entry = make_entry(size=len(MESSAGE))
    spool.put(entry, MESSAGE)
    assert swept
    assert spool.read_message(entry.queue_id) == MESSAGE
