"""Where a message leaves the relay: an SMTP smarthost or a directory of files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.errors import UpstreamError


@dataclass(frozen=True)
class DeliveryResult:
    """An accepted delivery; ``refused`` lists recipients the upstream would not take.

    A partial refusal is still a delivery: the accepted recipients have the
    message, so the caller reports the refused ones rather than failing and
    making the ERP send everything again.
    """

    reply: str  # the upstream's reply to DATA, or where the directory upstream wrote it
    refused: Mapping[str, str] = field(default_factory=dict)  # recipient -> "550 5.1.1 ..."


class RecipientsRefused(UpstreamError):
    """The upstream refused every recipient. Its own reply stands for them all
    where only one can be given; ``refused`` keeps each recipient's, as in a
    ``DeliveryResult``, so a recipient refused for good fails while another is
    retried, each recorded with what the upstream said to it."""

    def __init__(self, reply: UpstreamError, refused: Mapping[str, str]) -> None:
        super().__init__(reply.code, reply.status, reply.text)
        self.refused = refused


class PartlyRefused(UpstreamError):
    """The message failed (refused, or the connection lost) after the upstream had
    refused some recipients at RCPT: its reply stands for the others, and
    ``refused`` keeps what it said to each refused one, whose own reply stands."""

    def __init__(self, reply: UpstreamError, refused: Mapping[str, str]) -> None:
        super().__init__(reply.code, reply.status, reply.text)
        self.refused = refused
        self.cause = reply  # what the reply answered: MessageRefused at DATA, say


class SenderRefused(UpstreamError):
    """The upstream refused MAIL FROM: its reply is about the envelope sender
    (Postfix's ``reject_unverified_sender`` answers a return path that does
    not exist ``550 5.1.1``), so it lists no recipient however it reads. One
    about the message (its size) is a plain ``UpstreamError``, as is a
    refusal of the transaction (``smtp._about_sender``)."""


class MessageRefused(UpstreamError):
    """The upstream refused the message at DATA: its reply is about one
    recipient only when the transaction had just that one."""


class Unreachable(UpstreamError):
    """The upstream could not be used at all: not reached, TLS failed, no
    greeting or no answer to EHLO, the relay's login or its password refused.
    Every message would have failed alike (see ``relay.unreachable``)."""

    @classmethod
    def of(cls, error: UpstreamError) -> Unreachable:
        return cls(error.code, error.status, error.text)


class Crowded(UpstreamError):
    """One connection more refused (a 421, refused, hung up on before its
    greeting) while another connection to the upstream is open, or opens
    alongside it: its connection limit, not an upstream down. The
    message goes again soon, in line for the slots the limit leaves
    (``relay.slots``); the upstream is neither suspended nor taken as
    reached (``relay.unreachable``)."""
