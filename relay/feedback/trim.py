"""A report cut down to what its reader reads, before the email package parses it.

A bounce may return the whole message, 40 MB of base64 attachment among it,
and anyone can mail the return path: parsed whole, 48 MB cost 437 MB of
memory, where the reader looks at no attachment and at the start of a text
only. The cut follows the MIME structure line by line as the email package's
feedparser does, boundaries and defaults included, and leaves out body lines
of leaf parts only: all of a part that is neither text nor a message (nothing
reads those), and what a text part has past KEPT_TEXT of base64 lines. Parts
read whole (delivery-status, feedback-report, rfc822-headers, the RFC 6533
global ones, a text in base64 or uuencoded, whose decoding depends on its
end) and every header are left as they came. Where the email package could
split lines otherwise (a carriage return alone), nothing is cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

# a text part's base64 lines kept before its cut: read in the worst encoding
# (quoted-printable, a charset of four bytes a character) they still give 16
# times the 256 KiB ``parse.SCANNED_LIMIT`` a text is read for
KEPT_TEXT = 4 << 20
HEADER_MOST = 256 * 1024  # one header's bytes followed; past them, nothing more is cut
_READ_WHOLE = (
    "message/delivery-status",
    "message/feedback-report",
    "text/rfc822-headers",
    "message/global",
    "message/global-headers",
    "message/global-delivery-status",
)
_DECODED_WHOLE = ("base64", "x-uuencode", "uuencode", "uue", "x-uue")  # the email package's
_TYPE_FIELDS = (b"content-type", b"content-transfer-encoding")
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")  # feedparser's headerRE
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/=]{4,}\r?\n")
_BASE64_LINES = re.compile(rb"^[A-Za-z0-9+/=]{4,}\r?\n", re.MULTILINE)
_SLICE = 1 << 20  # a text's bytes looked at at once
_LONE_CR = re.compile(rb"\r(?!\n)")

# what the lines are: a header, lines kept, a text's body, lines no one reads
_HEADER, _KEEP, _TEXT, _UNREAD = range(4)


@dataclass(frozen=True)
class _Body:
    """What a header says of the body after it, as the email package reads it."""

    mode: int
    boundary: bytes | None = None  # a multipart's
    digest: bool = False


class _Cut:
    """Where the lines are: the enclosing multiparts' boundaries, innermost
    last, and what the current line is part of."""

    def __init__(self, new_type: type[Message]) -> None:
        self.new_type = new_type
        self.boundaries: list[bytes] = []
        self.outermost: dict[bytes, int] = {}
        self.digest: list[bool] = []
        self.bodies: dict[tuple[bytes, str], _Body] = {}
        self.mode = _HEADER
        self.default = "text/plain"
        self.fields: list[bytes] = []
        self.following = False
        self.header_bytes = 0
        self.counted = 0

    def boundary(self, line: bytes) -> tuple[int, bool] | None:
        """The multipart whose boundary the line is, and whether it closes it. Of
        several, the outermost, as the feedparser reads them."""
        if not self.outermost or not line.startswith(b"--"):
            return None
        rest = line[2:].rstrip(b"\r\n").rstrip(b" \t")
        found = []
        if rest in self.outermost:
            found.append((self.outermost[rest], False))
        if rest.endswith(b"--") and rest[:-2] in self.outermost:
            found.append((self.outermost[rest[:-2]], True))
        return min(found) if found else None

    def to_level(self, level: int, closed: bool) -> None:
        """The multiparts inside ``level`` ended, and ``level`` too when ``closed``."""
        keep = level if closed else level + 1
        while len(self.boundaries) > keep:
            gone = self.boundaries.pop()
            self.digest.pop()
            if self.outermost.get(gone) == len(self.boundaries):
                del self.outermost[gone]
        if closed:
            self.mode = _KEEP  # the epilogue
        else:
            self.start_header("message/rfc822" if self.digest[level] else "text/plain")

    def start_header(self, default: str) -> None:
        self.mode = _HEADER
        self.default = default
        self.fields = []
        self.following = False
        self.header_bytes = 0

    def header_line(self, line: bytes) -> None:
        """The Content-Type and Content-Transfer-Encoding lines kept, with their
        continuations, as the feedparser makes fields of a header's lines."""
        self.header_bytes += len(line)
        if line[:1] in (b" ", b"\t"):
            if self.following:
                self.fields.append(line)
            return
        name = line.split(b":", 1)[0] if not line.startswith(b"From ") else b""
        self.following = name.lower() in _TYPE_FIELDS
        if self.following:
            self.fields.append(line)

    def end_header(self) -> None:
        key = (b"".join(self.fields), self.default)
        body = self.bodies.get(key)
        if body is None:
            body = self.bodies[key] = _body(self.new_type, *key)
        if body.mode == _HEADER:
            self.start_header("text/plain")
            return
        self.mode = body.mode
        self.counted = 0
        if body.boundary is not None:
            self.outermost.setdefault(body.boundary, len(self.boundaries))
            self.boundaries.append(body.boundary)
            self.digest.append(body.digest)

    def text_line(self, line: bytes) -> bool:
        """Whether a text's line is kept: up to KEPT_TEXT of base64 lines."""
        if self.counted >= KEPT_TEXT:
            return False
        if _BASE64_LINE.fullmatch(line):
            self.counted += len(line)
        return True


