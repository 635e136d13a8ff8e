"""Writing the audit log on real files: days, reopening, failures, maintenance."""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.audit import AuditError, AuditLog, events, reader, verify, writer
from relay.audit.chain import GENESIS_HASH, seal
from relay.audit.search import search
from tests.test_audit_fixture import START, Clock, build, read_all

ROOT = Path(__file__).resolve().parent.parent


def _failed(n: int) -> dict:
    return events.failed(queue_id=f"Q{n}", message_id=None, recipient="a@b", reply="550 no")


def test_first_record_starts_from_genesis_and_each_links_to_the_last(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, clock=Clock())
    log.append(_failed(1))
    log.append_many([_failed(2), _failed(3)])
    records = read_all(tmp_path)
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS_HASH
    assert [r["prev"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    assert records[0]["time"] == "2024-05-06T09:00:00.000Z"
    assert log.head == (3, records[-1]["hash"])


def test_lines_are_compact_utf8_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, clock=Clock())
    log.append(
        events.failed(
            queue_id="Q",
            message_id=None,
            recipient="jürgen@ex.example",
            reply="550 line\r\nbreak \u2028",
        )
    )
    raw = (tmp_path / "audit-2024-05-06.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b"}\n")
    assert "jürgen".encode() in raw and b"\\r\\n" in raw and b", " not in raw


def test_days_roll_over_at_utc_midnight_and_the_chain_crosses_them(tmp_path: Path) -> None:
    clock = Clock(datetime(2024, 5, 6, 23, 59, 59, 999000, tzinfo=UTC))
    log = AuditLog(tmp_path, clock=clock)
    log.append(_failed(1))
    clock.advance(milliseconds=1)
    log.append(_failed(2))
    assert (tmp_path / "audit-2024-05-06.jsonl").read_text().count("\n") == 1
    second = json.loads((tmp_path / "audit-2024-05-07.jsonl").read_text())
    first = json.loads((tmp_path / "audit-2024-05-06.jsonl").read_text())
    assert second["seq"] == 2 and second["prev"] == first["hash"]
    assert second["time"] == "2024-05-07T00:00:00.000Z"


def test_reopening_continues_seq_and_prev(tmp_path: Path) -> None:
    clock = build(tmp_path)
    before = read_all(tmp_path)
    clock.advance(days=3)
    log = AuditLog(tmp_path, clock=clock)
    assert log.head == (before[-1]["seq"], before[-1]["hash"])
    log.append(_failed(99))
    after = read_all(tmp_path)[-1]
    assert after["seq"] == before[-1]["seq"] + 1 and after["prev"] == before[-1]["hash"]
    assert verify(tmp_path).ok


def test_a_clock_going_back_never_writes_into_an_older_day(tmp_path: Path) -> None:
    clock = Clock(datetime(2024, 5, 7, 0, 0, 1, tzinfo=UTC))
    log = AuditLog(tmp_path, clock=clock)
    log.append(_failed(1))
    clock.advance(seconds=-5)
    log.append(_failed(2))
    assert sorted(p.name for p in tmp_path.glob("audit-*")) == ["audit-2024-05-07.jsonl"]
    assert verify(tmp_path).ok


def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    """The daemon and ``relay queue delete`` append to the same log."""
    clock = Clock()
    daemon, tool = AuditLog(tmp_path, clock=clock), AuditLog(tmp_path, clock=clock)
    daemon.append(_failed(1))
    tool.append(_failed(2))
    daemon.append(_failed(3))
    clock.advance(days=1)
    tool.append(_failed(4))
    daemon.append(_failed(5))
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2, 3, 4, 5]
    assert verify(tmp_path).ok


