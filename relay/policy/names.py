"""Names the policy writes into From and Reply-To: a user's, a company's, a desk's.

A name goes into the header as it is written, encoded where it must be, so
what it holds beyond a name reaches recipients too: an encoded word is
encoded again and read as ``=?utf-8?q?...?=``, an address in it reads as the
sender's, and a second mailbox in a fixed Reply-To became part of the
first's name.
"""

from __future__ import annotations

import re
import string
from types import SimpleNamespace

from yaml.nodes import Node

from relay import message
from relay.policy import values
from relay.policy.schema import Ctx, text

_WORD = re.compile(message.ENCODED_WORD)
# a run of characters an address may hold, either side of its @
_ADDRESS_LIKE = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
_EXAMPLE = "'Office Desk <desk@acme.example>'"
# whom the warning about {user.address} shows the From of
_SAMPLE = {
    "user": SimpleNamespace(name="Jan Janssens", address="jan@acme.example"),
    "tenant": SimpleNamespace(name="Acme"),
}


def person(ctx: Ctx, node: Node, path: str) -> str | None:
    """A user's name, which the display name template puts before the From."""
    return _name(ctx, node, path, "a person's name", "the user's address or aliases")


def company(ctx: Ctx, node: Node, path: str) -> str | None:
    """A tenant's name, which the display name template puts before the From."""
    return _name(ctx, node, path, "a company name", "the tenant's address")


def _name(ctx: Ctx, node: Node, path: str, expected: str, home: str) -> str | None:
    value = text(ctx, node, path, expected)
    if value is None:
        return None
    problem = encoded_word(value) or address_in(value, f"the address goes in {home}")
    if problem:
        ctx.problem(node, path, f"{value!r} {problem}")
        return None
    return value


def template(value: str, literal: str) -> str | None:
    """Why a display name template, whose text around its placeholders is
    ``literal``, could not stand in a From's name, or None."""
    where = "the address is the From's own"
    if address_in(literal, where):  # not one a placeholder stands for
        return address_in(value, where)
    return encoded_word(value, "the template")


def warn_of_address_placeholder(
    ctx: Ctx, node: Node | None, path: str, template: str, sender: str
) -> None:
    """``{user.address}`` is a documented placeholder, so a template with it
    loads; but it puts an address in the From's name, as a name the policy
    may not hold, and receivers take the message for one from that address."""
    fields = [part[1] for part in string.Formatter().parse(template)]
    if "user.address" not in fields:
        return
    name = template.format_map(_SAMPLE).replace("\\", "\\\\").replace('"', '\\"')
    ctx.problems.warn(
        node,
        path,
        "{user.address} puts the user's address in the From's name:"
        f' mail goes out as "{name}" <{sender}>, and receivers and mail clients'
        " flag a name that holds an address as a forged sender; {user.name} is"
        " the usual choice",
    )


def encoded_word(name: str, what: str = "the name") -> str | None:
    """An RFC 2047 word written in the policy is text to the relay: it encodes
    it again, and recipients read the ``=?...?=`` as written."""
    if not _WORD.search(name):
        return None
    decoded = message.decode(name)
    word = "is an encoded word" if _WORD.fullmatch(name) else "holds an encoded word"
    if decoded == name:
        return f"{word}; write {what} as it reads"
    return f"{word}; write {what} as it reads: {decoded!r}"


def address_in(name: str, where: str, whose: str = "the sender's", own: str = "") -> str | None:
    """Why ``name`` may not stand before an address: one of its own, which
    recipients would take for ``whose``; ``own``, the address it stands before,
    is no other's (``"desk@acme.example" <desk@acme.example>``)."""
    found = _ADDRESS_LIKE.findall(name)
    if not any(_is_address(f) and f.lower() != own.lower() for f in found):
        return None
    bare = " ".join(_without_addresses(name).split())
    alone = f" ({bare!r})" if bare else ""
    return (
        f"holds an address, which recipients would take for {whose}:"
        f" the name is just the name{alone}; {where}"
    )


def _without_addresses(name: str) -> str:
    kept = re.sub(r"<[^<>]*>", lambda m: "" if _ADDRESS_LIKE.search(m[0]) else m[0], name)
    kept = _ADDRESS_LIKE.sub(lambda m: "" if _is_address(m[0]) else m[0], kept)
    return re.sub(r"\(\s*\)|\[\s*\]", "", kept)


def _is_address(found: str) -> bool:
    """An address with a dot in its domain: ``Team@Home`` is a name."""
    return values.is_address(found) and "." in found.rpartition("@")[2]


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
