"""``workers: N``: a supervisor and its worker processes, as real processes on loopback.

The supervisor's and every worker's log lines carry their own PID
(``relay[PID]``), so the log shows which process accepted a message, which
worker was restarted and which one took a new policy into use. Messages go
to the test policy's directory upstream (``outbox/*.eml`` next to the
policy), where the From display name shows the tenant name a message met.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import parseaddr
from pathlib import Path

import pytest

from relay import message, supervisor
from relay import settle as settle_module
from relay.audit import AuditLog, events
from relay.policy.load import load
from relay.spool import Spool
from tests import policybuilds
from tests import test_queue_e2e as queue_e2e
from tests.certs import der, make_certs, served_certificate
from tests.relayproc import terminate
from tests.sink import SinkServer, free_port
from tests.spoolkit import make_entry

ROOT = Path(__file__).parent.parent
MESSAGE = b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: x\r\n\r\nx\r\n"
STARTED = re.compile(r"relay\[(\d+)\] INFO worker (\d+) started \(pid (\d+)\)$", re.M)
QUEUED = re.compile(r"relay\[(\d+)\] INFO (\w+): client=.* queued$", re.M)
WORKER_POLICY = re.compile(r"relay\[(\d+)\] INFO worker (\d+): policy (\w+) in use$", re.M)
RELOADED = re.compile(r"relay\[(\d+)\] INFO policy reloaded: (\w+) \(was (\w+)\)$", re.M)
LOADED = re.compile(r"INFO policy (\w+) loaded from ")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that may never reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def is_relay(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"\0relay\0serve\0" in cmdline


class Relay:
    """``relay serve`` started by the test; every PID it logs is stopped by the test too."""

    def __init__(
        self, policy: Path, port: int, log: Path, prelude: str = "", source: Path = ROOT
    ) -> None:
        """``prelude``: Python run in the relay's process before it starts; ``source``:
        where its ``relay`` package is read from."""
        self.policy = policy
        self.port = port
        self.log_path = log
        self.outbox = policy.parent / "outbox"
        start = ["-m", "relay"]
        if prelude:
            start = ["-c", f"{prelude}\nimport sys\nfrom relay.cli import main\nsys.exit(main())"]
        with log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, *start, "serve", "-c", str(policy)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=source,
            )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"not within {timeout}s: {what}; log:\n{self.log()}")

    def wait_serving(self) -> None:
        self.wait_for(lambda: " serving" in self.log() or self.proc.poll() is not None, "serving")
        assert self.proc.poll() is None, f"relay exited {self.proc.returncode}:\n{self.log()}"

    def started(self) -> list[tuple[int, int]]:
        """(worker index, pid) of every ``worker N started`` line, in order."""
        found = []
        for logger, index, pid in STARTED.findall(self.log()):
            assert int(logger) == self.pid, "only the supervisor starts workers"
            found.append((int(index), int(pid)))
        return found

    def queued_by(self) -> dict[str, int]:
        """Queue ID -> the PID that logged it queued."""
        return {qid: int(pid) for pid, qid in QUEUED.findall(self.log())}

    def pids(self) -> set[int]:
        return {self.pid} | {pid for _, pid in self.started()}

    def delivered(self) -> dict[str, Path]:
        """Queue ID (from the Message-ID the relay set) -> the file the upstream wrote."""
        found = {}
        for path in self.outbox.glob("*.eml"):
            mid = message.read(path.read_bytes()).get("Message-ID") or ""
            found[mid.strip("<>").split("@")[0]] = path
        return found

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM to the supervisor; whatever relay process is left is killed by PID."""
        try:
            return terminate(self.proc, timeout)
        finally:
            self.kill_leftovers()

    def kill_leftovers(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for _, pid in self.started():
            if alive(pid) and is_relay(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def port() -> int:
    return free_port()


def configure(policy_file: Path, port: int, workers: str = "2") -> Path:
    text = policy_file.read_text()
    assert "port: 2525" in text and "\nworkers:" not in text
    policy_file.write_text(text.replace("port: 2525", f"port: {port}") + f"workers: {workers}\n")
    return policy_file


@contextlib.contextmanager
def serving(policy: Path, port: int, log: Path) -> Iterator[Relay]:
    """``relay serve`` once every worker serves, stopped (and its leftovers) at the end."""
    running = Relay(policy, port, log)
    try:
        running.wait_serving()
        yield running
    finally:
        running.stop()


@pytest.fixture
def relay(policy_file: Path, port: int, tmp_path: Path) -> Iterator[Relay]:
    with serving(configure(policy_file, port), port, tmp_path / "relay.log") as running:
        yield running


def send(port: int) -> str:
    """One message on a connection of its own; its queue ID."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo()
        client.mail("jan@acme.example")
        client.rcpt("one@example.org")
        code, reply = client.data(MESSAGE)
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as "), (code, reply)
    return reply.decode().rsplit(" ", 1)[1]


def send_many(port: int, count: int, clients: int = 4) -> list[str]:
    """``count`` messages from ``clients`` concurrent senders, each on a fresh connection."""
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda _: send(port), range(count)))


def send_until_every_worker_took_one(relay: Relay, workers: set[int], limit: int = 60) -> list[str]:
    """Batches of messages until each of ``workers`` has queued one of them (bounded)."""
    sent: list[str] = []
    while len(sent) < limit:
        sent += send_many(relay.port, 6)
        ids = set(sent)
        relay.wait_for(lambda ids=ids: ids <= relay.queued_by().keys(), "queued lines")
        if workers <= {relay.queued_by()[qid] for qid in sent}:
            return sent
    took = {relay.queued_by()[qid] for qid in sent}
    raise AssertionError(f"{len(sent)} messages, all taken by {took}, not by all of {workers}")


def audit_records(relay: Relay) -> list[dict]:
    done = relay_cli("audit", "search", "-c", str(relay.policy), "--format", "json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def from_name(path: Path) -> str:
    return parseaddr(message.read(path.read_bytes()).get("From") or "")[0]


def test_two_workers_share_the_load_the_spool_and_one_audit_chain(relay: Relay) -> None:
    assert "2 workers serving" in relay.log()
    started = relay.started()
    assert sorted(index for index, _ in started) == [0, 1], relay.log()
    workers = {pid for _, pid in started}
    assert len(workers) == 2 and relay.pid not in workers
    assert all(alive(pid) and is_relay(pid) for pid in workers)

    ids = send_many(relay.port, 20)
    assert len(set(ids)) == 20
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "all 20 upstream")
    assert len(list(relay.outbox.glob("*.eml"))) == 20  # each exactly once
    queued = relay.queued_by()
    assert {queued[qid] for qid in ids} == workers, relay.log()  # both served, nobody else

    assert relay.stop() == 0
    log = relay.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    for pid in workers:
        assert f"relay[{pid}] INFO stopped" in log
    done = relay_cli("audit", "verify", "-c", str(relay.policy))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit log intact" in done.stdout
    records = audit_records(relay)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # one chain, no gaps
    for event in ("received", "queued", "delivered"):
        found = sorted(r["queue_id"] for r in records if r["event"] == event)
        assert found == sorted(ids), event  # one record of each per message


def stop_unlocked(relay: Relay, pid: int) -> None:
    """SIGSTOP ``pid`` at a moment it does not hold the audit log's lock: stopped
    with it (a worker's start probes the log), it held up the supervisor's own
    record of the reload, and with it everything the test waited for."""
    lock = os.open(load(relay.policy).audit.directory / ".lock", os.O_RDWR)
    try:
        for _ in range(100):
            os.kill(pid, signal.SIGSTOP)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.05)
                continue
            fcntl.flock(lock, fcntl.LOCK_UN)
            return
    finally:
        os.close(lock)
    raise AssertionError(f"worker {pid} held the audit log's lock at every try")


def kill_worker(relay: Relay, index: int) -> tuple[int, float]:
    """SIGKILL worker ``index``; its replacement's PID and the restart delay the supervisor gave."""
    victim = [pid for i, pid in relay.started() if i == index][-1]
    before = len(relay.started())
    os.kill(victim, signal.SIGKILL)
    report = re.compile(
        rf"relay\[{relay.pid}\] ERROR worker {index} \(pid {victim}\) was killed by SIGKILL; "
        r"starting a new one in (\d+(?:\.\d+)?)s$",
        re.M,
    )
    relay.wait_for(lambda: report.search(relay.log()) is not None, f"worker {index} reported")
    relay.wait_for(lambda: len(relay.started()) == before + 1, f"a new worker {index}")
    new_index, replacement = relay.started()[-1]
    assert new_index == index and replacement != victim, relay.log()
    assert not alive(victim)
    found = report.search(relay.log())
    assert found is not None
    return replacement, float(found.group(1))


def test_killed_worker_is_replaced_and_sigterm_stops_everything(relay: Relay) -> None:
    first = dict(relay.started())
    interim, delay = kill_worker(relay, 0)
    replacement, next_delay = kill_worker(relay, 0)  # dies again at once: a crash loop
    assert next_delay > delay, relay.log()
    assert len({first[0], first[1], interim, replacement}) == 4
    relay.wait_for(lambda: alive(replacement), "the new worker runs")

    ids = send_until_every_worker_took_one(relay, {replacement, first[1]})
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "messages upstream")
    assert not {first[0], interim} & set(relay.queued_by().values())

    seen = relay.pids()
    assert seen == {relay.pid, first[0], first[1], interim, replacement}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo()
        client.mail("jan@acme.example")
        client.rcpt("one@example.org")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for(lambda: "stopping: telling 2 workers" in relay.log(), "stopping")
        time.sleep(0.2)  # the workers have their SIGTERM too
        client.send(MESSAGE + b".\r\n")
        code, reply = client.getreply()
        assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as "), reply  # finished
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
    assert relay.proc.wait(15) == 0, relay.log()
    log = relay.log()
    for pid in (first[1], replacement):
        assert f"relay[{pid}] INFO stopped" in log
    # queued, not tried: an attempt started after the signal could be cut off by
    # the grace after its upstream had the message, and go again at the next start
    queue_id = reply.decode().rsplit(" ", 1)[1]
    assert queue_id not in relay.delivered()
    assert (relay.policy.parent / "state" / "queue" / "msg" / queue_id).exists()
    left = {pid for pid in seen if alive(pid)}
    assert not left, f"still running: {left}\n{log}"
    assert "Traceback" not in log


def test_a_worker_stopped_by_a_sigterm_of_its_own_is_a_warning_and_replaced(relay: Relay) -> None:
    """It was ``ERROR worker 1 (pid N) exited with status 0``, read as a crash."""
    victim = [pid for i, pid in relay.started() if i == 1][-1]
    before = len(relay.started())
    os.kill(victim, signal.SIGTERM)
    relay.wait_for(lambda: len(relay.started()) == before + 1, "a new worker 1")
    said = re.findall(rf"relay\[{relay.pid}\] (\w+) worker 1 \(pid {victim}\) (.*)", relay.log())
    assert len(said) == 1 and said[0][0] == "WARNING", relay.log()
    assert re.fullmatch(
        r"stopped, exit status 0, as a SIGTERM sent to it alone makes it;"
        r" starting a new one in [\d.]+s",
        said[0][1],
    )


def test_a_version_installed_over_a_running_relay_is_not_read_by_new_workers(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """A worker started after ``pip install`` over the running relay read the new
    files, failed against the modules its supervisor had, and so did every one
    after it: no mail taken, none delivered, the supervisor holding the port."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "relay", source / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    running = Relay(configure(policy_file, port), port, tmp_path / "relay.log", source=source)
    try:
        running.wait_serving()
        (source / "relay" / "pipeline.py").write_text('raise ImportError("a newer version")\n')
        replacement, _ = kill_worker(running, 0)
        other = next(pid for i, pid in running.started() if i == 1)
        ids = send_until_every_worker_took_one(running, {replacement, other})
        running.wait_for(lambda: running.delivered().keys() >= set(ids), "delivered")
        assert "ImportError" not in running.log()
    finally:
        running.stop()


def test_a_worker_that_dies_at_every_start_stops_the_relay(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """Restarted for ever, it left an active service that served nothing, which its
    service manager never noticed; stopped, the service manager starts it afresh."""
    quick = "from relay import supervisor\nsupervisor.RESTART_DELAY = (0.2,)"
    relay = Relay(configure(policy_file, port), port, tmp_path / "relay.log", prelude=quick)
    try:
        relay.wait_serving()
        for _ in range(4):  # five times in a row, as the README says
            kill_worker(relay, 0)
        os.kill(relay.started()[-1][1], signal.SIGKILL)
        relay.wait_for(lambda: relay.proc.poll() is not None, "the relay stopped")
    finally:
        relay.stop()
    assert relay.proc.returncode == supervisor.EX_SOFTWARE
    log = relay.log()
    assert "the 5th time in a row within 10s of its start: stopping" in log
    assert log.count("INFO stopped") == 2  # the other worker's, then the supervisor's


def test_a_worker_that_dies_at_every_start_during_a_reload_stops_the_relay(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """While a reload waited for the other worker's answer, the supervisor logged
    that it was stopping the relay, then served on a worker short for good."""
    quick = "from relay import supervisor\nsupervisor.RESTART_DELAY = (0.2,)"
    relay = Relay(configure(policy_file, port), port, tmp_path / "relay.log", prelude=quick)
    other = None
    try:
        relay.wait_serving()
        other = [pid for index, pid in relay.started() if index == 1][-1]
        stop_unlocked(relay, other)  # the reload waits for its answer
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_for(lambda: "reloading" in relay.log(), "the reload begun")
        for _ in range(supervisor.GIVE_UP - 1):
            kill_worker(relay, 0)
        os.kill(relay.started()[-1][1], signal.SIGKILL)
        relay.wait_for(lambda: "th time in a row" in relay.log(), "the worker given up")
        os.kill(other, signal.SIGCONT)
        relay.wait_for(lambda: relay.proc.poll() is not None, "the relay stopped", timeout=20)
    finally:
        if other is not None and alive(other):
            os.kill(other, signal.SIGCONT)
        relay.stop()
    assert relay.proc.returncode == supervisor.EX_SOFTWARE, relay.log()
    assert "policy reloaded" not in relay.log()


# each worker forked with room for about 6 MiB more address space: less than a
# thread's stack (libuv gives its pool's threads 8 MiB)
NO_ROOM_FOR_THREADS = """
import os, resource
def _little_memory():
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + (6 << 20), resource.RLIM_INFINITY))
os.register_at_fork(after_in_child=_little_memory)
"""


def test_a_worker_that_cannot_start_its_threads_fails_its_start_and_the_log_says_why(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """libuv aborts when it cannot start its thread pool: at its first use, with a
    worker taking mail, restarted in a loop with nothing in the log saying why."""
    relay = Relay(
        configure(policy_file, port), port, tmp_path / "relay.log", prelude=NO_ROOM_FOR_THREADS
    )
    try:
        relay.wait_for(lambda: relay.proc.poll() is not None, "the relay stopped", 60)
    finally:
        relay.stop()
    log = relay.log()
    assert relay.proc.returncode == supervisor.EX_SOFTWARE, log
    assert "was killed by SIGABRT (most likely a thread or memory it could not get" in log
    assert "RLIMIT_NPROC" in log and "RLIMIT_AS" in log
    assert " serving" not in log  # no worker took mail
    assert "Traceback" not in log  # the other worker, dead too, was not waited for


def test_a_worker_killed_by_sigabrt_is_said_to_have_lacked_a_thread_or_memory(
    relay: Relay,
) -> None:
    victim = [pid for i, pid in relay.started() if i == 1][-1]
    os.kill(victim, signal.SIGABRT)
    said = f"worker 1 (pid {victim}) was killed by SIGABRT (most likely a thread or memory"
    relay.wait_for(lambda: said in relay.log(), "the worker reported")
    assert "LimitNPROC or TasksMax" in relay.log()


def test_status_counts_the_workers_running_against_those_asked_for(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """Between a worker's death and its replacement (up to 30 s in a crash loop), or
    with none left, status said the relay ran "in one process"."""
    slow = "from relay import supervisor\nsupervisor.RESTART_DELAY = (30.0,)"
    policy = configure(policy_file, port)
    relay = Relay(policy, port, tmp_path / "relay.log", prelude=slow)
    try:
        relay.wait_serving()
        os.kill(relay.started()[0][1], signal.SIGKILL)
        relay.wait_for(lambda: "starting a new one in 30s" in relay.log(), "worker 0 gone")
        done = relay_cli("status", "-c", str(policy))
        line = done.stdout.splitlines()[0]
        assert line.endswith(", 1 of 2 worker processes (the others starting again: see its log)")
        policy.write_text(policy.read_text().replace("workers: 2\n", "workers: 3\n"))
        done = relay_cli("status", "-c", str(policy))  # an edit not in use: still 1 of the 2
        line = done.stdout.splitlines()[0]
        assert line.endswith(", 1 of 2 worker processes (the others starting again: see its log)")
    finally:
        relay.stop()


def test_a_worker_waiting_to_be_started_again_at_a_stop_is_said_not_to_be(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """A stop within a dead worker's restart delay left the log's "starting a
    new one in 30s" standing: none was started, and nothing said so."""
    slow = "from relay import supervisor\nsupervisor.RESTART_DELAY = (30.0,)"
    policy = configure(policy_file, port)
    relay = Relay(policy, port, tmp_path / "relay.log", prelude=slow)
    try:
        relay.wait_serving()
        victim = relay.started()[0][1]
        os.kill(victim, signal.SIGKILL)
        relay.wait_for(lambda: "starting a new one in 30s" in relay.log(), "worker 0 gone")
        assert relay.stop() == 0, relay.log()
    finally:
        relay.kill_leftovers()
    log = relay.log()
    assert [index for index, _ in relay.started()] == [0, 1], log
    said = f"INFO worker 0 (pid {victim}): no new one is started after all: the relay is stopping"
    assert log.index("INFO stopping: telling 1 worker") < log.index(said), log


def test_an_audit_directory_deleted_stays_gone_until_restored(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """The supervisor settling a dead worker's messages, and the worker started in
    its place, made the directory again: mail was answered 250 into a new chain,
    and a restore with cp -a went inside the new directory."""
    slow = "from relay import supervisor\nsupervisor.RESTART_DELAY = (1.0,)"
    policy = configure(policy_file, port)
    relay = Relay(policy, port, tmp_path / "relay.log", prelude=slow)
    audit, backup = tmp_path / "state" / "audit", tmp_path / "backup"
    try:
        relay.wait_serving()
        first = send(port)
        relay.wait_for(  # a backup taken before it would lack it: a gap verify must report
            lambda: any(
                r["event"] == "delivered" and r["queue_id"] == first for r in audit_records(relay)
            ),
            "the delivery on record",
        )
        shutil.copytree(audit, backup)
        shutil.copystat(audit, backup)
        shutil.rmtree(audit)
        kill_worker(relay, 0)
        relay.wait_for(lambda: "cannot serve: audit log" in relay.log(), "the new worker refused")
        assert not audit.exists()
        assert "the directory is gone; restore it from a backup" in relay.log()
        shutil.copytree(backup, audit)
        shutil.copystat(backup, audit)
        relay.wait_for(lambda: relay.log().count("suppression list") >= 3, "a worker again")
        ids = send_until_every_worker_took_one(
            relay, {relay.started()[-1][1], relay.started()[1][1]}
        )
        relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "delivered")
    finally:
        relay.stop()
    done = relay_cli("audit", "verify", "-c", str(policy))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_relay_does_not_start_a_new_audit_chain_beside_its_queue(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """Started with its audit directory gone, the relay made a new one and a new
    chain, and the mail it still had went on with its history elsewhere or lost.
    A queue with nothing in it (a first start that failed half-way) starts one."""
    policy = queue_e2e.configure(policy_file, port, free_port(), "workers: 2\n")  # down
    Spool(tmp_path / "state" / "queue")  # the first start failed after making it
    with serving(policy, port, tmp_path / "relay.log") as first:
        assert "a new chain begins" in first.log()
        send(port)  # deferred: the upstream is down
    shutil.rmtree(tmp_path / "state" / "audit")
    again = Relay(policy, port, tmp_path / "again.log")
    try:
        assert again.proc.wait(30) == 73
    finally:
        again.kill_leftovers()
    assert "the directory is gone; restore it from a backup" in again.log()
    assert not (tmp_path / "state" / "audit").exists()
    (tmp_path / "state" / "audit").mkdir()  # a new chain, asked for
    with serving(policy, port, tmp_path / "third.log") as third:
        assert "a new chain begins" in third.log()


def test_messages_a_killed_worker_queued_are_delivered_once(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """The upstream is down: both workers hold deferred messages in the shared spool
    when one is killed; once the upstream is back, each message arrives exactly once."""
    sink_port = free_port()
    policy = configure(policy_file, port)
    smtp = (
        f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {sink_port}\n"
        "    tls: none\n    timeout: 5\n"
    )
    text = policy.read_text().replace("  default:\n    type: directory\n    path: outbox\n", smtp)
    policy.write_text(text + "queue: {first_retry: 0.5, max_retry: 1, lifetime: 3600}\n")
    relay = Relay(policy, port, tmp_path / "relay.log")
    try:
        relay.wait_serving()
        ids = send_until_every_worker_took_one(relay, {pid for _, pid in relay.started()})
        relay.wait_for(lambda: relay.log().count("status=deferred") >= len(ids), "deferred")
        kill_worker(relay, 0)
        with SinkServer(port=sink_port) as sink:
            sink.sink.wait(len(ids), timeout=15)
            relay.wait_for(lambda: relay.log().count("status=sent") >= len(ids), "all sent")
            assert relay.stop() == 0
        got = [message.read(m.data).get("Message-ID") or "" for m in sink.sink.messages]
        assert sorted(got) == sorted(f"<{qid}@relay.platform.example>" for qid in ids)
    finally:
        relay.stop()
    done = relay_cli("audit", "verify", "-c", str(policy))
    assert done.returncode == 0, done.stdout + done.stderr


def test_workers_stop_when_the_supervisor_is_killed(relay: Relay) -> None:
    workers = {pid for _, pid in relay.started()}
    assert len(workers) == 2 and all(alive(pid) for pid in workers)
    send(relay.port)
    relay.proc.kill()
    assert relay.proc.wait(5) == -signal.SIGKILL
    relay.wait_for(lambda: not any(alive(pid) for pid in workers), "every worker gone", timeout=10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
    said = re.findall(
        r"relay\[(\d+)\] ERROR worker \d: the supervisor is gone; stopping$", relay.log(), re.M
    )
    assert sorted(said) == sorted(str(pid) for pid in workers)  # once each, not a plain stop


def test_sighup_checks_the_policy_once_and_every_worker_takes_a_good_one(
    relay: Relay,
) -> None:
    workers = {pid for _, pid in relay.started()}
    loaded = LOADED.search(relay.log())
    assert loaded is not None
    old = loaded.group(1)
    good = relay.policy.read_text()

    relay.policy.write_text(good.replace("name: Acme AS", "name: Acme AS\n    bogus: 1"))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(lambda: "reload failed" in relay.log(), "reload failed")
    first = send(relay.port)
    relay.wait_for(lambda: first in relay.delivered(), "a message under the old policy")
    assert from_name(relay.delivered()[first]) == "Jan Janssens via Acme AS"
    time.sleep(0.5)  # a worker told of the broken file would say so by now
    log = relay.log()
    failed = re.findall(r"relay\[(\d+)\] ERROR reload failed: keeping policy (\w+)$", log, re.M)
    assert failed == [(str(relay.pid), old)], log  # the supervisor alone, keeping the old one
    assert not WORKER_POLICY.search(log) and "policy reloaded" not in log, log

    relay.policy.write_text(good.replace("name: Acme AS", "name: Acme Norge AS"))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(  # the supervisor says it once their answers are read
        lambda: len(WORKER_POLICY.findall(relay.log())) >= 2 and RELOADED.search(relay.log()),
        "both workers reload",
    )
    log = relay.log()
    reloads = RELOADED.findall(log)
    assert len(reloads) == 1, log  # reported once, by the supervisor
    supervisor, new, was = reloads[0]
    assert (int(supervisor), was) == (relay.pid, old) and new != old
    in_use = {(int(pid), int(index), digest) for pid, index, digest in WORKER_POLICY.findall(log)}
    assert in_use == {(pid, index, new) for index, pid in relay.started()}, log

    ids = send_until_every_worker_took_one(relay, workers)
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "messages upstream")
    names = {from_name(relay.delivered()[qid]) for qid in ids}
    assert names == {"Jan Janssens via Acme Norge AS"}

    assert relay.stop() == 0
    records = audit_records(relay)
    versions = [r["policy_sha256"][:12] for r in records if r["event"] == "policy_loaded"]
    assert versions == [old, new]  # each version recorded once, not once per worker
    assert relay_cli("audit", "verify", "-c", str(relay.policy)).returncode == 0


def test_workers_take_the_text_the_supervisor_checked_not_a_later_edit(relay: Relay) -> None:
    """The file changes again right after SIGHUP: workers must not read it themselves."""
    good = relay.policy.read_text()
    relay.policy.write_text(good.replace("name: Acme AS", "name: Acme A AS"))
    relay.proc.send_signal(signal.SIGHUP)
    time.sleep(0.005)
    relay.policy.write_text(good.replace("name: Acme AS", "name: Acme B AS"))
    relay.wait_for(lambda: len(WORKER_POLICY.findall(relay.log())) >= 2, "both workers reload")
    log = relay.log()
    (_, checked, _), *_ = RELOADED.findall(log)
    assert {digest for _, _, digest in WORKER_POLICY.findall(log)} == {checked}, log
    assert relay.stop() == 0
    versions = [
        r["policy_sha256"][:12] for r in audit_records(relay) if r["event"] == "policy_loaded"
    ]
    assert versions[-1] == checked


def test_a_new_dkim_key_is_a_new_policy_version(relay: Relay) -> None:
    """The file's text alone was the version: a key rotated under the same text
    was logged as ``policy reloaded: X (was X)``, and recorded as X again."""
    loaded = LOADED.search(relay.log())
    assert loaded is not None
    key = relay.policy.parent / "keys" / "platform.example.e1.private"
    key.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")  # a new Ed25519 key
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(lambda: len(WORKER_POLICY.findall(relay.log())) >= 2, "both workers reload")
    relay.wait_for(lambda: bool(RELOADED.search(relay.log())), "the reload logged")
    (_, new, was), *_ = RELOADED.findall(relay.log())
    assert was == loaded.group(1) and new != was, relay.log()
    log = relay.log()  # said as it begins: seconds of silence, for a large policy
    assert -1 < log.find("INFO reloading: reading ") < log.find("INFO policy reloaded"), log
    recorded = relay.policy.parent / "state" / "policy.checked.files"
    record = json.loads(recorded.read_text())
    assert record["digest"].startswith(new)  # what the tools go by
    assert record["workers"] == 2  # what status counts the processes against
    assert recorded.stat().st_mode & 0o777 == 0o644  # by a monitoring group too: no secret
    assert relay.stop() == 0
    records = audit_records(relay)
    versions = [r["policy_sha256"][:12] for r in records if r["event"] == "policy_loaded"]
    assert versions == [was, new]


def test_workers_take_the_keys_the_supervisor_checked_not_a_later_edit(relay: Relay) -> None:
    """A key file changed between the supervisor's check and the workers' reload
    (held apart here by stopping the workers): each worker read it again itself,
    refused the reload and kept the old policy, while the supervisor had said
    ``policy reloaded`` and recorded the new one."""
    workers = [pid for _, pid in relay.started()]
    text = relay.policy.read_text().replace("name: Acme AS", "name: Acme Norge AS")
    checked = relay.policy.parent / "state" / "policy.checked.yaml"
    for pid in workers:
        stop_unlocked(relay, pid)
    try:
        relay.policy.write_text(text)
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_for(lambda: checked.read_text() == text, "the supervisor checked the policy")
        (relay.policy.parent / "keys" / "platform.example.e1.private").write_text("no key\n")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    relay.wait_for(lambda: len(WORKER_POLICY.findall(relay.log())) >= 2, "both workers reload")
    relay.wait_for(lambda: RELOADED.search(relay.log()) is not None, "the reload said")
    log = relay.log()
    ((_, new, _),) = RELOADED.findall(log)
    assert {digest for _, _, digest in WORKER_POLICY.findall(log)} == {new}, log
    said = RELOADED.search(log)
    assert said is not None and all(m.end() < said.start() for m in WORKER_POLICY.finditer(log))
    assert "reload failed" not in log
    assert not (relay.policy.parent / "state" / "policy.handover.json").exists()
    ids = send_until_every_worker_took_one(relay, set(workers))
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "messages upstream")
    assert {from_name(relay.delivered()[qid]) for qid in ids} == {"Jan Janssens via Acme Norge AS"}


def test_a_worker_that_does_not_take_the_reload_is_named_and_replaced(relay: Relay) -> None:
    """One worker cannot read what it was handed: the supervisor says so, naming
    it, rather than that the policy was reloaded, and replaces it with a worker
    running the new policy, so that mail does not go out under two."""
    (_, first), (_, second) = relay.started()
    text = relay.policy.read_text().replace("name: Acme AS", "name: Acme Norge AS")
    handover = relay.policy.parent / "state" / "policy.handover.json"
    stop_unlocked(relay, first)
    try:
        relay.policy.write_text(text)
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_for(lambda: f"relay[{second}] INFO worker 1: policy" in relay.log(), "worker 1")
        handover.write_bytes(b"{}")
    finally:
        os.kill(first, signal.SIGCONT)
    replaced = re.compile(
        rf"relay\[{relay.pid}\] ERROR reload to policy (\w+): worker 0 \(pid {first}\) kept"
        r" policy (\w+); stopping it, to be replaced by one running policy \1$",
        re.M,
    )
    relay.wait_for(lambda: replaced.search(relay.log()) is not None, "worker 0 named")
    relay.wait_for(lambda: len(relay.started()) == 3, "a new worker 0")
    log = relay.log()
    assert f"relay[{first}] ERROR worker 0: cannot read the policy handed over" in log
    assert "policy reloaded" not in log and not handover.exists()
    replacement = relay.started()[-1][1]
    ids = send_until_every_worker_took_one(relay, {replacement, second})
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "messages upstream")
    assert {from_name(relay.delivered()[qid]) for qid in ids} == {"Jan Janssens via Acme Norge AS"}


def test_one_worker_runs_without_a_supervisor(policy_file: Path, port: int, tmp_path: Path) -> None:
    running = Relay(configure(policy_file, port, "1"), port, tmp_path / "relay.log")
    try:
        running.wait_serving()
        qid = send(port)
        running.wait_for(lambda: qid in running.delivered(), "the message upstream")
        assert running.queued_by()[qid] == running.pid  # the process we started took it
        assert running.stop() == 0
    finally:
        running.stop()
    log = running.log()
    assert f"relay[{running.pid}] INFO serving in one process" in log
    assert " INFO worker " not in log and "workers serving" not in log, log
    assert set(re.findall(r"relay\[(\d+)\]", log)) == {str(running.pid)}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "workers: 0 is out of range: expected auto or a number of processes (1..64)"),
        ("65", "workers: 65 is out of range: expected auto or a number of processes (1..64)"),
        ("many", "workers: expected auto or a number of processes (1..64)"),
    ],
)
def test_check_refuses_a_bad_worker_count(
    policy_file: Path, port: int, value: str, problem: str
) -> None:
    policy = configure(policy_file, port, value)
    line = len(policy.read_text().splitlines())
    done = relay_cli("check", "-c", str(policy))
    assert done.returncode == 78, done.stdout + done.stderr
    assert f"{policy}:{line}:10: {problem}\n" in done.stderr
    assert f"{policy}: 1 problem" in done.stderr


