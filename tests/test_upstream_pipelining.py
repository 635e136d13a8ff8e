"""Pipelined transactions (RFC 2920) against a scripted server on loopback.

The server offers PIPELINING and says nothing about a transaction until the
whole command group, up to DATA, has arrived: a client that waited for each
reply before the next command would never get one. Its replies are scripted,
so the odd ones real servers send can be tried too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
import uvloop
from aiosmtpd.controller import Controller

from relay.policy.model import SmtpUpstream, TlsMode
from relay.upstream import pipelining, replies, smtp, transaction
from relay.upstream.pool import Pool
from tests.certs import make_certs, server_context
from tests.sink import Sink, free_port

MESSAGE = b"From: a@example.org\r\nSubject: pipelined\r\n\r\n.dot\r\nbody\r\n"
RCPTS = ["one@example.org", "two@example.org"]
OK = [b"250 2.1.0 sender ok\r\n", b"250 2.1.5 one ok\r\n", b"250 2.1.5 two ok\r\n", b"354 go\r\n"]


@dataclass
class Script:
    """``replies`` answer RSET (when reset), MAIL, each RCPT and DATA, in order."""

    replies: list[bytes]
    final: bytes | None = b"250 2.0.0 queued as X\r\n"  # None: the dot gets no answer
    byte_by_byte: bool = False
    pipelining: bool = True  # else PIPELINING is not offered and each command gets its reply
    after: str = "serve"  # then (after the message, if 354): "serve", "hang up" or "silence"
    groups: list[bytes] = field(default_factory=list)
    sections: list[bytes] = field(default_factory=list)
    later: list[bytes] = field(default_factory=list)  # commands after the transaction
    ehlo: bytes | None = None  # else EHLO is refused with this, and HELO (then) accepted
    greetings: list[bytes] = field(default_factory=list)
    pause: float = 0.0  # seconds before each reply of the group

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Closes its side whatever the script did: Python 3.12's streams keep the
        writer, so a connection left open held ``Server.wait_closed`` for good."""
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        self.greetings.append(await reader.readline())
        if self.ehlo is not None:
            writer.write(self.ehlo)
            self.greetings.append(await reader.readline())
            writer.write(b"250 scripted\r\n")
        else:
            offer = b"250-PIPELINING\r\n" if self.pipelining else b""
            writer.write(b"250-scripted\r\n" + offer + b"250-SIZE 100000\r\n250 8BITMIME\r\n")
        if self.pipelining:
            self.groups.append(await reader.readuntil(b"DATA\r\n"))
            await self._say(writer, self.replies)
        else:
            for reply in self.replies:
                if not await reader.readline():
                    return
                await self._say(writer, [reply])
        if self.replies and self.replies[-1].startswith(b"354"):
            lines = [await reader.readline()]
            while lines[-1] not in (b".\r\n", b""):
                lines.append(await reader.readline())
            if lines[-1] == b".\r\n":
                self.sections.append(b"".join(lines))
                if self.final is not None:
                    writer.write(self.final)
        if self.after == "hang up":
            writer.close()
            return
        if self.after == "silence":
            while await reader.read(4096):
                pass
            return
        while line := await reader.readline():
            self.later.append(line)
            writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")

    async def _say(self, writer: asyncio.StreamWriter, replies: list[bytes]) -> None:
        for reply in replies:
            await asyncio.sleep(self.pause)
            pieces = [reply[i : i + 1] for i in range(len(reply))] if self.byte_by_byte else [reply]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()


@contextlib.asynccontextmanager
async def connected(
    script: Script, timeout: float = 5.0, tls: ssl.SSLContext | None = None
) -> AsyncIterator[aiosmtplib.SMTP]:
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, use_tls=tls is not None,
        validate_certs=False, timeout=timeout,
    )  # fmt: skip
    await client.connect()
    try:
        yield client
    finally:
        client.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def send(
    client: aiosmtplib.SMTP, timeout: float = 5.0, reset: bool = False
) -> tuple[dict, str]:
    return await transaction.send(client, "b@example.net", RCPTS, MESSAGE, timeout, reset)


