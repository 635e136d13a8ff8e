"""Read one bounce or complaint as it came back to the platform's return path.

What comes back is whatever a remote server chose to write, days after the
message left: the reader never raises on it, and answers None for what the relay
does not act on (delays, auto-replies, spam sent to the return path)."""

from __future__ import annotations

import base64
import binascii
import copy
import email
import email.errors
import logging
import quopri
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from email.utils import getaddresses

from flufl.bounce._detectors.llnl import LLNL
from flufl.bounce._detectors.simplewarning import SimpleWarning
from flufl.bounce._interfaces import BounceDetector, Recipients
from flufl.bounce._scan import _DETECTORS

from relay.feedback.exchange2000 import Exchange2000
from relay.feedback.report import BOUNCE, COMPLAINT, MOST_RECIPIENTS, Failure, Report
from relay.feedback.trim import trimmed
from relay.identify import a_label_address

log = logging.getLogger(__name__)

DIAGNOSTIC_LIMIT = 1000
SCANNED_LIMIT = 256 * 1024  # characters of one text part the detectors are handed
SCANNED_TOTAL = 1 << 20  # characters of all a report's parts together
PART_COST = 1024  # what each part handed over counts besides its text: its header, its walk
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_ID = re.compile(r"(?:^|[\s(])id\s+<?([A-Za-z0-9.-]+)", re.IGNORECASE)
_TYPED = re.compile(r"^[A-Za-z0-9-]+[ \t]*;")
_RETURNED = ("message/rfc822", "text/rfc822-headers")
_FIELDS = ("message/delivery-status", "message/feedback-report")  # parts the parser reads
_ENHANCED = re.compile(r"[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# the status a server wrote in words next to the address: qmail's "(#5.1.1)",
# or an SMTP reply it quotes ("550 5.1.1 No such user")
_WRITTEN_STATUS = re.compile(
    r"#([245]\.\d{1,3}\.\d{1,3})\b|\b[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b"
)
# a line that begins with a failed address: qmail's "<a@b>:", Exim's indented
# "  a@b", Exchange's "a@b on <date>" (or "'a@b' on"); what follows is its reason
_ADDRESS_LINE = re.compile(r"[ \t]*[<']?([^\s<>@]+@[^\s<>:']+)[>']?:?(?:[ \t]|$)")
_TRANSIENT = re.compile(
    r"^[ \t]*-+[ \t]*The following addresses had transient non-fatal errors", re.M | re.I
)
# a report that says of itself it is a warning (Postfix's and sendmail's banner),
# or whose subject does (Postfix, sendmail, Exim, Exchange delay notices)
_WARNING_TEXT = re.compile(
    r"THIS\s+IS\s+A\s+WARNING\s+(?:MESSAGE\s+)?ONLY|YOU\s+DO\s+NOT\s+NEED\s+TO\s+RESEND",
    re.IGNORECASE,
)
_WARNING_SUBJECT = re.compile(
    r"\s*(?:Delayed Mail\b|Warning: could not send message|Warning: message \S+ delayed"
    r"|Delivery Status Notification \(Delay\)|Delivery delayed:)",
    re.IGNORECASE,
)
# a header block as a returned copy inline in the text begins (qmail, Yahoo):
# after an empty line, lines of fields up to the next empty line
_INLINE_HEADER = re.compile(
    r"(?:^|\n)\n((?:Return-Path|Received|From|To|Subject|Date|Message-ID):[^\n]*\n"
    r"(?:[A-Za-z0-9-]+:[^\n]*\n|[ \t][^\n]*\n)*)",
    re.IGNORECASE,
)


def read(raw: bytes, most: int = MOST_RECIPIENTS) -> Report | None:
    """The report a bounce or complaint makes, or None when it is neither a
    permanent failure nor a complaint. A message nested deeper than the email
    package can recurse is no server's report, and is read as none. Only
    ``most`` recipients' status blocks are read, as many as the relay acts on
    (``act.most_recipients``): anyone can mail the return path, and 600,000
    blocks in 41 MB took a minute and a GB to read. The email package parses
    only the lines the report is read from (``trim``)."""
    try:
        msg = email.message_from_bytes(trimmed(raw, _Read), _Read, policy=compat32)
        _as_classic(msg)
        if _is_feedback_report(msg):
            return _complaint(msg)
        return _bounce(msg, most)
    except RecursionError:
        log.warning("message nested too deep to read; read as no report")
        return None


# RFC 6533's UTF-8 forms of a report's parts, which SMTPUTF8 servers (Postfix
# among them) write, and the RFC 3464 and 6522 types they stand for
_GLOBAL = {
    "message/global-delivery-status": "message/delivery-status",
    "message/global-headers": "text/rfc822-headers",
    "message/global": "message/rfc822",
}


# RFC 6533's address type for a recipient in a global status part, which
# flufl.bounce passes over; the address up to the end of the field
_UTF8_TYPED = re.compile(
    rb"^((?:Final|Original)-Recipient[ \t]*:[ \t]*)utf-8[ \t]*;([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
    re.IGNORECASE | re.MULTILINE,
)
_HEX_POINT = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")  # RFC 6533 3: a character as \x{FC}


class _Read(Message):
    """A global part read as a leaf, its body as it came (it may come in
    base64 or quoted-printable): the email package reads a ``message/*`` part
    as an enclosed message, and so one encoded lost its text."""

    def get_content_maintype(self) -> str:
        return (
            "application" if self.get_content_type() in _GLOBAL else super().get_content_maintype()
        )


def _as_classic(msg: Message) -> None:
    """A report's global parts in place of their classic twins, so that one
    reader (flufl.bounce's included) takes both."""
    for part in list(msg.walk()):
        payload = part.get_payload()
        if not isinstance(payload, list):
            continue
        for at, inner in enumerate(payload):
            classic = _GLOBAL.get(inner.get_content_type()) if isinstance(inner, Message) else None
            if classic is not None:
                body = inner.get_payload(decode=True)
                data = body if isinstance(body, bytes) else b""
                if classic == "message/delivery-status":
                    data = _UTF8_TYPED.sub(_as_rfc822, data)
                head = f"Content-Type: {classic}\r\n\r\n".encode()
                payload[at] = BytesParser(policy=compat32).parsebytes(head + data)


def _as_rfc822(typed: re.Match[bytes]) -> bytes:
    """A UTF-8 address as the relay sent to it, its domain in the xn-- form:
    it sends to ASCII addresses only, and the one in the report (a server
    that speaks SMTPUTF8 writes the Unicode form) matched none of them. One
    whose local part is not ASCII stays UTF-8, which flufl.bounce skips
    (``_not_ascii``)."""
    written = _HEX_POINT.sub(_character, " ".join(typed[2].decode("utf-8", "replace").split()))
    address = a_label_address(written) or written
    return typed[1] + b"rfc822; " + address.encode()


def _character(escaped: re.Match[str]) -> str:
    """The character, where it can be one of an address: a line end would start
    another field of the block."""
    point = int(escaped[1], 16)
    if point < 0x21 or point == 0x7F or point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
        return escaped[0]
    return chr(point)


def _is_feedback_report(msg: Message) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type", "")).lower() == "feedback-report"
    )


def _bounce(msg: Message, most: int) -> Report | None:
    blocks, unread = _status_blocks(msg, most)
    own = _own_text(msg)
    if not blocks and _says_warning(msg, own):
        return None
    recipients = _permanent_failures(msg, None if blocks else own, most)
    recipients = sorted({*recipients, *_not_ascii(blocks)}, key=str.lower)
    if not recipients:
        return None
    failures = _failures(recipients, blocks, own)
    returned = _returned(msg) or _returned_inline(msg)
    return Report(
        BOUNCE,
        failures,
        _message_id(returned),
        _envelope_id(blocks),
        queue_ids=_received_ids(returned),
        unread=unread,
    )


def _says_warning(msg: Message, own: str) -> bool:
    """A report in words that says it is a delay warning. flufl.bounce's generic
    patterns read Postfix's "could not be delivered for more than 4 hour(s)"
    as a failure: the user was told the document came back while it was still
    being tried, and the real bounce after it was "already recorded"."""
    subject = _value(msg, "Subject") or ""
    return bool(_WARNING_SUBJECT.match(subject) or _WARNING_TEXT.search(own))


def _permanent_failures(msg: Message, own: str | None, most: int) -> list[str]:
    """flufl.bounce's heuristics were written for bounces, not for whatever
    reaches a return path; one that trips on a message it did not foresee must
    not stop the reader, and so its error is logged and the message is read as
    no bounce. The recipients come sorted, so that a report reads the same each
    time although flufl.bounce gives them as a set.

    With ``own``, the text of a report in words rather than an RFC 3464 one,
    an address flufl.bounce's warning detector finds there is not taken:
    ``all_failures`` stops at the first detector with a verdict, and a generic
    one reads Exim's "has not yet been delivered" as a failure. Only the
    report's own text is looked at, not the copy it returns: a document whose
    subject says "has not yet been delivered" is no warning."""
    view = _scanned_view(msg, _Budget(SCANNED_TOTAL, most)) or Message()
    # one detector that raises ends the scan, so the detectors after it never
    # see the bounce: the Yale detector raises on a From without an address,
    # the Sina detector on one with 8-bit bytes (the email package's Header)
    written = (_value(view, "From") or "").encode("ascii", "replace").decode()
    del view["From"]
    view["From"] = written if getaddresses([written]) else "<>"
    try:
        permanent = _failed(view)
        delayed = SimpleWarning().process(_as_message(own))[0] if own else frozenset()
    except Exception:
        log.warning("bounce detection failed; message read as no bounce", exc_info=True)
        return []
    found = {_address(a.decode("ascii", "replace")) for a in permanent - delayed}
    transient = {a.lower() for a in _transient(own or "")}
    return sorted((a for a in found if a and a.lower() not in transient), key=str.lower)


# flufl.bounce's detectors in its order but the last: LLNL's, for one site's
# sendmail of the 1990s, takes any address between two commas on a line for a
# failure, and so read "my colleague Per, per@buyer.example, or" in an
# out-of-office reply as a bounce and its sender was told the invoice failed
_DETECTORS_USED: tuple[type[BounceDetector], ...] = (
    *(d for d in _DETECTORS if d is not LLNL),
    Exchange2000,
)


def _failed(view: Message) -> Recipients:
    """The permanent failures of the first detector with a verdict, as
    ``flufl.bounce.all_failures`` finds them."""
    for detector in _DETECTORS_USED:
        temporary, permanent = detector().process(view)
        if temporary or permanent:
            return permanent
    return frozenset()


def _not_ascii(blocks: list[Message]) -> list[str]:
    """The failed recipients whose local part is not ASCII (RFC 6533), which
    flufl.bounce skips: no recipient of the relay's, which sends to ASCII
    addresses only, but a report about them alone is a bounce that names
    nobody the message went to, not "neither a bounce nor a complaint"."""
    found: list[str] = []
    for block in blocks:
        if not _says_failed(block):
            continue
        written = [*_values(block, "Original-Recipient"), *_values(block, "Final-Recipient")]
        typed = [v for v in written if v.lower().startswith("rfc822")]
        address = _address(_untyped(typed[0])) if typed else ""
        if address and not address.isascii():
            found.append(address)
    return found


def _transient(own: str) -> list[str]:
    """The addresses under sendmail's "transient non-fatal errors" in a report
    that also has permanent ones: still being tried, however flufl.bounce's
    sendmail pattern, which runs from the first such heading on, reads them."""
    found: list[str] = []
    section = _TRANSIENT.search(own)
    if section is None:
        return found
    for line in own[section.end() :].split("\n")[1:]:
        if not line.strip() or line.lstrip().startswith("---"):
            break
        at = _ADDRESS_LINE.match(line)
        if at is not None:
            found.append(at.group(1))
    return found


@dataclass
class _Budget:
    """What is left to hand the detectors: characters of text over all parts
    (``SCANNED_TOTAL``), and recipients' status blocks."""

    text: int
    blocks: int

    def text_of(self, text: str) -> str:
        cut = text[: min(SCANNED_LIMIT, max(self.text, 0))]
        self.text -= len(cut)
        return cut

    def blocks_of(self, blocks: list[Message], least: int = 0) -> list[Message]:
        kept = _blocks_read(blocks, self.blocks)
        self.blocks -= max(len(kept) - 1, least)
        return kept


def _scanned_view(part: Message, budget: _Budget) -> Message | None:
    """flufl.bounce's heuristics run line by line over every body, each in turn:
    over a returned 10 MB attachment that takes seconds per detector. They only
    look for the server's text near its start, so the view they get has the
    same parts with non-text bodies emptied and text bodies cut short, up to
    a budget for the whole report (None: spent): cut per part only, 49 MB of
    100-byte text parts took almost two minutes. The parts of fields the
    parser reads are kept past it (``_fields_view``). The message itself is
    left as it came."""
    if part.get_content_type() in _FIELDS:
        return _fields_view(part, budget)
    if budget.text <= 0:
        return _past_budget(part, budget)
    budget.text -= PART_COST
    view = copy.copy(part)
    payload = part.get_payload()
    if isinstance(payload, list):
        view.set_payload(_parts_view(payload, budget))
    elif part.get_content_maintype() != "text":
        view.set_payload("")
    elif _encoded(part):  # flufl.bounce reads the body as it is: base64 read as no report
        del view["Content-Transfer-Encoding"]
        view.set_payload(budget.text_of(_decoded_text(part)))
    elif isinstance(payload, str):
        view.set_payload(budget.text_of(payload))
    return view


def _past_budget(part: Message, budget: _Budget) -> Message | None:
    """A part the text budget has no room for: only the parts of fields below
    it, or None when there are none."""
    payload = part.get_payload()
    kept = _parts_view(payload, budget) if isinstance(payload, list) else []
    if not kept:
        return None
    view = copy.copy(part)
    view.set_payload(kept)
    return view


def _fields_view(part: Message, budget: _Budget) -> Message | None:
    """A delivery-status or feedback-report part whatever text came before it:
    cut with the text, a DSN whose status part came after large text parts
    lost the failed recipients named only there. What it costs is capped
    apart, by ``most``: its recipients' blocks, and past the text budget
    each such part counts as one recipient at least, so that many empty ones
    are not all kept."""
    past = budget.text <= 0
    if past and budget.blocks <= 0:
        return None
    budget.text -= PART_COST
    view = copy.copy(part)
    payload = part.get_payload()
    if not isinstance(payload, list):
        view.set_payload("")
    elif part.get_content_type() == "message/delivery-status":
        view.set_payload(budget.blocks_of(payload, least=int(past)))
    else:
        budget.blocks -= int(past)
        view.set_payload([_fields_only(p) for p in payload if isinstance(p, Message)])
    return view


def _fields_only(fields: Message) -> Message:
    """A block of fields without the body a sender may have put after it."""
    view = copy.copy(fields)
    view.set_payload("")
    return view


def _parts_view(parts: list[Message], budget: _Budget) -> list[Message]:
    """The parts' views in order, but those the budget has no room for."""
    kept: list[Message] = []
    for part in parts:
        view = _scanned_view(part, budget) if isinstance(part, Message) else part
        if view is not None:
            kept.append(view)
    return kept


def _encoded(part: Message) -> bool:
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    return encoding in ("base64", "quoted-printable")


def _decoded_text(part: Message) -> str:
    """A text part's body decoded, in its charset when Python knows it; a charset
    anyone can name in a report (``undefined``, ``idna``) must not stop the reader."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    data = payload[:SCANNED_LIMIT]
    try:
        text = data.decode(part.get_content_charset() or "utf-8", "replace")
    except (LookupError, UnicodeError, ValueError):
        text = data.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def _failures(addresses: list[str], blocks: list[Message], text: str) -> tuple[Failure, ...]:
    """Each address's failure from its status block, or from its lines in the
    text. Both are indexed once per report: a report can name thousands of
    addresses, and a search per address was quadratic (3,000 took 2.6 s)."""
    by_address = _blocks_by_address(blocks)
    lines = text.split("\n")
    written = _address_lines(lines)
    failures: list[Failure] = []
    for address in addresses:
        block = by_address.get(address.lower())
        if block is not None:
            status, diagnostic = _status(block), _diagnostic(block)
            failures.append(Failure(address, _precise(status, diagnostic), diagnostic))
        else:
            failures.append(_written(address, lines, written.get(address.lower())))
    return tuple(failures)


def _address_lines(lines: list[str]) -> dict[str, tuple[int, re.Match[str]]]:
    """Where each address's first line is, by its address in lower case."""
    found: dict[str, tuple[int, re.Match[str]]] = {}
    for i, line in enumerate(lines):
        at = _ADDRESS_LINE.match(line)
        if at is not None:
            found.setdefault(at.group(1).lower(), (i, at))
    return found


def _written(address: str, lines: list[str], first: tuple[int, re.Match[str]] | None) -> Failure:
    """A report in words (qmail, Exim without a delivery-status part) gives
    each address lines of its own: the line that begins with it, then the
    server's reason, up to an empty line or the next address (Exim puts none
    between them). Its status is the code written there, so that qmail's
    "(#5.1.1)" lists a dead mailbox as a DSN's would, and another address's
    code is never taken for it."""
    if first is None:
        return Failure(address)
    i, at = first
    reason = [lines[i][at.end() :]]
    for following in lines[i + 1 :]:
        if not following.strip() or _ADDRESS_LINE.match(following):
            break
        reason.append(following)
    words = " ".join(" ".join(reason).split())
    found = _WRITTEN_STATUS.search(words)
    code = found and (found.group(1) or found.group(2))
    # a permanent failure's: qmail's "queue too long" ends on the last 4xx it met
    status = code if code and code[0] == "5" else None
    return Failure(address, status, words[:DIAGNOSTIC_LIMIT] or None)


def _text_part(msg: Message) -> str:
    """The report's first text/plain part, decoded, with LF line ends."""
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            return _decoded_text(part)
    return ""


def _own_text(msg: Message) -> str:
    """The server's text without the copy of the message it returns inline."""
    text = _text_part(msg)
    returned = _INLINE_HEADER.search(text)
    return text[: returned.start()] if returned else text


def _as_message(text: str) -> Message:
    message = Message()
    message.set_payload(text)
    return message


def _precise(status: str | None, diagnostic: str | None) -> str | None:
    """Exim writes ``Status: 5.0.0`` for every permanent failure and leaves the
    remote server's code (``550 5.1.1 ...``) to ``Diagnostic-Code``: read as
    given, no late unknown-user bounce through an Exim smarthost would list
    its address."""
    if status is None or status[1:] != ".0.0" or diagnostic is None:
        return status
    found = _ENHANCED.match(diagnostic)
    return found.group(1) if found and found.group(1)[0] == status[0] else status


def _status_blocks(msg: Message, most: int) -> tuple[list[Message], int]:
    """The header blocks of every message/delivery-status part, up to ``most``
    recipients' (``_blocks_read``), and how many were left unread."""
    blocks: list[Message] = []
    unread = 0
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            read = _blocks_read(payload, most)
            most -= max(len(read) - 1, 0)
            unread += len(payload) - len(read)
            blocks.extend(b for b in read if isinstance(b, Message))
    return blocks, unread


def _blocks_read(blocks: list[Message], most: int) -> list[Message]:
    """A part's first block, the per-message one, and up to ``most`` recipients' after it."""
    return blocks[: 1 + max(most, 0)]


def _blocks_by_address(blocks: list[Message]) -> dict[str, Message]:
    """Each recipient's first block that says it failed, else its first, by its
    Final- or Original-Recipient in lower case. A report may give an address a
    block per action (a delay, then the failure): the delay's, written first,
    stood for the failure, and its 4.4.7 listed no mailbox that was gone."""
    found: dict[str, Message] = {}
    failed: set[str] = set()
    for block in blocks:
        fails = _says_failed(block)
        for name in ("Final-Recipient", "Original-Recipient"):
            for value in _values(block, name):
                address = _address(_untyped(value)).lower()
                if address not in found or (fails and address not in failed):
                    found[address] = block
                if fails:
                    failed.add(address)
    return found


def _says_failed(block: Message) -> bool:
    return (_value(block, "Action") or "").lower().startswith(("fail", "error"))


def _status(block: Message) -> str | None:
    """The ``Status`` code when it is one (RFC 3464: ``5.1.1``), else none: the
    code goes into the signed notice the sender gets, and whoever wrote the
    report could put words there (``5.1.1_our_bank_details_changed...``)."""
    value = _value(block, "Status")
    words = value.split() if value else []
    return words[0] if words and _STATUS.fullmatch(words[0]) else None


def _diagnostic(block: Message) -> str | None:
    """The remote server's own words, which say more than the status code; the
    cap keeps a server that returns a whole transcript from filling the record."""
    value = _value(block, "Diagnostic-Code")
    if value is None:
        return None
    text = " ".join(_untyped(value).split())
    return text[:DIAGNOSTIC_LIMIT] or None


def _envelope_id(blocks: list[Message]) -> str | None:
    for block in blocks:
        value = _value(block, "Original-Envelope-Id")
        if value:
            return value
    return None


#: RFC 5965 and 6650 feedback types that ask for no more mail: spam, fraud and
#: unsubscribing. Not "not-spam" (the opposite), "auth-failure" (a DMARC
#: failure report), "virus" or "other", which say nothing of the recipient's wish.
ACTED_ON = ("abuse", "fraud", "opt-out")
_COMMENT = re.compile(r"\([^()]*\)")


def _complaint(msg: Message) -> Report | None:
    """None without a ``Feedback-Type`` (RFC 5965 requires one), or without the
    feedback-report part that carries it: such a report says nothing of what
    the recipient wants, and was taken for ``abuse``, its address listed."""
    fields = _feedback_fields(msg)
    said = (_value(fields, "Feedback-Type") if fields else None) or ""
    feedback_type = _COMMENT.sub(" ", said).strip().lower()  # RFC 5965 allows comments
    if feedback_type not in ACTED_ON:
        return None
    returned = _returned(msg)
    recipients = _complained_recipients(fields)
    return Report(
        COMPLAINT,
        tuple(Failure(r) for r in recipients),
        _message_id(returned),
        _value(fields, "Original-Envelope-Id") if fields else None,
        feedback_type,
        _received_ids(returned),
    )


def _feedback_fields(msg: Message) -> Message | None:
    """The email package parses a message/feedback-report part as one enclosed
    message whose headers are the fields; a part the sender encoded in base64,
    or began with a blank line, comes out as a message without headers whose
    body is the (encoded) fields."""
    for part in msg.walk():
        if part.get_content_type() != "message/feedback-report":
            continue
        payload = part.get_payload()
        encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if isinstance(payload, list):
            inner = next((p for p in payload if isinstance(p, Message)), None)
            if inner is None or len(inner):
                return inner
            payload = inner.get_payload()
        text = _decoded(payload, encoding) if isinstance(payload, str) else ""
        return HeaderParser(policy=compat32).parsestr(text.lstrip())
    return None


def _decoded(text: str, encoding: str) -> str:
    """An 8-bit part's text as it is: encoded to ASCII, a byte the email package
    had read as U+FFFD raised, and a report ended in a traceback."""
    if encoding not in ("base64", "quoted-printable"):
        return text
    try:
        data = text.encode("ascii", "surrogateescape")
        data = base64.b64decode(data) if encoding == "base64" else quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return text
    return data.decode("utf-8", "replace")


def _complained_recipients(fields: Message | None) -> list[str]:
    """The report's own fields name the complaining recipient when the provider
    allows it. The returned message's To is not taken for one: a Cc or Bcc
    recipient may have complained, and providers put a placeholder there; the
    caller finds the recipient by the Message-ID in the audit log instead."""
    return [] if fields is None else _addresses(fields, "Original-Rcpt-To", "Removal-Recipient")


def _addresses(msg: Message, *names: str) -> list[str]:
    found: list[str] = []
    seen: set[str] = set()
    for name in names:
        for value in _values(msg, name):
            for _name, written in getaddresses([_untyped(value)]):
                address = _address(written)
                if address and address.lower() not in seen:
                    seen.add(address.lower())
                    found.append(address)
    return found


def _address(value: str) -> str:
    """Addresses stay as written: the local part's case can matter to the
    receiving server, and the suppression list compares without case anyway."""
    value = value.strip()
    if "<" in value and ">" in value.split("<", 1)[1]:
        value = value.split("<", 1)[1].split(">", 1)[0]
    return value.strip("<> \t\r\n").strip("'")  # Exchange 2003 quotes them: 'a@b'


def _returned(msg: Message) -> Message | None:
    """The original message or its header, as the report returned it: the first
    message/rfc822 or text/rfc822-headers part below the report itself."""
    for part in msg.walk():
        if part is msg or part.get_content_type() not in _RETURNED:
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            return next((p for p in payload if isinstance(p, Message)), None)
        return _parse_headers(part)
    return None


def _returned_inline(msg: Message) -> Message | None:
    """The header of a copy returned inline below the server's text (qmail's
    "--- Below this line is a copy of the message."): the first block of
    fields after an empty line that has a Message-ID."""
    for block in _INLINE_HEADER.finditer(_text_part(msg)):
        header = HeaderParser(policy=compat32).parsestr(block.group(1))
        if _value(header, "Message-ID"):
            return header
    return None


def _parse_headers(part: Message) -> Message:
    body = part.get_payload(decode=True)
    data = body if isinstance(body, bytes) else b""
    return BytesParser(policy=compat32).parsebytes(data.lstrip(), headersonly=True)


def _message_id(returned: Message | None) -> str | None:
    return None if returned is None else _value(returned, "Message-ID")


def _received_ids(returned: Message | None) -> tuple[str, ...]:
    """The ``id`` of each returned Received field (RFC 5321 4.4), the newest hop
    first: the relay writes its queue ID there, so a report that returns the
    header names the very message even where tenants' ERPs reuse a Message-ID."""
    if returned is None:
        return ()
    return tuple(
        found.group(1) for value in _values(returned, "Received") for found in _ID.finditer(value)
    )


def _value(msg: Message, name: str) -> str | None:
    values = _values(msg, name)
    return values[0] if values else None


def _values(msg: Message, name: str) -> list[str]:
    """Header values unfolded, read from the raw header so that bytes a server
    sent unencoded come out as UTF-8 where they are, not as the email package's
    replacement characters."""
    wanted = name.lower()
    values = []
    for key, value in msg.raw_items():
        if key.lower() == wanted:
            text = _raw_text(value)
            unfolded = _FOLD.sub("", text).strip()
            if unfolded:
                values.append(unfolded)
    return values


def _raw_text(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    try:
        return text.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text


def _untyped(value: str) -> str:
    """The value without its RFC 3464 type (``rfc822;``, ``smtp;``)."""
    return _TYPED.sub("", value, count=1).strip()
