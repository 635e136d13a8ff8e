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


# a line end, or what turns a line round or hides in it (bidi overrides,
# zero-width characters): decoded, a name (``=0A``) began a line of its own
_IN_A_LINE = re.compile(r"[\n\u200b\u202a-\u202e\u2066-\u2069\ufeff]")


def one_line(text: str) -> str:
    """``text`` kept to the line it is shown in."""
    return _IN_A_LINE.sub(escaped_match, text)


# also the controls and invisible marks a value may carry, for text that is
# quoted within a line of its own kind (a reason): a terminal acts on them
_UNSEEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def quoted(text: str) -> str:
    """``text`` with nothing in it a reader cannot see for what it is."""
    return _UNSEEN.sub(escaped_match, text)
