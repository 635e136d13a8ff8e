"""The plain-language notice a sending user gets when a document did not arrive.

ERPs send from shared technical addresses and never read DSNs, so the relay
writes to the *person* who sent the document, in words: which document,
to whom, and what the receiving server said. The notice has a null
envelope sender (but through a company's own account, which sends as its
own address only) and ``Auto-Submitted`` (RFC 3834), and its recipient is
never told of its failure, so it can never cause a notice or an
auto-reply in turn.
"""

from __future__ import annotations

import logging
import quopri
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.audit import events
from relay.errors import SigningError
from relay.headers import encode_text, fold, format_address
from relay.policy.model import DkimKey, Policy, sends_as
from relay.queueid import new_queue_id
from relay.sign import sign
from relay.spool import DELIVERED, EXPIRED, PENDING, SUPPRESSED, QueueEntry, RecipientState
from relay.suppression import COMPLAINT, Suppression
from relay.suppression.entry import described_reason

log = logging.getLogger("relay")

_MSG_ID = re.compile(r"<[^<>\s]+>")
_FIELD_END = re.compile(rb"\r?\n(?![ \t])")  # a line end not followed by a folded line


@dataclass(frozen=True)
class Telling:
    """A failure notice to ``to`` about ``failures``, unless ``withheld``: the
    sender's own entry on the suppression list (it bounced or complained, and
    each notice would add to that)."""

    to: str
    failures: tuple[str, ...]
    withheld: Suppression | None


def telling(
    mail_from: str,
    to: str,
    failures: Sequence[str],
    find: Callable[[str], Suppression | None],
) -> Telling | None:
    """Whether the sender hears of ``failures``; None when there is nothing to
    tell or the envelope sender is empty (RFC 5321 4.5.5: a notice, or ``<>``
    from the client). One decision for the engine and ``relay preview``, which
    said nothing of the notice; ``find`` looks the sender up, and is called
    only when a notice is due, as a lookup may read the list's file."""
    if not failures or not mail_from:
        return None
    return Telling(to, tuple(failures), find(to))


def build_notice(
    policy: Policy,
    entry: QueueEntry,
    failures: Sequence[RecipientState],
    now: float,
    complaint: bool = False,
    subject_known: bool = True,
    sign_again: bool = False,
) -> tuple[QueueEntry, bytes]:
    """``sign_again``: the relay signs the notice anew as it sends it
    (``signed_anew``). ``complaint``: the ``failures`` reported the document as spam, rather than
    not receiving it: the sender hears that in those words. ``subject_known``
    False: the relay did not record the document's subject (``relay bounce``
    under ``audit.record_subject: no``); the notice names it by what the relay
    has, its date and recipients, never by a bounce report's Subject: anyone can
    write one, and it became the subject of a notice the platform signs,
    threaded under the real document."""
    queue_id = new_queue_id()
    tenant = policy.tenants.get(entry.tenant)
    account = _account(policy, entry)
    sender = format_address(
        f"Mail relay for {tenant.name}" if tenant else "Mail relay",
        account or policy.platform.from_address,
    )
    what = "Complaint about" if complaint else "Undelivered"
    subject = _subject(what, entry, failures, subject_known)
    date = _date(now)
    message_id = f"<{queue_id}@{policy.platform.hostname}>"
    about = _MSG_ID.search(entry.message_id or "")
    # threaded under the document, whose copy the sender has when it was BCC'd
    thread = [("In-Reply-To", about[0]), ("References", about[0])] if about else []
    head = b"".join(
        fold(name, value)
        for name, value in (
            ("From", sender),
            ("To", entry.notify_address),
            ("Subject", encode_text(subject)),
            ("Date", date),
            ("Message-ID", message_id),
            *thread,
            ("Auto-Submitted", "auto-generated"),
            ("MIME-Version", "1.0"),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Transfer-Encoding", "quoted-printable"),
        )
    )
    hard = policy.suppression.hard_bounce if policy.suppression is not None else frozenset()
    document = _document(entry, subject_known)
    text = (
        _complaint_text(entry, failures, document)
        if complaint
        else _text(entry, failures, hard, document)
    )
    body = quopri.encodestring(text.encode()).replace(b"\n", b"\r\n")
    message = head + b"\r\n" + body
    signed = sign(message, _keys(policy, account))
    data = signed + message
    notice = QueueEntry(
        queue_id=queue_id,
        arrival=now,
        mail_from=account or "",
        recipients=[RecipientState(entry.notify_address, PENDING, notify=False)],
        upstream=entry.upstream,
        tenant=entry.tenant,
        user=entry.user,
        notify_address=entry.notify_address,
        doc_type=events.NOTICE_TYPE,
        subject=subject,
        message_id=message_id,
        date=date,
        size=len(data),
        client_address="relay",
        auth_login=None,
        next_attempt=0.0,
        is_notice=True,
        sign_again=len(signed) if sign_again else None,
        sends_as=account or "",
        about=entry.queue_id,
    )
    return notice, data


