"""A real SMTP server on loopback that records what it receives: the upstream in tests."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class RefusingRecipients:
    """aiosmtpd handler part shared by the test sinks: ``refuse`` maps a recipient
    to the reply it gets; ``taken`` to the reply it gets as it is accepted (a 251
    or 252); everyone else is accepted with 250. A 421 closes the connection
    after it, as a server saying it does. With ``pipelining`` the sink
    offers PIPELINING, as Postfix does (aiosmtpd reads pipelined commands but
    does not say so)."""

    refuse: dict[str, str] = field(default_factory=dict)
    pipelining: bool = False
    taken: dict[str, str] = field(default_factory=dict)
    most: int | None = None  # recipients taken per transaction, then ``over_most``
    over_most: str = "452 4.5.3 Error: too many recipients"  # as Postfix says it

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if address in self.refuse:
            if self.refuse[address].startswith("421"):
                # runs once the reply is written, which aiosmtpd does before it waits again
                asyncio.get_running_loop().call_soon(server.transport.close)
            return self.refuse[address]
        if self.most is not None and len(envelope.rcpt_tos) >= self.most:
            return self.over_most
        envelope.rcpt_tos.append(address)
        return self.taken.get(address, "250 OK")


@dataclass
class Sink(RefusingRecipients):
    """Records every message."""

    data_reply: str = "250 2.0.0 sink accepted"
    delay: float = 0.0  # seconds before answering DATA: a slow upstream
    rset_reply: str = "250 OK"
    messages: list[Received] = field(default_factory=list)
    resets: int = 0

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.resets += 1
        return self.rset_reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        if not self.data_reply.startswith("2"):
            return self.data_reply
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return self.data_reply

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        pause = threading.Event()
        for _ in range(int(timeout * 20)):
            if len(self.messages) >= count:
                return self.messages
            pause.wait(0.05)
        raise AssertionError(f"sink received {len(self.messages)} of {count} messages")


# Ports below the kernel's ephemeral range (32768 up): the kernel hands none of
# them out by itself, to a listener on port 0 or to a connection's own end.
# Each pytest-xdist worker (gw0, gw1, ...) has a range of its own.
FIRST_PORT = 20000
PORTS_PER_WORKER = 1500
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_next_port = itertools.count()


def free_port() -> int:
    """A port nothing is bound to, none other handed out by this run. The
    kernel's port 0 gave one test's port, before its relay listened on it, to
    another worker's test or to a connection's own end."""
    first = FIRST_PORT + (_WORKER % 8) * PORTS_PER_WORKER
    for _ in range(PORTS_PER_WORKER):
        port = first + next(_next_port) % PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))  # taken, or still in TIME_WAIT: the next
            except OSError:
                continue
            return port
    raise OSError(f"no free port from {first} to {first + PORTS_PER_WORKER - 1}")


class SinkServer:
    """Runs a Sink on 127.0.0.1 on a free port until stopped."""

    def __init__(self, sink: Sink | None = None, port: int | None = None) -> None:
        self.sink = sink or Sink()
        self.port = port or free_port()
        self.controller = Controller(
            self.sink, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=False, ready_timeout=10
        )

    def __enter__(self) -> SinkServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class _DsnSMTP(SMTP):
    """aiosmtpd knows no DSN parameters and refuses them (555): these take them
    off the MAIL command, for the handler to see, as a DSN server reads them."""

    async def smtp_MAIL(self, arg: str | None) -> None:
        words = (arg or "").split()
        dsn = [w for w in words if w.upper().startswith(("ENVID=", "RET="))]
        self.event_handler.dsn_options.append(dsn)
        await super().smtp_MAIL(" ".join(w for w in words if w not in dsn))


@dataclass
class DsnSink(Sink):
    """Offers DSN (RFC 3461) with ``offers``, and records each MAIL's DSN parameters."""

    offers: bool = True
    dsn_options: list[list[str]] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [*responses[:-1], "250-DSN", responses[-1]] if self.offers else responses


class _DsnController(Controller):
    def factory(self) -> SMTP:
        return _DsnSMTP(self.handler, **self.SMTP_kwargs)


class DsnSinkServer(SinkServer):
    """A SinkServer whose server reads DSN parameters."""

    def __init__(self, sink: DsnSink, port: int | None = None) -> None:
        super().__init__(sink, port)
        self.controller = _DsnController(
            self.sink, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=False, ready_timeout=10
        )


class ConnectionLimit(SMTP):
    """A smarthost that greets ``limit`` connections at once and answers the
    others ``421 4.7.0 Too many connections``, as one with a connection limit
    per client does; each connection's answer comes ``delays[n]`` seconds
    after it was taken, in the order they came (a reverse lookup, say), and
    its EHLO's ``ehlo_delay`` after it. The counts are the class's: each
    server a subclass of its own."""

    limit = 2
    delays: tuple[float, ...] = ()
    ehlo_delay = 0.0
    active = 0
    taken = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cls = type(self)
        cls.active += 1
        self._over = cls.active > self.limit
        self._delay = self.delays[cls.taken] if cls.taken < len(self.delays) else 0.0
        cls.taken += 1
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        type(self).active -= 1
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        await asyncio.sleep(self._delay)
        if self._over:
            await self.push("421 4.7.0 Too many connections")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_EHLO(self, hostname: str) -> None:
        await asyncio.sleep(self.ehlo_delay)
        await super().smtp_EHLO(hostname)
