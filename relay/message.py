"""A read-only view of a submitted message, for the policy stages to look at.

The email package is used here only to *read* values (decoded header text,
attachment file names); the bytes that are sent are edited by
``relay.rewrite`` and never regenerated from this view. Address fields are
split by ``address_list``, as mail clients split them.

A header block that is valid UTF-8 is read as UTF-8 (RFC 6532), as ERPs
write names and subjects that way; in one that is not, a line that is not
UTF-8 is read as Windows-1252, what a legacy ERP on Windows writes and what
the WHATWG Encoding Standard reads for a page labelled ISO-8859-1.
"""

from __future__ import annotations

import codecs
import email.parser
import email.policy
import functools
import itertools
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.utils import decode_params

from relay import headers


class _Part(Message):
    """A MIME part whose parameters (``boundary``, ``filename``) are split in one
    pass. The email package's own split recounts the quotes before each ``;``:
    a ``Content-Type`` with an open quote and 50 KB of ``;`` kept the worker's
    event loop busy for 5 seconds, growing with the square of its size."""

    def _get_params_preserve(self, failobj: object, header: str) -> object:
        """The parameters, their 8-bit bytes read in the parameter's own RFC 2231
        charset, else as a header line's are (UTF-8, else Windows-1252). Left to
        ``get``, such a value came as a ``Header`` printing each byte as U+FFFD,
        and an attachment rule on "Ordrebekræftelse" missed a file so named in
        UTF-8 or by a Windows ERP."""
        wanted = header.lower()
        value = next((v for k, v in self._headers if k.lower() == wanted), None)
        if value is None:
            return failobj
        params = []
        text = str(value)[:PARAMS_TEXT_LIMIT]
        for piece in itertools.islice(_kept_params(text), PARAMS_LIMIT):
            name, sep, val = piece.partition("=")
            params.append((name.strip(), _bytes_as_latin1(val.strip()) if sep else ""))
        return [(name, _eight_bit(val)) for name, val in decode_params(params)]


#: Parameters, and characters, read of one field: a name in RFC 2231 pieces
#: takes a few, and a part's header, in the body, is not held to the header
#: size limit. A Content-Disposition of 5 MB of ";" took 1.4 GB while its
#: pieces were read. As many characters as a whole header may have.
PARAMS_LIMIT = 1000
PARAMS_TEXT_LIMIT = 262_144  # pipeline.MAX_HEADER


def _kept_params(value: str) -> Iterator[str]:
    """The pieces that can be a parameter: the first (the type) and those not
    empty, a run of ``;`` and white space taken as one break."""
    pieces = _pieces(value, _PARAM_RUNS)
    yield next(pieces)
    yield from (piece for piece in pieces if piece)


def _bytes_as_latin1(value: str) -> str:
    """The parser carries 8-bit bytes as surrogates; ``decode_params`` takes them as
    Latin-1 characters, which an RFC 2231 charset then reads as the bytes they were."""
    if value.isascii():
        return value
    try:
        return value.encode("ascii", "surrogateescape").decode("latin-1")
    except UnicodeEncodeError:  # text, not bytes the parser carried
        return value


_ESCAPED = re.compile(rb"\\(.)", re.DOTALL)


def _eight_bit(value: str | tuple[str, str, str]) -> str | tuple[str, str, str]:
    """A value's bytes read in its RFC 2231 charset, by the names encoded words
    are read by (``windows-31j`` too), and handed back in the email package's own
    form in UTF-8, which it unquotes and decodes; without a charset (plain, a
    continuation never encoded, ``filename*=''…``), or in one no codec reads,
    read as a header line's."""
    if isinstance(value, tuple):
        charset, language, text = value
    else:
        charset, language, text = "", "", value
    if not charset and text.isascii():
        return text
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return text
    if charset:
        # decode_params leaves the value quoted, each " and \ byte in it escaped:
        # in UTF-16 they were part of a character
        quoted = len(raw) > 1 and raw[:1] == raw[-1:] == b'"'
        if quoted:
            raw = _ESCAPED.sub(rb"\1", raw[1:-1])
        try:
            name = raw.decode(_codec(charset), "replace").encode().decode("latin-1")
        except LookupError:
            pass
        else:
            if quoted:
                name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
            return ("utf-8", language, name)
    return _line_text(raw)


