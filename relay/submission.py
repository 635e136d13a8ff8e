"""What ingress hands to the pipeline: one SMTP transaction, as received."""

from __future__ import annotations

from dataclasses import dataclass


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
