"""One submitted message through identify, classify, decide, rewrite, sign, spool.

``prepare`` is everything up to the signed bytes and has no side effects,
so ``relay preview`` runs exactly the code the daemon runs. ``Acceptor``
adds the spool and the audit records; delivery is the engine's job.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay import headers, message, ratelimit, rewrite, trace
from relay.audit import AuditError, events
from relay.classify import classify
from relay.decide import Decision, decide
from relay.engine import WARM_MESSAGE, Engine, Warm
from relay.errors import HeaderInjection, Rejected, SigningError, SmtpReply
from relay.groupcommit import GroupCommit
from relay.identify import Identity, identify
from relay.message import MessageView
from relay.policy.model import Policy, sends_as
from relay.queueid import new_queue_id
from relay.ratelimit import Counted, RateRow
from relay.record import Recorder
from relay.sign import sign
from relay.spool import PENDING, SUPPRESSED, QueueEntry, RecipientState, Spool, SpoolError
from relay.submission import Submission, log_refused
from relay.suppression import EMPTY, SuppressionError, SuppressionFile, SuppressionList
from relay.upstream import replies

log = logging.getLogger("relay")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_ToStore = tuple[QueueEntry, tuple[bytes, bytes], list[dict[str, Any]]]  # entry, message, records


@dataclass(frozen=True)
class Prepared:
    queue_id: str
    decision: Decision
    view: MessageView  # the message as submitted
    signature: bytes  # the DKIM-Signature fields, to go first
    rewritten: bytes  # the message with the policy's header edits
    trace: bytes = b""  # the Received field, between the two (as OpenDKIM behind Postfix has it)

    @property
    def chunks(self) -> tuple[bytes, bytes]:
        """The message to send, in pieces: a large one is not copied once more to join them."""
        return self.signature + self.trace, self.rewritten

    @property
    def message(self) -> bytes:
        return self.signature + self.trace + self.rewritten

    @property
    def size(self) -> int:
        return len(self.signature) + len(self.trace) + len(self.rewritten)

    def header(self, name: str) -> str:
        """A header as sent: the policy's new value, else the submitted one."""
        for field_name, value in self.decision.edits.set:
            if field_name.lower() == name.lower():
                return value
        return self.view.get(name) or ""


@dataclass(frozen=True)
class Identified:
    """A message read and its sender known: a refusal from here on names them."""

    view: MessageView
    split: tuple[list[headers.Field], int]
    identity: Identity


def prepare(
    policy: Policy,
    submission: Submission,
    now: datetime | None = None,
    suppressions: SuppressionList = EMPTY,
) -> Prepared:
    return complete(policy, submission, identified(policy, submission), now, suppressions)


def identified(policy: Policy, submission: Submission) -> Identified:
    """``prepare``'s first half, apart so that the audit record of a refusal
    after it can say whose message it was (``Acceptor.process``)."""
    split = headers.split_at(submission.data)  # once: each step below needs it
    _check_header_size(split[1])
    _check_header_block(submission.data, split[1])
    _check_page_breaks(split[0])
    _check_hops(split[0])
    view = message.read(submission.data, split)
    return Identified(view, split, identify(policy, submission, view))


def complete(
    policy: Policy,
    submission: Submission,
    sender: Identified,
    now: datetime | None = None,
    suppressions: SuppressionList = EMPTY,
) -> Prepared:
    """``prepare``'s second half: from the classification to the signed bytes."""
    queue_id = new_queue_id()
    view, split, identity = sender.view, sender.split, sender.identity
    classification = classify(policy.classify, view)
    now = now or datetime.now(UTC)
    decision = decide(
        policy, submission, view, identity, classification, now, queue_id, suppressions
    )
    _check_single_fields(split[0], decision.edits)
    try:
        rewritten = rewrite.apply(submission.data, decision.edits, split)
    except HeaderInjection as exc:
        raise Rejected(550, "5.6.0", f"Header value refused: {exc}") from exc
    try:
        signature = sign(rewritten, decision.signing)
    except SigningError as exc:
        log.error("%s DKIM signing failed: %s", queue_id, exc)
        raise SmtpReply(451, "4.3.0", "DKIM signing failed, try again later") from exc
    eol = headers.line_ending(submission.data)
    received = trace.received(submission, policy.platform.hostname, queue_id, now, eol)
    return Prepared(queue_id, decision, view, signature, rewritten, received)


MAX_HEADER = 262_144


