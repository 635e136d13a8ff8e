"""A relay that starts on a large queue: what its log says while it reads the
spool, and a stop asked for before it serves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relay import statelock
from relay.policy.load import load
from relay.spool import Spool
from relay.startwatch import LARGE_QUEUE, PROGRESS
from tests.relayproc import RelayProcess, terminate, wait_for
from tests.sink import SinkServer, free_port
from tests.slowdisk import serving, slow_disk
from tests.test_queue_e2e import relay_cli

QUEUED = LARGE_QUEUE  # the smallest queue whose reading is said
CLIENTS = 8


def configure(policy_file: Path, port: int, upstream: int, workers: int) -> Path:
    text = policy_file.read_text().replace("port: 2525", f"port: {port}")
    smtp = (
        f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {upstream}\n"
        "    tls: none\n    timeout: 5\n"
    )
    text = text.replace("  default:\n    type: directory\n    path: outbox\n", smtp)
    text += "queue: {first_retry: 0.5, max_retry: 1, lifetime: 3600}\n"
    policy_file.write_text(text + f"workers: {workers}\n")
    return policy_file


def _send_share(port: int, share: range) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in share:
            body = f"From: jan@acme.example\r\nSubject: backlog {n}\r\n\r\nbody {n}\r\n"
            client.sendmail("jan@acme.example", ["one@example.org"], body)


def _queue_up(policy: Path, port: int, log: Path) -> None:
    """``QUEUED`` messages taken in while their upstream does not answer; the relay
    stopped, they wait in its spool, each on record in the audit log."""
    with RelayProcess(policy, port, log), ThreadPoolExecutor(CLIENTS) as pool:
        shares = [range(i, QUEUED, CLIENTS) for i in range(CLIENTS)]
        list(pool.map(lambda share: _send_share(port, share), shares))


@contextlib.contextmanager
def _held_start(policy: Path, tmp_path: Path, log: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``relay serve`` whose start hangs at its first write to the audit log, after
    it began reading the spool, until the file yielded says ``0``; killed if it
    is still there at the end."""
    state = load(policy).queue.directory.parent
    env, delay = slow_disk(tmp_path, -1, only=str(state / "audit"))
    proc = serving(policy, env, log)
    try:
        wait_for(lambda: f"reading {QUEUED} entries before serving" in log.read_text())
        yield proc, delay
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _each_once(sink: SinkServer) -> None:
    sink.sink.wait(QUEUED, timeout=120)
    subjects = [m.data.split(b"Subject: backlog ")[1].split(b"\r\n")[0] for m in sink.sink.messages]
    assert sorted(subjects) == sorted(str(n).encode() for n in range(QUEUED))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_large_spool_is_said_as_it_is_read_and_its_records_before_delivery(
    policy_file: Path, tmp_path: Path, workers: int
) -> None:
    """Started on a large queue, the log was silent while the spool was read
    (7 s for 50,000 messages on a cold disk) and then again while each worker
    read every record before its first delivery (9 s more): a hang to whoever
    watched it. Now each is said as it begins, once a start (not once a worker),
    a long read every few seconds, and the first scan as it ends."""
    port, upstream = free_port(), free_port()
    policy = configure(policy_file, port, upstream, workers)
    state = load(policy).queue.directory.parent
    _queue_up(policy, port, tmp_path / "first.log")
    first = (tmp_path / "first.log").read_text()
    assert "entries before serving" not in first and "queue: reading" not in first  # a small one

    log = tmp_path / "held.log"
    with SinkServer() as sink:
        policy.write_text(policy.read_text().replace(f"port: {upstream}", f"port: {sink.port}"))
        with _held_start(policy, tmp_path, log) as (proc, delay):
            wait_for(lambda: "still reading, for" in log.read_text(), PROGRESS + 10)
            delay.write_text("0")
            _each_once(sink)
            wait_for(lambda: "queue: records read in " in log.read_text())
            assert terminate(proc, 20) == 0
    said = log.read_text()
    spool = state / "queue"
    began = f"spool {spool}: reading {QUEUED} entries before serving; clients are greeted once"
    assert said.count(f"{began} it is read") == 1
    assert said.count(f"spool {spool}: still reading, for 5 seconds so far") == 1
    reading = f"queue: reading the records of {QUEUED} messages; delivering those due as"
    assert said.count(reading) == 1
    assert said.count("queue: records read in ") == 1
    assert said.index(reading) < said.index("queue: records read in ")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_while_the_spool_is_read_is_said_and_honoured_once_it_is_read(
    policy_file: Path, tmp_path: Path, workers: int
) -> None:
    """A SIGTERM between binding the listeners and serving (``systemctl stop``
    during a slow start) killed the relay by its default action: exit -15, no
    line in the log, the pid file naming a dead process. Now it is said at
    once, while the start still waits on the disk, and once the spool is read
    the relay stops as from serving, exit 0, having started no worker; the
    queue it read is whole, and delivered at the next start."""
    port, upstream = free_port(), free_port()
    policy = configure(policy_file, port, upstream, workers)
    state = load(policy).queue.directory.parent
    _queue_up(policy, port, tmp_path / "first.log")
    queued = Spool(state / "queue").ids()
    assert len(queued) == QUEUED

    log = tmp_path / "stopped.log"
    with _held_start(policy, tmp_path, log) as (proc, delay):
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM while starting" in log.read_text() or proc.poll() is not None)
        time.sleep(0.5)
        assert proc.poll() is None, (proc.returncode, log.read_text())  # the disk holds it up
        status = relay_cli(policy, "status").stdout.splitlines()[0]
        assert status.startswith(f"relay: stopping, PID {proc.pid} "), status  # not "starting"
        delay.write_text("0")
        assert proc.wait(30) == 0, log.read_text()
    said = log.read_text()
    assert (
        "INFO SIGTERM while starting: stopping before serving; a spool being read is read to"
        " the end first (its recovery is not cut off half-way)"
    ) in said
    assert f"spool {state / 'queue'}: {QUEUED} messages queued" in said  # read to its end
    assert "INFO stopping: no new connections; no worker started, no mail taken" in said
    assert said.rstrip().endswith("INFO stopped"), said
    assert "serving in one process" not in said and "worker 0 started" not in said
    assert "Traceback" not in said
    assert statelock.holder(state) is None
    assert Spool(state / "queue").ids() == queued
    with SinkServer() as sink:
        policy.write_text(policy.read_text().replace(f"port: {upstream}", f"port: {sink.port}"))
        with RelayProcess(policy, port, tmp_path / "last.log"):
            _each_once(sink)