def signed_anew(policy: Policy, entry: QueueEntry, data: bytes) -> bytes:
    """The notice ``relay bounce`` queued, signed with the running relay's keys in
    place of the policy file's it read: in a key rotation the file names the
    new selector before its DNS record is published and the relay reloads,
    and a key file replaced without a reload is not yet the relay's, so a
    notice signed by the file failed DKIM while the relay's mail passed. Kept
    signed as well, a relay of an earlier version still sends it so; and so
    is it sent where it cannot be signed anew (a queue file edited by hand,
    a key the running policy cannot sign with), not failed at every try."""
    cut = entry.sign_again or 0
    message = data[cut:]
    if not 0 <= cut <= len(data) or not _signatures_only(data[:cut], message):
        why = f"its queue record does not say where those signatures end (sign_again {cut})"
        log.warning("%s: sent as relay bounce signed it: %s", entry.queue_id, why)
        return data
    try:
        return sign(message, _keys(policy, entry.mail_from or None)) + message
    except SigningError as exc:
        log.warning("%s: sent as relay bounce signed it: %s", entry.queue_id, exc)
        return data


def _signatures_only(head: bytes, rest: bytes) -> bool:
    """Whether ``head`` is whole DKIM-Signature fields (or nothing), ``rest`` the
    message they were made for."""
    if not head:
        return True
    if not head.endswith(b"\r\n") or rest[:1] in (b" ", b"\t"):
        return False
    fields = _FIELD_END.split(head[:-2])
    return all(field[:15].lower() == b"dkim-signature:" for field in fields)


def _date(seconds: float) -> str:
    """In UTC as ``+0000``, as the relay's Date on a document and its Received
    field write it: ``GMT`` is an obsolete zone (RFC 5322 4.3), which a
    reader takes but a writer must not make."""
    return format_datetime(datetime.fromtimestamp(int(seconds), UTC))


def _account(policy: Policy, entry: QueueEntry) -> str | None:
    """The address the notice's upstream sends as, when it is a company's own
    account: it may refuse any other From or envelope sender, the empty one
    included, and a notice refused would never reach the user. The upstream is
    the one the engine takes: the entry's, or once that is gone from the
    policy, its tenant's. A notice still causes no notice: its recipient is
    not ``notify``."""
    upstream = policy.upstreams.get(entry.upstream)
    tenant = policy.tenants.get(entry.tenant)
    if upstream is None and tenant is not None:
        upstream = policy.upstreams.get(tenant.upstream)
    return (sends_as(upstream) or None) if upstream is not None else None


def _keys(policy: Policy, account: str | None) -> tuple[DkimKey, ...]:
    """The account's own domain's keys when the policy has them, as for the
    document (``relay.decide``): a notice From the account but signed for the
    platform fails DMARC alignment, and under ``p=reject`` the user would never
    hear of the failure."""
    own = policy.keys_for(account.rsplit("@", 1)[1]) if account else ()
    return own or policy.keys_for(policy.platform.from_address.rsplit("@", 1)[1])


def _subject(what: str, entry: QueueEntry, failures: Sequence[RecipientState], known: bool) -> str:
    """Not known, the document by whom it went to and when, which its sender
    can find it by."""
    if known:
        return f"{what}: {_printable(entry.subject)}" if entry.subject else f"{what} document"
    first = _printable(failures[0].address) if failures else ""
    more = f" and {len(failures) - 1} more" if len(failures) > 1 else ""
    sent = datetime.fromtimestamp(entry.arrival, UTC)
    return f"{what}: your document to {first}{more}, sent {sent.day} {sent:%b %Y %H:%M} UTC"


def _document(entry: QueueEntry, subject_known: bool) -> list[str]:
    """The document's own Date is the relay's only while it is queued: a notice
    ``relay bounce`` writes has the time the relay took it, said as such, where
    "Sent" showed either, unsaid which."""
    subject = _printable(entry.subject) or "(no subject)"
    sent = [f"Sent:       {_printable(entry.date)}"] if entry.date.strip() else []
    return [
        "",
        f"Document:   {subject if subject_known else UNRECORDED}",
        *sent,
        f"Received:   {_date(entry.arrival)}, by the mail relay",
        f"Message-ID: {_printable(entry.message_id or '') or '(none)'}",
        f"Queue ID:   {entry.queue_id}",
        "",
    ]


UNRECORDED = "(its subject was not recorded; the date and recipients name it)"


