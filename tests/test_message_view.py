"""The read-only view of a message: decoded header values as the email package gives them."""

from __future__ import annotations

import re
from email.header import decode_header, make_header

from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay import headers, message


def _decoded_by_the_email_package(value: str) -> str:
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
    try:
        return str(make_header(decode_header(unfolded)))
    except (ValueError, LookupError, UnicodeError):
        return unfolded


PIECES = st.sampled_from([*'ab =?Qq_B\t\r\n"é\udce9', "=?utf-8?q?", "?=", "=C3=A6"])


@given(st.lists(PIECES, max_size=25).map("".join))
@settings(max_examples=3000, deadline=None)
@example("Invoice 7")
@example("=?utf-8?q?Faktura_n=C3=A6r?=")
@example("a\r\n b")
@example("=?bogus")
@example("caf\udce9")
def test_decode_agrees_with_the_email_package(value: str) -> None:
    assert message.decode(value) == _decoded_by_the_email_package(value)


def test_view_reads_encoded_and_plain_values() -> None:
    view = message.read(
        b"Subject: =?utf-8?q?Faktura_n=C3=A6r?= 7\r\n"
        b"From: Jan <jan@acme.example>\r\n"
        b"X-Folded: one\r\n two\r\n"
        b"\r\nbody =?utf-8?q?x?=\r\n"
    )
    assert view.subject == "Faktura nær 7"
    assert view.get("from") == "Jan <jan@acme.example>"
    assert view.get("X-Folded") == "one two"
    assert view.addresses("From") == (("Jan", "jan@acme.example"),)


@given(st.lists(st.sampled_from([b"A: b", b"\r\n", b"\n", b" c", b"x"]), max_size=12).map(b"".join))
@settings(max_examples=2000, deadline=None)
def test_the_header_block_ends_at_the_first_empty_line(raw: bytes) -> None:
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    assert message._head(raw) == (raw[: min(ends) + 2] if ends else raw)


FIELD_PIECES = st.sampled_from(
    [b"Subject", b"From", b"X-A", b":", b" ", b"\t", b"\r\n", b"\n", b"\r", b"\r\n ",
     b"\n\t", b"x", b"=?utf-8?q?n=C3=A6r?=", b"a@b.example", b"\xc3\xa6", b"From ", b"\x00"]
)  # fmt: skip


@given(st.lists(FIELD_PIECES, max_size=30).map(b"".join))
@settings(max_examples=5000, deadline=None)
@example(b"Subject: hi  \r\nTo: a@b.example\r\n")
@example(b"Subject:\r\n folded\r\n\tagain\r\n")
@example(b"Subject: x\n\r\n")
@example(b":empty name\r\n")
@example(b" starts folded\r\n")
@example(b"From x\r\nSubject: y\r\n")
@example(b"Subject: caf\xc3\xa9\r\n")
@example(b"Subject: a\rb\r\n")
def test_headers_read_as_the_email_package_reads_them(head: bytes) -> None:
    """The plain reading, where it answers at all, is the parser's; and read() is
    the parser's reading either way."""
    by_parser = [
        (name, str(value))
        for name, value in message._HEADERS.parsebytes(message._head(head)).items()
    ]
    plain = message._plain_fields(message._head(head))
    if plain is not None:
        assert plain == by_parser
    expected = tuple((name, message.decode(value)) for name, value in by_parser)
    assert message.read(head).headers == expected
    for whole in (head, head + b"\r\nbody: not a field\r\n"):  # with the split made once
        assert message.read(whole, headers.split_at(whole)).headers == message.read(whole).headers


def test_plain_header_blocks_are_read_without_the_parser() -> None:
    head = b"Subject: Invoice 7\r\nFrom: Jan <jan@acme.example>\r\nX-A: one\r\n two\r\n"
    assert message._plain_fields(message._head(head + b"\r\nbody\r\n")) == [
        ("Subject", "Invoice 7"),
        ("From", "Jan <jan@acme.example>"),
        ("X-A", "one\r\n two"),
    ]
