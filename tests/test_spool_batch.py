"""Group commit on disk: ``Spool.put_many``/``remove_many`` share the directory
fsyncs of a batch, and one entry's failure is that entry's alone; the Recorder
writes the records of messages flushed together with one audit append."""

from __future__ import annotations

import errno
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.queueid import new_queue_id
from relay.spool import NoSuchEntry, QueueEntry, Spool, SpoolError
from relay.spool import store as store_module
from tests.spoolkit import make_entry, run_script

ROOT = Path(__file__).resolve().parent.parent


def all_files(directory: Path) -> list[str]:
    """Every file, temp files (``.ID.xxxx.tmp``) included."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def message(n: int) -> bytes:
    return f"From: a@example.com\r\nSubject: Invoice {n}\r\n\r\nBody {n}\r\n".encode()


def entry_files(entry: QueueEntry) -> list[str]:
    return [f"msg/{entry.queue_id}"]  # the record inside, until it changes


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def dir_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the directories fsynced from now on; the real fsync still happens."""
    synced: list[str] = []
    real = store_module._fsync_dir

    def counting(directory: Path) -> None:
        synced.append(Path(directory).name)
        real(directory)

    monkeypatch.setattr(store_module, "_fsync_dir", counting)
    return synced


def test_put_many_stores_all_with_one_directory_fsync(spool: Spool, dir_syncs: list[str]) -> None:
    entries = [make_entry(size=len(message(n))) for n in range(5)]
    failures = spool.put_many([(e, iter([message(n)])) for n, e in enumerate(entries)])
    assert failures == [None] * 5
    assert dir_syncs == ["msg"]
    for n, entry in enumerate(entries):
        assert spool.load(entry.queue_id) == entry
        assert spool.read_message(entry.queue_id) == message(n)
    assert spool.ids() == sorted(e.queue_id for e in entries)
    assert all_files(spool.directory) == sorted(f for e in entries for f in entry_files(e))


def test_single_puts_fsync_the_directory_each_time(spool: Spool, dir_syncs: list[str]) -> None:
    """The baseline the batch is measured against: a directory fsync per put."""
    for n in range(5):
        spool.put(make_entry(), message(n))
    assert dir_syncs == ["msg"] * 5
    assert len(spool.ids()) == 5


@pytest.mark.parametrize("position", [0, 2, 4])
@pytest.mark.parametrize("existing", ["new entry", "entry with a changed record"])
def test_a_queue_id_already_in_the_spool_is_refused_and_left_alone(
    spool: Spool, dir_syncs: list[str], position: int, existing: str
) -> None:
    old = make_entry(size=len(message(99)))
    spool.put(old, message(99))
    if existing == "entry with a changed record":
        old.attempts = 1
        spool.update(old)
    before = {name: (spool.directory / name).read_bytes() for name in all_files(spool.directory)}
    dir_syncs.clear()

    clash = make_entry(old.queue_id, size=7, subject="Not the old one", tenant="globex")
    entries = [make_entry(size=len(message(n))) for n in range(4)]
    entries.insert(position, clash)
    batch = [
        (e, [b"replace", b"d!"] if e is clash else [message(n)]) for n, e in enumerate(entries)
    ]

    failures = spool.put_many(batch)

    assert isinstance(failures[position], SpoolError)
    assert not isinstance(failures[position], NoSuchEntry)
    assert "already" in failures[position].strerror
    assert [f is None for f in failures] == [e is not clash for e in entries]
    # The old entry is byte for byte what it was.
    assert {name: (spool.directory / name).read_bytes() for name in before} == before
    assert spool.load(old.queue_id) == old
    assert spool.read_message(old.queue_id) == message(99)
    # The others are stored, and nothing else (no temp file) is there.
    others = [(n, e) for n, e in enumerate(entries) if e is not clash]
    for n, entry in others:
        assert spool.load(entry.queue_id) == entry
        assert spool.read_message(entry.queue_id) == message(n)
    assert all_files(spool.directory) == sorted(
        [*before, *(f for _, e in others for f in entry_files(e))]
    )
    assert dir_syncs == ["msg"]


