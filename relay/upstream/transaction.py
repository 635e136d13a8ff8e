"""One SMTP transaction on a connected aiosmtplib client, the message sent as stored.

aiosmtplib's ``sendmail`` makes the message wire-ready itself: one full copy
to count its size for SIZE, one to normalise its line endings and one to
append the final dot, so a 25 MB message was held four times over while it
was sent, and a 100 KB one cost a millisecond of regular expressions. The
spool only ever holds messages with CRLF line endings (the ingress refuses
bare CR and LF; the relay's own notices are built that way), so here the
bytes are checked with three counts and written as they are; only a message
with a line starting with a dot is copied, to stuff it. The envelope goes
out as ``mail`` and ``rcpt`` would send it, with the errors they raise, so
the reply mapping in ``smtp`` does not change; a plain ``local@domain`` is
quoted as it is, without the ``email`` package's address parser those run
twice per address. To a server that offers PIPELINING the commands go as
one group (``pipelining``), with the same errors for the same replies; to
one that does not, one at a time (``pipelining.command``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Collection, Sequence

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX

from relay.errors import answered
from relay.headers import DOT_ATOM
from relay.upstream import pipelining

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_EHLO_UNKNOWN = (500, 502)  # command not recognised, not implemented
_PLAIN = re.compile(rf"{DOT_ATOM}@{DOT_ATOM}")


def path(address: str) -> bytes:
    """``<address>`` as aiosmtplib's ``quote_address`` makes it, a plain
    ``local@domain`` directly; ValueError for what must not go on a command
    line, checked as aiosmtplib checks a command's arguments (the pipelined
    transaction does not go through that check)."""
    if _PLAIN.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    quoted = quote_address(address).encode("ascii")
    if COMMAND_INJECTION_REGEX.search(quoted):
        raise ValueError("Command arg contains a prohibited control character")
    return quoted


def wire(data: bytes) -> tuple[bytes, int]:
    """The DATA section without its final dot: CRLF line endings, ending in CRLF,
    dot-stuffed (RFC 5321 4.5.2), ``data`` itself when it is already that; and
    the size to declare (RFC 1870: before stuffing, without the final dot)."""
    pairs = data.count(b"\r\n")
    if data.count(b"\r") != pairs or data.count(b"\n") != pairs:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    size = len(data)
    if data.startswith(b".") or b"\r\n." in data:
        data = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
    return data, size


async def send(
    client: aiosmtplib.SMTP,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    timeout: float,
    reset: bool = False,
    data_timeout: float | None = None,
    needed: Collection[str] = (),
    envelope_id: str | None = None,
    reused: bool = False,
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """MAIL, RCPT for each recipient, DATA: (refused recipients, the final reply),
    raising what ``aiosmtplib.SMTP.sendmail`` raises for the same replies.
    With ``reset`` an RSET goes first; pipelined, ``pipelining.Stale`` says it failed.
    The reply to the end of the message may take ``data_timeout`` (default:
    ``timeout``) once the message has left, and ``pipelining.DataTimeout`` says
    it did not come (``pipelining.DataLost``: the connection ended first);
    ``pipelining.Unsent`` that the server took none of it for ``timeout``,
    ``pipelining.LostMidway`` that the connection ended before all of it had left. If the
    server takes none of the ``needed`` recipients, ``pipelining.Withheld``
    is raised and no DATA goes: the others do not get the message alone.
    Failed after a recipient was refused, it raises ``pipelining.Unfinished``.
    ``envelope_id`` goes as ENVID to a server that offers DSN (``_options``).
    On a ``reused`` connection a 421 to MAIL is ``pipelining.Stale`` too."""
    done = timeout if data_timeout is None else data_timeout
    paths = [path(address) for address in (mail_from, *rcpt_tos)]  # refuse before sending
    section, size = wire(data)
    if client.is_ehlo_or_helo_needed:
        await greet(client, timeout)
    mail = b" ".join((b"MAIL FROM:" + paths[0], *_options(client, data, size, envelope_id)))
    rcpts = [b"RCPT TO:" + rcpt_path for rcpt_path in paths[1:]]
    try:
        if client.supports_extension("pipelining"):
            refused, final = await pipelining.send(
                client, mail_from, mail, rcpt_tos, rcpts, section, timeout, reset, done, needed
            )
            return refused, final.message
        if reset:
            await _reset(client, timeout)
        reply = await pipelining.command(client, mail, timeout)
        if (reset or reused) and reply.code == aiosmtplib.SMTPStatus.domain_unavailable:
            client.close()
            pipelining.stale(reply)
        if reply.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
        answers: list[aiosmtplib.SMTPResponse] = []
        try:
            reply = await _one_by_one(
                client, rcpt_tos, rcpts, section, timeout, done, needed, answers
            )
        except (
            aiosmtplib.SMTPResponseException,
            aiosmtplib.SMTPServerDisconnected,
            aiosmtplib.SMTPTimeoutError,
        ) as error:
            partial = pipelining.unfinished(error, rcpt_tos, answers)
            if partial is None:
                raise
            raise partial from error
    except (
        aiosmtplib.SMTPResponseException,
        aiosmtplib.SMTPRecipientsRefused,
        pipelining.Unfinished,
    ) as exc:
        # the refusal stands whatever happens to the RSET, cut off by the stop
        # too; aiosmtplib closes a connection whose RSET is lost or unanswered,
        # so it is not reused
        if _refused(exc):
            try:
                with contextlib.suppress(ConnectionError, aiosmtplib.SMTPTimeoutError):
                    await client.rset(timeout=timeout)
            except aiosmtplib.SMTPResponseException:
                client.close()  # an RSET answered otherwise (a late 354) is out of step
            except asyncio.CancelledError:
                client.close()  # not reset: not reused
                answered()
        raise
    refused = {a: r for a, r in zip(rcpt_tos, answers, strict=True) if not pipelining.taken(r)}
    return refused, reply.message


def _refused(exc: aiosmtplib.SMTPException) -> bool:
    """A refusal, after which the connection may serve again once RSET; not a
    connection lost or a reply not come in time, behind a refused recipient."""
    return not isinstance(exc, pipelining.Unfinished) or isinstance(
        exc.error, aiosmtplib.SMTPResponseException
    )


async def _one_by_one(
    client: aiosmtplib.SMTP,
    rcpt_tos: Sequence[str],
    rcpts: Sequence[bytes],
    section: bytes,
    timeout: float,
    done: float,
    needed: Collection[str],
    answers: list[aiosmtplib.SMTPResponse],
) -> aiosmtplib.SMTPResponse:
    """RCPT for each recipient, its reply added to ``answers`` as it comes, then
    DATA and the message, once a recipient was taken; the final reply."""
    for rcpt in rcpts:
        answers.append(await pipelining.command(client, rcpt, timeout))
    if not any(map(pipelining.taken, answers)):
        pairs = zip(rcpt_tos, answers, strict=True)
        raise aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(r.code, r.message, a) for a, r in pairs]
        )
    if (held := pipelining.withheld(rcpt_tos, answers, needed)) is not None:
        raise held
    return await _data(client, section, timeout, done)


async def greet(client: aiosmtplib.SMTP, timeout: float) -> aiosmtplib.SMTPResponse:
    """EHLO, for the options it offers; HELO to a server that does not know
    EHLO (RFC 5321 3.2), which a smarthost of old may not."""
    try:
        return await client.ehlo(timeout=timeout)
    except aiosmtplib.SMTPHeloError as exc:
        if exc.code not in _EHLO_UNKNOWN or not client.is_connected:
            raise
        return await client.helo(timeout=timeout)


def _options(
    client: aiosmtplib.SMTP, data: bytes, size: int, envelope_id: str | None = None
) -> list[bytes]:
    """MAIL FROM parameters, each only to a server that offers its extension.
    8-bit content is announced with BODY=8BITMIME (RFC 6152). To a server that
    does not offer 8BITMIME it goes as it is, unannounced, as Postfix does
    with ``disable_mime_output_conversion = yes`` and sendmail with
    ``EightBitMode=pass8``: converting it to 7 bits would rewrite the signed
    message and break its DKIM signature, and refusing it would fail mail
    that nearly every server takes.

    To a server that offers DSN (RFC 3461) the message's queue ID goes as
    ENVID, which a bounce returns as its Original-Envelope-Id, so that
    ``relay bounce`` finds the message exactly (an ERP may reuse a
    Message-ID), and RET=HDRS: a bounce returns the header, not the invoice."""
    options = [b"SIZE=%d" % size] if client.supports_extension("size") else []
    if not data.isascii() and client.supports_extension("8bitmime"):
        options.append(b"BODY=8BITMIME")
    if envelope_id and client.supports_extension("dsn"):
        options += [b"RET=HDRS", b"ENVID=" + _xtext(envelope_id)]
    return options


def _xtext(text: str) -> bytes:
    """RFC 3461 4: "+" and "=" and what is not printable ASCII as +HH."""
    return b"".join(
        bytes([c]) if 33 <= c <= 126 and c not in b"+=" else b"+%02X" % c for c in text.encode()
    )


async def _reset(client: aiosmtplib.SMTP, timeout: float) -> None:
    """As in the pipelined group: a failed RSET means a stale connection, not a refusal."""
    try:
        await client.rset(timeout=timeout)
    except (
        aiosmtplib.SMTPResponseException,
        aiosmtplib.SMTPServerDisconnected,
        aiosmtplib.SMTPTimeoutError,
    ) as exc:
        client.close()
        raise pipelining.Stale(f"RSET failed: {exc}") from exc


async def _data(
    client: aiosmtplib.SMTP, section: bytes, timeout: float, done: float
) -> aiosmtplib.SMTPResponse:
    start = await pipelining.command(client, b"DATA", timeout)
    try:
        pipelining.opened(start)
    except pipelining.OutOfStep:
        client.close()
        raise
    try:
        reply = await pipelining.end_of_data(client, section, timeout, done)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()  # out of step with the server (aborted if the message was not all sent)
        raise
    if reply.code == aiosmtplib.SMTPStatus.domain_unavailable:
        client.close()  # as aiosmtplib does for a 421 to any command it sends
    if not pipelining.accepted(reply):
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply
