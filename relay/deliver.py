"""Hand a finished message to its upstream.

``deliver`` returns a ``DeliveryResult`` (the upstream's reply, and the
recipients it refused when it accepted others) or raises ``UpstreamError``
with the upstream's own code and text when it refused the message
(``RecipientsRefused``, with each one's reply, when it refused every
recipient; ``PartlyRefused``, with those of the recipients it refused, when
the message failed after that), or ``451 4.4.x`` when it could not be
reached. See ``relay.upstream.smtp`` for how SMTP replies are mapped and
``relay.upstream.directory`` for the files the directory upstream writes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from relay import tally
from relay.engine import Attempt, Sender
from relay.errors import UpstreamError
from relay.policy.model import DirectoryUpstream, SmtpUpstream, Upstream
from relay.tally import TallyRow
from relay.upstream import (
    DeliveryResult,
    PartlyRefused,
    RecipientsRefused,
    Unreachable,
    directory,
    smtp,
)

__all__ = ["DeliveryResult", "attempt", "counted", "deliver"]

_TOO_MANY = 452  # to RCPT: more recipients than the server takes in one transaction


async def deliver(
    upstream: Upstream,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    *,
    needed: Collection[str] = (),
    envelope_id: str | None = None,
) -> DeliveryResult:
    """``needed``, ``envelope_id``: see ``smtp.send``; a directory upstream takes
    every recipient."""
    if isinstance(upstream, SmtpUpstream):
        return await smtp.send(
            upstream, mail_from, rcpt_tos, data, needed=needed, envelope_id=envelope_id
        )
    if isinstance(upstream, DirectoryUpstream):
        return await directory.write(upstream, mail_from, rcpt_tos, data)
    raise TypeError(f"unknown upstream type {type(upstream).__name__}")


async def attempt(
    upstream: Upstream,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    *,
    needed: Collection[str] = (),
    envelope_id: str | None = None,
) -> Attempt:
    """One delivery attempt as the engine sees it: a reply for every recipient.

    The recipients answered 452 go at once in a further transaction (RFC 5321
    4.5.3.1.10: the server's limit of recipients per transaction, as Postfix
    reads it), for as long as each one delivers to someone: deferred, a 5
    recipient invoice to a server taking 2 went out over three retry waits.
    A 452 for another reason (a full mailbox) costs one more transaction."""
    replies: dict[str, tuple[int, str]] = {}
    rest: Sequence[str] = rcpt_tos
    unreachable = None
    while rest:
        got, unreachable = await _transaction(upstream, mail_from, rest, data, needed, envelope_id)
        replies.update(got)
        if not any(200 <= code < 300 for code, _ in got.values()):
            break
        rest, needed = [r for r, (code, _) in got.items() if code == _TOO_MANY], ()
    if any(200 <= code < 300 for code, _ in replies.values()):
        unreachable = None  # it took the message for someone: reached, whatever came after
    return Attempt(replies, unreachable)


async def _transaction(
    upstream: Upstream,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    needed: Collection[str],
    envelope_id: str | None,
) -> tuple[dict[str, tuple[int, str]], str | None]:
    """Each recipient's reply, and the reply when the upstream could not be used
    at all and may be again later (``relay.unreachable``)."""
    unreachable = None
    try:
        result = await deliver(
            upstream, mail_from, rcpt_tos, data, needed=needed, envelope_id=envelope_id
        )
    except UpstreamError as exc:
        replies = dict.fromkeys(rcpt_tos, (exc.code, exc.line))
        refused = exc.refused if isinstance(exc, RecipientsRefused | PartlyRefused) else {}
        if isinstance(exc, Unreachable) and not exc.permanent:
            unreachable = exc.line
    else:
        replies = dict.fromkeys(rcpt_tos, (250, result.reply))
        refused = result.refused
    for rcpt, reply in refused.items():
        replies[rcpt] = (_code(reply), reply)
    return replies, unreachable


def counted(send: Sender, row: TallyRow) -> Sender:
    """``send``, each attempt counted for the metrics under its upstream: ``sent``
    when the upstream took the message for someone, ``deferred`` when for no one
    and some reply was temporary (unreachable, a failed login, a 4xx),
    ``refused`` when every reply was permanent. A tenant's own account that
    fails shows as its upstream's name, which the tenant's counts do not say."""

    async def counted_send(upstream: Upstream, *args: object, **kwargs: object) -> Attempt:
        sent = await send(upstream, *args, **kwargs)
        row.add(tally.UPSTREAM, upstream.name, result(sent))
        return sent

    return counted_send


def result(sent: Attempt) -> str:
    codes = [code for code, _ in sent.replies.values()]
    if any(200 <= code < 300 for code in codes):
        return "sent"
    return "refused" if codes and all(code >= 500 for code in codes) else "deferred"


def _code(reply: str) -> int:
    return int(reply[:3]) if reply[:3].isdigit() else 451
