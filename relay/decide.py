"""The policy decision for one message: identities, recipients, signing, route.

A pure function: everything it needs (the policy, the submission, the read
view, the time and a unique token) comes in as arguments, so ``relay
preview`` shows exactly what the daemon would do. Every choice is recorded
with its reason for the preview and the logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import NamedTuple

from relay import dates
from relay.classify import Classification
from relay.controlfields import first_address, refuse_differing
from relay.errors import HeaderInjection
from relay.headers import (
    Field,
    encode_text,
    format_address,
    has_blank_line,
    signature_tags,
)
from relay.headers import value as unfolded
from relay.identify import Identity, a_label_address
from relay.message import MessageView, decode
from relay.policy.model import (
    DkimAlgorithm,
    DkimKey,
    Policy,
    ReplyToKind,
    ReplyToSource,
    SmtpUpstream,
    Upstream,
)
from relay.rewrite import HeaderEdits
from relay.submission import Submission, listed
from relay.suppression import EMPTY, Suppression, SuppressionList
from relay.visible import quoted

# RFC 5322 3.6.4 msg-id, with the quoted local part of obs-id-left. Gmail
# refuses mail "missing a valid Message-ID"; such an ID threads nothing anyway.
_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_MSG_ID = re.compile(rf'<(?:{_ATOMS}|"(?:[^"\\\r\n]|\\.)*")@(?:{_ATOMS}|\[[!-Z^-~]*\])>')

# Removed from every message: the Bcc fields name hidden recipients, and a
# Sender next to the From the relay sets is shown as "Sender on behalf of From".
# Return-Path is the final server's to write from the envelope (RFC 5321 4.4),
# and a Content-Length counts bytes a hop may change; Postfix drops both too
# (message_drop_headers).
_REMOVED = ("Bcc", "Resent-Bcc", "Sender", "Return-Path", "Content-Length")


class _Mailbox(NamedTuple):
    name: str
    address: str
    why: str


@dataclass(frozen=True)
class Decision:
    identity: Identity
    classification: Classification
    from_before: str | None
    from_after: str
    reply_to_before: str | None
    reply_to_after: str | None  # None: the message's own Reply-To is kept; "": removed
    bcc_added: tuple[str, ...]
    recipients: tuple[str, ...]  # envelope recipients upstream, BCC included
    suppressed: tuple[tuple[str, Suppression], ...]  # recipients not sent to, and why
    edits: HeaderEdits
    signing: tuple[DkimKey, ...]
    signing_domain: str
    upstream: Upstream
    mail_from: str
    reasons: tuple[str, ...]

    def sender_told(self, address: str) -> bool:
        """Whether a failure of ``address`` is the sender's to hear of: the
        automatic copy is the relay's own, and the sender never named it."""
        return address not in self.bcc_added