def test_threads_append_without_breaking_the_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, clock=Clock())

    def work(base: int) -> None:
        for n in range(50):
            log.append(_failed(base + n))

    threads = [threading.Thread(target=work, args=(i * 100,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify(tmp_path)
    assert result.ok and result.records == 200


def test_fsync_failure_raises_audit_error_and_leaves_no_half_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path, clock=Clock())
    log.append(_failed(1))
    size = (tmp_path / "audit-2024-05-06.jsonl").stat().st_size

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(AuditError, match="Input/output error"):
        log.append(_failed(2))
    monkeypatch.undo()
    assert (tmp_path / "audit-2024-05-06.jsonl").stat().st_size == size
    log.append(_failed(3))
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2]
    assert verify(tmp_path).ok


def test_directory_replaced_by_a_file_raises_audit_error(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    log = AuditLog(directory, clock=Clock())
    log.append(_failed(1))
    shutil.rmtree(directory)
    directory.write_text("not a directory")
    with pytest.raises(AuditError):
        log.append(_failed(2))


def _copied(source: Path, target: Path) -> None:
    """``cp -a``: the files and the directory's mtime with them."""
    shutil.copytree(source, target)
    shutil.copystat(source, target)


def test_a_directory_restored_from_a_backup_is_written_to(tmp_path: Path) -> None:
    """The writers went on appending to the deleted files, answered 250 and lost
    at the next restart: the restored directory kept the old one's mtime."""
    directory, backup = tmp_path / "audit", tmp_path / "backup"
    clock = Clock()
    daemon, tool = AuditLog(directory, clock=clock), AuditLog(directory, clock=clock)
    daemon.append(_failed(1))
    _copied(directory, backup)
    shutil.rmtree(directory)
    with pytest.raises(AuditError):
        daemon.append(_failed(2))  # nothing there: refused, not written elsewhere
    _copied(backup, directory)
    daemon.append(_failed(3))
    tool.append(_failed(4))
    daemon.append(_failed(5))
    assert [r["queue_id"] for r in read_all(directory)] == ["Q1", "Q3", "Q4", "Q5"]
    assert verify(directory).ok
    for log in (daemon, tool):  # each takes the lock a new writer would take
        assert os.fstat(log._lock_fd).st_ino == os.stat(directory / ".lock").st_ino


def test_files_restored_with_the_directorys_mtime_are_written_to(tmp_path: Path) -> None:
    """``cp -a backup/. audit/``: the same directory, its mtime put back."""
    directory, backup = tmp_path / "audit", tmp_path / "backup"
    log = AuditLog(directory, clock=Clock())
    log.append(_failed(1))
    _copied(directory, backup)
    for path in directory.iterdir():
        path.unlink()
    for path in backup.iterdir():
        shutil.copy2(path, directory / path.name)
    shutil.copystat(backup, directory)
    log.append(_failed(2))
    assert [r["queue_id"] for r in read_all(directory)] == ["Q1", "Q2"]
    assert verify(directory).ok


def test_unusable_directory_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(AuditError):
        AuditLog(tmp_path / "file" / "audit")


def test_a_torn_last_line_is_kept_and_ended_on_reopen(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, clock=Clock())
    log.append_many([_failed(1), _failed(2)])
    log.close()
    path = tmp_path / "audit-2024-05-06.jsonl"
    path.write_bytes(path.read_bytes() + b'{"v":1,"seq":3,"ti')  # a crash mid-write
    log = AuditLog(tmp_path, clock=Clock())
    assert log.head[0] == 2
    log.append(_failed(3))
    lines = path.read_bytes().split(b"\n")
    assert lines[2] == b'{"v":1,"seq":3,"ti [torn write, ended by the relay]'
    assert json.loads(lines[3])["seq"] == 3
    result = verify(tmp_path)
    assert result.ok and result.records == 3
    assert any("line 3: a write torn by a crash" in note for note in result.notes)


def test_a_writer_follows_long_records_and_a_torn_line_through_its_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's appends, read back through the open descriptor: a record
    longer than one read, and a line torn by that worker's crash."""
    from relay.audit import reader

    monkeypatch.setattr(reader, "_CHUNK", 16)  # every record spans several reads
    clock = Clock()
    daemon, other = AuditLog(tmp_path, clock=clock), AuditLog(tmp_path, clock=clock)
    daemon.append(_failed(1))
    other.append_many([_failed(2), _failed(3)])
    daemon.append(_failed(4))
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2, 3, 4]
    path = tmp_path / "audit-2024-05-06.jsonl"
    with path.open("ab") as torn:  # the other worker died mid-write
        torn.write(b'{"v":1,"seq":5,"ti')
    daemon.append(_failed(5))
    records = [json.loads(x) for x in path.read_bytes().split(b"\n") if x.endswith(b"}")]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[4]["prev"] == records[3]["hash"]
    assert daemon.head == (5, records[4]["hash"])


def test_an_ended_torn_line_does_not_stop_the_next_writer(tmp_path: Path) -> None:
    """A second start (or another worker) after the crash continues the chain."""
    log = AuditLog(tmp_path, clock=Clock())
    log.append_many([_failed(1), _failed(2)])
    log.close()
    path = tmp_path / "audit-2024-05-06.jsonl"
    path.write_bytes(path.read_bytes() + b'{"v":1,"seq":3,"ti')
    AuditLog(tmp_path, clock=Clock()).close()  # ends the torn line, writes nothing
    again = AuditLog(tmp_path, clock=Clock())
    assert again.head[0] == 2
    again.append(_failed(3))
    records = [json.loads(x) for x in path.read_bytes().split(b"\n") if x.endswith(b"}")]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[2]["prev"] == records[1]["hash"]
    result = verify(tmp_path)
    assert result.ok and result.records == 3


def test_a_torn_line_before_an_empty_new_day_is_ended(tmp_path: Path) -> None:
    """A crash just after midnight: the old day's file ends in a torn line and the
    new day's is there, empty. Only the newest file's torn line was ended, so
    verify called the log tampered with at every run after."""
    clock = Clock(datetime(2024, 5, 6, 23, 59, 59, tzinfo=UTC))
    with AuditLog(tmp_path, clock=clock) as log:
        log.append_many([_failed(1), _failed(2)])
    old = tmp_path / "audit-2024-05-06.jsonl"
    old.write_bytes(old.read_bytes() + b'{"v":1,"seq":3,"ti')
    (tmp_path / "audit-2024-05-07.jsonl").write_bytes(b"")
    clock.advance(minutes=5)
    with AuditLog(tmp_path, clock=clock) as log:
        log.append(_failed(3))
    assert old.read_bytes().endswith(b'{"v":1,"seq":3,"ti' + reader.TORN_END)
    result = verify(tmp_path)
    assert result.ok and result.records == 3, result
    assert any("a write torn by a crash" in note for note in result.notes)


def test_a_new_day_begins_once_the_day_before_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer's outcome written just before midnight without an fsync of
    its own, then the new day's first record fsynced: a power cut between could
    keep the later record and lose the earlier, a gap between the files that
    verify calls tampering. The day before's file is fsynced first."""
    clock = Clock(datetime(2024, 5, 6, 23, 59, 59, tzinfo=UTC))
    delivery, other = AuditLog(tmp_path, clock=clock), AuditLog(tmp_path, clock=clock)
    other.append(_failed(1))
    assert delivery.append_many([_failed(2)], sync=False) > 0
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    clock.advance(seconds=2)
    other.append(_failed(3))
    assert synced[:1] == ["audit-2024-05-06.jsonl"], synced
    assert "audit-2024-05-07.jsonl" in synced
    delivery.close()
    other.close()


def test_writers_in_two_processes_keep_one_chain(tmp_path: Path) -> None:
    """Worker processes each have their own writer on the same directory."""
    with AuditLog(tmp_path, clock=Clock()) as supervisor:
        supervisor.append(_failed(1))  # today's file exists before the workers start
    first, second = AuditLog(tmp_path, clock=Clock()), AuditLog(tmp_path, clock=Clock())
    first.append(_failed(2))
    second.append(_failed(3))  # never wrote before: must not start from its stale head
    first.append(_failed(4))  # the file grew behind its back
    second.append(_failed(5))
    first.close()
    second.close()
    assert verify(tmp_path).ok
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2, 3, 4, 5]