# quotes a run at a time, an even run changing nothing
_PARAM_BREAKS = re.compile(r'(?<!\\)"+|;')
_PARAM_RUNS = re.compile(r'(?<!\\)"+|;[\s;]*')


def split_params(value: str) -> list[str]:
    """A header value's ``;``-separated pieces as the email package splits them
    (a ``;`` inside quotes, a quote after a backslash not counting as one), each
    stripped, with a parameter's name lower-cased."""
    return list(_pieces(value, _PARAM_BREAKS))


def _pieces(value: str, breaks: re.Pattern[str]) -> Iterator[str]:
    start, quoted = 0, False
    for found in breaks.finditer(value):
        if found[0][0] == '"':
            quoted ^= len(found[0]) % 2 == 1
        elif not quoted:
            yield _named(value[start : found.start()])
            start = found.end()
    yield _named(value[start:])


def _named(piece: str) -> str:
    name, sep, val = piece.partition("=")
    return (name.strip().lower() + "=" + val.strip()).strip() if sep else piece.strip()


_PARSER = email.parser.BytesParser(_Part, policy=email.policy.compat32)
_HEADERS = email.parser.HeaderParser(policy=email.policy.compat32)
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True, eq=False)
class MessageView:
    """Header fields are read at once, decoded when first asked for; the MIME structure
    only when a rule asks for attachment names, since parsing a large message's parts
    costs more than the rest."""

    written: tuple[tuple[str, str], ...]  # (name, unfolded value as written), in order
    raw: bytes = field(repr=False)
    _addresses: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """(name, decoded unfolded value), in order."""
        return tuple((name, decode(value)) for name, value in self.written)

    @functools.cached_property
    def attachments(self) -> tuple[str, ...]:
        """File names of every MIME part that has one; none where the email
        package's parser recurses too deep (parts nested a thousand levels)."""
        try:
            return tuple(_filenames(_PARSER.parsebytes(_first_parts(skeleton(self.raw)))))
        except RecursionError:
            return ()

    @functools.cached_property
    def fields(self) -> list[headers.Field]:
        """The header's fields as ``headers.split_at`` reads them, for the checks
        that look at a field's bytes."""
        return headers.split_at(self.raw)[0]

    @functools.cached_property
    def _by_name(self) -> dict[str, tuple[str, ...]]:
        """Each name's decoded values, in order: a decision asks for about twenty
        names, and each scan of every field was a call to ``lower`` per field."""
        found: dict[str, list[str]] = {}
        for name, value in self.headers:
            found.setdefault(name.lower(), []).append(value)
        return {name: tuple(values) for name, values in found.items()}

    def get(self, name: str) -> str | None:
        values = self._by_name.get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> tuple[str, ...]:
        return self._by_name.get(name.lower(), ())

    def written_value(self, name: str) -> str | None:
        """The first ``name`` field as the message wrote it, encoded words and all:
        decoded, ``=?utf-8?q?Gross=2C_J=C3=BCrgen?= <j@x>`` reads as two mailboxes."""
        name = name.lower()
        return next((value for field, value in self.written if field.lower() == name), None)

    def addresses(self, name: str) -> tuple[tuple[str, str], ...]:
        """(decoded display name, address) pairs of every ``name`` header that names
        a mailbox SMTP can deliver to (``headers.deliverable``).

        The value is split into mailboxes before anything is decoded, and an encoded
        word is one word of a display name: the ``<``, ``,``, ``@`` or ``:`` it may
        hold are text, and never turn one mailbox into another. Each name is parsed
        once: an unknown sender's From is read to identify it and again to say so.
        """
        return tuple((n, a) for n, a in self.mailboxes(name) if headers.deliverable(a))

    def mailboxes(self, name: str) -> tuple[tuple[str, str], ...]:
        """Every mailbox of every ``name`` header, deliverable or not: to look an
        address up among the policy's, which may hold forms ``deliverable``
        refuses (``erp_host`` in a domain), and to name what a header said."""
        name = name.lower()
        found = self._addresses.get(name)
        if found is None:
            values = [v for n, v in self.written if n.lower() == name]
            found = self._addresses[name] = tuple(
                pair for value in values for pair in address_list(value)
            )
        return found

    @property
    def subject(self) -> str:
        return self.get("Subject") or ""


