"""A read-only view of a submitted message, for the policy stages to look at.

The email package is used here only to *read* values (decoded header text,
addresses, attachment file names); the bytes that are sent are edited by
``relay.rewrite`` and never regenerated from this view.
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses

from relay import headers

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True, eq=False)
class MessageView:
    """Header values are read at once; the MIME structure only when a rule asks for
    attachment names, since parsing a large message's parts costs more than the rest."""

    headers: tuple[tuple[str, str], ...]  # (name, decoded unfolded value), in order
    raw: bytes = field(repr=False)

    @functools.cached_property
    def attachments(self) -> tuple[str, ...]:
        """File names of every MIME part that has one."""
        return tuple(_filenames(_PARSER.parsebytes(self.raw)))

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def get_all(self, name: str) -> tuple[str, ...]:
        name = name.lower()
        return tuple(v for n, v in self.headers if n.lower() == name)

    def addresses(self, name: str) -> tuple[tuple[str, str], ...]:
        """(display name, address) pairs of every ``name`` header, empty ones left out."""
        pairs = getaddresses(list(self.get_all(name)))
        return tuple((n, a) for n, a in pairs if a and "@" in a)

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
    except (ValueError, LookupError, UnicodeError):
        return unfolded


def read(raw: bytes, split: tuple[list[headers.Field], int] | None = None) -> MessageView:
    """``split`` is ``headers.split_at(raw)`` when the caller has it already."""
    head = _head(raw)
    fields = _plain_fields(head, split if split is not None and split[1] == len(head) else None)
    if fields is None:
        fields = [(name, str(value)) for name, value in _HEADERS.parsebytes(head).items()]
    return MessageView(headers=tuple((name, decode(value)) for name, value in fields), raw=raw)


def _plain_fields(
    head: bytes, split: tuple[list[headers.Field], int] | None = None
) -> list[tuple[str, str]] | None:
    """(name, raw value) as the email package's compat32 parser gives them, for a
    header block with nothing unusual in it (ASCII, CRLF or LF line endings, every
    line a field or a continuation); None for anything else, which the parser reads.

    The parser was 5% of the relay's CPU for what is, for nearly every message,
    splitting lines at colons; tests/test_message_view.py holds the two readings
    to each other.
    """
    if not head.isascii() or head.count(b"\r") != head.count(b"\r\n"):
        return None
    fields, end = split or headers.split_at(head)
    if end != len(head):
        return None
    found = []
    for one in fields:
        value = one.raw.decode("ascii").split(":", 1)[1]
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
    names = []
    for part in msg.walk():
        filename = part.get_filename()
        if filename:
            names.append(decode(str(filename)))
    return names
