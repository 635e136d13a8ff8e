"""No delivery starts while the audit log refuses records: a restart with its
disk full sent the delivered mail left queued again, once more at every
restart, and the log named none of those sends (docs/queue.md)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from relay.audit import reader
from tests.relayproc import RelayProcess, wait_for
from tests.sink import SinkServer, free_port
from tests.test_diskspace import _policy
from tests.test_queue_e2e import send

PAUSED = "no delivery starts until the audit log takes records again"
RESUMED = "the audit log takes records again: deliveries go on"


def _message(n: int) -> bytes:
    head = "From: jan@acme.example\r\nTo: one@example.org\r\n"
    return f"{head}Subject: Invoice {n}\r\n\r\nx\r\n".encode()


def _fill(directory: Path) -> Path:
    """Every block of ``directory``'s file system taken, as by dd."""
    filler = directory / "filler"
    with filler.open("wb") as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(bytes(1 << 16))
                out.flush()
        with contextlib.suppress(OSError):
            while True:  # the last partial chunk
                os.write(out.fileno(), b"x")
    probe = directory / "probe"
    with pytest.raises(OSError) as refused, probe.open("wb") as out:
        out.write(b"x")
        out.flush()
    assert refused.value.errno == errno.ENOSPC
    probe.unlink(missing_ok=True)
    return filler


def _delivered(audit: Path) -> list[tuple[str, str]]:
    """(queue ID, recipient) of every ``delivered`` record, sorted."""
    records = reader.records(audit)
    return sorted((r["queue_id"], r["recipient"]) for r in records if r["event"] == "delivered")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_restarts_with_the_audit_disk_full_send_nothing_until_it_takes_records(
    policy_file: Path, tmp_path: Path
) -> None:
    """The audit log on a 2 MB tmpfs, filled while four messages wait for their
    upstream: each start sent the four, the log refusing their outcomes, and
    each later start sent them again. Now neither worker starts a delivery,
    after a stop or a kill -9, until the disk has room; then, with no restart,
    each message goes once, and is recorded once."""
    state = tmp_path / "state"
    audit = state / "audit"
    audit.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(audit)]
    subprocess.run(mount, check=True, timeout=30)
    try:
        port, sink_port = free_port(), free_port()
        policy = _policy(policy_file, port, sink_port, 200_000, workers=2)  # 1 MiB kept free
        with RelayProcess(policy, port, tmp_path / "first.log") as relay:
            ids = [send(port, _message(n)) for n in range(4)]
            assert relay.stop() == 0
        filler = _fill(audit)
        with SinkServer(port=sink_port) as sink:
            logs = []
            for n, how in enumerate(("crash", "stop")):
                with RelayProcess(policy, port, tmp_path / f"full{n}.log") as relay:
                    time.sleep(2.5)  # the four are due: sent, they would arrive meanwhile
                    relay.crash() if how == "crash" else relay.stop()
                    logs.append(relay.log())
                assert sink.sink.messages == []
            assert not any("status=sent" in log for log in logs), logs
            assert [log.count(PAUSED) for log in logs] == [2, 2], logs  # once by each worker
            with RelayProcess(policy, port, tmp_path / "room.log") as relay:
                wait_for(lambda: relay.log().count(PAUSED) == 2, 10)
                filler.unlink()
                sink.sink.wait(4, 20)
                wait_for(lambda: {q for q, _ in _delivered(audit)} == set(ids), 10)
                time.sleep(1.0)  # a message sent twice would arrive meanwhile
                assert relay.stop() == 0
                log = relay.log()
            assert sorted(m.data.split(b"Subject: ")[1][:9] for m in sink.sink.messages) == [
                f"Invoice {n}".encode() for n in range(4)
            ]
        delivered = _delivered(audit)
        assert len(delivered) == len(set(delivered)) == 8, delivered  # with the sender's copy
        assert log.count(PAUSED) == 2 and log.count(RESUMED) == 2, log
        assert not list((state / "queue" / "msg").glob("[!.]*"))
    finally:
        subprocess.run(["umount", str(audit)], check=True, timeout=30)