@pytest.mark.parametrize("value", ["auto", "3", "1", "64"])
def test_check_accepts_auto_and_a_count(policy_file: Path, port: int, value: str) -> None:
    done = relay_cli("check", "-c", str(configure(policy_file, port, value)))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_last_of_two_quick_sighups_wins_in_every_worker(relay: Relay) -> None:
    good = relay.policy.read_text()
    relay.policy.write_text(good.replace("name: Acme AS", "name: Acme A AS"))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(lambda: len(RELOADED.findall(relay.log())) == 1, "the first reload")
    relay.policy.write_text(good.replace("name: Acme AS", "name: Acme B AS"))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(lambda: len(RELOADED.findall(relay.log())) == 2, "the second reload")
    last = RELOADED.findall(relay.log())[-1][1]

    def every_worker_on_the_last() -> bool:
        latest = {index: digest for _, index, digest in WORKER_POLICY.findall(relay.log())}
        return set(latest) == {"0", "1"} and set(latest.values()) == {last}

    relay.wait_for(every_worker_on_the_last, "both workers on the last policy")


def test_a_sighup_while_a_worker_restarts_does_not_kill_it(relay: Relay) -> None:
    before = len(relay.started())
    victim = [pid for index, pid in relay.started() if index == 0][-1]
    os.kill(victim, signal.SIGKILL)
    relay.wait_for(lambda: len(relay.started()) == before + 1, "the new worker 0")
    relay.proc.send_signal(signal.SIGHUP)  # a reload at that very moment
    newcomer = relay.started()[-1][1]
    relay.wait_for(lambda: f"relay[{newcomer}] INFO worker 0: policy" in relay.log(), "its reload")
    assert "killed by SIGHUP" not in relay.log()