def _check_header_size(body: int) -> None:
    """The policy reads header fields with the email package, whose address
    parser costs about 5 µs a byte on the worker's event loop: a message of 25 MB
    of ``From`` would hold every session of that worker for minutes. The limit
    is Exchange Online's, so a header it takes would pass any smarthost."""
    if body > MAX_HEADER:
        raise Rejected(
            552,
            "5.3.4",
            f"Message header too large: {body} bytes before the first empty line,"
            f" at most {MAX_HEADER}",
        )


def _check_header_block(data: bytes, body: int) -> None:
    """Refuse what the byte-level splitter and a reading parser would see differently.

    A line in the header that is neither a field nor a continuation (an mbox
    ``From `` line, ``Bcc : x``) ends the header for the rewrite but not for
    every reader: a Bcc hidden that way could reach the recipients. So does an
    empty line before the first field (a client's stray CR LF after DATA): the
    whole header, Bcc included, would go out as the body of a message that has
    only the relay's fields. An empty message is refused too: sent, the
    customer got a blank message with only the relay's fields.
    """
    if body < len(data) and not data.startswith((b"\r\n", b"\n"), body):
        end = data.find(b"\n", body)
        line = data[body : len(data) if end < 0 else end].removesuffix(b"\r")
        quoted = repr(line[:_QUOTED])[1:] + ("..." if len(line) > _QUOTED else "")
        raise Rejected(550, "5.6.0", f"Malformed header line: {quoted} ({_why_malformed(line)})")
    if body == 0:  # only then: rstrip copies the message, 25 MB of it at most
        if not data.rstrip(b"\r\n"):
            raise Rejected(550, "5.6.0", "Message is empty: no header field and no body")
        raise Rejected(
            550, "5.6.0", "Message begins with an empty line: its header would be sent as body text"
        )


_QUOTED = 78  # bytes of a malformed header line quoted in the refusal


def _why_malformed(line: bytes) -> str:
    """What makes ``line`` neither a field nor a continuation, for the ERP's
    developer: the quote alone did not say, least of all of a leading space.
    The whole line is judged, not the quote: a long name's colon lies past it."""
    if line[:1] in (b" ", b"\t"):
        return "a continued line before the first header field"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "no colon: not a header field"
    if not name:
        return "no field name before the colon"
    if name[-1:] in (b" ", b"\t"):
        return "white space before the colon"
    return "a field name holds printable ASCII only, no spaces"


HOP_LIMIT = 50  # Received fields a message may carry on arrival: Postfix's hopcount_limit


def _check_hops(fields: list[headers.Field]) -> None:
    """Refuse a message that has been through too many relays: a loop (two
    relays each other's smarthost, or an upstream that hands mail back to this
    one). Without it each round added a Received field and a signature until
    the header limit stopped it, 300 rounds on, with as many deliveries on
    record; the failure notice then went round as often. RFC 5321 6.3 counts
    Received fields for this."""
    hops = sum(1 for field in fields if field.name.lower() == "received")
    if hops >= HOP_LIMIT:
        raise Rejected(
            554,
            "5.4.6",
            f"Too many hops: the message carries {hops} Received header fields,"
            f" at most {HOP_LIMIT - 1}; a mail loop? (RFC 5321 6.3)",
        )


_PAGE_BREAKS = {b"\x0b": "vertical tab", b"\x0c": "form feed"}


def _check_page_breaks(fields: list[headers.Field]) -> None:
    """Refuse a vertical tab or form feed in a header field (left over from a
    print layout). DKIM verifiers read them differently: dkimpy keeps them as
    RFC 6376 says, OpenDKIM takes them for white space, so a signature over
    such a field fails at receivers that run OpenDKIM."""
    for field in fields:
        for char, name in _PAGE_BREAKS.items():
            if char in field.raw:
                raise Rejected(
                    550,
                    "5.6.0",
                    f"A {name} in header field {field.name}: not signable for every"
                    " receiver, remove it",
                )


#: RFC 5322 3.6: the fields a message may have once at most.
_SINGLE_FIELDS = (
    "Date",
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Subject",
)


_REPAIRED = {"date", "message-id"}  # written by decide only when the message's is unusable


