"""The read-only view of a message: decoded header values as the email package gives them."""

from __future__ import annotations

import email.message
import email.parser
import re
import time
from email.errors import MessageError
from email.header import decode_header, make_header
from email.policy import compat32

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from relay import headers, message


def _decoded_by_the_email_package(value: str) -> str | None:
    """None where it gives up on raw 8-bit text beside an encoded word."""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
    try:
        return str(make_header(decode_header(unfolded)))
    except UnicodeDecodeError:
        return None
    except LookupError:  # a charset no codec reads: the package gives up on the whole value,
        return unfolded if unfolded.count("=?") <= 1 else None  # the relay on that word alone
    except (ValueError, UnicodeError, MessageError):
        return unfolded


PIECES = st.sampled_from([*'ab =?Qq_B\t\r\n"é\udce9', "=?utf-8?q?", "?=", "=C3=A6"])


@given(st.lists(PIECES, max_size=25).map("".join))
@settings(max_examples=3000, deadline=None)
@example("Invoice 7")
@example("=?utf-8?q?Faktura_n=C3=A6r?=")
@example("a\r\n b")
@example("=?bogus")
@example("caf\udce9")
@example("?=?é?b?=?=")  # a charset named in 8 bits: CharsetError, no ValueError
@example("=?a?b??=")  # an empty word in a charset no codec reads: kept as written
@example("=?utf-8?q??=?=?=?b?=?=")  # then one named "=": the package kept all, the relay that one
def test_decode_agrees_with_the_email_package(value: str) -> None:
    expected = _decoded_by_the_email_package(value)
    assume(expected is not None)
    assert message.decode(value) == expected


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("Faktura =?utf-8?q?f=C3=B8r?= \u00d8ystein", "Faktura f\u00f8r \u00d8ystein"),
        ("\u00d8 =?utf-8?q?a?= =?utf-8?q?b?= c", "\u00d8 ab c"),  # no space between two words
        ("\u00d8 =?utf-8?b?w7g=?=", "\u00d8 \u00f8"),
        ("\u00d8 =?bogus?q?x?= y", "\u00d8 =?bogus?q?x?= y"),  # an unknown charset: as written
    ],
    ids=["raw-after", "adjacent-words", "base64", "unknown-charset"],
)
def test_encoded_words_beside_raw_utf8_are_decoded_where_they_stand(
    value: str, decoded: str
) -> None:
    """The email package gives up on such a value (RFC 6532 text beside an
    RFC 2047 word), and the notice and the audit log showed the word as written."""
    assert _decoded_by_the_email_package(value) is None or "bogus" in value
    assert message.decode(value) == decoded


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        # Java's name for code page 932, as Oracle and JD Edwards label Japanese
        (
            "=?windows-31j?B?kL+LgY+RIEludm9pY2UgTm8uNDcxMQ==?=",
            "\u8acb\u6c42\u66f8 Invoice No.4711",
        ),
        ("=?8859_1?Q?f=FCr?=", "f\u00fcr"),
        ("=?x-mac-roman?Q?caf=8E?=", "caf\u00e9"),
        ("=?iso-8859-8-i?B?6efl?=", "\u05d9\u05d7\u05d5"),
        ("=?UTF-8*de?Q?Rechnung_77?=", "Rechnung 77"),  # RFC 2231 5: a language
        # a word no codec reads stays as written; its neighbour is decoded all the same
        (
            "=?ISO-8859-1?Q?Rechnung_f=FCr?= =?x-unknown?Q?_Dez?=",
            "Rechnung f\u00fcr =?x-unknown?Q?_Dez?=",
        ),
    ],
)
def test_an_encoded_word_in_a_charset_python_names_otherwise_is_decoded(
    value: str, decoded: str
) -> None:
    """The whole value was kept as written, and an invoice whose subject said so in
    such a word went out as "other", without its sender's copy."""
    assert message.decode(value) == decoded


def test_an_encoded_word_naming_a_charset_in_8_bits_is_kept_as_written() -> None:
    """Its CharsetError escaped the view: the message got 451 at every try."""
    view = message.read("Subject: =?é?b?=?= 7\r\nFrom: a@b.example\r\n\r\nx\r\n".encode())
    assert view.subject == "=?é?b?=?= 7"