def test_maintain_compresses_closed_days_and_keeps_the_chain(tmp_path: Path) -> None:
    build(tmp_path)
    log = AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=2)))
    done = log.maintain()
    assert done == ["compressed audit-2024-05-06.jsonl", "compressed audit-2024-05-07.jsonl"]
    names = sorted(p.name for p in tmp_path.glob("audit-*"))
    assert names == [
        "audit-2024-05-06.jsonl.gz",
        "audit-2024-05-07.jsonl.gz",
        "audit-2024-05-08.jsonl",
    ]
    with gzip.open(tmp_path / "audit-2024-05-06.jsonl.gz", "rb") as f:
        assert f.readline().startswith(b'{"v":1,"seq":1,')
    assert verify(tmp_path).ok
    assert [r["seq"] for r in search(tmp_path, tenant="acme", status="failed")] == [9]
    log.append(_failed(1))
    assert verify(tmp_path).ok


def test_maintain_never_compresses_the_newest_day(tmp_path: Path) -> None:
    build(tmp_path)
    log = AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=30)))
    log.maintain()
    assert (tmp_path / "audit-2024-05-08.jsonl").exists()


def test_compressed_days_are_as_private_as_plain_ones(tmp_path: Path) -> None:
    """Started by hand or in a container the umask is often 022: a day's records
    must not become readable by everyone once they are gzipped."""
    umask = os.umask(0o022)
    try:
        build(tmp_path)
        AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=2))).maintain()
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("audit-*")}
    assert modes == {
        "audit-2024-05-06.jsonl.gz": 0o640,
        "audit-2024-05-07.jsonl.gz": 0o640,
        "audit-2024-05-08.jsonl": 0o640,
    }


@pytest.mark.parametrize(("before", "new"), [(0o640, 0o640), (0o440, 0o640), (0o600, 0o600)])
def test_a_new_day_takes_the_mode_of_the_day_before(tmp_path: Path, before: int, new: int) -> None:
    """``relay bounce``, run by Postfix with a umask of 077, began a day 0600
    where the group was given read of the others: a log shipper lost the day.
    A day made read-only gives the next its group's read, not its own
    read-only: a second writer could not open that day."""
    clock = Clock(START)
    AuditLog(tmp_path, clock=clock).append(events.policy_loaded(policy_file="p", policy_sha256="0"))
    (first,) = tmp_path.glob("audit-*.jsonl")
    first.chmod(before)
    clock.advance(days=1)
    umask = os.umask(0o077)
    try:
        AuditLog(tmp_path, clock=clock).append(
            events.policy_loaded(policy_file="p", policy_sha256="1")
        )
    finally:
        os.umask(umask)
    (second,) = set(tmp_path.glob("audit-*.jsonl")) - {first}
    assert second.stat().st_mode & 0o777 == new


def test_the_directory_is_the_relay_s_to_write_whatever_the_umask(tmp_path: Path) -> None:
    """Made under a umask of 0 it was anyone's to write: a local user renamed the
    day file and removed ``.head``, and verify found an intact log of 0 records."""
    umask = os.umask(0)
    try:
        AuditLog(tmp_path / "made" / "audit")  # its parent made on the way
        AuditLog(tmp_path / "audit")
    finally:
        os.umask(umask)
    assert (tmp_path / "made" / "audit").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "audit").stat().st_mode & 0o777 == 0o750


def test_retention_deletes_old_days_after_recording_it(tmp_path: Path) -> None:
    build(tmp_path)
    kept_first = json.loads((tmp_path / "audit-2024-05-08.jsonl").read_text().splitlines()[0])
    clock = Clock(datetime(2024, 5, 10, 1, 0, tzinfo=UTC))
    log = AuditLog(tmp_path, retention_days=2, clock=clock)
    assert log.maintain() == ["deleted audit-2024-05-06.jsonl", "deleted audit-2024-05-07.jsonl"]
    names = sorted(p.name for p in tmp_path.glob("audit-*"))
    assert names == ["audit-2024-05-08.jsonl", "audit-2024-05-10.jsonl"]
    pruned = json.loads((tmp_path / "audit-2024-05-10.jsonl").read_text())
    assert pruned["event"] == "pruned"
    assert pruned["files"] == ["audit-2024-05-06.jsonl", "audit-2024-05-07.jsonl"]
    assert pruned["through_seq"] == kept_first["seq"] - 1
    assert pruned["through_hash"] == kept_first["prev"]
    result = verify(tmp_path)
    assert result.ok, result.problem
    assert any("starts after retention at seq" in n for n in result.notes)


def test_an_unreadable_last_record_stops_the_writer(tmp_path: Path) -> None:
    AuditLog(tmp_path, clock=Clock()).append(_failed(1))
    path = tmp_path / "audit-2024-05-06.jsonl"
    path.write_bytes(path.read_bytes() + b"garbage\n")
    with pytest.raises(AuditError, match="unreadable: run relay audit verify"):
        AuditLog(tmp_path, clock=Clock())


def test_a_compressed_newest_day_is_not_written_beside(tmp_path: Path) -> None:
    AuditLog(tmp_path, clock=Clock()).append(_failed(1))
    plain = tmp_path / "audit-2024-05-06.jsonl"
    with gzip.open(tmp_path / "audit-2024-05-06.jsonl.gz", "wb") as f:
        f.write(plain.read_bytes())
    plain.unlink()
    AuditLog(tmp_path, clock=Clock()).append(_failed(2))
    assert (tmp_path / "audit-2024-05-07.jsonl").exists()
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2]
    assert verify(tmp_path).ok


def test_retention_deletes_compressed_days_too(tmp_path: Path) -> None:
    build(tmp_path)
    AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=2))).maintain()
    log = AuditLog(tmp_path, retention_days=1, clock=Clock(START + timedelta(days=3)))
    assert log.maintain() == [
        "deleted audit-2024-05-06.jsonl.gz", "deleted audit-2024-05-07.jsonl.gz"
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("audit-*")) == [
        "audit-2024-05-08.jsonl", "audit-2024-05-09.jsonl"
    ]  # fmt: skip
    assert verify(tmp_path).ok


def _started(log: AuditLog) -> None:
    """What the daemon's start writes before its upkeep: dated by its clock."""
    log.append(
        events.policy_loaded(policy_file="/etc/erp-relay/relay.yaml", policy_sha256="0" * 64)
    )


