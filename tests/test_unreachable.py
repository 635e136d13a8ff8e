"""An upstream that cannot be used is tried with one message a wait, not with every one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import engine as engine_module
from relay import message as relay_message
from relay.deliver import counted
from relay.engine import Attempt, Engine
from relay.policy.load import load
from relay.policy.model import Policy
from relay.record import Recorder
from relay.spool import QueueEntry, Spool, SpoolBusy
from relay.tally import Tally
from relay.unreachable import Suspensions
from tests.relayproc import RelayProcess, wait_for
from tests.sink import ConnectionLimit, Received, Sink, SinkServer, free_port
from tests.spoolkit import make_entry
from tests.test_engine_settle import until
from tests.test_engine_warm import message, running
from tests.test_metrics import _samples, _value
from tests.test_queue_e2e import SMALL, configure, relay_cli, send

MESSAGES = 12


def one_worker(policy_file: Path, port: int, upstream: int, retry: float) -> Path:
    """The test policy in one process, its upstream on ``upstream``, retries every
    ``retry`` seconds (``first_retry`` and ``max_retry``)."""
    policy = configure(policy_file, port, upstream, "workers: 1\n")
    text = policy.read_text()
    policy.write_text(
        text.replace("first_retry: 0.5, max_retry: 1", f"first_retry: {retry}, max_retry: {retry}")
    )
    return policy


class Down:
    """A smarthost that answers every connection 421 and closes it, counting them;
    ``silent``, one that takes the connection and never says a word."""

    def __init__(self, port: int, silent: bool = False, delay: float = 0.0) -> None:
        """``delay``: before each 421, as after a reverse lookup."""
        self.connections = 0
        self._silent = silent
        self._delay = delay
        self._held: list[socket.socket] = []
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
        for client in self._held:
            client.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            if self._silent:
                self._held.append(client)
                continue
            with client:
                time.sleep(self._delay)
                client.sendall(b"421 4.3.2 Service not available\r\n")


def test_messages_wait_for_one_try_and_go_once_it_reaches(
    policy_file: Path, tmp_path: Path
) -> None:
    """Each due message made its own connection to the down smarthost: thousands
    queued came back as a burst of connections, and a host that drops packets
    held every delivery slot for a whole timeout per message."""
    port, upstream = free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=2)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        with Down(upstream) as down:
            # the first alone: messages sent before its refusal came back were
            # each tried (five at once on a busy machine), as they should be
            ids = [send(port)]
            wait_for(lambda: "upstream default suspended: 451 4.4.1" in relay.log())
            ids += [send(port) for _ in range(MESSAGES - 1)]
            time.sleep(4.5)  # two more waits: a try each
            tried = down.connections
        assert 1 <= tried <= 6, (tried, relay.log())  # not one per message and retry
        with SinkServer(Sink(), port=upstream) as sink:
            got = sink.sink.wait(MESSAGES, timeout=20)
        assert "upstream default reached again" in relay.log()
    assert len(got) == MESSAGES
    sent = re.findall(r"(\w+): to=<one@example.org>, relay=default, .* status=sent", relay.log())
    assert sorted(sent) == sorted(ids)


@dataclasses.dataclass
class HangingUpAtEhlo(Sink):
    """Greets, then closes the connection at EHLO while ``down``, counting those."""

    down: bool = True
    hung_up: int = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        if self.down:
            self.hung_up += 1
            server.transport.close()  # the reply is never written
        return await super().handle_EHLO(server, session, envelope, hostname, responses)


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-at-a-time", "pipelining"])
def test_an_upstream_hanging_up_at_ehlo_is_suspended(
    policy_file: Path, tmp_path: Path, pipelining: bool
) -> None:
    """With tls: none EHLO went with the first MAIL: each message made its own
    connection and was deferred "connection lost (sending)", the upstream was
    never suspended, and such a try after a suspension said it was reached again."""
    port, upstream = free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=2)
    sink = HangingUpAtEhlo(pipelining=pipelining)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        with SinkServer(sink, port=upstream):
            ids = [send(port) for _ in range(MESSAGES)]
            said = f"Upstream default (127.0.0.1:{upstream}): connection lost (connecting)"
            wait_for(lambda: f"upstream default suspended: 451 4.4.1 {said}" in relay.log())
            time.sleep(4.5)  # two more waits: a try each
            assert 1 <= sink.hung_up <= 6, (sink.hung_up, relay.log())
            assert "reached again" not in relay.log()
            sink.down = False
            got = sink.wait(MESSAGES, timeout=20)
        assert "upstream default reached again" in relay.log()
    assert len(got) == MESSAGES
    sent = re.findall(r"(\w+): to=<one@example.org>, relay=default, .* status=sent", relay.log())
    assert sorted(sent) == sorted(ids)


def test_a_smarthost_refusing_everyone_slowly_is_suspended_under_concurrent_mail(
    policy_file: Path, tmp_path: Path
) -> None:
    """Its 421s to connections opened together were each taken for a connection
    limit while the others were still being greeted, and as a sign it was there:
    never suspended, a connection per message and retry."""
    port, upstream = free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=2)
    with (
        RelayProcess(policy, port, tmp_path / "relay.log") as relay,
        Down(upstream, delay=0.2),
        ThreadPoolExecutor(6) as senders,
    ):
        list(senders.map(lambda _: send(port), range(12)))
        wait_for(lambda: "upstream default suspended" in relay.log(), timeout=15)


def test_a_host_that_never_answers_gets_one_try_at_a_time_under_steady_mail(
    policy_file: Path, tmp_path: Path
) -> None:
    """Mail arriving faster than the timeout kept an attempt always under way, and
    the host was never suspended: a connection and a slot held for the whole
    timeout per message."""
    port, upstream = free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=2)
    policy.write_text(policy.read_text().replace("timeout: 5\n", "timeout: 1\n"))
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay, Down(upstream, True) as down:
        for _ in range(12):
            send(port)
            time.sleep(0.25)
        tried = down.connections
    assert "upstream default suspended" in relay.log()
    assert 1 <= tried <= 6, (tried, relay.log())


def test_relay_queue_retry_tries_a_suspended_upstream_at_once(
    policy_file: Path, tmp_path: Path
) -> None:
    """After bringing the smarthost back, the sysadmin's retry is not held back by
    a suspension that has a minute to run."""
    port, upstream = free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=60)
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


def test_a_reload_pointing_the_upstream_elsewhere_ends_its_suspension(
    policy_file: Path, tmp_path: Path
) -> None:
    """Suspended by its name, the upstream's mail waited out the wait after a reload
    had pointed the name at a smarthost that works."""
    port, upstream, moved = free_port(), free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=60)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        with Down(upstream):
            send(port)
            wait_for(lambda: "upstream default suspended" in relay.log())
        with SinkServer(Sink(), port=moved) as sink:
            policy.write_text(policy.read_text().replace(f"port: {upstream}", f"port: {moved}"))
            relay.signal(signal.SIGHUP)
            relay.wait_reloaded(1)
            send(port)
            got = sink.sink.wait(1, timeout=15)
    assert len(got) == 1


def _failed_alone(suspensions: Suspensions, upstream: Hashable, at: float) -> None:
    suspensions.ended(upstream, "Q0", at, True, at, 60.0)


def test_a_try_answers_for_every_message_waiting() -> None:
    suspensions = Suspensions()
    assert suspensions.admits("up", "Q1", 0.0, 60.0) is None  # nothing suspended
    _failed_alone(suspensions, "up", 0.0)
    assert suspensions.admits("up", "Q2", 10.0, 60.0) == 60.0
    assert suspensions.admits("up", "Q3", 60.0, 60.0) is None  # the wait is over: Q3 tries
    assert suspensions.admits("up", "Q2", 61.0, 60.0) == 120.0  # while it does, Q2 waits
    suspensions.ended("up", "Q3", 60.0, True, 62.0, 60.0)  # down still
    assert suspensions.admits("up", "Q4", 100.0, 60.0) == 122.0
    assert suspensions.admits("up", "Q4", 122.0, 60.0) is None
    assert suspensions.ended("up", "Q4", 122.0, False, 123.0, 60.0) == {"Q2"}
    assert not suspensions.suspended("up")
    assert suspensions.admits("up", "Q5", 124.0, 60.0) is None


def test_a_clock_set_back_moves_the_suspension_with_it() -> None:
    """Set back an hour, the wait ran to its old wall time: new mail to an
    upstream back up since waited an hour, and a try begun after the step
    counted as begun before the failure, which lifted nothing."""
    suspensions = Suspensions()
    suspensions.ended("up", "Q1", 1000.0, True, 1000.0, 60.0)  # down: until 1060
    assert suspensions.admits("up", "Q2", 1010.0, 60.0) == 1060.0
    back = 1010.0 - 3600.0  # the clock is set back an hour
    assert suspensions.admits("up", "Q2", back, 60.0) == 1060.0 - 3600.0  # 50 s on, as before
    assert suspensions.admits("up", "Q3", back + 50.0, 60.0) is None  # Q3 tries
    assert suspensions.ended("up", "Q3", back + 50.0, False, back + 51.0, 60.0) == {"Q2"}
    assert not suspensions.suspended("up")


def test_one_try_at_a_time_however_long_it_takes() -> None:
    """With a timeout longer than the wait, a new try started every first_retry
    while the last one still held its slot: five at once for a 20 s timeout."""
    suspensions = Suspensions()
    suspensions.ended("up", "Q0", 0.0, True, 0.0, 4.0)
    assert suspensions.admits("up", "Q1", 4.0, 4.0) is None
    assert suspensions.admits("up", "Q2", 8.0, 4.0) == 12.0  # Q1 still trying
    assert suspensions.admits("up", "Q2", 12.0, 4.0) == 16.0
    suspensions.ended("up", "Q1", 4.0, True, 24.0, 4.0)  # its 20 s timeout
    assert suspensions.admits("up", "Q2", 25.0, 4.0) == 28.0
    assert suspensions.admits("up", "Q2", 28.0, 4.0) is None
    suspensions.ended("up", "Q2", 28.0, None, 29.0, 4.0)  # raised: nobody tries now
    assert suspensions.admits("up", "Q3", 32.0, 4.0) is None


def test_overlapping_failures_of_a_dead_host_suspend_it() -> None:
    """With mail arriving faster than the timeout, some attempt was always under
    way, and a host that never answered was never suspended."""
    suspensions = Suspensions()
    suspensions.ended("up", "Q1", 0.0, True, 10.0, 10.0)  # Q2 began at 5, still waiting
    assert suspensions.suspended("up")
    assert suspensions.admits("up", "Q3", 11.0, 10.0) == 20.0


def test_a_failure_after_a_delivery_that_began_later_suspends_nothing() -> None:
    """A connection refused one over the smarthost's limit (421), or a slow attempt
    failing after a later one got through, held back mail for a working upstream."""
    suspensions = Suspensions()
    suspensions.ended("up", "Q2", 0.5, False, 1.2, 60.0)  # delivered
    suspensions.ended("up", "Q1", 1.0, True, 2.0, 60.0)  # began before that ended
    assert not suspensions.suspended("up")
    suspensions.ended("up", "Q3", 3.0, True, 3.5, 60.0)  # nothing since: down
    assert suspensions.suspended("up")


def test_a_waiting_message_is_known_without_its_entry() -> None:
    """A rescan made every waiting message due; each was read from the spool and
    locked again only to be told to wait: 30,000 reads a minute for 15,000."""
    suspensions = Suspensions()
    _failed_alone(suspensions, "up", 0.0)
    assert suspensions.waits("Q1", 1.0) is None  # not known to wait yet
    assert suspensions.admits("up", "Q1", 1.0, 60.0) == 60.0
    assert suspensions.admits("up", "Q2", 1.0, 60.0) == 60.0
    assert suspensions.waits("Q1", 30.0) == 60.0
    assert suspensions.admits("up", "Q3", 60.0, 60.0) is None  # Q3 tries
    assert suspensions.waits("Q1", 61.0) == 120.0  # while it does
    assert suspensions.ended("up", "Q3", 60.0, False, 62.0, 60.0) == {"Q1", "Q2"}
    assert suspensions.waits("Q1", 63.0) is None


def test_at_the_end_of_a_wait_one_waiting_message_is_let_through() -> None:
    """All the waiting messages came due together at the end of each wait, and
    every one was read and locked for ``admits`` to send all but one back."""
    suspensions = Suspensions()
    _failed_alone(suspensions, "up", 0.0)
    for n in range(100):
        assert suspensions.admits("up", f"Q{n}", 1.0, 60.0) == 60.0
    let_through = [n for n in range(100) if suspensions.waits(f"Q{n}", 60.0) is None]
    assert let_through == [0]
    assert suspensions.waits("Q0", 60.5) is None  # asked again, still chosen
    assert suspensions.admits("up", "Q0", 61.0, 60.0) is None  # and it tries
    assert suspensions.admits("up", "Q99", 61.0, 60.0) == 121.0
    suspensions.ended("up", "Q0", 61.0, True, 62.0, 60.0)  # down still
    assert [n for n in range(1, 100) if suspensions.waits(f"Q{n}", 122.0) is None] == [1]


def test_a_chosen_message_that_never_tries_is_passed_over() -> None:
    """Another worker held the chosen message: nobody tried, and the others
    waited for it for good."""
    suspensions = Suspensions()
    _failed_alone(suspensions, "up", 0.0)
    for queue_id in ("Q1", "Q2"):
        suspensions.admits("up", queue_id, 1.0, 60.0)
    assert suspensions.waits("Q1", 60.0) is None  # chosen, but never gets to admits
    assert suspensions.waits("Q2", 60.0) == 120.0
    assert suspensions.waits("Q2", 120.0) is None
    assert suspensions.admits("up", "Q2", 120.0, 60.0) is None
    assert suspensions.admits("up", "Q1", 121.0, 60.0) == 180.0


def test_a_delivery_begun_before_the_upstream_went_down_releases_nothing() -> None:
    """A long transaction on a connection made earlier ended with 250 after the
    host died, and every waiting message went at once to the dead host."""
    suspensions = Suspensions()
    suspensions.ended("up", "Y", 5.0, True, 10.0, 60.0)  # suspended at 10
    assert suspensions.admits("up", "W", 11.0, 60.0) == 70.0
    assert suspensions.ended("up", "X", 1.0, False, 12.0, 60.0) is None  # began at 1
    assert suspensions.suspended("up")
    assert suspensions.ended("up", "Z", 70.0, False, 71.0, 60.0) == {"W"}


def test_messages_gone_and_upstreams_changed_are_forgotten() -> None:
    """A suspension may last weeks; the IDs of messages delivered elsewhere,
    deleted or expired piled up, and so did upstreams a reload changed."""
    suspensions = Suspensions()
    _failed_alone(suspensions, "up", 0.0)
    _failed_alone(suspensions, "old", 0.0)
    for queue_id in ("Q1", "Q2", "Q3"):
        suspensions.admits("up", queue_id, 1.0, 60.0)
    suspensions.keep(["Q2"], ["up"])
    assert suspensions.waits("Q1", 2.0) is None and suspensions.waits("Q2", 2.0) == 60.0
    assert not suspensions.suspended("old")
    assert suspensions.ended("up", "Q9", 61.0, False, 62.0, 60.0) == {"Q2"}


def test_a_suspension_none_of_whose_messages_is_queued_is_forgotten() -> None:
    """It held nothing back, yet the metrics said the worker held the upstream's
    mail, after the queue was deleted or delivered by another worker."""
    suspensions = Suspensions()
    _failed_alone(suspensions, "up", 0.0)  # Q0 tried and deferred
    suspensions.admits("up", "Q1", 1.0, 60.0)  # Q1 waits
    suspensions.keep(["Q0", "Q1"], ["up"])
    assert suspensions.suspended("up")
    suspensions.keep(["Q0"], ["up"])  # the one that tried is still queued
    assert suspensions.suspended("up")
    suspensions.keep([], ["up"])
    assert not suspensions.suspended("up")
    assert suspensions.admits("up", "Q2", 2.0, 60.0) is None  # tries at once, as after a start


def test_a_waiting_message_waits_no_longer_than_its_lifetime() -> None:
    """Planned for the end of the wait, a message whose lifetime ends first
    expired a whole first_retry late; past it, it no longer waits."""
    suspensions = Suspensions()
    _failed_alone(suspensions, "up", 0.0)  # until 60
    assert suspensions.admits("up", "Q1", 1.0, 60.0, arrival=-100.0, lifetime=130.0) == 30.0
    assert suspensions.waits("Q1", 20.0, lifetime=130.0) == 30.0
    assert suspensions.waits("Q1", 30.0, lifetime=130.0) is None
    assert suspensions.admits("up", "Q1", 30.0, 60.0, arrival=-100.0, lifetime=130.0) == 60.0


def test_a_retry_lets_one_message_try_for_each_suspended_upstream() -> None:
    """Any kick ended every suspension: concurrency connections at once to an
    upstream still down, for a release of one unrelated message."""
    suspensions = Suspensions()
    _failed_alone(suspensions, "up", 0.0)
    suspensions.try_now(5.0)
    assert suspensions.admits("up", "Q1", 5.0, 60.0) is None
    assert suspensions.admits("up", "Q2", 5.0, 60.0) == 65.0
    suspensions.try_now(6.0)  # and while Q1 seems to try still
    assert suspensions.admits("up", "Q2", 6.0, 60.0) is None


def test_an_upstream_is_known_by_its_settings_not_its_name(
    policy_file: Path,
) -> None:
    """A reload pointing the name elsewhere (or at a directory) kept its suspension."""
    policy = load(configure(policy_file, free_port(), free_port()))
    down = policy.upstreams["default"]
    suspensions = Suspensions()
    _failed_alone(suspensions, down, 0.0)
    moved = dataclasses.replace(down, port=down.port + 1)
    assert suspensions.admits(moved, "Q1", 1.0, 60.0) is None
    assert suspensions.admits(down, "Q1", 1.0, 60.0) == 60.0


class DownSender:
    """The engine's sender for an upstream that cannot be used: when each try came."""

    def __init__(self) -> None:
        self.tries: list[float] = []

    async def __call__(
        self, _: object, __: str, rcpts: list[str], *___: object, **____: object
    ) -> Attempt:
        self.tries.append(time.time())
        return Attempt(dict.fromkeys(rcpts, (451, "451 4.4.1 down")), "451 4.4.1 down")


