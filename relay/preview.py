"""``relay preview``: the daemon's own decision for a message, explained.

A sysadmin changing the policy wants to see, before any mail goes out,
who the relay thinks sent a message, why, and what the message will look
like. This renders ``pipeline.prepare``'s result; nothing is sent. What the
SMTP side would refuse before the pipeline sees it (a login the policy does
not know, an envelope address it does not take) is refused here too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from relay import headers, message, ratelimit, statelock
from relay.audit.render import decoded_field
from relay.decide import Decision
from relay.errors import Rejected, RelayError, SmtpReply
from relay.hostport import host_port
from relay.identify import a_label_address
from relay.ingress import content
from relay.ingress.address import RECIPIENT, SENDER, mailbox_refusal
from relay.ingress.protocol import non_ascii_reply
from relay.notice import Telling, telling
from relay.pipeline import Prepared, prepare
from relay.policy.model import (
    AuthMode,
    DirectoryUpstream,
    Listener,
    Policy,
    SmtpUpstream,
    Upstream,
)
from relay.quantity import quantity
from relay.status import put_in_use, version_in_use
from relay.submission import Submission, distinct
from relay.suppression import EMPTY, SuppressionError, SuppressionFile, SuppressionList
from relay.visible import escaped_match, one_line

# the SMTP command whose reply refuses the transaction, as ``Refused.stage``
AUTH, MAIL, RCPT, DATA, END_OF_DATA = "AUTH", "MAIL FROM", "RCPT TO", "DATA", "end of data"

_LINE_END = re.compile(rb"\r?\n")
# all but the tab of a folded header and the report's own line ends
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class UnknownListener(RelayError):
    """``--listener`` names none of the policy's: a typo, said with the names there are."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no listener {name!r} (the policy has {', '.join(known) or 'none'})")


class NoRecipient(RelayError):
    """Neither ``--rcpt`` nor the message names anyone: the SMTP side's answer,
    ``503 5.5.1 Error: need RCPT command``, spoke of a command no one typed."""

    def __init__(self) -> None:
        super().__init__(
            "no recipient to preview (give one with --rcpt ADDRESS, or a To, Cc or Bcc"
            " address in the message)"
        )


class Refused(RelayError):
    """The relay's refusal of the previewed transaction, and the command it
    answers (``stage``): a script reading ``--json`` learns why and where an
    ERP sending the message would be stopped, not only that it would be."""

    def __init__(self, reply: SmtpReply, stage: str) -> None:
        super().__init__(reply.line)
        self.reply = reply
        self.stage = stage


def refusal_json(refused: Refused) -> str:
    """``--json``'s object for a refusal, in place of the report."""
    reply = refused.reply
    return json.dumps(
        {
            "refused": {
                "stage": refused.stage,
                "code": reply.code,
                "status": reply.status,
                "text": reply.text,
                "why": reply.note,  # None: nothing more to say than the reply
            }
        },
        indent=2,
        ensure_ascii=False,
    )