def _complaint_text(
    entry: QueueEntry, failures: Sequence[RecipientState], document: list[str]
) -> str:
    lines = ["A recipient of a document you sent reported it as spam.", *document]
    for rcpt in failures:
        report = _printable(rcpt.reply or "") or "abuse"
        lines += [f"Recipient:  {_printable(rcpt.address)}", f"Report:     {report}", ""]
    lines += [
        "The relay sends this recipient no more of your company's mail. If they want it",
        "again, ask your mail administrator to take the address off the suppression list.",
        "This notice was written by the mail relay; replies to it are not read.",
    ]
    return "\n".join(lines) + "\n"


def _text(
    entry: QueueEntry,
    failures: Sequence[RecipientState],
    hard: frozenset[str],
    document: list[str],
) -> str:
    lines = [_opening(entry), *document]
    # one reason under the recipients it is for: a list of 1,000 refused alike
    # made 3,000 lines, every third one the same reason; Postfix names each
    # address in its refusal, which is the same reason all the same
    by_reason: dict[str, list[tuple[str, str]]] = {}
    for rcpt in failures:
        reason = _printable(_shown(rcpt.reply or "")) or "unknown"
        address = _printable(rcpt.address)
        alike = re.sub(re.escape(address), _EACH, reason, flags=re.IGNORECASE)
        by_reason.setdefault(alike, []).append((address, reason))
    for alike, group in by_reason.items():
        label = "Recipient: " if len(group) == 1 else "Recipients:"
        lines.append(f"{label} {group[0][0]}")
        lines += [f"            {address}" for address, _ in group[1:]]
        lines += [f"Reason:     {group[0][1] if len(group) == 1 else alike}", ""]
    lines += _advice(failures, hard)
    lines.append("This notice was written by the mail relay; replies to it are not read.")
    return "\n".join(lines) + "\n"


_EACH = "each recipient's address"

CHECK_ADDRESS = "Please check the address, or reach the recipient another way."
LISTED_NOW = (
    "The receiving server said the address does not exist or takes no mail: the relay"
    " sends nothing more to it."
)
ON_THE_LIST = "The relay sends nothing to an address on its suppression list."
COMPLAINED = (
    "The address is right: its recipient reported your company's mail as spam, and so"
    " does not want it. Should they want it again, ask your mail administrator to take"
    " the address off the suppression list."
)
TAKE_OFF = (
    "Should the recipient get mail again (the address works again, or they ask for it),"
    " ask your mail administrator to take it off the suppression list."
)
NOT_PASSED_ON = (
    "The mail platform could not pass the document on to the receiving server; should"
    " this keep happening, tell your mail administrator."
)
TOO_LARGE = (
    "The document or its attachments are too large for the receiving system: send it"
    " smaller (fewer or smaller attachments), or reach the recipient another way."
)
NOT_IN_TIME = (
    "The receiving server did not take the document in the time the relay keeps trying"
    " (the reason above is its last answer): send it again later, or reach the recipient"
    " another way; should this keep happening, tell your mail administrator."
)
OWN_SYSTEM = (
    "A mail system on the way could not take the document for a reason of its own (its"
    " settings, a shutdown), not for the address; should this keep"
    " happening, tell your mail administrator, with the reason above."
)
# by the subject of the reply's RFC 3463 code: "check the address" after a spam
# filter's refusal sent the user to recheck a right address, and nobody to the
# administrator whose problem it is
_ADVICE_FOR = {
    "2": "A mailbox that is full or not taking mail may take it later: try again in a"
    " while, or reach the recipient another way.",
    "4": "The receiving server could not be reached or did not answer in time; should"
    " this keep happening, tell your mail administrator.",
    "7": "The receiving server refused the mail by its own rules (spam filtering, a"
    " block list, sender checks), not for the address: tell your mail administrator,"
    " with the reason above.",
    "3": OWN_SYSTEM,  # the mail system's; x.5, the protocol's, is also a mailbox's
}  # "unavailable" (550 5.5.0) at some providers: "check the address" stays
# by the code's subject and detail, before its subject alone: 5.3.4 message too
# big for the system, 5.2.3 for the mailbox
_ADVICE_FOR_DETAIL = {"3.4": TOO_LARGE, "2.3": TOO_LARGE}
# by the whole of a permanent code, before those: 5.4.1 is Microsoft 365's
# unknown recipient ("Recipient address rejected: Access denied"), 5.4.4 a domain
# with no mail server; no server that did not answer, as a 4.4.1 is
_ADVICE_FOR_STATUS = {"5.4.1": CHECK_ADDRESS, "5.4.4": CHECK_ADDRESS}
# what an expiry's last reply adds to its not being taken in time
_BEYOND_TIME = frozenset({TOO_LARGE, OWN_SYSTEM, _ADVICE_FOR["7"]})
# in the order said: what happened, then what to do
_ORDER = (
    *(LISTED_NOW, ON_THE_LIST, COMPLAINED, CHECK_ADDRESS, TAKE_OFF, NOT_PASSED_ON),
    *(NOT_IN_TIME, TOO_LARGE),
    *dict.fromkeys(_ADVICE_FOR.values()),
)
# after a reply's basic code ("554 5.7.1") or alone in brackets ("(5.7.1)", a
# bounce's status; qmail's "(#5.7.1)"): anywhere else "5.2.2.10", an IP
# address in the text, was read as one
_CODE = re.compile(
    r"\b[245]\d\d[ -]([245]\.(\d{1,3})\.\d{1,3})(?!\.?\d)|\(#?([245]\.(\d{1,3})\.\d{1,3})\)"
)
# the relay's own reply when its upstream could not be used (relay.upstream),
# had left the policy (engine) or was not tried (deliver: the relay stopping, a
# transaction before failing): it names the upstream, its host and port or a
# file, which are the sysadmin's
_OWN_UPSTREAM = re.compile(
    r"(?:^|(?<=last reply: ))(4\d\d 4\.\d{1,3}\.\d{1,3})"
    r" (?:Upstream |no upstream |Not sent yet: ).*",
    re.S,
)


