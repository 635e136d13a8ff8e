"""Sending the message itself to hostile upstreams on loopback, through ``deliver.attempt``.

The upstream's socket takes little into its receive buffer, as a slow link
would: what it has not read stays with the relay, whose progress the tests
can then hold back or let go. Each message is checked for whether its
final dot reached the upstream, which is what makes it a delivery there.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop

from relay import deliver
from relay.engine import Attempt
from relay.policy.model import SmtpUpstream, TlsMode
from relay.upstream import smtp
from relay.upstream.pool import Pool
from tests.sink import free_port

BIG = b"From: a@example.org\r\nSubject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2000
SMALL = b"From: a@example.org\r\nSubject: small\r\n\r\nbody\r\n"
END = b"\r\n.\r\n"
RCPT = "one@example.org"
WAIT = 30.0  # for what takes a few seconds at most


@dataclass
class Hostile:
    """Answers each command as it comes; after the 354, ``taking`` reads the message."""

    taking: Callable[[Hostile, asyncio.StreamReader], Awaitable[bytes]]
    pipelining: bool = True
    final: bytes = b"250 2.0.0 queued\r\n"
    start: bytes = b"354 go\r\n"
    received: list[bytes] = field(default_factory=list)  # each message, as far as it came
    started: asyncio.Event = field(default_factory=asyncio.Event)
    given_up: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        writer.write(b"220 hostile ESMTP\r\n")
        try:
            while line := await reader.readline():
                writer.write(self._reply(line))
                if line.upper().startswith(b"DATA"):
                    self.started.set()
                    self.received.append(await self.taking(self, reader))
                    if self.received[-1].endswith(END):
                        writer.write(self.final)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _reply(self, line: bytes) -> bytes:
        command = line[:4].upper()
        if command == b"EHLO":
            offer = b"250-PIPELINING\r\n" if self.pipelining else b""
            return b"250-hostile\r\n" + offer + b"250 8BITMIME\r\n"
        if command == b"DATA":
            return self.start
        return b"221 bye\r\n" if command == b"QUIT" else b"250 ok\r\n"


async def at_once(server: Hostile, reader: asyncio.StreamReader) -> bytes:
    data = b""
    while not data.endswith(END) and (chunk := await reader.read(65536)):
        data += chunk
    return data


async def slowly(server: Hostile, reader: asyncio.StreamReader) -> bytes:
    """A bit every half second for 3 s, longer than ``data_timeout``, then the rest."""
    data = b""
    for _ in range(6):
        await asyncio.sleep(0.5)
        data += await reader.read(65536)
    return data + await at_once(server, reader)


async def only_once_given_up(server: Hostile, reader: asyncio.StreamReader) -> bytes:
    """Nothing until the relay gave the attempt up, then whatever still comes."""
    await asyncio.wait_for(server.given_up.wait(), WAIT)
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def refusing_midway(server: Hostile, reader: asyncio.StreamReader) -> bytes:
    """A refusal once 200 KB came (too large), then the rest read to the final dot,
    as RFC 5321 has a server do: read on at once, the rest could all come in
    before the relay, on the same busy loop, had read the refusal."""
    return await _answering_midway(server, reader, b"552 5.3.4 message size exceeds fixed limit")


async def accepting_midway(server: Hostile, reader: asyncio.StreamReader) -> bytes:
    """A 250 once 200 KB came, as a server out of step with the message would say it."""
    return await _answering_midway(server, reader, b"250 2.0.0 queued")


async def _answering_midway(server: Hostile, reader: asyncio.StreamReader, reply: bytes) -> bytes:
    data = b""
    while len(data) < 200_000 and (chunk := await reader.read(65536)):
        data += chunk
    assert server.writer is not None
    server.writer.write(reply + b"\r\n")
    await server.writer.drain()
    await asyncio.sleep(0.2)  # a slow server's pause: the relay has the refusal by then
    try:
        while not data.endswith(END) and (
            chunk := await asyncio.wait_for(reader.read(65536), WAIT)
        ):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def hanging_up_midway(server: Hostile, reader: asyncio.StreamReader) -> bytes:
    """200 KB of the message, then the connection closed: the rest, its final
    dot with it, never reaches the upstream."""
    data = b""
    while len(data) < 200_000 and (chunk := await reader.read(65536)):
        data += chunk
    assert server.writer is not None
    server.writer.close()
    return data


async def attempt(
    server: Hostile, data: bytes, cut_off: bool = False, **settings: float
) -> Attempt | None:
    """One attempt at ``server``; with ``cut_off`` cancelled (the relay's stop) once
    the message is being sent, and None."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # before listen: a slow link
    listener.bind(("127.0.0.1", free_port()))
    hostile = await asyncio.start_server(server.serve, sock=listener)
    target = SmtpUpstream(
        name="smarthost", host="127.0.0.1", port=listener.getsockname()[1], tls=TlsMode.NONE,
        username=None, password_file=None, password_env=None, **settings,
    )  # fmt: skip
    sending = asyncio.ensure_future(deliver.attempt(target, "b@p.example", [RCPT], data))
    try:
        if cut_off:
            await asyncio.wait_for(server.started.wait(), WAIT)
            await asyncio.sleep(0.2)
            sending.cancel()
        try:
            return await asyncio.wait_for(sending, WAIT)
        except asyncio.CancelledError:
            return None
    finally:
        server.given_up.set()
        await asyncio.sleep(0.5)  # for what the upstream still gets
        hostile.close()


@pytest.fixture(autouse=True)
def unpooled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp, "default_pool", lambda: Pool(max_idle_per_key=0))