def test_sigint_stops_the_relay_as_sigterm_does(relay: Relay) -> None:
    """Ctrl-C on a relay started by hand."""
    relay.proc.send_signal(signal.SIGINT)
    assert relay.proc.wait(20) == 0, relay.log()
    assert "stopping: telling 2 workers" in relay.log()


def test_a_worker_killed_while_stopping_is_said(relay: Relay) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo()
        client.mail("jan@acme.example")  # its worker waits for the transaction
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for(lambda: "stopping: telling 2 workers" in relay.log(), "stopping")
        for _, pid in relay.started():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert relay.proc.wait(20) == 0, relay.log()
    said = re.search(r"WARNING worker \d was killed by SIGKILL while stopping", relay.log())
    assert said is not None, relay.log()


def test_a_sighup_while_stopping_still_ends_cleanly(relay: Relay) -> None:
    waiting = []
    for _ in range(4):  # transactions under way: the workers wait for them
        client = smtplib.SMTP("127.0.0.1", relay.port, timeout=20)
        client.ehlo()
        client.mail("jan@acme.example")
        waiting.append(client)
    relay.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    relay.proc.send_signal(signal.SIGHUP)
    for client in waiting:
        client.close()
    assert relay.proc.wait(40) == 0


BROKEN_ENGINE = """
import asyncio, sys
from relay import engine

async def broken(self):
    await asyncio.sleep(0.5)
    raise RuntimeError("a bug in the delivery engine")

engine.Engine.run = broken  # before the workers are forked: each of them has it
from relay.server import run
sys.exit(run(sys.argv[1]))
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_whose_engine_fails_stops_and_is_started_again(
    policy_file: Path, port: int, tmp_path: Path, workers: str
) -> None:
    """It would otherwise go on accepting mail it never delivers, saying nothing."""
    policy = configure(policy_file, port, workers)
    log = tmp_path / "relay.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", BROKEN_ENGINE, str(policy)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=Path(__file__).parent.parent,
        )
    try:
        deadline = time.monotonic() + 20
        wanted = "exited with status 1; starting a new one" if workers == "2" else "stopped"
        while wanted not in log.read_text() and time.monotonic() < deadline:
            assert workers == "2" or proc.poll() in (None, 1)
            time.sleep(0.1)
        text = log.read_text()
        assert "the delivery engine failed, stopping: RuntimeError" in text
        assert wanted in text
        if workers == "1":
            assert proc.wait(10) == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_a_replaced_worker_serves_the_listeners_as_the_others_do(relay: Relay) -> None:
    """Listener settings changed by a reload wait for a restart in every worker: one
    started later to replace a dead one must not answer the same port differently."""
    relay.policy.write_text(
        relay.policy.read_text().replace(
            "auth: optional", "auth: optional\n    max_message_size: 5000"
        )
    )
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(lambda: len(WORKER_POLICY.findall(relay.log())) >= 2, "both workers reload")
    changed = "listener settings changed (local: max_message_size): they take effect after"
    assert changed in relay.log()
    replacement, _ = kill_worker(relay, 0)
    relay.wait_for(lambda: alive(replacement), "the new worker runs")
    other = dict(relay.started())[1]
    bigger = MESSAGE.replace(b"\r\n\r\n", b"\r\n\r\n" + (b"x" * 76 + b"\r\n") * 100, 1)
    assert 5000 < len(bigger) < 26214400
    took: set[int] = set()
    for _ in range(60):  # until both workers took one: SO_REUSEPORT spreads connections
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
            client.ehlo()
            assert client.esmtp_features.get("size") == "26214400", relay.log()
            client.mail("jan@acme.example")
            client.rcpt("one@example.org")
            code, reply = client.data(bigger)
        assert code == 250, (code, reply, relay.log())  # not 552: the size as started
        qid = reply.decode().rsplit(" ", 1)[1]
        relay.wait_for(lambda qid=qid: qid in relay.queued_by(), "queued")
        took.add(relay.queued_by()[qid])
        if took == {replacement, other}:
            break
    assert took == {replacement, other}, relay.log()


def test_what_a_dead_worker_delivered_is_settled_not_sent_again(relay: Relay) -> None:
    """A worker killed after it delivered a message and wrote its records, before
    the removal: its entry is left unlocked in the shared spool. The supervisor
    settles it from the audit log before the replacement, whose first look at
    the spool would otherwise deliver it again."""
    policy = load(relay.policy)
    entry = make_entry(size=len(MESSAGE), message_id="<orphan@relay.platform.example>")
    assert Spool(policy.queue.directory).put_many([(entry, (MESSAGE,))]) == [None]
    done = [
        events.delivered(
            queue_id=entry.queue_id,
            message_id=entry.message_id,
            recipient=rcpt.address,
            upstream="default",
            reply="250 ok",
            attempts=1,
        )
        for rcpt in entry.recipients
    ]
    with AuditLog(policy.audit.directory) as audit:
        audit.append_many(done)
    replacement, _ = kill_worker(relay, 0)
    relay.wait_for(lambda: alive(replacement), "the new worker runs")
    relay.wait_for(lambda: f"{entry.queue_id}: finished before worker 0" in relay.log(), "settled")
    ids = send_until_every_worker_took_one(relay, {replacement, dict(relay.started())[1]})
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "messages upstream")
    assert entry.queue_id not in relay.delivered()  # not sent again
    assert entry.queue_id not in Spool(policy.queue.directory).ids()


def test_a_replaced_worker_serves_the_certificate_checked_not_a_broken_one_on_disk(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """A certificate renewed on disk with a key it does not match is refused by
    check and reload; a worker started later to replace a dead one serves the
    pair the supervisor checked instead of failing at start, again and again."""
    first, other = make_certs(tmp_path / "first"), make_certs(tmp_path / "other")
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    text = configure(policy_file, port).read_text()
    assert "    auth: optional\n" in text
    policy_file.write_text(
        text.replace(
            "    auth: optional\n", f"    auth: optional\n    tls: {{cert: {cert}, key: {key}}}\n"
        )
    )
    relay = Relay(policy_file, port, tmp_path / "relay.log")
    try:
        relay.wait_serving()
        shutil.copy(other.cert, cert)  # its key left behind: the pair on disk does not match
        replacements = [kill_worker(relay, index)[0] for index in (0, 1)]
        # no other worker is left: a connection waits for a replacement to accept it
        assert {served_certificate(port) for _ in range(8)} == {der(first.cert)}, relay.log()
        assert all(alive(pid) for pid in replacements), relay.log()
        assert " failed" not in relay.log()
    finally:
        relay.stop()


def reload_in_every_worker(relay: Relay, text: str) -> None:
    """``text`` as the policy file, SIGHUP, until both workers (and any replacement) run it."""
    before = len(WORKER_POLICY.findall(relay.log()))
    relay.policy.write_text(text)
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(lambda: len(WORKER_POLICY.findall(relay.log())) >= before + 2, "reloaded")


def deliver_by_both_workers(relay: Relay) -> None:
    """A worker replaced after the reload, then messages from it and from the other."""
    replacement, _ = kill_worker(relay, 0)
    other = [pid for index, pid in relay.started() if index == 1][-1]
    ids = send_until_every_worker_took_one(relay, {replacement, other})
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "messages upstream")


def test_a_new_audit_key_waits_for_a_restart_and_the_chain_stays_whole(relay: Relay) -> None:
    """A reload used to switch the supervisor (and any replaced worker) to the new
    key mid-chain, after which verify failed with either key, for good."""
    start = relay.policy.read_text()
    (relay.policy.parent / "audit.key").write_text("a-new-key\n")
    reload_in_every_worker(relay, start + "audit:\n  hmac_key_file: audit.key\n")
    assert "audit.hmac_key_file changed: takes effect after a restart" in relay.log()
    deliver_by_both_workers(relay)
    assert relay.stop() == 0

    relay.policy.write_text(start)  # the key the log was started with: none
    done = relay_cli("audit", "verify", "-c", str(relay.policy))
    assert done.returncode == 0, done.stdout + done.stderr
    events_seen = [r["event"] for r in audit_records(relay)]
    assert events_seen.count("policy_loaded") == 2 and events_seen.count("delivered") >= 2


def test_a_new_state_directory_waits_for_a_restart(relay: Relay) -> None:
    """A reload used to start a second audit chain in the new directory (the
    supervisor's), while the workers kept the old spool."""
    start = relay.policy.read_text()
    old_state = relay.policy.parent / "state"
    reload_in_every_worker(relay, start + "state_directory: elsewhere\n")
    log = relay.log()
    moved = f"state_directory changed ({old_state} to {relay.policy.parent / 'elsewhere'})"
    assert f"{moved}: takes effect after a restart" in log, log
    assert (
        "the spool, the audit log and the suppression list stay in the old one, while relay"
        " queue, audit, suppression and bounce, which read the policy file, look in the new one"
    ) in log
    deliver_by_both_workers(relay)
    assert relay.stop() == 0

    assert not (relay.policy.parent / "elsewhere").exists()
    relay.policy.write_text(start)
    assert relay_cli("audit", "verify", "-c", str(relay.policy)).returncode == 0
    events_seen = [r["event"] for r in audit_records(relay)]
    assert events_seen.count("policy_loaded") == 2 and events_seen.count("delivered") >= 2


def test_a_message_stored_by_a_worker_killed_before_its_records_is_not_delivered(
    relay: Relay,
) -> None:
    """Killed between the spool write and the audit write, the worker never
    answered 250: the client sends the message again. Delivered, the stored
    copy would reach the customer twice, once with no audit trail; the
    supervisor removes it before the replacement starts."""
    policy = load(relay.policy)
    spool = Spool(policy.queue.directory)
    time.sleep(settle_module.MARGIN + 0.5)  # later than the start's record, as in service
    lock = os.open(policy.audit.directory / ".lock", os.O_RDWR)
    replies: list[object] = []

    def client() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
                smtp.sendmail("jan@acme.example", ["one@example.org"], MESSAGE)
            replies.append("250")
        except (smtplib.SMTPException, OSError) as exc:
            replies.append(exc)

    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the worker stops at its audit write
        sender = threading.Thread(target=client)
        sender.start()
        relay.wait_for(lambda: len(spool.ids()) == 1, "the message in the spool")
        (queue_id,) = spool.ids()
        holder = next(
            (index, pid)
            for index, pid in relay.started()
            if any(
                link.resolve() == spool.message_path(queue_id)
                for link in Path(f"/proc/{pid}/fd").iterdir()
                if link.is_symlink()
            )
        )
        os.kill(holder[1], signal.SIGKILL)
        relay.wait_for(lambda: f"(pid {holder[1]}) was killed by SIGKILL" in relay.log(), "death")
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    sender.join(30)
    assert len(replies) == 1 and isinstance(replies[0], smtplib.SMTPServerDisconnected), replies
    relay.wait_for(
        lambda: f"{queue_id}: stored but not on record before worker {holder[0]}" in relay.log(),
        "removed as never acknowledged",
    )
    relay.wait_for(lambda: len(relay.started()) == 3, "a new worker")
    ids = send_until_every_worker_took_one(relay, set(dict(relay.started()).values()))
    relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "later messages upstream")
    assert queue_id not in relay.delivered()
    assert queue_id not in spool.ids()
    assert relay.stop() == 0
    assert not [r for r in audit_records(relay) if r.get("queue_id") == queue_id]