def _body(new_type: type[Message], fields: bytes, default: str) -> _Body:
    msg = new_type()
    if fields:
        msg = BytesParser(_class=new_type, policy=compat32).parsebytes(
            fields + b"\n", headersonly=True
        )
    msg.set_default_type(default)
    kind = msg.get_content_type()
    encoding = str(msg.get("content-transfer-encoding", "")).lower()
    if kind in _READ_WHOLE:
        return _Body(_KEEP)
    main = msg.get_content_maintype()
    if main == "message":
        return _Body(_HEADER)
    if main == "multipart":
        # without a boundary, or one decoded from RFC 2231 to what no line can
        # be, the whole body is what comes before the parts, and kept
        boundary = msg.get_boundary()
        try:
            written = None if boundary is None else boundary.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            written = None
        return _Body(_KEEP, written, kind == "multipart/digest")
    if main != "text":
        return _Body(_UNREAD)
    return _Body(_KEEP if encoding in _DECODED_WHOLE else _TEXT)


def trimmed(raw: bytes, new_type: type[Message] = Message) -> bytes:
    """``raw`` without the body lines its reader never reads. ``new_type``: the
    message class the report is parsed with, which says what is a message."""
    if b"\r" in raw and _LONE_CR.search(raw):
        return raw
    cut = _Cut(new_type)
    kept: list[bytes] = []
    at, end = 0, len(raw)
    while at < end:
        if cut.mode != _HEADER and not (cut.mode == _TEXT and cut.counted < KEPT_TEXT):
            # only a boundary changes what the lines are: to the next line that can be one
            found = raw.find(b"\n--", at - 1)
            upto = end if found < 0 else found + 1
            if cut.mode == _KEEP:
                kept.append(raw[at:upto])
            at = upto
            if at >= end:
                break
        elif cut.mode == _TEXT:
            at = _text_lines(cut, raw, at, kept)
        stop = raw.find(b"\n", at)
        stop = end if stop < 0 else stop + 1
        line = raw[at:stop]
        at = stop
        level = cut.boundary(line)
        if level is not None:
            kept.append(line)
            cut.to_level(*level)
        elif cut.mode == _HEADER:
            if not _in_header(cut, line, kept):
                kept.append(raw[stop:])
                break
        elif cut.mode == _KEEP or (cut.mode == _TEXT and cut.text_line(line)):
            kept.append(line)
    # the email package holds about eight times what it parses: where the cut
    # saves less than the copy costs (a large text kept whole beside a small
    # attachment cut took 47 MB more than the report alone), the report as it is
    left = sum(map(len, kept))
    return raw if (end - left) * 8 < left else b"".join(kept)


def _text_lines(cut: _Cut, raw: bytes, at: int, kept: list[bytes]) -> int:
    """A text's lines kept a slice at a time, up to the next line that can be a
    boundary, while they stay short of KEPT_TEXT: where the next line is."""
    while True:
        more = raw.find(b"\n", at + _SLICE)
        upto = len(raw) if more < 0 else more + 1
        found = raw.find(b"\n--", at - 1, upto)
        upto = upto if found < 0 else found + 1
        if upto <= at:
            return at
        piece = raw[at:upto]
        counted = cut.counted + sum(map(len, _BASE64_LINES.findall(piece)))
        if counted >= KEPT_TEXT:  # the cut is in this piece, which has no boundary
            kept.extend(line for line in piece.splitlines(keepends=True) if cut.text_line(line))
            return upto
        kept.append(piece)
        cut.counted = counted
        at = upto


def _in_header(cut: _Cut, line: bytes, kept: list[bytes]) -> bool:
    """A line where a header is read; False when the header is past HEADER_MOST."""
    if _HEADER_LINE.match(line):
        cut.header_line(line)
        kept.append(line)
        return cut.header_bytes <= HEADER_MOST
    cut.end_header()
    if line[:1] in (b"\n", b"\r"):  # the empty line that ends it
        kept.append(line)
    elif cut.mode == _HEADER:  # a message without a header: the line is its body's
        return _in_header(cut, line, kept)
    elif cut.mode == _KEEP or (cut.mode == _TEXT and cut.text_line(line)):
        kept.append(line)
    return True
