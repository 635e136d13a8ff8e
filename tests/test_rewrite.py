"""Header edits on the raw message: golden messages, and properties over any input."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay import message
from relay.errors import HeaderInjection
from relay.headers import Field, format_address, has_blank_line, line_ending, split
from relay.rewrite import HeaderEdits, apply, prepend

MESSAGES = Path(__file__).parent / "messages"

PLATFORM_FROM = format_address("Jan Janssens via Acme AS", "noreply@platform.example")
SENDER = format_address("Jan Janssens", "jan@acme.example")
PLATFORM = HeaderEdits(
    remove=("Bcc", "X-ERP-User"), set=(("From", PLATFORM_FROM), ("Reply-To", SENDER))
)

CASES = {
    "simple": PLATFORM,
    "nonascii-from": HeaderEdits(
        remove=("Bcc",),
        set=(
            ("From", format_address("Jürgen Müller via Acme AS", "noreply@platform.example")),
            ("Reply-To", format_address("Jürgen Müller", "jurgen@acme.example")),
        ),
    ),
    "multipart-pdf": PLATFORM,
    "folded": HeaderEdits(
        remove=("Bcc",),
        set=(
            (
                "From",
                format_address(
                    "Jan Janssens (Accounts receivable department) via Acme Holding AS",
                    "noreply@platform.example",
                ),
            ),
        ),
    ),
    "bcc": PLATFORM,
    "mixed-case": PLATFORM,
    "missing-date-id": HeaderEdits(
        remove=("Bcc",),
        set=(
            ("From", PLATFORM_FROM),
            ("Date", "Mon, 23 Nov 2026 09:30:00 +0000"),
            ("Message-ID", "<Q7X2KD9@relay.platform.example>"),
        ),
    ),
    "bare-lf": PLATFORM,
}


def _golden(case: str) -> tuple[bytes, bytes]:
    return (MESSAGES / f"{case}.in.eml").read_bytes(), (MESSAGES / f"{case}.out.eml").read_bytes()


def test_every_golden_message_has_a_case() -> None:
    names = {p.name.split(".")[0] for p in MESSAGES.glob("*.eml")}
    assert names == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    raw, expected = _golden(case)
    assert apply(raw, CASES[case]) == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_expectations_keep_the_body(case: str) -> None:
    """The expected files themselves: body identical to the input's, same line endings."""
    raw, expected = _golden(case)
    eol = b"\n" if case == "bare-lf" else b"\r\n"
    assert raw.split(eol + eol, 1)[1] == expected.split(eol + eol, 1)[1]
    if eol == b"\r\n":
        assert b"\n" not in expected.replace(b"\r\n", b"")


def test_golden_multipart_attachment_is_byte_identical() -> None:
    raw, expected = _golden("multipart-pdf")
    body = raw[raw.index(b"\r\n\r\n") :]
    assert expected.endswith(body)
    assert b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK" in body
    assert message.read(expected).attachments == ("invoice-4712.pdf",)


def test_golden_read_back() -> None:
    view = message.read(_golden("nonascii-from")[1])
    assert view.addresses("From") == (("Jürgen Müller via Acme AS", "noreply@platform.example"),)
    assert view.addresses("Reply-To") == (("Jürgen Müller", "jurgen@acme.example"),)
    view = message.read(_golden("bcc")[1])
    assert view.get_all("Bcc") == ()
    view = message.read(_golden("bare-lf")[1])
    assert view.get_all("From") == (PLATFORM_FROM,)


# edge cases


def test_set_wins_over_remove_and_first_occurrence_is_replaced_in_place() -> None:
    raw = b"To: a@x\r\nReply-To: one@x\r\nSubject: s\r\nreply-to: two@x\r\n\r\nbody"
    edits = HeaderEdits(remove=("Reply-To",), set=(("Reply-To", "new@x"),))
    assert apply(raw, edits) == b"To: a@x\r\nReply-To: new@x\r\nSubject: s\r\n\r\nbody"


def test_set_appends_in_the_order_given() -> None:
    raw = b"From: a@x\r\n\r\nbody"
    edits = HeaderEdits(set=(("Message-ID", "<1@x>"), ("Date", "d")))
    assert apply(raw, edits) == b"From: a@x\r\nMessage-ID: <1@x>\r\nDate: d\r\n\r\nbody"