async def test_the_commands_go_in_one_group_and_replies_may_come_byte_by_byte() -> None:
    multiline = [b"250-sender\r\n250-is\r\n250 fine\r\n", *OK[1:]]
    script = Script(multiline, byte_by_byte=True)
    async with connected(script) as client:
        refused, reply = await send(client)
        await client.rset()  # aiosmtplib reads its own replies again afterwards
        await client.quit()
    assert (refused, reply) == ({}, "2.0.0 queued as X")
    size = len(MESSAGE)
    assert script.groups == [
        b"MAIL FROM:<b@example.net> SIZE=%d\r\n" % size
        + b"RCPT TO:<one@example.org>\r\nRCPT TO:<two@example.org>\r\nDATA\r\n"
    ]
    assert script.sections == [MESSAGE.replace(b"\r\n.dot", b"\r\n..dot") + b".\r\n"]
    assert script.later == [b"RSET\r\n", b"QUIT\r\n"]


async def test_a_reused_connections_rset_goes_first_in_the_group() -> None:
    script = Script([b"250 2.0.0 reset\r\n", *OK])
    async with connected(script) as client:
        assert await send(client, reset=True) == ({}, "2.0.0 queued as X")
    assert script.groups[0].startswith(b"RSET\r\nMAIL FROM:<b@example.net> ")
    assert len(script.sections) == 1


@pytest.mark.parametrize(
    "script",
    [
        Script([b"502 5.5.1 not now\r\n", *OK]),
        Script([], after="hang up"),
    ],
    ids=["refused", "hung-up"],
)
async def test_a_failed_rset_means_stale_and_nothing_is_sent(script: Script) -> None:
    async with connected(script) as client:
        with pytest.raises(pipelining.Stale):
            await send(client, reset=True)
        await asyncio.sleep(0.05)
        assert not client.is_connected
    assert script.sections == []


async def test_no_reply_to_rset_means_stale() -> None:
    async with connected(Script([])) as client:
        with pytest.raises(pipelining.Stale):
            await send(client, timeout=0.3, reset=True)


async def test_a_refused_recipient_is_reported_and_the_others_get_the_message() -> None:
    script = Script([OK[0], b"550 5.1.1 no such user\r\n", OK[2], OK[3]])
    async with connected(script) as client:
        refused, _ = await send(client)
    assert {a: (r.code, r.message) for a, r in refused.items()} == {
        "one@example.org": (550, "5.1.1 no such user")
    }
    assert len(script.sections) == 1


async def test_data_started_with_every_recipient_refused_is_ended_empty() -> None:
    """RFC 2920 expects 503 to DATA then; after a 354 a lone dot goes, not the message."""
    refusal = b"450 4.2.1 try later\r\n"
    script = Script([OK[0], refusal, refusal, OK[3]], final=b"554 5.5.1 no valid recipients\r\n")
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await send(client)
        assert client.is_connected
    assert [r.code for r in refused.value.recipients] == [450, 450]
    assert script.sections == [b".\r\n"]


async def test_a_refused_sender_raises_and_keeps_the_connection() -> None:
    need = b"503 5.5.1 need MAIL\r\n"
    script = Script([b"550 5.7.1 sender refused\r\n", need, need, need])
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await send(client)
        assert client.is_connected
    assert (refused.value.code, refused.value.message) == (550, "5.7.1 sender refused")
    assert script.later == [b"RSET\r\n"]  # and nothing of the message after the group


async def test_data_started_without_a_sender_closes_the_connection() -> None:
    script = Script([b"550 5.7.1 sender refused\r\n", OK[1], OK[2], OK[3]])
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            await send(client)
        await asyncio.sleep(0.05)
        assert not client.is_connected  # out of step: never reused


