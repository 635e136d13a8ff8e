"""MAIL, RCPT and DATA in one write to a server that offers PIPELINING (RFC 2920).

One reply at a time, a message to two recipients cost five round trips and
five wake-ups of the event loop, and aiosmtplib's reading of each reply was
the largest part of the relay's CPU after signing. aiosmtplib cannot read
several replies to one write (it drops what arrives while a reply waits to be
picked up), so for the length of a transaction a small reader of our own
stands in for its protocol on the same transport: connecting, STARTTLS,
login, RSET and QUIT stay aiosmtplib's. The replies are mapped to the errors
aiosmtplib raises for them, so what the relay makes of them does not change.
To a server without PIPELINING, MAIL, RCPT and DATA go one at a time
through the same reader (``command``): it counts a reply for each command
written, and one more says the server is out of step with them.

The message itself goes only after the server said 354 to DATA, so a
connection lost before any reply never leaves a half-sent message behind.
A connection given up on (a timeout, the relay's stop) while some of the
message is still to go is aborted, not closed: closing sent the rest, its
final dot too, after the relay had given the attempt up, and every retry
delivered another copy.
That is also why a reused connection's RSET can go first in the group: if
it finds the connection dead or refused, nothing of the message went out,
and ``Stale`` tells the caller to try again on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import time
from collections.abc import Awaitable, Collection, Iterator, Sequence
from typing import TypeVar

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus

from relay.errors import answered, interrupted


def taken(reply: SMTPResponse) -> bool:
    """Any 2xx to RCPT is positive completion (RFC 5321 4.2.1): the server has
    the recipient, and delivers to it once DATA is accepted for another. A 252
    was held to be a refusal: the copy went out in the same transaction, and
    the recipient's retries sent it again (pipelined, an empty message each)."""
    return 200 <= reply.code < 300


MAX_REPLY = 32768  # as aiosmtplib: a reply longer than this is no SMTP reply
_LOOK = 0.05  # seconds between looks at what of the message is still to go
_FIRST_LOOK = 0.001  # soon at first: most of what a fast link had left is gone by then
_SIOCOUTQNSD = 0x894B  # Linux: bytes the kernel holds for a socket, never sent yet
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER: closing drops what is still to go
_EXTRA = "one more than they asked for"
T = TypeVar("T")


class Stale(aiosmtplib.SMTPServerDisconnected):
    """A reused connection failed its RSET: closed, and nothing of the message was sent."""


class DataTimeout(aiosmtplib.SMTPTimeoutError):
    """No reply to the end of the message in time: the server may have taken it."""


class DataLost(aiosmtplib.SMTPServerDisconnected):
    """The connection ended after the end of the message, before its reply (or
    the reply was none SMTP has): the server may have taken it, as after a
    ``DataTimeout``."""


class Unsent(aiosmtplib.SMTPTimeoutError):
    """The server took none of the message for a ``timeout`` while it was being
    sent: the connection is aborted, so it never gets the final dot, and the
    message cannot arrive from this attempt."""


class LostMidway(aiosmtplib.SMTPServerDisconnected):
    """The connection ended while some of the message was still to go, its final
    dot with it: the message cannot arrive from this attempt, which is a plain
    deferral. Taken for a ``DataLost``, it was said to be one that may arrive twice."""


class OutOfStep(aiosmtplib.SMTPResponseException):
    """A reply no command in step with the server gets: the connection is closed,
    never reused, and the message deferred unsent."""

    def __init__(self, text: str) -> None:
        super().__init__(
            SMTPStatus.invalid_response, f"replies out of step with the commands: {text}"
        )


class Withheld(aiosmtplib.SMTPRecipientsRefused):
    """The server refused every recipient the message was ``needed`` for: no DATA
    went, so those it took (``taken``) do not get it either."""

    def __init__(
        self, refusals: list[aiosmtplib.SMTPRecipientRefused], taken: Sequence[str]
    ) -> None:
        super().__init__(refusals)
        self.taken = list(taken)


class Unfinished(aiosmtplib.SMTPException):
    """The transaction failed after the server had refused some recipients at
    RCPT: ``error`` is what failed it (a refused message, a 421, a connection
    lost, no reply in time), raised as it would be alone, and ``refused`` what
    the server said to each refused recipient. Those replies stand whatever
    became of the message, as in Postfix: a recipient refused for good fails
    with its own 550 rather than being retried, or failed, with the reply the
    others got."""

    def __init__(self, error: aiosmtplib.SMTPException, refused: dict[str, SMTPResponse]) -> None:
        super().__init__(str(error))
        self.error = error
        self.refused = refused