def decode(value: str) -> str:
    """Decode RFC 2047 words; a malformed word is kept as it was written, and so
    is a value the email package's decoder would take too long over."""
    unfolded = _unfolded(value)
    if "=?" not in unfolded:
        return unfolded  # no encoded word: what the decoder would give back, at no cost
    if unfolded.count("=?") > _MOST_WORDS or _decoder_work(unfolded) > _DECODER_BUDGET:
        return unfolded
    try:
        return str(make_header(decode_header(unfolded)))
    except (UnicodeDecodeError, LookupError):  # raw 8-bit text, or a charset Python lacks
        return _words_decoded(unfolded)
    except (ValueError, UnicodeError, MessageError):  # a charset named in 8 bits
        return unfolded


# an RFC 2047 encoded word: =?charset?encoding?text?=
ENCODED_WORD = r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?="
_WORD = re.compile(ENCODED_WORD)


def _words_decoded(value: str) -> str:
    """Each encoded word decoded where it stands, the text around it kept: the
    email package's decoder takes unencoded parts for ASCII and gave up on
    ``Faktura =?utf-8?q?f=C3=B8r?= Øystein`` (raw UTF-8 as RFC 6532 allows),
    so the notice showed the word as written. White space between two
    encoded words is dropped (RFC 2047 6.2). A word in a charset no codec
    reads is kept as written, and its neighbours are decoded all the same."""
    parts: list[str] = []
    end, decoded_before = 0, False
    for word in _WORD.finditer(value):
        between = value[end : word.start()]
        try:
            (raw, charset), *_ = decode_header(word.group())
            # looked up first: an empty word decodes without its codec looked up
            text, decoded = raw.decode(codecs.lookup(_codec(charset)).name, "replace"), True
        except (ValueError, LookupError, MessageError):
            text, decoded = word.group(), False
        if not (decoded_before and decoded and not between.strip()):
            parts.append(between)
        parts.append(text)
        end, decoded_before = word.end(), decoded
    parts.append(value[end:])
    return "".join(parts)


# labels ERPs write that Python's codecs do not know by that name: Java's name
# for Windows code page 932 (Oracle and JD Edwards write Japanese in it), and
# Mac and legacy spellings
_CHARSETS = {
    "windows-31j": "cp932",
    "x-sjis": "shift_jis",
    "x-euc-jp": "euc_jp",
    "x-gbk": "gbk",
    "x-mac-roman": "mac_roman",
    "x-mac-cyrillic": "mac_cyrillic",
    "x-mac-greek": "mac_greek",
    "x-mac-turkish": "mac_turkish",
    "x-mac-centraleurroman": "mac_latin2",
}
_ISO_8859 = re.compile(r"(?:iso[-_ ]?)?8859[-_ ](\d{1,2})(?:-[ie])?")


def _codec(charset: str | None) -> str:
    """The codec for an encoded word's charset, its RFC 2231 language
    (``UTF-8*de``) left off."""
    if not charset:
        return "ascii"
    name = charset.partition("*")[0].strip().lower()
    iso = _ISO_8859.fullmatch(name)
    if iso is not None:
        return f"iso8859_{iso.group(1)}"
    return _CHARSETS.get(name, name)


# Characters the decoder's pattern may scan: ~10 ms; no real header comes near it.
_DECODER_BUDGET = 2_000_000
# Encoded words decoded in one value: the decoder joins its parts in a way that
# grows faster than their number (a 250 KB Subject of them, 0.8 s on the event
# loop); a real Subject or name has a few dozen at most.
_MOST_WORDS = 1000