@pytest.mark.parametrize(
    "disposition",
    [
        "filename*=iso-8859-1''a.pdf; filename*0=b.pdf",  # TypeError: pieces misnumbered
        "filename*=idna''%C3%A6.pdf",  # UnicodeError
        "filename*=punycode''%C3%A6.pdf",  # UnicodeDecodeError
    ],
)
def test_an_attachment_name_the_email_package_cannot_read_is_left_out(disposition: str) -> None:
    """Its exception escaped the view: the message got 451 at every try."""
    raw = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Disposition: attachment; filename=invoice.pdf\r\n\r\nx\r\n"
        b"--b\r\nContent-Disposition: attachment; " + disposition.encode() + b"\r\n\r\ny\r\n"
        b"--b--\r\n"
    )
    assert message.read(raw).attachments == ("invoice.pdf",)


CONFIRMATION = "Ordrebekr\u00e6ftelse 4711.pdf"
CZECH = "Potvrzen\u00ed objedn\u00e1vky \u2013 4711.pdf"


@pytest.mark.parametrize(
    ("written", "top", "name"),
    [
        (CONFIRMATION.encode(), False, CONFIRMATION),  # raw UTF-8, RFC 6532
        (CONFIRMATION.encode("cp1252"), False, CONFIRMATION),  # a Windows ERP's
        (CONFIRMATION.encode("cp1252"), True, CONFIRMATION),  # the PDF as the message
        (CZECH.encode(), True, CZECH),
    ],
)
def test_an_attachment_name_in_8_bits_is_read_as_a_header_line_is(
    written: bytes, top: bool, name: str
) -> None:
    """Each 8-bit byte came out as U+FFFD, so a rule on a name in any language but
    English missed the document, and its sender had no copy."""
    disposition = b'Content-Disposition: attachment; filename="' + written + b'"\r\n'
    if top:
        raw = b"From: a@b.example\r\nContent-Type: application/pdf\r\n" + disposition
        raw += b"\r\nJVBERi0=\r\n"
    else:
        raw = (
            b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: application/pdf\r\n" + disposition + b"\r\nJVBERi0=\r\n"
            b"--b--\r\n"
        )
    assert message.read(raw).attachments == (name,)


@pytest.mark.parametrize(
    "parameters",
    [
        b"filename*=UTF-8''" + CONFIRMATION.encode(),  # raw bytes where %XX belong
        b"filename*0*=UTF-8''Ordre; filename*1=" + CONFIRMATION[5:].encode(),
        b"filename*=iso-8859-1''" + CONFIRMATION.encode("latin-1"),
        # continued, never encoded: its bytes are read as a header line's
        b'filename*0="'
        + CONFIRMATION[:10].encode()
        + b'"; filename*1="'
        + CONFIRMATION[10:].encode()
        + b'"',
        b"filename*=''" + CONFIRMATION.replace(" ", "%20").encode(),  # no charset named
        # a charset Python names otherwise, as in an encoded word
        b"filename*=x-mac-roman''" + CONFIRMATION.replace(" ", "%20").encode("mac_roman"),
        # not ASCII-compatible: the quotes decode_params leaves on are no part of it
        b"filename*=utf-16be''"
        + "".join(f"%{b:02X}" for b in CONFIRMATION.encode("utf-16be")).encode(),
    ],
)
def test_an_rfc_2231_name_in_8_bits_is_read_in_its_own_charset(parameters: bytes) -> None:
    raw = (
        b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
        + parameters
        + b"\r\n\r\nJVBERi0=\r\n--b--\r\n"
    )
    assert message.read(raw).attachments == (CONFIRMATION,)


