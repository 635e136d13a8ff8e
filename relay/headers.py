"""Header fields as raw bytes: split a message into fields, build new field lines.

The relay promises to pass on every byte it does not mean to change, so a
field is kept as the exact bytes the client sent (folding, case and spacing
included). Nothing here regenerates a message with the email package: its
generator refolds and requotes headers and has had header-injection bugs
(CVE-2024-6923). New lines are built from plain ASCII and refused outright
when a value could end its line early.
"""

from __future__ import annotations

import base64
import itertools
import re
from dataclasses import dataclass

from relay.errors import HeaderInjection

MAX_LINE = 78  # RFC 5322 2.1.1, line ending not counted
MAX_LINE_HARD = 998  # the same section's limit that readers may enforce (78 is a SHOULD)
MAX_LINE_ENCODED = 76  # RFC 2047 2, for a line holding an encoded word
# RFC 2047 allows 75; 60 leaves room for "Field-Name: " before the first
# word while its line stays within 76.
_WORD_MAX = 60
_WORD_PREFIX = {"q": "=?utf-8?q?", "b": "=?utf-8?b?"}
_PAYLOAD_MAX = _WORD_MAX - len(_WORD_PREFIX["q"]) - len("?=")

_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_BREAKS = re.compile(r"[\r\n\x00]")
_SURROGATES = re.compile("[\ud800-\udfff]")  # not text: cannot be written as UTF-8
# Besides CR and LF, some parsers end a line at VT, FF or other controls.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"  # RFC 5322 3.2.3; also the plain SMTP path's parts
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]*\]"
_ADDR_SPEC = re.compile(rf"(?:{DOT_ATOM}|{_QUOTED})@(?:{DOT_ATOM}|{_LITERAL})")
_ATEXT_UTF8 = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]"  # RFC 6532 3.2
DOT_ATOM_UTF8 = rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # RFC 1123 2.1
_MAILBOX = re.compile(rf"(?:{DOT_ATOM_UTF8}|{_QUOTED})@{_LABEL}(?:\.{_LABEL})*")
_PHRASE = re.compile(rf"{_ATEXT}+(?: {_ATEXT}+)*")
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


@dataclass(frozen=True)
class Field:
    """One header field exactly as received, continuation lines and line ending included."""

    name: str
    raw: bytes


def split(raw: bytes) -> tuple[list[Field], bytes]:
    """The header fields, and the rest: the blank separator line and the body.

    Joining every ``Field.raw`` and the rest gives back ``raw`` exactly. A
    line that is neither a field nor a continuation ends the header block
    and starts the rest, so odd input is carried along as body instead of
    being dropped or guessed at. Only LF ends a line; a bare CR is content.
    """
    fields, end = split_at(raw)
    return fields, raw[end:]


def split_at(raw: bytes) -> tuple[list[Field], int]:
    """``split`` with the offset where the rest starts instead of a copy of it:
    the body of a 25 MB message need not be copied to look at its header."""
    starts: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(raw):
        newline = raw.find(b"\n", pos)
        end = len(raw) if newline < 0 else newline + 1
        if raw[pos] in b" \t":
            if not starts:
                break
        else:
            match = _FIELD_START.match(raw, pos, end)
            if match is None:
                break
            starts.append((pos, match.group()[:-1]))
        pos = end
    if not starts:
        return [], 0
    ends = [offset for offset, _ in starts[1:]] + [pos]
    fields = [
        Field(name.decode("ascii"), raw[start:end])
        for (start, name), end in zip(starts, ends, strict=True)
    ]
    return fields, pos


# a continuation line of nothing but white space, not the field's first line
_BLANK_LINE = re.compile(rb"(?<=\n)[ \t]+(?:\r?\n|\Z)")


def has_blank_line(field: Field) -> bool:
    """Whether the field holds a line of only white space: RFC 5322's obsolete
    folding (4.2), which ``split`` reads as a continuation like any other, and
    some readers as the end of the header, the fields after it body text."""
    return _BLANK_LINE.search(field.raw) is not None


def without_blank_lines(raw: bytes) -> bytes:
    """A field's bytes without its lines of only white space: unambiguous to
    every reader, and the same field to DKIM's relaxed canonicalisation, which
    unfolds it and takes a run of white space for one space."""
    return _BLANK_LINE.sub(b"", raw)