def test_a_clock_far_ahead_deletes_nothing_the_log_vouches_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM booting with a bad RTC, before NTP: its records are minutes old."""
    build(tmp_path)
    clock = Clock(START + timedelta(days=2, minutes=1) + timedelta(days=365))
    log = AuditLog(tmp_path, retention_days=2, clock=clock)
    _started(log)
    assert log.maintain() == []
    assert [p.name for p in sorted(tmp_path.glob("audit-*"))] == [
        "audit-2024-05-06.jsonl", "audit-2024-05-07.jsonl", "audit-2024-05-08.jsonl",
        "audit-2025-05-08.jsonl",
    ]  # fmt: skip
    assert (
        "the clock (2025-05-08) is more than retention_days (2) past the log's records of"
        " 2024-05-08 and before: a clock set ahead (check it), or a long idle; until"
        " 2025-05-10 retention deletes only what was past it on 2024-05-08"
    ) in caplog.text
    result = verify(tmp_path)
    assert result.ok and result.first_seq == 1, result.problem


def test_after_a_long_idle_retention_catches_up_once_the_clock_has_run_that_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded: what is past retention goes retention_days late, not never."""
    build(tmp_path)
    clock = Clock(START + timedelta(days=30))
    log = AuditLog(tmp_path, retention_days=2, clock=clock)
    _started(log)
    assert log.maintain() == []
    clock.advance(days=1)
    _started(log)
    assert log.maintain() == []
    clock.advance(days=1)
    caplog.clear()
    assert log.maintain() == [
        "deleted audit-2024-05-06.jsonl", "deleted audit-2024-05-07.jsonl",
        "deleted audit-2024-05-08.jsonl",
    ]  # fmt: skip
    assert "retention_days" not in caplog.text
    result = verify(tmp_path)
    assert result.ok, result.problem
    assert any("starts after retention at seq" in n for n in result.notes)


def test_a_clock_set_right_after_a_start_far_ahead_holds_retention_no_longer_than_its_period(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Set right, the clock writes on into the file named a year on: no new day
    file ever made a run of the days since, and once the log's last day was
    more than retention_days back, retention was held for the year, its
    warning's end moving on a day each day."""
    build(tmp_path)
    clock = Clock(START + timedelta(days=2, minutes=1) + timedelta(days=365))
    log = AuditLog(tmp_path, retention_days=2, clock=clock)
    _started(log)
    assert log.maintain() == []
    clock.advance(days=-364)  # NTP: the day after the log's last one, 2024-05-09
    deleted, ends = {}, set()
    for _ in range(6):
        caplog.clear()
        _started(log)
        for done in log.maintain():
            deleted[done] = clock.now.date().isoformat()
        ends |= set(re.findall(r"until (\S+) retention deletes", caplog.text))
        clock.advance(days=1)
    assert deleted == {
        "deleted audit-2024-05-06.jsonl": "2024-05-09",
        "deleted audit-2024-05-07.jsonl": "2024-05-10",
        "deleted audit-2024-05-08.jsonl": "2024-05-13",  # held from 2024-05-11, 2 days
    }
    assert ends == {"2024-05-13"}  # one end said, not a day on each day
    result = verify(tmp_path)
    assert result.ok, result.problem


@pytest.mark.parametrize(
    ("ahead", "stopped"),
    [
        (timedelta(days=365), 3),  # the VM boots a year ahead again, three days on
        (timedelta(days=30), 30),  # a start after a long idle, a stop, another idle
    ],
    ids=["ahead-again", "idle-again"],
)
def test_a_hold_left_from_an_earlier_start_does_not_count_for_this_one(
    tmp_path: Path, ahead: timedelta, stopped: int
) -> None:
    """The count of days held, left by a start that stopped within a day, made
    the next start take its clock for right and delete the history."""
    build(tmp_path)
    clock = Clock(START + timedelta(days=2, minutes=1) + ahead)
    log = AuditLog(tmp_path, retention_days=2, clock=clock)
    _started(log)
    assert log.maintain() == []
    log.close()
    clock.advance(days=stopped)
    again = AuditLog(tmp_path, retention_days=2, clock=clock)
    _started(again)
    assert again.maintain() == []
    assert {p.name for p in tmp_path.glob("audit-2024-05-0*")} == {
        "audit-2024-05-06.jsonl", "audit-2024-05-07.jsonl", "audit-2024-05-08.jsonl",
    }  # fmt: skip


def test_retention_within_its_period_of_the_newest_records_is_as_before(tmp_path: Path) -> None:
    """A stop of up to retention_days is no sign of a wrong clock."""
    build(tmp_path)
    log = AuditLog(tmp_path, retention_days=2, clock=Clock(START + timedelta(days=4)))
    _started(log)
    assert log.maintain() == [
        "deleted audit-2024-05-06.jsonl", "deleted audit-2024-05-07.jsonl"
    ]  # fmt: skip


D = datetime(2026, 12, 6, tzinfo=UTC).date()


@pytest.mark.parametrize(
    ("days", "today", "expected"),
    [
        ([D - timedelta(days=2), D], D, (D, D)),  # the clock right: as before
        ([D, D + timedelta(days=365)], D + timedelta(days=365), (D, D + timedelta(days=367))),
        # ahead by a year for a start, then by two: the first jump vouches for nothing
        (
            [D, D + timedelta(days=365), D + timedelta(days=730)],
            D + timedelta(days=730),
            (D, D + timedelta(days=732)),
        ),
        # ahead long enough: its records are old enough, now
        ([D, D + timedelta(days=365)], D + timedelta(days=367), (D + timedelta(days=367),) * 2),
        # set right after a start far ahead: today's file named a year on
        (
            [D, D + timedelta(days=365)],
            D + timedelta(days=1),
            (D + timedelta(days=1),) * 2,
        ),
    ],
)
def test_retention_day(days: list, today: Any, expected: tuple) -> None:
    assert writer.retention_day(days, today, 2) == expected


def test_a_disk_full_mid_write_leaves_no_half_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path, clock=Clock())
    log.append(_failed(1))
    real_write, calls = os.write, []

    def half_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(AuditError, match="No space left on device"):
        log.append_many([_failed(2), _failed(3)])
    monkeypatch.undo()
    log.append(_failed(4))
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2]
    assert verify(tmp_path).ok