def run(loop: str, work: Awaitable[None]) -> None:
    (uvloop.run if loop == "uvloop" else asyncio.run)(work)  # type: ignore[arg-type]


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
WAYS = pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])


@LOOPS
@WAYS
def test_a_message_slower_to_send_than_data_timeout_is_delivered_once(
    pipelining: bool, loop: str
) -> None:
    """``data_timeout`` is for the reply once the message has left: counted from
    its sending, a slow link timed out every attempt, and each one delivered."""

    async def once() -> None:
        server = Hostile(slowly, pipelining)
        sent = await attempt(server, BIG, timeout=3.0, data_timeout=1.5)
        assert sent is not None
        assert sent.replies == {RCPT: (250, "250 2.0.0 queued")}
        assert [part.endswith(END) for part in server.received] == [True]

    run(loop, once())


@LOOPS
@WAYS
@pytest.mark.parametrize("cut_off", [False, True], ids=["stalled", "stopped"])
def test_a_message_given_up_on_while_it_is_sent_never_gets_its_final_dot(
    pipelining: bool, loop: str, cut_off: bool
) -> None:
    """Closed gracefully, the connection sent the rest of the message after the
    relay had given it up, final dot and all: the upstream delivered it, and
    again at every retry. A stall is a ``timeout`` with none of it taken."""

    async def given_up() -> None:
        server = Hostile(only_once_given_up, pipelining)
        sent = await attempt(server, BIG, cut_off, timeout=1.0, data_timeout=2.0)
        assert len(server.received) == 1 and not server.received[0].endswith(END)
        if not cut_off:
            assert sent is not None
            code, reply = sent.replies[RCPT]
            assert code == 451 and reply.endswith(
                "none of the message taken for 1s; it was not sent in full (sending)"
            )

    run(loop, given_up())


@LOOPS
@WAYS
def test_a_refusal_while_the_message_is_sent_is_its_reply(pipelining: bool, loop: str) -> None:
    """Taken for a reply no command asked for, a 552 for a message too large
    was deferred and the whole message sent again at every retry; the rest of
    it does not go, so the refusal stands and nothing is delivered."""

    async def refused() -> None:
        server = Hostile(refusing_midway, pipelining, final=b"250 2.0.0 queued after all\r\n")
        sent = await attempt(server, BIG, timeout=5.0, data_timeout=5.0)
        assert sent is not None
        assert sent.replies == {RCPT: (552, "552 5.3.4 message size exceeds fixed limit")}
        assert len(server.received) == 1 and not server.received[0].endswith(END)

    run(loop, refused())


@WAYS
def test_a_250_while_the_message_is_sent_is_no_delivery(pipelining: bool) -> None:
    """The upstream has only part of the message, which then does not go on: taken
    for its delivery, the rest of it was lost and the ERP told it was sent."""

    async def accepted_early() -> None:
        server = Hostile(accepting_midway, pipelining)
        sent = await attempt(server, BIG, timeout=5.0, data_timeout=5.0)
        assert sent is not None
        ((code, reply),) = sent.replies.values()
        assert code == 451
        assert "250 2.0.0 queued before the end of the message had left" in reply
        assert len(server.received) == 1 and not server.received[0].endswith(END)

    run("uvloop", accepted_early())


@LOOPS
@WAYS
def test_a_connection_lost_while_the_message_is_sent_is_a_plain_deferral(
    pipelining: bool, loop: str
) -> None:
    """A hang-up before the final dot had left was reported as one after it,
    "it may arrive twice", though the upstream cannot have the message."""

    async def lost() -> None:
        server = Hostile(hanging_up_midway, pipelining)
        sent = await attempt(server, BIG, timeout=5.0, data_timeout=5.0)
        assert sent is not None
        code, reply = sent.replies[RCPT]
        assert (code, reply.split(" ")[1]) == (451, "4.4.2")
        assert reply.endswith(
            "connection lost while the message was sent; it was not sent in full (sending)"
        )
        assert len(server.received) == 1 and not server.received[0].endswith(END)

    run(loop, lost())