def _decoder_work(text: str) -> int:
    """How far ``decode_header``'s pattern scans, at most: from each ``=?`` after a
    line's last ``?=`` it reads to the end of the line and fails, so a 256 KiB
    ``Subject: =?a?q? =?a?q? ...`` held the event loop for minutes. Before that
    ``?=`` every try ends at the first ``?`` that does not fit or in a match."""
    work = 0
    for line in text.splitlines():
        tail = line[line.rfind("?=") + 2 :] if "?=" in line else line
        work += tail.count("=?") * len(tail)
    return work


_LEXEME = re.compile(
    r"""(?P<space>[ \t\r\n]+)
    | (?P<encoded>=\?[^?\s]+\?[bBqQ]\?[^?]*\?=)
    | (?P<atom>[^ \t\r\n()<>\[\]:;@\\,."]+)
    | "(?P<quoted>(?:[^"\\]|\\.)*)"?
    | (?P<literal>\[(?:[^]\\]|\\.)*\]?)
    | (?P<comment>\()
    | (?P<special>.)""",
    re.VERBOSE | re.DOTALL,
)
_COMMENT_MARKS = re.compile(r"\\.|[()]", re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_PHRASE = frozenset({"atom", "encoded", "quoted", "."})
_LOCAL_WORDS = frozenset({"atom", "quoted"})
_DOMAIN_WORDS = frozenset({"atom"})
_DOT_ATOM = re.compile(headers.DOT_ATOM_UTF8)
_ATOMS_AND_DOTS = re.compile(r"[^\s\x00-\x1f()<>\[\]:;@\\,\"]+")


# (kind, text, spaced): kind is a _LEXEME group name or, for a special, the
# character itself; text is a quoted string's content unquoted, anything else
# as written; spaced says white space or a comment came before it.
_Lexeme = tuple[str, str, bool]


def address_list(value: str) -> list[tuple[str, str]]:
    """(decoded display name, address) for each mailbox of an RFC 5322 address
    list, groups opened; an address is empty or malformed where the value is.

    The email package's compat32 ``getaddresses`` split the raw value, encoded
    words included, at every comma: ``=?utf-8?q?Support,a@evil.example?= <j@x>``
    gave ``a@evil.example``. Here an encoded word is one word of a display
    name, as in the email package's modern parser and in mail clients, and a
    mailbox with ``<>`` is the address inside them, whatever its name holds.
    One pass without recursion: a header of nested comments or groups costs
    what any other of its size does.
    """
    return [_mailbox(element) for element in _rejoined(_elements(_lexemes(value))) if element]


def _rejoined(elements: list[list[_Lexeme]]) -> list[list[_Lexeme]]:
    """Phrases alone before a mailbox with ``<>`` are the first parts of its
    name, cut off at unquoted commas: ERPs write ``Gross, Juergen <j@x>`` and
    ``Smith, John, Jr. <j@x>``, and a From the relay wrote again kept only
    the name after the last comma. Phrases followed by no such mailbox stay
    as they were: mailboxes without an address."""
    joined: list[list[_Lexeme]] = []
    phrases: list[list[_Lexeme]] = []
    for element in elements:
        if _phrase_alone(element):
            phrases.append(element)
            continue
        if any(kind == "<" for kind, _, _ in element) and phrases:
            name = [lexeme for phrase in phrases for lexeme in (*phrase, (",", ",", False))]
            joined.append([*name, *element])
        else:
            joined += [*phrases, element]
        phrases = []
    return joined + phrases


def _phrase_alone(element: list[_Lexeme]) -> bool:
    return bool(element) and all(kind in _PHRASE for kind, _, _ in element)


def _lexemes(value: str) -> list[_Lexeme]:
    found: list[_Lexeme] = []
    pos, spaced = 0, False
    while pos < len(value):
        for match in _LEXEME.finditer(value, pos):
            kind = match.lastgroup
            if kind == "space":
                spaced = True
                continue
            if kind == "comment":
                pos, spaced = _comment_end(value, match.end()), True
                break
            text = match[0]
            if kind == "quoted":
                text = match["quoted"]
                text = _QUOTED_PAIR.sub(r"\1", text) if "\\" in text else text
            found.append((text if kind == "special" else kind or text, text, spaced))
            spaced = False
        else:
            break
    return found


def _comment_end(value: str, pos: int) -> int:
    """Where the comment opened just before ``pos`` ends: comments nest, and one
    left open runs to the end of the value."""
    depth = 1
    for mark in _COMMENT_MARKS.finditer(value, pos):
        if mark[0] == "(":
            depth += 1
        elif mark[0] == ")":
            depth -= 1
        if depth == 0:
            return mark.end()
    return len(value)


def _elements(lexemes: list[_Lexeme]) -> list[list[_Lexeme]]:
    """The lexemes of each mailbox: split at commas and at group ends outside
    ``<>``, a group's name left out."""
    elements: list[list[_Lexeme]] = [[]]
    bracketed = False
    for lexeme in lexemes:
        kind = lexeme[0]
        if bracketed:
            bracketed = kind != ">"
        elif kind == "<":
            bracketed = True
        elif kind == "," or kind == ";":
            if elements[-1]:
                elements.append([])
            continue
        elif kind == ":":
            elements[-1] = []
            continue
        elements[-1].append(lexeme)
    return elements


def _mailbox(element: list[_Lexeme]) -> tuple[str, str]:
    kinds = [kind for kind, _, _ in element]
    if "<" not in kinds:
        return "", _addr_spec(element)
    start = kinds.index("<")
    end = kinds.index(">", start) if ">" in kinds[start:] else len(kinds)
    inside = element[start + 1 : end]
    route = [i for i, (kind, _, _) in enumerate(inside) if kind == ":"]
    if route:
        inside = inside[route[-1] + 1 :]  # obsolete source route: @a,@b:j@x
    return _display_name(element[:start]), _addr_spec(inside)


def _display_name(phrase: list[_Lexeme]) -> str:
    """The phrase decoded, or empty when it is no phrase (``a@b <a@b>``); a comma
    in it is one ``_rejoined`` put back."""
    if any(kind not in _PHRASE and kind != "," for kind, _, _ in phrase):
        return ""
    parts: list[list[_Lexeme]] = [[]]
    for lexeme in phrase:
        if lexeme[0] == ",":
            parts.append([])
        else:
            parts[-1].append(lexeme)
    return ", ".join(decode(_written(part)) for part in parts if part)


def _written(phrase: list[_Lexeme]) -> str:
    return "".join(
        (" " if i and spaced else "") + text for i, (_, text, spaced) in enumerate(phrase)
    )


def _addr_spec(lexemes: list[_Lexeme]) -> str:
    """``local@domain``, a local part quoted only where it must be; empty where the
    lexemes are no address, or the local part holds an encoded word, which a
    reader that decodes it would take for another address."""
    kinds = [kind for kind, _, _ in lexemes]
    if kinds.count("@") != 1:
        return ""
    at = kinds.index("@")
    local = _dotted(lexemes[:at], _LOCAL_WORDS) or _dots_astray(lexemes[:at])
    domain = _dotted(lexemes[at + 1 :], _DOMAIN_WORDS)
    if local is None or domain is None:
        return ""
    if not _DOT_ATOM.fullmatch(local) and not _ATOMS_AND_DOTS.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}"


