"""An upstream that cannot be used is tried with one message a wait, not with every one."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from relay.unreachable import Suspensions
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_queue_e2e import configure, send

MESSAGES = 12


class Down:
    """A smarthost that answers every connection 421 and closes it, counting them."""

    def __init__(self, port: int) -> None:
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Down:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with client:
                client.sendall(b"421 4.3.2 Service not available\r\n")


def test_messages_wait_for_one_try_and_go_once_it_reaches(
    policy_file: Path, tmp_path: Path
) -> None:
    """Each due message made its own connection to the down smarthost: thousands
    queued came back as a burst of connections, and a host that drops packets
    held every delivery slot for a whole timeout per message."""
    port, upstream = free_port(), free_port()
    policy = configure(policy_file, port, upstream, "workers: 1\n")
    text = policy.read_text().replace(
        "first_retry: 0.5, max_retry: 1", "first_retry: 2, max_retry: 2"
    )
    policy.write_text(text)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        with Down(upstream) as down:
            ids = [send(port) for _ in range(MESSAGES)]
            wait_for(lambda: "upstream default suspended: 451 4.4.1" in relay.log())
            time.sleep(4.5)  # two more waits: a try each
            tried = down.connections
        assert 1 <= tried <= 6, (tried, relay.log())  # not one per message and retry
        with SinkServer(Sink(), port=upstream) as sink:
            got = sink.sink.wait(MESSAGES, timeout=20)
        assert "upstream default reached again" in relay.log()
    assert len(got) == MESSAGES
    sent = re.findall(r"(\w+): to=<one@example.org>, relay=default, .* status=sent", relay.log())
    assert sorted(sent) == sorted(ids)


def test_relay_queue_retry_tries_a_suspended_upstream_at_once(
    policy_file: Path, tmp_path: Path
) -> None:
    """After bringing the smarthost back, the sysadmin's retry is not held back by
    a suspension that has a minute to run."""
    port, upstream = free_port(), free_port()
    policy = configure(policy_file, port, upstream, "workers: 1\n")
    text = policy.read_text()
    policy.write_text(
        text.replace("first_retry: 0.5, max_retry: 1", "first_retry: 60, max_retry: 60")
    )
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        with Down(upstream):
            ids = [send(port) for _ in range(3)]
            wait_for(lambda: "upstream default suspended" in relay.log())
        with SinkServer(Sink(), port=upstream) as sink:
            retried = subprocess.run(
                [sys.executable, "-m", "relay", "queue", "retry", "-c", str(policy), "ALL"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert retried.returncode == 0, retried.stderr
            got = sink.sink.wait(len(ids), timeout=15)
    assert len(got) == len(ids)


def test_a_try_answers_for_every_message_waiting() -> None:
    suspensions = Suspensions()
    assert suspensions.admits("up", "Q1", 0.0, 60.0) is None  # nothing suspended
    assert suspensions.failed("up", "451 4.4.1 down", 0.0, 60.0)
    assert suspensions.admits("up", "Q2", 10.0, 60.0) == 60.0
    assert suspensions.admits("up", "Q3", 60.0, 60.0) is None  # the wait is over: Q3 tries
    assert suspensions.admits("up", "Q2", 61.0, 60.0) == 120.0  # while it does, Q2 waits
    assert not suspensions.failed("up", "451 4.4.1 down", 62.0, 60.0)  # said once
    assert suspensions.admits("up", "Q4", 100.0, 60.0) == 122.0
    assert suspensions.reached("up") == {"Q2", "Q4"}
    assert suspensions.reached("up") is None
    assert suspensions.admits("up", "Q5", 101.0, 60.0) is None