def unfinished(
    error: aiosmtplib.SMTPException, rcpt_tos: Sequence[str], answers: Sequence[SMTPResponse]
) -> Unfinished | None:
    """``error`` with the refusals among ``answers`` (the first replies to RCPT,
    those in before it), or None when none was a refusal."""
    pairs = zip(rcpt_tos[: len(answers)], answers, strict=True)
    refused = {address: reply for address, reply in pairs if not taken(reply)}
    return Unfinished(error, refused) if refused else None


def accepted(reply: SMTPResponse) -> bool:
    """Any 2xx to the end of the message is its delivery (RFC 5321 4.2.1), as to
    RCPT (``taken``): a ``251`` was taken for a failure, and the retry sent it again."""
    return 200 <= reply.code < 300


def withheld(
    rcpt_tos: Sequence[str], answers: Sequence[SMTPResponse], needed: Collection[str]
) -> Withheld | None:
    """What to raise instead of sending DATA: when the server took none of the
    ``needed`` recipients, and only then (an empty ``needed`` needs none)."""
    pairs = list(zip(rcpt_tos, answers, strict=True))
    if not needed or any(taken(reply) for address, reply in pairs if address in needed):
        return None
    return Withheld(
        [aiosmtplib.SMTPRecipientRefused(r.code, r.message, a) for a, r in pairs if not taken(r)],
        [address for address, reply in pairs if taken(reply)],
    )


async def final_reply(wait: Awaitable[T], timeout: float) -> T:
    """``wait`` for the reply to the end of the message; its timeout is ``DataTimeout``,
    a connection lost meanwhile or a malformed reply ``DataLost``: either way the
    retry may deliver it twice. A malformed reply was a plain invalid one, retried
    without a word of that."""
    try:
        return await wait
    except aiosmtplib.SMTPTimeoutError as exc:
        raise DataTimeout(
            f"no reply to the end of the message within {timeout:g}s; it may arrive twice"
        ) from exc
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise DataLost(
            "connection lost before the reply to the end of the message; it may arrive twice"
        ) from exc
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code != SMTPStatus.invalid_response:
            raise
        raise DataLost(
            f"no valid reply to the end of the message ({exc.message}); it may arrive twice"
        ) from exc