@pytest.mark.parametrize(
    ("name", "charset"),
    [
        ("\u5c71\u7530.pdf", "utf-16le"),
        ('a"b.pdf', "utf-16le"),
        ("a\\b.pdf", "utf-16le"),
        ("\\\\fs01\\scans\\Rechnung.pdf", "utf-8"),  # each backslash kept
        ('a\\"b.pdf', "utf-8"),
        ('"\u00e6."', "utf-8"),
    ],
)
def test_an_rfc_2231_name_holding_a_quote_or_backslash_byte_is_whole(
    name: str, charset: str
) -> None:
    """The email package escapes each " and \\ byte of the value (U+5C71 is 0x71 0x5C
    in UTF-16LE): left in, they shifted every character after them; taken out
    and not put back, its own unquoting then took a backslash of the name's."""
    encoded = "".join(f"%{b:02X}" for b in name.encode(charset)).encode()
    raw = (
        b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Disposition: attachment; filename*="
        + charset.encode()
        + b"''"
        + encoded
        + b"\r\n\r\nJVBERi0=\r\n--b--\r\n"
    )
    assert message.read(raw).attachments == (name,)


PARAM_PIECES = st.sampled_from([";", '"', "\\", "=", " ", "\t", "a", "B", "\r\n ", "=?x?="])


@given(st.lists(PARAM_PIECES, max_size=30).map("".join))
@settings(max_examples=3000, deadline=None)
@example('multipart/mixed; boundary="a;b"; x=1')
@example('a; b="c\\"; d"; e')
@example('a; b="c\\\\"; d')
@example("")
@example(";;")
def test_parameters_split_as_the_email_package_splits_them(value: str) -> None:
    assert message.split_params(value) == email.message._parseparam(value)


def test_parameters_are_not_split_by_the_email_packages_quadratic_splitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With an open quote, its splitter recounts the quotes before every ``;``:
    a 52 KB ``Content-Type`` took 4.9 s, 100 KB 20 s, on the worker's event loop."""

    def quadratic(value: str) -> list[str]:
        raise AssertionError("the email package's parameter splitter ran")

    monkeypatch.setattr(email.message, "_parseparam", quadratic)
    stuffing = b";\r\n " * 25_000
    raw = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary=Q; x="' + stuffing + b"\r\n\r\n"
        b"--Q\r\nContent-Disposition: attachment; filename*=utf-8''n%C3%A6r.pdf\r\n\r\nx\r\n"
        b'--Q\r\nContent-Disposition: attachment; filename="a;b.pdf"\r\n\r\ny\r\n'
        b"--Q--\r\n"
    )
    assert message.read(raw).attachments == ("nær.pdf", "a;b.pdf")


@pytest.mark.parametrize("nested", ["(" * 990, ":" * 990], ids=["comments", "groups"])
def test_an_address_header_nested_past_the_parsers_depth_names_no_one(nested: str) -> None:
    """One line under 998 octets made the email package's address parser recurse
    past Python's limit: the RecursionError failed the message with 451 at every try."""
    view = message.read(f"From: {nested}\r\nReply-To: a@b.example\r\n\r\nx\r\n".encode())
    assert view.addresses("From") == ()
    assert view.addresses("Reply-To") == (("", "a@b.example"),)


def test_an_address_header_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown sender's From is read to identify and again to say so in the
    refusal; at ~5 µs a byte each reading of a large one held the event loop."""
    calls = []

    def counted(value: str) -> list[tuple[str, str]]:
        calls.append(value)
        return [("Jan", "jan@acme.example")]

    monkeypatch.setattr(message, "address_list", counted)
    view = message.read(b"From: Jan <jan@acme.example>\r\n\r\nx\r\n")
    assert view.addresses("From") == view.addresses("from") == (("Jan", "jan@acme.example"),)
    assert calls == ["Jan <jan@acme.example>"]


def test_parts_nested_past_the_parsers_depth_have_no_attachment_names() -> None:
    depth = 1200
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    raw = b"From: a@b.example\r\nMIME-Version: 1.0\r\n" + opening + b"\r\nx\r\n"
    assert message.read(raw).attachments == ()


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
     b"\n\t", b"x", b"=?utf-8?q?n=C3=A6r?=", b"a@b.example", b"\xc3\xa6", b"From ", b"\x00",
     b"\xe9", b"\xe2\x80\xa8", b"\xc2\x85"]
)  # fmt: skip


def _parsed(head: bytes) -> list[tuple[str, str]]:
    """compat32's reading of the block's text."""
    found = email.parser.HeaderParser(policy=compat32).parsestr(message.header_text(head))
    return [(name, str(value)) for name, value in found.items()]


@given(st.lists(FIELD_PIECES, max_size=30).map(b"".join))
@settings(max_examples=5000, deadline=None)
@example(b"Subject: hi  \r\nTo: a@b.example\r\n")
@example(b"Subject:\r\n folded\r\n\tagain\r\n")
@example(b"Subject: x\n\r\n")
@example(b":empty name\r\n")
@example(b" starts folded\r\n")
@example(b"From x\r\nSubject: y\r\n")
@example(b"Subject: caf\xc3\xa9\r\n")
@example(b"Subject: caf\xe9\r\n")
@example(b"Subject: a\xe2\x80\xa8b\r\nTo: c\xc2\x85d\r\n")
@example(b"Subject: a\rb\r\n")
def test_headers_read_as_the_email_package_reads_them(head: bytes) -> None:
    """The plain reading, where it answers at all, is the parser's; and read() is
    the parser's reading either way."""
    by_parser = _parsed(message._head(head))
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


