"""The audit log's schema: one typed builder per event.

Auditors and their scripts rely on field names and order staying put, so a
record can only be made through these builders: an unknown or mistyped field
is a programming error caught at the call, not a silent schema drift found
months later in a jq script. Bodies never enter the log; the subject only
when the caller passes it (a privacy choice that belongs to the policy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.decide import Decision
    from relay.errors import SmtpReply
    from relay.identify import Identity
    from relay.submission import Submission

VERSION = 1
#: The document type a failure notice is queued and recorded as.
NOTICE_TYPE = "notice"
HEAD = ("v", "seq", "time", "event", "queue_id", "message_id")  # before the event's fields
TAIL = ("prev", "hash")  # after them

Check = Callable[[Any], bool]


def _str(value: Any) -> bool:
    return isinstance(value, str)


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strs(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _dkim(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, dict) and list(v) == ["domain", "selector"] and all(map(_str, v.values()))
        for v in value
    )


def _suppression(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and list(value) == ["reason", "since"]
        and all(map(_str, value.values()))
    )


SCHEMA: Mapping[str, tuple[tuple[str, Check], ...]] = {
    "received": (
        ("client_address", _str),
        ("auth_login", _opt_str),
        ("listener", _str),
        ("mail_from", _str),
        ("rcpt_tos", _strs),
        ("size", _int),
        ("tenant", _str),
        ("user", _str),
        ("doc_type", _str),
        ("rule", _opt_str),
        ("from_before", _opt_str),
        ("from_after", _str),
        ("reply_to_before", _opt_str),
        ("reply_to_after", _opt_str),
        ("bcc_added", _strs),
        ("dkim", _dkim),
        ("upstream", _str),
        ("policy_version", _str),
        ("subject", _str),  # optional: present only when the caller passes it
        # which identify source named the user (auth_login, envelope_sender,
        # header_from, header) or "default"; absent from records written before it
        ("found_by", _str),
        # why the policy decided as it did, as relay preview says it, but the
        # document rule's evidence (text of the subject); absent from older records
        ("reasons", _strs),
    ),
    "rejected": (
        ("client_address", _str),
        ("auth_login", _opt_str),
        ("mail_from", _str),
        ("rcpt_tos", _strs),
        ("reply", _str),
        # who sent it, when the relay had identified them before it refused
        # (the rate limit, a field given twice, a failed write): as in ``received``
        ("tenant", _str),
        ("user", _str),
        ("found_by", _str),
    ),
    "queued": (("recipients", _strs), ("size", _int)),
    "delivered": (("recipient", _str), ("upstream", _str), ("reply", _str), ("attempts", _int)),
    "deferred": (("recipient", _str), ("reply", _str), ("next_attempt", _str)),
    "failed": (("recipient", _str), ("reply", _str)),
    "expired": (("recipient", _str), ("reply", _str)),
    "suppressed": (("recipient", _str), ("suppression", _suppression)),
    "bounced": (("recipient", _str), ("dsn_status", _str), ("diagnostic", _opt_str)),
    "complained": (("recipient", _str), ("feedback_type", _str)),
    "deleted": (("by", _str), ("recipients", _strs)),
    # Added within version 1, as the schema allows: readers ignore events they do not know.
    "held": (("by", _str),),
    "released": (("by", _str),),
    # The failure notice is a message of its own with no received record:
    # this links it to the message it is about, for the report.
    "notified": (("recipient", _str), ("notice_queue_id", _str)),
    "policy_loaded": (("policy_file", _str), ("policy_sha256", _str)),
    # Written by AuditLog.maintain before it deletes old files, so verify can
    # tell retention from someone removing the start of the log.
    "pruned": (
        ("files", _strs),
        ("through_seq", _int),
        ("through_hash", _str),
        ("retention_days", _int),
    ),
    # The relay put the address on the suppression list for this message: its
    # ``suppression`` is what the later ``suppressed`` records of the address say.
    "listed": (
        ("recipient", _str),
        ("suppression", _suppression),
        ("for_tenant", _opt_str),
        ("detail", _str),
    ),
}
# fields a record may lack: the subject where the policy does not record it;
# a refusal's sender where it came before the relay knew them; the others in
# records written before the relay recorded them
OPTIONAL = {
    ("received", "subject"),
    ("received", "found_by"),
    ("received", "reasons"),
    ("expired", "reply"),
    ("rejected", "tenant"),
    ("rejected", "user"),
    ("rejected", "found_by"),
}


@functools.cache
def fields(event: str, optional: frozenset[str] | None = None) -> tuple[str, ...]:
    """The full key order of a stored record of this event, with the optional
    fields named in ``optional`` (None: all of them)."""
    own = tuple(
        name
        for name, _ in SCHEMA[event]
        if (event, name) not in OPTIONAL or optional is None or name in optional
    )
    return (*HEAD, *own, *TAIL)


def check(record: Mapping[str, Any]) -> None:
    """Raise ValueError unless the record is exactly what a builder makes."""
    event = record.get("event")
    if event not in SCHEMA:
        raise ValueError(f"unknown audit event {event!r}")
    keys = tuple(record)
    present = frozenset(k for k in keys if (event, k) in OPTIONAL)
    if keys != fields(event, present)[3:-2]:
        full = fields(event)[3:-2]
        raise ValueError(f"audit event {event!r}: fields {keys} are not the schema's {full}")
    _check_values(event, record)


def _check_values(event: str, record: Mapping[str, Any]) -> None:
    """``check`` of a record whose fields are the schema's, in its order, as
    ``_build`` makes them: the order is then not looked at again."""
    if not (_opt_str(record["queue_id"]) and _opt_str(record["message_id"])):
        raise ValueError(f"audit event {event!r}: queue_id and message_id must be text or None")
    for name, ok in SCHEMA[event]:
        if name in record and not ok(record[name]):
            raise ValueError(f"audit event {event!r}: bad value for {name}: {record[name]!r}")


def _build(event: str, queue_id: str | None, message_id: str | None, **values: Any) -> dict:
    record: dict[str, Any] = {
        "event": event,
        "queue_id": _clean(queue_id),
        "message_id": _clean(message_id),
    }
    for name, _ in SCHEMA[event]:
        if name not in values:
            if (event, name) in OPTIONAL:
                continue
            raise TypeError(f"audit event {event!r} needs {name}")
        value = values.pop(name)
        if value is None and (event, name) in OPTIONAL:
            continue
        record[name] = _clean(value)
    if values:
        raise TypeError(f"audit event {event!r} has no field(s) {sorted(values)}")
    _check_values(event, record)
    return record


def _clean(value: Any) -> Any:
    """Lone surrogates (undecodable header bytes) cannot be written as UTF-8."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, tuple | list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def timestamp(when: datetime) -> str:
    """UTC ISO 8601 with milliseconds: fixed width, so text order is time order."""
    when = when.astimezone(UTC)
    if when.year < 1000:  # isoformat pads the year, strftime did not
        return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"
    return f"{when.isoformat(timespec='milliseconds')[:-6]}Z"