async def test_a_refused_data_command_raises_its_reply() -> None:
    script = Script([*OK[:3], b"451 4.3.0 not now\r\n"])
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(client)
    assert (refused.value.code, refused.value.message) == (451, "4.3.0 not now")


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-at-a-time", "pipelined"])
async def test_a_3xx_to_data_other_than_354_is_out_of_step(pipelined: bool) -> None:
    """Only a 4xx or 5xx to DATA refuses the message: another 3xx is no answer
    DATA gets, and taken for a refusal the connection was kept, out of step."""
    script = Script([*OK[:3], b"334 what\r\n"], final=None, pipelining=pipelined)
    async with connected(script) as client:
        with pytest.raises(pipelining.OutOfStep):
            await send(client)
        await asyncio.sleep(0.05)
        assert not client.is_connected
    assert script.sections == []


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-at-a-time", "pipelined"])
async def test_a_multiline_reply_keeps_its_lines(pipelined: bool) -> None:
    """As aiosmtplib gives them, one line each: the reply's enhanced code is then
    read once, not kept in the middle of the text the audit log records."""
    final = b"250-2.0.0 Ok\r\n250 2.0.0 queued as X\r\n"
    script = Script(list(OK), final=final, pipelining=pipelined)
    async with connected(script) as client:
        refused, reply = await send(client)
    assert (refused, reply) == ({}, "2.0.0 Ok\n2.0.0 queued as X")
    assert replies.line(250, reply) == "250 2.0.0 Ok queued as X"


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-at-a-time", "pipelined"])
async def test_a_multiline_reply_longer_than_smtp_allows_is_no_reply(pipelined: bool) -> None:
    """Each line short, the reply without end: read on, it was held in memory whole."""
    endless = b"".join(b"250-" + b"x" * 100 + b"\r\n" for _ in range(400)) + b"250 ok\r\n"
    script = Script([endless, *OK[1:]], pipelining=pipelined)
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPResponseException) as bad:
            await send(client)
    assert (bad.value.code, bad.value.message) == (-1, "Response too long")
    assert script.sections == []


async def test_a_refused_message_raises_the_final_reply() -> None:
    script = Script(OK, final=b"554 5.6.0 content refused\r\n")
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(client)
    assert (refused.value.code, refused.value.message) == (554, "5.6.0 content refused")


async def test_a_malformed_reply_closes_the_connection() -> None:
    script = Script([b"hello there\r\n"])
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPResponseException) as bad:
            await send(client)
        await asyncio.sleep(0.05)
        assert not client.is_connected
    assert bad.value.code == -1 and "Malformed" in bad.value.message


async def test_a_server_hanging_up_mid_transaction_is_a_lost_connection() -> None:
    script = Script([], after="hang up")
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await send(client)
        await asyncio.sleep(0.05)
        assert client.protocol is None  # aiosmtplib was told the connection ended
    assert len(script.groups) == 1  # it had the whole group, and said nothing


REFUSED_THEN_GONE = {
    "sender-554": ([b"554 5.7.1 sender refused\r\n"], None),
    "sender-421": ([b"421 4.7.0 closing\r\n"], None),
    "every-recipient": ([OK[0], b"550 5.1.1 no one\r\n", b"550 5.1.1 no two\r\n"], None),
    "every-recipient-yet-354": (
        [OK[0], b"550 5.1.1 no one\r\n", b"550 5.1.1 no two\r\n", OK[3]],
        None,
    ),
    "one-recipient": ([OK[0], b"550 5.1.1 no one\r\n"], None),
    "nothing": ([], None),
    "everything-but-data": (OK[:3], None),
}