def decide(
    policy: Policy,
    submission: Submission,
    view: MessageView,
    identity: Identity,
    classification: Classification,
    now: datetime,
    token: str,
    suppressions: SuppressionList = EMPTY,
) -> Decision:
    reasons = [*identity.reasons, classification.reason]
    upstream = policy.upstreams[identity.tenant.upstream]
    own = _own(identity, view)
    from_address, from_name, why = _from(policy, own, identity)
    signing_domain = from_address.rsplit("@", 1)[1].lower()
    account = _account(upstream)
    if account is not None:
        from_address, from_name, why = _account_from(policy, identity, account, from_address)
        own_domain = from_address.rsplit("@", 1)[1].lower()
        if policy.keys_for(own_domain):
            signing_domain = own_domain  # aligned with the From for DMARC
    reasons.append(why)
    from_after = format_address(from_name, from_address)
    sender = own or _Mailbox(identity.user.name, identity.user.address, "")
    reply_to_after, why = _reply_to(identity, sender, classification.doc_type, view)
    reasons.append(why)
    sent, suppressed = _suppressed(suppressions, identity, submission.rcpt_tos)
    bcc, why = _bcc(identity, classification.doc_type, submission.rcpt_tos, suppressed)
    if bcc and suppressed and not sent:  # the sender's record of what went out: nothing did
        bcc, why = (), "no automatic BCC: every recipient is on the suppression list"
    copy, listed = _suppressed(suppressions, identity, bcc)
    if listed:  # kept in bcc_added: the copy is the relay's, and no notice tells of it
        why += ", added, then suppressed: the sender is on the suppression list"
    reasons.append(why)
    recipients, suppressed = (*sent, *copy), (*suppressed, *listed)
    reasons += (f"not sent to {address}: {entry.describe()}" for address, entry in suppressed)
    signing = policy.keys_for(signing_domain)
    if not signing:
        reasons.append(f"no DKIM key for {signing_domain}: the message is not signed")

    updates = [("From", from_after)]
    if own is not None and account is None and _written_as(view, from_name, from_address):
        updates, from_after = [], view.get("From") or from_after
        reasons.append(
            "From kept as the message wrote it: the same name and address"
            " (a signature the ERP made over it stays valid)"
        )
    if reply_to_after:
        updates.append(("Reply-To", reply_to_after))
    given_id = (view.get("Message-ID") or "").strip()
    message_id, why = _message_id(given_id, f"<{token}@{policy.platform.hostname}>")
    if message_id is not None:
        updates.append(("Message-ID", message_id))
        reasons.append(why)
    gone = (*_REMOVED, *policy.control_headers, *(("Reply-To",) if reply_to_after == "" else ()))
    changed = {name.lower() for name, _ in updates}
    changed |= {name.lower() for name in gone if view.get(name) is not None}
    theirs = None if _aligned(signing, from_address) else _Theirs(_blanked(view))
    date, why = _date(view, changed, now, theirs)
    updates += date
    changed |= {name.lower() for name, _ in date}
    reasons += why
    subject, why = _subject(view, changed, theirs)
    updates += subject
    changed |= {name.lower() for name, _ in subject}
    reasons += why
    for name, replaced in (("From", True), ("Reply-To", bool(reply_to_after))):
        if replaced and len(view.get_all(name)) > 1:
            reasons.append(f"{name} appeared {len(view.get_all(name))} times: one is written")
    if view.get("Sender") is not None:
        reasons.append("Sender removed: clients would show it as sending on behalf of the From")
    mail_from = policy.platform.return_path
    if not submission.mail_from:
        mail_from = ""
        reasons.append(
            "envelope sender empty (<>): kept, and no failure notice is sent (RFC 5321 4.5.5)"
        )
    elif account is not None:
        mail_from = account.sender
        reasons.append(f"envelope sender is {mail_from}, the address {account.name!r} sends as")
    recipient_updates, removed, why_empty = _empty_recipients(view, changed, theirs)
    updates += recipient_updates
    reasons += why_empty
    reasons += _blank_lines(view)
    if reply_to_after == "":
        removed.append("Reply-To")
    edits = HeaderEdits(
        remove=(*_REMOVED, *removed, *policy.control_headers),
        set=tuple(updates),
        drop_blank_lines=True,
    )

    return Decision(
        identity=identity,
        classification=classification,
        from_before=view.written_value("From"),
        from_after=from_after,
        reply_to_before=view.written_value("Reply-To"),
        reply_to_after=reply_to_after,
        bcc_added=bcc,
        recipients=recipients,
        suppressed=suppressed,
        edits=edits,
        signing=signing,
        signing_domain=signing_domain,
        upstream=upstream,
        mail_from=mail_from,
        reasons=tuple(reasons),
    )