def failing_chunks(after: int) -> Iterator[bytes]:
    """A message that breaks off after ``after`` chunks as if the disk filled up."""
    for n in range(after):
        yield f"chunk {n}\r\n".encode() * 100
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("position", [0, 2, 4])
def test_a_write_failure_fails_only_that_entry_and_leaves_nothing_of_it(
    spool: Spool, dir_syncs: list[str], position: int
) -> None:
    entries = [make_entry(size=len(message(n))) for n in range(5)]
    bad = entries[position]
    batch = [
        (e, failing_chunks(3) if e is bad else iter([message(n)])) for n, e in enumerate(entries)
    ]

    failures = spool.put_many(batch)

    failure = failures[position]
    assert isinstance(failure, SpoolError)
    assert failure.strerror == "No space left on device"
    assert bad.queue_id in failure.path
    assert failures[:position] + failures[position + 1 :] == [None] * 4
    good = [(n, e) for n, e in enumerate(entries) if e is not bad]
    # No file of the failed entry, temp files included: only the others' files.
    assert all_files(spool.directory) == sorted(f for _, e in good for f in entry_files(e))
    assert not any(bad.queue_id in name for name in all_files(spool.directory))
    for n, entry in good:
        assert spool.load(entry.queue_id) == entry
        assert spool.read_message(entry.queue_id) == message(n)
    with pytest.raises(NoSuchEntry):
        spool.load(bad.queue_id)
    assert dir_syncs == ["msg"]
    assert spool.recover(min_age=0) == 4


BIG_RECORD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from relay.spool import Spool
    from tests.spoolkit import make_entry, run_script
    spool = Spool(Path(sys.argv[1]))
    entries = [make_entry() for _ in range(3)]
    entries[1].subject = "x" * 20000  # its record at the head of its file is over the limit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    failures = spool.put_many([(e, (b"small message",)) for e in entries])
    print(json.dumps({
        "ids": [e.queue_id for e in entries],
        "failures": [f and [type(f).__name__, f.strerror] for f in failures],
    }))
    """
)


def test_a_record_too_big_for_the_disk_fails_only_that_entry(spool: Spool) -> None:
    """RLIMIT_FSIZE fails one entry's write, for root too: nothing of it stays."""
    out = json.loads(run_script(BIG_RECORD, str(spool.directory)))
    first, bad, last = out["ids"]
    assert out["failures"] == [None, ["SpoolError", "File too large"], None]
    assert all_files(spool.directory) == sorted([f"msg/{first}", f"msg/{last}"])
    assert spool.ids() == sorted([first, last])
    assert spool.read_message(last) == b"small message"
    assert not any(bad in name for name in all_files(spool.directory))


def test_a_batch_where_every_entry_fails_stores_nothing(spool: Spool) -> None:
    entries = [make_entry() for _ in range(3)]
    failures = spool.put_many([(e, failing_chunks(n)) for n, e in enumerate(entries)])
    assert all(isinstance(f, SpoolError) for f in failures)
    assert all_files(spool.directory) == []


def test_a_batch_whose_directory_fsync_fails_stores_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The names of the batch's files may not survive a crash: each client gets
    an error and sends the message again, so an entry left behind would be
    delivered twice."""

    def failing(directory: Path) -> None:
        raise SpoolError(directory, "Input/output error")

    monkeypatch.setattr(store_module, "_fsync_dir", failing)
    entries = [make_entry(size=len(message(n))) for n in range(3)]
    failures = spool.put_many([(e, [message(n)]) for n, e in enumerate(entries)])
    assert [f.strerror if f else None for f in failures] == ["Input/output error"] * 3
    assert all_files(spool.directory) == []


def test_a_changed_record_a_crash_left_behind_keeps_its_queue_id_taken(spool: Spool) -> None:
    """``remove`` unlinks the entry's file before its changed record, and a crash
    between them leaves the record until ``recover``: a new entry stored under
    that ID would be loaded with the old one's recipients and attempts."""
    old = make_entry(size=len(message(1)))
    spool.put(old, message(1))
    old.attempts = 1
    spool.update(old)
    spool.message_path(old.queue_id).unlink()
    clash = make_entry(old.queue_id, size=len(message(2)), tenant="globex")
    (failure,) = spool.put_many([(clash, [message(2)])])
    assert isinstance(failure, SpoolError) and "already" in failure.strerror
    assert all_files(spool.directory) == [f"env/{old.queue_id}.json"]


