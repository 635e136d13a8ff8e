"""What a received message must look like before the pipeline sees it.

aiosmtpd 1.4.6 only ends DATA at <CR><LF>.<CR><LF>, so none of the SMTP
smuggling sequences (``\\n.\\n``, ``\\r.\\r``, ``\\n.\\r\\n``, ...) end a message
early; but the bytes around them, commands meant for a "second" message
included, are passed on as message content. An upstream that does end DATA
there would then see the smuggled message, so a bare CR or LF refuses the
whole message (RFC 5321 2.3.8: they MUST NOT be sent). The code is the one
Microsoft 365 uses for bare line feeds, which ERP administrators can look up.
"""

from __future__ import annotations

from relay.errors import Rejected

MAX_LINE = 998  # octets without CRLF, RFC 5322 2.1.1

BARE_NEWLINE = Rejected(
    550, "5.6.11", "Bare <CR> or <LF> received: lines must end with <CR><LF> (RFC 5321 2.3.8)"
)
NUL = Rejected(554, "5.6.0", "NUL characters are not allowed in a message")
LINE_TOO_LONG = Rejected(
    500, "5.5.2", f"Line too long: at most {MAX_LINE} characters per line (RFC 5321 4.5.3.1.6)"
)


def refusal(data: bytes) -> Rejected | None:
    """The reply that refuses ``data`` (dot-unstuffed, as aiosmtpd hands it over), or None.

    Counting and splitting run in C: on a 25 MB message a regular expression
    would hold up every other session for seconds.
    """
    pairs = data.count(b"\r\n")
    if data.count(b"\r") != pairs or data.count(b"\n") != pairs:
        return BARE_NEWLINE
    if b"\0" in data:
        return NUL
    if max(map(len, data.split(b"\r\n")), default=0) > MAX_LINE:
        return LINE_TOO_LONG
    return None