def test_a_failed_tail_read_is_retried_not_guessed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    daemon, tool = AuditLog(tmp_path, clock=clock), AuditLog(tmp_path, clock=clock)
    daemon.append(_failed(1))
    tool.append(_failed(2))
    from relay.audit import reader

    def unreadable(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(reader, "day_files", unreadable)
    monkeypatch.setattr(reader, "last_line", unreadable)
    monkeypatch.setattr(reader, "last_line_of", unreadable)
    with pytest.raises(AuditError):
        daemon.append(_failed(3))
    monkeypatch.undo()
    daemon.append(_failed(3))
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2, 3]
    assert verify(tmp_path).ok


class FsyncCounter:
    """Counts the fsyncs the writer makes, and can make them fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.names: list[str] = []
        self.failing = False
        real = os.fsync

        def fsync(fd: int) -> None:
            self.calls += 1
            self.names.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            if self.failing:
                raise OSError(5, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def test_an_unsynced_write_is_on_disk_once_a_later_fsync_covers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path, clock=Clock())
    log.append(_failed(0))  # the day's file exists: its creation fsyncs the directory
    fsyncs = FsyncCounter(monkeypatch)
    first = log.append_many([_failed(1)], sync=False)
    second = log.append_many([_failed(2)], sync=False)
    assert fsyncs.calls == 0
    assert 0 < first < second
    assert log.synced(first) is False and log.synced(second) is False
    log.append(_failed(3))  # an fsynced write covers what came before it in the file
    assert fsyncs.calls == 1
    assert log.synced(first) is True and log.synced(second) is True
    assert log.synced(0) is True
    third = log.append_many([_failed(4)], sync=False)
    log.sync()
    assert log.synced(third) is True
    log.sync()  # nothing left to cover
    assert fsyncs.calls == 2
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2, 3, 4, 5]
    assert verify(tmp_path).ok


def test_a_failed_fsync_leaves_unsynced_writes_in_doubt_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the kernel may have dropped the pages: a later fsync that
    succeeds says nothing about them, so their writer must write them again."""
    log = AuditLog(tmp_path, clock=Clock())
    fsyncs = FsyncCounter(monkeypatch)
    on_disk = log.append_many([_failed(0)], sync=False)
    log.sync()
    doubtful = log.append_many([_failed(1)], sync=False)
    fsyncs.failing = True
    with pytest.raises(AuditError, match="Input/output error"):
        log.sync()
    fsyncs.failing = False
    log.sync()
    log.append(_failed(2))
    assert log.synced(doubtful) is None
    later = log.append_many([_failed(3)], sync=False)
    log.sync()
    assert log.synced(later) is True
    assert log.synced(doubtful) is None
    assert log.synced(on_disk) is True  # an earlier fsync covered it


def test_unsynced_writes_of_a_day_are_fsynced_when_the_day_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    log = AuditLog(tmp_path, clock=clock)
    fsyncs = FsyncCounter(monkeypatch)
    ticket = log.append_many([_failed(1)], sync=False)
    clock.now += timedelta(days=1)
    log.append(_failed(2))  # next day's file: its fsync does not reach the first day's
    assert log.synced(ticket) is True
    first, second = "audit-2024-05-06.jsonl", "audit-2024-05-07.jsonl"
    assert first in fsyncs.names and second in fsyncs.names
    assert fsyncs.names.index(first) < fsyncs.names.index(second)
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2]
    assert verify(tmp_path).ok


@pytest.mark.parametrize("when", ["after the copy", "after the check"])
def test_a_day_written_to_while_it_is_compressed_is_left_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A writer whose clock still read that day appends to it, late: the file is
    not swapped for a copy that lacks the record; the next upkeep tries again."""
    build(tmp_path)
    log = AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=2)))
    day = tmp_path / "audit-2024-05-07.jsonl"

    def late_append() -> None:
        with open(day, "ab") as late:
            late.write(b'{"late": true}\n')

    copy, checksum = shutil.copyfileobj, writer._sha256

    def copied_then_late_append(source: Any, target: Any, length: int = 0) -> None:
        copy(source, target, length)
        if source.name == str(day):
            late_append()

    def checked_then_late_append(stream: Any) -> str:
        value = checksum(stream)
        if getattr(stream, "name", None) == str(day):  # the original, read for the check
            late_append()
        return value

    if when == "after the copy":
        monkeypatch.setattr(shutil, "copyfileobj", copied_then_late_append)
    else:
        monkeypatch.setattr(writer, "_sha256", checked_then_late_append)
    assert log.maintain() == [
        "compressed audit-2024-05-06.jsonl",
        "left audit-2024-05-07.jsonl as it is: written to meanwhile",
    ]
    assert day.read_bytes().endswith(b'{"late": true}\n')
    assert not day.with_name(day.name + ".gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


APPEND_AS_DAEMON = """
import os, sys
from pathlib import Path
from relay.audit import AuditLog, events
os.setgid(65534)  # after the imports: the interpreter's files may be root's alone
os.setuid(65534)
AuditLog(Path(sys.argv[1])).append(
    events.failed(queue_id="LATER", message_id=None, recipient="a@b.example", reply="550")
)
"""


@contextlib.contextmanager
def _nobodys(name: str) -> Iterator[Path]:
    """A directory ``name`` of nobody's, 0700, where nobody can reach it (not under
    root's 0700 tmp); removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="relay-audit-owner-"))
    try:
        base.chmod(0o755)
        directory = base / name
        directory.mkdir(mode=0o700)
        os.chown(directory, 65534, 65534)
        yield directory
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files for another user")
def test_root_hands_the_files_it_creates_to_the_logs_owner() -> None:
    """``relay queue delete`` as root may be the first writer of a day: the daemon,
    running as the directory's owner, must still be able to append."""
    with _nobodys("audit") as directory:
        AuditLog(directory).append(_failed(1))
        for left in directory.iterdir():  # as a root tool before the fix left them
            if left.name != ".stepped":  # newer than that fix
                os.chown(left, 0, 0)
        AuditLog(directory).append(_failed(2))
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in directory.iterdir()}
        assert owners == {(65534, 65534)}
        done = subprocess.run(
            [sys.executable, "-c", APPEND_AS_DAEMON, str(directory)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert [r["queue_id"] for r in read_all(directory)][-1] == "LATER"
        assert verify(directory).ok


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files for another user")
def test_root_making_the_directory_hands_it_to_the_state_directorys_owner() -> None:
    """``relay bounce`` as root before the relay's first start made ``audit/`` root's:
    the relay, run as the state directory's owner, then could not start."""
    with _nobodys("state") as state:
        AuditLog(state / "audit").append(_failed(1))
        owners = {
            (p.stat().st_uid, p.stat().st_gid)
            for p in [state / "audit", *(state / "audit").iterdir()]
        }
        assert owners == {(65534, 65534)}
        done = subprocess.run(
            [sys.executable, "-c", APPEND_AS_DAEMON, str(state / "audit")],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files for another user")
def test_root_hands_the_files_it_compresses_to_the_logs_owner(tmp_path: Path) -> None:
    """The daemon's upkeep must be able to delete, by retention, what root compressed."""
    os.chown(tmp_path, 65534, 65534)
    build(tmp_path)
    AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=2))).maintain()
    owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in tmp_path.glob("audit-*")}
    assert set(owners.values()) == {(65534, 65534)}
    assert "audit-2024-05-06.jsonl.gz" in owners