def test_raw_utf8_values_are_read_as_utf8() -> None:
    view = message.read(
        "Subject: Faktura for Ørsted \u2013 März\r\n"
        "X-Responsible: Jörg Müller <jorg@acme.example>\r\n"
        'Cc: "Müller, Hans" <hans@acme.example>\r\n'
        "\r\nbody\r\n".encode()
    )
    assert view.subject == "Faktura for Ørsted \u2013 März"
    assert view.addresses("X-Responsible") == (("Jörg Müller", "jorg@acme.example"),)
    assert view.addresses("Cc") == (("Müller, Hans", "hans@acme.example"),)


def test_8bit_lines_that_are_not_utf8_are_read_as_windows_1252() -> None:
    view = message.read(
        b"Subject: caf\xe9 \x80 \x93ok\x94 \x81\r\n"
        b"To: M\xc3\xbcller <m@example.org>\r\n"  # UTF-8 in the same block stays UTF-8
        b"X-Mixed: \xc3\xa6 \xe6\r\n"  # not UTF-8 as a whole line: each byte a character
        b"\r\nbody\r\n"
    )
    assert view.subject == "café € \u201cok\u201d \x81"  # 0x81: no character, WHATWG's C1
    assert view.addresses("To") == (("Müller", "m@example.org"),)
    assert view.get("X-Mixed") == "\u00c3\u00a6 \u00e6"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "=?utf-8?q?=C3=85se_=3Cevil=40attacker.example=3E=2C?= <per@acme.example>",
            (("Åse <evil@attacker.example>,", "per@acme.example"),),
        ),
        (
            "=?utf-8?q?Evil=0D=0ABcc=3A_x=40y.example?= <per@acme.example>",
            (("Evil\r\nBcc: x@y.example", "per@acme.example"),),
        ),
        (
            "=?utf-8?q?Kari=2C_jan=40acme.example?= <kari@acme.example>",
            (("Kari, jan@acme.example", "kari@acme.example"),),
        ),
        ("Per <per@acme.example>,\r\n Åse <ase@acme.example>", (("Per", "per@acme.example"),
                                                               ("Åse", "ase@acme.example"))),
    ],
)  # fmt: skip
def test_addresses_are_parsed_as_written_and_only_names_decoded(
    value: str, expected: tuple[tuple[str, str], ...]
) -> None:
    """An encoded word is text in a display name: what it holds takes no part in parsing."""
    view = message.read(f"X-Responsible: {value}\r\n\r\nbody\r\n".encode())
    assert view.addresses("x-responsible") == expected


def test_addresses_longer_than_smtp_allows_are_left_out() -> None:
    local = "a" * 64
    domain = ".".join(["d" * 60] * 3) + ".example"  # 254 with the local part
    longest = f"{local}@{domain[: 254 - 65]}"
    assert len(longest) == 254
    view = message.read(
        f"To: <{local}a@acme.example>, <{longest}>, <x{longest}>,\r\n"
        f' Per <"{"a" * 600}\r\n {"a" * 600}"@acme.example>\r\n\r\n'.encode()
    )
    assert view.addresses("To") == (("", longest),)