def value(field: Field) -> str:
    """The field's value unfolded, with the surrounding white space removed."""
    text = field.raw.split(b":", 1)[1].decode("utf-8", errors="replace")
    return re.sub(r"\r?\n(?=[ \t])", "", text).strip(" \t\r\n")


def signature_tags(text: str) -> dict[str, str]:
    """A DKIM-Signature's tags (``d``, ``s``, ``h``, ...), white space (folding)
    taken out of each: what the relay reads of a signature it did not make,
    or of its own waiting in the queue."""
    pairs = (part.partition("=") for part in re.sub(r"\s+", "", text).split(";"))
    return {tag: tag_value for tag, _, tag_value in pairs if tag}


def line_ending(raw: bytes) -> bytes:
    """The message's line ending, taken from its first line; CRLF if it has none."""
    newline = raw.find(b"\n")
    return b"\n" if newline >= 0 and raw[newline - 1 : newline] != b"\r" else b"\r\n"


def fits_smtp(address: str) -> bool:
    """Within RFC 5321's lengths (4.5.3.1): 64 octets before the @, 254 in all;
    no server takes a longer one, and no header line could hold it."""
    local = address.rpartition("@")[0]
    return len(local.encode()) <= 64 and len(address.encode()) <= 254


def deliverable(address: str) -> bool:
    """Whether ``address`` names a mailbox on a host: a dot-atom (UTF-8 allowed,
    as a From may be written) or quoted local part, a host name after the ``@``
    (no address literal: the SMTP side refuses those too), within ``fits_smtp``.
    ``j@-x.example`` or ``j@x_y!.example`` reach no one; ``format_address``
    still takes ASCII only."""
    return fits_smtp(address) and bool(_MAILBOX.fullmatch(address))


def format_address(display_name: str, address: str) -> str:
    """``name <address>`` as plain ASCII that every parser reads back the same.

    The name is written as a bare phrase when it is all atoms, as a quoted
    string when it is other printable ASCII, and as RFC 2047 encoded words
    otherwise, or when it looks like an encoded word itself (a plain
    ``=?...?=`` would be decoded by the reader), or when ``fold`` could not
    break it into lines (a long atom or quoted string). The address must be a
    plain ASCII ``local@domain``: anything else (``>``, a comma, a space)
    could turn one mailbox into several.
    """
    for what, text in (("display name", display_name), ("address", address)):
        if _BREAKS.search(text):
            raise HeaderInjection(f"{what} contains CR, LF or NUL: {_show(text)}")
    if not _ADDR_SPEC.fullmatch(address):
        raise HeaderInjection(f"not a plain local@domain address: {_show(address)}")
    if _SURROGATES.search(display_name):
        raise HeaderInjection(f"display name is not valid text: {_show(display_name)}")
    if not display_name:
        return address
    return f"{_phrase(display_name)} <{address}>"


def encode_text(text: str) -> str:
    """Free text (a Subject) as ASCII for ``fold``: as it is, or as RFC 2047 words.

    Unlike ``email.header.Header.encode`` it never folds, so its result
    can go straight into ``fold``; a ``=?...?=`` in plain text is encoded
    too, or the reader would decode it, and so is text ``fold`` could not
    break into lines.
    """
    if _BREAKS.search(text):
        raise HeaderInjection(f"text contains CR, LF or NUL: {_show(text)}")
    if _SURROGATES.search(text):
        raise HeaderInjection(f"not valid text: {_show(text)}")
    if all(" " <= ch <= "~" for ch in text) and "=?" not in text and _foldable(text):
        return text
    return " ".join(_encoded_words(text))


