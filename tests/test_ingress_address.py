"""The fast path for MAIL/RCPT paths gives exactly what aiosmtpd's parser gives,
once a display name before the path is dropped."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.ingress.address import (
    RECIPIENT,
    SENDER,
    mailbox_refusal,
    path_end,
    plain_path,
    without_display_name,
)
from relay.ingress.protocol import RelaySMTP

PIECES = st.sampled_from(
    [*"abcXYZ019.@<> \t\r\n\x0b\"()\\,;:[]!#$%&'*+/=?^_`{|}~-é", "SIZE=100", "BODY=8BITMIME"]
)

PART = st.one_of(
    st.from_regex(r"[a-z0-9+_'-]{1,6}(\.[a-z0-9-]{1,4}){0,2}", fullmatch=True),
    st.text(alphabet="abz09.-+_'\" \\()[]é", min_size=0, max_size=12),
)
SUFFIX = st.sampled_from(["", " ", " SIZE=100", "SIZE=1", " (c) SIZE=1", "\tBODY=7BIT", "(c)", ">"])
NAME = st.sampled_from(["", " ", '"Jan" ', "Jan Janssens ", "(c)", '"a<b" ', "J\ran ", "é "])
PATHS = st.builds(lambda a, b, c, d: f"{a}<{b}@{c}>{d}", NAME, PART, PART, SUFFIX)


def _protocols(limit: int) -> tuple[SMTP, RelaySMTP]:
    async def make() -> tuple[SMTP, RelaySMTP]:
        ours = RelaySMTP(object(), listener_name="t", allow=(), connections=set())
        theirs = SMTP(object())
        ours.local_part_limit = theirs.local_part_limit = limit
        return theirs, ours

    return asyncio.run(make())


THEIRS, OURS = _protocols(0)
THEIRS_LIMITED, OURS_LIMITED = _protocols(8)


# thousands of examples: about 12 s alone, minutes on a machine busy with other
# work, where the suite's 60 s bound failed it for being slow
@pytest.mark.timeout(600)
@given(st.one_of(st.lists(PIECES, max_size=30).map("".join), PATHS))
@settings(max_examples=3000, deadline=None)
@example("<a@b.example>")
@example("<a.b@c.example> SIZE=100")
@example("<a..b@c.example>")
@example("<.a@c.example>")
@example("<a@c.example.>")
@example("< a@c.example>")
@example("<a@c.example >")
@example("<a@[127.0.0.1]>")
@example('<"a b"@c.example>')
@example("<>")
@example("<postmaster>")
@example("<é@c.example>")
@example("<a@b>>")
@example("<a@b>(x)")
@example("<a@b> (x) SIZE=1")
@example("<a@b> \t SIZE=1")
@example("<a@b>SIZE=1")
@example("<@relay.example:a@b.example>")
@example('"Jan" <a@b.example> SIZE=1')
@example('"Jan" <"a b"@c.example>')
@example("Jan <a<b@c.example>>")
@example("<a@b.example")
@example("<")
@example('<"a>b"@c.example>')
@example('<"a>b"@c.example')
@example('<"a>b@c.example')
@example('<a"b@c.example>')
@example('<"a@c.example> SIZE=1')
def test_same_result_as_aiosmtpd(arg: str) -> None:
    """aiosmtpd's result for the path without its display name: it read the
    name as the address, and the path after it as parameters (a ``501``).
    A path opened and never closed has no address: aiosmtpd's parser took
    what followed the ``<`` (or raised, on ``<`` alone)."""
    path = without_display_name(arg)
    if path.startswith("<") and path_end(path) is None:
        assert _outcome(OURS, arg) == _outcome(OURS_LIMITED, arg) == (None, None)
        return
    assert _outcome(OURS, arg) == _outcome(THEIRS, path)
    assert _outcome(OURS_LIMITED, arg) == _outcome(THEIRS_LIMITED, path)


def _outcome(protocol: SMTP, arg: str) -> object:
    """The parse, or the exception aiosmtpd's parser raises on some input (e.g. ``<``)."""
    try:
        return protocol._getaddr(arg)
    except Exception as exc:  # comparing failures too
        return type(exc)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<jan@acme.example>", ("jan@acme.example", "")),
        ("<j.o'k+x@a-b.example> SIZE=9", ("j.o'k+x@a-b.example", "SIZE=9")),
        ("<jan@acme.example> (comment) SIZE=9", None),
        ("<jan@acme.example>\x0bBODY=8BITMIME", None),  # other white space: the parser decides
        ("<a..b@acme.example>", None),
        ('<"a b"@acme.example>', None),
        ("<>", None),
        ("jan@acme.example", None),
        ("<jan@acme.example", None),
    ],
)
def test_plain_path(arg: str, expected: tuple[str, str] | None) -> None:
    assert plain_path(arg) == expected


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ('"Jan" <jan@acme.example>', "<jan@acme.example>"),
        ("Jan Janssens <jan@acme.example> SIZE=9", "<jan@acme.example> SIZE=9"),
        ('"Customer"<q4@example.org>', "<q4@example.org>"),
        ("Jan J. Janssens (sales) <j@acme.example>", "<j@acme.example>"),
        ('"Janssens, Jan \\"JJ\\"" <j@acme.example>', "<j@acme.example>"),
        ('"Jan" <>', "<>"),
        ("<jan@acme.example>", "<jan@acme.example>"),
        # no display name: parsed whole, as before
        ("jan@acme.example <jan@acme.example>", "jan@acme.example <jan@acme.example>"),
        ('"a<b" <jan@acme.example>', '"a<b" <jan@acme.example>'),
        ('"a>b" <jan@acme.example>', '"a>b" <jan@acme.example>'),
        ("Jan\r <jan@acme.example>", "Jan\r <jan@acme.example>"),
        ('"Jan\x00" <jan@acme.example>', '"Jan\x00" <jan@acme.example>'),
        ('"Jan <jan@acme.example>', '"Jan <jan@acme.example>'),
        ("Jan Janssens", "Jan Janssens"),
    ],
)
def test_without_display_name(arg: str, expected: str) -> None:
    assert without_display_name(arg) == expected