def test_a_value_the_decoder_would_scan_for_minutes_is_kept_as_written() -> None:
    """From each ``=?`` after a line's last ``?=`` the email package's pattern reads
    to the end of the line: a 256 KiB Subject of these held the event loop for
    minutes, growing with the square of its size."""
    value = "=?a?q? " * 9000
    view = message.read(f"Subject: {value}\r\nTo: Jan {value}<j@x.example>\r\n\r\nx\r\n".encode())
    start = time.monotonic()
    assert view.subject == value
    assert view.addresses("To") == (("Jan " + value.strip(), "j@x.example"),)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("word", ["=?utf-8?q?a?= ", "=??q?"])
def test_a_value_of_thousands_of_encoded_words_is_kept_as_written(
    word: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each is quick to scan, but the decoder's joining grew faster than their
    number: a 250 KB Subject of them held the event loop 0.8 s a message."""
    value = word * (250_000 // len(word))
    view = message.read(f"Subject: {value}\r\n\r\nx\r\n".encode())
    with monkeypatch.context() as patched:
        patched.setattr(message, "decode_header", lambda _: pytest.fail("decoded"))
        assert view.subject.strip() == value.strip()
    few = message.read(b"Subject: " + b"=?utf-8?q?a?= " * 40 + b"\r\n\r\nx\r\n")
    assert few.subject.strip() == "a" * 40  # a real one's words are decoded as before


NAMES = st.text(alphabet=st.sampled_from("abcæ -_.;\"'()"), min_size=1, max_size=12)
BODIES = st.binary(max_size=300) | st.text(alphabet="ab -:\r\n.æ", max_size=200)


@given(st.lists(st.tuples(NAMES, BODIES), max_size=4), st.booleans())
@settings(max_examples=300, deadline=None)
def test_attachment_names_are_those_the_whole_message_gives(
    parts: list[tuple[str, bytes | str]], nested: bool
) -> None:
    """The names are read from the message without its base64 lines, which the
    email package held several times over while parsing (about 200 MB for 25 MB)."""
    outer = email.message.EmailMessage()
    outer["From"] = "a@b.example"
    outer.set_content("see attached")
    for name, body in parts:
        if isinstance(body, str):
            outer.add_attachment(body, filename=name)
        else:
            outer.add_attachment(body, maintype="application", subtype="pdf", filename=name)
    if nested:
        inner, outer = outer, email.message.EmailMessage()
        outer["From"] = "c@d.example"
        outer.set_content("forwarded")
        outer.add_attachment(inner, filename="fwd.eml")
    raw = outer.as_bytes().replace(b"\n", b"\r\n")
    whole = email.parser.BytesParser(message._Part, policy=compat32).parsebytes(raw)
    assert message.read(raw).attachments == tuple(message._filenames(whole))


B64 = b"QUJDREVGR0hJSktMTU5PUA=="


@pytest.mark.parametrize(
    "part",
    [
        b"Content-Type: application/pdf\r\n" + B64 + b"\r\n"
        b"Content-Disposition: attachment; filename=order.pdf\r\n\r\nx\r\n",
        b"Content-Disposition: attachment;\r\n" + B64 + b"\r\n filename=order.pdf\r\n\r\nx\r\n",
        b'Content-Type: application/pdf; name="invoice.pdf"\r\n' + B64 + b"\r\n"
        b'Content-Disposition: attachment; filename="other.txt"\r\n\r\nx\r\n',
        b"Content-Type: text/plain\r\n\r\nThisLineIsAlphanumericOnly0123\r\n"
        b"Content-Disposition: attachment; filename=x.pdf\r\n",
    ],
    ids=["in-header", "in-a-folded-field", "before-another-name", "body-then-field"],
)
def test_a_base64_line_where_no_body_begins_stays_for_the_names(part: bytes) -> None:
    """Such a line ends a part's header block for the email package; left out,
    the lines after it were read as that part's fields: names the message does
    not have, a document type the sender could steer."""
    raw = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n' + part + b"--b--\r\n"
    )
    whole = email.parser.BytesParser(message._Part, policy=compat32).parsebytes(raw)
    assert message.read(raw).attachments == tuple(message._filenames(whole))


def _part_header_of(junk: bytes) -> bytes:
    return (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Disposition: attachment; filename=order.pdf; " + junk + b"\r\n\r\nx\r\n"
        b"--b--\r\n"
    )


@pytest.mark.parametrize(
    "junk",
    [b"\r\n ".join([b";" * 900] * 5000), b'"' * 4_500_000, b"a;" * 2_000_000],
    ids=["semicolons", "quotes", "bare-names"],
)
def test_a_part_header_of_megabytes_of_parameters_is_read_in_time(junk: bytes) -> None:
    """A part's header is in the body, not held to the header size limit: 4.5 MB
    of ";" in a Content-Disposition took 4 s of the worker's event loop and
    1.4 GB while its pieces were read."""
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    assert message.read(_part_header_of(junk)).attachments == ("order.pdf",)
    assert time.process_time() - started < 2


def test_empty_parts_past_the_limit_are_not_parsed() -> None:
    """Each part costs the email package about 300 bytes and 7 µs: 20 MB of
    empty parts took 20 s and 1 GB. The names before the limit are read."""
    raw = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n"
        b"\r\n--b\r\nContent-Disposition: attachment; filename=order.pdf\r\n\r\nx\r\n"
        + b"--b\r\n\r\n" * 3_000_000
        + b"--b\r\nContent-Disposition: attachment; filename=late.pdf\r\n\r\nx\r\n--b--\r\n"
    )
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    assert message.read(raw).attachments == ("order.pdf",)
    assert time.process_time() - started < 10  # 20 s before the limit
    few = raw.replace(b"--b\r\n\r\n" * 3_000_000, b"--b\r\n\r\n" * (message.PARTS_LIMIT - 3))
    assert message.read(few).attachments == ("order.pdf", "late.pdf")


def test_lines_of_text_that_begin_with_dashes_are_no_parts() -> None:
    """An order's 10,001 lines ruled with dashes, and an SQL dump's comments, were
    counted as parts: the PDF after them was not read, and the order went out
    as "other" without the sender's copy."""
    raw = (
        b'From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_b1"'
        b"\r\n\r\n--=_b1\r\nContent-Type: text/plain\r\n\r\n"
        + b"Line item\r\n-----------------\r\n" * 10_001
        + b"--=_b1\r\nContent-Disposition: attachment; filename=dump.sql\r\n\r\n"
        + b"-- comment\r\n" * 100_001
        + b"--=_b1\r\nContent-Disposition: attachment; filename=order-4711.pdf\r\n\r\nx\r\n"
        b"--=_b1--\r\n"
    )
    assert message.read(raw).attachments == ("dump.sql", "order-4711.pdf")


def test_a_mailbox_attached_with_its_messages_boundaries_keeps_the_names_after_it() -> None:
    """An mbox of 1,001 messages declared more boundaries than were read, and one
    of 3,400 had more delimiter lines than the part limit: the PDF after it was
    not seen."""
    mbox = b"".join(
        b"From x\r\nContent-Type: multipart/mixed; boundary=m%d\r\n\r\n"
        b"--m%d\r\n\r\nx\r\n--m%d\r\n\r\ny\r\n--m%d--\r\n" % (i, i, i, i)
        for i in range(3400)
    )
    raw = (
        b'From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_b1"'
        b"\r\n\r\n--=_b1\r\nContent-Disposition: attachment; filename=archive.mbox\r\n\r\n"
        + mbox
        + b"--=_b1\r\nContent-Disposition: attachment; filename=order-4711.pdf\r\n\r\nx\r\n"
        b"--=_b1--\r\n"
    )
    assert message.read(raw).attachments == ("archive.mbox", "order-4711.pdf")


def test_parts_past_the_limit_of_declared_boundaries_are_not_parsed() -> None:
    """Counted only in a message with as many lines beginning with "--" as the
    part limit: the empty parts after the last name make it one."""
    nested = b"".join(
        b"--b\r\nContent-Type: multipart/mixed; boundary=c%d\r\n\r\n--c%d--\r\n" % (i, i)
        for i in range(message.BOUNDARIES_LIMIT + 10)
    )
    raw = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n"
        b"\r\n--b\r\nContent-Disposition: attachment; filename=order.pdf\r\n\r\nx\r\n"
        + nested
        + b"--b\r\nContent-Disposition: attachment; filename=late.pdf\r\n\r\nx\r\n"
        + b"--b\r\n\r\n" * message.PARTS_LIMIT
        + b"--b--\r\n"
    )
    assert message.read(raw).attachments == ("order.pdf",)
    fewer = raw.replace(nested, nested[: nested.index(b"--b\r\n", 1000)])
    assert message.read(fewer).attachments == ("order.pdf", "late.pdf")