def _check_single_fields(fields: list[headers.Field], edits: rewrite.HeaderEdits) -> None:
    """Refuse a message that would go out with two of a field RFC 5322 allows once.

    Gmail refuses such a message (550 5.7.1, "not RFC 5322 compliant:
    duplicate headers"), so the ERP would hear of it only from a failure
    notice, later; readers also differ on which of two Subjects or Dates to
    show. A field the policy writes (From, Reply-To) or removes (Bcc,
    Sender) goes out once or not at all, whatever the message had. A Date or
    Message-ID the relay repairs is the message's own: a second one is
    refused as ever, not dropped for the repaired first.
    """
    edited = {name.lower() for name in edits.remove}
    edited.update(name.lower() for name, _ in edits.set)
    edited -= _REPAIRED
    counts = collections.Counter(field.name.lower() for field in fields)
    twice = [
        f"{name} ({counts[name.lower()]} times)"
        for name in _SINGLE_FIELDS
        if counts[name.lower()] > 1 and name.lower() not in edited
    ]
    if twice:
        raise Rejected(
            550,
            "5.6.0",
            f"Header fields allowed once appear more often: {', '.join(twice)};"
            " receivers such as Gmail refuse such a message (RFC 5322 3.6)",
        )


REMOVAL_RETRY = 1.0  # seconds before a refused message the spool kept is removed again
REMOVAL_RETRY_MAX = 300.0
LIMIT_WARNING_EVERY = 3600.0  # seconds between warnings of one tenant's rate limit
UNCOUNTED_ERROR_EVERY = 60.0  # seconds between errors of one tenant's count not kept