class _Replies(asyncio.Protocol):
    """Collects complete replies as they arrive; ``take`` waits for as many as it needs."""

    def __init__(
        self, owner: asyncio.BaseProtocol, transport: asyncio.BaseTransport, expected: int
    ) -> None:
        self._owner = owner  # aiosmtplib's protocol, which has the transport back afterwards
        self._transport = transport
        self._socket = transport.get_extra_info("socket")
        self._stranded: int | None = None  # what was still to go when the connection ended
        self._most = expected  # a reply for each command written: one more is out of step
        self._count = 0  # replies complete, taken or not
        self._unmatched = 0  # replies in hand when one more came (``take``)
        self._released = False
        self._lost: tuple[Exception | None] | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: list[SMTPResponse] = []
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._heard = 0.0  # time.monotonic() of the last complete reply

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._line(line)
        if len(self._buffer) > MAX_REPLY:
            self._fail(_invalid("Response too long"))
        self._wake()

    def _line(self, line: bytes) -> None:
        if self._error is not None:
            return
        if not line[:3].isdigit():
            text = line.decode("utf-8", "replace").strip()
            self._fail(_invalid(f"Malformed SMTP response line: {text}"))
            return
        if self._count >= self._most and not self._lines:
            self._unmatched = len(self._replies)
            self._fail(OutOfStep(_EXTRA))
            return
        self._lines.append(line)
        if line[3:4] == b"-":
            if sum(map(len, self._lines)) > MAX_REPLY:
                self._fail(_invalid("Response too long"))
            return
        text = b"\n".join(part[4:].strip(b" \t\r\n") for part in self._lines)
        self._replies.append(SMTPResponse(int(line[:3]), text.decode("utf-8", "surrogateescape")))
        self._count += 1
        self._lines = []
        self._heard = time.monotonic()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        # the transport's buffer is gone with it, its socket closed only after this
        self._stranded = _in_kernel(self._socket)
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        if self._released:
            self._owner.connection_lost(exc)
        else:
            self._lost = (exc,)

    def release(self) -> None:
        """The transaction is over on a closing transport, which keeps this reader
        (a TLS transport cannot change its protocol once lost): the end of the
        connection still reaches aiosmtplib, now or when it comes."""
        self._released = True
        if self._lost is not None:
            self._owner.connection_lost(self._lost[0])

    def asked(self) -> None:
        """One command more was written (DATA alone, the message, a lone dot): one
        reply more is in step. Counted in advance, the reply to the end of the
        message let an extra reply before the 354 pass for one in step."""
        self._most += 1

    def arrived(self) -> list[SMTPResponse]:
        """The replies in so far, when ``take`` raised before it had all it wanted."""
        return list(self._replies)

    def unsent(self) -> int:
        """Bytes written and not sent yet; once the connection has ended, those it
        had not sent then, which never will be: its closed socket counts none,
        and a message cut short by a hang-up was taken for sent in full."""
        return _unsent(self._transport) if self._stranded is None else self._stranded

    def spoke(self) -> bool:
        """Whether a reply, or the end of the reading, has come."""
        return bool(self._replies) or self._error is not None

    def early(self) -> Exception | None:
        """What ended the reading, if anything did: a reply no command is waiting
        for, or the connection's end. Before the message's end can be answered,
        a stray reply would be taken for the message's (and delivered a message
        the server refused): each reply a command asked for is taken before the
        message goes, so one more is ``OutOfStep``."""
        return self._error

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        ready = self._error is not None or len(self._replies) >= self._wanted
        if self._waiter is not None and ready and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, count: int, timeout: float) -> list[SMTPResponse]:
        """``timeout`` is for each reply, as for a command sent alone: a smarthost
        that takes 5 s over each of 16 RCPTs (recipient verification, a policy
        service) was given 60 s for all of them, and never got the message.

        A reply more than the commands written is ``OutOfStep``, raised when
        the replies it came after were in hand together: any of them may be
        the extra one. One alone answers the one command still waiting, as
        the final reply does, which is the message's outcome whatever follows
        it: a ``250`` and a ``421`` in one write had a delivered message sent
        again at every retry. The reading ends at the extra reply, so any
        ``take`` after it lacks replies and raises."""
        if len(self._replies) < count and self._error is None:
            self._wanted = count
            self._waiter = asyncio.get_running_loop().create_future()
            self._heard = time.monotonic()
            try:
                while not self._waiter.done():
                    left = self._heard + timeout - time.monotonic()
                    if left <= 0:
                        text = "Timed out waiting for server response"
                        raise aiosmtplib.SMTPReadTimeoutError(text)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._waiter), left)
            finally:
                self._waiter = None
        if len(self._replies) < count or self._unmatched > 1:
            assert self._error is not None
            raise self._error
        taken, self._replies = self._replies[:count], self._replies[count:]
        return taken


async def _reset(replies: _Replies, timeout: float) -> None:
    try:
        (reply,) = await replies.take(1, timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
        raise Stale(f"no reply to RSET: {exc}") from exc
    if reply.code != SMTPStatus.completed:
        raise Stale(f"RSET refused: {reply.code} {reply.message}")


def opened(start: SMTPResponse) -> None:
    """Raises for a reply to DATA other than its 354: ``SMTPDataError`` for a
    refusal, ``OutOfStep`` for any other, which DATA never gets: it is one left
    over from an earlier command (a server that answered MAIL twice), the 354
    still to come. Taken for a refusal of the message, it had an RSET go into
    the message, and the relay wait a whole ``timeout`` for its reply."""
    if start.code == SMTPStatus.start_input:
        return
    if start.code < 400:
        raise OutOfStep(f"DATA answered {start.code} {start.message}")
    raise aiosmtplib.SMTPDataError(start.code, start.message)


def stale(mail: SMTPResponse) -> None:
    """A reused connection whose MAIL is answered 421 (a server's limit of messages
    a connection) is ``Stale``, as one whose RSET fails: nothing of the message
    went, and a new connection takes it at once, where it waited for a retry."""
    if mail.code == SMTPStatus.domain_unavailable:
        raise Stale(f"MAIL answered {mail.code} {mail.message}")


def _invalid(text: str) -> aiosmtplib.SMTPResponseException:
    return aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response, text)