@pytest.mark.parametrize(
    ("declared", "boundary"),
    [
        (b'boundary=\r\n "x"', b"x"),
        (b'boundary*0="x"', b"x"),
        (b'boundary*00="x"', b"x"),
        (b"boundary*=us-ascii''%78", b"x"),
        (b'boundary="a\\\\b"', b"a\\b"),  # quoted a\\b, unquoted a\b
        (b'boundary="x "', b"x"),  # the email package strips it
        (b"boundary*=us-ascii''x%20", b"x"),
        (b"boundary*=us-ascii''x'y", b"x'y"),  # split at its first two quotes only
        (b'boundary="x\x1c"', b"x"),  # white space to str.rstrip, not to bytes.rstrip
        (b"boundary*=utf-8''x%C2%A0", b"x"),
    ],
    ids=[
        "folded",
        "rfc2231-pieces",
        "rfc2231-zero-padded",
        "rfc2231-encoded",
        "escaped",
        "trailing-space",
        "encoded-trailing-space",
        "encoded-quote",
        "trailing-separator",
        "trailing-nbsp",
    ],
)
def test_a_boundary_declared_in_another_form_is_held_to_the_limits_too(
    declared: bytes, boundary: bytes
) -> None:
    """Folded after its "=", the boundary was not seen as declared, no part was
    counted, and 24 MB of empty parts held the worker for 23 s."""
    delimiter = b"--" + boundary + b"\r\n"
    raw = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
        + declared
        + b"\r\n\r\n"
        + delimiter
        + b"Content-Disposition: attachment; filename=order.pdf\r\n\r\nx\r\n"
        + (delimiter + b"\r\n") * 3_000_000
        + b"--"
        + boundary
        + b"--\r\n"
    )
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    assert message.read(raw).attachments == ("order.pdf",)
    assert time.process_time() - started < 12  # 23 s before; 2.8 s alone on a slow machine


