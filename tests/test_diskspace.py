"""Mail refused with 452 4.3.1 while the state directory's disk is nearly full,
so that the spool never takes the room the audit log needs to let queued mail
leave (docs/queue.md: a full disk)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from relay.ingress import diskspace
from relay.ingress.diskspace import INSUFFICIENT_STORAGE, DiskGuard, reserve_for
from relay.spool import Spool
from tests.ingress_harness import Relay
from tests.minimal_policy import listener
from tests.minimal_policy import policy as make_policy
from tests.relayproc import RelayProcess, wait_for
from tests.sink import SinkServer, free_port
from tests.spoolkit import make_entry
from tests.test_metrics import _get
from tests.test_queue_e2e import configure

MESSAGE = (
    b"From: Kari <kari@acme.example>\r\nTo: customer@example.org\r\nSubject: Invoice 1\r\n\r\nx\r\n"
)
STATE = (Path("/state/queue"), Path("/state/audit"))
MiB = 1 << 20


class FakeDisk:
    """``os.statvfs`` of file systems whose free space a test sets, counting calls."""

    def __init__(self, free: int, inodes: int = 10_000, files: int = 100_000) -> None:
        self.free = {str(d): free for d in STATE}
        self.inodes = inodes
        self.files = files
        self.calls = 0

    def __call__(self, path: str) -> os.statvfs_result:
        self.calls += 1
        if path not in self.free:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        blocks = self.free[path] // 4096
        fields = (4096, 4096, blocks * 2, blocks, blocks, self.files, self.inodes, self.inodes)
        return os.statvfs_result((*fields, 0, 255))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(disk: FakeDisk, clock: Clock | None = None) -> DiskGuard:
    return DiskGuard(statvfs=disk, clock=clock or Clock())


def test_the_reserve_is_one_and_a_half_messages_and_a_mebibyte_at_least() -> None:
    assert reserve_for(26_214_400) == 39_321_600  # the default limit: 37.5 MiB
    assert reserve_for(10_000) == MiB


def test_mail_is_refused_below_the_reserve_and_taken_above_it() -> None:
    disk = FakeDisk(free=40 * MiB)
    clock = Clock()
    checker = guard(disk, clock)
    assert checker.refusal(STATE, reserve=30 * MiB) is None
    assert checker.refusal(STATE, reserve=30 * MiB, size=10 * MiB) is None
    assert checker.refusal(STATE, reserve=30 * MiB, size=11 * MiB) == INSUFFICIENT_STORAGE
    disk.free[str(STATE[1])] = 20 * MiB  # the audit log on a fuller disk of its own
    clock.now += diskspace.FRESH
    assert checker.refusal(STATE, reserve=30 * MiB) == INSUFFICIENT_STORAGE


def test_space_held_for_reuse_is_let_go_before_mail_is_refused(tmp_path: Path) -> None:
    """A delivered message's file is kept to be overwritten by the next one; on a
    nearly full disk that space was lost to mail while nothing came to reuse
    it (up to 64 MiB a worker). Here the disk's free space is what the spool's
    files leave of 3 MiB, and the reserve 1 MiB."""
    spool = Spool(tmp_path / "queue")
    entries = [make_entry(size=700 * 1024) for _ in range(3)]
    for entry in entries:
        spool.put(entry, b"x" * (700 * 1024))
    spool.remove_many([entry.queue_id for entry in entries], recycle=True)
    held = [p for p in (tmp_path / "queue").rglob("*") if p.is_file()]
    assert len(held) == 3

    def statvfs(path: str) -> os.statvfs_result:
        used = sum(p.stat().st_size for p in (tmp_path / "queue").rglob("*") if p.is_file())
        blocks = (3 * MiB - used) // 4096
        return os.statvfs_result((4096, 4096, 1024, blocks, blocks, 0, 0, 0, 0, 255))

    clock = Clock()
    tried: list[int] = []

    def reclaim() -> int:
        tried.append(spool.trim_recycled(keep=0.0, orphans=False))
        return tried[-1]

    checker = DiskGuard(statvfs=statvfs, clock=clock, reclaim=reclaim)
    queue = (tmp_path / "queue",)
    assert checker.refusal(queue, reserve=MiB, size=100_000) is None
    assert tried == [3]
    assert checker.refusal(queue, reserve=MiB, size=3 * MiB) == INSUFFICIENT_STORAGE
    assert tried == [3]  # not again within the second
    clock.now += diskspace.FRESH
    assert checker.refusal(queue, reserve=MiB, size=3 * MiB) == INSUFFICIENT_STORAGE
    assert tried == [3, 0]


def test_too_few_inodes_refuse_mail_where_the_file_system_counts_them() -> None:
    assert guard(FakeDisk(free=40 * MiB, inodes=99)).refusal(STATE, MiB) == INSUFFICIENT_STORAGE
    kept = diskspace.INODE_RESERVE  # as many as are kept free: not yet short of them
    assert guard(FakeDisk(free=40 * MiB, inodes=kept)).refusal(STATE, MiB) is None
    no_count = FakeDisk(free=40 * MiB, inodes=0, files=0)  # btrfs, for one
    assert guard(no_count).refusal(STATE, MiB) is None


def test_a_directory_that_cannot_be_read_refuses_nothing() -> None:
    assert guard(FakeDisk(free=0)).refusal((Path("/elsewhere"),), MiB) is None


def test_free_space_is_read_once_a_second_while_there_is_plenty() -> None:
    disk = FakeDisk(free=10 * MiB)
    clock = Clock()
    checker = guard(disk, clock)
    for _ in range(100):
        assert checker.refusal(STATE, reserve=MiB) is None
    assert disk.calls == 2  # one for each directory
    checker.charge(STATE, 7 * MiB)  # a burst of messages within that second
    assert checker.refusal(STATE, reserve=MiB) is None
    assert disk.calls == 2
    clock.now += diskspace.FRESH
    assert checker.refusal(STATE, reserve=MiB) is None
    assert disk.calls == 4


def test_near_the_reserve_free_space_is_read_for_every_message() -> None:
    """Another worker's messages take space this one's reading does not know of."""
    disk = FakeDisk(free=10 * MiB)
    checker = guard(disk)  # the clock stands still: nothing is a second old
    assert checker.refusal(STATE, reserve=MiB) is None
    checker.charge(STATE, 8 * MiB + 1)  # this worker's own burst: under twice the reserve
    disk.free = dict.fromkeys(disk.free, MiB - 4096)  # and the other workers' too
    assert checker.refusal(STATE, reserve=MiB) == INSUFFICIENT_STORAGE
    assert disk.calls == 3  # the queue's read again, where the refusal stopped
    disk.free = dict.fromkeys(disk.free, 3 * MiB // 2)
    for _ in range(10):
        assert checker.refusal(STATE, reserve=MiB) is None
    assert disk.calls == 3 + 20


def test_the_refusal_is_logged_once_a_minute_naming_the_directory_and_its_free_space(
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = FakeDisk(free=512 * 1024)
    clock = Clock()
    checker = guard(disk, clock)
    with caplog.at_level(logging.WARNING, logger="relay"):
        for _ in range(59):
            assert checker.refusal(STATE, reserve=MiB) == INSUFFICIENT_STORAGE
            clock.now += 1.0
        assert len(caplog.messages) == 1
        clock.now += 1.0
        assert checker.refusal(STATE, reserve=MiB) == INSUFFICIENT_STORAGE
        disk.free = dict.fromkeys(disk.free, 2 * MiB)
        clock.now += 1.0
        assert checker.refusal(STATE, reserve=MiB) is None
        assert checker.refusal(STATE, reserve=MiB) is None
        disk.free = dict.fromkeys(disk.free, 0)  # short again within the minute: said again,
        clock.now += 1.0  # or the last line would say mail is accepted while it is not
        assert checker.refusal(STATE, reserve=MiB) == INSUFFICIENT_STORAGE
        disk.free = dict.fromkeys(disk.free, 2 * MiB)
        clock.now += 1.0
        assert checker.refusal(STATE, reserve=MiB) is None
        clock.now += diskspace.LOG_EVERY
        assert checker.refusal(STATE, reserve=MiB, size=MiB + 1) == INSUFFICIENT_STORAGE
        assert checker.refusal(STATE, reserve=MiB) is None  # was never short: no line
    first, second, back, third, back_again, too_big = caplog.messages
    assert first == second
    assert "refusing mail (452 4.3.1) for want of space: /state/queue has 0 bytes" in third
    assert back_again == back
    assert "refusing mail (452 4.3.1) for want of space: /state/queue has 524288 bytes" in first
    assert f"{MiB} bytes and 100 inodes are kept free" in first
    assert back == f"free space is back above the {MiB} bytes kept free: accepting mail"
    assert f"kept free after a message of {MiB + 1} bytes" in too_big


def test_the_message_itself_is_checked_at_the_end_of_data_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MAIL without SIZE passes with room for 50 KB beyond the reserve; a
    message of 60 KB is refused when it has come, one of 40 KB taken; and when
    the room shrinks to 5 KB (the other workers' mail) the next 40 KB are
    refused at once, within the second a reading is kept for further away.
    Each refusal is logged and put on record as the policy's are: a grep for
    the ERP's login found nothing of them."""
    caplog.set_level(logging.INFO, logger="relay")
    nowhere = make_policy(()).queue.directory.parent
    disk = FakeDisk(free=MiB + 50_000)
    disk.free = {str(nowhere / "queue"): MiB + 50_000, str(nowhere / "audit"): 10 * MiB}
    line = b"x" * 78 + b"\r\n"
    guard = DiskGuard(statvfs=disk, clock=Clock())
    with Relay([listener()], disk=guard) as relay, smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo()
        replies = []
        for size in (60_000, 40_000, 40_000):
            if len(replies) == 2:
                disk.free[str(nowhere / "queue")] = MiB + 5_000
            assert client.mail("jan@acme.example")[0] == 250
            client.rcpt("one@example.org")
            replies.append(client.data(b"Subject: x\r\n\r\n" + line * (size // 80))[0])
    assert replies == [452, 250, 452]
    assert len(relay.process.calls) == 1
    assert [reply for _, reply in relay.refused] == [INSUFFICIENT_STORAGE] * 2
    refused = [m for m in caplog.messages if m.startswith("refused client=")]
    assert len(refused) == 2
    assert all(m.endswith(f"to=<one@example.org>: {INSUFFICIENT_STORAGE.line}") for m in refused)


def _policy(policy_file: Path, port: int, sink_port: int, max_size: int, workers: int = 1) -> Path:
    policy = configure(policy_file, port, sink_port, f"workers: {workers}\n")
    limited = f"port: {port}\n    max_message_size: {max_size}\n"
    policy.write_text(policy.read_text().replace(f"port: {port}\n", limited, 1))
    return policy


def _spooled(state: Path) -> list[str]:
    """The queue's entries, without the files kept for reuse or being written."""
    return sorted(p.name for p in (state / "queue" / "msg").iterdir() if p.name[0] != ".")


def test_a_relay_whose_disk_has_less_free_than_its_reserve_answers_452_and_keeps_nothing(
    policy_file: Path, tmp_path: Path
) -> None:
    """The listener takes messages of up to 1 TiB: 1.5 TiB must stay free, more
    than this disk has, so every MAIL is refused before the message is sent."""
    with SinkServer() as sink:
        port = free_port()
        policy = _policy(policy_file, port, sink.port, 2**40)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.login("erp-acme", "demo-password")
                code, reply = client.mail("jan@acme.example")
                assert (code, reply) == (452, b"4.3.1 Insufficient system storage, try again later")
                code, reply = client.rcpt("one@example.org")
                assert code == 503  # no transaction began
            wait_for(lambda: "for want of space" in relay.log(), 10)
            log = relay.log()
            state = tmp_path / "state"
            assert f"refusing mail (452 4.3.1) for want of space: {state / 'queue'} has " in log
            assert _spooled(state) == []
            assert "received" not in _audit_events(state)
        assert sink.sink.messages == []


def test_a_relay_that_refuses_every_message_for_want_of_space_is_not_ready(
    policy_file: Path, tmp_path: Path
) -> None:
    """Every MAIL got 452 while /readyz said 200, the queue "writable": a load
    balancer went on sending it mail, and no alert asked why."""
    with SinkServer() as sink:
        port, metrics = free_port(), free_port()
        policy = _policy(policy_file, port, sink.port, 2**40)
        policy.write_text(
            policy.read_text() + f"metrics: {{address: 127.0.0.1, port: {metrics}}}\n"
        )
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            code, body, _ = _get(metrics, "/readyz")
            assert code == 503, body
            checks = json.loads(body)["checks"]
            queue = tmp_path / "state" / "queue"
            assert checks["queue"].startswith(f"{queue} has "), checks
            assert checks["queue"].endswith(
                f" free, under the {3 * 2**39} bytes and 100 inodes kept free:"
                " mail is refused (452 4.3.1)"
            )
            assert checks["workers"] == "1 of 1 running"
        # a second listener with small messages still takes mail: ready, as it is
        small = (
            f"  - {{name: small, address: 127.0.0.1, port: {free_port()},"
            " max_message_size: 1000}\n"
        )
        policy.write_text(policy.read_text().replace("identify:\n", small + "identify:\n", 1))
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            code, body, _ = _get(metrics, "/readyz")
            assert code == 200, body


def test_a_size_announced_with_mail_from_counts_against_the_free_space(
    policy_file: Path, tmp_path: Path
) -> None:
    """Half the free space as the limit: its reserve fits, but a message of the
    limit's size would leave less than the reserve free; a small one is taken."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    limit = free // 2
    with SinkServer() as sink:
        port = free_port()
        policy = _policy(policy_file, port, sink.port, limit)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.ehlo()
                client.login("erp-acme", "demo-password")
                code, reply = client.mail("jan@acme.example", [f"SIZE={limit}"])
                assert (code, reply) == (452, b"4.3.1 Insufficient system storage, try again later")
                code, _ = client.mail("jan@acme.example", [f"SIZE={len(MESSAGE)}"])
                assert code == 250
                client.rcpt("customer@example.org")
                code, _ = client.data(MESSAGE)
                assert code == 250
            sink.sink.wait(1, 15)
            assert _audit_events(tmp_path / "state").count("received") == 1


def _audit_events(state: Path) -> list[str]:
    files = [p for p in (state / "audit").iterdir() if p.is_file() and p.suffix != ".gz"]
    lines = [line for p in files for line in p.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line)["event"] for line in lines]


LARGE = (
    b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: Invoice\r\n\r\n"
    + (b"x" * 76 + b"\r\n") * 1300
)  # 100 KB


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_full_disk_refuses_mail_and_the_queue_drains_when_the_upstream_returns(
    policy_file: Path, tmp_path: Path
) -> None:
    """A 2 MB state directory, two workers, the upstream down, 22 messages of
    100 KB: the spool took the last blocks, the audit log then had no room for
    the outcomes of the delivered ones, which stayed queued for good, were sent
    again at a restart, and new mail got 451 until space was freed by hand.
    Now the room is kept: the rest get 452, and once the upstream is back the
    queue drains, each message arrives once, and mail is taken again."""
    state = tmp_path / "state"
    state.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)]
    subprocess.run(mount, check=True, timeout=30)
    try:
        sink_port = free_port()
        port = free_port()
        policy = _policy(policy_file, port, sink_port, 200_000, workers=2)
        with contextlib.ExitStack() as stack:
            relay = stack.enter_context(RelayProcess(policy, port, tmp_path / "first.log"))
            replies = [_send(port, LARGE) for _ in range(22)]
            accepted = [reply for code, reply in replies if code == 250]
            assert 0 < len(accepted) < 22
            refused = {(code, reply) for code, reply in replies if code != 250}
            assert refused == {(452, b"4.3.1 Insufficient system storage, try again later")}
            sink = stack.enter_context(SinkServer(port=sink_port))
            sink.sink.wait(len(accepted), 30)
            wait_for(lambda: _spooled(state) == [], 30)
            # the delivered messages' files, kept for reuse, are let go for new mail
            assert _send(port, LARGE)[0] == 250
            sink.sink.wait(len(accepted) + 1, 30)
            assert relay.stop() == 0
            log = relay.log()
            with RelayProcess(policy, port, tmp_path / "second.log") as again:
                assert _send(port, LARGE)[0] == 250
                sink.sink.wait(len(accepted) + 2, 30)
                time.sleep(1.0)  # a message sent again would arrive meanwhile
            log += again.log()
            assert len(sink.sink.messages) == len(accepted) + 2
        assert "WRITE FAILED" not in log
        assert "No space left on device" not in log
    finally:
        subprocess.run(["umount", str(state)], check=True, timeout=30)


def _send(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.login("erp-acme", "demo-password")
        code, reply = client.mail("jan@acme.example")
        if code != 250:
            return code, reply
        client.rcpt("one@example.org")
        return client.data(data)


def test_messages_taken_within_a_second_are_taken_off_the_reading_kept() -> None:
    """While there is plenty of room a worker reads the free space once a second:
    what it takes in that second counts against the reading, or a burst of
    messages filled the disk past the reserve before the next one."""
    nowhere = make_policy(()).queue.directory.parent
    disk = FakeDisk(free=0)
    disk.free = dict.fromkeys((str(nowhere / "queue"), str(nowhere / "audit")), 2 * MiB + 100_000)
    body = b"Subject: x\r\n\r\n" + (b"x" * 78 + b"\r\n") * 1100  # 88 KB, within the limit
    guard = DiskGuard(statvfs=disk, clock=Clock())  # the clock stands still: all in one second
    with Relay([listener()], disk=guard) as relay, smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo()
        replies = []
        while len(replies) < 30 and 452 not in replies:
            replies.append(client.mail("jan@acme.example")[0])
            if replies[-1] == 250:
                client.rcpt("one@example.org")
                replies[-1] = client.data(body)[0]
            if replies[-1] == 250:  # written to the spool and the audit log
                disk.free = {path: free - len(body) for path, free in disk.free.items()}
    assert replies[-1] == 452, replies
    assert min(disk.free.values()) >= reserve_for(listener().max_message_size)
