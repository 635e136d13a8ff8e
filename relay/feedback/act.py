"""What the relay does with a bounce or a complaint that came back.

The report names the original message by its Message-ID; the audit log's
``received`` record of that message says whose document it was (tenant,
user) and to whom it went. Then, for each recipient the report is about:
a ``bounced`` or ``complained`` record on that message, so that its
timeline ends where it really ended; the address on the suppression list
for the tenant whose mail it was; and the sending user told, through a notice queued like the
relay's own failure notices, which the running relay delivers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from relay.audit import events, search
from relay.feedback.report import BOUNCE, DEFAULT_RECIPIENTS, Failure, Report
from relay.notice import build_notice
from relay.policy.model import Policy
from relay.quantity import quantity
from relay.queueid import queue_id_time
from relay.record import Recorder
from relay.spool import DELIVERED, FAILED, QueueEntry, RecipientState, Spool
from relay.suppression import BOUNCE as BOUNCED
from relay.suppression import COMPLAINT, Suppression, SuppressionFile, SuppressionList, now
from relay.suppression.entry import Key
from relay.suppression.store import listed_for

LOOKBACK_DAYS = 30  # a complaint may come weeks later; a bounce within the queues' lifetimes
PERMANENT_UNKNOWN = "5.0.0"  # RFC 3463: a permanent failure the report gives no code for
_USERS_OWN = (
    "the relay's notices and copies are the user's; a mailbox really gone is taken"
    " out of the policy"
)


@dataclass(frozen=True)
class Original:
    """The message a report is about, as its ``received`` record has it."""

    queue_id: str
    message_id: str | None
    tenant: str
    user: str
    mail_from: str
    recipients: tuple[str, ...]  # the ERP's
    bcc: tuple[str, ...]  # the relay's automatic copy to the sender
    doc_type: str
    time: str
    subject: str | None
    # recipients the log already has as not delivered (failed, expired, suppressed, bounced)
    not_delivered: frozenset[str] = frozenset()
    # those of them no server ever took it for (failed, expired, suppressed)
    never_reached: frozenset[str] = frozenset()
    # recipients the log already has this kind of report about, and those of
    # them no notice has followed yet (a report taken again: a mail system's
    # retry after exit 75, or the same report delivered twice)
    reported: frozenset[str] = frozenset()
    untold: frozenset[str] = frozenset()

    def sent_to(self, address: str) -> bool:
        return address.lower() in {r.lower() for r in (*self.recipients, *self.bcc)}

    def spelt(self, address: str) -> str:
        """The address as the message went to it: a report may spell it in
        another case, and its records would then stand apart from the
        message's own in the log."""
        lowered = address.lower()
        return next((r for r in (*self.recipients, *self.bcc) if r.lower() == lowered), address)

    def reached(self) -> tuple[str, ...]:
        """The mailboxes the message may have reached, the sender's automatic
        copy among them (a complaint may be about that copy): not those it was
        never sent to (suppressed, refused, expired) or that bounced."""
        mailboxes: dict[str, str] = {}
        for address in (*self.recipients, *self.bcc):
            mailboxes.setdefault(address.lower(), address)
        return tuple(a for low, a in mailboxes.items() if low not in self.not_delivered)


@dataclass
class Outcome:
    """What was done, a line each, for the command's output; ``candidates`` the
    messages of several tenants a report could be about (then nothing is done);
    ``warnings`` the lines the system log has as warnings."""

    original: Original | None
    lines: list[str] = field(default_factory=list)
    candidates: tuple[Original, ...] = ()
    warnings: set[str] = field(default_factory=set)

    def warn(self, line: str) -> None:
        self.lines.append(line)
        self.warnings.add(line)


class Ambiguous(Exception):
    """Messages of more than one tenant have the report's Message-ID, and the
    report names none of them by queue ID; ``records``: those of the ID."""

    def __init__(self, candidates: list[Original], records: list[dict[str, Any]]) -> None:
        super().__init__(", ".join(f"{o.queue_id} ({o.tenant}/{o.user})" for o in candidates))
        self.candidates = tuple(candidates)
        self.records = records