class Acceptor:
    """The receiving side's last step: spool, audit, then the 250.

    A message is answered 250 only when it is in the spool and its
    ``received`` and ``queued`` records are in the audit log, both fsynced;
    if either write fails the client gets 451 and nothing is kept. Until the
    answer is decided the entry's lock is held (other worker processes'
    engines see the spool too) and this process's engine is told to keep
    its hands off, so a message refused here can never be delivered anyway.
    """

    def __init__(
        self,
        spool: Spool,
        engine: Engine,
        recorder: Recorder,
        alone: Callable[[], bool] | None = None,
        suppressions: SuppressionFile | None = None,
        rates: RateRow | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        # for the rate counts: a wall clock set back an hour emptied the hour
        # (its minutes were later than the clock's), a day forward ahead held it
        self.clock = clock
        self.engine = engine
        self.recorder = recorder
        self.suppressions = suppressions
        self.rates = rates
        # ``alone``: a lone session's message is written on the event loop
        self._store = GroupCommit(self._store_many, "accept", inline=alone)
        self._unremoved: set[str] = set()  # refused, but still in the spool
        self._limit_warned: dict[str, float] = {}  # tenant -> its limit's last warning
        self._uncounted_said: dict[str, float] = {}  # tenant -> its last uncounted error
        self._removals: set[asyncio.Task[None]] = set()

    async def process(self, policy: Policy, submission: Submission) -> str:
        try:
            sender = identified(policy, submission)
        except SmtpReply as reply:
            await self._rejected(submission, reply)
            raise
        try:
            prepared = complete(policy, submission, sender, suppressions=self._suppressions())
        except SmtpReply as reply:
            await self._rejected(submission, reply, sender.identity)
            raise
        entry = _entry(prepared, submission)
        now = self.clock()
        taken = await self._take(policy, submission, prepared.decision, now)
        self.engine.accepting.add(entry.queue_id)
        try:
            try:
                await self._keep(policy, submission, prepared, entry)
            except BaseException:
                self._give_back(taken, now)
                raise
            lock = self.spool.detach(entry.queue_id)
        finally:
            if entry.queue_id in self._unremoved:
                self._remove_later(entry.queue_id)
            else:
                self.spool.release(entry.queue_id)
                self.engine.accepting.discard(entry.queue_id)
        log.info(
            "%s: client=%s login=%s from=<%s> tenant=%s user=%s found_by=%s type=%s rule=%s"
            " size=%d nrcpt=%d bcc=%s dkim=%s relay=%s queued",
            entry.queue_id,
            submission.client_address,
            submission.auth_login or "-",
            submission.mail_from,
            entry.tenant,
            entry.user,
            prepared.decision.identity.source,
            entry.doc_type,
            prepared.decision.classification.rule or "-",
            entry.size,
            len(entry.recipients),
            ",".join(f"<{r}>" for r in prepared.decision.bcc_added) or "-",
            ",".join(f"{k.domain}/{k.selector}" for k in prepared.decision.signing) or "none",
            entry.upstream,
        )
        for rcpt in entry.recipients:
            if rcpt.status == SUPPRESSED:
                self.recorder.suppressed(entry, rcpt.address, rcpt.reply or "")
        self.engine.submit(entry.queue_id, warm=_warm(lock, entry, prepared))
        listener = next((x for x in policy.listeners if x.name == submission.listener), None)
        if listener is not None and listener.immediate > 0:
            try:
                return await self._immediate(entry, listener.immediate, submission.hung_up)
            except SmtpReply as refusal:  # the upstream refused it, and the ERP is told: not sent
                self._give_back(taken, now)
                said = f"{refusal.line} (the upstream's refusal, passed back: not sent, not kept)"
                log_refused(submission, said, entry.queue_id)
                raise
        return f"250 2.0.0 Ok: queued as {entry.queue_id}"

    async def _take(
        self, policy: Policy, submission: Submission, decision: Decision, now: float
    ) -> tuple[int, Counted] | None:
        """The message's recipients counted for its tenant and where (to give them
        back: ``RateRow.give_back``), None when not counted; or it refused
        (``ratelimit.refusal``): counted here, where the suppression list has
        been read (``ratelimit.counted``). Every tenant's are counted, limited
        or not: a limit a reload brings in, when a login is found stolen, then
        holds the hour already sent against it. A limited tenant this worker
        has no room to count is refused (``ratelimit.uncounted``): let through,
        it sent past its limit unseen."""
        tenant_id = decision.identity.tenant.id
        tenant = policy.tenants.get(tenant_id)
        if tenant is None or self.rates is None:
            return None
        wanted = ratelimit.counted(submission.rcpt_tos, (a for a, _ in decision.suppressed))
        limited = tenant.recipients_per_hour is not None
        if limited:
            reply = ratelimit.refusal(tenant, wanted, self.rates.sent(tenant_id, now))
            if reply is not None:
                if reply.code < 500:  # the hour full; a 550 is one message over any hour's limit
                    self._warn_of_limit(tenant_id, tenant.recipients_per_hour, now)
                await self._rejected(submission, reply, decision.identity)
                raise reply
        where = self.rates.add(tenant_id, wanted, now)
        if where is not None:
            return wanted, where
        if limited:
            self._say_uncounted(tenant_id, self.rates.slots, now)
            reply = ratelimit.uncounted(tenant)
            await self._rejected(submission, reply, decision.identity)
            raise reply
        return None

    def _warn_of_limit(self, tenant_id: str, limit: int, now: float) -> None:
        """The limit is the brake on a stolen login (README): its first refusal of
        a tenant is a WARNING, for ``journalctl -p warning``, then not again for
        an hour in this worker, as an ERP that retries would flood it; each
        refusal has its own INFO line."""
        if not _due(self._limit_warned, tenant_id, LIMIT_WARNING_EVERY, now):
            return
        log.warning(
            "tenant %s reached its recipients_per_hour limit of %d: its mail is refused"
            " while the hour is full (a stolen login?); said once an hour, each refusal"
            " is logged",
            tenant_id,
            limit,
        )

    def _say_uncounted(self, tenant_id: str, slots: int, now: float) -> None:
        """A limit the relay cannot keep is the sysadmin's to fix while it lasts: said
        again each minute, not once a process as a full table was."""
        if not _due(self._uncounted_said, tenant_id, UNCOUNTED_ERROR_EVERY, now):
            return
        log.error(
            "tenant %s: no room to count its recipients in this worker's rate-limit table"
            " of %d tenants, sized at the start from the policy's limited tenants: its mail"
            " is refused (451) while its limit cannot be kept; restart the relay to make room"
            " for the limited tenants a reload added; said once a minute, each refusal is"
            " logged",
            tenant_id,
            slots,
        )

    def _give_back(self, taken: tuple[int, Counted] | None, when: float) -> None:
        """To the minute they were counted in (``when``): given to the minute of
        now, a give-back past a minute's end found nothing there to take from,
        and the tenant was held to a message the upstream had refused."""
        if taken is not None and self.rates is not None:
            count, where = taken
            self.rates.give_back(count, when, where)

    def _suppressions(self) -> SuppressionList:
        """The list as it is now; one that cannot be read refuses the message for
        now, as sending it to an address that bounced or complained is what the
        list is there to prevent."""
        if self.suppressions is None:
            return EMPTY
        try:
            return self.suppressions.current()
        except SuppressionError as exc:
            log.error("%s", exc)
            raise SmtpReply(451, "4.3.0", "Suppression list unreadable, try again later") from exc

    async def _keep(
        self, policy: Policy, submission: Submission, prepared: Prepared, entry: QueueEntry
    ) -> None:
        subject = prepared.view.subject if policy.audit.record_subject else None
        records = [
            events.received_for(
                entry.queue_id,
                entry.message_id,
                submission,
                prepared.decision,
                len(submission.data),  # as received; ``queued`` has it as sent
                policy.digest,
                subject,
            ),
            events.queued(
                queue_id=entry.queue_id,
                message_id=entry.message_id,
                recipients=[r.address for r in entry.pending()],
                size=entry.size,
            ),
            *(
                events.suppressed(
                    queue_id=entry.queue_id,
                    message_id=entry.message_id,
                    recipient=address,
                    reason=suppression.reason,
                    since=suppression.since,
                )
                for address, suppression in prepared.decision.suppressed
            ),
        ]
        try:
            await self._store((entry, prepared.chunks, records))
        except SpoolError as exc:
            log.error("%s: cannot write to the spool: %s", entry.queue_id, exc)
            reply = _write_failed(exc, "Queue write failed, try again later")
            await self._rejected(submission, reply, prepared.decision.identity)
            raise reply from exc
        except AuditError as exc:
            log.error("%s: cannot write the audit log: %s", entry.queue_id, exc)
            reply = _write_failed(exc, "Audit log write failed, try again later")
            await self._rejected(submission, reply, prepared.decision.identity)
            raise reply from exc
        except asyncio.CancelledError:
            # stored and recorded as queued, but no 250 went out: it is
            # delivered all the same (at least once), so the audit log says how it ended
            self.engine.submit(entry.queue_id)
            raise

    def _store_many(self, items: list[_ToStore]) -> list[Exception | None]:
        """The spool, then the audit records, for a batch in one trip to the writing thread.

        Only entries that are in the spool get their records; if the records
        cannot be written, those entries are taken out again: no message is
        kept that the audit log does not name.
        """
        failures: list[Exception | None] = list(
            self.spool.put_many([(entry, chunks) for entry, chunks, _ in items], hold=True)
        )
        stored = [i for i, failure in enumerate(failures) if failure is None]
        try:
            self.recorder.write([record for i in stored for record in items[i][2]])
        except AuditError as exc:
            left = self.spool.remove_many([items[i][0].queue_id for i in stored])
            for i, kept in zip(stored, left, strict=True):
                failures[i] = exc
                if kept is not None:
                    log.error(
                        "%s: refused, but not removed (kept locked, never delivered,"
                        " removed when the spool lets it): %s",
                        items[i][0].queue_id,
                        kept,
                    )
                    self._unremoved.add(items[i][0].queue_id)
            return failures
        try:  # that fsync may have covered delivered entries' records: see Engine.remove_covered
            self.engine.remove_covered()
        except Exception as exc:  # this batch is stored and on record: nothing here may fail it
            log.error("cannot remove delivered messages from the queue: %r", exc)
        return failures

    def _remove_later(self, queue_id: str) -> None:
        task = asyncio.ensure_future(self._removal(queue_id))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _removal(self, queue_id: str) -> None:
        """A refused message the spool would not let go of (EIO, a file system
        gone read-only): its lock stays held and the engine keeps off it until
        it is removed, tried again with growing pauses. Let go, the engine's
        next scan delivered it, a message its client was told 451 for, with
        no record in the audit log. If the relay stops first, the restart
        removes it as never acknowledged."""
        pause = REMOVAL_RETRY
        while True:
            await asyncio.sleep(pause)
            (left,) = await asyncio.to_thread(self.spool.remove_many, [queue_id])
            if left is None:
                break
            pause = min(pause * 2, REMOVAL_RETRY_MAX)
        log.info("%s: the refused message is out of the queue", queue_id)
        self._unremoved.discard(queue_id)
        self.spool.release(queue_id)
        self.engine.accepting.discard(queue_id)

    async def _immediate(
        self, entry: QueueEntry, wait: float, hung_up: asyncio.Event | None
    ) -> str:
        """Wait a little for the first attempt, for ERPs that show the server's answer.

        Not once the relay stops: the message is queued, and a client still
        waiting when the stop's grace ends is told 421, which reads as not
        accepted, and sends it again. Nor for a client that has hung up (one
        that sent QUIT behind its data and closed): a refusal it never reads
        would be the only word of it, so its sender is sent a notice instead."""
        queued = f"250 2.0.0 Ok: queued as {entry.queue_id}"
        if hung_up is not None and hung_up.is_set():
            return queued
        task = self.engine.attempt_now(entry.queue_id, immediate=True, hung_up=hung_up)
        ends = [asyncio.ensure_future(self.engine.winding_down.wait())]
        if hung_up is not None:
            ends.append(asyncio.ensure_future(hung_up.wait()))
        try:
            await asyncio.wait((task, *ends), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
        if task.done():
            outcome = task.result()
        elif self.engine.answered(entry.queue_id, task):
            return queued
        else:
            outcome = await asyncio.shield(task)  # its refusal is on its way back
        if outcome.status == "refused":
            code = int(outcome.reply[:3]) if outcome.reply[:3].isdigit() else 550
            raise replies.refusal(code, outcome.reply[4:])
        return queued

    async def _rejected(
        self, submission: Submission, reply: SmtpReply, identity: Identity | None = None
    ) -> None:
        said = reply.line if reply.note is None else f"{reply.line} ({reply.note})"
        log_refused(submission, said)
        await self.refused(submission, reply, identity)

    async def refused(
        self, submission: Submission, reply: SmtpReply, identity: Identity | None = None
    ) -> None:
        """A refused message on record (the pipeline's refusals, and the SMTP
        side's of content no upstream should see: bare line ends, NUL, long lines).
        ``identity``: whose it was, once identified, so that a search by tenant
        finds what a stolen login tried past the limit; before that, the tenant
        of the session's login (``events.rejected_for``)."""
        message_id = _given_message_id(submission.data)
        record = events.rejected_for(submission, reply, message_id=message_id, identity=identity)
        self.recorder.add(record)
        try:
            await self.recorder.flush(None)
        except AuditError as exc:
            log.error("cannot write the audit log: %s", exc)


def _due(said: dict[str, float], tenant_id: str, every: float, now: float) -> bool:
    """Whether a line about the tenant is due: none in the last ``every`` seconds."""
    last = said.get(tenant_id)
    if last is not None and now - last < every:
        return False
    said[tenant_id] = now
    return True


def _given_message_id(data: bytes) -> str | None:
    """The refused message's own Message-ID, as written, so that the ERP's ID
    finds its refusal in ``relay audit search --message-id``; read from the
    raw fields, as a refused message may be one the parser would not take."""
    fields, _ = headers.split_at(data[: MAX_HEADER + 1])
    for field in fields:
        if field.name.lower() == "message-id":
            value = field.raw.split(b":", 1)[1].decode("utf-8", "replace")
            return " ".join(value.split())[:998] or None
    return None


def _write_failed(exc: Exception, text: str) -> SmtpReply:
    """``451 4.3.0``, or for a full disk or quota the ``452 4.3.1`` that says
    so (RFC 3463: mail system full), as Postfix answers when space runs out."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return SmtpReply(452, "4.3.1", "Insufficient system storage, try again later")
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return SmtpReply(451, "4.3.0", text)


def _warm(lock: int | None, entry: QueueEntry, prepared: Prepared) -> Warm | None:
    """The entry as the engine would read it back, for the engine to keep if it can:
    only small messages are joined into one buffer here."""
    if lock is None:
        return None
    if prepared.size > WARM_MESSAGE:
        os.close(lock)
        return None
    return Warm(lock, entry, prepared.message)


def _entry(prepared: Prepared, submission: Submission) -> QueueEntry:
    decision = prepared.decision
    told = decision.sender_told
    now = time.time()
    suppressed = [
        RecipientState(
            address, SUPPRESSED, notify=told(address), reply=f"not sent: {entry.describe()}"
        )
        for address, entry in decision.suppressed
    ]
    return QueueEntry(
        queue_id=prepared.queue_id,
        arrival=now,
        mail_from=decision.mail_from,
        recipients=[
            *(
                RecipientState(address, PENDING, notify=told(address))
                for address in decision.recipients
            ),
            *suppressed,
        ],
        upstream=decision.upstream.name,
        tenant=decision.identity.tenant.id,
        user=decision.identity.user.id,
        notify_address=decision.identity.user.address,
        doc_type=decision.classification.doc_type,
        subject=prepared.view.subject,
        # unfolded, as the reports about it quote it: " <id>" found no bounce
        message_id=" ".join(prepared.header("Message-ID").split()),
        date=prepared.header("Date"),
        size=prepared.size,
        client_address=submission.client_address,
        auth_login=submission.auth_login,
        next_attempt=now,
        sends_as=sends_as(decision.upstream),
    )
