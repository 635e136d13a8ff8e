"""A read-only view of a submitted message, for the policy stages to look at.

The email package is used here only to *read* values (decoded header text,
addresses, attachment file names); the bytes that are sent are edited by
``relay.rewrite`` and never regenerated from this view.

A header block that is valid UTF-8 is read as UTF-8 (RFC 6532), as ERPs
write names and subjects that way; in one that is not, a line that is not
UTF-8 is read as Windows-1252, what a legacy ERP on Windows writes and what
the WHATWG Encoding Standard reads for a page labelled ISO-8859-1.
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import re
from dataclasses import dataclass, field
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.utils import decode_params, getaddresses

from relay import headers


class _Part(Message):
    """A MIME part whose parameters (``boundary``, ``filename``) are split in one
    pass. The email package's own split recounts the quotes before each ``;``:
    a ``Content-Type`` with an open quote and 50 KB of ``;`` kept the worker's
    event loop busy for 5 seconds, growing with the square of its size."""

    def _get_params_preserve(self, failobj: object, header: str) -> object:
        value = self.get(header)
        if value is None:
            return failobj
        params = []
        for piece in split_params(str(value)):
            name, sep, val = piece.partition("=")
            params.append((name.strip(), val.strip() if sep else ""))
        return decode_params(params)


_PARAM_BREAKS = re.compile(r'(?<!\\)"|;')


def split_params(value: str) -> list[str]:
    """A header value's ``;``-separated pieces as the email package splits them
    (a ``;`` inside quotes, a quote after a backslash not counting as one), each
    stripped, with a parameter's name lower-cased."""
    pieces, start, quoted = [], 0, False
    for found in _PARAM_BREAKS.finditer(value):
        if found[0] == '"':
            quoted = not quoted
        elif not quoted:
            pieces.append(value[start : found.start()])
            start = found.end()
    pieces.append(value[start:])
    return [_named(piece) for piece in pieces]


def _named(piece: str) -> str:
    name, sep, val = piece.partition("=")
    return (name.strip().lower() + "=" + val.strip()).strip() if sep else piece.strip()


_PARSER = email.parser.BytesParser(_Part, policy=email.policy.compat32)
_HEADERS = email.parser.HeaderParser(policy=email.policy.compat32)
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True, eq=False)
class MessageView:
    """Header fields are read at once, decoded when first asked for; the MIME structure
    only when a rule asks for attachment names, since parsing a large message's parts
    costs more than the rest."""

    written: tuple[tuple[str, str], ...]  # (name, unfolded value as written), in order
    raw: bytes = field(repr=False)
    _addresses: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """(name, decoded unfolded value), in order."""
        return tuple((name, decode(value)) for name, value in self.written)

    @functools.cached_property
    def attachments(self) -> tuple[str, ...]:
        """File names of every MIME part that has one; none where the email
        package's parser recurses too deep (parts nested a thousand levels)."""
        try:
            return tuple(_filenames(_PARSER.parsebytes(self.raw)))
        except RecursionError:
            return ()

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def get_all(self, name: str) -> tuple[str, ...]:
        name = name.lower()
        return tuple(v for n, v in self.headers if n.lower() == name)

    def addresses(self, name: str) -> tuple[tuple[str, str], ...]:
        """(decoded display name, address) pairs of every ``name`` header that names
        a mailbox SMTP can deliver to.

        The value is parsed as written and only the names are decoded after: an
        encoded word may hold ``<``, ``,`` or ``@``, which are text in a name and
        must not turn one mailbox into another. Empty addresses and ones longer
        than RFC 5321 allows (4.5.3.1) are left out: no server takes them, and so
        is a value the email package's parser recurses on too deep (comments or
        groups nested hundreds of levels), which would otherwise fail the message.
        Each name is parsed once: an unknown sender's From is read to identify it
        and again to say so.
        """
        name = name.lower()
        found = self._addresses.get(name)
        if found is None:
            found = self._addresses[name] = self._parse_addresses(name)
        return found

    def _parse_addresses(self, name: str) -> tuple[tuple[str, str], ...]:
        try:
            pairs = getaddresses([v for n, v in self.written if n.lower() == name])
        except RecursionError:
            return ()
        return tuple((decode(n), a) for n, a in pairs if _deliverable(a))

    @property
    def subject(self) -> str:
        return self.get("Subject") or ""


def decode(value: str) -> str:
    """Decode RFC 2047 words; a malformed word is kept as it was written."""
    unfolded = _FOLD.sub("", value)
    if "=?" not in unfolded:
        return unfolded  # no encoded word: what the decoder would give back, at no cost
    try:
        return str(make_header(decode_header(unfolded)))
    except (ValueError, LookupError, UnicodeError, MessageError):  # a charset named in 8 bits
        return unfolded


def _deliverable(address: str) -> bool:
    return "@" in address and headers.fits_smtp(address)


def read(raw: bytes, split: tuple[list[headers.Field], int] | None = None) -> MessageView:
    """``split`` is ``headers.split_at(raw)`` when the caller has it already."""
    head = _head(raw)
    fields = _plain_fields(head, split if split is not None and split[1] == len(head) else None)
    if fields is None:
        fields = [(name, str(value)) for name, value in _HEADERS.parsestr(_text(head)).items()]
    return MessageView(
        written=tuple((name, _FOLD.sub("", value)) for name, value in fields), raw=raw
    )


def _text(head: bytes) -> str:
    """The header block as UTF-8 text, or else line by line: a name in Latin-1
    bytes came out as ``J\ufffdrgen`` in the signed ``Reply-To``."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(_line_text(line) for line in head.splitlines(keepends=True))


def _line_text(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1").translate(_WINDOWS_1252)


def _windows_1252(byte: int) -> str:
    """Python's codec has no character for five of the bytes; WHATWG maps them
    to the C1 controls, as Latin-1 does."""
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


_WINDOWS_1252 = str.maketrans({byte: _windows_1252(byte) for byte in range(0x80, 0xA0)})


def _plain_fields(
    head: bytes, split: tuple[list[headers.Field], int] | None = None
) -> list[tuple[str, str]] | None:
    """(name, raw value) as the email package's compat32 parser gives them for the
    block's ``_text``, for a header block with nothing unusual in it (UTF-8, CRLF or
    LF line endings, every line a field or a continuation); None for anything else,
    which the parser reads.

    The parser was 5% of the relay's CPU for what is, for nearly every message,
    splitting lines at colons; tests/test_message_view.py holds the two readings
    to each other.
    """
    if head.count(b"\r") != head.count(b"\r\n"):
        return None
    if not head.isascii():
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return None
    fields, end = split or headers.split_at(head)
    if end != len(head):
        return None
    found = []
    for one in fields:
        value = one.raw.decode("utf-8").split(":", 1)[1]
        found.append((one.name, value.lstrip(" \t").rstrip("\r\n")))
    return found


def _head(raw: bytes) -> bytes:
    """Up to the blank line: the header parser stops there, but first splits
    everything it is given into lines, a 100 KB body included."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf)  # not through the body
    ends = [i for i in (crlf, lf) if i >= 0]
    return raw[: min(ends) + 2] if ends else raw


def _filenames(msg: Message) -> list[str]:
    """A name the email package cannot read (a broken RFC 2231 parameter: its
    charset unknown, its pieces misnumbered) is left out rather than failing the
    message, which would be answered 451 at every try."""
    names = []
    for part in msg.walk():
        try:
            filename = part.get_filename()
        except (TypeError, ValueError, LookupError, MessageError):
            continue
        if filename:
            names.append(decode(str(filename)))
    return names