def _dots_astray(lexemes: list[_Lexeme]) -> str | None:
    """A local part of atoms with dots doubled or at an end (``taro..y``, which
    some mobile carriers hand out and a policy may list): read as written, as
    compat32 did, for a lookup; ``headers.deliverable`` still refuses it."""
    if not lexemes or any(kind not in ("atom", ".") for kind, _, _ in lexemes):
        return None
    return "".join(text for _, text, _ in lexemes)


def _dotted(lexemes: list[_Lexeme], words: frozenset[str]) -> str | None:
    """Words of the ``words`` kinds joined by dots, or None for anything else."""
    if len(lexemes) % 2 == 0:
        return None
    for i, (kind, _, _) in enumerate(lexemes):
        if (kind not in words) if i % 2 == 0 else (kind != "."):
            return None
    return "".join(text for _, text, _ in lexemes)


def read(raw: bytes, split: tuple[list[headers.Field], int] | None = None) -> MessageView:
    """``split`` is ``headers.split_at(raw)`` when the caller has it already."""
    head = _head(raw)
    fields = _plain_fields(head, split if split is not None and split[1] == len(head) else None)
    if fields is None:
        fields = [
            (name, str(value)) for name, value in _HEADERS.parsestr(header_text(head)).items()
        ]
    view = MessageView(written=tuple((name, _unfolded(value)) for name, value in fields), raw=raw)
    if split is not None:
        view.__dict__["fields"] = split[0]  # the cached property, read already
    return view