def test_setting_a_field_twice_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="twice"):
        apply(b"From: a\r\n\r\n", HeaderEdits(set=(("From", "b"), ("FROM", "c"))))


def test_headers_only_message() -> None:
    edits = HeaderEdits(set=(("Date", "d"),))
    assert apply(b"From: a\r\nTo: b\r\n", edits) == b"From: a\r\nTo: b\r\nDate: d\r\n"
    assert apply(b"From: a\r\nTo: b", edits) == b"From: a\r\nTo: b\r\nDate: d\r\n"
    assert apply(b"From: a\nTo: b", edits) == b"From: a\nTo: b\nDate: d\n"
    assert apply(b"To: b", HeaderEdits(set=(("To", "c"),))) == b"To: c\r\n"
    assert apply(b"", edits) == b"Date: d\r\n"


def test_unterminated_header_block_gets_its_blank_line() -> None:
    """What was read as body here must not become a field, or part of one, downstream."""
    edits = HeaderEdits(set=(("From", "p@x"),))
    got = apply(b"Subject: s\r\nBcc : b@x\r\n\r\nbody", edits)
    assert got == b"Subject: s\r\nFrom: p@x\r\n\r\nBcc : b@x\r\n\r\nbody"
    got = apply(b" , evil@attacker.example\r\nTo: c@x\r\n\r\nbody", edits)
    assert got == b"From: p@x\r\n\r\n , evil@attacker.example\r\nTo: c@x\r\n\r\nbody"
    assert message.read(got).get("From") == "p@x"


def test_removing_nothing_from_a_well_formed_message_changes_nothing() -> None:
    raw, _ = _golden("folded")
    assert apply(raw, HeaderEdits(remove=("X-Absent",))) == raw


def test_injection_is_refused_before_anything_is_built() -> None:
    for value in ("Evil\r\nBcc: x@y", "Evil\nBcc: x@y", "Evil\rBcc: x@y", "a\0"):
        with pytest.raises(HeaderInjection):
            apply(b"From: a\r\n\r\n", HeaderEdits(set=(("Subject", value),)))
    with pytest.raises(HeaderInjection):
        apply(b"From: a\r\n\r\n", HeaderEdits(set=(("Bcc: x@y\r\nX", "v"),)))


def test_prepend() -> None:
    assert prepend(b"From: a\r\n\r\nbody", b"DKIM-Signature: v=1\r\n") == (
        b"DKIM-Signature: v=1\r\nFrom: a\r\n\r\nbody"
    )
    assert prepend(b"From: a\r\n", b"") == b"From: a\r\n"
    with pytest.raises(ValueError, match="line ending"):
        prepend(b"From: a\r\n", b"DKIM-Signature: v=1")


# properties

_NAMES = st.sampled_from(["From", "from", "Reply-To", "Bcc", "BCC", "X-ERP-User", "Date", "To"])
_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
_EDITS = st.builds(
    HeaderEdits,
    remove=st.lists(_NAMES, max_size=3).map(tuple),
    set=st.dictionaries(_NAMES.map(str.title), _VALUES, max_size=3).map(lambda d: tuple(d.items())),
)
_FIELD = st.builds(
    lambda name, text, folds, eol: (
        name.encode() + b": " + text.encode() + b"".join(eol + f for f in folds) + eol
    ),
    _NAMES,
    _VALUES,
    st.lists(st.sampled_from([b" x", b"\tBcc: y@z", b" ", b"  folded"]), max_size=2),
    st.sampled_from([b"\r\n", b"\n"]),
)
_MESSAGE = st.builds(
    lambda fields, eol, body: b"".join(fields) + eol + body,
    st.lists(_FIELD, max_size=8),
    st.sampled_from([b"\r\n", b"\n"]),
    st.one_of(
        st.binary(max_size=200),
        st.lists(_FIELD, max_size=4).map(b"".join),  # field-like lines in the body
    ),
)


@given(st.one_of(st.binary(max_size=300), _MESSAGE))
def test_empty_edits_are_identity(raw: bytes) -> None:
    assert apply(raw, HeaderEdits()) == raw