def _blank_lines(view: MessageView) -> list[str]:
    """Why the header lost a line of only white space (``rewrite`` leaves every
    such line out): refused, a legacy ERP's mail would not go at all, and kept,
    a reader that ends the header there shows the fields after it, the
    relay's Date, Message-ID and Reply-To among them, as body text."""
    fields = view.fields
    names = dict.fromkeys(field.name for field in fields if has_blank_line(field))
    if not names:
        return []
    why = (
        f"a line of only white space in {', '.join(names)} left out: obsolete folding"
        " (RFC 5322 4.2) that some readers take for the end of the header"
    )
    broken = _signatures_over(fields, {name.lower() for name in names}, simple_only=True)
    if broken:
        why += (
            f"; the message's own DKIM signature ({', '.join(broken)}) signs it with"
            " simple header canonicalisation and no longer verifies"
        )
    return [why]


def _signatures_over(fields: list[Field], names: set[str], simple_only: bool) -> list[str]:
    """``d=`` of each DKIM signature the message came with that signs one of
    the fields ``names``; with ``simple_only``, of those with ``simple``
    header canonicalisation (``c=`` left out is simple), which a line left
    out breaks, where ``relaxed`` reads the field as before. An ERP's own
    signature failed with no word of why."""
    return [
        domain
        for domain, signed, simple in _signatures(fields)
        if signed & names and (simple or not simple_only)
    ]


def _signatures(fields: list[Field]) -> Iterator[tuple[str, set[str], bool]]:
    """Each DKIM signature the message came with: ``d=``, the fields it signs
    (``h=``, lower case), and whether its header canonicalisation is simple."""
    for field in fields:
        if field.name.lower() != "dkim-signature":
            continue
        tags = signature_tags(unfolded(field))
        signed = {name.lower() for name in tags.get("h", "").split(":")}
        simple = tags.get("c", "simple").partition("/")[0].lower() == "simple"
        yield f"d={tags.get('d', '')}", signed, simple