def find_original(directory: Path, report: Report, today: date | None = None) -> Original | None:
    """The message with the queue ID the report returns as its envelope ID (sent
    as ENVID to servers that offer DSN) or in the relay's Received field of the
    header it returns; else the newest with the report's Message-ID that went
    to one of its recipients (an ERP may send one document twice, to others
    the second time), else the newest with that ID (a complaint's recipient
    may be redacted); None when the log has none within ``LOOKBACK_DAYS``.
    Raises Ambiguous when those with the Message-ID are of several tenants:
    two companies' ERPs may number their documents alike, and one's bounce
    or complaint must not be charged to, nor told to, the other."""
    since = _since(today)
    found: list[Original] = []
    records: list[dict[str, Any]] = []
    for named_id in (report.envelope_id or "", *report.queue_ids):
        queue_id = named_id.strip().upper()
        if queue_id_time(queue_id) is None:
            continue
        records = search.show(directory, queue_id, since=since)
        found = [o for o in map(_original, records) if o is not None and o.queue_id == queue_id]
        if found:
            break
    if not found and _names_message(report.message_id):
        records = search.show(directory, report.message_id, since=since)
        found = [o for o in map(_original, records) if o is not None]
    if not found:
        return None
    found = [_with_outcomes(o, records, report) for o in found]
    named = [o for o in found if any(o.sent_to(f.recipient) for f in report.failures)]
    # a document sent again under its Message-ID (or another tenant's with the
    # same ID), refused for the recipient: the report is about the copy that
    # reached it, not the newest
    reached = [o for o in named if any(_reached(o, f.recipient) for f in report.failures)]
    candidates = reached or named or found
    if len({o.tenant for o in candidates}) > 1:
        raise Ambiguous(candidates, records)
    return candidates[-1]


def _since(today: date | None = None) -> date:
    return (today or datetime.now(UTC).date()) - timedelta(days=LOOKBACK_DAYS)


def _event(report: Report) -> str:
    return "bounced" if report.kind == BOUNCE else "complained"


def _names_message(message_id: object) -> bool:
    return bool(str(message_id or "").strip("<> \t"))


def _with_outcomes(original: Original, records: list[dict[str, Any]], report: Report) -> Original:
    """What the audit log says already of ``original``'s recipients."""
    mine = [
        r
        for r in records
        if r.get("queue_id") == original.queue_id and isinstance(r.get("recipient"), str)
    ]
    reported = {
        r["recipient"].lower(): r.get("seq") or 0 for r in mine if r.get("event") == _event(report)
    }
    told = max((r.get("seq") or 0 for r in mine if r.get("event") == "notified"), default=-1)
    failed = {r["recipient"].lower(): r["event"] for r in mine if r.get("event") in _NOT_DELIVERED}
    return dataclasses.replace(
        original,
        not_delivered=frozenset(failed),
        never_reached=frozenset(a for a, event in failed.items() if event != "bounced"),
        reported=frozenset(reported),
        untold=frozenset(a for a, seq in reported.items() if seq > told),
    )


def _reached(original: Original, address: str) -> bool:
    """A bounce after the server took it counts as reached: a report taken again
    must find the copy its first taking recorded."""
    return original.sent_to(address) and address.lower() not in original.never_reached


_NOT_DELIVERED = ("failed", "expired", "suppressed", "bounced")


def _original(record: dict[str, Any]) -> Original | None:
    if record.get("event") != "received":
        return None
    try:
        return Original(
            queue_id=record["queue_id"],
            message_id=record.get("message_id"),
            tenant=record["tenant"],
            user=record["user"],
            mail_from=record.get("mail_from") or "",
            recipients=tuple(record.get("rcpt_tos", ())),
            bcc=tuple(record.get("bcc_added", ())),
            doc_type=record.get("doc_type") or "",
            time=record["time"],
            subject=record.get("subject"),
        )
    except (KeyError, TypeError):
        return None


