"""A character that must not reach a log line, a reply or a terminal as itself
(a line end, an escape sequence), written the way Python and YAML read it back:
``\\x1b``, or ``\\u2028`` past 0xff."""

from __future__ import annotations

import re


def escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escaped_match(found: re.Match[str]) -> str:
    """``escaped`` for ``re.sub``."""
    return escaped(found.group())