async def test_a_reply_more_than_the_group_asked_for_defers_the_message_unsent() -> None:
    """A stray 250 after the 354 was taken for the message's reply: delivered,
    while the server refused it."""
    server = Hostile(at_once, start=b"354 go\r\n250 2.0.0 stray\r\n", final=b"554 5.7.1 spam\r\n")
    sent = await attempt(server, SMALL, timeout=5.0, data_timeout=5.0)
    assert sent is not None
    code, reply = sent.replies[RCPT]
    assert (code, reply.split(" ")[1]) == (451, "4.4.0")
    assert "replies out of step with the commands" in reply
    assert not any(part.endswith(END) for part in server.received)


@WAYS
async def test_a_reply_after_the_final_one_leaves_the_message_delivered(
    pipelining: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A smarthost that says it closes the connection in the same write as its
    250 to the message had it deferred "it may arrive twice", and sent again at
    every retry. What follows the final reply only keeps the connection from
    being used again."""
    pool = Pool()
    monkeypatch.setattr(smtp, "default_pool", lambda: pool)
    final = b"250 2.0.0 queued as ABC\r\n421 4.3.2 closing connection\r\n"
    server = Hostile(at_once, pipelining, final=final)
    try:
        sent = await attempt(server, SMALL, timeout=5.0, data_timeout=5.0)
        assert pool.idle_count() == 0  # closed, not kept for the next message
    finally:
        await pool.close()
    assert sent is not None
    assert sent.replies == {RCPT: (250, "250 2.0.0 queued as ABC")}
    assert [part.endswith(END) for part in server.received] == [True]


@dataclass
class Mute(Hostile):
    """Greets and answers EHLO, then nothing."""

    def _reply(self, line: bytes) -> bytes:
        return super()._reply(line) if line[:4].upper() == b"EHLO" else b""


@pytest.mark.parametrize(
    "server", [Mute(at_once), Hostile(at_once, final=b"")], ids=["envelope", "final-reply"]
)
async def test_a_timeout_around_a_send_gives_its_caller_a_timeout(server: Hostile) -> None:
    """``asyncio.timeout`` (Python 3.11) turns only a ``CancelledError`` itself into
    ``TimeoutError``: a subclass of it, which a send cut off raised to say how far
    its message got, reached the caller as a cancellation nobody had asked for."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    silent = await asyncio.start_server(server.serve, sock=listener)
    target = SmtpUpstream(
        name="smarthost", host="127.0.0.1", port=listener.getsockname()[1], tls=TlsMode.NONE,
        username=None, password_file=None, password_env=None, timeout=WAIT, data_timeout=WAIT,
    )  # fmt: skip
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await smtp.send(target, "b@p.example", [RCPT], SMALL)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
    finally:
        silent.close()


@dataclass
class Twice(Hostile):
    """Answers MAIL twice: every reply after it is one command behind."""

    def _reply(self, line: bytes) -> bytes:
        again = b"250 2.1.0 sender ok again\r\n" if line[:4].upper() == b"MAIL" else b""
        return super()._reply(line) + again


@WAYS
async def test_a_reply_more_than_asked_for_before_the_354_is_out_of_step(
    pipelining: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATA answered with the recipient's 250, the 354 still to come, was taken
    for a refusal of the message: the RSET that followed went into the message,
    and its reply was waited for a whole ``timeout``."""
    pool = Pool()
    monkeypatch.setattr(smtp, "default_pool", lambda: pool)
    server = Twice(at_once, pipelining)
    began = asyncio.get_running_loop().time()
    try:
        sent = await attempt(server, SMALL, timeout=10.0, data_timeout=10.0)
        assert pool.idle_count() == 0  # closed, not kept for the next message
    finally:
        await pool.close()
    assert asyncio.get_running_loop().time() - began < 5.0
    assert sent is not None
    code, reply = sent.replies[RCPT]
    assert (code, reply.split(" ")[1]) == (451, "4.4.0")
    assert "replies out of step with the commands" in reply
    assert not any(server.received)  # nothing of the message was sent


@WAYS
@pytest.mark.parametrize(
    ("final", "said"),
    [
        (b"251 2.0.0 queued as X\r\n", (250, "250 2.0.0 queued as X")),
        (b"Ok: queued as X\r\n", (451, "Malformed SMTP response line: Ok: queued as X")),
        (b"250-2.0.0 queued\r\n2.0.0 as X\r\n", (451, "Malformed SMTP response line: 2.0.0 as X")),
    ],
    ids=["251", "no-code", "bad-continuation"],
)
async def test_any_2xx_to_the_end_is_a_delivery_and_a_malformed_one_may_arrive_twice(
    pipelining: bool, final: bytes, said: tuple[int, str]
) -> None:
    """A 251 was retried, and the upstream got the message again; a malformed
    reply too, without a word that it might."""
    server = Hostile(at_once, pipelining, final=final)
    sent = await attempt(server, SMALL, timeout=5.0, data_timeout=5.0)
    assert sent is not None
    code, reply = sent.replies[RCPT]
    if code == 250:
        assert (code, reply) == said
    else:
        assert (code, reply.split(" ")[1]) == (451, "4.4.2")
        assert f"no valid reply to the end of the message ({said[1]}); it may arrive twice" in reply
    assert len(server.received) == 1
