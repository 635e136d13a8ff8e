"""One tenant's stalled upstream and another tenant's healthy one, through a real
relay with a low open-file limit: the stalled one's backlog waits for its own
slots without holding the other tenant's mail back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.relayproc import RelayProcess, wait_for
from tests.sink import SinkServer, free_port
from tests.test_metrics import _samples, _value

BUDGET = 64  # the attempts a worker may have under way: a quarter of 256 open files
BACKLOG = BUDGET + 16
ACME = b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: Hello\r\n\r\nhi\r\n"
GLOBEX = b"From: hank@globex.example\r\nTo: two@example.org\r\nSubject: Hello\r\n\r\nhi\r\n"


class Stalling:
    """An upstream that takes each connection and every command, then never
    answers the end of the message: a server that hangs while it scans."""

    def __init__(self) -> None:
        self.port = 0
        self.dots = 0  # messages sent in full, never answered
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> Stalling:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        """Hangs up on the relay, so that its stop waits for no stalled attempt."""
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        writer.write(b"220 stalling ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-stalling\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                self.dots += 1  # and no reply, ever
            else:
                writer.write(b"250 ok\r\n")


def configure(policy_file: Path, port: int, healthy: int, stalled: int) -> Path:
    """acme's mail goes to the stalled upstream, globex's to the healthy one."""
    upstreams = "".join(
        f"  {name}:\n    type: smtp\n    host: 127.0.0.1\n    port: {upstream_port}\n"
        "    tls: none\n    timeout: 30\n"
        for name, upstream_port in (("default", healthy), ("stalled", stalled))
    )
    text = policy_file.read_text().replace("port: 2525", f"port: {port}")
    text = text.replace("  default:\n    type: directory\n    path: outbox\n", upstreams)
    text = text.replace(
        "    upstream: default\n    default_user: jan\n",
        "    upstream: stalled\n    default_user: jan\n",
    )
    text += "workers: 1\nqueue: {first_retry: 0.5, max_retry: 1, lifetime: 3600, concurrency: 2}\n"
    policy_file.write_text(text)
    return policy_file


def send(port: int, sender: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, [rcpt], data)


def test_a_stalled_upstreams_backlog_holds_no_other_upstreams_mail_back(
    policy_file: Path, tmp_path: Path
) -> None:
    """Its attempts waiting for its slots counted as under way: once they were as
    many as a worker may have, another tenant's mail to a healthy upstream was
    accepted and then waited, untried, for the stalled ones to time out, one
    at a time (600 s each, at the default ``data_timeout``)."""
    port = free_port()
    with Stalling() as stalling, SinkServer() as healthy:
        policy = configure(policy_file, port, healthy.port, stalling.port)
        with RelayProcess(policy, port, tmp_path / "relay.log", open_files=(256, 256)) as relay:
            for n in range(BACKLOG):
                send(port, "jan@acme.example", f"customer{n}@example.org", ACME)
            for n in range(3):
                send(port, "hank@globex.example", f"client{n}@example.org", GLOBEX)
            received = healthy.sink.wait(3, timeout=10)
            assert stalling.dots == 2  # acme's upstream has both of its slots, stalled
    assert sorted(r.rcpt_tos[0] for r in received) == [f"client{n}@example.org" for n in range(3)]
    assert "open files: limited to 256" in relay.log()


def _under_way(metrics: int, upstream: str) -> float:
    samples = _samples(metrics)
    return _value(samples, "relay_upstream_attempts_in_progress", upstream=upstream)


@dataclass
class Stall:
    """A relay of two workers with metrics, one message to the stalled upstream
    under way."""

    policy: Path
    metrics: int
    relay: RelayProcess
    stalling: Stalling
    healthy: SinkServer

    def kill_workers(self) -> None:
        assert self.relay.proc is not None
        pid = self.relay.proc.pid
        for worker in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            os.kill(int(worker), signal.SIGKILL)


@contextlib.contextmanager
def stalled_attempt(policy_file: Path, tmp_path: Path) -> Iterator[Stall]:
    port, metrics = free_port(), free_port()
    with Stalling() as stalling, SinkServer() as healthy:
        policy = configure(policy_file, port, healthy.port, stalling.port)
        text = policy.read_text().replace("workers: 1\n", "workers: 2\n")
        policy.write_text(text + f"metrics: {{address: 127.0.0.1, port: {metrics}}}\n")
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            send(port, "jan@acme.example", "customer@example.org", ACME)
            wait_for(lambda: stalling.dots == 1)
            yield Stall(policy, metrics, relay, stalling, healthy)


def test_attempts_under_way_show_and_end_with_a_killed_worker(
    policy_file: Path, tmp_path: Path
) -> None:
    """A final dot never answered showed nowhere until ``data_timeout`` (600 s):
    the gauge counts the attempts begun and not ended, in every worker, and a
    killed worker's end with it, or its stalled one would count for good."""
    with stalled_attempt(policy_file, tmp_path) as stall:
        assert _under_way(stall.metrics, "stalled") == 1
        assert _under_way(stall.metrics, "default") == 0
        stall.kill_workers()
        wait_for(lambda: stall.stalling.dots == 2)  # a new worker tries it again
        assert _under_way(stall.metrics, "stalled") == 1


def test_a_killed_workers_attempts_end_under_a_name_a_reload_took_away(
    policy_file: Path, tmp_path: Path
) -> None:
    """The supervisor ended a killed worker's attempts under the running policy's
    upstream names only: one begun under a name a reload had renamed counted
    as under way for good, and again once the name came back."""
    with stalled_attempt(policy_file, tmp_path) as stall:
        stalled = stall.policy.read_text()
        to_healthy = (f"port: {stall.stalling.port}\n", f"port: {stall.healthy.port}\n")
        renamed = stalled.replace("  stalled:\n", "  renamed:\n").replace(*to_healthy)
        stall.policy.write_text(renamed.replace("upstream: stalled\n", "upstream: renamed\n"))
        stall.relay.signal(signal.SIGHUP)
        stall.relay.wait_reloaded(1)
        stall.kill_workers()
        stall.healthy.sink.wait(1, timeout=30)  # sent again, under the new name
        stall.policy.write_text(stalled.replace(*to_healthy))
        stall.relay.signal(signal.SIGHUP)
        stall.relay.wait_reloaded(2)
        assert _under_way(stall.metrics, "stalled") == 0