async def send(
    client: aiosmtplib.SMTP,
    mail_from: str,
    mail_command: bytes,
    rcpt_tos: Sequence[str],
    rcpt_commands: Sequence[bytes],
    section: bytes,
    timeout: float,
    reset: bool = False,
    data_timeout: float | None = None,
    needed: Collection[str] = (),
) -> tuple[dict[str, SMTPResponse], SMTPResponse]:
    """The transaction on ``client``'s connection: (refused recipients, the final reply),
    raising what the one-at-a-time transaction raises for the same replies.
    With ``reset`` an RSET goes first, and ``Stale`` if it fails. The reply to
    the end of the message may take ``data_timeout`` (default: ``timeout``).
    With ``needed`` DATA waits for the RCPT replies (``withheld``): in the
    group it would be answered 354 for the recipients taken, and the message
    could not be stopped any more. Failed after a recipient was refused, it
    raises ``Unfinished``."""
    answers: list[SMTPResponse] = []  # to each RCPT, as far as they came, once MAIL was taken
    try:
        return await _transaction(
            client, mail_from, mail_command, rcpt_tos, rcpt_commands, section,
            timeout, reset, data_timeout, needed, answers,
        )  # fmt: skip
    except (
        aiosmtplib.SMTPResponseException,
        aiosmtplib.SMTPServerDisconnected,
        aiosmtplib.SMTPTimeoutError,
    ) as error:
        partial = unfinished(error, rcpt_tos, answers)
        if partial is None:
            raise
        raise partial from error