def test_a_long_name_with_no_path_is_read_in_linear_time() -> None:
    """A run of letters splits into words in exponentially many ways."""
    start = time.monotonic()
    assert without_display_name("a" * 5000 + " b" * 200) == "a" * 5000 + " b" * 200
    assert time.monotonic() - start < 0.5


def test_local_part_limit_applies_on_the_fast_path() -> None:
    assert OURS_LIMITED._getaddr("<toolongname@acme.example>") == (None, None)
    assert OURS_LIMITED._getaddr("<short@acme.example>") == ("short@acme.example", "")


@pytest.mark.parametrize(
    "address",
    [
        "jan@acme.example",
        "o'brien+x@sub.example.org",
        "A.B@EXAMPLE.ORG",
        "root@localhost",
        "l" * 64 + "@" + "d" * 60 + ".example",  # at the lengths, not past them
        "root@" + "d" * 63 + ".example",
        "l" * 64 + "@" + ("d" * 63 + ".") * 2 + "d" * 61,  # 254 octets
    ],
)
def test_mailbox_taken(address: str) -> None:
    assert mailbox_refusal(address, RECIPIENT) is None


@pytest.mark.parametrize(
    ("address", "text"),
    [
        ('"postmaster@x"', "Quoted local parts are not supported: "),
        ('"a b"@acme.example', "Quoted local parts are not supported: "),
        ("root@", "Bad address syntax: "),
        ("root@[192.0.2.1]", "Bad address syntax: "),
        ("root@acme..example", "Bad address syntax: "),
        ("root@acme_x.example", "Bad address syntax: "),
        ("root@acme.example.", "Bad address syntax: "),
        ("root@" + "d" * 64 + ".example", "Bad address syntax: "),  # a label over 63 octets
        ("l" * 65 + "@example.org", "Address longer than SMTP allows (64 octets before the @"),
        ("a@" + ("d" * 60 + ".") * 5 + "org", "Address longer than SMTP allows ("),
        ("l" * 64 + "@" + ("d" * 63 + ".") * 2 + "d" * 62, "Address longer than SMTP allows ("),
    ],
)
def test_mailbox_refused(address: str, text: str) -> None:
    refused = mailbox_refusal(address, SENDER)
    assert refused is not None
    assert refused.line.startswith("553 5.1.7 " + text)
