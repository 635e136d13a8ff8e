"""Hand a finished message to its upstream.

``deliver`` returns a ``DeliveryResult`` (the upstream's reply, and the
recipients it refused when it accepted others) or raises ``UpstreamError``
with the upstream's own code and text when it refused the message, or
``451 4.4.x`` when it could not be reached. See ``relay.upstream.smtp`` for
how SMTP replies are mapped and ``relay.upstream.directory`` for the files
the directory upstream writes.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.policy.model import DirectoryUpstream, SmtpUpstream, Upstream
from relay.upstream import DeliveryResult, directory, smtp

__all__ = ["DeliveryResult", "deliver"]


async def deliver(
    upstream: Upstream, mail_from: str, rcpt_tos: Sequence[str], data: bytes
) -> DeliveryResult:
    if isinstance(upstream, SmtpUpstream):
        return await smtp.send(upstream, mail_from, rcpt_tos, data)
    if isinstance(upstream, DirectoryUpstream):
        return await directory.write(upstream, mail_from, rcpt_tos, data)
    raise TypeError(f"unknown upstream type {type(upstream).__name__}")
