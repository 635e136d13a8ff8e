"""What ingress hands to the pipeline: one SMTP transaction, as received."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger("relay")


@dataclass(frozen=True)
class Submission:
    listener: str
    client_address: str
    auth_login: str | None
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # CRLF line endings, dot-unstuffed, as aiosmtpd delivers it
    helo: str = ""  # the name the client gave in EHLO or HELO
    tls: bool = False  # the session ran over TLS
    esmtp: bool = True  # the client greeted with EHLO, not HELO
    # the hash the session's password verified against: a reload that changes
    # it ends what the old password allowed (None where no session logged in)
    auth_hash: str | None = field(default=None, repr=False)
    # the login's tenant when the session logged in: a refusal's records name it
    # though a reload removed the login since (the first answer to a theft)
    auth_tenant: str | None = field(default=None, repr=False)
    # set once the client has closed its side or dropped the connection: a
    # reply may reach no one, so a refusal must not be passed back only by it
    hung_up: asyncio.Event | None = field(default=None, compare=False, repr=False)


def listed(address: str, addresses: Iterable[str]) -> bool:
    """Whether a recipient is among those given already. Case does not tell two
    mailboxes apart here, as for the automatic BCC: a recipient given twice gets
    the message once."""
    wanted = address.lower()
    return any(given.lower() == wanted for given in addresses)


def distinct(addresses: Iterable[str]) -> tuple[str, ...]:
    """Each recipient once, the first spelling kept."""
    found: list[str] = []
    for address in addresses:
        if not listed(address, found):
            found.append(address)
    return tuple(found)


def log_refused(submission: Submission, reply: str, queue_id: str | None = None) -> None:
    """The log line of a message refused after its DATA, the same whatever refused
    it (its size, bare line ends, the policy): a grep for a login or a recipient
    finds every refusal, and for a message too large this line is all there is.
    ``queue_id``: one queued first, whose upstream's refusal is passed back,
    which a grep for its queue ID finds too."""
    log.info(
        "%srefused client=%s login=%s from=<%s> to=%s: %s",
        "" if queue_id is None else f"{queue_id}: ",
        submission.client_address,
        submission.auth_login or "-",
        submission.mail_from,
        ",".join(f"<{r}>" for r in submission.rcpt_tos),
        reply,
    )