@pytest.mark.parametrize("after", ["hang up", "silence"])
@pytest.mark.parametrize("script", REFUSED_THEN_GONE.values(), ids=REFUSED_THEN_GONE.keys())
async def test_replies_then_a_hang_up_or_silence_read_as_one_at_a_time(
    script: tuple[list[bytes], bytes | None], after: str
) -> None:
    """A refusal the server made before it hung up or went silent is what the
    message gets, pipelined or not; without one, the connection was lost or timed out."""
    outcomes = []
    for pipelined in (False, True):
        replies, final = script
        server = Script(list(replies), final=final, pipelining=pipelined, after=after)
        async with connected(server) as client:
            with pytest.raises(aiosmtplib.SMTPException) as failed:
                await send(client, timeout=0.5)
            await asyncio.sleep(0.05)
            assert not (pipelined and client.is_connected)  # not kept after any of these
        outcomes.append(_described(failed.value))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(
    "replies",
    [
        [OK[0], b"550 5.1.1 two unknown\r\n", OK[3]],  # one RCPT's reply left out
        [OK[0], OK[3], b"550 5.1.1 two unknown\r\n", OK[3]],
    ],
    ids=["one-missing", "354-to-a-rcpt"],
)
async def test_a_354_before_datas_reply_is_out_of_step_not_a_refusal(
    replies: list[bytes],
) -> None:
    """Taken by position, the replies gave one@ two@'s 550, failing it for good
    (the server had taken it), and two@ the 354."""
    server = Script(replies, final=None, after="silence")
    async with connected(server) as client:
        with pytest.raises(aiosmtplib.SMTPException) as failed:
            await send(client, timeout=0.5)
        await asyncio.sleep(0.05)
        assert not client.is_connected
    assert not isinstance(failed.value, aiosmtplib.SMTPRecipientsRefused)
    assert isinstance(failed.value, aiosmtplib.SMTPReadTimeoutError | pipelining.OutOfStep)
    assert getattr(failed.value, "code", -1) == aiosmtplib.SMTPStatus.invalid_response
    assert server.sections == []


AGAIN = b"250 2.1.0 sender ok again\r\n"
NO_TWO = b"550 5.1.1 two unknown\r\n"


@pytest.mark.parametrize(
    ("replies", "pipelined", "pause"),
    [
        ([OK[0] + AGAIN, OK[1], NO_TWO, OK[3]], False, 0.0),
        ([OK[0] + AGAIN + OK[1] + NO_TWO + OK[3]], True, 0.0),  # in one write
        ([OK[0], AGAIN, *OK[1:]], True, 0.1),  # DATA's 354 comes after the rest
    ],
    ids=["one-at-a-time", "pipelined", "pipelined-354-later"],
)
async def test_a_reply_more_than_the_commands_before_the_354_is_out_of_step(
    replies: list[bytes], pipelined: bool, pause: float
) -> None:
    """MAIL answered twice put every later reply one command behind: DATA got
    two@'s 550, which failed the message for one@ and two@ for good, or
    one@'s 250, taken for a refusal; either way its 354 was still to come, and
    the RSET that followed went into the message and waited a whole timeout."""
    server = Script(replies, final=None, pipelining=pipelined, after="silence", pause=pause)
    async with connected(server) as client:
        began = asyncio.get_running_loop().time()
        with pytest.raises(pipelining.OutOfStep):
            await send(client, timeout=5.0)
        assert asyncio.get_running_loop().time() - began < 2.5
        await asyncio.sleep(0.05)
        assert not client.is_connected
    assert server.sections == []


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-at-a-time", "pipelined"])
async def test_a_final_reply_longer_than_aiosmtplib_reads_is_still_a_delivery(
    pipelined: bool,
) -> None:
    """aiosmtplib takes a line over 8,192 bytes for no reply: a smarthost's long
    250 to the final dot made the message go again at every retry, then expire
    with a notice that it had failed."""
    final = b"250 2.0.0 " + b"x" * 9000 + b"\r\n"
    server = Script(list(OK), final=final, pipelining=pipelined)
    async with connected(server) as client:
        refused, reply = await send(client)
        assert client.is_connected  # in step: kept for the next message
    assert (refused, reply) == ({}, "2.0.0 " + "x" * 9000)
    assert len(server.sections) == 1


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-at-a-time", "pipelined"])
async def test_a_421_to_a_recipient_ends_the_transaction_before_the_message(
    pipelined: bool,
) -> None:
    """The server is closing: the replies after its 421 are not waited on to send
    the message (pipelined, they came in the group all the same), and the others
    are retried with the connection lost, the 421'd one with its own reply."""
    closing = b"421 4.7.0 closing\r\n"
    server = Script([OK[0], closing, OK[2], OK[3]], pipelining=pipelined)
    async with connected(server) as client:
        with pytest.raises(pipelining.Unfinished) as failed:
            await send(client)
        await asyncio.sleep(0.05)
        assert not client.is_connected
    assert isinstance(failed.value.error, aiosmtplib.SMTPServerDisconnected)
    assert {a: r.code for a, r in failed.value.refused.items()} == {"one@example.org": 421}
    assert server.sections == []


