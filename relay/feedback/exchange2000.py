"""Exchange 2000 and 2003's bounce in words, which flufl.bounce does not read.

Those servers wrote no RFC 3464 report: a text part that says "The following
recipient(s) cannot be reached:" (or "could not be reached:"), each address
quoted and followed by the date, and below it the reason and a status code
(``<HOST #5.1.1>``); a German one says "Folgende(r) Empfänger konnte(n)
nicht erreicht werden:", under ``Unzustellbar:``, each address followed by
``am`` and the date. flufl.bounce's Exchange detector looks for Exchange
5.5's wording only, so such a bounce was "neither a bounce nor a complaint":
the dead address never listed, its sender never told. Servers of that age
still answer for some companies.
"""

from __future__ import annotations

import re
from email.message import Message

from flufl.bounce._interfaces import NoFailures, NoTemporaryFailures, Recipients

from relay.message import decode

_HEADING = re.compile(
    r"^(?:The following recipient\(s\) (?:cannot|could not) be reached"
    # the umlaut as the charset gave it, or as two undecoded 8-bit bytes
    r"|Folgende\(r\) Empf\S{1,2}nger konnte\(n\) nicht erreicht werden):\s*$"
)
_SUBJECTS = ("undeliverable:", "unzustellbar:")
# "      'a@b' on 06.12.2026 10:40" (or without the quotes; "am" in German)
_ENTRY = re.compile(r"^\s+'?([^\s'@<>]+@[^\s'@<>]+?)'? (?:on|am) \S")


class Exchange2000:
    """A flufl.bounce detector: the addresses under the heading, in the first
    text part of a report whose subject says ``Undeliverable:`` (``Unzustellbar:``)
    as those servers wrote it (a person's reply quoting one says ``RE: Undeliverable:``),
    not in the copy it returns. It reads the text as flufl.bounce's detectors
    do: as ``relay.feedback.parse`` decoded it for them."""

    def process(self, msg: Message) -> tuple[Recipients, Recipients]:
        subject = decode(str(msg.get("Subject", "")))  # an original's in Latin-1 is encoded
        if not subject.lstrip().lower().startswith(_SUBJECTS):
            return NoFailures
        text = _first_text(msg)
        if text is None:
            return NoFailures
        found: set[bytes] = set()
        listing = False
        for line in text.splitlines():
            if not listing:
                listing = bool(_HEADING.match(line))
            elif line.strip() and not line[:1].isspace():
                break  # the list ends where unindented text begins
            elif (entry := _ENTRY.match(line)) is not None and entry.group(1).isascii():
                found.add(entry.group(1).encode("ascii"))
        return (NoTemporaryFailures, frozenset(found)) if found else NoFailures


def _first_text(msg: Message) -> str | None:
    for part in msg.walk():
        if part.get_content_maintype() == "message":
            return None  # past the report, into what it returns
        if part.get_content_type() == "text/plain":
            payload = part.get_payload()
            return payload if isinstance(payload, str) else None
    return None