def test_the_policy_for_the_workers_left_unwritten_leaves_no_empty_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the error names the file, and no empty temp file stays behind."""
    target = tmp_path / ".policy.checked.yaml"

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(supervisor.os, "write", full)
    with pytest.raises(OSError, match=rf"{target}: No space left on device"):
        supervisor._write_private(target, b"version: 1\n")
    assert list(tmp_path.iterdir()) == []


def test_the_tools_go_by_the_running_policy_while_the_file_is_broken(relay: Relay) -> None:
    """An edit the relay refused at its reload: the running relay keeps its
    policy, and so do the queue and audit tools, when they are needed most."""
    send(relay.port)
    good = relay.policy.read_text()
    relay.policy.write_text(good + "queue: {frist_retry: 1}\n")
    try:
        os.kill(relay.pid, signal.SIGHUP)
        relay.wait_for(lambda: "reload failed: keeping policy" in relay.log(), "refused")
        for args in (("queue", "list"), ("audit", "verify")):
            done = relay_cli(*args, "-c", str(relay.policy))
            assert done.returncode == 0, done.stderr
            assert "frist_retry: unknown key" in done.stderr
            said = "does not load, so this goes by the policy the relay runs or last ran"
            assert said in done.stderr
        assert "audit log intact" in relay_cli("audit", "verify", "-c", str(relay.policy)).stdout
        relay.policy.write_text("version: [")  # not even YAML: its state directory is the default
        assert relay_cli("queue", "list", "-c", str(relay.policy)).returncode == 0
    finally:
        relay.policy.write_text(good)


def _tool(prelude: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *policybuilds.tool(prelude), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_the_tools_build_none_of_the_policy_a_relay_with_workers_runs(relay: Relay) -> None:
    """Each tool built the whole policy, test-signing every DKIM key and reading
    every login, for the two paths it reads: 8 s a command for 2,000 tenants.
    The policy file and the files it reads, as the relay put them in use, give
    their state settings alone; a key file changed since is a policy nobody
    checked, built whole to say what is wrong with it."""
    send(relay.port)
    policy = str(relay.policy)
    for *args, code in (("queue", "list", 0), ("audit", "verify", 0), ("suppression", "list", 1)):
        done = _tool(policybuilds.BUILT_WHOLE, *args, "-c", policy)
        assert done.returncode == code, done.stderr  # 1: an empty list
        assert "the whole policy built" not in done.stderr
    refused = _tool(policybuilds.BUILT_WHOLE, "suppression", "add", "gone@example.org",
                    "--tenant", "initech", "-c", policy)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "the policy has no tenant 'initech' (its tenants: acme, globex)" in refused.stderr
    key = min((relay.policy.parent / "keys").iterdir())
    key.write_bytes(key.read_bytes() + b"\n")
    done = _tool(policybuilds.BUILT_WHOLE, "queue", "list", "-c", policy)
    assert (done.returncode, done.stderr) == (1, "the whole policy built\n")


def test_status_builds_the_policy_it_runs_to_see_what_became_of_this_host(
    relay: Relay,
) -> None:
    """Going by the relay's record of the files, status said all was well when
    the directory upstream's path had become a file: a reload would refuse it."""
    shutil.rmtree(relay.outbox, ignore_errors=True)  # made at the first delivery
    relay.outbox.write_text("not a directory\n")
    done = relay_cli("status", "-c", str(relay.policy))
    assert f"{relay.policy} does not load" in done.stdout, done.stdout + done.stderr
    assert "is not a directory" in done.stderr