def test_many_long_boundaries_declared_in_text_cost_no_pattern_of_them() -> None:
    """10,000 declarations in a text body, alike for 190 characters, were made one
    pattern: 3 s to build it, and 2 ms for each line beginning with their start."""
    declared = b"boundary=B\r\n" + b"".join(b"boundary=A%0196d\r\n" % i for i in range(9_999))
    raw = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        + declared
        + b"--\r\n" * message.PARTS_LIMIT
        + (b"--A" + b"0" * 190 + b"Z\r\n") * 3_000
    )
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    assert message.read(raw).attachments == ()
    assert time.process_time() - started < 5


def test_fields_are_found_by_name_in_any_case_first_one_first() -> None:
    raw = (
        b"Received: from a\r\n\tby b\r\nFrom: Jan <jan@acme.example>\r\n"
        b"received: from c\r\nSUBJECT: =?utf-8?q?Faktura_f=C3=B8r?=\r\n"
        b"RECEIVED: from d\r\n\r\nbody\r\n"
    )
    view = message.read(raw, headers.split_at(raw))
    parsed = email.parser.BytesParser(policy=compat32).parsebytes(raw)
    assert view.get_all("Received") == ("from a\tby b", "from c", "from d")
    assert view.get_all("received") == tuple(
        re.sub(r"\r?\n(?=[ \t])", "", value) for value in parsed.get_all("Received")
    )
    assert view.get("rEcEiVeD") == "from a\tby b"
    assert view.get("Subject") == view.subject == "Faktura før"
    assert view.get("To") is None and view.get_all("To") == ()
    assert [field.name for field in view.fields] == [
        "Received",
        "From",
        "received",
        "SUBJECT",
        "RECEIVED",
    ]
    assert view.fields == headers.split_at(raw)[0] == message.read(raw).fields
