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
    if longest_line(data) > MAX_LINE:
        return LINE_TOO_LONG
    return None


def longest_line(data: bytes, piece: int = 1 << 20) -> int:
    """Without CRLF. Split a megabyte at a time: one list of every line of a
    25 MB message would take more memory than the message itself."""
    longest, start = 0, 0
    while start < len(data):
        end = data.rfind(b"\r\n", start, start + piece) if start + piece < len(data) else -1
        stop = len(data) if end < 0 else end
        longest = max(longest, *map(len, data[start:stop].split(b"\r\n")))
        start = stop + 2
    return longest