def fold(name: str, value: str) -> bytes:
    """``Name: value`` plus CRLF, folded at white space to keep lines within 78 characters.

    Lines that hold an RFC 2047 encoded word are kept within 76 (RFC 2047 2).

    Folds go only before white space outside quoted strings and angle
    brackets, so an encoded word or an address is never cut. A value is
    refused when a parser anywhere could read a line break into it: CR, LF,
    NUL, other controls (VT and FF end lines for some) and non-ASCII
    (U+2028, U+0085 do the same); callers encode such text first. It is
    refused too when a line would exceed 998 characters: a server may cut
    such a line, and what follows the cut would start a field of its own.
    """
    if not _FIELD_NAME.fullmatch(name):
        raise HeaderInjection(f"not a header field name: {_show(name)}")
    if _BREAKS.search(value):
        raise HeaderInjection(f"{name} value contains CR, LF or NUL: {_show(value)}")
    if _CONTROLS.search(value) or not value.isascii():
        raise HeaderInjection(f"{name} value is not printable ASCII: {_show(value)}")
    if not value:
        return f"{name}:\r\n".encode("ascii")
    text = f"{name}: {value}"
    if len(text) <= (MAX_LINE_ENCODED if "=?" in text else MAX_LINE):
        return f"{text}\r\n".encode("ascii")
    offset = len(name) + 2
    cuts = [0, *(offset + i for i in _fold_points(value)), len(text)]
    lines = [""]
    for start, end in itertools.pairwise(cuts):
        piece = text[start:end]
        joined = lines[-1] + piece
        limit = MAX_LINE_ENCODED if "=?" in joined else MAX_LINE
        if not lines[-1] or len(joined) <= limit:
            lines[-1] += piece
        else:
            lines.append(piece)
    if max(map(len, lines)) > MAX_LINE_HARD:
        raise HeaderInjection(
            f"{name} value cannot be folded within {MAX_LINE_HARD} characters: {_show(value)}"
        )
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _foldable(value: str) -> bool:
    """Whether ``fold`` can break ``value`` into pieces that each fit a line."""
    if len(value) <= MAX_LINE:
        return True
    cuts = [0, *_fold_points(value), len(value)]
    return all(end - start <= MAX_LINE for start, end in itertools.pairwise(cuts))


def _fold_points(value: str) -> list[int]:
    """Where a fold may go: the start of a white-space run outside quotes and brackets.

    A run that ends the value is left alone: folding there would leave a
    line of nothing but white space.
    """
    points = []
    last = len(value.rstrip(" \t"))
    quoted = escaped = bracketed = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            escaped = ch == "\\"
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "<":
            bracketed = True
        elif ch == ">":
            bracketed = False
        elif ch in " \t" and 0 < i < last and value[i - 1] not in " \t" and not bracketed:
            points.append(i)
    return points


def _phrase(name: str) -> str:
    if all(" " <= ch <= "~" for ch in name) and "=?" not in name:
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        plain = name if _PHRASE.fullmatch(name) else quoted
        if _foldable(plain):
            return plain
    return " ".join(_encoded_words(name))


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 words for a phrase, each within 60 characters and whole characters only.

    Q is used when it is not longer than B: it stays readable for mostly
    Latin names. Words are cut after white space where possible: some
    readers (Python's own header parser among them) keep the space between
    two encoded words in a phrase, where RFC 2047 says to drop it, and would
    otherwise show a space in the middle of a word.
    """
    q_length = sum(len(_q_char(ch)) for ch in text)
    b_length = -(-len(text.encode("utf-8")) // 3) * 4
    use_q = q_length <= b_length
    limit = _PAYLOAD_MAX if use_q else _PAYLOAD_MAX // 4 * 3  # B: bytes before encoding

    def size(ch: str) -> int:
        return len(_q_char(ch)) if use_q else len(ch.encode("utf-8"))

    chunks, used = [""], 0
    for piece in re.findall(r"[^ \t]+[ \t]*|[ \t]+", text):
        if used and used + sum(map(size, piece)) > limit:
            chunks.append("")
            used = 0
        for ch in piece:
            if used + size(ch) > limit:
                chunks.append("")
                used = 0
            chunks[-1] += ch
            used += size(ch)
    if use_q:
        return [f"{_WORD_PREFIX['q']}{''.join(map(_q_char, c))}?=" for c in chunks]
    return [f"{_WORD_PREFIX['b']}{base64.b64encode(c.encode()).decode()}?=" for c in chunks]


def _q_char(ch: str) -> str:
    if ch in _Q_SAFE:
        return ch
    if ch == " ":
        return "_"
    return "".join(f"={byte:02X}" for byte in ch.encode("utf-8"))


def _show(text: str) -> str:
    """A short printable rendering of a refused value for the error message."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."
