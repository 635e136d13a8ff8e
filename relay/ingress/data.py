"""Reading the DATA section in large pieces instead of line by line.

aiosmtpd 1.4 reads DATA one line at a time, a few Python steps per line:
for a 100 KB invoice (1,300 lines of base64) that was most of what the
relay spent receiving it. This reads up to the next ``.<CR><LF>`` at a
time (base64 has no dots, so usually the whole message at once) with the
stream reader's window widened, and ends exactly where aiosmtpd does: at
<CR><LF>.<CR><LF> and nowhere else, leaving any pipelined command after it
unread. Everything else (line length, bare CR or LF, NUL) is judged on the
whole message by ``content.refusal``, as before.

A client that ends its lines with a bare LF ends the data with ``.<LF>``
and then waits for a reply that, by those rules, would never come: it heard
nothing until the idle timeout. When the data so far holds such a dot line
and nothing more comes for ``STALL`` seconds, the section ends as a bare
end, for the caller to refuse; what the client sent after it (a pipelined
``QUIT``, say: the dot line then is not the last thing received) is never
read as SMTP. A bare line feed anywhere is refused in any case, so a bare
end never cuts short a message that would have been taken.
"""

from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass

WINDOW = 1 << 16  # bytes the reader may buffer while DATA comes in
_DOT_LINE = b".\r\n"
_END = b"\r\n.\r\n"
_STUFFED = b"\r\n."  # a line's first dot: added by the client, or the final one
_BARE_DOT_LINE = re.compile(rb"(?<!\r)\n\.\r?\n|\n\.\n")  # a dot line not all in CRLFs
_LF_DOT_LF = b"\n.\n"
STALL = 1.0  # seconds of silence after a bare end before it counts as one


class Overflow(enum.Enum):
    NONE = "none"
    TOO_MUCH = "too much"  # past the size limit: the rest was read and dropped


@dataclass(frozen=True)
class Data:
    content: bytes  # dot-unstuffed, ending in <CR><LF> unless empty
    overflow: Overflow
    bare_end: bool = False  # ended by a dot line not in <CR><LF>s; content empty


async def read(reader: asyncio.StreamReader, limit: int | None) -> Data:
    """Read one DATA section; past ``limit`` bytes it is drained and dropped."""
    window = reader._limit  # private to asyncio; widened for this section only
    reader._limit = max(window, WINDOW)
    try:
        return await _read(reader, limit)
    finally:
        reader._limit = window


async def _read(reader: asyncio.StreamReader, limit: int | None) -> Data:
    received = bytearray()
    size = 0  # of the mail: without the dots added for transparency (RFC 1870 4)
    overflow = Overflow.NONE
    tail = b"\r\n"  # the section starts at a line start, as if after a CRLF
    bare = False  # a bare dot line came before what is now waiting
    while True:
        try:
            piece = await _until_dot_line(reader, tail, bare)
        except asyncio.LimitOverrunError as exc:
            piece = await reader.readexactly(exc.consumed)
        if piece is None:
            return Data(b"", overflow, bare_end=True)
        size += len(piece) - (tail[-2:] + piece).count(_STUFFED)
        bare = bare or _LF_DOT_LF in piece or bool(_BARE_DOT_LINE.search(tail + piece[:4]))
        joined_tail = tail[-2:]
        tail = (tail + piece[-len(_END) :])[-len(_END) :]
        ended = tail == _END
        content = size - len(b"\r\n") if ended else size  # the final dot line is not mail
        if overflow is Overflow.NONE and limit and content > limit:
            overflow = Overflow.TOO_MUCH
            received = bytearray()
        if overflow is Overflow.NONE:
            received += _unstuffed(joined_tail, piece)
        if ended:
            break
    if overflow is not Overflow.NONE:
        return Data(b"", overflow)
    del received[-len(b"\r\n") :]  # the final dot line, its dot gone as if stuffed
    return Data(bytes(received), overflow)


async def _until_dot_line(reader: asyncio.StreamReader, tail: bytes, bare: bool) -> bytes | None:
    """The next piece up to a ``.<CR><LF>``, or None for a bare end (see above):
    ``bare`` if one came in the pieces before."""
    while True:
        try:
            async with asyncio.timeout(STALL):
                return await reader.readuntil(_DOT_LINE)
        except TimeoutError:
            # The proper end may have come in just as the timer ran out: it is
            # waiting in the buffer, and the next readuntil returns it.
            if _DOT_LINE in reader._buffer:  # private to asyncio, read only
                continue
            if bare or _BARE_DOT_LINE.search(tail + bytes(reader._buffer)):
                return None


def _unstuffed(before: bytes, piece: bytes) -> bytes:
    """``piece`` without the leading dot of each line that has one (RFC 5321
    4.5.2), ``before`` the two bytes that came before it (a CRLF at the start).
    Piece by piece, each at most the reader's window: unstuffed whole, a 25 MB
    message with dot lines took a third copy of itself at once."""
    return (before + piece).replace(_STUFFED, b"\r\n")[len(before) :]
