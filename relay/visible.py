"""A character that must not reach a log line, a reply or a terminal as itself
(a line end, an escape sequence), written the way Python and YAML read it back:
``\\x1b``, or ``\\u2028`` past 0xff."""

from __future__ import annotations

import re


def escaped(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escaped_match(found: re.Match[str]) -> str:
    """``escaped`` for ``re.sub``."""
    return escaped(found.group())


# a line end, or what turns a line round or hides in it (bidi overrides,
# zero-width characters): decoded, a name (``=0A``) began a line of its own
_IN_A_LINE = re.compile(r"[\n\u200b\u202a-\u202e\u2066-\u2069\ufeff]")


def one_line(text: str) -> str:
    """``text`` kept to the line it is shown in."""
    return _IN_A_LINE.sub(escaped_match, text)


def quoted(text: str) -> str:
    """``text`` with nothing in it a reader cannot see for what it is: what
    Python's ``repr`` escapes (controls, format characters such as bidi marks,
    the soft hyphen and tag characters, separators other than the space)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else escaped(c) for c in text)