def _unknown_at_auth(login: str) -> Rejected:
    """What AUTH answers a login the policy does not know (aiosmtpd's reply to a
    failed login), with the name for the sysadmin only: the client is not told
    which names there are."""
    return Rejected(
        535, "5.7.8", "Authentication credentials invalid", note=f"no login {login!r} in the policy"
    )


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the SMTP side checks of a transaction, by the listener it comes in
    on. A preview has none: the one named, the policy's only one, or else the
    most permissive of them all (``name`` None), which no one listener may be."""

    name: str | None
    of: tuple[str, ...]  # the listeners these limits are of
    max_message_size: int | None
    max_recipients: int | None
    auth: AuthMode
    allow: tuple[str, ...]  # its clients' networks: a preview has no client to check

    @property
    def login_required(self) -> bool:
        return self.auth is AuthMode.REQUIRED

    @property
    def login_offered(self) -> bool:
        return self.auth is not AuthMode.OFF


def limits_of(policy: Policy, name: str | None = None) -> Limits:
    """The limits a message is previewed against; raises UnknownListener."""
    chosen = [x for x in policy.listeners if name is None or x.name == name]
    if name is not None and not chosen:
        raise UnknownListener(name, [x.name for x in policy.listeners])
    if len(chosen) == 1:
        return _one(chosen[0])
    modes = {x.auth for x in chosen}
    auth = next(iter(modes)) if len(modes) == 1 else AuthMode.OPTIONAL
    return Limits(
        name=None,
        of=tuple(x.name for x in chosen),
        max_message_size=max((x.max_message_size for x in chosen), default=None),
        max_recipients=max((x.max_recipients for x in chosen), default=None),
        auth=auth,
        allow=(),
    )


def _one(listener: Listener) -> Limits:
    return Limits(
        name=listener.name,
        of=(listener.name,),
        max_message_size=listener.max_message_size,
        max_recipients=listener.max_recipients,
        auth=listener.auth,
        allow=tuple(str(network) for network in listener.allow),
    )


def submission_from_file(
    raw: bytes, auth_login: str | None, mail_from: str | None, rcpts: list[str]
) -> Submission:
    """Build the SMTP transaction an ERP would have made for this .eml file.

    Files on disk usually have LF line ends; SMTP delivers CRLF, so the
    preview converts them as an SMTP client would. Raises NoRecipient.
    """
    data = _LINE_END.sub(b"\r\n", raw)
    view = message.read(data)
    if mail_from == "<>":  # as MAIL FROM:<> writes the null sender
        mail_from = ""
    if mail_from is None:
        senders = _envelope_addresses(view, "From")
        mail_from = senders[0] if senders else ""
    if not rcpts:
        rcpts = [a for name in ("To", "Cc", "Bcc") for a in _envelope_addresses(view, name)]
    if not rcpts:
        raise NoRecipient
    return Submission(
        listener="preview",
        client_address="preview",
        auth_login=auth_login,
        mail_from=mail_from,
        rcpt_tos=distinct(rcpts),  # as the SMTP side takes them
        data=data,
    )


def _envelope_addresses(view: message.MessageView, name: str) -> list[str]:
    """The ``name`` addresses an ERP would put in MAIL or RCPT. ``deliverable``
    takes only an ASCII host name, so ``shop@bücher.example`` was left out:
    the preview went on with ``MAIL FROM <>`` or without that recipient, where
    the SMTP side refuses the address. One whose domain would be deliverable
    as A-labels is kept, for ``_check_envelope`` to refuse as the SMTP side does."""
    return [a for _, a in view.mailboxes(name) if headers.deliverable(a_label_address(a) or a)]


def render(
    policy: Policy, submission: Submission, *, as_json: bool, listener: str | None = None
) -> str:
    """The report; raises Refused for a message the relay would refuse, and
    UnknownListener for a ``listener`` the policy has not."""
    limits = limits_of(policy, listener)
    _check_envelope(policy, limits, submission)
    submission, beyond = _within_recipient_limit(limits, submission)
    suppressions, unread = _suppressions(policy)
    try:
        prepared = prepare(policy, submission, suppressions=suppressions)
    except SmtpReply as reply:
        raise Refused(reply, END_OF_DATA) from reply
    decision = prepared.decision
    wanted = ratelimit.counted(submission.rcpt_tos, (a for a, _ in decision.suppressed))
    alone = ratelimit.refusal(decision.identity.tenant, wanted, 0)
    if alone is not None:  # the hour's count is the running relay's: only this is sure
        raise Refused(alone, END_OF_DATA)
    report = _report(policy, limits, submission, prepared, suppressions)
    if beyond:
        taker = "a listener" if limits.name is None else f"listener {limits.name}"
        report["reasons"].append(
            f"{quantity(len(beyond), 'recipient')} past the {len(submission.rcpt_tos)} {taker}"
            " takes would be answered 452 4.5.3 Too many recipients at RCPT TO, and the message"
            " goes without them (a client may send it to them in a further transaction): "
            + ", ".join(beyond)
        )
    if unread:
        report["reasons"].append(unread)
    if as_json:
        return json.dumps(report, indent=2, ensure_ascii=False)
    return _text(report)


def _suppressions(policy: Policy) -> tuple[SuppressionList, str]:
    """The list the daemon would look recipients up in. One the preview cannot
    read (another user's state directory) does not stop it: the report says so."""
    if policy.suppression is None:
        return EMPTY, ""
    try:
        return SuppressionFile(policy.suppression.file).current(), ""
    except SuppressionError as exc:
        return EMPTY, f"recipients not checked against the suppression list: {exc}"


def _check_envelope(policy: Policy, limits: Limits, submission: Submission) -> None:
    """Raise the SMTP side's refusal of this transaction, if it has one: an
    ERP could not name these addresses or send this content, so no preview of
    them helps. The first refusal a session would meet is the one raised, in
    the order of its commands: a client refused at AUTH never gives RCPT TO."""
    if submission.auth_login is not None and not limits.login_offered:
        raise Refused(Rejected(504, "5.5.4", "Unrecognized authentication type"), AUTH)
    if submission.auth_login is not None and submission.auth_login not in policy.logins:
        raise Refused(_unknown_at_auth(submission.auth_login), AUTH)
    if submission.auth_login is None and limits.login_required:
        raise Refused(Rejected(530, "5.7.0", "Authentication required"), MAIL)
    paths = [(MAIL, submission.mail_from, SENDER)] if submission.mail_from else []
    paths += [(RCPT, rcpt, RECIPIENT) for rcpt in submission.rcpt_tos]
    for command, address, status in paths:
        refused = _non_ascii_refusal(command, address) or mailbox_refusal(address, status)
        if refused is not None:
            raise Refused(refused, command)
    if not submission.rcpt_tos:
        raise Refused(Rejected(503, "5.5.1", "Error: need RCPT command"), DATA)
    largest = limits.max_message_size
    if largest is not None and len(submission.data) > largest:
        if limits.name is None:
            text = f"Message size exceeds the maximum of any listener ({largest} bytes)"
        else:  # the SMTP side's own words
            text = f"Message size exceeds the maximum of {largest} bytes"
        raise Refused(Rejected(552, "5.3.4", text), END_OF_DATA)
    refused = content.refusal(submission.data)  # after DATA: bare CR, NUL, long lines
    if refused is not None:
        raise Refused(refused, END_OF_DATA)


def _within_recipient_limit(
    limits: Limits, submission: Submission
) -> tuple[Submission, tuple[str, ...]]:
    """The transaction as the SMTP side takes it, and the recipients it answers
    452 at RCPT: the message goes to the first ``max_recipients``, not nowhere."""
    most = limits.max_recipients
    if most is None or len(submission.rcpt_tos) <= most:
        return submission, ()
    taken = dataclasses.replace(submission, rcpt_tos=submission.rcpt_tos[:most])
    return taken, submission.rcpt_tos[most:]


def _non_ascii_refusal(command: str, address: str) -> Rejected | None:
    """The SMTP side offers no SMTPUTF8, so aiosmtpd refuses a non-ASCII
    command line before the address is parsed: 501 5.6.7, not the 553 that
    ``mailbox_refusal`` would give. The reply is made by the SMTP side's own
    code, from the line an ERP would send, so the two cannot come to differ."""
    if address.isascii():
        return None
    reply = non_ascii_reply(f"{command}:<{address}>".encode("utf-8", "surrogateescape"))
    code, status, text = reply.split(" ", 2)
    return Rejected(int(code), status, text)


def _report(
    policy: Policy,
    limits: Limits,
    submission: Submission,
    prepared: Prepared,
    suppressions: SuppressionList,
) -> dict:
    d: Decision = prepared.decision
    fields, _ = headers.split(prepared.message)
    due = _notice(d, suppressions)
    return {
        "policy": {
            "file": os.path.abspath(policy.source),
            "version": policy.digest[:12],
            **_in_use(policy),
        },
        "listener": _listener(limits),
        "tenant": {
            "id": d.identity.tenant.id,
            "name": d.identity.tenant.name,
            "recipients_per_hour": d.identity.tenant.recipients_per_hour,
        },
        "user": {
            "id": d.identity.user.id,
            "name": d.identity.user.name,
            "address": d.identity.user.address,
            "found_by": d.identity.source,
        },
        "auth_login": submission.auth_login,
        "document": {"type": d.classification.doc_type, "rule": d.classification.rule},
        "from": {"before": d.from_before, "after": d.from_after},
        "reply_to": {"before": d.reply_to_before, "after": d.reply_to_after},  # None: kept
        "envelope": {"mail_from": d.mail_from, "recipients": list(d.recipients)},
        "suppressed": [
            {"recipient": address, "reason": entry.reason, "since": entry.since}
            for address, entry in d.suppressed
        ],
        "bcc_added": list(d.bcc_added),
        "failure_notice": _notice_json(due),
        "headers_removed": [
            f.name for f in headers.split(submission.data)[0] if _removed(f.name, d)
        ],
        "dkim": [
            {"domain": k.domain, "selector": k.selector, "algorithm": k.algorithm.value}
            for k in d.signing
        ],
        "upstream": _describe(d.upstream),
        "fallback": [_describe(u) for u in _fallbacks(policy, d.upstream)],
        "reasons": [
            *d.reasons,
            *([] if due is None else [_notice_why(due)]),
            *(_not_utf8(f) for f in fields if not _utf8(f.raw)),
        ],
        "headers": "".join(map(_wire_text, fields)),
    }


def _notice(d: Decision, suppressions: SuppressionList) -> Telling | None:
    """The engine's own decision on the notice for the suppressed recipients,
    which it queues after the message's first attempt."""
    failures = [address for address, _ in d.suppressed if d.sender_told(address)]
    tenant = d.identity.tenant.id
    return telling(
        d.mail_from,
        d.identity.user.address,
        failures,
        lambda address: suppressions.find(address, tenant),
    )


def _notice_json(due: Telling | None) -> dict | None:
    if due is None:
        return None
    entry = due.withheld
    withheld = None if entry is None else {"reason": entry.reason, "since": entry.since}
    return {"to": due.to, "recipients": list(due.failures), "withheld": withheld}


def _notice_why(due: Telling) -> str:
    if due.withheld is not None:
        return (
            f"no failure notice: the sender <{due.to}> is on the suppression list since"
            f" {due.withheld.since}"
        )
    return f"failure notice to <{due.to}>: {quantity(len(due.failures), 'recipient')} suppressed"


def _listener(limits: Limits) -> dict:
    if limits.name is None:
        assumed = f"the most permissive of {', '.join(limits.of) or 'none'}"
    else:
        assumed = limits.name
    return {
        "name": limits.name,
        "assumed": assumed,
        "max_message_size": limits.max_message_size,
        "max_recipients": limits.max_recipients,
        "auth": limits.auth.value,
        "allow": list(limits.allow),
    }


def _in_use(policy: Policy) -> dict:
    """The relay running on the policy's state directory: a preview of a file
    edited and not reloaded is not what it does (``relay status`` tells alike)."""
    try:
        running = statelock.holder(policy.queue.directory.parent)
    except statelock.StateUnreadable as exc:
        return {"running": None, "note": f"whether a relay runs this version cannot be told: {exc}"}
    if running is None:
        return {"running": None, "note": None}
    other = version_in_use(running, policy.digest)
    note = None
    if other is not None:
        note = (
            f"the running relay uses version {other}; this preview is of the file:"
            f" {put_in_use(running, policy.source)}"
        )
    version = running.digest[:12] or None
    file = running.source or None  # None: a relay that did not record it
    return {"running": {"pid": running.pid, "version": version, "file": file}, "note": note}


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _wire_text(field: headers.Field) -> str:
    """A field in raw UTF-8 as text; one in other 8-bit bytes (Latin-1) with
    them escaped, ``f\\xfcr``: shown as the policy reads it, it looked right,
    where receivers may show it garbled."""
    if _utf8(field.raw):
        return field.raw.decode("utf-8")
    return field.raw.decode("ascii", "backslashreplace")


def _not_utf8(field: headers.Field) -> str:
    read = message.header_text(field.raw).partition(":")[2].strip()
    return (
        f"{field.name} is not UTF-8 on the wire (its 8-bit bytes shown escaped below):"
        f" the policy reads it as Windows-1252 ({read}); receivers may show it garbled"
    )


def _removed(name: str, d: Decision) -> bool:
    return name.lower() in {n.lower() for n in d.edits.remove}


def _fallbacks(policy: Policy, upstream: Upstream) -> list[Upstream]:
    """The upstreams the message goes through, in order, when its own is unusable."""
    names = upstream.fallback if isinstance(upstream, SmtpUpstream) else ()
    return [policy.upstreams[name] for name in names if name in policy.upstreams]


def _describe(upstream: Upstream) -> str:
    if isinstance(upstream, DirectoryUpstream):
        return f"{upstream.name} (directory {upstream.path})"
    assert isinstance(upstream, SmtpUpstream)
    where = host_port(upstream.host, upstream.port)
    return f"{upstream.name} (smtp {where}, tls {upstream.tls.value})"


def _limit(per_hour: int | None) -> str:
    if per_hour is None:
        return ""
    most = quantity(per_hour, "recipient")
    return f", at most {most} an hour (the hour's count is not checked here)"


def _limits(listener: dict) -> str:
    """The limits assumed, and what a preview cannot check: the client's address."""
    size, most = listener["max_message_size"], listener["max_recipients"]
    limits = f"up to {size} bytes, {quantity(most, 'recipient')}, auth {listener['auth']}"
    if listener["name"] is None:
        return f"{listener['assumed']} ({limits}); --listener NAME takes one's"
    allow = ", ".join(listener["allow"]) or "nowhere"
    return f"{listener['name']} ({limits}; clients from {allow} only, not checked here)"


def _shown(header: str | None) -> str:
    """A field as ``audit show`` reads it: a name in encoded words decoded, and
    quoted where it holds a special (``Gross, Jürgen <j@x>`` read as two
    mailboxes). The JSON keeps the field as written, as the audit record does."""
    return "-" if header is None else one_line(decoded_field(header))


def _bcc_added(r: dict) -> str:
    """A copy the suppression list then kept back is marked: named alone, it
    read as sent, with the sender among the suppressed further down."""
    kept_back = {s["recipient"] for s in r["suppressed"]}
    added = [f"{a} (suppressed)" if a in kept_back else a for a in r["bcc_added"]]
    return ", ".join(added) or "none"


def _text(r: dict) -> str:
    user, tenant = r["user"], r["tenant"]
    dkim = ", ".join(f"d={k['domain']} s={k['selector']} ({k['algorithm']})" for k in r["dkim"])
    doc = r["document"]
    before, after = r["reply_to"]["before"], r["reply_to"]["after"]
    policy, listener = r["policy"], r["listener"]
    lines = [
        f"Policy:      {policy['file']} (version {policy['version']})",
        *([f"             {policy['note']}"] if policy["note"] else []),
        f"Listener:    {_limits(listener)}",
        f"User:        {user['name']} <{user['address']}>"
        f" ({user['id']}, found by {user['found_by']})",
        f"Tenant:      {tenant['name']} ({tenant['id']})" + _limit(tenant["recipients_per_hour"]),
        f"Document:    {doc['type']}" + (f" (rule {doc['rule']})" if doc["rule"] else ""),
        f"From:        {_shown(r['from']['before'])}  ->  {_shown(r['from']['after'])}",
        f"Reply-To:    {_shown(before)}  ->  {_shown(before if after is None else after or None)}",
        f"BCC added:   {_bcc_added(r)}",
        f"Removed:     {', '.join(r['headers_removed']) or 'none'}",
        f"Envelope:    MAIL FROM <{r['envelope']['mail_from']}>",
        f"Recipients:  {', '.join(r['envelope']['recipients']) or 'none'}",
        f"Suppressed:  {', '.join(s['recipient'] for s in r['suppressed']) or 'none'}",
        f"DKIM:        {dkim or 'not signed'}",
        f"Upstream:    {r['upstream']}",
        *(f"  fallback:  {fallback}" for fallback in r["fallback"]),
        "",
        "Why:",
        *(f"  - {one_line(reason)}" for reason in r["reasons"]),
        "",
        "Headers as sent:",
        r["headers"].rstrip("\r\n").replace("\r\n", "\n"),
    ]
    return _visible("\n".join(lines))


def _visible(text: str) -> str:
    """The message's text comes from whoever wrote it: an escape sequence in a
    Subject would act on the terminal, so it shows as ``\\x1b``, as ``relay queue
    show`` keeps them off it. JSON escapes them already."""
    return _CONTROL.sub(escaped_match, text)