def _thirty_waiting(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Thirty messages queued, and a count of the locks taken on their entries
    (each a read of the entry from the spool)."""
    for n in range(30):
        spool.put(make_entry(size=len(message(n))), message(n))
    locks = [0]
    acquire = spool.acquire

    def counted(queue_id: str, blocking: bool = True) -> int:
        locks[0] += 1
        return acquire(queue_id, blocking=blocking)

    monkeypatch.setattr(spool, "acquire", counted)
    return locks


def _down(policy: Policy, first_retry: float) -> Policy:
    queue = dataclasses.replace(policy.queue, first_retry=first_retry, max_retry=3600.0)
    return dataclasses.replace(policy, queue=queue)


async def test_a_rescan_reads_no_waiting_message_again(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rescan made every waiting message due, and each was read and locked
    again only to be told to wait, on the event loop, for the whole outage."""
    monkeypatch.setattr(engine_module, "RESCAN", 0.2)
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    down = _down(policy, 3600.0)
    unreachable = DownSender()
    locks = _thirty_waiting(spool, monkeypatch)
    async with running(Engine(spool, lambda: down, unreachable, Recorder(None))):
        await until(lambda: locks[0] >= 30, "each looked at once")
        await asyncio.sleep(1.0)  # five rescans
    assert len(unreachable.tries) == 1
    assert locks[0] <= 31, locks


async def test_the_end_of_each_wait_reads_one_waiting_message(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the end of each wait every waiting message was read and locked again
    for all but one to be told to wait another."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    down = _down(policy, 0.3)
    unreachable = DownSender()
    locks = _thirty_waiting(spool, monkeypatch)
    async with running(Engine(spool, lambda: down, unreachable, Recorder(None))):
        await until(lambda: len(unreachable.tries) >= 4, "four tries")
    # each wait: the one chosen, and the last one tried coming due by its backoff
    assert locks[0] <= 30 + 2 * len(unreachable.tries), (locks, len(unreachable.tries))


class _Limited(ConnectionLimit):
    """Greets at most two connections at once."""


class _LimitedController(Controller):
    def factory(self) -> SMTP:
        return _Limited(self.handler, **self.SMTP_kwargs)


def test_a_connection_over_the_smarthosts_limit_suspends_nothing(
    policy_file: Path, tmp_path: Path
) -> None:
    """Its 421 while the other connections delivered suspended the upstream, again
    after every release: three messages a first_retry got through."""
    port, upstream = free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=1)
    got, log = _burst_at_a_limit(policy, port, upstream, tmp_path / "relay.log")
    assert len(got) == 20
    assert "421 4.7.0 Too many connections" in log  # it was over the limit
    assert "suspended" not in log


def _burst_at_a_limit(
    policy: Path, port: int, upstream: int, log: Path, bursts: int = 1
) -> tuple[list[Received], str]:
    """Twenty messages from ten clients at once, to a smarthost taking two
    connections at once, ``bursts`` times 2 s apart: what it received within
    40 s of each, and the relay's log."""
    sink = Sink(delay=0.2)
    controller = _LimitedController(sink, hostname="127.0.0.1", port=upstream, ready_timeout=10)
    controller.start()
    try:
        with RelayProcess(policy, port, log) as relay:
            for burst in range(bursts):
                if burst:
                    time.sleep(2)  # the connections idle, within idle_timeout
                with ThreadPoolExecutor(10) as senders:
                    list(senders.map(lambda _: send(port), range(20)))
                with contextlib.suppress(AssertionError):
                    sink.wait(20 * (burst + 1), timeout=40)
            return list(sink.messages), relay.log()
    finally:
        controller.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_burst_over_the_smarthosts_limit_goes_within_seconds(
    policy_file: Path, tmp_path: Path, workers: int
) -> None:
    """Each message refused over the limit waited its backoff, a first_retry (60 s):
    18 of a burst of 20 to a smarthost that takes two connections at once. With
    two workers, each counted only its own connections, and one whose
    connections all met the limit the other's filled took the smarthost for
    down; once it no longer did, a burst after one worker had kept both
    connections idle was refused for ``idle_timeout``, each waiting message in
    turn, hundreds of times."""
    port, upstream = free_port(), free_port()
    policy = configure(policy_file, port, upstream, f"workers: {workers}\n")
    policy.write_text(
        policy.read_text().replace(
            "first_retry: 0.5, max_retry: 1", "first_retry: 60, max_retry: 60"
        )
    )
    got, log = _burst_at_a_limit(policy, port, upstream, tmp_path / "relay.log", bursts=3)
    assert len(got) == 60
    assert "421 4.7.0 Too many connections" in log  # it was over the limit
    assert "refused a connection over its limit" in log
    # refused alone, a worker's slot rests: not each waiting message at once
    assert log.count("status=deferred") < 60, log.count("status=deferred")


class CrowdedSender:
    """Refused one connection over the limit (``crowded``) ``times`` times, then
    answering everyone ``then``."""

    def __init__(self, times: int, then: tuple[int, str] = (250, "250 2.0.0 Ok")) -> None:
        self.times = times
        self.then = then
        self.tries: list[float] = []

    async def __call__(
        self, _: object, __: str, rcpts: list[str], *___: object, **____: object
    ) -> Attempt:
        self.tries.append(time.time())
        if len(self.tries) <= self.times:
            reply = (451, "451 4.4.1 421 4.7.0 Too many connections")
            return Attempt(dict.fromkeys(rcpts, reply), None, crowded=True)
        return Attempt(dict.fromkeys(rcpts, self.then))


async def test_a_refusal_over_the_limit_is_tried_again_soon_and_counts_no_attempt(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It waited its backoff (first_retry, doubled at each), and each counted
    towards the backoff of a real failure after it: a greylisting 4xx after
    three refusals over the limit waited first_retry * 8."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "CROWDED_WAIT", 0.1)
    queue = dataclasses.replace(policy.queue, first_retry=3600.0, max_retry=36000.0)
    slow = dataclasses.replace(policy, queue=queue)
    sender = CrowdedSender(3, then=(450, "450 4.2.0 Greylisted"))
    entry = make_entry(size=len(message(1)))
    spool.put(entry, message(1))
    async with running(Engine(spool, lambda: slow, sender, Recorder(None))) as engine:
        engine.submit(entry.queue_id)
        await until(lambda: len(sender.tries) == 4, "three refusals and a greylisting")
        await until(lambda: spool.load(entry.queue_id).attempts == 1, "the greylisting stored")
        stored = spool.load(entry.queue_id)
    assert stored.next_attempt - sender.tries[-1] < 3600 * 1.1 + 5


async def test_a_refusal_over_the_limit_lifts_no_suspension(spool: Spool, policy: Policy) -> None:
    """A connection refused as one too many is no verdict on the upstream: taken
    for a reach, it let every message waiting for a host found down go at once."""
    now = [time.time()]
    down, crowded = DownSender(), CrowdedSender(1)
    senders = [down, crowded]

    async def send(*args: object, **kwargs: object) -> Attempt:
        return await senders.pop(0)(*args, **kwargs)

    engine = Engine(spool, lambda: policy, send, Recorder(None), clock=lambda: now[0])
    tried, waiting = make_entry(size=len(message(1))), make_entry(size=len(message(2)))
    spool.put(tried, message(1))
    spool.put(waiting, message(2))
    assert (await engine.attempt_now(tried.queue_id)).status == "deferred"
    assert (await engine.attempt_now(waiting.queue_id)).status == "later"
    now[0] += 2 * policy.queue.first_retry
    assert (await engine.attempt_now(tried.queue_id)).status == "deferred"
    assert crowded.tries and not senders
    assert engine._suspensions.suspended(policy.upstreams[tried.upstream])
    await engine.stop(5)


async def test_a_reload_pointing_the_name_elsewhere_gives_back_every_slot(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "RESCAN", 0.1)
    monkeypatch.setattr(engine_module, "CROWDED_WAIT", 0.1)
    current = [policy]
    engine = Engine(spool, lambda: current[0], CrowdedSender(1), Recorder(None))
    entry = make_entry(size=len(message(1)))
    spool.put(entry, message(1))
    async with running(engine):
        engine.submit(entry.queue_id)
        await until(lambda: entry.queue_id not in spool.ids(), "delivered")
        limit = engine._limits[entry.upstream]
        assert limit.size == 1 < limit.full  # narrowed: alone when refused
        moved = dataclasses.replace(
            policy.upstreams[entry.upstream], path=spool.directory / "elsewhere"
        )  # type: ignore[type-var]
        current[0] = dataclasses.replace(
            policy, upstreams={**policy.upstreams, entry.upstream: moved}
        )
        await until(lambda: limit.size == limit.full, "every slot back")


async def test_the_message_that_tries_waits_no_longer_than_the_others(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one try of a suspended upstream was deferred by its own backoff, doubled
    at each try: with the upstream back, it came 88 s after the waiting ones."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    queue = dataclasses.replace(policy.queue, first_retry=0.2, max_retry=3600.0)
    down = dataclasses.replace(policy, queue=queue)
    unreachable = DownSender()
    tries = unreachable.tries

    entry = make_entry(size=len(message(1)))
    spool.put(entry, message(1))
    async with running(Engine(spool, lambda: down, unreachable, Recorder(None))):
        await until(lambda: len(tries) >= 4, "four tries")
        stored = spool.load(entry.queue_id)
    assert stored.next_attempt - tries[-1] <= 0.2 + 0.1, stored.next_attempt - tries[-1]


class SwitchedSender(DownSender):
    """Down until ``up`` is set, then taking every recipient."""

    up = False

    async def __call__(self, *args: object, **kwargs: object) -> Attempt:
        if not self.up:
            return await super().__call__(*args, **kwargs)
        rcpts = args[2]
        assert isinstance(rcpts, list)
        return Attempt(dict.fromkeys(rcpts, (250, "250 2.0.0 Ok")), None)


async def test_the_metrics_say_which_upstream_a_worker_holds_mail_for(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a warning in the log said the smarthost could not be used; an alert had
    to guess it from deferrals. A worker started in the place of one that held
    the upstream's mail holds nothing yet, whatever its row said; another
    worker's delivery after the failure means the upstream is back, and a
    failure after that, that it is gone again."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    queue = dataclasses.replace(policy.queue, first_retry=0.3, max_retry=0.3)
    down = dataclasses.replace(policy, queue=queue)
    sender = SwitchedSender()
    counts = Tally(2)
    row, other = counts.row(0), counts.row(1)
    row.suspended("default", True)  # left by the worker before

    def held() -> int:
        return counts.holding("default")

    assert held() == 1
    engine = Engine(spool, lambda: down, sender, Recorder(None), tally=row)
    async with running(engine):
        await until(lambda: held() == 0, "the row taken up afresh")
        entry = make_entry(size=len(message(1)))
        spool.put(entry, message(1))
        engine.submit(entry.queue_id)
        await until(lambda: sender.tries, "a try")
        assert held() == 1
        other.reached("default", time.monotonic())
        assert held() == 0
        tries = len(sender.tries)
        await until(lambda: len(sender.tries) > tries, "the next try")
        assert held() == 1
        sender.up = True
        await until(lambda: held() == 0, "reached again")
        await until(lambda: entry.queue_id not in spool.ids(), "delivered")


def test_relay_upstream_suspended_is_served_until_the_upstream_is_back(
    policy_file: Path, tmp_path: Path
) -> None:
    port, upstream, metrics = free_port(), free_port(), free_port()
    extra = f"workers: 2\nmetrics: {{address: 127.0.0.1, port: {metrics}}}\n"
    policy = configure(policy_file, port, upstream, extra)
    policy.write_text(
        policy.read_text().replace(
            "first_retry: 0.5, max_retry: 1", "first_retry: 60, max_retry: 60"
        )
    )

    def held() -> float:
        return _value(_samples(metrics), "relay_upstream_suspended", upstream="default")

    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        wait_for(lambda: f"on http://127.0.0.1:{metrics}/metrics" in relay.log())
        assert ("relay_upstream_suspended", (("upstream", "default"),)) in _samples(metrics)
        assert held() == 0
        with Down(upstream):
            send(port)
            wait_for(lambda: "upstream default suspended" in relay.log())
            assert held() == 1
        with SinkServer(Sink(), port=upstream) as sink:
            relay_cli(policy, "queue", "retry", "ALL")
            assert len(sink.sink.wait(1, timeout=15)) == 1
            wait_for(lambda: held() == 0)


def test_a_reach_by_another_worker_since_the_failure_is_seen_from_this_one() -> None:
    counts = Tally(2)
    row, other = counts.row(0), counts.row(1)
    assert not row.reached_since_held("default")  # nothing held
    other.reached("default", time.monotonic())
    time.sleep(0.002)  # counted in milliseconds
    row.suspended("default", True)
    assert not row.reached_since_held("default")  # that attempt began before the failure
    time.sleep(0.002)
    other.reached("default", time.monotonic())
    assert row.reached_since_held("default")
    assert not row.reached_since_held("other")
    other.reached("default", time.monotonic() - 60)  # a long attempt ending last
    assert row.reached_since_held("default")
    row.suspended("default", False)
    assert not row.reached_since_held("default")


def test_a_reach_lets_the_waiting_messages_go_however_it_is_learnt() -> None:
    suspensions = Suspensions()
    assert suspensions.reached("other", 0.0) is None  # nothing suspended
    _failed_alone(suspensions, "up", 0.0)
    assert suspensions.admits("up", "Q1", 1.0, 60.0) == 60.0
    assert suspensions.upstreams() == ["up"]
    assert suspensions.reached("up", 2.0) == {"Q1"}
    assert suspensions.upstreams() == []
    assert suspensions.waits("Q1", 3.0) is None
    suspensions.ended("up", "Q2", 1.5, True, 3.0, 60.0)  # began before that reach
    assert not suspensions.suspended("up")


async def test_a_worker_lets_its_mail_go_when_another_worker_reaches_the_upstream(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several workers a smarthost's connection limit, filled by the other
    workers' connections, read as the upstream down: this worker held its mail
    a first_retry while the others delivered."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    queue = dataclasses.replace(policy.queue, first_retry=3600.0, max_retry=3600.0)
    down = dataclasses.replace(policy, queue=queue)
    sender = SwitchedSender()
    counts = Tally(2)
    row, other = counts.row(0), counts.row(1)
    engine = Engine(spool, lambda: down, sender, Recorder(None), tally=row)
    async with running(engine):
        first, waiting = (make_entry(size=len(message(n))) for n in (1, 2))
        spool.put(first, message(1))
        engine.submit(first.queue_id)
        await until(lambda: sender.tries, "a try")
        spool.put(waiting, message(2))
        engine.submit(waiting.queue_id)
        await asyncio.sleep(0.3)
        assert len(sender.tries) == 1  # held for the suspension
        sender.up = True
        other.reached("default", time.monotonic())
        await until(lambda: waiting.queue_id not in spool.ids(), "delivered")
        assert counts.holding("default") == 0


@contextlib.asynccontextmanager
async def suspended_by_one_try(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[QueueEntry, Tally]]:
    """An engine whose one message found its upstream down, rescanning five times a
    second: the message, and the shared counts the engine tells."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "RESCAN", 0.2)
    queue = dataclasses.replace(policy.queue, first_retry=3600.0, max_retry=3600.0)
    down = dataclasses.replace(policy, queue=queue)
    sender = DownSender()
    counts = Tally(1)
    engine = Engine(spool, lambda: down, sender, Recorder(None), tally=counts.row(0))
    async with running(engine):
        entry = make_entry(size=len(message(1)))
        spool.put(entry, message(1))
        engine.submit(entry.queue_id)
        await until(lambda: sender.tries, "a try")
        assert counts.holding("default") == 1
        yield entry, counts


async def test_a_worker_whose_queue_lost_the_upstreams_mail_holds_nothing(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metrics said it held the upstream's mail for as long as it lived, after
    ``relay queue delete`` (or another worker's delivery) took the message away."""
    async with suspended_by_one_try(spool, policy, monkeypatch) as (entry, counts):
        spool.remove(entry.queue_id)
        await until(lambda: counts.holding("default") == 0, "the suspension forgotten")


async def hold(spool: Spool, queue_id: str) -> None:
    """On hold, as ``relay queue hold`` puts it, once the engine has let go of it:
    a blocking lock here stopped the event loop the engine was to let go on,
    whenever the test came back while the attempt stored its deferral."""
    for _ in range(1000):
        try:
            with spool.lock(queue_id, blocking=False):
                held = spool.load(queue_id)
                held.held = True
                spool.update(held)
                return
        except SpoolBusy:
            await asyncio.sleep(0.02)
    raise AssertionError(f"{queue_id} stayed locked")


async def test_a_suspension_whose_mail_is_on_hold_holds(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgotten while every message was held, the suspension let each released
    message connect to the upstream still down, where it lets one try."""
    async with suspended_by_one_try(spool, policy, monkeypatch) as (entry, counts):
        await hold(spool, entry.queue_id)
        await asyncio.sleep(0.6)  # rescans
        assert counts.holding("default") == 1


async def test_each_worker_says_when_its_attempts_reached_an_upstream(policy: Policy) -> None:
    """What lets the metrics know that one worker's suspension is out of date."""
    counts = Tally(2)
    sender = SwitchedSender()
    send = counted(sender, counts.row(1))
    counts.row(0).suspended("default", True)
    time.sleep(0.002)  # stamped in milliseconds: a tie goes to the failure
    upstream = policy.upstreams["default"]
    await send(upstream, "jan@acme.example", ["one@example.org"], b"")
    assert counts.holding("default") == 1  # not reached: no news
    sender.up = True
    await send(upstream, "jan@acme.example", ["one@example.org"], b"")
    assert counts.holding("default") == 0


def test_a_wall_clock_set_back_does_not_hide_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dated by the wall clock, a failure after a step back of an hour came before
    another worker's older delivery, and the metrics said nothing was held."""
    counts = Tally(2)
    counts.row(1).reached("default", time.monotonic())
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() - 3600)
    counts.row(0).suspended("default", True)
    assert counts.holding("default") == 1


def test_mail_accepted_after_an_outage_does_not_wait_behind_its_backlog(
    policy_file: Path, tmp_path: Path
) -> None:
    """The backlog, due at once when the smarthost came back, went first in line
    for its slots: an invoice accepted then waited until all of it was sent
    (30,000 at 123 a second: four minutes). It now takes turns with it."""
    port, upstream = free_port(), free_port()
    policy = one_worker(policy_file, port, upstream, retry=1)
    text = policy.read_text()
    policy.write_text(text.replace("lifetime: 3600}", "lifetime: 3600, concurrency: 1}"))
    backlog = 20
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        with Down(upstream):
            for _ in range(backlog):
                send(port)
            wait_for(lambda: "upstream default suspended" in relay.log())
        with SinkServer(Sink(delay=0.2), port=upstream) as sink:
            sink.sink.wait(2, timeout=20)
            fresh = send(port, SMALL.replace(b"Subject: Hello", b"Subject: Fresh"))
            before = len(sink.sink.messages)
            got = sink.sink.wait(backlog + 1, timeout=30)
    subjects = [relay_message.read(m.data).get("Subject") for m in got]
    assert subjects.index("Fresh") <= before + 2, (fresh, before, subjects)