def _shown(reply: str) -> str:
    """The reply as the user reads it: "the receiving server could not be reached"
    and the smarthost's name and address, when it was the relay's own upstream
    that was down; the log and the audit log have them whole."""
    return _OWN_UPSTREAM.sub(r"the mail platform could not pass it on (\1)", reply)


def _advice(failures: Sequence[RecipientState], hard: frozenset[str]) -> list[str]:
    """What the user can do, each sentence once: a refusal the relay listed and
    a recipient suppressed before each said "check the address". A refusal
    whose code the policy suppresses on (``hard``) says so: "try again in a
    while" after a 5.2.1, whose address the relay had just listed, sent the
    user to send it again, only to be told it was on the list."""
    said = {line for rcpt in failures for line in _advice_for(rcpt, hard)}
    return [line for line in _ORDER if line in said]


def _advice_for(rcpt: RecipientState, hard: frozenset[str]) -> tuple[str, ...]:
    """An expiry is said as one: its last reply was a temporary one, and a 4.2.0
    greylisting read as a full mailbox."""
    reply = rcpt.reply or ""
    if rcpt.status == SUPPRESSED:
        return _suppressed_advice(reply)
    if _OWN_UPSTREAM.search(reply):
        return (NOT_PASSED_ON,)
    code = _CODE.search(reply)
    if rcpt.status == EXPIRED:
        said = _code_advice(code)
        return (NOT_IN_TIME, said) if said in _BEYOND_TIME else (NOT_IN_TIME,)
    if code is not None and (code.group(1) or code.group(3)) in hard:
        return LISTED_NOW, CHECK_ADDRESS, TAKE_OFF
    return (_code_advice(code),)


def _suppressed_advice(reply: str) -> tuple[str, ...]:
    """A complaint's recipient has a right address: "check the address" sent the
    user looking for a mistake there was not, and to mail them another way."""
    if described_reason(reply) == COMPLAINT:
        return ON_THE_LIST, COMPLAINED
    return ON_THE_LIST, CHECK_ADDRESS, TAKE_OFF


def _code_advice(code: re.Match[str] | None) -> str:
    if code is None:
        return CHECK_ADDRESS
    status = code.group(1) or code.group(3)
    detail = _ADVICE_FOR_STATUS.get(status) or _ADVICE_FOR_DETAIL.get(status.split(".", 1)[1])
    return detail or _ADVICE_FOR.get(code.group(2) or code.group(4), CHECK_ADDRESS)


def _opening(entry: QueueEntry) -> str:
    """Whether anyone got the document at all: "not to everyone" said it had
    reached some of its recipients when none had. The relay's own BCC copy
    (``notify`` False, as is a failure already told) is nobody the sender meant."""
    own = [r for r in entry.recipients if r.notify]
    if any(r.status == DELIVERED for r in own):
        return "A document you sent could not be delivered to everyone."
    if any(r.status == PENDING for r in own):
        return (
            "A document you sent could not be delivered to the recipients below;"
            " it is still being sent to the others."
        )
    return "A document you sent could not be delivered: none of its recipients got it."


def _printable(text: str) -> str:
    """The document's subject as decoded may hold controls (an encoded CR, VT or
    NUL): the notice shows them as spaces rather than fail to be written. So
    does its body, where a line break from a subject, or from a bounce report
    anyone can send, added lines of their choosing to a notice the platform
    signs (a forged "bank details changed" under a real invoice)."""
    return "".join(ch if ch.isprintable() else " " for ch in text)
