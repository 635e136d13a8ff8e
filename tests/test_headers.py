"""Splitting raw header blocks, and building field lines that cannot be broken out of."""

from __future__ import annotations

import re
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.errors import HeaderInjection
from relay.headers import (
    Field,
    deliverable,
    encode_text,
    fold,
    format_address,
    line_ending,
    split,
    value,
)

# split


def test_split_crlf_message_with_folded_field() -> None:
    raw = b"From: a@b.example\r\nSubject: one\r\n two\r\n\tthree\r\nTo: c@d.example\r\n\r\nbody\r\n"
    fields, rest = split(raw)
    assert fields == [
        Field("From", b"From: a@b.example\r\n"),
        Field("Subject", b"Subject: one\r\n two\r\n\tthree\r\n"),
        Field("To", b"To: c@d.example\r\n"),
    ]
    assert rest == b"\r\nbody\r\n"


def test_split_bare_lf() -> None:
    fields, rest = split(b"From: a\nSubject: x\n y\n\nbody\n")
    assert [f.raw for f in fields] == [b"From: a\n", b"Subject: x\n y\n"]
    assert rest == b"\nbody\n"


def test_split_keeps_name_case_and_odd_spacing() -> None:
    fields, _ = split(b"FROM:a\r\nreply-to:   b \r\nX-Empty:\r\n\r\n")
    assert [f.name for f in fields] == ["FROM", "reply-to", "X-Empty"]
    assert fields[1].raw == b"reply-to:   b \r\n"


def test_split_without_blank_line_is_all_header() -> None:
    fields, rest = split(b"From: a\r\nTo: b\r\n")
    assert [f.name for f in fields] == ["From", "To"] and rest == b""
    fields, rest = split(b"From: a\r\nTo: b")
    assert fields[-1].raw == b"To: b" and rest == b""


@pytest.mark.parametrize(
    ("raw", "names", "rest"),
    [
        (b"", [], b""),
        (b"\r\nbody", [], b"\r\nbody"),
        (b"From jan@acme.example Mon Nov 23\r\nTo: b\r\n\r\n", [], None),
        (b" leading continuation\r\nTo: b\r\n\r\n", [], None),
        (b"Subject: x\r\nno colon here\r\nTo: b\r\n\r\nbody", ["Subject"], b"no colon here\r\n"),
        (b"Subject: x\r\nBcc : spaced@example.org\r\n\r\n", ["Subject"], b"Bcc : spaced"),
        (b"Subject: x\r\n: empty name\r\n\r\n", ["Subject"], b": empty name"),
        (b"Subject: x\r\nX-\xc3\xa9: 8bit name\r\n\r\n", ["Subject"], b"X-\xc3\xa9"),
        (b"Subject: x\r\n\r\n\r\nTo: b\r\n", ["Subject"], b"\r\n\r\nTo: b\r\n"),
    ],
)
def test_split_stops_at_first_line_that_is_no_field(
    raw: bytes, names: list[str], rest: bytes | None
) -> None:
    fields, got = split(raw)
    assert [f.name for f in fields] == names
    assert got.startswith(raw if rest is None else rest)
    assert b"".join(f.raw for f in fields) + got == raw


def test_split_bare_cr_is_content_not_a_line_end() -> None:
    fields, rest = split(b"Subject: a\rBcc: x@y\r\n\r\n")
    assert fields == [Field("Subject", b"Subject: a\rBcc: x@y\r\n")]
    assert rest == b"\r\n"


def test_split_8bit_value_is_kept() -> None:
    raw = "Subject: Grüße\r\n\r\n".encode()
    fields, _ = split(raw)
    assert fields[0].raw == "Subject: Grüße\r\n".encode()


