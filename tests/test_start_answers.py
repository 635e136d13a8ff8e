"""A relay in its start, the spool read first (6 to 11 s for 50,000 messages;
here every fsync hangs under it, ``tests.slowdisk``, until the test lets it go
on): the health checks answer at once, saying it starts, and ``relay status``
says it starts, not that its workers are starting again."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess, terminate, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.slowdisk import serving, slow_disk
from tests.test_metrics import _metrics_policy
from tests.test_queue_e2e import relay_cli
from tests.test_server import _accepts

READING = "starting: reading the spool"


@dataclass
class _Start:
    proc: subprocess.Popen[bytes]
    log: Path
    metrics: int
    delay: Path  # "-1" holds the start in its first fsync; "0" lets it go on

    def serving(self) -> bool:
        return " serving" in self.log.read_text(errors="replace")


@contextlib.contextmanager
def _held_start(policy: Path, metrics: int, tmp_path: Path) -> Iterator[_Start]:
    """``relay serve`` with its disk hung from the first fsync, which the start's
    reading of the spool and its audit record make; yielded once its metrics
    port takes connections."""
    env, delay = slow_disk(tmp_path, delay_ms=-1)
    log = tmp_path / "held.log"
    proc = serving(policy, env, log)
    try:
        wait_for(lambda: _accepts(metrics) or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        yield _Start(proc, log, metrics, delay)
    finally:
        delay.write_text("0")
        terminate(proc, 15)


def _get(port: int, path: str) -> tuple[int, str, float]:
    """Code, body and seconds taken; a check given 2 s, as probes give little more."""
    began = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            code, body = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    return code, body.decode(), time.monotonic() - began


@pytest.mark.parametrize("workers", [2, 1])
def test_the_health_checks_answer_while_the_start_reads_the_spool(
    policy_file: Path, tmp_path: Path, workers: int
) -> None:
    """The metrics port, bound with the listeners, took connections and
    answered none until the workers served: a ``/healthz`` sent 0.5 s into a
    start on 50,000 queued messages was answered at 11.6 s, past the probes'
    timeouts. Now the start is alive (200) and not ready (503, saying why),
    and a scrape fails (503) rather than read an empty queue."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=workers)
        with _held_start(policy, metrics, tmp_path) as start:
            code, body, took = _get(metrics, "/healthz")
            assert (code, body) == (200, f"{READING}\n") and took < 1.5, (code, body, took)
            code, body, took = _get(metrics, "/readyz")
            assert code == 503 and took < 1.5, (code, body, took)
            assert json.loads(body) == {"ready": False, "checks": {"relay": READING}}
            code, body, _ = _get(metrics, "/metrics")
            assert (code, body) == (503, f"{READING}\n")
            assert not start.serving()
            start.delay.write_text("0")
            wait_for(start.serving)
            wait_for(lambda: _get(metrics, "/readyz")[0] == 200)
            assert _get(metrics, "/healthz")[:2] == (200, "ok\n")
            code, body, _ = _get(metrics, "/metrics")
            assert code == 200 and "relay_workers" in body, body


def test_status_says_the_relay_starts_not_that_its_workers_start_again(
    policy_file: Path, tmp_path: Path
) -> None:
    """Started again on a queue of 50,000, a relay of two workers read as
    ``0 of 2 worker processes (the others starting again: see its log)``
    while it read the spool: as if its workers were crashing. Now it starts,
    reading the spool, until it serves."""
    port, metrics = free_port(), free_port()
    policy = _metrics_policy(policy_file, port, free_port(), metrics, workers=2)
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        pass  # the record of its workers left behind, as any relay that ran leaves it
    with _held_start(policy, metrics, tmp_path) as start:
        done = relay_cli(policy, "status")
        assert done.returncode == 0, done.stdout + done.stderr
        first = done.stdout.splitlines()[0]
        pid = start.proc.pid
        assert re.fullmatch(rf"relay: starting, PID {pid} since \S+, not serving yet", first)
        assert "policy: starting" not in done.stdout, done.stdout
        start.delay.write_text("0")
        wait_for(start.serving)
        wait_for(lambda: "2 worker processes" in relay_cli(policy, "status").stdout)
        first = relay_cli(policy, "status").stdout.splitlines()[0]
        assert re.fullmatch(rf"relay: running, PID {pid} since \S+, 2 worker processes", first)


def _blocked(tid: int) -> set[int]:
    """The signals thread ``tid`` of this process holds back, from /proc."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError(f"no SigBlk for thread {tid}")


def test_the_metrics_thread_takes_none_of_the_signals_the_supervisor_waits_for(
    policy_file: Path,
) -> None:
    """The thread now runs from the start, before the supervisor holds its signals
    back for ``sigtimedwait``: one it did not hold back itself took a SIGTERM sent
    while the workers started, and the supervisor died by it, with no ``stopped``."""
    import signal
    import threading

    from relay.metrics.serve import MetricsServer
    from relay.policy.load import load
    from relay.policy.model import MetricsSettings
    from tests.test_queue_e2e import configure

    policy = load(configure(policy_file, free_port(), free_port()))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    server = MetricsServer(MetricsSettings("127.0.0.1", free_port()), policy)
    try:
        thread = next(t for t in threading.enumerate() if t.name == "metrics")
        assert thread.native_id is not None
        held = _blocked(thread.native_id)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            assert signum in held, signal.Signals(signum).name
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # the caller's own
    finally:
        server.stop()


def test_a_stop_asked_for_while_starting_is_what_the_checks_say(policy_file: Path) -> None:
    """A SIGTERM while the spool is read is honoured once it is read (seconds
    later on a large queue); meanwhile ``/readyz`` said ``starting``, as if mail
    would soon be taken, where a serving relay says ``stopping`` from the signal."""
    from relay.metrics import status
    from relay.metrics.serve import MetricsServer
    from relay.policy.load import load
    from relay.policy.model import MetricsSettings
    from tests.test_queue_e2e import configure

    policy = load(configure(policy_file, free_port(), free_port()))
    port = free_port()
    server = MetricsServer(MetricsSettings("127.0.0.1", port), policy)
    try:
        code, body, _ = _get(port, "/readyz")
        assert (code, json.loads(body)["checks"]["relay"]) == (503, READING)
        status.stopping()
        code, body, _ = _get(port, "/readyz")
        assert (code, json.loads(body)["checks"]["relay"]) == (503, "stopping")
        assert _get(port, "/healthz")[:2] == (200, "stopping\n")
    finally:
        status.STATUS.stopping = False
        server.stop()