def act(
    policy: Policy,
    report: Report,
    recorder: Recorder,
    suppressions: SuppressionFile,
    spool: Spool,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """Record, suppress, tell; raises AuditError, SuppressionError or SpoolError
    when the state cannot take it (the mail system then tries again later).
    The list comes first (a line written twice is harmless, an address left
    off is mailed again), then the records, then the notice: a retry after a
    failed write must not tell the sender twice.

    A report is acted on for as many recipients as one message of the relay's
    goes to (``most_recipients``), the rest said in one line: one forged
    report naming 20,000 wrote as many records into the audit log, kept for
    years, and as many lines into the system log."""
    most = most_recipients(policy)
    bounded = dataclasses.replace(report, failures=report.failures[:most])
    outcome = _act(policy, bounded, recorder, suppressions, spool, clock)
    beyond = max(len(report.failures) - most, 0) + report.unread
    if beyond > 0:
        outcome.warn(
            f"{quantity(beyond, 'more recipient')} not acted on: a report is taken for at most"
            f" {most}, as many as one message goes to"
        )
    return outcome


def most_recipients(policy: Policy) -> int:
    """The most recipients one message of the relay's has: the listeners' largest
    ``max_recipients``, and the sender's automatic copy."""
    most = max((listener.max_recipients for listener in policy.listeners), default=None)
    return (most or DEFAULT_RECIPIENTS) + 1


def _act(
    policy: Policy,
    report: Report,
    recorder: Recorder,
    suppressions: SuppressionFile,
    spool: Spool,
    clock: Callable[[], float],
) -> Outcome:
    try:
        original = find_original(policy.audit.directory, report)
    except Ambiguous as exc:
        return _by_recipient(policy, report, recorder, suppressions, spool, clock, exc)
    outcome = Outcome(original)
    named = _failures(report, original, outcome.lines)
    failures = _not_own(policy, named)
    if not failures:
        outcome.lines.append(_nobody(named, original))
        return outcome
    new, untold = _new(policy.audit.directory, report, failures, original, outcome.lines)
    listed = suppressions.current()
    again = _listed_before(suppressions, listed, report, new, original)
    entries = [_entry(policy, report, failure, original, listed, again) for failure in new]
    entries = _add(suppressions, entries, again)
    queue_id = original.queue_id if original is not None else None
    message_id = original.message_id if original is not None else report.message_id
    for failure, entry in zip(new, entries, strict=True):
        recorder.add(_record(report, failure, queue_id, message_id))
        if isinstance(entry, Suppression):
            recorder.listed(entry, message_id)
        said = _said(report, failure, entry)
        if original is not None and _policy_user(policy, original, failure.recipient):
            outcome.warn(said)
        else:
            outcome.lines.append(said)
    recorder.flush_sync(queue_id)
    if new or untold:
        told = _tell(policy, report, (*new, *untold), original, recorder, spool, clock, listed)
        outcome.lines.append(told)
    recorder.flush_sync(queue_id)
    return outcome


def _by_recipient(
    policy: Policy,
    report: Report,
    recorder: Recorder,
    suppressions: SuppressionFile,
    spool: Spool,
    clock: Callable[[], float],
    ambiguous: Ambiguous,
) -> Outcome:
    """A report about a Message-ID messages of several tenants share is acted on
    for each recipient only one tenant's messages went to, as about the one
    that went to it; the others are on record with no queue ID
    (``_unattributed``). A recipient several messages went to held up the
    others: a dead address only one company mailed was not listed."""
    mine: dict[str, list[Failure]] = {}
    left: dict[Failure, tuple[Original, ...]] = {}
    for failure in report.failures:
        try:
            found = find_original(
                policy.audit.directory, dataclasses.replace(report, failures=(failure,))
            )
        except Ambiguous as several:
            left[failure] = several.candidates
            continue
        if found is None:
            left[failure] = ()
        else:
            mine.setdefault(found.queue_id, []).append(failure)
    outcome = _unattributed(policy, report, left, recorder, ambiguous)
    for failures in mine.values():
        part = _act(
            policy,
            dataclasses.replace(report, failures=tuple(failures)),
            recorder,
            suppressions,
            spool,
            clock,
        )
        if part.original is not None:
            about = part.original
            named = ", ".join(f.recipient for f in failures)
            outcome.lines.append(
                f"{named}: only {about.queue_id} ({about.tenant}/{about.user}) went there:"
            )
        outcome.lines.extend(f"  {line}" for line in part.lines)
        outcome.warnings.update(f"  {line}" for line in part.warnings)
    return outcome


def _unattributed(
    policy: Policy,
    report: Report,
    failures: dict[Failure, tuple[Original, ...]],
    recorder: Recorder,
    ambiguous: Ambiguous,
) -> Outcome:
    """On record with no queue ID, as a report about a message the log does not
    have is: an auditor looking for the recipient finds that it bounced or
    complained, and the command's output says which messages it may be about.
    Nobody is listed or told; as for a message found, a recipient none of them
    went to or reached, and one recorded so before (the report delivered
    again), is not recorded. Each recipient's own candidates decide: those the
    whole report found may not be the ones that went to it."""
    lines = [
        "messages of more than one tenant have this Message-ID, and the report names"
        f" none of them by queue ID: {ambiguous}"
    ]
    before = _recorded_without_queue_id(ambiguous.records, report)
    for failure in _not_own(policy, tuple(failures)):
        candidates = failures[failure]
        if not any(o.sent_to(failure.recipient) for o in candidates):
            lines.append(f"{failure.recipient}: not recorded: none of its messages went to it")
        elif not any(_reached(o, failure.recipient) for o in candidates):
            lines.append(f"{failure.recipient}: not recorded: none of its messages reached it")
        elif failure.recipient.lower() in before:
            lines.append(f"{failure.recipient}: {_RECORDED_WITHOUT_QUEUE_ID}")
        else:
            recorder.add(_record(report, failure, None, report.message_id))
            lines.append(
                f"{failure.recipient}: not acted on, as more than one of them went there:"
                " recorded with no queue ID, not suppressed"
            )
    recorder.flush_sync(None)
    return Outcome(None, lines, ambiguous.candidates)


_RECORDED_WITHOUT_QUEUE_ID = "already recorded with no queue ID"


def _recorded_without_queue_id(records: list[dict[str, Any]], report: Report) -> frozenset[str]:
    """The recipients among ``records`` (those of the report's Message-ID) with
    this kind of report on record and no queue ID: a report about a message
    the log does not have, or that several tenants' messages share, taken
    before (a mail system's retry, or the same report delivered twice)."""
    event = _event(report)
    return frozenset(
        r["recipient"].lower()
        for r in records
        if r.get("event") == event and not r.get("queue_id") and isinstance(r.get("recipient"), str)
    )


def _not_own(policy: Policy, failures: tuple[Failure, ...]) -> tuple[Failure, ...]:
    own = {policy.platform.return_path.lower(), policy.platform.from_address.lower()}
    return tuple(f for f in failures if f.recipient.lower() not in own)


def _new(
    directory: Path,
    report: Report,
    failures: tuple[Failure, ...],
    original: Original | None,
    lines: list[str],
) -> tuple[tuple[Failure, ...], tuple[Failure, ...]]:
    """The failures to record, and those recorded before whose notice is still to
    go. A report about someone its message did not go to (forged, or a forward's
    address) is no part of that message's story, nor one about a recipient the
    message never reached (a forged report, read as "accepted, then returned",
    told its sender a second time, and wrongly); one taken before is not
    recorded, listed or told again. Each is returned as its message spelt it."""
    if original is None:
        return _not_recorded_yet(directory, report, failures, lines), ()
    new: list[Failure] = []
    untold: list[Failure] = []
    for failure in failures:
        address = failure.recipient.lower()
        if not original.sent_to(address):
            lines.append(f"{failure.recipient}: not recorded: its message did not go to it")
        elif address in original.reported:
            lines.append(f"{failure.recipient}: already recorded")
            if address in original.untold:
                untold.append(dataclasses.replace(failure, recipient=original.spelt(address)))
        elif address in original.never_reached:
            # refused at delivery, expired or suppressed: no server took it, so no
            # report can come back about it, and its sender was told then
            lines.append(f"{failure.recipient}: not recorded: its message never reached it")
        else:
            new.append(dataclasses.replace(failure, recipient=original.spelt(address)))
    return tuple(new), tuple(untold)


def _not_recorded_yet(
    directory: Path, report: Report, failures: tuple[Failure, ...], lines: list[str]
) -> tuple[Failure, ...]:
    """The failures of a report about a message the log does not have that are
    not on record yet: taken again, each run added a record with no queue ID."""
    before = _recorded_without_queue_id(_unknown_message_records(directory, report), report)
    for failure in failures:
        if failure.recipient.lower() in before:
            lines.append(f"{failure.recipient}: {_RECORDED_WITHOUT_QUEUE_ID}")
    return tuple(f for f in failures if f.recipient.lower() not in before)


def _unknown_message_records(directory: Path, report: Report) -> list[dict[str, Any]]:
    """The records of the report's Message-ID. A report that names none (a bounce
    cut short before the header it returns) is recorded each time it is taken:
    known by its recipient, a second, genuine report about another message
    was taken for it, and left no trace."""
    if _names_message(report.message_id):
        return search.show(directory, str(report.message_id), since=_since())
    return []


def _nobody(named: tuple[Failure, ...], original: Original | None) -> str:
    if named:
        return "names only the platform's own addresses, which are never suppressed"
    if original is None:
        return "names no recipient, and its message is not in the audit log"
    reached = original.reached()
    if not reached:
        return _none_left(original)
    own = {b.lower() for b in original.bcc}
    copy = " (the sender's own copy among them)" if any(r.lower() in own for r in reached) else ""
    return (
        f"names no recipient, and its message went to {len(reached)}{copy}:"
        " which one complained is not known, none is suppressed"
    )


def _none_left(original: Original) -> str:
    """A complaint naming nobody about a message the log has every recipient of
    as not delivered: it was said to have gone to 0, which it had not."""
    mailboxes = {a.lower() for a in (*original.recipients, *original.bcc)}
    bounced = len(mailboxes - original.never_reached)
    never = len(mailboxes) - bounced
    said = [f"{bounced} bounced since"] if bounced else []
    if never:
        said.append(f"{never} never had it (refused, expired or suppressed)")
    return (
        f"names no recipient, and of its message's {quantity(len(mailboxes), 'recipient')},"
        f" {' and '.join(said)}: none is left it can be about, none is suppressed"
    )


def _failures(report: Report, original: Original | None, lines: list[str]) -> tuple[Failure, ...]:
    """A complaint's recipients, as far as the message went to them. One whose
    reporter redacted the recipient (or named a placeholder) is about the
    message's recipient when it reached only one (a co-recipient suppressed
    or refused never had it): guessing among several would suppress someone
    who did not complain. The sender's automatic copy is one of them: the
    sender's own provider may have sent the complaint."""
    if report.kind == BOUNCE or original is None:
        return report.failures
    named = tuple(f for f in report.failures if original.sent_to(f.recipient))
    if named:
        return named
    if report.failures:
        others = ", ".join(f.recipient for f in report.failures)
        lines.append(f"names {others}, whom the message did not go to: taken as redacted")
    reached = original.reached()
    return (Failure(reached[0]),) if len(reached) == 1 else ()


def _listed_before(
    suppressions: SuppressionFile,
    listed: SuppressionList,
    report: Report,
    failures: tuple[Failure, ...],
    original: Original | None,
) -> dict[Key, Suppression]:
    """The entries this report listed when it was taken before and the audit log
    refused its records (the mail system's retry after an exit 75): recorded
    now, not added again. The file is read only for addresses listed already."""
    if original is None:
        return {}
    on_list = [f.recipient for f in failures if listed.find(f.recipient, original.tenant)]
    if not on_list:
        return {}
    reason = BOUNCED if report.kind == BOUNCE else COMPLAINT
    return {
        e.key: e
        for e in suppressions.entries(on_list).entries
        if (e.tenant, e.queue_id, e.reason) == (original.tenant, original.queue_id, reason)
    }


def _add(
    suppressions: SuppressionFile,
    entries: list[Suppression | str],
    again: dict[Key, Suppression],
) -> list[Suppression | str]:
    """The entries as listed, deciding under the list's lock: an address listed
    since the list was read (``relay suppression add`` at the same moment)
    keeps its entry, whose reason, note and author the report's replaced."""
    listing = [e for e in entries if isinstance(e, Suppression) and e.key not in again]
    if not listing:  # a list that cannot be written holds up only the reports that list
        return entries
    before = {e.key: e for e in suppressions.add_unlisted(listing, every_tenant=True).entries}
    return [_as_listed(e, before, again) for e in entries]


def _as_listed(
    entry: Suppression | str, before: dict[Key, Suppression], again: dict[Key, Suppression]
) -> Suppression | str:
    """The entry, or why it was not added: the address's entry for the tenant,
    or for all of them, was there already."""
    if not isinstance(entry, Suppression) or entry.key in again:
        return entry
    found = listed_for(entry, before, every_tenant=True)
    return entry if found is None else f"on the list already, since {found.since}"


def _entry(
    policy: Policy,
    report: Report,
    failure: Failure,
    original: Original | None,
    listed: SuppressionList,
    again: dict[Key, Suppression],
) -> Suppression | str:
    """The entry, or why there is none. Only a report about a message the relay
    sent lists an address (``_new`` keeps those its message went to): anyone
    can mail the return path, and a forged bounce would otherwise stop a
    tenant's mail to any address. The entry is for the tenant whose mail it
    was, a hard bounce (by the policy's codes) as a complaint: one tenant's
    user, whose mail gets the queue ID back, sent an address one message and
    wrote a bounce for it, and every tenant's mail to it stopped. A refusal
    at delivery, which only the upstream can give, lists it for all."""
    if original is None:
        return "its message is not in the audit log"
    user = _policy_user(policy, original, failure.recipient)
    if user is not None:
        return user
    before = listed.find(failure.recipient, original.tenant)
    if before is not None:  # keeps its first date
        key = (failure.recipient.lower(), original.tenant)
        return again.get(key, f"on the list already, since {before.since}")
    detail = failure.diagnostic or failure.status or report.feedback_type or ""
    if report.kind != BOUNCE:
        return Suppression(
            failure.recipient, original.tenant, COMPLAINT, now(), detail, original.queue_id
        )
    codes = policy.suppression.hard_bounce if policy.suppression is not None else frozenset()
    if failure.status not in codes:
        return "not a hard bounce code"
    return Suppression(
        failure.recipient, original.tenant, BOUNCED, now(), detail, original.queue_id
    )


def _policy_user(policy: Policy, original: Original, address: str) -> str | None:
    """Why the address is not listed when it is a user's of the message's tenant
    (or the sender's automatic copy); None for any other. The relay's notices
    and copies go there, and anyone who got one document can write a bounce
    of the copy (its queue ID is in the Received field, the sender's address
    in Reply-To): listed, the user heard of no failure again. A user whose
    mailbox is really gone is the tenant's to take out of the policy."""
    lowered = address.lower()
    tenant = policy.tenants.get(original.tenant)
    for user in tenant.users.values() if tenant is not None else ():
        if lowered == user.address.lower() or lowered in user.aliases:
            return f"user {user.id} of {original.tenant}: {_USERS_OWN}"
    if lowered in {b.lower() for b in original.bcc}:
        return f"the sender's own copy: {_USERS_OWN}"
    return None


def _record(
    report: Report, failure: Failure, queue_id: str | None, message_id: str | None
) -> dict[str, Any]:
    if report.kind == BOUNCE:
        return events.bounced(
            queue_id=queue_id,
            message_id=message_id,
            recipient=failure.recipient,
            dsn_status=failure.status or PERMANENT_UNKNOWN,
            diagnostic=failure.diagnostic,
        )
    return events.complained(
        queue_id=queue_id,
        message_id=message_id,
        recipient=failure.recipient,
        feedback_type=report.feedback_type or "abuse",
    )


def _said(report: Report, failure: Failure, entry: Suppression | str) -> str:
    what = f"bounced ({failure.status or 'no status'})" if report.kind == BOUNCE else "complained"
    listed = "suppressed" if isinstance(entry, Suppression) else f"not suppressed ({entry})"
    return f"{failure.recipient}: {what}, {listed}"


def _tell(
    policy: Policy,
    report: Report,
    failures: tuple[Failure, ...],
    original: Original | None,
    recorder: Recorder,
    spool: Spool,
    clock: Callable[[], float],
    listed: SuppressionList,
) -> str:
    """Queue the sending user's notice; the reason said when there is none."""
    if original is None:
        return "no notice: the message is not in the audit log"
    tenant = policy.tenants.get(original.tenant)
    user = tenant.users.get(original.user) if tenant is not None else None
    if tenant is None or user is None:
        return f"no notice: user {original.user!r} of {original.tenant!r} is not in the policy"
    if not original.mail_from:
        return "no notice: the message had an empty envelope sender (RFC 5321 4.5.5)"
    sender = listed.find(user.address, tenant.id)
    if sender is not None:
        return f"no notice: {user.address} is on the suppression list since {sender.since}"
    entry = _as_entry(original, report, failures, user.address, tenant.upstream)
    told = [r for r in entry.recipients if r.status == FAILED and r.notify]
    if not told:
        return "no notice: the report is about the sender's own copy"
    notice, data = build_notice(
        policy,
        entry,
        told,
        clock(),
        complaint=report.kind != BOUNCE,
        subject_known=original.subject is not None,
        sign_again=True,
    )
    spool.put(notice, data)
    recorder.notice(entry, notice)
    return f"{user.address} told (notice {notice.queue_id})"


def _as_entry(
    original: Original,
    report: Report,
    failures: tuple[Failure, ...],
    notify_address: str,
    upstream: str,
) -> QueueEntry:
    """The delivered message as the notice builder reads a queue entry: the
    reported recipients failed, with what the report said, the others delivered.
    All else is the audit log's: the report's Subject (or Date) is whatever its
    writer put in the header it returns, and a forged one made a signed notice
    of a "new bank account", threaded under the real invoice; the document's
    own Date is on no record, so the notice has only when the relay took it."""
    said = {f.recipient.lower(): f for f in failures}
    bcc = {b.lower() for b in original.bcc}
    recipients = []
    for address in dict.fromkeys((*original.recipients, *original.bcc)):
        failure = said.get(address.lower())
        own = address.lower() not in bcc
        if failure is not None:
            reply = _reason(report, failure)
            recipients.append(RecipientState(address, FAILED, notify=own, reply=reply))
        elif address.lower() in original.not_delivered:  # the sender was told then
            recipients.append(RecipientState(address, FAILED, notify=False))
        else:
            recipients.append(RecipientState(address, DELIVERED, notify=own))
    arrival = datetime.fromisoformat(original.time.replace("Z", "+00:00")).timestamp()
    return QueueEntry(
        queue_id=original.queue_id,
        arrival=arrival,
        mail_from=original.mail_from,
        recipients=recipients,
        upstream=upstream,
        tenant=original.tenant,
        user=original.user,
        notify_address=notify_address,
        doc_type=original.doc_type,
        subject=original.subject or "",
        message_id=original.message_id or "",
        date="",
        size=0,
        client_address="relay",
        auth_login=None,
        next_attempt=0.0,
    )


def _reason(report: Report, failure: Failure) -> str:
    """The notice's reason: the status code, not the report's own words. Anyone
    can send a report naming a real queue ID, and its diagnostic went into the
    signed notice under the real invoice ("new bank account ..."); the audit
    log and ``relay bounce`` keep it for the sysadmin."""
    if report.kind != BOUNCE:
        return report.feedback_type or "abuse"
    status = f" ({failure.status})" if failure.status else ""
    return f"the receiving server returned it after accepting it{status}"