_LINE_PARTS = st.sampled_from(
    [b"From", b"To", b"X-A", b"bcc", b":", b" ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"\xff", b"\0"]
)
_HEADERISH = st.lists(_LINE_PARTS, max_size=40).map(b"".join)


@given(st.one_of(st.binary(max_size=300), _HEADERISH))
@settings(max_examples=500)
@example(b"")
@example(b"X:")
@example(b" \r\n")
def test_split_round_trips_any_bytes(raw: bytes) -> None:
    fields, rest = split(raw)
    assert b"".join(f.raw for f in fields) + rest == raw
    for i, field in enumerate(fields):
        assert field.raw.startswith(field.name.encode("ascii") + b":")
        assert re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", field.name)
        lines = field.raw.splitlines(keepends=True)
        assert all(line[:1] in (b" ", b"\t") for line in field.raw.split(b"\n")[1:] if line)
        if i < len(fields) - 1:
            assert field.raw.endswith(b"\n")
        assert lines


def test_value_unfolds_and_strips() -> None:
    assert value(Field("Subject", b"Subject:  one\r\n two\r\n\tthree \r\n")) == "one two\tthree"
    assert value(Field("X", b"X:\n")) == ""
    assert value(Field("X", b"X: a:b")) == "a:b"


def test_line_ending_comes_from_the_first_line() -> None:
    assert line_ending(b"From: a\r\nTo: b\n") == b"\r\n"
    assert line_ending(b"From: a\nTo: b\r\n") == b"\n"
    assert line_ending(b"From: a") == b"\r\n"
    assert line_ending(b"\nbody") == b"\n"


def test_an_address_is_deliverable_to_smtps_lengths_and_not_past_them() -> None:
    """RFC 5321 4.5.3.1: 64 octets before the @, 254 in all. One octet more and
    no server takes it: a Reply-To source naming it would give the customer an
    address their replies bounce from."""
    domain = ("d" * 63 + ".") * 2 + "d" * 61
    longest = "l" * 64 + "@" + domain
    assert len(longest) == 254 and deliverable(longest)
    assert not deliverable(longest + "d")  # 255 in all, its labels within 63
    assert not deliverable("l" + longest[:-1])  # 65 before the @, 254 in all


# format_address


@pytest.mark.parametrize(
    ("name", "address", "expected"),
    [
        ("", "jan@acme.example", "jan@acme.example"),
        ("Jan Janssens", "jan@acme.example", "Jan Janssens <jan@acme.example>"),
        ("O'Brien", "ob@acme.example", "O'Brien <ob@acme.example>"),
        ("Janssens, Jan", "jan@acme.example", '"Janssens, Jan" <jan@acme.example>'),
        ("Jan J. Janssens", "jan@acme.example", '"Jan J. Janssens" <jan@acme.example>'),
        ("Acme (Billing)", "b@acme.example", '"Acme (Billing)" <b@acme.example>'),
        ('Say "hi" \\o/', "x@acme.example", '"Say \\"hi\\" \\\\o/" <x@acme.example>'),
        (" padded  name ", "x@acme.example", '" padded  name " <x@acme.example>'),
        (
            "Jürgen Müller via Acme AS",
            "noreply@platform.example",
            "=?utf-8?q?J=C3=BCrgen_M=C3=BCller_via_Acme_AS?= <noreply@platform.example>",
        ),
        # B is shorter here, so B.
        ("Jürgen Müller", "j@acme.example", "=?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <j@acme.example>"),
        ("日本", "n@acme.example", "=?utf-8?b?5pel5pys?= <n@acme.example>"),
        # Looks like an encoded word: a reader would decode it, so it is encoded.
        ("=?utf-8?q?x?=", "x@acme.example", "=?utf-8?b?PT91dGYtOD9xP3g/PQ==?= <x@acme.example>"),
        ("tab\there", "x@acme.example", "=?utf-8?q?tab=09here?= <x@acme.example>"),
        ("Quoted local", '"jan j"@acme.example', 'Quoted local <"jan j"@acme.example>'),
        ("Literal", "jan@[192.0.2.1]", "Literal <jan@[192.0.2.1]>"),
    ],
)
def test_format_address(name: str, address: str, expected: str) -> None:
    assert format_address(name, address) == expected


def test_long_non_ascii_name_is_split_into_words_of_whole_characters() -> None:
    name = "Ελληνικά Λογιστικά Γραφεία μέσω Acme Πλατφόρμα Ηλεκτρονικής Τιμολόγησης"
    got = format_address(name, "noreply@platform.example")
    words = got.rsplit(" <", 1)[0].split(" ")
    assert len(words) > 1
    for word in words:
        assert len(word) <= 75
        assert word.startswith("=?utf-8?b?") and word.endswith("?=")
        decode_header(word)[0][0].decode("utf-8")  # whole characters in every word
    assert _decoded_name(got) == name


def test_long_names_are_cut_after_white_space_where_possible() -> None:
    name = "Ελληνικά Λογιστικά Γραφεία μέσω Acme Πλατφόρμα Ηλεκτρονικής Τιμολόγησης"
    words = format_address(name, "noreply@platform.example").rsplit(" <", 1)[0].split(" ")
    chunks = [str(make_header(decode_header(word))) for word in words]
    assert chunks == [
        "Ελληνικά Λογιστικά ",
        "Γραφεία μέσω Acme ",
        "Πλατφόρμα ",
        "Ηλεκτρονικής ",
        "Τιμολόγησης",
    ]
    long_word = "é" * 50
    chunks = [
        str(make_header(decode_header(word)))
        for word in format_address(long_word, "a@b.example")[:-14].split(" ")
    ]
    assert chunks == ["é" * 18, "é" * 18, "é" * 14]


@pytest.mark.parametrize("bad", ["\r", "\n", "\0", "Evil\r\nBcc: x@y", "x\n y"])
def test_format_address_refuses_line_breaks(bad: str) -> None:
    with pytest.raises(HeaderInjection):
        format_address(bad, "jan@acme.example")
    with pytest.raises(HeaderInjection):
        format_address("Jan", f"jan{bad}@acme.example")


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(HeaderInjection):
        format_address("M\udcfcller", "m@acme.example")
    with pytest.raises(HeaderInjection):
        encode_text("M\udcfcller")


@pytest.mark.parametrize(
    "address",
    [
        "",
        "jan",
        "jan@",
        "@acme.example",
        "jan@acme.example>, evil@attacker.example",
        "jan@acme.example> <evil@attacker.example",
        "jan @acme.example",
        "jan@acme..example",
        "jän@acme.example",
        "jan@äcme.example",
        "a,b@acme.example",
        "<jan@acme.example>",
    ],
)
def test_format_address_refuses_anything_but_one_plain_address(address: str) -> None:
    with pytest.raises(HeaderInjection):
        format_address("Jan", address)


def _decoded_name(formatted: str) -> str:
    [(name, _)] = getaddresses([formatted])
    return str(make_header(decode_header(name)))


def _shown_by_headerregistry(name: str, formatted: str) -> str:
    """What Python's header parser shows: it deviates from RFC 2047 in two ways.

    It shows a white-space run inside an encoded word as one space, and it
    keeps the space between two encoded words of a phrase (RFC 2047 6.2
    says to drop it), so a word cut in two gets a space in the middle.
    """
    words = re.findall(r"=\?utf-8\?[bq]\?[^?]*\?=", formatted)
    if not words:
        return name
    chunks = [str(make_header(decode_header(word))) for word in words]
    assert "".join(chunks) == name
    return " ".join(re.sub(r"[ \t]+", " ", chunk) for chunk in chunks)


_NAMES = st.one_of(
    st.text(max_size=80),
    st.text(st.sampled_from('ab "\\(),.:;<>@[]=?_\té'), max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=120),
)


@given(_NAMES, st.emails())
@settings(max_examples=500)
@example("=?utf-8?q?x?=", "a@b.example")
@example("a\u2028b\x85c", "a@b.example")
@example("  ", "a@b.example")
@example("a." * 600, "a@b.example")
@example("a" * 1200, "a@b.example")
@example("x" * 79, "a@b.example")
def test_format_address_round_trips_through_the_email_parsers(name: str, address: str) -> None:
    if re.search(r"[\r\n\0]", name):
        with pytest.raises(HeaderInjection):
            format_address(name, address)
        return
    got = format_address(name, address)
    assert got.isascii() and not re.search(r"[\x00-\x1f\x7f]", got)
    for word in re.findall(r"=\?[^ ]*?\?=", got):
        assert len(word) <= 75
    [(parsed_name, parsed_address)] = getaddresses([got])
    assert parsed_address == address
    assert str(make_header(decode_header(parsed_name))) == name
    [mailbox] = HeaderRegistry()("From", got).addresses
    assert mailbox.addr_spec == address
    assert _shown_by_headerregistry(name, got) == mailbox.display_name
    # And it survives being put into a field line: one field, nothing more.
    line = fold("From", got)
    fields, rest = split(line + b"\r\n")
    assert [f.name for f in fields] == ["From"] and rest == b"\r\n"
    assert max(map(len, line.split(b"\r\n"))) <= len("From: ") + max(78, len(address) + 2)


@pytest.mark.parametrize(
    "name",
    ["a." * 600, "a" * 1200, "Jan " + "x" * 78, "Acme (" + "a" * 80 + ")", '"' * 80],
)
def test_names_fold_cannot_break_are_written_as_encoded_words(name: str) -> None:
    """A long atom or quoted string has no fold point: as encoded words it folds."""
    got = format_address(name, "per@acme.example")
    assert got.startswith("=?utf-8?") and _decoded_name(got) == name
    assert all(len(line) <= 76 for line in fold("Reply-To", got).split(b"\r\n"))


# fold


def test_fold_short_value_is_one_line() -> None:
    assert fold("Subject", "Invoice 4711") == b"Subject: Invoice 4711\r\n"
    assert fold("X-Empty", "") == b"X-Empty:\r\n"


def test_fold_long_value_at_white_space() -> None:
    got = fold("Subject", " ".join(["word"] * 30))
    assert got == (
        b"Subject: word word word word word word word word word word word word word word\r\n"
        b" word word word word word word word word word word word word word word word\r\n"
        b" word\r\n"
    )


def test_fold_never_inside_quotes_or_angle_brackets() -> None:
    name = '"Jan Janssens (Accounts receivable department) via Acme Holding AS"'
    got = fold("From", f"{name} <noreply@platform.example>")
    assert got == f"From: {name}\r\n <noreply@platform.example>\r\n".encode()
    long_quote = '"' + " ".join(["quoted"] * 20) + '" <a@b.example>'
    assert fold("To", long_quote) == f"To: {long_quote[:-14]}\r\n <a@b.example>\r\n".encode()
    bracketed = "<" + " ".join(["word"] * 16) + ">"  # white space inside: no fold there
    assert fold("Subject", f"Re: {bracketed}") == f"Subject: Re:\r\n {bracketed}\r\n".encode()


def test_fold_keeps_encoded_word_lines_within_76() -> None:
    address = format_address("Kåre Ødegård via Acme AS", "noreply@platform.example")
    assert fold("Reply-To", address) == (
        b"Reply-To: =?utf-8?b?S8OlcmUgw5hkZWfDpXJkIHZpYSBBY21lIEFT?=\r\n"
        b" <noreply@platform.example>\r\n"
    )


def test_fold_without_fold_points_leaves_a_long_line() -> None:
    token = "x" * 100
    assert fold("X-Token", token) == f"X-Token: {token}\r\n".encode()
    assert fold("X-Token", token + "  ") == f"X-Token: {token}  \r\n".encode()
    longest = "x" * (998 - len("X-Token: "))
    assert fold("X-Token", longest) == f"X-Token: {longest}\r\n".encode()


@pytest.mark.parametrize(
    "value",
    ["x" * 990, f'Per <"{"a" * 1200}"@acme.example>', '"' + "a." * 600 + '" <a@b.example>'],
)
def test_fold_refuses_lines_over_998(value: str) -> None:
    with pytest.raises(HeaderInjection, match="cannot be folded within 998"):
        fold("X-Token", value)


@pytest.mark.parametrize(
    "bad",
    ["Evil\r\nBcc: x@y", "Evil\nBcc: x@y", "Evil\rBcc: x@y", "a\0b", "a\x0bb", "a\x0cb", "é"],
)
def test_fold_refuses_values_that_could_end_the_line(bad: str) -> None:
    with pytest.raises(HeaderInjection):
        fold("Subject", bad)


@pytest.mark.parametrize("name", ["", "Bad Name", "Bad:Name", "X\r\nBcc", "Ñame", "X\0"])
def test_fold_refuses_bad_field_names(name: str) -> None:
    with pytest.raises(HeaderInjection):
        fold(name, "value")


_WORDS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)