def test_remove_many_with_one_missing_id(spool: Spool, dir_syncs: list[str]) -> None:
    kept = make_entry()
    first, second = make_entry(), make_entry()
    for n, entry in enumerate((kept, first, second)):
        spool.put(entry, message(n))
    with spool.lock(first.queue_id):  # locked and released first, as the engine does
        pass
    missing = new_queue_id()
    dir_syncs.clear()

    failures = spool.remove_many([first.queue_id, missing, second.queue_id])

    assert failures[0] is None and failures[2] is None
    assert isinstance(failures[1], NoSuchEntry)
    assert dir_syncs == ["msg"]
    for gone in (first, second):
        with pytest.raises(NoSuchEntry):
            spool.load(gone.queue_id)
        with pytest.raises(NoSuchEntry):
            spool.read_message(gone.queue_id)
    assert spool.ids() == [kept.queue_id]
    assert all_files(spool.directory) == entry_files(kept)
    assert spool.read_message(kept.queue_id) == message(0)


def test_the_same_queue_id_twice_in_one_batch_keeps_the_first(spool: Spool) -> None:
    entry = make_entry(size=len(message(1)))
    outcomes = spool.put_many([(entry, (message(1),)), (entry, (message(2),))], hold=True)
    assert outcomes[0] is None and isinstance(outcomes[1], SpoolError)
    assert spool.read_message(entry.queue_id) == message(1)
    spool.release(entry.queue_id)
    assert spool._held == {}


def test_a_malformed_queue_id_fails_alone_in_remove_many(spool: Spool) -> None:
    entries = [make_entry(size=len(message(n))) for n in range(2)]
    for n, entry in enumerate(entries):
        spool.put(entry, message(n))
    outcomes = spool.remove_many([entries[0].queue_id, "../etc", entries[1].queue_id])
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], NoSuchEntry)
    assert all_files(spool.directory) == []


def test_an_unexpected_error_in_one_entry_fails_that_entry_alone(spool: Spool) -> None:
    def broken() -> Iterator[bytes]:
        yield b"From: a@example.com\r\n"
        raise RuntimeError("a bug in whatever produced the message")

    entries = [make_entry(size=len(message(n))) for n in range(3)]
    failures = spool.put_many(
        [(e, broken() if n == 1 else (message(n),)) for n, e in enumerate(entries)]
    )
    assert failures[0] is None and failures[2] is None
    assert isinstance(failures[1], SpoolError) and "a bug" in failures[1].strerror
    assert spool.ids() == sorted([entries[0].queue_id, entries[2].queue_id])
    assert all_files(spool.directory) == sorted(f"msg/{entries[n].queue_id}" for n in (0, 2))


def test_census_tells_tried_entries_from_new_ones_without_reading_them(spool: Spool) -> None:
    """What the metrics' queue gauges read at every scrape: the ID, the file's
    size and whether the record changed, for every entry and nothing else."""
    new, tried = make_entry(), make_entry()
    spool.put(new, message(1))
    spool.put(tried, message(2))
    tried.attempts = 1
    spool.update(tried)
    (spool.directory / "msg" / ".free.25Y4K00000000000").write_bytes(b"recycled")
    found = {queue_id: (size, changed) for queue_id, size, changed in spool.census()}
    assert set(found) == {new.queue_id, tried.queue_id}
    assert found[new.queue_id] == (spool.message_path(new.queue_id).stat().st_size, False)
    assert found[tried.queue_id][1] is True
