"""The Received field every relay adds (RFC 5321 4.4).

It tells the next hop, and whoever reads the headers of a complaint, who
handed the message over and how: the client's EHLO name and address, the
relay's host name, the protocol (RFC 3848: SMTP after HELO, ESMTP after
EHLO, with S for TLS and A for a login) and the queue ID, which the relay's
log and audit log carry too. A loop shows up as a pile of them. No ``for``
clause: it would name a BCC recipient to everyone else.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from email.utils import format_datetime
from ipaddress import ip_address

from relay.headers import fold
from relay.submission import Submission

_NOT_DOMAIN = re.compile(r"[^A-Za-z0-9.\-\[\]:]")


def received(
    submission: Submission, hostname: str, queue_id: str, now: datetime, eol: bytes = b"\r\n"
) -> bytes:
    """``eol``: the message's own line ending, as the other edits take it."""
    helo = _NOT_DOMAIN.sub("-", submission.helo)[:255] or "unknown"
    protocol = "SMTP"  # HELO: RFC 3848's S and A qualify ESMTP alone
    if submission.esmtp:
        tls = "S" if submission.tls else ""
        protocol = f"ESMTP{tls}{'A' if submission.auth_login else ''}"
    value = (
        f"from {helo} ({_literal(submission.client_address)})"
        f" by {hostname} with {protocol} id {queue_id}; {_date(now.replace(microsecond=0))}"
    )
    return fold("Received", value).replace(b"\r\n", eol)


@functools.lru_cache(maxsize=2)
def _date(second: datetime) -> str:
    """Formatted once a second, not once a message: it took a quarter of the field's time."""
    return format_datetime(second)


@functools.lru_cache(maxsize=4096)
def _literal(address: str) -> str:
    """The client's address as RFC 5321's TCP-info has it: ``[192.0.2.1]``, ``[IPv6:...]``."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return "unknown"
    if parsed.version == 4:
        return f"[{parsed}]"
    return f"[IPv6:{str(parsed).partition('%')[0]}]"  # a zone (%eth0) is no part of a literal