@given(st.lists(_WORDS, max_size=20), st.sampled_from(["Subject", "X-A", "Reply-To"]))
@settings(max_examples=300)
def test_fold_keeps_lines_short_and_unfolds_to_the_value(words: list[str], name: str) -> None:
    text = " ".join(words)
    got = fold(name, text)
    assert got.endswith(b"\r\n")
    lines = got[:-2].split(b"\r\n")
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:])
    if not re.search(r'["<>]', text):
        assert all(len(line) <= 78 for line in lines)
    expected = f"{name}: {text}" if text else f"{name}:"
    assert got[:-2].replace(b"\r\n", b"").decode("ascii") == expected


@given(st.text(max_size=200))
@settings(max_examples=500)
@example("Evil\r\nBcc: x@y")
@example("Evil\nBcc: x@y")
@example("Evil\rBcc: x@y")
@example("x\u2028Bcc: x@y")
def test_no_value_ever_becomes_a_separate_field(text: str) -> None:
    try:
        line = fold("Subject", text)
    except HeaderInjection:
        assert re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text) or not text.isascii()
        return
    fields, rest = split(line + b"\r\nbody")
    assert [f.name for f in fields] == ["Subject"]
    assert rest == b"\r\nbody"


# encode_text


def test_encode_text() -> None:
    assert encode_text("Invoice 4711: due (now)") == "Invoice 4711: due (now)"
    assert encode_text("Faktura für März") == "=?utf-8?b?RmFrdHVyYSBmw7xyIE3DpHJ6?="
    assert encode_text("Rechnung für Leistungen im Oktober") == (
        "=?utf-8?q?Rechnung_f=C3=BCr_Leistungen_im_Oktober?="
    )
    assert encode_text("=?utf-8?q?x?=") == "=?utf-8?b?PT91dGYtOD9xP3g/PQ==?="
    assert encode_text("Invoice " + "x" * 77) == "Invoice " + "x" * 77  # " x...": a line
    assert encode_text("Invoice " + "x" * 78).startswith("=?utf-8?q?Invoice_?= ")
    with pytest.raises(HeaderInjection):
        encode_text("Evil\r\nBcc: x@y")


@given(st.text(max_size=300))
@settings(max_examples=300)
@example("a" * 1200)
@example('Invoice "' + "a " * 100)
@example("Rechnung_4711 für Leistungen im Oktober")  # Q: an underscore there is a space
def test_encode_text_folds_and_decodes_back(text: str) -> None:
    if re.search(r"[\r\n\0]", text):
        with pytest.raises(HeaderInjection):
            encode_text(text)
        return
    encoded = encode_text(text)
    line = fold("Subject", encoded)
    if encoded == text:
        assert text.isascii()
        assert max(map(len, line.split(b"\r\n"))) <= 78 + len("Subject: ")
        return
    assert all(len(x) <= 76 for x in line.split(b"\r\n"))
    unfolded = line[len("Subject: ") : -2].replace(b"\r\n", b"").decode("ascii")
    assert str(make_header(decode_header(unfolded))) == text
