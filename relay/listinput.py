"""A list piped to a tool as ``-`` (addresses, queue IDs), one item a line.

Lists come from elsewhere: exported from a spreadsheet or saved by Notepad
(UTF-8 with a byte-order mark, CRLF), or written in the locale's own
encoding. A mark says the rest is UTF-8 whatever the locale: read in a
Latin-1 locale, it became the first item's ``ï»¿`` and the rest was garbled.
"""

from __future__ import annotations

import codecs
from typing import TextIO

from relay.errors import RelayError


class ListInputError(RelayError):
    """Standard input is not text in the encoding it was read in."""


def read_lines(stream: TextIO | None) -> list[str]:
    """The non-blank lines of ``stream`` (None: stdin closed, ``<&-``, no lines)."""
    if stream is None:
        return []
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # text with no bytes below it
        text = stream.read().removeprefix("\ufeff")
    else:
        text = _decoded(buffer.read(), stream.encoding or "utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _decoded(data: bytes, encoding: str) -> str:
    skipped = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    if skipped:
        encoding = "utf-8"
    try:
        return data[skipped:].decode(encoding)
    except UnicodeDecodeError as exc:
        at = skipped + exc.start  # as the input has it, mark included
        raise ListInputError(
            f"standard input is not {encoding} text: byte {data[at]:#04x} at offset {at}"
        ) from exc