def _time(value: datetime | str) -> str:
    return timestamp(value) if isinstance(value, datetime) else value


def received(
    *,
    queue_id: str,
    message_id: str | None,
    client_address: str,
    auth_login: str | None,
    listener: str,
    mail_from: str,
    rcpt_tos: Sequence[str],
    size: int,
    tenant: str,
    user: str,
    doc_type: str,
    rule: str | None,
    from_before: str | None,
    from_after: str,
    reply_to_before: str | None,
    reply_to_after: str | None,
    bcc_added: Sequence[str],
    dkim: Sequence[tuple[str, str]],
    upstream: str,
    policy_version: str,
    subject: str | None = None,
    found_by: str | None = None,
    reasons: Sequence[str] | None = None,
) -> dict:
    values = dict(locals())
    values["dkim"] = [{"domain": d, "selector": s} for d, s in dkim]
    return _build("received", **values)


def received_for(
    queue_id: str,
    message_id: str | None,
    submission: Submission,
    decision: Decision,
    size: int,
    policy_version: str,
    subject: str | None = None,
) -> dict:
    """``received`` from the pipeline's own objects, so callers cannot drift from them."""
    return received(
        queue_id=queue_id,
        message_id=message_id,
        client_address=submission.client_address,
        auth_login=submission.auth_login,
        listener=submission.listener,
        mail_from=submission.mail_from,
        rcpt_tos=submission.rcpt_tos,
        size=size,
        tenant=decision.identity.tenant.id,
        user=decision.identity.user.id,
        doc_type=decision.classification.doc_type,
        rule=decision.classification.rule,
        from_before=decision.from_before,
        from_after=decision.from_after,
        reply_to_before=decision.reply_to_before,
        reply_to_after=decision.reply_to_after,
        bcc_added=decision.bcc_added,
        dkim=[(k.domain, k.selector) for k in decision.signing],
        upstream=decision.upstream.name,
        policy_version=policy_version,
        subject=subject,
        found_by=decision.identity.source,
        reasons=[r for r in decision.reasons if r != decision.classification.reason],
    )


