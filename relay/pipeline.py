"""One submitted message through identify, classify, decide, rewrite, sign, deliver.

``prepare`` is everything up to the signed bytes and has no side effects,
so ``relay preview`` runs exactly the code the daemon runs. ``process`` adds
delivery and the one log line per message a sysadmin greps for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from relay import message, rewrite
from relay.classify import classify
from relay.decide import Decision, decide
from relay.deliver import deliver
from relay.errors import HeaderInjection, Rejected, SigningError, SmtpReply
from relay.identify import identify
from relay.policy.model import Policy
from relay.queueid import new_queue_id
from relay.sign import sign
from relay.submission import Submission

log = logging.getLogger("relay")


@dataclass(frozen=True)
class Prepared:
    queue_id: str
    decision: Decision
    message: bytes  # rewritten and signed, ready to send


def prepare(policy: Policy, submission: Submission, now: datetime | None = None) -> Prepared:
    queue_id = new_queue_id()
    view = message.read(submission.data)
    identity = identify(policy, submission, view)
    classification = classify(policy.classify, view)
    decision = decide(
        policy, submission, view, identity, classification, now or datetime.now(UTC), queue_id
    )
    try:
        rewritten = rewrite.apply(submission.data, decision.edits)
    except HeaderInjection as exc:
        raise Rejected(550, "5.6.0", f"Header value refused: {exc}") from exc
    try:
        signature = sign(rewritten, decision.signing)
    except SigningError as exc:
        log.error("%s DKIM signing failed: %s", queue_id, exc)
        raise SmtpReply(451, "4.3.0", "DKIM signing failed, try again later") from exc
    return Prepared(queue_id, decision, signature + rewritten)


async def process(policy: Policy, submission: Submission) -> str:
    try:
        prepared = prepare(policy, submission)
    except SmtpReply as reply:
        log.info(
            "rejected client=%s login=%s from=<%s> reply=%r",
            submission.client_address,
            submission.auth_login or "-",
            submission.mail_from,
            reply.line,
        )
        raise
    decision = prepared.decision
    try:
        result = await deliver(
            decision.upstream, decision.mail_from, decision.recipients, prepared.message
        )
    except SmtpReply as reply:
        _log_delivery(prepared, "deferred" if reply.code < 500 else "bounced", reply.line)
        raise
    _log_delivery(prepared, "sent", result.reply)
    for rcpt, reason in result.refused.items():
        log.info("%s to=<%s> status=bounced reply=%r", prepared.queue_id, rcpt, reason)
    return f"250 2.0.0 Ok: queued as {prepared.queue_id}"


def _log_delivery(prepared: Prepared, status: str, reply: str) -> None:
    d = prepared.decision
    log.info(
        "%s tenant=%s user=%s login=%s type=%s rule=%s to=%s bcc=%s dkim=%s relay=%s"
        " size=%d status=%s reply=%r",
        prepared.queue_id,
        d.identity.tenant.id,
        d.identity.user.id,
        d.identity.login or "-",
        d.classification.doc_type,
        d.classification.rule or "-",
        ",".join(f"<{r}>" for r in d.recipients),
        ",".join(f"<{r}>" for r in d.bcc_added) or "-",
        ",".join(f"{k.domain}/{k.selector}" for k in d.signing) or "none",
        d.upstream.name,
        len(prepared.message),
        status,
        reply,
    )