@pytest.mark.parametrize("stumble", [False, True], ids=["at-once", "after-a-failed-read"])
def test_records_removed_behind_the_writers_back_are_reported_and_show_in_verify(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    stumble: bool,
) -> None:
    """The day's file moved away while the relay runs: a new chain from the genesis
    would verify as intact; the writer says so and goes on from the head it knows,
    even when the first read of the directory after it failed."""
    log = AuditLog(tmp_path / "audit", clock=Clock())
    for n in range(1, 4):
        log.append(_failed(n))
    day = tmp_path / "audit" / "audit-2024-05-06.jsonl"
    day.rename(tmp_path / "elsewhere")
    if stumble:
        listing = reader.day_files
        calls: list[int] = []

        def failing_once(directory: Path, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")
            return listing(directory, **kwargs)

        monkeypatch.setattr(writer.reader, "day_files", failing_once)
        with pytest.raises(AuditError):
            log.append(_failed(4))
    log.append(_failed(4))
    assert [r["seq"] for r in read_all(tmp_path / "audit")] == [4]
    assert "records up to seq 3 were written, its files now end at seq 0" in caplog.text
    result = verify(tmp_path / "audit")
    assert not result.ok and result.problem is not None
    assert "records 1..3 missing" in result.problem.message


def _cut_in_place(day: Path, keep: bytes) -> None:
    with open(day, "wb") as file:  # same inode, as an editor writing over the file does
        file.write(keep)


def _cut_by_replacing(day: Path, keep: bytes) -> None:
    fresh = day.with_name(".edited")  # a new inode renamed over it, as ``sed -i`` does
    fresh.write_bytes(keep)
    os.replace(fresh, day)


@pytest.mark.parametrize("cut", [_cut_in_place, _cut_by_replacing], ids=["in-place", "replaced"])
def test_records_cut_from_the_end_behind_the_writers_back_show_in_verify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: Callable[[Path, bytes], None]
) -> None:
    """The newest lines cut off the day's file the relay writes: taking the shorter
    file's tail would reuse their seqs in a chain that verifies as intact."""
    log = AuditLog(tmp_path, clock=Clock())
    for n in range(1, 7):
        log.append(_failed(n))
    written = log.head
    day = tmp_path / "audit-2024-05-06.jsonl"
    cut(day, b"".join(day.read_bytes().splitlines(keepends=True)[:-3]))
    log.append(_failed(7))
    last = read_all(tmp_path)[-1]
    assert (last["seq"], last["prev"]) == (written[0] + 1, written[1])
    assert "records up to seq 6 were written, its files now end at seq 3" in caplog.text
    result = verify(tmp_path)
    assert not result.ok and result.problem is not None
    assert "records 4..6 missing" in result.problem.message


def _drop_last_lines(day: Path, count: int) -> None:
    _cut_in_place(day, b"".join(day.read_bytes().splitlines(keepends=True)[:-count]))


@pytest.mark.parametrize("others", [1, 2], ids=["same-size-left", "other-size-left"])
def test_records_another_writer_made_and_that_were_cut_off_are_noticed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, others: int
) -> None:
    """Two workers: the newest records, the first's, cut off the end while the relay
    runs. The second, which never saw them, must not take their seqs again: the
    chain would verify as intact. Even when the file is cut back to exactly the
    size the second left it at."""
    clock = Clock()
    first, second = AuditLog(tmp_path, clock=clock), AuditLog(tmp_path, clock=clock)
    first.append(_failed(1))
    second.append(_failed(2))
    for n in range(3, 3 + others):
        first.append_many([_failed(n)], sync=False)  # a delivery's outcome
    first.sync()  # the engine's, within two seconds
    written = first.head
    _drop_last_lines(tmp_path / "audit-2024-05-06.jsonl", others)
    second.append(_failed(9))
    last = read_all(tmp_path)[-1]
    assert (last["seq"], last["prev"]) == (written[0] + 1, written[1])
    assert f"records up to seq {written[0]} were written, its files now end at seq 2" in caplog.text
    result = verify(tmp_path)
    assert not result.ok and result.problem is not None
    assert "missing before this line (deleted)" in result.problem.message
    assert result.problem.message.startswith(f"record{'s 3..' if others > 1 else ' '}")


def test_records_cut_off_while_no_writer_ran_are_noticed_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with AuditLog(tmp_path, clock=Clock()) as log:
        for n in range(1, 5):
            log.append(_failed(n))
    _drop_last_lines(tmp_path / "audit-2024-05-06.jsonl", 2)
    with AuditLog(tmp_path, clock=Clock()) as log:
        log.append(_failed(5))
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2, 5]
    assert "records up to seq 4 were written, its files now end at seq 2" in caplog.text