def _unfolded(value: str) -> str:
    """A field's value on one line; nearly every value is on one already."""
    return _FOLD.sub("", value) if "\n" in value else value


def header_text(head: bytes) -> str:
    """The header block as UTF-8 text, or else line by line (as the policy reads
    it and preview shows it): a name in Latin-1 bytes came out as
    ``J\ufffdrgen`` in the signed ``Reply-To``."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(_line_text(line) for line in head.splitlines(keepends=True))


def _line_text(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1").translate(_WINDOWS_1252)


def _windows_1252(byte: int) -> str:
    """Python's codec has no character for five of the bytes; WHATWG maps them
    to the C1 controls, as Latin-1 does."""
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


_WINDOWS_1252 = str.maketrans({byte: _windows_1252(byte) for byte in range(0x80, 0xA0)})


def _plain_fields(
    head: bytes, split: tuple[list[headers.Field], int] | None = None
) -> list[tuple[str, str]] | None:
    """(name, raw value) as the email package's compat32 parser gives them for the
    block's ``_text``, for a header block with nothing unusual in it (UTF-8, CRLF or
    LF line endings, every line a field or a continuation); None for anything else,
    which the parser reads.

    The parser was 5% of the relay's CPU for what is, for nearly every message,
    splitting lines at colons; tests/test_message_view.py holds the two readings
    to each other.
    """
    if head.count(b"\r") != head.count(b"\r\n"):
        return None
    if not head.isascii():
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return None
    fields, end = split or headers.split_at(head)
    if end != len(head):
        return None
    found = []
    for one in fields:
        value = one.raw.decode("utf-8").split(":", 1)[1]
        found.append((one.name, value.lstrip(" \t").rstrip("\r\n")))
    return found


def _head(raw: bytes) -> bytes:
    """Up to the blank line: the header parser stops there, but first splits
    everything it is given into lines, a 100 KB body included."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf)  # not through the body
    ends = [i for i in (crlf, lf) if i >= 0]
    return raw[: min(ends) + 2] if ends else raw


_BLANK_LINE = re.compile(rb"\n\r?\n")  # where a header block ends and a body begins
_BASE64_RUN = re.compile(rb"(?:[A-Za-z0-9+/=]{16,}\r?\n)+")


def skeleton(raw: bytes) -> bytes:
    """The message with the base64 text that begins a body left out, for the
    names of its parts: the email package holds every part's body, several
    times over, while it parses, some 200 MB for a 25 MB attachment, and the
    names are in the parts' headers. Only lines right after the empty line
    that ends a header block go: such a line elsewhere (in a header block, a
    malformed one) is where the email package ends the headers, and must stay."""
    kept: list[bytes] = []
    start = 0
    for blank in _BLANK_LINE.finditer(raw):
        if blank.end() < start:
            continue
        run = _BASE64_RUN.match(raw, blank.end())
        if run is not None:
            kept.append(raw[start : run.start()])
            start = run.end()
    kept.append(raw[start:])
    return b"".join(kept)