async def _transaction(
    client: aiosmtplib.SMTP,
    mail_from: str,
    mail_command: bytes,
    rcpt_tos: Sequence[str],
    rcpt_commands: Sequence[bytes],
    section: bytes,
    timeout: float,
    reset: bool,
    data_timeout: float | None,
    needed: Collection[str],
    answers: list[SMTPResponse],
) -> tuple[dict[str, SMTPResponse], SMTPResponse]:
    held = bool(needed)
    group = (*([b"RSET"] if reset else []), mail_command, *rcpt_commands)
    group += () if held else (b"DATA",)
    protocol, transport = _connection(client)
    with _reading(protocol, transport, len(group)) as replies:
        transport.write(b"".join(command + b"\r\n" for command in group))
        if reset:
            await _reset(replies, timeout)
        try:
            got = await replies.take(len(rcpt_commands) + (1 if held else 2), timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as lost:
            if reset and replies.arrived():  # a 421 closes the connection, as it should
                stale(replies.arrived()[0])
            refusal = _refusal(replies.arrived(), mail_from, rcpt_tos)
            if refusal is None:
                answers += _answers(replies.arrived(), rcpt_tos)
                raise
            transport.close()  # a refusal, then a hang-up or silence: the refusal counts
            raise refusal from lost
        for reply in got:
            _close_on_421(reply, transport)
        if reset:
            stale(got[0])
        if not _in_step(got, len(rcpt_tos) + 1):
            raise OutOfStep("a 354 before DATA's")
        rcpts = got[1 : 1 + len(rcpt_tos)]
        refusal = _refusal(got, mail_from, rcpt_tos) or withheld(rcpt_tos, rcpts, needed)
        if refusal is not None:
            if not held:
                await _after_refusal(got[-1], refusal, replies, transport, timeout)
            raise refusal
        answers += rcpts
        opened(await _data(replies, transport, timeout) if held else got[-1])
        done = timeout if data_timeout is None else data_timeout
        final = await _end(replies, transport, section, timeout, done)
    if not accepted(final):
        _close_on_421(final, transport)
        raise aiosmtplib.SMTPDataError(final.code, final.message)
    refused = {a: r for a, r in zip(rcpt_tos, rcpts, strict=True) if not taken(r)}
    return refused, final


async def _after_refusal(
    start: SMTPResponse,
    refusal: aiosmtplib.SMTPException,
    replies: _Replies,
    transport: asyncio.Transport,
    timeout: float,
) -> None:
    """A DATA sent in the group and answered 354 all the same is ended here."""
    if start.code == SMTPStatus.start_input and not transport.is_closing():
        if isinstance(refusal, aiosmtplib.SMTPSenderRefused):
            transport.close()  # DATA without a sender: out of step
        else:  # every recipient refused, yet 354: end it, empty
            transport.write(b".\r\n")
            replies.asked()
            try:
                await _end_empty(replies, transport, timeout)
            except asyncio.CancelledError:  # the refusal stands: the stop records it
                transport.close()
                answered()


async def _data(replies: _Replies, transport: asyncio.Transport, timeout: float) -> SMTPResponse:
    """DATA on its own, once the RCPT replies said the message may go."""
    transport.write(b"DATA\r\n")
    replies.asked()
    (start,) = await replies.take(1, timeout)
    _close_on_421(start, transport)
    return start


async def command(client: aiosmtplib.SMTP, line: bytes, timeout: float) -> SMTPResponse:
    """``line`` and its reply, read as a group's are, to a server without
    PIPELINING. aiosmtplib keeps a reply that came with the one it read for the
    next command: after a MAIL answered twice, each reply went to the command
    before, and DATA got a refused recipient's 550, which failed the message
    for every recipient, while its 354 was still to come."""
    protocol, transport = _connection(client)
    with _reading(protocol, transport, 1) as replies:
        transport.write(line + b"\r\n")
        (reply,) = await replies.take(1, timeout)
        _close_on_421(reply, transport)
        if isinstance(extra := replies.early(), OutOfStep):
            raise extra  # two replies to one command: which answers it is not known
    return reply


async def end_of_data(
    client: aiosmtplib.SMTP, section: bytes, timeout: float, done: float
) -> SMTPResponse:
    """The message and its final dot, after a 354 the one-at-a-time transaction
    read, and the reply read as a pipelined group's is. aiosmtplib refuses a
    reply line over 8,192 bytes: a smarthost's 250 of 9,000 was taken for no
    reply, and the message sent again at every retry."""
    protocol, transport = _connection(client)
    with _reading(protocol, transport, 0) as replies:
        return await _end(replies, transport, section, timeout, done)


async def _end(
    replies: _Replies, transport: asyncio.Transport, section: bytes, timeout: float, done: float
) -> SMTPResponse:
    """``done`` (``data_timeout``) is for the reply alone, from when the final dot
    has left; the sending is timed by ``_sending``. Cut off by the relay's stop,
    it is ``interrupted``, ``sent`` only if none of the message was still to go:
    the record says it may arrive twice only of a message the upstream may have."""
    if transport.is_closing():  # closed on a 421: nothing of the message goes
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if (early := replies.early()) is not None:
        raise early  # out of step: nothing of the message goes
    # one system call; uvloop (the daemon's loop) keeps references, no copy
    transport.writelines((section, b".\r\n"))
    replies.asked()
    try:
        return await _answer(replies, transport, timeout, done)
    except asyncio.CancelledError as cancel:
        interrupted(cancel, sent=not replies.unsent())
        raise


async def _answer(
    replies: _Replies, transport: asyncio.Transport, timeout: float, done: float
) -> SMTPResponse:
    """The reply to the message on its way: a refusal that came while it was
    sent (the rest dropped), else the reply to its end."""
    if not await _sending(replies, timeout):
        _drop(transport)  # the rest does not go: it ends in the final dot
        try:
            (final,) = await replies.take(1, timeout)  # come already, or what ended the reading
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise LostMidway(
                "connection lost while the message was sent; it was not sent in full"
            ) from exc
        if accepted(final):
            raise _invalid(f"{final.code} {final.message} before the end of the message had left")
        return final  # a refusal of the message as it came: 552, too large
    (final,) = await final_reply(replies.take(1, done), done)
    return final


async def _sending(replies: _Replies, timeout: float) -> bool:
    """Until the transport has handed the whole message on, its final dot too: a
    slow link may take as long as it needs while the server takes some of it
    every ``timeout`` (Postfix's ``smtp_data_xfer_timeout``). Timed with the
    reply, a message that took longer to send than ``data_timeout`` was given
    up on at every attempt, and delivered each time all the same. False when
    the server answered, or the connection ended, before all of it had left."""
    left = replies.unsent()
    moved = time.monotonic()
    pause = _FIRST_LOOK
    while left:
        if time.monotonic() - moved >= timeout:
            raise Unsent(f"none of the message taken for {timeout:g}s; it was not sent in full")
        await asyncio.sleep(min(pause, timeout))
        pause = min(pause * 2, _LOOK)
        now = replies.unsent()
        if now and replies.spoke():
            return False
        if now < left:
            moved = time.monotonic()
        left = now
    return True


def _connection(client: aiosmtplib.SMTP) -> tuple[asyncio.BaseProtocol, asyncio.Transport]:
    protocol = client.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    return protocol, transport


@contextlib.contextmanager
def _reading(
    protocol: asyncio.BaseProtocol, transport: asyncio.Transport, expected: int
) -> Iterator[_Replies]:
    """Replies read by ``_Replies`` in place of aiosmtplib's protocol, which gets
    the connection back afterwards unless it is out of step (then closed): a
    reader that heard more than it was asked for, or what is no reply, does
    not hand it back, even once it has all it wanted."""
    replies = _Replies(protocol, transport, expected)
    transport.set_protocol(replies)
    try:
        yield replies
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, asyncio.CancelledError):
        _drop(transport)  # out of step with the server: never reuse it
        raise
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == SMTPStatus.invalid_response:
            _drop(transport)
        raise
    finally:
        if replies.early() is not None and not transport.is_closing():
            _drop(transport)
        if transport.is_closing():
            replies.release()
        else:
            transport.set_protocol(protocol)


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written and not sent yet: the transport's and the kernel's. A
    socket buffer takes megabytes, which the transport's count alone took for
    sent, so the wait for the reply began while they were on their way."""
    held = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    return held + _in_kernel(transport.get_extra_info("socket"))


def _in_kernel(sock: socket.socket | None) -> int:
    """Bytes the kernel holds for ``sock`` and has not sent yet."""
    if sock is None or sock.fileno() < 0:  # none, or closed already
        return 0
    try:
        queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, bytes(4))
    except OSError:  # not Linux: the transport's count only
        return 0
    return struct.unpack("i", queued)[0]


def _drop(transport: asyncio.Transport) -> None:
    """A connection given up on sends nothing more: what of the message is still
    to go is dropped with it (``abort``, and a reset for the kernel's part), or
    its final dot would go after all, after the relay had given it up."""
    if not _unsent(transport):
        transport.close()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()


async def _end_empty(replies: _Replies, transport: asyncio.BaseTransport, timeout: float) -> None:
    """The reply to a lone dot says nothing about the message: whatever it is, the
    refusal of every recipient stands, and a connection that did not answer it
    cleanly is not kept."""
    try:
        (ended,) = await replies.take(1, timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        transport.close()
        return
    _close_on_421(ended, transport)


def _in_step(got: Sequence[SMTPResponse], data_at: int) -> bool:
    """Only DATA is answered 354: one anywhere else means a reply left out (a
    server that skipped one), and taking them by position gave one recipient
    another's refusal, failing it for good although the server had taken it."""
    return all(r.code != SMTPStatus.start_input for i, r in enumerate(got) if i != data_at)


def _close_on_421(reply: SMTPResponse, transport: asyncio.BaseTransport) -> None:
    """421: the server is closing the connection; aiosmtplib closes it too."""
    if reply.code == SMTPStatus.domain_unavailable:
        transport.close()


def _answers(got: Sequence[SMTPResponse], rcpt_tos: Sequence[str]) -> list[SMTPResponse]:
    """The replies to RCPT among those in when the rest did not come: none unless
    the server took MAIL and the replies are in step."""
    if not got or not _in_step(got, len(rcpt_tos) + 1) or got[0].code != SMTPStatus.completed:
        return []
    return list(got[1 : 1 + len(rcpt_tos)])


def _refusal(
    got: Sequence[SMTPResponse], mail_from: str, rcpt_tos: Sequence[str]
) -> aiosmtplib.SMTPException | None:
    """What the one-at-a-time transaction raises for these replies before DATA:
    the sender refused, or every recipient; None while neither is known."""
    if not got or not _in_step(got, len(rcpt_tos) + 1):
        return None
    if got[0].code != SMTPStatus.completed:
        return aiosmtplib.SMTPSenderRefused(got[0].code, got[0].message, mail_from)
    rcpts = got[1 : 1 + len(rcpt_tos)]
    if len(rcpts) < len(rcpt_tos) or any(map(taken, rcpts)):
        return None
    pairs = zip(rcpt_tos, rcpts, strict=True)
    return aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(r.code, r.message, a) for a, r in pairs]
    )
