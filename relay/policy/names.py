"""Names the policy writes into From and Reply-To: a user's, a company's, a desk's.

A name goes into the header as it is written, encoded where it must be, so
what it holds beyond a name reaches recipients too: a second mailbox in a
fixed Reply-To became part of the first's name.
"""

from __future__ import annotations

import re

# a run of characters an address may hold, either side of its @
_ADDRESS_LIKE = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
_EXAMPLE = "'Office Desk <desk@acme.example>'"


def mailboxes(value: str) -> int:
    """How many mailboxes a fixed Reply-To holds: the pieces between commas and
    semicolons outside quotes, brackets and comments that hold an address.
    ``Gross, Jürgen <j@x.example>`` is one, as the relay reads a header."""
    return sum(1 for piece in _pieces(value) if _ADDRESS_LIKE.search(piece))


def _pieces(value: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    quoted, escaped, angle, depth = False, False, False, 0
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(ch, 0)
        elif angle:
            angle = ch != ">"
        elif ch in ",;":
            pieces.append("".join(current))
            current = []
            continue
        else:
            quoted, angle, depth = ch == '"', ch == "<", 1 if ch == "(" else 0
        current.append(ch)
    pieces.append("".join(current))
    return pieces


def more_than_one(value: str, count: int) -> str:
    """The header holds one mailbox; a list is for a forwarding address to keep."""
    return (
        f"{value!r} holds {count} addresses: expected one, with a name if wanted"
        f" ({_EXAMPLE}); for replies to reach several, give one address that forwards to them"
    )