GOES_ON = {
    "sender-421": Script([b"421 4.7.0 closing\r\n", *[b"503 5.5.1 no\r\n"] * 3]),
    "final-421": Script(list(OK), final=b"421 4.7.0 closing\r\n"),
}


@pytest.mark.parametrize("script", GOES_ON.values(), ids=GOES_ON.keys())
async def test_a_421_closes_the_connection_as_aiosmtplib_does(script: Script) -> None:
    """The server says it is closing but has not yet: the connection is not kept."""
    outcomes = []
    for pipelined in (False, True):
        server = Script(list(script.replies), final=script.final, pipelining=pipelined)
        async with connected(server) as client:
            with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
                await send(client)
            await asyncio.sleep(0.05)
            assert not client.is_connected
        outcomes.append(_described(failed.value))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] == [421]


@pytest.mark.parametrize("after", ["hang up", "silence"])
@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_refusal_before_a_hang_up_or_silence_is_kept_for_its_recipient(
    pipelined: bool, after: str
) -> None:
    """one@ was refused, two@ never answered: one@'s 550 stands for it, while
    two@ has only the connection lost or the silence; both had the latter."""
    refused = [OK[0], b"550 5.1.1 no one\r\n"]
    server = Script(refused, final=None, pipelining=pipelined, after=after)
    async with connected(server) as client:
        with pytest.raises(pipelining.Unfinished) as failed:
            await send(client, timeout=0.5)
    said = {address: (r.code, r.message) for address, r in failed.value.refused.items()}
    assert said == {"one@example.org": (550, "5.1.1 no one")}
    lost = aiosmtplib.SMTPServerDisconnected if after == "hang up" else aiosmtplib.SMTPTimeoutError
    assert isinstance(failed.value.error, lost)


def _described(error: aiosmtplib.SMTPException) -> tuple[str, list[int]]:
    if isinstance(error, pipelining.Unfinished):
        name, codes = _described(error.error)
        return f"Unfinished({name})", [r.code for r in error.refused.values()] + codes
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        return type(error).__name__, [r.code for r in error.recipients]
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return type(error).__name__, [error.code]
    return type(error).__name__, []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_tls_connection_lost_mid_group_is_stale_and_aiosmtplib_hears_of_it(
    tmp_path: Path, loop: str
) -> None:
    """A lost TLS transport cannot take back aiosmtplib's protocol (asyncio's raises
    if asked); the end of the connection must reach aiosmtplib all the same."""
    certs = make_certs(tmp_path)
    context = server_context(certs)

    async def told_of_the_end() -> bool:
        async with connected(Script([], after="hang up"), tls=context) as client:
            with pytest.raises(pipelining.Stale):
                await send(client, reset=True)
            await asyncio.sleep(0.1)
            return client.protocol is None  # its connection_lost ran: it let go

    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(told_of_the_end())


