"""The relay's SMTP side on its own event loop thread, and clients to talk to it.

Running the server in a thread lets the tests use ordinary blocking clients
(smtplib, raw sockets, swaks) exactly as an ERP would.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relay.errors import SmtpReply
from relay.ingress import Ingress, bind, start
from relay.ingress.authlimit import AuthFailures
from relay.ingress.clientlimit import ClientRow
from relay.ingress.diskspace import DiskGuard
from relay.policy.model import Listener, Policy
from relay.submission import Submission
from relay.tally import TallyRow
from tests.minimal_policy import policy as make_policy

T = TypeVar("T")
TIMEOUT = 10.0


@dataclass
class Recorder:
    """A stand-in for ``relay.pipeline.process`` that records what it is given."""

    reply: str = "250 2.0.0 Ok: queued as TEST"
    error: BaseException | None = None
    delay: float = 0.0
    calls: list[tuple[Policy, Submission]] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, policy: Policy, submission: Submission) -> str:
        self.calls.append((policy, submission))
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.error is not None:
                raise self.error
            return self.reply
        finally:
            self.finished.set()

    @property
    def submissions(self) -> list[Submission]:
        return [s for _, s in self.calls]


class Relay:
    def __init__(
        self,
        listeners: list[Listener],
        process: Recorder | None = None,
        policy: Policy | None = None,
        failures: AuthFailures | None = None,
        disk: DiskGuard | None = None,
        clients: ClientRow | None = None,
        tally: TallyRow | None = None,
    ) -> None:
        self.process = process or Recorder()
        self.disk = disk
        self.clients = clients  # open connections counted (``max_connections_per_client``)
        self.tally = tally  # the counts for the metrics
        self.refused: list[tuple[Submission, SmtpReply]] = []  # what would go on record
        # failed logins answered at once unless a test asks for the real delay
        self.failures = failures or AuthFailures(delay=0.0)
        self.policy = policy or make_policy(tuple(listeners))
        self.listeners = listeners
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.ingress: Ingress | None = None

    def current_policy(self) -> Policy:
        return self.policy

    async def _refused(self, submission: Submission, reply: SmtpReply) -> None:
        self.refused.append((submission, reply))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> Relay:
        self.thread.start()
        self.ingress = self.call(
            start(
                self.listeners,
                self.current_policy,
                self.process,
                bind(self.listeners),
                self.failures,
                refused=self._refused,
                disk=self.disk,
                clients=self.clients,
                tally=self.tally,
            )
        )
        return self

    @property
    def port(self) -> int:
        assert self.ingress is not None
        return self.ingress.bound()[0][2]

    def close(self, grace: float = 2.0) -> None:
        if self.ingress is not None:
            self.call(self.ingress.close(grace), timeout=grace + TIMEOUT)
            self.ingress = None

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()


class Raw:
    """A byte-exact SMTP client for what smtplib refuses to send."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buffer = b""
        self.greeting = self.reply()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> list[str]:
        """All lines of one (possibly multi-line) reply."""
        lines = [self.line().decode()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self.line().decode())
        return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, command: bytes) -> str:
        self.send(command + b"\r\n")
        return self.reply()[-1]

    def ehlo(self) -> list[str]:
        self.send(b"EHLO client.example\r\n")
        return self.reply()

    def envelope(self, mail_from: bytes = b"erp@acme.example", *rcpts: bytes) -> None:
        self.ehlo()
        assert self.cmd(b"MAIL FROM:<" + mail_from + b">").startswith("250")
        for rcpt in rcpts or (b"one@example.org",):
            assert self.cmd(b"RCPT TO:<" + rcpt + b">").startswith("250")

    def closed(self) -> bool:
        """True when the server has closed the connection (and sent nothing more)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def swaks(port: int, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--timeout", "20", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
