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

from collections.abc import Callable, Collection, Sequence

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
# recipients of a further transaction never sent: the relay stopped in between, or
# the transaction before theirs delivered to no one; tried again at the next attempt
STOPPING = (451, "451 4.3.2 Not sent yet: the relay was stopping")
NOT_THIS_TIME = (451, "451 4.5.3 Not sent yet: the upstream took no recipient before them")


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
    go_on: Callable[[], bool] = lambda: True,
) -> Attempt:
    """One delivery attempt as the engine sees it: a reply for every recipient.

    The recipients answered 452 go at once in further transactions (RFC 5321
    4.5.3.1.10: the server's limit of recipients per transaction, as Postfix
    reads it), for as long as each one delivers to someone: deferred, a 5
    recipient invoice to a server taking 2 went out over three retry waits.
    Each further transaction takes as many as the server took in the first
    (sending all the rest each time cost a 1,000-recipient message 500,000
    refused RCPTs at a server taking one). A 452 for another reason (a full
    mailbox) costs one more transaction. ``go_on`` is asked before each further
    transaction: a relay that stops ends the attempt with what it has, rather
    than having the stop's grace cut it off, its transactions' replies lost
    and their recipients sent the message again."""
    replies: dict[str, tuple[int, str]] = {}
    rest: list[str] = list(rcpt_tos)
    batch = len(rest)
    unreachable = None
    while rest:
        sending = rest[:batch]
        got, unreachable = await _transaction(
            upstream, mail_from, sending, data, needed, envelope_id
        )
        replies.update(got)
        over = [r for r in sending if got[r][0] == _TOO_MANY]
        unsent = rest[len(sending) :]
        if over and len(over) < len(sending):
            batch = len(sending) - len(over)  # the server's limit per transaction
        rest, needed = over + unsent, ()
        delivered = any(200 <= code < 300 for code, _ in got.values())
        if rest and not (delivered and go_on()):
            replies.update(dict.fromkeys(unsent, STOPPING if delivered else NOT_THIS_TIME))
            break
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