async def test_the_timeout_is_for_each_reply_of_the_group() -> None:
    """A smarthost that takes a while over each RCPT (recipient verification,
    a policy service) was given one timeout for the whole group's replies,
    and never got a message with enough recipients."""
    script = Script(OK, pause=0.25)
    async with connected(script) as client:
        assert await send(client, timeout=0.6) == ({}, "2.0.0 queued as X")


async def test_no_answer_is_a_timeout_and_closes_the_connection() -> None:
    script = Script([OK[0]])  # then silence
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            await send(client, timeout=0.3)
        await asyncio.sleep(0.05)
        assert not client.is_connected


def test_starttls_connections_are_reused_pipelined_under_uvloop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon runs uvloop: its TLS transport must hand over to the reader and back too."""
    certs = make_certs(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    context = server_context(certs)
    sink = Sink(pipelining=True)
    controller = Controller(
        sink, hostname="127.0.0.1", port=free_port(), tls_context=context,
        require_starttls=True, server_hostname="localhost", ready_timeout=10,
    )  # fmt: skip
    target = SmtpUpstream(
        name="smarthost", host="127.0.0.1", port=controller.port, tls=TlsMode.STARTTLS,
        username=None, password_file=None, password_env=None, timeout=5.0,
    )  # fmt: skip

    async def three() -> int:
        pool = Pool()
        for n in range(3):
            await smtp.send(target, f"m{n}@p.example", ["one@example.org"], MESSAGE, pool=pool)
        await pool.close()
        return pool.opened

    controller.start()
    try:
        assert uvloop.run(three()) == 1
    finally:
        controller.stop()
    assert [m.mail_from for m in sink.messages] == [f"m{n}@p.example" for n in range(3)]
    assert {m.data for m in sink.messages} == {MESSAGE}


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-at-a-time"])
async def test_reply_bytes_that_are_not_utf8_are_quoted_as_text(pipelined: bool) -> None:
    """A Latin-1 server's text once reached the notice and the spool as surrogates,
    which neither can write: the message was sent again at every scan, for ever."""
    script = Script(
        [OK[0], b"550 5.1.1 bo\xeete pleine\r\n", OK[2], OK[3]],
        final=b"250 2.0.0 re\xe7u \x1b[0m\r\n",
        pipelining=pipelined,
    )
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    target = SmtpUpstream(
        name="latin1", host="127.0.0.1", port=server.sockets[0].getsockname()[1],
        tls=TlsMode.NONE, username=None, password_file=None, password_env=None, timeout=5.0,
    )  # fmt: skip
    pool = Pool()
    try:
        result = await smtp.send(target, "b@example.net", RCPTS, MESSAGE, pool=pool)
    finally:
        await pool.close()
        server.close()
    assert result.refused == {"one@example.org": "550 5.1.1 bo\ufffdte pleine"}
    assert result.reply == "250 2.0.0 re\ufffdu  [0m"  # the escape character a space
    for text in (result.reply, *result.refused.values()):
        text.encode("utf-8")


async def test_a_server_that_does_not_know_ehlo_is_greeted_with_helo() -> None:
    """RFC 5321 3.2: such a smarthost got mail only over a connection the pool
    happened to reset, never over a new one."""
    script = Script(OK, ehlo=b"500 5.5.1 EHLO not understood\r\n", pipelining=False)
    async with connected(script) as client:
        assert await send(client) == ({}, "2.0.0 queued as X")
    assert [line.split(b" ")[0] for line in script.greetings] == [b"EHLO", b"HELO"]
    assert len(script.sections) == 1


async def test_an_ehlo_refused_for_another_reason_is_not_answered_with_helo() -> None:
    script = Script(OK, ehlo=b"554 5.7.1 go away\r\n", pipelining=False)
    async with connected(script) as client:
        with pytest.raises(aiosmtplib.SMTPHeloError):
            await send(client)
    assert script.greetings[0].startswith(b"EHLO")
    assert not any(line.startswith(b"HELO") for line in script.greetings)
    assert script.sections == []