@given(_MESSAGE, _EDITS)
@settings(max_examples=500)
def test_body_after_the_first_blank_line_is_unchanged(raw: bytes, edits: HeaderEdits) -> None:
    _, rest = split(raw)
    got = apply(raw, edits)
    assert got.endswith(rest)
    _, got_rest = split(got)
    assert got_rest == rest


@given(st.binary(max_size=300), _EDITS)
@settings(max_examples=500)
@example(b" leading\r\n\r\n", HeaderEdits(set=(("From", "a"),)))
def test_edits_on_any_bytes(raw: bytes, edits: HeaderEdits) -> None:
    fields, rest = split(raw)
    got = apply(raw, edits)
    assert got.endswith(rest)
    got_fields, got_rest = split(got)
    assert got_rest in (rest, line_ending(raw) + rest)
    _check_fields(fields, got_fields, edits)


@given(_MESSAGE, _EDITS)
@settings(max_examples=500)
def test_fields_are_edited_as_asked_and_others_kept_in_order(
    raw: bytes, edits: HeaderEdits
) -> None:
    fields, _ = split(raw)
    got_fields, _ = split(apply(raw, edits))
    _check_fields(fields, got_fields, edits)


def _check_fields(before: list[Field], after: list[Field], edits: HeaderEdits) -> None:
    set_names = {name.lower() for name, _ in edits.set}
    removed = {name.lower() for name in edits.remove} - set_names
    names = [f.name.lower() for f in after]
    for name in set_names:
        assert names.count(name) == 1
    assert not removed & set(names)
    kept = [f.raw for f in before if f.name.lower() not in removed | set_names]
    got = [f.raw for f in after if f.name.lower() not in set_names]
    assert len(got) == len(kept) and got[:-1] == kept[:-1]
    if kept:
        # An unterminated last field gains a line ending when a field follows it.
        assert got[-1] in (kept[-1], kept[-1] + b"\r\n", kept[-1] + b"\n")


@given(st.text(max_size=100), st.sampled_from([b"\r\n", b"\n"]))
@settings(max_examples=500)
@example("Evil\r\nBcc: x@y", b"\r\n")
@example("Evil\nBcc: x@y", b"\n")
@example("Evil\u2028Bcc: x@y", b"\r\n")
def test_a_display_name_never_adds_a_field(name: str, eol: bytes) -> None:
    raw = b"From: jan@acme.example" + eol + b"To: c@example.org" + eol + eol + b"body"
    try:
        edits = HeaderEdits(set=(("From", format_address(name, "noreply@platform.example")),))
    except HeaderInjection:
        return
    got = apply(raw, edits)
    fields, rest = split(got)
    assert [f.name for f in fields] == ["From", "To"]
    assert rest == eol + b"body"
    assert message.read(got).get_all("Bcc") == ()


@given(_MESSAGE, _EDITS)
@settings(max_examples=300)
def test_lines_of_only_white_space_go_and_nothing_else(raw: bytes, edits: HeaderEdits) -> None:
    """The ``_FIELD`` folds include a line of one space: obsolete folding."""
    edits = HeaderEdits(edits.remove, edits.set, drop_blank_lines=True)
    fields, rest = split(raw)
    got_fields, got_rest = split(apply(raw, edits))
    assert got_rest == rest
    assert not any(has_blank_line(field) for field in got_fields)
    kept = [f for f in fields if f.name.lower() not in {n.lower() for n, _ in edits.set}]
    shown = [f for f in got_fields if f.name.lower() not in {n.lower() for n, _ in edits.set}]
    removed = {name.lower() for name in edits.remove}
    assert [f.name for f in shown] == [f.name for f in kept if f.name.lower() not in removed]


def test_a_last_line_of_only_white_space_goes_without_a_line_ending_too() -> None:
    """A message saved without its last line ending (an .eml file given to
    ``relay preview``) ends in the header: its last line of white space is one
    like any other, and was kept."""
    raw = b"From: a@x\r\nX-Note: one\r\n  "
    assert has_blank_line(split(raw)[0][-1])
    assert apply(raw, HeaderEdits(drop_blank_lines=True)) == b"From: a@x\r\nX-Note: one\r\n"
