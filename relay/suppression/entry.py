"""One entry of the suppression list, and the reading of one line of its file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from relay.audit.events import timestamp
from relay.policy.schema import hint

VERSION = 1
BOUNCE = "bounce"  # a permanent refusal of the address by a receiving server
COMPLAINT = "complaint"  # the recipient reported the mail as spam
MANUAL = "manual"
REASONS = (BOUNCE, COMPLAINT, MANUAL)

Key = tuple[str, str | None]  # (address in lower case, tenant or None for all)


@dataclass(frozen=True)
class Suppression:
    """One address the relay does not send to. ``tenant`` None: for every
    tenant (a mailbox that does not exist is gone for all of them); a tenant's
    id: for that tenant's mail only (one company's customer who complained)."""

    address: str
    tenant: str | None
    reason: str
    since: str  # UTC, as the audit log writes times
    detail: str = ""  # the refusal that put it there, or the sysadmin's note
    queue_id: str | None = None  # the message whose refusal put it there
    by: str = "relay"

    @property
    def key(self) -> Key:
        return (self.address.lower(), self.tenant)

    def describe(self) -> str:
        """For the sending user's notice and the preview's reasons, in words."""
        scope = "" if self.tenant is None else f" for {self.tenant}"
        detail = f": {self.detail}" if self.detail else ""
        why = _WHY.get(self.reason, self.reason)
        return f"on the suppression list{scope} since {self.since} ({why}{detail})"


_WHY = {
    BOUNCE: "a delivery to it failed as to an address that does not exist or takes no mail",
    COMPLAINT: "its recipient reported mail as spam",
    MANUAL: "put there by the mail administrator",
}
_DESCRIBED = re.compile(r"on the suppression list(?: for \S+)? since \S+ \(")


def described_reason(text: str) -> str | None:
    """The reason of the entry whose ``describe`` begins in ``text``: a queue
    record keeps a suppressed recipient's words only. Read where ``describe``
    puts it, as the entry's detail after it may be anyone's (a bounce
    report's diagnostic)."""
    found = _DESCRIBED.search(text)
    if found is None:
        return None
    rest = text[found.end() :]
    return next((reason for reason, why in _WHY.items() if rest.startswith(why)), None)


_DECODE = json.JSONDecoder().decode


class _Keys(NamedTuple):
    required: tuple[str, ...]
    known: frozenset[str]
    said: str  # what a line of its op has, for a sysadmin who wrote it by hand


def _keys(line: str, required: tuple[str, ...], optional: tuple[str, ...]) -> _Keys:
    said = f"{line} has {_and(required)}, and may have {_and(optional)}"
    return _Keys(required, frozenset(required + optional), said)


def _and(words: tuple[str, ...]) -> str:
    return f"{', '.join(words[:-1])} and {words[-1]}"


_KEYS = {
    "add": _keys(
        "an add line",
        ("op", "address", "tenant", "reason", "since"),
        ("v", "detail", "queue_id", "by"),
    ),
    "remove": _keys("a remove line", ("op", "address"), ("v", "tenant", "time", "by")),
}
_ANY_KEY = frozenset().union(*(keys.known for keys in _KEYS.values()))
_EITHER = "; ".join(keys.said for keys in _KEYS.values())


def read_line(raw: bytes) -> dict[str, Any]:
    """A line's change, checked: ``op`` add with an entry's fields, or remove
    with an address and tenant; ValueError (saying what is wrong) otherwise.
    No object is made of it: a worker reads 100,000 lines at its start. An
    entry's time is checked where it is used (``millis``)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(_utf16(raw) or _not_utf8(raw, exc)) from None
    try:
        record = _DECODE(text)
    except json.JSONDecodeError as exc:
        raise ValueError(_utf16(raw) or _not_json(text, exc)) from None
    except RecursionError:  # a line of a thousand '[' stopped the relay's start
        raise ValueError(f"not a JSON object: nested deeper than the relay reads: {_ONE}") from None
    except ValueError:  # Python's limit on an integer's digits
        raise ValueError(f"not a JSON object: a number too long to read: {_ONE}") from None
    if not isinstance(record, dict):
        shown = repr(_cut(record)) if isinstance(record, str) else _cut(_shown(record))
        raise ValueError(f"not a JSON object but {_kind(record)} {shown}: {_ONE}")
    try:
        op = record.get("op")
        _check_keys(record, op)
        if op == "add":
            _check_added(record)
        elif type(record["address"]) is not str or not isinstance(record.get("tenant"), str | None):
            raise ValueError("address or tenant is not text")
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    return record


_ONE = "each line is one whole JSON object, in UTF-8"
_EXPECTED = {  # the JSON decoder's words, as a sysadmin who edited the line reads them
    "Expecting value": "expected a value",
    "Expecting property name enclosed in double quotes": "expected a key in double quotes",
    "Expecting ':' delimiter": "expected ':' after the key",
    "Expecting ',' delimiter": "expected ',' or the object's end",
    "Invalid control character at": "a control character (a tab?) inside text",
    "Invalid \\uXXXX escape": "a \\u escape without four hex digits",
    "Invalid \\escape": "a backslash escape JSON does not have",
}


def _utf16(raw: bytes) -> str | None:
    """A line saved as UTF-16 (Notepad's "Unicode"): ASCII in it is valid UTF-8
    with a NUL beside each character, and was said to be no JSON at its first
    NUL, or a byte of its own that UTF-8 lacks, to be Latin-1."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        seen = f"the line begins with a byte order mark, 0x{raw[0]:02x} 0x{raw[1]:02x}"
    else:
        line = raw.rstrip(b"\r\n")
        even, odd = line[::2], line[1::2]
        if not odd or min(even.count(0) * 4 / len(even), odd.count(0) * 4 / len(odd)) > 1:
            return None  # NULs all through, as a file cut by a crash has: no UTF-16
        if max(even.count(0) * 2 / len(even), odd.count(0) * 2 / len(odd)) < 1:
            return None
        seen = "a NUL every other byte"
    return f'saved as UTF-16 (Notepad\'s "Unicode"; {seen}), not UTF-8: {_ONE}'


def _not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    """Python's words (``'utf-8' codec can't decode byte 0xf8 in position 12``)
    named neither the file's encoding nor where to look in the line."""
    byte = raw[exc.start]
    try:
        raw.rstrip(b"\r\n").decode()
        cut = False
    except UnicodeDecodeError as within:
        cut = within.reason == "unexpected end of data"
    why = "a character cut off at the line's end" if cut else None
    said = f"0x{byte:02x}; {why or 'saved as Latin-1?'}"
    if why is None and exc.reason == "invalid continuation byte":
        said = _cut_short(raw, exc) or said
    return f"not UTF-8 at byte {exc.start + 1} of the line ({said}): {_ONE}"


def _cut_short(raw: bytes, exc: UnicodeDecodeError) -> str | None:
    """The bytes at ``exc``, when they begin a character the byte after them does
    not go on with: said to be Latin-1, where a character cut in two, after a
    byte of its own or with UTF-8 elsewhere in the line, is none. A Latin-1
    letter (å, é) before ASCII, or before a no-break space (0xa0) or
    Windows-1252's typographic quote (0x92), is also such a start: without
    UTF-8 elsewhere in the line, and where its bytes read as Windows-1252
    text, it is said as both."""
    after = raw[exc.end]
    if after & 0xC0 == 0x80:
        return None  # a byte that goes on with some character, not with this one
    rest = raw[: exc.start] + raw[exc.end :]
    try:
        rest.decode()
    except UnicodeDecodeError:
        return None  # more bytes UTF-8 lacks: the line is in another encoding
    utf8_elsewhere = not rest.isascii()
    begun = raw[exc.start : exc.end]
    lead = begun[0]
    size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    first = "the first byte" if len(begun) == 1 else f"the first {len(begun)} bytes"
    why = "a character cut short"
    if not utf8_elsewhere and _text_in_windows_1252(begun):
        why += ", or saved as Latin-1?"
    return (
        f"{' '.join(f'0x{b:02x}' for b in begun)}, {first} of a {size}-byte UTF-8 character,"
        f" then 0x{after:02x}, which is no part of it: {why}"
    )


# bytes that follow a letter in Latin-1 or Windows-1252 text: a no-break space,
# Latin-1's signs (° « ½), Windows-1252's typographic quotes and dashes (0x91-0x97),
# its euro sign, ellipsis and trade mark sign (0x80, 0x85, 0x99)
_AFTER_A_LETTER = frozenset(range(0xA0, 0xC0)) | frozenset(range(0x91, 0x98)) | {0x80, 0x85, 0x99}


def _text_in_windows_1252(raw: bytes) -> bool:
    """Whether ``raw``, which begins a UTF-8 character (its first byte a Latin-1
    letter, é), reads as text in Windows-1252 too: a letter and the signs
    that follow one. 0x81 and 0x82, cut from a Japanese character, are none."""
    return all(byte in _AFTER_A_LETTER for byte in raw[1:])


def _not_json(text: str, exc: json.JSONDecodeError) -> str:
    """Python's words (``Expecting value: line 1 column 1 (char 0)``) said
    nothing of a line cut short, and nothing of what stood where. The line
    is read again without its end: the decoder took a line feed for text, and
    an unended quote for a line cut short."""
    if text.startswith("\ufeff"):
        return (
            "a byte order mark (U+FEFF) before the JSON object, as some editors save"
            f" UTF-8: {_ONE}, without it"
        )
    line = text.rstrip("\r\n")
    if line != text:
        try:
            _DECODE(line)
        except json.JSONDecodeError as within:
            text, exc = line, within
    found = text[exc.pos :].rstrip()
    unended = exc.msg.startswith("Unterminated string")
    if unended and found.endswith("}"):
        return (
            f"not a JSON object: the text in quotes from column {exc.pos + 1} has no end"
            f" quote: {_ONE}"
        )
    if not found or unended:
        return (
            f"not a JSON object: cut off after column {len(text.rstrip())}, before the"
            f" object ends (a write that stopped, or an edit?): {_ONE}"
        )
    if exc.msg.startswith("Extra data"):
        return f"more after the JSON object, at column {exc.pos + 1}: {_cut(found)!r}: {_ONE}"
    if exc.pos == 0 or not text[: exc.pos].strip():
        return f"not a JSON object: {_cut(found)!r} at column {exc.pos + 1}: {_ONE}"
    wrong = next((w for m, w in _EXPECTED.items() if exc.msg.startswith(m)), exc.msg)
    return f"not a JSON object: at column {exc.pos + 1}, {wrong}, found {_cut(found)!r}: {_ONE}"


def _cut(text: str) -> str:
    return text if len(text) <= 30 else f"{text[:30]}..."


def _kind(value: object) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool) or value is None:
        return "the value"
    return "the number"


def _check_keys(record: dict[str, Any], op: object) -> None:
    """A key misspelt by hand (``adress``, ``tenat``) makes a line no entry when
    what it meant is not known, and the warning names the key: read as
    without it, a remove line's misspelt tenant removed the entry for all
    tenants instead of the tenant's. An add line with every key it needs
    is still taken (``unknown_key`` says what it has beside them): skipped
    for a misspelt ``detail``, its address was sent to again."""
    keys = _KEYS.get(op) if isinstance(op, str) else None
    if keys is None:
        wrong = f"op {_shown(op)} is neither add nor remove" if "op" in record else "no key 'op'"
        odd = _odd_key(record, _ANY_KEY)
        if odd is not None:
            wrong = f"{_unknown_key(odd, _ANY_KEY)}, and {wrong}"
        raise ValueError(f"{wrong}: {_EITHER}")
    odd = _odd_key(record, keys.known)
    missing = [key for key in keys.required if key not in record]
    if odd is not None and (missing or op == "remove"):
        raise ValueError(_unknown(odd, keys.known, keys.said))
    if missing:
        raise ValueError(f"no key {missing[0]!r}: {keys.said}")


def unknown_key(record: dict[str, Any]) -> str | None:
    """What a line ``read_line`` took has beside its op's keys, for a warning."""
    keys = _KEYS[record["op"]]
    odd = _odd_key(record, keys.known)
    return None if odd is None else _unknown(odd, keys.known, keys.said)


def has_unknown_key(record: dict[str, Any]) -> bool:
    """Whether ``unknown_key`` has something to say: a look, not a sentence (its
    hint compares the key with each known one), for each line of a long list."""
    return _odd_key(record, _KEYS[record["op"]].known) is not None


def _odd_key(record: dict[str, Any], known: frozenset[str]) -> str | None:
    if record.keys() <= known:
        return None
    return next(k for k in record if k not in known)


def _unknown(key: str, known: frozenset[str], said: str) -> str:
    return f"{_unknown_key(key, known)}: {said}"


def _unknown_key(key: str, known: frozenset[str]) -> str:
    return f"unknown key {key!r}{hint(key, known)}"


def parse(raw: bytes) -> Suppression | Key:
    """A line as the tools read it: the entry added, or the key of the one removed."""
    return change(read_line(raw))


def change(record: dict[str, Any]) -> Suppression | Key:
    """A line ``read_line`` took, as ``parse`` gives it."""
    if record["op"] == "remove":
        return (record["address"], record.get("tenant"))
    return checked(
        Suppression(
            record["address"],
            record["tenant"],
            record["reason"],
            record["since"],
            record.get("detail", ""),
            record.get("queue_id"),
            record.get("by", "relay"),
        )
    )


def _check_added(record: dict[str, Any]) -> None:
    address, since = record["address"], record["since"]
    if not (type(address) is str and "@" in address and type(since) is str):
        raise ValueError("address and since must be text, with an address")
    if not all(type(record.get(k, "")) is str for k in ("detail", "by")):
        raise ValueError("detail and by must be text")
    if not isinstance(record["tenant"], str | None) or not isinstance(
        record.get("queue_id"), str | None
    ):
        raise ValueError("tenant and queue_id must be text or null")
    if record["reason"] not in REASONS:
        raise ValueError(f"reason {_shown(record['reason'])} is not one of {', '.join(REASONS)}")


def _shown(value: object) -> str:
    """A value of the line as the sysadmin wrote it, not as Python spells it (None,
    True, ['add']): text quoted as the messages quote keys, anything else as JSON."""
    return repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def millis(since: str) -> int:
    """An entry's time, as written (``2026-03-04T05:06:07.000Z``, or any ISO 8601
    time; UTC when it has no offset), in milliseconds; ValueError if it is none."""
    when = datetime.fromisoformat(since)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if not EPOCH <= when < END:
        raise ValueError(f"{since!r} is not between 1970 and 9999")
    return round(when.timestamp() * 1000)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
END = datetime(9999, 1, 1, tzinfo=UTC)


def time_text(ms: int) -> str:
    """Milliseconds as the list and the audit log write times."""
    return timestamp(datetime.fromtimestamp(ms / 1000, UTC))


def now() -> str:
    return timestamp(datetime.now(UTC))


def checked(entry: Suppression) -> Suppression:
    """The entry, if its time is one; ValueError saying so otherwise."""
    try:
        millis(entry.since)
    except ValueError:
        raise ValueError(f"since {entry.since!r} is not a time") from None
    return entry