def test_a_fifo_in_a_keys_place_holds_up_no_tool(relay: Relay) -> None:
    """The files the relay recorded were read as they came: a FIFO put in a
    key's place held every tool and ``relay status`` until a writer came."""
    key = min((relay.policy.parent / "keys").iterdir())
    key.unlink()
    os.mkfifo(key)
    for args in (("queue", "list"), ("status",)):
        done = relay_cli(*args, "-c", str(relay.policy))  # bounded: 60 s
        assert "is a FIFO" in done.stderr + done.stdout, (args, done.stdout, done.stderr)


def test_a_copy_of_the_relays_directory_is_not_taken_for_the_policy_it_runs(
    relay: Relay, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``cp -a`` brought the record along, naming the first policy's files: the
    copy's status read the first policy's version, though the copy's key was
    broken."""
    copy = tmp_path_factory.mktemp("copy") / "relay"
    shutil.copytree(relay.policy.parent, copy, symlinks=True)
    key = min((copy / "keys").iterdir())
    key.write_text("no key\n")
    done = _tool(policybuilds.BUILDS_SAID, "status", "-c", str(copy / relay.policy.name))
    assert done.stdout.count("the policy built") == 1, done.stdout
    assert f"{copy / relay.policy.name} does not load" in done.stdout, done.stdout


def test_a_sighup_with_a_fifo_for_a_policy_keeps_the_policy(relay: Relay) -> None:
    """The supervisor read the file whole before checking it: at the reload it
    waited for a writer to the FIFO, and so did the tools, looking for the
    running policy."""
    good = relay.policy.read_text()
    relay.policy.unlink()
    os.mkfifo(relay.policy)
    try:
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_for(lambda: "reload failed" in relay.log(), "reload failed")
        assert f"reload failed: {relay.policy} is a FIFO, not a regular file" in relay.log()
        done = relay_cli("queue", "list", "-c", str(relay.policy))
        assert done.returncode == 78
        assert done.stderr == f"{relay.policy}: the policy file is a FIFO, not a regular file\n"
        send(relay.port)
    finally:
        relay.policy.unlink()
        relay.policy.write_text(good)


def test_records_cut_from_the_end_are_noticed_by_either_worker(relay: Relay) -> None:
    """A message's last record (its delivery) cut off the log while both workers
    run: whichever worker writes next must say so and leave the gap, not take
    the removed seq again. Several rounds, so that the next writer is, at least
    once, the worker that did not write the record cut off."""
    state = relay.policy.parent / "state" / "audit"
    rounds = 5
    for _ in range(rounds):
        queue_id = send(relay.port)
        relay.wait_for(lambda q=queue_id: q in relay.delivered(), "delivered")
        day = sorted(state.glob("audit-*.jsonl"))[-1]

        def last_is_delivery(day: Path = day, q: str = queue_id) -> bool:
            last = json.loads(day.read_bytes().splitlines()[-1])
            return (last["event"], last["queue_id"]) == ("delivered", q)

        relay.wait_for(last_is_delivery, "its delivery recorded last")
        time.sleep(2.5)  # the delivery's fsync: within two seconds
        kept = day.read_bytes().splitlines(keepends=True)[:-1]
        with open(day, "r+b") as cut:  # in place, as truncate(1) does
            cut.truncate(sum(len(line) for line in kept))
        # delivered before the next round, whose delivery must be the last record
        following = send(relay.port)
        relay.wait_for(lambda q=following: q in relay.delivered(), "the next delivered")
    noticed = re.findall(r"its files now end at seq \d+", relay.log())
    assert len(noticed) == rounds, relay.log()
    done = relay_cli("audit", "verify", "-c", str(relay.policy))
    assert done.returncode == 1 and "missing before this line (deleted)" in done.stderr


def test_a_private_file_is_never_written_through_what_lies_in_its_place(tmp_path: Path) -> None:
    """The handover holds keys and passwords: a link left at its temporary name
    had them written wherever it pointed, and a half-written one stayed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    handover = tmp_path / "policy.handover.json"
    (tmp_path / ".policy.handover.json.tmp").symlink_to(elsewhere)
    supervisor._write_private(handover, b"key bytes")
    assert elsewhere.read_bytes() == b"untouched"
    assert handover.read_bytes() == b"key bytes"
    assert handover.stat().st_mode & 0o777 == 0o600
    (tmp_path / ".policy.handover.json.tmp").write_bytes(b"half")
    supervisor._remove_handover(handover)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_a_worker_stuck_in_a_reload_is_killed_and_replaced(
    policy_file: Path, port: int, tmp_path: Path
) -> None:
    """A worker that never answers the reload (stopped here; busy in a runaway
    regular expression in real life) was told SIGTERM and nothing more: it
    never ended, and the relay ran a worker short until its next restart."""
    fast = "import relay.supervisor as s\ns.RELOAD_TIMEOUT = 1.0\ns.STOP_TIMEOUT = 2.0"
    relay = Relay(configure(policy_file, port), port, tmp_path / "relay.log", prelude=fast)
    try:
        relay.wait_serving()
        relay.wait_for(lambda: len(relay.started()) == 2, "two workers")
        (_, stuck), (_, other) = relay.started()
        stop_unlocked(relay, stuck)
        relay.policy.write_text(relay.policy.read_text().replace("name: Acme AS", "name: Acme NO"))
        relay.proc.send_signal(signal.SIGHUP)
        killed = f"ERROR worker 0 (pid {stuck}) did not stop in 2s: killing it"
        relay.wait_for(lambda: killed in relay.log(), "the stuck worker killed")
        relay.wait_for(lambda: len(relay.started()) == 3, "its replacement")
        replacement = relay.started()[-1][1]
        ids = send_until_every_worker_took_one(relay, {replacement, other})
        relay.wait_for(lambda: relay.delivered().keys() >= set(ids), "messages upstream")
        assert {from_name(relay.delivered()[qid]) for qid in ids} == {"Jan Janssens via Acme NO"}
    finally:
        relay.stop()