def test_the_shared_head_never_names_a_record_before_its_fsync(tmp_path: Path) -> None:
    """A crash may lose what was written without an fsync: a ``.head`` naming it
    would make the next start report records removed that were never on disk."""
    log = AuditLog(tmp_path, clock=Clock())
    log.append(_failed(1))
    shared = (tmp_path / writer.HEAD_FILE).read_bytes()
    assert shared.split()[:2] == [b"%020d" % 1, log.head[1].encode()]
    log.append_many([_failed(2)], sync=False)
    log.append_many([_failed(3)], sync=False)
    assert (tmp_path / writer.HEAD_FILE).read_bytes() == shared
    log.sync()
    assert (tmp_path / writer.HEAD_FILE).read_bytes().split()[0] == b"%020d" % 3


def test_the_shared_head_never_goes_back_to_an_older_record_of_another_writer(
    tmp_path: Path,
) -> None:
    """One worker's fsync of an older record, made after another worker shared a
    newer one, must leave ``.head`` at the newer: taken back, the newest record
    could be cut from the log's end and verify would not notice."""
    clock = Clock()
    slow, fast = AuditLog(tmp_path, clock=clock), AuditLog(tmp_path, clock=clock)
    slow.append(_failed(1))
    slow.append_many([_failed(2)], sync=False)
    fast.append(_failed(3))
    newest = fast.head
    slow.sync()
    assert reader.read_head(tmp_path) == newest
    _drop_last_lines(reader.day_files(tmp_path)[-1].path, 1)
    assert verify(tmp_path).problem is not None


def test_a_torn_shared_head_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with AuditLog(tmp_path, clock=Clock()) as log:
        log.append(_failed(1))
    head = tmp_path / writer.HEAD_FILE
    head.write_bytes(b"%020d" % 7 + head.read_bytes()[20:])  # new seq, old hash and check
    with AuditLog(tmp_path, clock=Clock()) as log:
        log.append(_failed(2))
    assert [r["seq"] for r in read_all(tmp_path)] == [1, 2]
    assert "were written" not in caplog.text
    assert verify(tmp_path).ok


def test_a_restored_directory_takes_no_seq_another_writer_used_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records another worker wrote after the backup were lost with the
    directory, and this writer, which never saw them, took their seqs again:
    verify then counted too few missing, and two records had one seq."""
    directory, backup = tmp_path / "audit", tmp_path / "backup"
    clock = Clock()
    daemon, other = AuditLog(directory, clock=clock), AuditLog(directory, clock=clock)
    daemon.append(_failed(1))
    _copied(directory, backup)
    other.append(_failed(2))
    other.append(_failed(3))
    shutil.rmtree(directory)
    _copied(backup, directory)
    daemon.append(_failed(4))
    assert [(r["seq"], r["queue_id"]) for r in read_all(directory)] == [(1, "Q1"), (4, "Q4")]
    assert "records up to seq 3 were written, its files now end at seq 1" in caplog.text
    result = verify(directory)
    assert result.problem is not None and result.problem.message.startswith("records 2..3")


def test_compression_never_replaces_a_gz_of_the_same_day_holding_other_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A logrotate of the newest day, its rotated file renamed back by hand to
    the day's .gz name while the relay went on in a new plain file: upkeep
    replaced that .gz with the plain file's copy, its fsynced records gone."""
    build(tmp_path)
    day = tmp_path / "audit-2024-05-08.jsonl"
    rotated = day.with_name(day.name + ".gz")
    with gzip.open(rotated, "wb") as packed:
        packed.write(day.read_bytes())
    day.write_bytes(b"")
    kept = rotated.read_bytes()
    clock = Clock(START + timedelta(days=2, hours=1))
    log = AuditLog(tmp_path, compress_after_days=1, clock=clock)
    log.append(_failed(1))  # to the new plain file, after seq 18 as .head says
    clock.advance(days=3)
    log.append(_failed(2))  # a newer day: the rotated one is closed
    assert log.maintain() == [
        "compressed audit-2024-05-06.jsonl",
        "compressed audit-2024-05-07.jsonl",
        "left audit-2024-05-08.jsonl as it is: audit-2024-05-08.jsonl.gz holds other records",
    ]
    assert rotated.read_bytes() == kept and day.exists()
    assert "audit-2024-05-08.jsonl.gz holds records audit-2024-05-08.jsonl does not begin" in (
        caplog.text
    )
    result = verify(tmp_path)
    assert not result.ok
    assert (
        "audit-2024-05-08.jsonl.gz is not read: audit-2024-05-08.jsonl of the same day is, instead"
        in result.notes
    )
    # mended as docs/audit-log.md says: the rotated records back before the new ones
    with gzip.open(rotated, "rb") as packed:
        day.write_bytes(packed.read() + day.read_bytes())
    rotated.unlink()
    assert verify(tmp_path).ok
    assert log.maintain() == ["compressed audit-2024-05-08.jsonl"]


def test_compression_cut_off_by_a_crash_is_finished_over_its_gz(tmp_path: Path) -> None:
    """A .gz that holds the start of the plain file, or all of it, loses nothing."""
    build(tmp_path)
    day = tmp_path / "audit-2024-05-07.jsonl"
    with gzip.open(day.with_name(day.name + ".gz"), "wb") as packed:
        packed.write(day.read_bytes()[:100])
    log = AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=2)))
    assert "compressed audit-2024-05-07.jsonl" in log.maintain()
    assert not day.exists() and verify(tmp_path).ok


