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

import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from relay import tally
from relay.engine import Attempt, Sender
from relay.errors import UpstreamError
from relay.policy.model import DirectoryUpstream, SmtpUpstream, Upstream
from relay.tally import TallyRow
from relay.upstream import (
    Crowded,
    DeliveryResult,
    MessageRefused,
    PartlyRefused,
    RecipientsRefused,
    SenderRefused,
    Unreachable,
    directory,
    smtp,
)

__all__ = ["DeliveryResult", "attempt", "counted", "deliver"]

_TOO_MANY = 452  # to RCPT: more recipients than the server takes in one transaction
# the same in RFC 821's code, with 5.5.3 or no enhanced code (5.0.0 once ``replies`` gave one)
_LEGACY_TOO_MANY = re.compile(r"552 5\.(?:5\.3|0\.0)(?: |$)")
# recipients of a further transaction never sent: the relay stopped in between, or
# the transaction before theirs failed as a whole or answered nobody but with the
# limit; tried again at the next attempt
STOPPING = (451, "451 4.3.2 Not sent yet: the relay was stopping")
NOT_THIS_TIME = (451, "451 4.5.3 Not sent yet: the transaction before theirs did not go through")
# why a refusal that reads as a hard bounce lists no recipient (``Attempt.shared``)
SENDER_REFUSED = "the upstream refused the sender, not the recipient"
WHOLE_REFUSED = "the upstream refused the message for all its recipients, not this one"


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
    replies: dict[str, tuple[int, str]] | None = None,
) -> Attempt:
    """One delivery attempt as the engine sees it: a reply for every recipient.

    The recipients answered ``452 4.5.3`` (RFC 5321 4.5.3.1.10: the server's
    limit of recipients per transaction, as Postfix reads it; ``552 5.5.3``, its
    RFC 821 code, is taken for it in ``_legacy_limit``) go at once in
    further transactions, each of as many as the server answered otherwise in
    the first: deferred, a 5 recipient invoice to a server taking 2 went out
    over three retry waits, and sending all the rest each time cost a
    1,000-recipient message 500,000 refused RCPTs at a server taking one. A
    452 with another code (a full mailbox) is that recipient's own answer. The
    further transactions go on while each answers someone; one that fails as
    a whole (the upstream gone, the message refused) leaves the recipients not
    sent yet for the next attempt. ``go_on`` is asked before each: a relay that
    stops ends the attempt with what it has, rather than having the stop's
    grace cut it off, its transactions' replies lost and their recipients sent
    the message again. ``replies`` is filled in as each recipient's answer for
    the attempt is known, for a caller that cuts the attempt off to know what
    the earlier transactions were answered."""
    replies = {} if replies is None else replies
    shared: dict[str, str] = {}
    rest: list[str] = list(rcpt_tos)
    batch = len(rest)
    unreachable, crowded = None, False
    while rest:
        sending, unsent = rest[:batch], rest[batch:]
        if needed and not set(needed) & set(sending):  # the copy would go alone
            replies.update(dict.fromkeys(rest, (451, smtp.NOT_SENT)))
            break
        got, theirs, unreachable, whole, crowded = await _transaction(
            upstream, mail_from, sending, data, needed, envelope_id
        )
        limited = [r for r in sending if _over_limit(*got[r])]
        replies.update((r, got[r]) for r in sending if r not in limited)  # final for them
        shared.update((r, theirs[r]) for r in sending if r in theirs and r not in limited)
        answered = len(sending) - len(limited)
        if limited and answered:
            batch = answered  # the server's limit per transaction
        rest = limited + unsent
        if any(200 <= got[r][0] < 300 for r in needed if r in got):
            needed = ()  # taken: the copy may go on its own now, as it goes with them
        if not rest:
            break
        ended = whole and not _refused_whole(got, sending, limited)
        if ended or not answered or not go_on():
            why = STOPPING if answered and not ended else NOT_THIS_TIME
            replies.update((r, got[r]) for r in limited)  # their 452 is this attempt's
            replies.update(dict.fromkeys(unsent, why))
            break
    if any(200 <= code < 300 for code, _ in replies.values()):
        # it took the message for someone: reached, whatever came after
        unreachable, crowded = None, False
    refusals = (replies[r][1] for r, why in shared.items() if why == SENDER_REFUSED)
    sender_refused = next((reply for reply in refusals if reply[:1] == "5"), None)
    return Attempt(replies, unreachable, crowded, shared, sender_refused)


def _refused_whole(got: dict[str, tuple[int, str]], sending: list[str], limited: list[str]) -> bool:
    """Whether the transaction's message was refused for good (a 5xx to its end,
    or to MAIL): the next recipients' transaction goes at once, as Postfix sends
    it, and is refused alike or not. Left for
    the next attempt, a 1,000-recipient message to a server taking 50 a
    transaction was refused 50 a retry wait, hours long, a notice each time,
    and the last ones expired as "Too many recipients"."""
    return all(got[r][0] >= 500 for r in sending if r not in limited)


def _over_limit(code: int, reply: str) -> bool:
    """A 452 for the server's recipient limit: ``4.5.3``, or no enhanced code of
    its own (``4.0.0`` once ``replies`` gave it one), not a full mailbox's."""
    return code == _TOO_MANY and reply.split(" ", 2)[1:2] in (["4.5.3"], ["4.0.0"])