#: Lines that begin a part ("--" and a boundary the message declares) handed to
#: the parser: an ERP's document has a few dozen parts, and each costs the email
#: package about 300 bytes and 7 µs. 20 MB of empty parts took 20 s and 1 GB.
PARTS_LIMIT = 100_000
# folded (``boundary=<CRLF> "x"``), or in RFC 2231 pieces (``boundary*0=``) whose
# first is the start of the boundary, and so of its delimiter lines, percent-
# encoded after a charset (``boundary*=''%58``) or not
_BOUNDARY = re.compile(
    rb'boundary(\*0*\*?)?\s*=\s*(?:"((?:[^"\\\r\n]|\\.){1,200})"|([^\s";]{1,200}))', re.I
)
#: Boundaries read: one for each multipart, which a document has a few of (an
#: attached mailbox of a thousand messages, a few thousand).
BOUNDARIES_LIMIT = 10_000
#: Lines that begin with "--", whatever follows: a boundary the email package
#: reads in a way the pattern above does not is held to this.
DASH_LINES_LIMIT = 1_000_000
_DASH_LINE = re.compile(rb"^--([^\n]*)", re.MULTILINE)
_PIECES_READ = 16


def _first_parts(raw: bytes) -> bytes:
    """The message up to its ``PARTS_LIMIT``-th delimiter line of a boundary it
    declares (and before its ``BOUNDARIES_LIMIT``-th declaration, and its
    ``DASH_LINES_LIMIT``-th line that begins with "--"): the names of parts
    beyond are not read. Lines of text that begin with "--" (an SQL dump's
    comments, a table's rules) are no part's."""
    if raw.count(b"\n--") < PARTS_LIMIT:  # no more parts than that: nothing to cut
        return raw
    past = next(itertools.islice(_DASH_LINE.finditer(raw), DASH_LINES_LIMIT, None), None)
    if past is not None:
        raw = raw[: past.start()]
    found = list(itertools.islice(_BOUNDARY.finditer(raw), BOUNDARIES_LIMIT + 1))
    if len(found) > BOUNDARIES_LIMIT:
        raw = raw[: found.pop().start()]
    whole: set[bytes] = set()
    starts: list[bytes] = []  # a boundary's first RFC 2231 piece: how its lines begin
    for one in found:
        value, piece = _boundary(one)
        if not value:
            continue
        if not piece:
            whole.add(value)
        elif len(starts) < _PIECES_READ:
            starts.append(value)
    count, begins = 0, tuple(starts)
    for line in _DASH_LINE.finditer(raw):  # compared as the email package compares them
        rest = line[1].rstrip(b" \t\r")
        if rest in whole or rest.removesuffix(b"--") in whole or rest.startswith(begins):
            count += 1
            if count > PARTS_LIMIT:
                return raw[: line.start()]
    return raw


def _boundary(declared: re.Match[bytes]) -> tuple[bytes, bool]:
    """A declared boundary as the email package reads it (unquoted, decoded, its
    trailing white space stripped), and whether it is only its first piece."""
    star, quoted, token = declared.groups(b"")
    # unquoted as the email package unquotes (email.utils.unquote)
    value = quoted.replace(b"\\\\", b"\\").replace(b'\\"', b'"') or token
    charset = "utf-8"
    if star.endswith(b"*"):  # RFC 2231: charset'language'%XX..., split at two quotes only
        pieces = value.split(b"'", 2)
        if len(pieces) == 3:
            charset, value = pieces[0].decode("ascii", "replace") or charset, pieces[2]
        value = urllib.parse.unquote_to_bytes(value)
    try:
        text = value.decode(charset)
    except (LookupError, UnicodeDecodeError):
        text = value.decode("utf-8", "surrogateescape")
    # stripped as text, as the package strips it: \x1c-\x1f and NBSP are white space
    return text.rstrip().encode("utf-8", "surrogateescape"), star.strip(b"*") != b""


def _filenames(msg: Message) -> list[str]:
    """A name the email package cannot read (a broken RFC 2231 parameter: its
    charset unknown, its pieces misnumbered) is left out rather than failing the
    message, which would be answered 451 at every try."""
    names = []
    for part in msg.walk():
        try:
            filename = part.get_filename()
        except (TypeError, ValueError, LookupError, MessageError):
            continue
        if filename:
            names.append(decode(str(filename)))
    return names