def rejected(
    *,
    queue_id: str | None,
    message_id: str | None,
    client_address: str,
    auth_login: str | None,
    mail_from: str,
    rcpt_tos: Sequence[str],
    reply: str,
    tenant: str | None = None,
    user: str | None = None,
    found_by: str | None = None,
) -> dict:
    return _build("rejected", **locals())


def rejected_for(
    submission: Submission,
    reply: SmtpReply,
    queue_id: str | None = None,
    message_id: str | None = None,
    identity: Identity | None = None,
) -> dict:
    """``identity``: None for a message refused before its sender was known;
    its tenant is then the session login's, if it logged in: a login's tries
    to send as another tenant's user were on record with no tenant, and the
    search by tenant for what a stolen login tried missed them."""
    return rejected(
        queue_id=queue_id,
        message_id=message_id,
        client_address=submission.client_address,
        auth_login=submission.auth_login,
        mail_from=submission.mail_from,
        rcpt_tos=submission.rcpt_tos,
        reply=reply.line,
        tenant=identity.tenant.id if identity else submission.auth_tenant,
        user=identity.user.id if identity else None,
        found_by=identity.source if identity else None,
    )


def queued(*, queue_id: str, message_id: str | None, recipients: Sequence[str], size: int) -> dict:
    return _build("queued", **locals())


def delivered(
    *,
    queue_id: str,
    message_id: str | None,
    recipient: str,
    upstream: str,
    reply: str,
    attempts: int,
) -> dict:
    return _build("delivered", **locals())


def deferred(
    *,
    queue_id: str,
    message_id: str | None,
    recipient: str,
    reply: str,
    next_attempt: datetime | str,
) -> dict:
    return _build("deferred", **{**locals(), "next_attempt": _time(next_attempt)})


def failed(*, queue_id: str, message_id: str | None, recipient: str, reply: str) -> dict:
    return _build("failed", **locals())


def expired(
    *, queue_id: str, message_id: str | None, recipient: str, reply: str | None = None
) -> dict:
    return _build("expired", **locals())


def suppressed(
    *,
    queue_id: str,
    message_id: str | None,
    recipient: str,
    reason: str,
    since: datetime | str,
) -> dict:
    suppression = {"reason": reason, "since": _time(since)}
    return _build("suppressed", queue_id, message_id, recipient=recipient, suppression=suppression)


def bounced(
    *,
    queue_id: str | None,
    message_id: str | None,
    recipient: str,
    dsn_status: str,
    diagnostic: str | None,
) -> dict:
    return _build("bounced", **locals())


def complained(
    *, queue_id: str | None, message_id: str | None, recipient: str, feedback_type: str
) -> dict:
    return _build("complained", **locals())


def deleted(*, queue_id: str, message_id: str | None, by: str, recipients: Sequence[str]) -> dict:
    return _build("deleted", **locals())


def held(*, queue_id: str, message_id: str | None, by: str) -> dict:
    return _build("held", **locals())


def released(*, queue_id: str, message_id: str | None, by: str) -> dict:
    return _build("released", **locals())


def notified(
    *, queue_id: str, message_id: str | None, recipient: str, notice_queue_id: str
) -> dict:
    return _build("notified", **locals())


def listed(
    *,
    queue_id: str | None,
    message_id: str | None,
    recipient: str,
    reason: str,
    since: datetime | str,
    for_tenant: str | None,
    detail: str,
) -> dict:
    """``for_tenant`` None: the address is listed for every tenant's mail."""
    suppression = {"reason": reason, "since": _time(since)}
    return _build(
        "listed",
        queue_id,
        message_id,
        recipient=recipient,
        suppression=suppression,
        for_tenant=for_tenant,
        detail=detail,
    )


def policy_loaded(*, policy_file: str, policy_sha256: str) -> dict:
    return _build("policy_loaded", None, None, **locals())


def pruned(
    *, files: Sequence[str], through_seq: int, through_hash: str, retention_days: int
) -> dict:
    return _build("pruned", None, None, **locals())