async def _transaction(
    upstream: Upstream,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    needed: Collection[str],
    envelope_id: str | None,
) -> tuple[dict[str, tuple[int, str]], dict[str, str], str | None, bool, bool]:
    """Each recipient's reply; why, for those whose reply is not their own but
    the whole transaction's (``_shared``); the reply when the upstream could
    not be used at all and may be again later (``relay.unreachable``); whether
    the transaction failed as a whole rather than recipient by recipient; and
    whether its connection was refused as one too many (``Crowded``)."""
    unreachable = None
    whole = crowded = False
    shared: dict[str, str] = {}
    past_rcpt = True  # the upstream answered RCPT: those it did not refuse it took
    try:
        result = await deliver(
            upstream, mail_from, rcpt_tos, data, needed=needed, envelope_id=envelope_id
        )
    except UpstreamError as exc:
        replies = dict.fromkeys(rcpt_tos, (exc.code, exc.line))
        refused = exc.refused if isinstance(exc, RecipientsRefused | PartlyRefused) else {}
        shared = _shared(exc, [rcpt for rcpt in rcpt_tos if rcpt not in refused])
        whole = not isinstance(exc, RecipientsRefused)
        past_rcpt = isinstance(exc, PartlyRefused)
        crowded = isinstance(exc, Crowded)
        if isinstance(exc, Unreachable) and not exc.permanent:
            unreachable = exc.line
    else:
        replies = dict.fromkeys(rcpt_tos, (250, result.reply))
        refused = result.refused
    for rcpt, reply in refused.items():
        replies[rcpt] = (_code(reply), reply)
        shared.pop(rcpt, None)
    if past_rcpt:
        replies.update(_legacy_limit(rcpt_tos, refused))
    return replies, shared, unreachable, whole, crowded


def _legacy_limit(
    rcpt_tos: Sequence[str], refused: Mapping[str, str]
) -> dict[str, tuple[int, str]]:
    """The recipients refused ``552 5.5.3`` after the server took one of this
    transaction's, with the ``452 4.5.3`` it stands for: RFC 821's code for the
    server's recipient limit, which RFC 5321 4.5.3.1.10 says to take as
    temporary. Taken for good, every recipient past the limit failed, the
    automatic BCC copy too, and their sender was told. A server old enough
    to use this code often gives no enhanced one: such a 552 is taken so too,
    and if it was the recipient's full mailbox after all, the further
    transaction, where it is the first, fails it. A 552 with another code
    (5.2.2, a full mailbox) is the recipient's own; so is a 5.5.3 to the
    transaction's first recipient: it is no limit a smaller transaction keeps
    to, and taken for one, a server answering so to any would be sent the
    message again at every attempt until it expired."""
    changed: dict[str, tuple[int, str]] = {}
    taken = False
    for rcpt in rcpt_tos:  # answered in order: one before a refusal was answered
        reply = refused.get(rcpt)
        if reply is None:
            taken = True
        elif taken and _LEGACY_TOO_MANY.match(reply):
            text = f"{reply[10:]} (upstream replied {reply[:9]})".lstrip()
            changed[rcpt] = (_TOO_MANY, f"{_TOO_MANY} 4.5.3 {text}")
    return changed


def _shared(error: UpstreamError, taken: Sequence[str]) -> dict[str, str]:
    """Whom of those the upstream took at RCPT (``taken``) a refusal of the
    whole transaction is not about: a reply to the end of the message can only
    be about the one it was going to, however many others RCPT refused; to
    MAIL FROM, or to a message going to several, it names none of them, and a
    5.1.1 there put every recipient on the suppression list."""
    cause = error.cause if isinstance(error, PartlyRefused) else error
    if isinstance(cause, MessageRefused) and len(taken) == 1:
        return {}
    why = SENDER_REFUSED if isinstance(cause, SenderRefused) else WHOLE_REFUSED
    return dict.fromkeys(taken, why)


def counted(send: Sender, row: TallyRow) -> Sender:
    """``send``, each attempt counted for the metrics under its upstream: ``sent``
    when the upstream took the message for someone, ``deferred`` when for no one
    and some reply was temporary (unreachable, a failed login, a 4xx),
    ``refused`` when every reply was permanent. A tenant's own account that
    fails shows as its upstream's name, which the tenant's counts do not say."""

    async def counted_send(upstream: Upstream, *args: object, **kwargs: object) -> Attempt:
        began = time.monotonic()
        counting = row.began(upstream.name)
        try:
            sent = await send(upstream, *args, **kwargs)
        finally:
            if counting:
                row.ended(upstream.name)
        row.add(tally.UPSTREAM, upstream.name, result(sent))
        if sent.unreachable is None and not sent.crowded:
            row.reached(upstream.name, began)
        return sent

    return counted_send


def result(sent: Attempt) -> str:
    codes = [code for code, _ in sent.replies.values()]
    if any(200 <= code < 300 for code in codes):
        return "sent"
    return "refused" if codes and all(code >= 500 for code in codes) else "deferred"


def _code(reply: str) -> int:
    return int(reply[:3]) if reply[:3].isdigit() else 451