def _date(
    view: MessageView, changed: set[str], now: datetime, theirs: _Theirs | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """The edit for a Date that is missing, empty or no date-time receivers
    read, and why. A Date the relay writes keeps the mail from being scored
    as spam (SpamAssassin's ``INVALID_DATE``) for a field under its own
    signature that no later hop may repair. A DKIM signature the message
    came with keeps a Date it has as ``_empty_recipients`` keeps a To; a
    missing or empty one is added all the same, as RFC 5322 3.6 wants one,
    and the relay's own signature signs its absence (``sign.OVERSIGNED``):
    a later hop adding one broke every signature."""
    given = (view.get("Date") or "").strip()
    if not given:
        return [("Date", format_datetime(now))], ["Date was missing: added"]
    fault = dates.fault(_without_comments(given))
    if fault is None:
        return [], []
    why = f"Date {given!r} {fault}"
    signed = _signed_whole(view.fields, "Date", changed, theirs)
    if signed:
        return [], [f"{why}: kept, {_as_signed(signed)}"]
    return [("Date", format_datetime(now))], [f"{why}: replaced"]


def _subject(
    view: MessageView, changed: set[str], theirs: _Theirs | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """The edit for a Subject in 8-bit bytes that are not UTF-8 (a legacy
    ERP's Latin-1), and why: receivers read raw header bytes as UTF-8
    (RFC 6532) and showed ``f\ufffdr``, where the policy, the audit log and
    ``relay preview`` read Windows-1252. Written in encoded words as the
    policy reads it, every reader shows the same text. A DKIM signature the
    message came with keeps it as ``_empty_recipients`` keeps a To. Only
    the Subject: other unstructured fields may repeat (``Comments``), or a
    program may read them raw (``X-`` fields)."""
    if all(value.isascii() for name, value in view.written if name.lower() == "subject"):
        return [], []  # as nearly every Subject: the header is not split again for it
    fields = view.fields
    found = [field.raw for field in fields if field.name.lower() == "subject"]
    if len(found) != 1 or _is_utf8(found[0]):
        return [], []  # a second Subject is refused (pipeline)
    text = view.subject
    why = "Subject is not UTF-8 on the wire"
    signed = _signed_whole(fields, "Subject", changed, theirs)
    if signed:
        why += f": kept, {_as_signed(signed)}"
        return [], [f"{why}; receivers may show it garbled"]
    try:
        encoded = encode_text(text)
    except HeaderInjection:
        return [], []
    why += f": written in RFC 2047 encoded words as the policy reads it, as Windows-1252 ({text})"
    return [("Subject", encoded)], [why]


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class _Theirs:
    """The ERP's own DKIM signature counts: the relay has no key aligned with
    the From. ``blanked``: the fields a line of only white space is taken out
    of, which breaks a signature with simple header canonicalisation."""

    blanked: frozenset[str]


def _blanked(view: MessageView) -> frozenset[str]:
    return frozenset(field.name.lower() for field in view.fields if has_blank_line(field))


def _signed_whole(
    fields: list[Field], name: str, changed: set[str], theirs: _Theirs | None
) -> list[str]:
    """``d=`` of each DKIM signature the message came with that signs the
    field ``name``, present or not, and that the relay's other edits
    (``changed``, lower case, and the lines of white space left out) leave
    whole: one the From rewritten breaks anyway is no reason to keep a
    blemish. Only where the relay's own signature does not align with the
    From (``theirs``): where it does, DMARC passes on it, and the ERP's kept
    a Date receivers score as spam for nothing."""
    if theirs is None:
        return []
    return [
        domain
        for domain, names, simple in _signatures(fields)
        if name.lower() in names and not names & changed and not (simple and names & theirs.blanked)
    ]


def _as_signed(signed: list[str]) -> str:
    return f"as the message's own DKIM signature ({', '.join(signed)}) signs it"


def _aligned(signing: tuple[DkimKey, ...], from_address: str) -> bool:
    """Whether an RSA key the relay signs with passes DMARC's relaxed alignment
    for the From it writes: the same domain, or one of them under the other
    (the organizational domain, without the public suffix list). An Ed25519
    one alone is not enough: receivers that do not verify RFC 8463 find no
    signature of the relay's they can."""
    domain = from_address.rpartition("@")[2].lower()
    return any(
        key.algorithm is DkimAlgorithm.RSA
        and (_under(domain, key.domain) or _under(key.domain, domain))
        for key in signing
    )


def _under(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith(f".{parent}")


def _message_id(given: str, made: str) -> tuple[str | None, str]:
    """The Message-ID to write (None: the message's stays), and why. Legacy ERPs
    write theirs without the angle brackets (``INV-555@erp``): the same ID with
    them keeps the ERP's, which its users search the audit log for."""
    inside = _without_comments(given).strip()
    if _MSG_ID.fullmatch(inside):
        return None, ""
    if _MSG_ID.fullmatch(f"<{inside}>"):
        return f"<{inside}>", f"Message-ID {given!r} had no angle brackets (RFC 5322 3.6.4): added"
    if given:
        return made, f"Message-ID {given!r} is not one (RFC 5322 3.6.4: <left@right>): replaced"
    return made, "Message-ID was missing: added"


def _without_comments(value: str) -> str:
    """The value without its comments ([CFWS] around an ID), in one pass that
    follows quoted pairs, quoted strings and nesting. A regular expression for
    them went over the rest of the value from each "(" never closed: a 64 KB
    Message-ID of "\\(" held a worker's sessions for 8 s. A "(" never closed
    is no comment, and stays."""
    if "(" not in value:
        return value
    kept: list[str] = []
    depth = opened = 0
    quoted = False
    i = 0
    while i < len(value):
        char = value[i]
        step = 2 if char == "\\" else 1
        if depth == 0 and char == '"':
            quoted = not quoted
        elif not quoted and char == "(":
            opened = i if depth == 0 else opened
            depth += 1
        elif depth and char == ")":
            depth -= 1
            i += 1
            continue
        if depth == 0:
            kept.append(value[i : i + step])
        i += step
    if depth:
        kept.append(value[opened:])
    return "".join(kept)


def _from(policy: Policy, own: _Mailbox | None, identity: Identity) -> tuple[str, str, str]:
    """The From address, its display name, and why."""
    if own is not None:
        return own.address, own.name, own.why
    name = _display_name(policy.platform.display_name, identity)
    platform = policy.platform.from_address
    return platform, name, f"From is the platform address {platform} with display name {name!r}"


def _own(identity: Identity, view: MessageView) -> _Mailbox | None:
    """The user's own address in a verified domain, which the message keeps as
    its From (and the ``sender`` Reply-To): the one the ERP wrote in From when
    it is one of the user's (a brand's own sender address, such as
    sales@brand.example, with the brand's name), else the user's main one."""
    user, tenant = identity.user, identity.tenant
    for name, written in view.mailboxes("From"):
        address = a_label_address(written)  # as the policy holds it, and SMTP carries it
        if address is None:
            continue
        domain = address.rpartition("@")[2].lower()
        if domain not in tenant.verified_domains or address.lower() == user.address.lower():
            continue
        if address.lower() in user.aliases:
            why = (
                f"From is the user's address {address} as the message has it:"
                f" {domain} is a verified domain of {tenant.id!r}"
            )
            return _Mailbox(_writable(name) or user.name, address, why)
    domain = user.address.rsplit("@", 1)[1].lower()
    if domain in tenant.verified_domains:
        why = f"From is the user's own address: {domain} is a verified domain of {tenant.id!r}"
        return _Mailbox(user.name, user.address, why)
    return None


# ``name <address>`` as written: a quoted name, or words with no specials (an
# encoded word among them), and nothing after the address
_PLAIN_MAILBOX = re.compile(
    r'(?P<name>"[^"\\\x00-\x1f\x7f]*"|[^"<>()\[\]:;@\\,\x00-\x1f\x7f]*?) ?<(?P<address>[!-~]+)>'
)
_BLANKS = re.compile(r"[ \t]+")  # what a fold leaves: not every character str.split takes


def _written_as(view: MessageView, name: str, address: str) -> bool:
    """Whether the message's one From already says ``name <address>``, however
    it wrote the name (an encoded word, quotes, raw UTF-8): written again, it
    changed bytes an ERP that signs its own mail had signed, and its signature
    failed for a From that meant the same. Read as written, before decoding:
    a lenient reader takes the first <...> and passes over a route, a comment,
    a group's start or specials inside an encoded word, where a receiver may
    read another address."""
    written = [value for field, value in view.written if field.lower() == "from"]
    plain = _BLANKS.sub(" ", written[0]).strip(" ") if len(written) == 1 else ""
    found = _PLAIN_MAILBOX.fullmatch(plain)
    if found is None or found["address"].lower() != address.lower():
        return False
    if not plain.isascii() and not _utf8_from(view.fields):
        return False
    shown = found["name"]
    return (shown[1:-1] if shown.startswith('"') else decode(shown)) == name


def _utf8_from(fields: list[Field]) -> bool:
    """Whether the From's bytes are UTF-8, as receivers read 8-bit header bytes
    (RFC 6532). A name in Latin-1 bytes is read here as Windows-1252 and said
    the user's name, but kept byte for byte it showed as mojibake, and a
    parser noted undecodable bytes; written again, it is encoded."""
    found = [one.raw for one in fields if one.name.lower() == "from"]
    try:
        for value in found:
            value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(found)


def _writable(name: str) -> str:
    """The display name as the relay can write it into a header, or nothing."""
    try:
        format_address(name, "x@example.com")
    except HeaderInjection:
        return ""
    return name


def _account(upstream: Upstream) -> SmtpUpstream | None:
    """The upstream as a company's own account that can only send as one address."""
    if isinstance(upstream, SmtpUpstream) and upstream.sender is not None:
        return upstream
    return None


def _account_from(
    policy: Policy, identity: Identity, account: SmtpUpstream, otherwise: str
) -> tuple[str, str, str]:
    """The account refuses any other From (Microsoft 365: ``550 5.7.60``), the
    user's own in a verified domain included; DKIM signs as it would have,
    unless the policy has a key for the account's own domain (``decide``)."""
    template = account.sender_name or policy.platform.display_name
    name = _display_name(template, identity)
    why = (
        f"From is {account.sender}, the address upstream {account.name!r} sends as,"
        f" with display name {name!r}, not {otherwise}: the account may send as no other"
    )
    return account.sender, name, why


def _display_name(template: str, identity: Identity) -> str:
    user, tenant = identity.user, identity.tenant
    return template.format_map(
        {"user": _Fields(name=user.name, address=user.address), "tenant": _Fields(name=tenant.name)}
    )


class _Fields:
    """Attribute access for the display-name template, nothing else."""

    def __init__(self, **values: str) -> None:
        self.__dict__.update(values)


def _reply_to(
    identity: Identity, sender: _Mailbox, doc_type: str, view: MessageView
) -> tuple[str | None, str]:
    tenant = identity.tenant
    chain = tenant.reply_to.get(doc_type) or tenant.reply_to["default"]
    skipped: list[str] = []
    for source in chain:
        if source.kind is ReplyToKind.KEEP:
            if _addressless(view):
                why = f"Reply-To not kept: the message's is empty{_NO_ADDRESS}"
                return "", _chain_why(why, skipped)
            return None, _chain_why(_kept(view), skipped)
        value = _reply_to_value(source, identity, sender, view)
        if value is not None:
            shown = quoted(decode(value))  # as the From's name is said: not in encoded words
            return value, _chain_why(f"Reply-To from {_label(source)}: {shown}", skipped)
        skipped.append(f"{_label(source)} {_lacks(source, view)}")
    if _addressless(view):
        why = f"no Reply-To source gave an address, and the message's is empty{_NO_ADDRESS}"
        return "", _chain_why(why, skipped)
    return None, _chain_why("no Reply-To source gave an address; Reply-To left as it was", skipped)


_NO_ADDRESS = ", which RFC 5322 3.6.2 does not allow: removed"


def _addressless(view: MessageView, name: str = "Reply-To") -> bool:
    """Whether the message has the address field ``name`` and each is empty
    (``Reply-To:`` and white space). Kept, it went out under the relay's
    signature though RFC 5322 wants an address, and a client may answer it to
    nobody; the relay fills an empty Date or Message-ID for the same reason,
    and this it can only remove."""
    found = view.get_all(name)
    return bool(found) and not any(value.strip() for value in found)


_UNDISCLOSED = "undisclosed-recipients:;"  # RFC 5322 3.4's empty group, as Sendmail writes it


def _empty_recipients(
    view: MessageView, changed: set[str], theirs: _Theirs | None
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """The edits for an empty To or Cc, which RFC 5322 3.6.3 wants an address
    in and some receivers score as spam, and for a missing To, and why. A Cc
    goes; a To, empty or missing, becomes the empty group, as an ERP sending
    to Bcc alone means, since a message with no To at all is scored too
    (SpamAssassin's MISSING_HEADERS). A Cc does not spare it: that rule looks
    at To alone (Sendmail and Postfix add the group only where no To or Cc
    is, for RFC 822, which wanted a destination field). A field a DKIM
    signature the message came with signs, present or not, stays as it is,
    where the relay's other edits (``changed``, lower case) leave that
    signature whole: changed, it would break it, under any canonicalisation,
    for a blemish receivers forgive. One the From rewritten breaks anyway is
    no reason."""
    updates: list[tuple[str, str]] = []
    removed: list[str] = []
    reasons: list[str] = []
    for name in ("To", "Cc"):
        missing = name == "To" and view.get(name) is None
        if not missing and not _addressless(view, name):
            continue
        signed = _signed_whole(view.fields, name, changed, theirs)
        if missing:
            added, why = _missing_to(signed)
            updates += added
            reasons.append(why)
            continue
        why = f"{name} is empty, which RFC 5322 3.6.3 does not allow"
        if signed:
            reasons.append(f"{why}: kept, {_as_signed(signed)}")
        elif name == "To":
            updates.append(("To", _UNDISCLOSED))
            reasons.append(f"{why}: set to {_UNDISCLOSED}")
        else:
            removed.append("Cc")
            reasons.append(f"{why}: removed")
    return updates, removed, reasons


def _missing_to(signed: list[str]) -> tuple[list[tuple[str, str]], str]:
    """The edit for a message with no To, and why: ``signed``, the signatures
    that sign ``to``, sign its absence too (RFC 6376 5.4)."""
    why = "To was missing, which some receivers score as spam"
    if signed:
        return [], f"{why}: not added, {_as_signed(signed)}"
    return [("To", _UNDISCLOSED)], f"{why}: added as {_UNDISCLOSED}"


def _kept(view: MessageView) -> str:
    if view.get("Reply-To") is None:
        return "Reply-To kept as the message has it: it has none"
    return "Reply-To kept as the message has it"


def _lacks(source: ReplyToSource, view: MessageView) -> str:
    """Why a header source gave no Reply-To: a header holding a name (``X-Partner:
    Paul Partner``) was said to be empty, which sent the sysadmin looking for
    an ERP that wrote nothing."""
    value = view.get(source.value) if source.kind is ReplyToKind.HEADER else ""
    if value is None:
        return "is missing"
    if not value.strip():
        return "is empty"
    if any("@" in address for _, address in view.mailboxes(source.value)):
        return "holds no usable address"
    return "holds no address"


def _reply_to_value(
    source: ReplyToSource, identity: Identity, sender: _Mailbox, view: MessageView
) -> str | None:
    if source.kind is ReplyToKind.SENDER:
        return format_address(sender.name, sender.address)
    if source.kind is ReplyToKind.COMPANY:
        return format_address(identity.tenant.name, identity.tenant.address)
    if source.kind is ReplyToKind.ADDRESS:
        return format_address(source.name, source.value) if source.name else source.value
    refuse_differing(view, source.value, "for the Reply-To", first_address)
    for name, address in view.addresses(source.value):
        try:
            return format_address(name, address)
        except HeaderInjection:
            continue
    return None


def _label(source: ReplyToSource) -> str:
    if source.kind is ReplyToKind.HEADER:
        return f"header {source.value}"
    if source.kind is ReplyToKind.ADDRESS:
        return "fixed address"
    return source.kind.value


def _chain_why(why: str, skipped: list[str]) -> str:
    if not skipped:
        return why
    return f"{why} (before it: {', '.join(skipped)})"


def _bcc(
    identity: Identity,
    doc_type: str,
    rcpt_tos: tuple[str, ...],
    suppressed: tuple[tuple[str, Suppression], ...],
) -> tuple[tuple[str, ...], str]:
    """The automatic copy, and why. A sender among the recipients on the
    suppression list gets no copy by either route: "already a recipient"
    alone read as one sent that way."""
    address = identity.user.address
    if doc_type not in identity.tenant.bcc_sender:
        return (), f"no automatic BCC: {doc_type!r} is not a BCC document type"
    if listed(address, (a for a, _ in suppressed)):
        return (), (
            f"no automatic BCC: {address} is already a recipient, and on the"
            " suppression list: the sender gets no copy"
        )
    if listed(address, rcpt_tos):
        return (), f"no automatic BCC: {address} is already a recipient"
    return (address,), f"automatic BCC to the sender {address} ({doc_type!r})"


def _suppressed(
    suppressions: SuppressionList, identity: Identity, recipients: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[tuple[str, Suppression], ...]]:
    """The recipients to send to, and those on the suppression list with their entry."""
    kept: list[str] = []
    dropped: list[tuple[str, Suppression]] = []
    for address in recipients:
        entry = suppressions.find(address, identity.tenant.id)
        if entry is None:
            kept.append(address)
        else:
            dropped.append((address, entry))
    return tuple(kept), tuple(dropped)