def test_a_cut_off_gz_of_the_plain_files_start_is_replaced_and_other_records_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed ``gzip -k`` leaves a stream that ends early: taken for one holding
    other records, it was kept with an ERROR at every maintenance run and the
    day never compressed. Cut off within other records, it is still kept."""
    build(tmp_path)
    day = tmp_path / "audit-2024-05-07.jsonl"
    other = tmp_path / "audit-2024-05-06.jsonl"
    for plain, text in ((day, day.read_bytes()), (other, b"x" + other.read_bytes())):
        packed = gzip.compress(text, mtime=0)
        plain.with_name(plain.name + ".gz").write_bytes(packed[: len(packed) * 2 // 3])
    kept = other.with_name(other.name + ".gz").read_bytes()
    log = AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=2)))
    assert log.maintain() == [
        "left audit-2024-05-06.jsonl as it is: audit-2024-05-06.jsonl.gz holds other records",
        "compressed audit-2024-05-07.jsonl",
    ]
    assert not day.exists() and other.exists()
    assert other.with_name(other.name + ".gz").read_bytes() == kept
    assert "audit-2024-05-07.jsonl.gz holds records" not in caplog.text
    assert [r["seq"] for r in read_all(tmp_path)] == list(range(1, 19))


def _append_until(directory: Path, witness: Path, stop: Any) -> None:
    log = AuditLog(directory, witness=witness)
    while not stop.is_set():
        log.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="0" * 64))
    log.close()


def test_a_log_opened_while_others_write_is_never_behind_its_witness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The witness was read after the tail, out of the lock: a worker's record in
    between made a log opened to settle a dead worker's entries look restored
    from an older copy, and a message its client never had acknowledged was
    delivered, and again when the client sent it again. The witness's read
    here waits a moment, in which the others write if they can."""
    opening = AuditLog._open_witness

    def slowly(log: AuditLog) -> None:
        time.sleep(0.005)
        opening(log)

    monkeypatch.setattr(AuditLog, "_open_witness", slowly)
    directory, witness = tmp_path / "audit", tmp_path / "audit.head"
    AuditLog(directory, witness=witness).close()
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    appenders = [
        context.Process(target=_append_until, args=(directory, witness, stop)) for _ in "ab"
    ]
    for appender in appenders:
        appender.start()
    behind, opened, deadline = [], 0, time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            log = AuditLog(directory, create=False, witness=witness)
            opened += 1
            if (found := log.behind()) is not None:
                behind.append(found)
            log.close()
    finally:
        stop.set()
        for appender in appenders:
            appender.join(10)
            if appender.is_alive():
                appender.kill()
    assert opened > 10 and behind == [], behind[:3]


def test_a_newest_record_replaced_while_no_writer_ran_is_reported_and_kept_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Edited, its plain hash recomputed: the next start went on from it and wrote
    over ``.head``, the only evidence, and verify found the log intact."""
    with AuditLog(tmp_path, clock=Clock()) as log:
        for n in range(1, 4):
            log.append(_failed(n))
        written = log.head
    day = tmp_path / "audit-2024-05-06.jsonl"
    lines = day.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[-1])
    del record["hash"]
    record["reply"] = "250 ok"
    lines[-1] = seal(record)[0].encode() + b"\n"
    day.write_bytes(b"".join(lines))
    with AuditLog(tmp_path, clock=Clock()) as log:
        log.append(_failed(4))
    assert (
        "its last record, seq 3, is not the one written (.head names another hash):"
        " it was replaced; the chain goes on from the one written"
    ) in caplog.text
    last = read_all(tmp_path)[-1]
    assert (last["seq"], last["prev"]) == (4, written[1])
    result = verify(tmp_path)
    assert result.problem is not None
    assert (result.problem.file, result.problem.line) == (day.name, 4)
    assert result.problem.message == (
        f"record seq 4 does not chain to the record before it ({day.name} line 3):"
        " one of them was replaced"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_probe_out_of_inodes_is_no_refusal_while_the_log_takes_records(tmp_path: Path) -> None:
    """The probe's file needs an inode the day file's appends do not: with none
    free, every probe failed while the log took records, and deliveries stayed
    held. Out of blocks as well, it is the refusal it was."""
    directory = tmp_path / "audit"
    directory.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=8", "tmpfs", str(directory)],
        check=True,
        timeout=30,
    )
    try:
        with AuditLog(directory, clock=Clock()) as log:
            log.append(_failed(1))
            filler = directory / "filler"
            filler.touch()
            with contextlib.suppress(OSError):
                for n in range(100):  # every inode taken
                    (directory / f"x{n}").touch()
            fd = os.open(filler, os.O_WRONLY)
            with contextlib.suppress(OSError):
                for _ in range(1000):  # every block taken
                    os.write(fd, bytes(4096))
            os.close(fd)
            with pytest.raises(AuditError, match="No space left on device"):
                for n in range(2, 200):  # the day file's last block filled first
                    log.append(_failed(n))
            with pytest.raises(AuditError, match="No space left on device"):
                log.probe()
            assert log.refusing is not None
            filler.write_bytes(b"")  # blocks free again, inodes still not
            log.probe()
            assert log.refusing is None
            log.append(_failed(n))
            assert [r["seq"] for r in read_all(directory)] == list(range(1, n + 1))
    finally:
        subprocess.run(["umount", str(directory)], check=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write as another user")
def test_a_probe_file_left_by_another_user_or_linked_is_replaced(tmp_path: Path) -> None:
    """Left by root (a crash), or a hard link to a day file: the probe writes
    a file of its own, never into what it finds there."""
    log = AuditLog(tmp_path, clock=Clock())
    log.append(_failed(1))
    day = next(tmp_path.glob("audit-*.jsonl"))
    size = day.stat().st_size
    os.link(day, tmp_path / writer.PROBE_FILE)
    log.probe()
    assert day.stat().st_size == size and day.stat().st_nlink == 1
    (tmp_path / writer.PROBE_FILE).write_bytes(b"")
    os.chown(tmp_path / writer.PROBE_FILE, 0, 0)
    os.chmod(tmp_path / writer.PROBE_FILE, 0o600)
    log.probe()
    assert log.refusing is None and not (tmp_path / writer.PROBE_FILE).exists()


def test_a_refused_write_is_said_until_a_write_or_a_probe_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the engine pauses deliveries on (``refusing``): a full disk shows only
    on a write, so a probe writes a block, to a file of its own, removed after."""
    log = AuditLog(tmp_path, clock=Clock())
    log.append(_failed(1))
    assert log.refusing is None

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(AuditError, match="No space left on device"):
        log.append(_failed(2))
    log.sync()  # nothing to fsync: no word on whether the log takes records
    with pytest.raises(AuditError, match="No space left on device"):
        log.probe()
    assert log.refusing == f"audit log {tmp_path}: No space left on device"
    monkeypatch.undo()
    log.probe()
    assert log.refusing is None
    assert not (tmp_path / writer.PROBE_FILE).exists()
    assert [r["seq"] for r in read_all(tmp_path)] == [1]
    with pytest.raises(AuditError):
        monkeypatch.setattr(os, "write", full)
        log.append(_failed(2))
    monkeypatch.undo()
    log.append(_failed(2))
    assert log.refusing is None