WAITING = 6  # clients that connect while the stop waits for the load: one a worker got in


def _taken(port: int) -> bool:
    """Whether a message sent now is taken (250)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("jan@acme.example", ["one@example.org"], "Subject: x\r\n\r\nx\r\n")
    except (smtplib.SMTPException, OSError):
        return False
    return True


@pytest.mark.parametrize(("workers", "reload_too"), [(1, False), (2, False), (1, True), (2, True)])
def test_a_stop_while_the_suppression_list_loads_is_said_and_is_stopping_at_once(
    policy_file: Path, tmp_path: Path, workers: int, reload_too: bool
) -> None:
    """After the spool is read, a large suppression list still takes seconds to
    load (in the one process, or in each worker). A SIGTERM then was held
    without a word until the relay served (one process), and ``/readyz`` and
    ``relay status`` said ``starting`` all that time; with workers, the first
    one loaded took mail until the last was. Now the stop is said at once,
    ``/readyz`` says ``stopping``, no ``serving`` comes before it and no mail
    is taken. A SIGHUP sent just before it is not a reload: the supervisor
    took it first, reloaded, and its workers warned of a policy not handed over."""
    from bench.relayside import write_suppressions
    from tests.test_start_answers import _get

    port, metrics = free_port(), free_port()
    policy = configure(policy_file, port, free_port(), workers)
    with policy.open("a") as out:
        out.write(
            "suppression: {hard_bounce: [5.1.1]}\n"
            f"metrics: {{address: 127.0.0.1, port: {metrics}}}\n"
        )
    state = load(policy).queue.directory.parent
    write_suppressions(state, 200_000)  # about 2 s to load, more on a busy machine
    log = tmp_path / "relay.log"
    proc = serving(policy, dict(os.environ), log)
    try:
        begun = "worker 1 started" if workers > 1 else "loaded from"  # the spool read
        wait_for(lambda: begun in log.read_text() or proc.poll() is not None)
        if reload_too:
            proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        said = "SIGTERM while the workers start" if workers > 1 else "SIGTERM while starting"
        wait_for(lambda: said in log.read_text() or proc.poll() is not None)
        code, body, _ = _get(metrics, "/readyz")
        assert (code, json.loads(body)["checks"]["relay"]) == (503, "stopping"), body
        early = log.read_text()  # the load was still going on:
        assert "serving in one process" not in early and "workers serving" not in early
        with ThreadPoolExecutor(WAITING) as pool:  # in the listeners' backlog meanwhile
            sent = list(pool.map(lambda _: _taken(port), range(WAITING)))
        assert sent == [False] * WAITING  # each reset, or 421
        assert proc.wait(60) == 0, log.read_text()
    finally:
        terminate(proc, 15)
    text = log.read_text()
    assert text.index(said) < text.index("INFO stopping: no new connections")
    assert " serving" not in text.replace("before serving", "") and "Traceback" not in text
    assert "metrics on" not in text  # said as the relay serves, which it never did
    assert Spool(state / "queue").ids() == [] and "status=" not in text  # none taken or sent
    assert ("SIGHUP while stopping: not reloaded" in text) == reload_too
    assert "reloading" not in text and "WARNING" not in text.split("\n", 1)[1], text
    assert text.rstrip().endswith("INFO stopped"), text
