"""The delivery engine: takes spooled messages upstream until each one is finished.

Like Postfix's qmgr it owns the schedule, not the bytes: the spool is the
only hand-off from the receiving side, so a restart simply rescans it. Each
recipient ends delivered, failed (5xx) or expired (past the queue
lifetime); temporary failures are retried with exponential backoff and
jitter, so many deferred messages do not all come back at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import logging
import os
import random
import resource
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.audit import AuditError
from relay.clocksteps import ClockSteps
from relay.errors import sent_in_full
from relay.groupcommit import GroupCommit
from relay.notice import build_notice, signed_anew, telling
from relay.oplog import local_time
from relay.policy.model import Policy, QueueSettings, SmtpUpstream, Upstream, sends_as
from relay.quantity import quantity
from relay.record import Recorder, dsn
from relay.settle import FINAL_EVENTS, WAITING_MAX, EntryLock, Finished, Settle, Settler
from relay.slots import Slots
from relay.spool import (
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    SUPPRESSED,
    QueueEntry,
    RecipientState,
    Spool,
)
from relay.spool.entry import SET_BACK
from relay.spool.notes import Notes
from relay.spool.reread import Reread
from relay.spool.store import DamagedEntry, NoSuchEntry, SpoolBusy, SpoolError
from relay.startwatch import LARGE_QUEUE
from relay.suppression import (
    BOUNCE,
    Backlog,
    Suppression,
    SuppressionError,
    SuppressionFile,
    now,
)
from relay.suppression.entry import millis
from relay.suppression.store import added
from relay.tally import TallyRow
from relay.unreachable import Suspensions

log = logging.getLogger("relay")

POLL = 1.0  # longest sleep between looks at the schedule and for kicks
RESCAN = 60.0  # the spool directory is read again this often, as a safety net
#: Attempts of waiting mail started at one turn of the event loop: each reads
#: its record there, and a backlog of 50,000 released at once, started
#: together, held up accepting and delivering for seconds. With 100 a turn
#: the first thousand deliveries of 20,000 took 9 s, with 20, 1.3 s.
START_SLICE = 20
#: Records the first scan reads before it hands them over, oldest first: the
#: engine delivers what is due (and mail accepted since the start) while it
#: reads on. Held until the scan's end, mail taken after a restart on a queue of
#: 50,000 waited 2.5 to 4.5 s for it, and the backlog as long.
EARLY_SLICE = 500
# a message refused a connection over its upstream's limit goes again this soon,
# in line for one of the slots that limit left (``relay.slots``)
CROWDED_WAIT = 2.0
# how long past its lifetime such refusals may put a message's last try off
CROWDED_GRACE = 300.0
WARM_MESSAGE = 1 << 20  # larger messages are read back from the spool when their turn comes
WARM_TOTAL = 16 << 20  # what handed-over messages may hold in memory, all together
CUT_WAIT = 5.0  # for attempts cut off at the end of the stop grace to put themselves on record
# the automatic copy's reply once every recipient is suppressed, as ``relay.decide`` says it
NO_COPY = "not sent: every recipient is on the suppression list"
# the reply recorded for a recipient whose attempt the stop cut off before the
# upstream answered for it: the upstream may have had the whole message (or
# its client cannot tell, ``errors.interrupted``), so the audit log says it may
CUT_OFF = (
    "451 4.4.2 Cut off: the relay stopped before the upstream's reply;"
    " if it had the whole message, it may arrive twice"
)
# the same for one whose client says its message was not sent in full
CUT_SHORT = (
    "451 4.4.2 Cut off: the relay stopped before the message was sent in full;"
    " the upstream cannot have it"
)


def _again_in(tries: int) -> float:
    """A second later, then twice as long each time, up to a RESCAN: counted past
    a thousand tries (a day of a failing disk), the power was too large for a
    float, and every turn after it failed in the relay itself."""
    return min(POLL * 2 ** min(tries, 16), RESCAN)


def file_budget(soft: int | None = None) -> int:
    """How many handed-over entries may wait, and how many attempts may be under
    way: each keeps its entry's file open (its lock). One waiting for a delivery
    slot holds none (it is parked, ``_park``, or waits warm) and does not
    count. A quarter of
    the open-file limit each, the rest being for connections and the spool:
    16 MiB of 2 KB messages would be 8,000 files, and a backlog due at once
    after an outage (or at a restart) one per queued message."""
    if soft is None:  # the limit in force; ``soft``: one to come (``relay check``)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 16 if soft == resource.RLIM_INFINITY else max(1, soft // 4)


@dataclass
class Untold:
    """An entry kept, locked, with its records: a finished one waiting for its
    failure notice to be queued, or a deferred one (``deferred``) waiting for the
    audit log to take its records, then for the spool to store them. Such a
    deferral, stored, put outcomes on the spool that the log never got (a
    ``delivered`` beside the deferred recipient), and a stop, or another worker
    finishing the message, lost them for good. Let go unstored, its recipients
    on record (``unstored``) were pending on the spool, unlocked and due: sent
    to again, by this worker or another, and recorded twice."""

    entry: QueueEntry
    records: list[dict[str, Any]]
    lock: EntryLock
    tries: int = 0
    deferred: bool = False
    unstored: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: ``delivered``, ``failed``, ``deferred``, ``busy``
    (try again soon), ``locked`` (by another process), ``later`` (another worker deferred it
    meanwhile: not due yet), ``held``, ``gone`` (deleted meanwhile), ``parked``
    (in line for its upstream's slot, started again at its turn) or
    ``refused`` (immediate mode: every recipient refused, nothing kept), with the
    reply to pass back when refused."""

    status: str
    reply: str = ""


@dataclass(frozen=True)
class Attempt:
    """What the upstream said to each recipient of one delivery attempt."""

    replies: dict[str, tuple[int, str]]  # recipient -> (code, reply line)
    unreachable: str | None = None  # the reply, when the upstream could not be used at all
    crowded: bool = False  # refused one connection more while others were open: no verdict
    # recipient -> why its reply is the whole transaction's, not its own: it lists nobody
    shared: Mapping[str, str] = field(default_factory=dict)
    sender_refused: str | None = None  # the upstream's refusal for good of MAIL FROM


# (upstream, mail_from, rcpt_tos, data, envelope_id=, go_on=); an immediate attempt
# with an automatic BCC copy adds ``needed=``, the recipients without which nothing
# may go (see ``relay.deliver.attempt``)
Sender = Callable[..., Awaitable[Attempt]]


@dataclass(frozen=True)
class Warm:
    """A just-accepted entry as the receiving side holds it: its lock (the open,
    flocked entry file), its record and its bytes. Handed straight to the
    engine, its first attempt needs no open, lock, parse or read of the spool."""

    lock: int
    entry: QueueEntry
    data: bytes

    def close(self) -> None:
        os.close(self.lock)


def _unsettled(error: BaseException) -> str:
    if isinstance(error, AuditError):
        return f"delivered messages stay in the queue until the audit log takes them: {error}"
    return f"cannot make the removal of delivered messages durable: {error}"


UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def duration(seconds: float) -> str:
    """For people: an expiry notice said "0.000462963 days" for a 40-second lifetime."""
    whole = max(round(seconds), 0)
    name, size = next((u for u in UNITS if whole >= u[1] and whole % u[1] == 0), UNITS[-1])
    return quantity(whole // size, name)


def _waiting(count: int) -> str:
    return f"{quantity(count, 'message')} {'waits' if count == 1 else 'wait'}"


def _own(entry: QueueEntry, pending: list[str]) -> list[str]:
    """The pending recipients the client named, without the automatic BCC copy
    (the relay's own, never notified); all of them if none is left."""
    named = {r.address for r in entry.recipients if r.notify}
    return [address for address in pending if address in named] or pending


def _refused(pending: list[str], own: list[str], replies: dict[str, tuple[int, str]]) -> bool:
    """An immediate attempt's message is refused when the upstream refused every
    recipient the client named for good and delivered to none: an automatic BCC
    copy it took alone was not sent (``needed``), and is no reason for a 250."""
    codes = {address: replies.get(address, (451, ""))[0] for address in pending}
    none_delivered = not any(200 <= code < 300 for code in codes.values())
    return bool(own) and none_delivered and all(codes[address] >= 500 for address in own)


def _expires(now: float, deadline: float, crowded: bool) -> bool:
    """Whether a temporary failure now is the message's last: at or past its
    lifetime, but not a refusal over the upstream's connection limit, which
    is no try and goes again shortly (``CROWDED_WAIT``): at the lifetime it
    expired the message untried. Refused so for ``CROWDED_GRACE`` past it, a
    limit other workers keep full ends it all the same."""
    if crowded:
        return now >= deadline + CROWDED_GRACE
    return now >= deadline


def backoff(settings: QueueSettings, attempts: int, rng: Callable[[], float]) -> float:
    """Seconds to wait after the n-th failed attempt: doubling, capped, +-10% jitter."""
    base = min(settings.first_retry * 2 ** max(attempts - 1, 0), settings.max_retry)
    return base * (0.9 + 0.2 * rng())


def _rerouted(entry: QueueEntry, policy: Policy) -> Upstream | None:
    """The upstream an entry goes to once its own is gone from the policy: its
    tenant's, as the policy has it now, which is where the sysadmin who renamed
    or replaced the upstream sends that tenant's mail (and its notices). For a
    tenant gone too the entry waits for the name to come back, or expires; so
    does one whose tenant's upstream sends as another address (``_sent_otherwise``)."""
    name = _route(entry, policy)
    if name not in policy.upstreams:
        return None
    why = _sent_otherwise(entry, policy)
    if why is not None:
        if all(r.reply == _no_upstream(entry, policy) for r in entry.pending()):
            return None  # said at its first attempt: its delay reason says it since
        log.warning(
            "%s: upstream %r is no longer in the policy, and %s: it waits for %r, or expires"
            " (relay queue delete removes it)",
            entry.queue_id,
            entry.upstream,
            why,
            entry.upstream,
        )
        return None
    log.info(
        "%s: upstream %r is no longer in the policy: going through %r, tenant %s's",
        entry.queue_id,
        entry.upstream,
        name,
        entry.tenant,
    )
    entry.upstream = name
    return policy.upstreams[name]


def _sent_otherwise(entry: QueueEntry, policy: Policy) -> str | None:
    """Why the entry may not go through its tenant's upstream, when that sends as
    another address than the one its From, envelope sender and signature were
    decided for: an account refuses any other sender (``550 5.7.60``), and the
    platform's smarthost sent an account's mail unaligned for DMARC, its bounces
    to the company. None when it sends as the old one did."""
    upstream = policy.upstreams.get(_route(entry, policy))
    written = _written_otherwise(entry, upstream)
    if upstream is None or written is None:
        return None
    return (
        f"tenant {entry.tenant}'s upstream {upstream.name!r} sends as {_as(sends_as(upstream))},"
        f" and this message was written to go as {_as(written)}"
    )


def _written_otherwise(entry: QueueEntry, upstream: Upstream | None) -> str | None:
    """The address the entry was decided for, lower-cased ("" the platform's), when
    ``upstream`` sends as another; None when it sends as that one, and for a
    record of an earlier version, which goes as it went then: its envelope
    sender told it wrong where the same reload changed the platform's
    ``return_path``, and such mail waited for nothing."""
    if upstream is None or entry.sends_as is None:
        return None
    written = entry.sends_as.lower()
    return None if written == sends_as(upstream).lower() else written


def _as(address: str) -> str:
    return address or "the platform's addresses"


def _no_upstream(entry: QueueEntry, policy: Policy) -> str:
    """The delay reason of an entry with no upstream to go through."""
    why = _sent_otherwise(entry, policy)
    if why is None:
        return f"451 4.3.5 no upstream {entry.upstream!r}"
    return (
        f"451 4.3.5 no upstream {entry.upstream!r}: {why}; put {entry.upstream!r} back"
        " in the policy, or relay queue delete it"
    )


def _sender_changed(entry: QueueEntry, upstream: Upstream | None) -> str | None:
    """The delay reason of an entry whose own upstream a reload made send as
    another address (its ``sender`` changed, added or taken away) than the one
    its From, envelope sender and signature were decided for, as for one
    rerouted (``_sent_otherwise``): sent, an account refused it for good. Said
    in the log at its first attempt."""
    written = _written_otherwise(entry, upstream)
    if upstream is None or written is None:
        return None
    reason = (
        f"451 4.3.5 upstream {upstream.name!r} now sends as {_as(sends_as(upstream))}, and"
        f" this message was written to go as {_as(written)}; put its sender back in the"
        " policy, or relay queue delete it"
    )
    if not all(r.reply == reason for r in entry.pending()):
        log.warning("%s: held: %s", entry.queue_id, reason[10:])
    return reason


def _warn_of_refused_sender(
    entry: QueueEntry, policy: Policy, upstream: Upstream, reply: str
) -> None:
    """A refusal for good of MAIL FROM fails every message sent with that
    address, not this one's recipients: the fix is in the policy or at the
    upstream, and the per-recipient lines said only that nobody was listed."""
    if not entry.mail_from:
        what = "<>, the null sender (the relay's notices', or one the ERP gave)"
    elif entry.mail_from.lower() == policy.platform.return_path.lower():
        what = f"<{entry.mail_from}>, the platform's return_path"
    elif entry.mail_from.lower() == sends_as(upstream).lower():
        what = f"<{entry.mail_from}>, the upstream's sender (the account's own address)"
    else:
        what = f"<{entry.mail_from}>"
    log.warning(
        "%s: upstream %r refused the envelope sender %s (%s): every message sent with it"
        " fails until the upstream takes it",
        entry.queue_id,
        upstream.name,
        what,
        reply,
    )


def _refused_sender_reply(entry: QueueEntry, upstream: Upstream, reply: str) -> str:
    """What an ``immediate`` client hears of a refusal for good of the envelope
    sender the policy chose (the platform's return_path, an account's own
    address): a 4xx, as the fault is a setting of the relay's, not the
    document's. Passed back as it came, 550 5.7.60, the ERP dropped the
    document for good, told a sender was refused that was not its own."""
    return (
        f"451 4.7.0 Upstream {upstream.name} refused the relay's envelope sender"
        f" <{entry.mail_from}> ({reply}): a setting of the relay's, try again later"
    )


def _chain(entry: QueueEntry, upstream: Upstream, policy: Policy) -> list[Upstream]:
    """The upstream, then its fallbacks in their order: a fallback's own are not
    followed. One that sends as another address than the message was written for
    is left out, as ``_sender_changed`` holds mail for its own upstream (the
    policy refuses such a fallback; a record of an earlier version may be one)."""
    names = upstream.fallback if isinstance(upstream, SmtpUpstream) else ()
    found = [policy.upstreams.get(name) for name in names]
    usable = [u for u in found if u is not None and _written_otherwise(entry, u) is None]
    return [upstream, *usable]


def _unusable_text(tried: list[tuple[Upstream, str]]) -> str:
    """The deferral of an attempt no upstream could be used for: the entry's own
    upstream's reply, then each fallback's, the last one each was told where a
    suspension passed it over."""
    (upstream, reply), *fallbacks = tried
    text = reply or f"451 4.4.1 Upstream {upstream.name} suspended"
    for fallback, said in fallbacks:
        text += f"; fallback {fallback.name}: {said or 'suspended'}"
    return text


def _unusable(pending: list[str], tried: list[tuple[Upstream, str]]) -> Attempt:
    text = _unusable_text(tried)
    return Attempt(dict.fromkeys(pending, (451, text)), unreachable=text)


def _fallback_names(names: tuple[str, ...]) -> str:
    return ("fallback " if len(names) == 1 else "fallbacks ") + ", then ".join(names)


def _route(entry: QueueEntry, policy: Policy) -> str:
    """The name of the upstream the entry goes to, without a word: the attempt
    (``_rerouted``) says it, once."""
    if entry.upstream in policy.upstreams:
        return entry.upstream
    tenant = policy.tenants.get(entry.tenant)
    return entry.upstream if tenant is None else tenant.upstream


def _refused_for(entry: QueueEntry, policy: Policy) -> str | None:
    """Whose mail an upstream's hard bounce keeps from the address: every
    tenant's when the upstream is shared (the platform's smarthost), the
    entry's tenant's when only its mail goes there (the company's own
    server or account): a refusal by a server one company runs listed the
    address for all of them, its other users' own addresses included. A
    reload may since have taken the tenant away or off the upstream: only
    an upstream the policy has several tenants on is shared."""
    name = _route(entry, policy)
    sharing = [tid for tid, tenant in policy.tenants.items() if tenant.upstream == name]
    return None if len(sharing) > 1 else entry.tenant


def _later_refusal(listed: Suppression, entry: Suppression) -> bool:
    """Whether ``entry`` replaces the one listed: the list keeps an address's
    first refusal, and a kept entry (``Backlog``) may be written after another
    worker listed a later one; an entry for another reason (a complaint, a
    sysadmin's ``manual``) stands. The list holds no author, so one a
    sysadmin added with ``--reason bounce`` is taken for the relay's."""
    return listed.reason == BOUNCE and millis(listed.since) > millis(entry.since)


def _tenant_user(entry: QueueEntry, policy: Policy, address: str) -> str | None:
    """Whose the address is when it is a user's of any tenant (the sender's
    automatic copy, a colleague by alias, a notice's, another company's
    user the document went to), which a hard refusal does not list: listed,
    the user got no copy and no notice again, and nothing said why, as a
    shared upstream's refusal lists for every tenant, the user's own
    included. A mailbox really gone, or an address mistyped, is the
    policy's to mend. None for others."""
    lowered = address.lower()
    ref = policy.addresses.get(lowered)
    if ref is not None:
        return f"user {ref.user} of {ref.tenant}"
    if lowered == entry.notify_address.lower():
        return "the sender's own address"
    return None


def _say(said: list[Callable[[], None]]) -> None:
    """Make the lines and records ``Engine._drop_listed`` left, once."""
    for say in said:
        say()
    said.clear()


def _say_untold(entry: QueueEntry) -> None:
    """A notice that failed or expired causes no notice in turn: this line is
    the sysadmin's only word that the sender never heard of their failed
    document (a notice through the upstream that failed it expires as it did)."""
    if not entry.is_notice:
        return
    for rcpt in entry.recipients:
        if rcpt.status in (FAILED, EXPIRED):
            log.error(
                "%s: the sender was not told: failure notice %s to <%s> %s (%s)",
                entry.about or entry.queue_id,
                entry.queue_id,
                rcpt.address,
                rcpt.status,
                rcpt.reply,
            )


def _when(entry: QueueEntry) -> tuple[bool, float, float]:
    """What a scan keeps of a record: whether it is held, its next attempt, when written."""
    return entry.held, entry.next_attempt, entry.last_written


class Engine:
    def __init__(
        self,
        spool: Spool,
        policy: Callable[[], Policy],
        send: Sender,
        recorder: Recorder,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        alone: Callable[[], bool] | None = None,
        suppressions: SuppressionFile | None = None,
        tally: TallyRow | None = None,
        steps: ClockSteps | None = None,
        say_first_scan: bool = False,
    ) -> None:
        """``say_first_scan``: this engine says its first scan of a large queue
        (``_first_scan``), one of the relay's at a start. ``suppressions``: the
        worker's list, so that no notice goes to a sender on it and an address
        is not listed twice. ``steps``: the steps of ``clock`` this process
        knows of, for the messages' lifetimes (``relay.clocksteps``).
        ``tally``: the worker's row of the shared table, told each upstream's
        name as an attempt finds it unusable and as it is lifted, for the
        metrics, and asked whether another worker has reached an upstream this
        one holds mail for."""
        self.spool = spool
        self._records = Reread(spool, _when, clock)  # a scan reads only the changed records
        self._suppressions = suppressions
        self.policy = policy
        self.send = send
        self.recorder = recorder
        self.clock = clock
        self._steps = steps or ClockSteps(clock)
        self.rng = rng
        self._wake = asyncio.Event()
        self._busy: dict[str, asyncio.Task[Outcome]] = {}
        self.accepting: set[str] = set()  # being accepted: not the engine's until answered
        # immediate attempts whose client still waits, with its hang-up, if it can tell
        self._answering: dict[str, asyncio.Event | None] = {}
        self._refusing: set[str] = set()  # immediate attempts passing a refusal back
        self._limits: dict[str, Slots] = {}
        self._limited: dict[str, Upstream] = {}  # what each name was when its slots narrowed
        self._stopping = False
        self._starting = True  # attempts may start: until the signal to stop on
        self.winding_down = asyncio.Event()  # set with the signal to stop on
        self._sending: set[str] = set()  # queue IDs whose attempt waits for the upstream
        self._schedule: dict[str, float] = {}  # queue ID -> next attempt
        self._due: list[tuple[float, str]] = []  # heap over _schedule, stale items skipped
        # what ``submit`` was given, also in the heap: started before what waited
        # (see _start_due), and taking turns with it for a slot (relay/slots.py);
        # those of them under way
        self._fresh: collections.deque[str] = collections.deque()
        self._fresh_busy: set[str] = set()
        # attempts in line for a slot as queue IDs (``_park``), and those whose
        # turn came, each holding its slot until it starts: (queue ID, fresh, slots)
        self._parked: set[str] = set()
        self._tasks_in_line = {True: 0, False: 0}  # shared by every upstream's Slots
        self._granted: collections.deque[tuple[str, bool, Slots]] = collections.deque()
        self._planned_in_scan: dict[str, float] | None = None
        self._settler = Settler(spool, recorder)
        # ``alone``: with one SMTP session outcomes are recorded on the event loop too
        self._done: GroupCommit[Finished | Settle] = GroupCommit(
            self._settler.finish_many, "finish", inline=alone
        )
        self._settling: asyncio.Task[None] | None = None
        self._settle_error: str | None = None
        self._scan_error: str | None = None
        self._warm: dict[str, Warm] = {}
        # recipients told of in this process: a deferral whose record could not be
        # stored (a disk in trouble) must not tell them again at every retry
        self._told: dict[str, set[str]] = {}
        # deferrals the spool could not store: (next attempt, attempts), so that the
        # backoff holds (it used to retry once a POLL) until a store works again
        self._unstored: dict[str, tuple[float, int]] = {}
        # entries written before the wall clock was set back: when each was written
        # and how far ahead of the clock that was when first seen (``_next_attempt``)
        self._ahead: dict[str, tuple[float, float]] = {}
        self._store_error: SpoolError | None = None
        # entries another process holds, and how many times in a row: a worker
        # whose removals fail holds its delivered ones for long (see Settler)
        self._locked: dict[str, int] = {}
        # finished entries whose failure notice the spool could not take: kept,
        # locked, with their records, until it does
        self._untold: dict[str, Untold] = {}
        self._unlisted = Backlog()
        self._kept_ids: dict[str, str | None] = {}  # the kept entries' Message-IDs
        self._listings: list[dict[str, Any]] = []  # ``listed`` records the audit log refused
        self._unreadable: dict[str, str] = {}  # queue ID -> why the last scan could not read it
        self._warm_bytes = 0
        self._warm_files = 0  # like the bytes, until each one's attempt ends
        self._files = file_budget()
        self._suspensions: Suspensions[Upstream] = Suspensions()
        self._tally = tally
        self._shown_suspended: set[str] = set()  # upstream names told as suspended
        self._notes = Notes(spool)
        self._notes_seen = 0
        self._notes_failing = False
        self._paused: str | None = None  # the audit log's refusal, as last said
        self._held_up = False  # as many entries kept as may be, as last said
        self._say_first_scan = say_first_scan

    def submit(self, queue_id: str, when: float | None = None, warm: Warm | None = None) -> None:
        """A new entry in the spool: deliver it at ``when`` (now by default).

        ``warm`` hands over the entry as accepted, lock included; the engine
        keeps it for the first attempt while the memory bound allows, and
        otherwise lets go of the lock and reads the entry back when it is due.
        """
        if warm is not None:
            with contextlib.suppress(OSError):  # else read at the next scan
                self._records.seed(queue_id, os.fstat(warm.lock), warm.entry)
            size = len(warm.data)
            full = self._warm_bytes + size > WARM_TOTAL or self._warm_files >= self._files
            if self._stopping or size > WARM_MESSAGE or full:
                warm.close()
            else:
                self._warm[queue_id] = warm
                self._warm_bytes += size
                self._warm_files += 1
        self._plan(queue_id, self.clock() if when is None else when)
        if when is None:
            self._fresh.append(queue_id)
        self._wake.set()

    def _plan(self, queue_id: str, when: float) -> None:
        self._schedule[queue_id] = when
        heapq.heappush(self._due, (when, queue_id))
        if len(self._due) > 2 * len(self._schedule) + 1000:
            self._reindex()
        if self._planned_in_scan is not None:
            self._planned_in_scan[queue_id] = when

    async def run(self) -> None:
        """Deliver until ``stop``.

        The schedule lives in memory: reading every record on each wake-up
        cost more than delivering once messages piled up. The directory is
        read at start, when ``relay queue retry``/``release`` kick, and every
        ``RESCAN`` seconds in case a record changed behind the engine's back.
        """
        if self._tally is not None:
            for name in self.policy().upstreams:  # what a worker before this one left
                self._tally.suspended(name, False)
        seen_kick = self._last_kick()
        await self._log_queue_changes(True)
        await self._check_audit(start=True)
        # delivering as it reads: what it has read, and mail accepted meanwhile
        first: asyncio.Task[bool] | None = asyncio.ensure_future(self._first_scan())
        first.add_done_callback(lambda _: self._wake.set())
        scan_wanted = False
        # the looks' own pace is kept by the monotonic clock: set back an hour,
        # the wall clock held up every look (the fsync of delivered mail's
        # records, its removal, relay queue retry) for that hour
        last_scan = last_look = time.monotonic()
        while not self._stopping:
            if self._starting:
                self._start_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sleep() if self._starting else POLL)
            self._wake.clear()
            if self._stopping:
                break  # stop() makes the last removals durable itself
            if first is not None and first.done():
                scan_wanted, first = not first.result(), None
                last_scan = time.monotonic()
            if time.monotonic() - last_look < POLL:
                continue  # woken per accepted message: a stat each time added up
            last_look = time.monotonic()
            self._look_at_clock()
            self._settle_finished()
            await self._check_audit()
            self._reached_elsewhere()
            await self._log_queue_changes(last_look - last_scan > RESCAN)
            kicked = self._last_kick()  # a file's time: any change is a kick, earlier too
            if first is not None:
                continue  # the first scan still reads: kicks wait for its end
            if kicked != seen_kick or last_look - last_scan > RESCAN or scan_wanted:
                if kicked != seen_kick:  # ``relay queue retry``, ``release``: now
                    self._suspensions.try_now(self.clock())
                seen_kick = kicked
                scan_wanted = not await self._rescan()  # if it failed, again at the next look
                last_scan = time.monotonic()
                await self._list_kept()
        if first is not None:
            await first  # its thread reads on until it ends: not left behind

    async def _first_scan(self) -> bool:
        """``_rescan``, said as it begins and ends for a large queue: it reads every
        record (about 9 s for 50,000 on a cold disk, each worker its own), and the
        log was silent from the start's last line to the first delivery."""
        if not self._say_first_scan:
            return await self._rescan(early=True)
        try:
            entries = len(await asyncio.to_thread(self.spool.ids))
        except SpoolError:
            entries = 0  # the scan says it
        if entries < LARGE_QUEUE:
            return await self._rescan(early=True)
        log.info(
            "queue: reading the records of %s; delivering those due as they are read",
            quantity(entries, "message"),
        )
        began = time.monotonic()
        read = await self._rescan(early=True)
        if read and not self.winding_down.is_set():  # a stop under way delivers none
            log.info("queue: records read in %.1fs", time.monotonic() - began)
        return read

    async def _log_queue_changes(self, anyway: bool) -> None:
        """What the queue tools did, logged by the worker that takes their note
        (``relay.spool.notes``): the log said ``deferred`` last of a message
        deleted since. ``anyway``: a note left in the same tick of the
        directory's clock as the last look changed nothing to see."""
        try:
            stamp = self._notes.stamp()
            if stamp == self._notes_seen and not anyway:
                return
            notes = await asyncio.to_thread(self._notes.take)
        except SpoolError as exc:
            if not self._notes_failing:  # once, not at every look (out of files: each second)
                log.error("cannot log what the queue tools did: %s", exc)
            self._notes_failing = True
            return
        self._notes_seen, self._notes_failing = stamp, False
        now = self.clock()
        for note in notes:
            log.info("%s: %s", note.queue_id, note.line(now))

    async def _check_audit(self, start: bool = False) -> None:
        """Whether the audit log takes records again, while it refuses them
        (``_backlogged``). Records waiting to be written again tell
        (``relay.settle``); with none waiting, a probe does, once a look. At the
        start too: the records refused may have been the start's own, another
        process's, and the mail they left queued went again at every restart."""
        refusing = self.recorder.refusing is not None
        if start or (refusing and not self._settler.rewriting):
            with contextlib.suppress(AuditError):  # said by _say_paused
                await asyncio.to_thread(self.recorder.probe)
        self._say_paused()
        self._say_held_up()
        if self.recorder.refusing is None:
            await self._write_listings()

    def _say_held_up(self) -> None:
        """Once each way: with as many entries kept as may be, nothing new starts
        (``_backlogged``), and a full spool disk stopped all delivery unsaid."""
        held_up = len(self._untold) >= WAITING_MAX
        if held_up and not self._held_up:
            log.error(
                "no delivery starts while %s, locked, for the audit log or the"
                " spool to take what their attempts did (the mail stays queued)",
                _waiting(len(self._untold)),
            )
        elif not held_up and self._held_up:
            log.info(
                "messages kept for the audit log or the spool are down to %d: deliveries go on",
                len(self._untold),
            )
            self._wake.set()
        self._held_up = held_up

    def _say_paused(self) -> None:
        """Once each way, not at every look or message."""
        refusing = self.recorder.refusing
        if refusing is not None and self._paused is None:
            log.error(
                "no delivery starts until the audit log takes records again (those under"
                " way finish; the mail stays queued): %s",
                refusing,
            )
        elif refusing is None and self._paused is not None:
            log.info("the audit log takes records again: deliveries go on")
            self._wake.set()
        self._paused = refusing

    def _last_kick(self) -> float:
        try:
            return self.spool.last_kick()
        except SpoolError:
            return 0.0  # the scan that follows reports it

    def _settle_finished(self) -> None:
        """Finished entries wait for an fsync that covers their final records, then
        for one that makes their removal durable (``relay.settle``); on a busy
        relay the accepted batches' fsyncs do both, on a quiet one this, once a POLL."""
        if self._settling is None and (self._settler.waiting or self.spool.removals_pending):
            self._settling = asyncio.get_running_loop().create_task(self._done(Settle()))
            self._settling.add_done_callback(self._finished_settled)

    def remove_covered(self) -> None:
        """For the thread that has just fsynced the audit log: see ``Settler.remove_covered``."""
        self._settler.remove_covered()

    def _finished_settled(self, task: asyncio.Task[None]) -> None:
        """Tried again at the next look; a broken disk is reported once, not per POLL."""
        self._settling = None
        self._wake.set()  # what was held back may start now
        error = None if task.cancelled() else task.exception()
        if error is not None and str(error) != self._settle_error:
            log.error("%s", _unsettled(error))
        elif error is None and self._settle_error is not None:
            log.info("delivered messages are on record and leave the queue again")
        self._settle_error = None if error is None else str(error)

    async def _rescan(self, early: bool = False) -> bool:
        """What is planned while the directory is read is newer than what the
        read finds: a message accepted meanwhile must not wait for the next scan.
        With ``early`` the records read are planned as the read goes on
        (``_plan_early``); those of them finished before it ends stay so.

        A spool that cannot be read (a directory gone for a moment, EIO) is
        reported once and read again at each look; delivery of what the engine
        knows goes on. It used to end the engine, silently, for good."""
        self._planned_in_scan = {}
        found: dict[str, tuple[float, float] | float]
        planned_early: set[str] = set()
        hand_over: Callable[[list[tuple[str, tuple[float, float]]]], object] | None = None
        if early:
            soon = asyncio.get_running_loop().call_soon_threadsafe
            hand_over = functools.partial(soon, self._plan_early, planned_early)
        try:
            read, held, unreadable = await asyncio.to_thread(self._read_schedule, hand_over)
            found = dict(read)
            for queue_id in planned_early - self._schedule.keys():  # delivered, or failed
                found.pop(queue_id, None)
            found.update(self._planned_in_scan)
        except (SpoolError, OSError) as exc:
            if str(exc) != self._scan_error:
                log.error("cannot read the spool, trying again: %s", exc)
            self._scan_error = str(exc)
            return False
        finally:
            self._planned_in_scan = None
        if self._scan_error is not None:
            log.info("spool readable again")
            self._scan_error = None
        self._say_unreadable(unreadable)
        schedule = {
            q: self._next_attempt(q, *when) if isinstance(when, tuple) else when
            for q, when in found.items()
            if not self._settler.stuck(q)
        }
        # a kept entry's turn is the engine's: dropped for a record the scan could
        # not read, it waited, locked, for the stop
        schedule.update((q, self._schedule[q]) for q in self._untold if q in self._schedule)
        self._schedule = schedule
        upstreams = self.policy().upstreams.values()
        # a held message keeps its suspension: released, all of them tried at once
        self._suspensions.keep(self._schedule.keys() | held, upstreams)
        self._forget_limits(self.policy().upstreams)
        suspended = {u.name for u in upstreams if self._suspensions.suspended(u)}
        for name in self._shown_suspended - suspended:  # gone from the queue, or a reload
            self._show_suspension(name, False)
        for memory in (self._unstored, self._locked, self._told, self._ahead):  # gone
            for queue_id in memory.keys() - found.keys():
                del memory[queue_id]
        self._reindex()
        return True

    def _read_schedule(
        self, hand_over: Callable[[list[tuple[str, tuple[float, float]]]], object] | None = None
    ) -> tuple[dict[str, tuple[float, float]], set[str], dict[str, SpoolError]]:
        """Every entry's next attempt and when it was last written, from the spool,
        the IDs of those on hold, and why each unreadable one cannot be read; on
        the way, free files kept too long go (``Spool.trim_recycled``), and
        ``hand_over`` gets those not held, ``EARLY_SLICE`` at a time."""
        self.spool.trim_recycled()
        schedule: dict[str, tuple[float, float]] = {}
        held: set[str] = set()
        unreadable: dict[str, SpoolError] = {}
        slice_: list[tuple[str, tuple[float, float]]] = []
        for queue_id, e in self._records.loaded():
            if isinstance(e, SpoolError):
                unreadable[queue_id] = e
            elif e[0]:
                held.add(queue_id)
            else:
                schedule[queue_id] = e[1:]
                if hand_over is not None:
                    slice_.append((queue_id, e[1:]))
                    if len(slice_) >= EARLY_SLICE:
                        hand_over(slice_)
                        slice_ = []
        return schedule, held, unreadable

    def _plan_early(self, planned: set[str], read: list[tuple[str, tuple[float, float]]]) -> None:
        """Records the first scan has read, planned before it ends; what the engine
        has planned itself since the start (accepted mail, an attempt) stays."""
        for queue_id, when in read:
            if queue_id not in self._schedule and queue_id not in self._busy:
                self._schedule[queue_id] = self._next_attempt(queue_id, *when)
                heapq.heappush(self._due, (self._schedule[queue_id], queue_id))
                planned.add(queue_id)
        self._wake.set()

    def _say_unreadable(self, found: dict[str, SpoolError]) -> None:
        """Each file the scans skip, said once, not at every scan (a FIFO left in
        the queue was warned of every minute and at every kick, by every
        worker); again if it comes back after it went, or for another reason."""
        for queue_id, error in found.items():
            if self._unreadable.get(queue_id) != str(error):
                log.warning("%s skipped unreadable queue entry: %s", queue_id, error)
        self._unreadable = {queue_id: str(error) for queue_id, error in found.items()}

    def _next_attempt(self, queue_id: str, next_attempt: float, written: float) -> float:
        """The entry's next attempt on the clock as it reads now. An entry written
        ahead of now was written before the wall clock was set back, and its
        wait runs from when the engine first saw it so: a deferral made before a
        step back of a day waited the day. How far ahead it was then is kept
        until the entry is written again, or each rescan would push the attempt
        on. No bound of the policy is used, so a reload that lowers the retry
        settings changes nothing."""
        kept = self._ahead.get(queue_id)
        if kept is not None and kept[0] == written:
            return next_attempt - kept[1]
        ahead = written - self.clock()
        if ahead <= SET_BACK:
            self._ahead.pop(queue_id, None)
            return next_attempt
        self._ahead[queue_id] = (written, ahead)
        return next_attempt - ahead

    def _look_at_clock(self) -> None:
        gained = self._steps.look()
        if gained > 0:
            log.warning(
                "the clock was set forward by %s: messages queued before the step keep"
                " the lifetime they had left (until the relay restarts)",
                duration(gained),
            )
        elif gained < 0 and self._steps.taken_back:
            log.warning(
                "the clock was set back by %s, setting right %s of a step forward: the"
                " messages queued before that step count their lifetime by the clock again",
                duration(-gained),
                duration(self._steps.taken_back),
            )

    def _reindex(self) -> None:
        self._due = [(when, queue_id) for queue_id, when in self._schedule.items()]
        heapq.heapify(self._due)

    def _stale(self, item: tuple[float, str]) -> bool:
        """Planned again since, or finished: the schedule has the last word."""
        return self._schedule.get(item[1]) != item[0]

    def _sleep(self) -> float:
        """How long nothing can start: 0 only for what ``_start_due`` would start."""
        while self._due and self._stale(self._due[0]):
            heapq.heappop(self._due)
        if self._granted and not self._held_back(fresh=self._granted[0][1]):
            return 0.0
        if self._fresh and not self._held_back(fresh=True):
            return 0.0
        if not self._due or self._held_back(fresh=False):
            return POLL
        return max(0.0, min(POLL, self._due[0][0] - self.clock()))

    def wind_down(self) -> None:
        """From the signal to stop on, no attempt starts, also while the stop's
        grace waits for the clients' transactions: one started then, or one that
        gets its delivery slot then, would be cut off by the grace, after its
        upstream may have had the message, and go again at the next start.
        The slots of parked entries whose turn came and that wait to be started
        go on to the next in line (``_slot_granted``)."""
        self._starting = False
        self.winding_down.set()
        while self._granted:
            _, _, limit = self._granted.popleft()
            asyncio.get_running_loop().call_soon(limit.give_back)

    async def stop(self, timeout: float) -> None:
        """Start nothing new; let deliveries in progress finish within ``timeout``."""
        self._stopping = True
        self.wind_down()
        self._wake.set()
        for warm in self._warm.values():
            warm.close()  # not started: the next start reads the spool
            self._warm_bytes -= len(warm.data)
            self._warm_files -= 1
        self._warm.clear()
        if self._busy:
            _, running = await asyncio.wait(list(self._busy.values()), timeout=timeout)
            # only those waiting for their upstream: one settling its outcome would
            # lose its records, and one waiting for a slot starts nothing now
            cut = sorted(
                q for q, task in self._busy.items() if task in running and q in self._sending
            )
            if cut:
                log.warning(
                    "cutting off %s still waiting for the upstream at the"
                    " end of the stop grace, having waited %gs for them: %s; each stays queued,"
                    " recorded as deferred, and is tried again at the next start, unless the"
                    " upstream had answered its message already (one already sent in full may"
                    " arrive twice: the audit log says so)",
                    quantity(len(cut), "delivery attempt"),
                    timeout,
                    " ".join(cut),
                )
                tasks = [self._busy[queue_id] for queue_id in cut]
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=CUT_WAIT)
            # the others settle what their upstream answered, and may keep their
            # entries: kept after the kept ones are let go, nothing let them go
            settling = [task for task in self._busy.values() if not task.done()]
            if settling:
                await asyncio.wait(settling, timeout=CUT_WAIT)
        while self._settling is not None:
            await asyncio.wait((self._settling,))
            await asyncio.sleep(0)  # its done callback clears it
        try:
            for queue_id, untold in list(self._untold.items()):
                del self._untold[queue_id]
                await self._let_go_one(untold)
            unsettled = sorted(q for q, task in self._busy.items() if not task.done())
            if unsettled:
                log.error(
                    "stopping while %s %s not ended: %s; each is left"
                    " as last stored, and one whose upstream had answered may go again at the"
                    " next start to a recipient the audit log has an outcome for",
                    quantity(len(unsettled), "delivery attempt"),
                    "has" if len(unsettled) == 1 else "have",
                    " ".join(unsettled),
                )
            await self._done(Settle(final=True))
        except (AuditError, SpoolError) as exc:
            log.error("%s", _unsettled(exc))
        try:
            await asyncio.to_thread(self.spool.trim_recycled, 0.0)
        except SpoolError as exc:
            log.error("cannot remove the files kept for reuse: %s", exc)
        await self._list_kept()
        await self._write_listings(stopping=True)
        self._unlisted.abandon()

    async def _let_go_one(self, untold: Untold) -> None:
        """``_let_go``, its trouble said of this entry alone: raised out of the
        stop's loop, it left the kept entries after it unstored and unnamed,
        and what waited for the final fsync unsettled."""
        queue_id = untold.entry.queue_id
        try:
            await self._let_go(untold)
        except NoSuchEntry:
            log.error(
                "%s: gone from the queue before the stop could store what its last"
                " attempt did; the audit log has what was recorded of it",
                queue_id,
            )
        except AuditError as exc:
            log.error("%s: %s", queue_id, _unsettled(exc))
        except SpoolError as exc:
            log.error("%s: left as last stored at the stop: %s", queue_id, exc)

    async def _let_go(self, untold: Untold) -> None:
        """At the stop, a finished entry ends without its notice; a deferral is
        stored if the log takes its records and the spool its outcomes now, else
        left as last stored, for the next start to try again: where the log has
        outcomes the spool does not, the sysadmin is told whose."""
        queue_id = untold.entry.queue_id
        if not untold.deferred:
            log.error("%s: the relay stops before the failure notice could be queued", queue_id)
            await self._done(Finished(queue_id, untold.records, untold.lock, untold.entry.size))
            return
        try:
            if await self._recorded(untold):
                return
            if not untold.records:  # on record, not stored
                log.error(
                    "%s: the relay stops before the spool stored what the audit log says of"
                    " %s: left as last stored, the next start may send to them, or tell the"
                    " sender, again (%s)",
                    queue_id,
                    ", ".join(f"<{address}>" for address in untold.unstored),
                    self._store_error,
                )
                return
            log.error(
                "%s: the relay stops before the audit log took its last attempt's records:"
                " its outcome since it was last stored is not on record, and it is tried"
                " again at the next start (%s)",
                queue_id,
                self.recorder.refusing,
            )
            await self._withdraw_notices(untold)
        finally:
            untold.lock.close()

    async def _withdraw_notices(self, untold: Untold) -> None:
        """The failure notices the lost attempt queued go with it: the next start
        tries the message as last stored, and tells the sender of the same
        failures again. Left queued, each went out unrecorded, then its twin.
        No delivery starts while the log refuses records, so none has gone."""
        for record in untold.records:
            notice = record.get("notice_queue_id")
            if record["event"] != "notified" or notice is None:
                continue
            try:
                with self.spool.lock(notice, blocking=False):
                    await asyncio.to_thread(self.spool.remove, notice)
            except NoSuchEntry:
                continue
            except SpoolError as exc:
                log.error(
                    "%s: its failure notice %s stays queued, so the sender may be told twice: %s",
                    untold.entry.queue_id,
                    notice,
                    exc,
                )

    async def _list_kept(self) -> None:
        """Entries kept while the list refused them, tried again without waiting
        for the next hard bounce (which may not come)."""
        settings = self.policy().suppression
        if self._unlisted and settings is not None:
            await self._add_listed(settings.file, [])

    def attempt_now(
        self,
        queue_id: str,
        immediate: bool = False,
        hung_up: asyncio.Event | None = None,
        fresh: bool = False,
        granted: Slots | None = None,
    ) -> asyncio.Task[Outcome]:
        """Start (or join) the delivery of one entry. With ``immediate`` a message every
        recipient refuses is dropped without a notice, while its sender is waiting for
        the reply (until ``answered``, or ``hung_up`` is set: a client gone reads no
        refusal, so its sender hears of it by notice, as of any queued message).
        ``granted``: the slots whose slot a parked attempt was handed."""
        task = self._busy.get(queue_id)
        if task is None:
            fresh = fresh or immediate
            attempt = self._deliver(queue_id, immediate, fresh, granted)
            task = asyncio.get_running_loop().create_task(attempt)
            self._busy[queue_id] = task
            if fresh:
                self._fresh_busy.add(queue_id)
            task.add_done_callback(lambda _: self._attempt_ended(queue_id))
            if immediate:
                self._answering[queue_id] = hung_up
        return task

    def _attempt_ended(self, queue_id: str) -> None:
        fresh = queue_id in self._fresh_busy
        was_held_back = self._held_back(fresh=fresh)
        self._fresh_busy.discard(queue_id)
        if self._busy.pop(queue_id, None) is not None and (was_held_back or self._granted):
            self._wake.set()  # room for what is due again
        self._answering.pop(queue_id, None)
        self._refusing.discard(queue_id)

    def answered(self, queue_id: str, task: asyncio.Task[Outcome]) -> bool:
        """The immediate attempt's (``task``) client is told 250 now and a refusal
        reaches the sender as a notice; False when the attempt has already decided
        to pass its refusal back, or has done so: then the caller takes its outcome."""
        self._answering.pop(queue_id, None)
        if queue_id in self._refusing:
            return False
        ended = task.done() and not task.cancelled() and task.exception() is None
        return not (ended and task.result().status == "refused")

    def _client_waits(self, queue_id: str) -> bool:
        if queue_id not in self._answering:
            return False
        hung_up = self._answering[queue_id]
        return hung_up is None or not hung_up.is_set()

    def _start_due(self) -> None:
        """Start what is due, in order; the heap makes this cost what is due, not
        the size of the queue (a wake-up per accepted message, with thousands
        of deferred messages waiting, used to walk all of them). What was just
        accepted goes first (see ``_held_back`` for the places each kind keeps):
        after an outage the backlog, due earlier, took every place in line. Of
        the backlog, ``START_SLICE`` at a time: ``_sleep`` is 0 while more is due."""
        now = self.clock()
        self._start_kept(now)
        while self._granted and not self._held_back(fresh=self._granted[0][1]):
            self._start_granted(*self._granted.popleft(), now)
        while self._fresh and not self._held_back(fresh=True):
            queue_id = self._fresh.popleft()
            when = self._schedule.get(queue_id)  # a rescan may have planned it anew
            if when is not None and when <= now:
                self._start((when, queue_id), now, fresh=True)
        for _ in range(START_SLICE):
            if not self._due or self._due[0][0] > now or self._held_back(fresh=False):
                break
            self._start(heapq.heappop(self._due), now, fresh=False)

    def _start_kept(self, now: float) -> None:
        """Kept entries (``Untold``) go at their turn while ``_backlogged`` too: they
        deliver nothing, and as many of them as make it would otherwise wait
        for one another for good."""
        for queue_id in list(self._untold):
            when = self._schedule.get(queue_id)
            if when is not None and when <= now and queue_id not in self._busy:
                self.attempt_now(queue_id)

    def _start(self, item: tuple[float, str], now: float, fresh: bool) -> None:
        queue_id = item[1]
        if self._stale(item) or queue_id in self._busy or queue_id in self._parked:
            return  # a running or parked attempt plans what comes next itself
        if any(granted == queue_id for granted, _, _ in self._granted):
            return  # handed its slot, it starts at the next look
        if self._may_start(queue_id, now):
            self.attempt_now(queue_id, fresh=fresh)

    def _may_start(self, queue_id: str, now: float) -> bool:
        """False for an entry planned later instead."""
        if queue_id in self.accepting or (self._scan_error and queue_id not in self._warm):
            self._plan(queue_id, now + POLL)  # accepting, or in a spool that cannot be read
            return False
        later = self._suspensions.waits(queue_id, now, self.policy().queue.lifetime)
        if later is not None:  # waits for a suspended upstream: not read, not locked
            self._plan(queue_id, later)
            return False
        return True

    def _start_granted(self, queue_id: str, fresh: bool, slots: Slots, now: float) -> None:
        """A parked attempt whose turn came; one held, deleted or planned later
        meanwhile passes its slot on, unread."""
        when = self._schedule.get(queue_id)
        due = when is not None and when <= now and queue_id not in self._busy
        if due and self._may_start(queue_id, now):
            self.attempt_now(queue_id, fresh=fresh, granted=slots)
        else:
            slots.give_back()

    def _held_back(self, fresh: bool) -> bool:
        """Nothing more starts while as many attempts are under way as files may be
        open for them, nor while ``_backlogged``. Of them, a tenth is kept for
        mail just accepted (``fresh``) and a tenth for the mail that was waiting:
        either kind, filling all of them, left the other none. An attempt waiting
        for a delivery slot holds no file and is not under way: counted, one
        stalled upstream's attempts held every other upstream's mail back."""
        fresh_ones = len(self._fresh_busy) - self._in_line(True)
        others = len(self._busy) - len(self._fresh_busy) - self._in_line(False)
        if fresh_ones + others >= self._files or self._backlogged():
            return True
        kept = self._files // 10
        return (fresh_ones if fresh else others) >= self._files - kept

    def _in_line(self, fresh: bool) -> int:
        """Attempts of the kind waiting for a slot as tasks: warm ones, with their
        bytes, and immediate ones, whose client may wait for the outcome (the
        others are parked)."""
        return self._tasks_in_line[fresh]

    def _backlogged(self) -> bool:
        """Nothing new starts while the audit log refuses records (``_check_audit``):
        the outcomes could not be recorded, and the mail, left queued, went again
        at every restart with the log naming none of those sends. Nor while too
        many finished entries wait for the audit log, or entries kept
        (``Untold``) for the spool to take their failure notices, or for the
        audit log to take their deferrals and the spool to store them."""
        if self.recorder.refusing is not None:
            return True
        return self._settler.full or len(self._untold) >= WAITING_MAX

    def _limit(self, entry: QueueEntry) -> Slots:
        """The entry's upstream's share of ``queue.concurrency``. An entry whose
        upstream the policy no longer has is routed first, so that it counts
        against the upstream it goes to, not against the old name's."""
        policy = self.policy()
        name = _route(entry, policy)
        if name not in self._limits:
            self._limits[name] = Slots(policy.queue.concurrency, self._tasks_in_line)
        return self._limits[name]

    async def _deliver(
        self, queue_id: str, immediate: bool, fresh: bool, granted: Slots | None
    ) -> Outcome:
        try:
            outcome = await self._locked_attempt(queue_id, immediate, fresh, granted)
        except Exception:  # a fault of the relay's own: see _faulted
            return self._faulted(queue_id)
        if outcome.status == "parked":
            return outcome  # no outcome yet: it goes on at its turn
        tries = self._locked.pop(queue_id, 0)
        if outcome.status == "locked":  # being delivered, or held there until it can go
            self._locked[queue_id] = tries + 1
            self._plan(queue_id, self.clock() + _again_in(tries))
        elif outcome.status == "busy":
            self._plan(queue_id, self.clock() + POLL)
        elif outcome.status not in ("deferred", "later"):
            self._schedule.pop(queue_id, None)
            self._unstored.pop(queue_id, None)
        return outcome

    def _faulted(self, queue_id: str) -> Outcome:
        """An attempt that raised what no attempt should (a bug) ends with the
        entry as it was stored, perhaps after the upstream took the message: tried
        again at every scan, it would reach its recipients once a minute. It is
        tried again later and later instead, as a deferral kept in memory."""
        log.exception("%s: delivery attempt failed in the relay itself", queue_id)
        _, attempts = self._unstored.get(queue_id, (0.0, 0))
        delay = backoff(self.policy().queue, attempts + 1, self.rng)
        self._unstored[queue_id] = (self.clock() + delay, attempts + 1)
        self._plan(queue_id, self.clock() + delay)
        return Outcome("deferred")

    async def _locked_attempt(
        self, queue_id: str, immediate: bool, fresh: bool, granted: Slots | None
    ) -> Outcome:
        untold = self._untold.pop(queue_id, None)
        if untold is not None and untold.deferred:
            return await self._record_again(untold)
        if untold is not None:
            return await self._finish(untold.entry, self.policy(), untold.lock, untold)
        warm = self._warm.pop(queue_id, None)
        lock = EntryLock(None if warm is None else warm.lock)
        try:
            if granted is not None:
                with granted.handed():
                    return await self._locked_again(queue_id, lock, immediate)
            if warm is not None:
                try:
                    return await self._warm_attempt(warm, lock, immediate, fresh)
                finally:  # it counts until the attempt ends, waiting for a slot included
                    self._warm_bytes -= len(warm.data)
                    self._warm_files -= 1
            entry = self._remembered(self.spool.load(queue_id))
            not_now = self._not_now(entry, immediate)
            if not_now is not None:
                return not_now
            limit = self._limit(entry)
            if self._park(limit, entry, immediate, fresh):
                return Outcome("parked")
            async with limit.slot(fresh, entry.tenant):
                return await self._locked_again(entry.queue_id, lock, immediate)
        except NoSuchEntry:
            return Outcome("gone")
        except SpoolBusy:
            return Outcome("locked")
        except DamagedEntry as exc:
            return await self._hold_damaged(queue_id, exc)
        except SpoolError as exc:
            log.error("%s spool error: %s", queue_id, exc)
            return Outcome("busy")
        finally:
            lock.close()  # unless _finish took it over

    async def _hold_damaged(self, queue_id: str, damage: DamagedEntry) -> Outcome:
        """Held under the lock still in hand, not removed: the sysadmin judges what
        is left (a file put back whole is released, else deleted). Only held, it
        is not read again at every scan nor said again at each. The hold is
        stored, then recorded, as ``relay queue hold``'s is: a message released
        and delivered late, or deleted, had nothing in the audit log to say why
        it waited. One the audit log refuses is put back: no delivery starts
        until the log takes records again, and the next attempt holds it then."""
        try:
            entry = self.spool.load(queue_id)
            entry.held = True
            await asyncio.to_thread(self.spool.update, entry)
        except SpoolError as exc:
            log.error("%s not sent: %s; nor could it be put on hold: %s", queue_id, damage, exc)
            return Outcome("busy")
        self.recorder.held(entry, damage.strerror)
        try:
            await self.recorder.flush(queue_id, keep=True)
        except AuditError as refused:
            self.recorder.set_aside(queue_id, "held")
            return await self._unhold(entry, damage, refused)
        log.error("%s put on hold, not sent: %s", queue_id, damage)
        return Outcome("held")

    async def _unhold(
        self, entry: QueueEntry, damage: DamagedEntry, refused: AuditError
    ) -> Outcome:
        """A hold the audit log would not record, put back; where that fails too
        it stands, unrecorded, and is said so."""
        entry.held = False
        try:
            await asyncio.to_thread(self.spool.update, entry)
        except SpoolError as undo:
            log.error(
                "%s put on hold, not sent: %s; with no record of it: the audit log cannot"
                " record it (%s), and putting it back failed (%s)",
                entry.queue_id,
                damage,
                refused,
                undo,
            )
            return Outcome("held")
        log.error(
            "%s not sent: %s; not put on hold, the audit log cannot record it: %s"
            " (held once it takes records again)",
            entry.queue_id,
            damage,
            refused,
        )
        return Outcome("busy")

    async def _warm_attempt(
        self, warm: Warm, lock: EntryLock, immediate: bool, fresh: bool
    ) -> Outcome:
        """A slot free at once: the attempt goes under the lock taken at acceptance.
        Waiting for one is no delivery: the lock is let go meanwhile, or a slow
        upstream kept thousands of entries locked and ``relay queue delete`` and
        ``hold`` could stop none of them. It waits as a task, its bytes kept, not
        parked: what is warm is bounded (``WARM_TOTAL``), and parked, each
        message of a busy relay was read back from the spool at its turn."""
        limit = self._limit(warm.entry)
        if not limit.locked():
            async with limit.slot(fresh, warm.entry.tenant):
                return await self._attempt(warm.entry, lock, immediate, warm.data)
        lock.close()
        async with limit.slot(fresh, warm.entry.tenant):
            return await self._locked_again(
                warm.entry.queue_id, lock, immediate, warm.data, warm.entry
            )

    def _park(self, limit: Slots, entry: QueueEntry, immediate: bool, fresh: bool) -> bool:
        """An attempt that would wait for a slot leaves the line its queue ID, and
        is started again at its turn: waiting as a task, with its record and
        bytes, a stalled upstream's backlog filled the attempts a worker may
        have under way and held every other upstream's mail back. Not an
        immediate one: its client may still wait for the outcome."""
        if immediate or not limit.locked():
            return False
        self._parked.add(entry.queue_id)
        granted = functools.partial(self._slot_granted, entry.queue_id, fresh, limit)
        limit.park(fresh, entry.tenant, granted)
        return True

    def _slot_granted(self, queue_id: str, fresh: bool, limit: Slots) -> None:
        """A parked attempt's turn: started at the next look, before anything else.
        From the signal to stop on no look starts it, and the slot goes on to
        the next in line: kept, the attempts waiting for one as tasks (handed
        over at acceptance) waited out the stop's last 5 s, and were logged as
        attempts that had not ended, never tried."""
        self._parked.discard(queue_id)
        if not self._starting:
            asyncio.get_running_loop().call_soon(limit.give_back)  # not within give_back
            return
        self._granted.append((queue_id, fresh, limit))
        self._wake.set()

    async def _locked_again(
        self,
        queue_id: str,
        lock: EntryLock,
        immediate: bool,
        data: bytes | None = None,
        first: QueueEntry | None = None,
    ) -> Outcome:
        """The attempt, with a delivery slot in hand, under the entry's lock taken
        now and its record as it is now: held, deleted or tried meanwhile. ``first``
        is the record as accepted, where the receiving side handed it over."""
        lock.fd = self.spool.acquire(queue_id, blocking=False)
        entry = self._remembered(self.spool.load(queue_id, first))
        not_now = self._not_now(entry, immediate)
        if not_now is not None:
            return not_now
        return await self._attempt(entry, lock, immediate, data)

    def _not_now(self, entry: QueueEntry, immediate: bool) -> Outcome | None:
        if entry.held:
            return Outcome("held")
        when = self._next_attempt(entry.queue_id, entry.next_attempt, entry.last_written)
        if when > self.clock() + POLL and not immediate:
            self._plan(entry.queue_id, when)
            return Outcome("later")
        return None

    async def _attempt(
        self, entry: QueueEntry, lock: EntryLock, immediate: bool = False, data: bytes | None = None
    ) -> Outcome:
        # checked again here: attempts may wait long for a slot, and one that
        # gets it after the stop began would start a transaction the grace cuts off
        if not self._starting or self._backlogged():
            return Outcome("busy")
        stored = {r.address: (r.status, r.notify) for r in entry.recipients}
        policy = self.policy()
        dropped = self._drop_listed(entry)
        self._look_at_clock()
        now = self.clock()
        arrival = self._steps.arrival(entry.arrival)
        deadline = arrival + policy.queue.lifetime
        upstream = policy.upstreams.get(entry.upstream) or _rerouted(entry, policy)
        held = _sender_changed(entry, upstream)
        if held is not None:
            upstream = None
        pending = [r.address for r in entry.pending()]
        own = _own(entry, pending) if immediate else pending
        cut: set[str] = set()  # recipients the stop cut off before the upstream answered
        shared: Mapping[str, str] = {}  # see ``Attempt``
        sender_refused = None
        crowded = False
        via = upstream  # the one whose replies are final: a fallback, or none when all failed
        if not pending:
            # each settled at its arrival or listed since (suppressed): no upstream to
            # ask, nor to wait for when suspended, nor to count an attempt of or call reached
            replies: dict[str, tuple[int, str]] = {}
        elif upstream is None:
            replies = dict.fromkeys(pending, (451, held or _no_upstream(entry, policy)))
        else:
            chain = _chain(entry, upstream, policy)
            first, passed, later = self._admitted(entry, chain, now, arrival)
            if first is None and now < deadline:
                self._plan(entry.queue_id, later)
                return Outcome("later")
            if first is None:  # past its lifetime: it ends with what the last tries found
                replies = dict.fromkeys(pending, (451, _unusable_text(passed)))
            else:
                send = self.send
                if immediate and self._client_waits(entry.queue_id) and own != pending:
                    send = functools.partial(send, needed=own)  # the copy goes with them or not
                self._sending.add(entry.queue_id)
                try:
                    try:  # a try that ends without a word must not leave the upstream waiting
                        if data is None:
                            data = self.spool.read_message(entry.queue_id, entry.size)
                        if entry.sign_again is not None:
                            data = signed_anew(policy, entry, data)
                    except BaseException:
                        began = self.clock()
                        self._suspensions.ended(first, entry.queue_id, began, None, began, 0.0)
                        raise
                    _say(dropped)
                    sent, via, cut = await self._through(
                        entry, chain, first, passed, send, pending, data
                    )
                finally:
                    self._sending.discard(entry.queue_id)
                replies, shared, sender_refused = sent.replies, sent.shared, sent.sender_refused
                crowded = sent.crowded
        _say(dropped)  # without a send, nothing is left to stop the attempt
        if not crowded:  # no verdict: nor a count towards the next backoff
            entry.attempts += 1
            for rcpt in entry.pending():
                rcpt.attempts += 1
        answered_by = via or upstream
        via_name = None if answered_by is None else answered_by.name
        if sender_refused is not None and answered_by is not None:
            _warn_of_refused_sender(entry, policy, answered_by, sender_refused)
        if immediate and _refused(pending, own, replies) and self._client_waits(entry.queue_id):
            self._answering.pop(entry.queue_id)
            self._refusing.add(entry.queue_id)  # the client hears it: no 250 any more
            refusal = replies[own[0]][1]
            if sender_refused is not None and entry.mail_from and answered_by is not None:
                refusal = _refused_sender_reply(entry, answered_by, sender_refused)
            return await self._refuse(entry, pending, refusal, replies, shared, via_name)
        deferred = False
        bounced: list[tuple[str, str]] = []
        expires = _expires(now, deadline, crowded)
        for address in pending:
            code, reply = replies.get(address, (451, "451 4.3.0 no reply for this recipient"))
            if 200 <= code < 300:
                self._settle(entry, address, DELIVERED, reply, via_name)
            elif code >= 500:
                self._settle(entry, address, FAILED, reply, via_name)
                bounced.append((address, reply))
            elif expires and address not in cut:  # the last try, as in Postfix
                lifetime = duration(policy.queue.lifetime)
                reply = f"not delivered within {lifetime}; last reply: {reply}"
                self._settle(entry, address, EXPIRED, reply, via_name)
            else:
                deferred = True
                self._note(entry, address, reply)
        await self._suppress(entry, policy, bounced, shared)
        if not deferred:
            _say_untold(entry)
            return await self._finish(entry, policy, lock)
        ended = self.clock()  # the wait runs from the attempt's end: a timeout may be long
        # one the stop cut off goes at the next start, as one it never began would
        wait = 0.0 if cut else backoff(policy.queue, entry.attempts, self.rng)
        suspended = upstream is not None and self._suspensions.suspended(upstream)
        if via in (None, upstream) and suspended:
            # the one try of a suspended upstream waits no longer than those it tried
            # for: its own backoff, doubled at each try, had it come 88 s after the
            # upstream was back, where the waiting ones went at once
            wait = min(wait, policy.queue.first_retry)
        if crowded:  # no verdict on the upstream: nor the backoff of one
            wait = min(wait, CROWDED_WAIT)
        # past the lifetime only a try crowded out or cut off is deferred: it waits its wait
        entry.next_attempt = ended + wait if now >= deadline else min(ended + wait, deadline)
        for rcpt in entry.pending():
            reply = rcpt.reply or ""
            self.recorder.deferred(entry, rcpt.address, reply, entry.next_attempt, via_name)
        await self._notify(entry, policy)
        changed = [r.address for r in entry.recipients if (r.status, r.notify) != stored[r.address]]
        if not await self._flush(entry):
            kept = self._keep(entry, lock, None, deferred=True, unstored=changed)
            self._store_written(self._untold[entry.queue_id])
            return kept
        if not await self._store(entry) and changed:
            return self._keep(entry, lock, None, deferred=True, unstored=changed)
        self._plan(entry.queue_id, entry.next_attempt)
        return Outcome("deferred")

    def _admitted(
        self, entry: QueueEntry, chain: list[Upstream], now: float, arrival: float
    ) -> tuple[Upstream | None, list[tuple[Upstream, str]], float]:
        """The first of ``chain`` (the entry's upstream, then its fallbacks) the
        message may try now, or None; those passed over for a suspension, each
        with what its last try found; and, with none to try, when to look again.

        While its own upstream is suspended a message goes through a fallback
        instead of waiting, except the one the suspension lets try. With every
        one suspended it waits for its own upstream (and a fallback reached
        again lets it go, ``_stood_in``). A message past its lifetime is not
        tried on an upstream known to be down: each such message came one
        ``first_retry`` behind the one before (a thousand behind a dead
        smarthost, hours late, their senders' notices too); tried each, those
        expiring together would be a burst of connections at a host known to
        be down. It ends with what the last tries found."""
        passed: list[tuple[Upstream, str]] = []
        later = now
        for index, upstream in enumerate(chain):
            when = self._admits(entry, upstream, now, arrival, wait_here=index == 0)
            if when is None:
                if index:
                    self._suspensions.unwait(entry.queue_id)  # it goes another way
                return upstream, passed, now
            later = when if index == 0 else later
            passed.append((upstream, self._suspensions.reply(upstream)))
        return None, passed, later

    async def _through(
        self,
        entry: QueueEntry,
        chain: list[Upstream],
        upstream: Upstream,
        passed: list[tuple[Upstream, str]],
        send: Sender,
        pending: list[str],
        data: bytes,
    ) -> tuple[Attempt, Upstream | None, set[str]]:
        """The attempt through ``upstream``, admitted, and on through the fallbacks
        after it in ``chain`` while each is unusable (Postfix's
        ``smtp_fallback_relay``), with the same recipients and bytes: the first
        reached answers for the attempt, a recipient's refusal included, which is
        about the message, not the host. Each tried is told to the suspensions
        and the slots with its own result. Returned: the attempt, the upstream
        whose replies are final (None when none could be used), and the
        recipients the stop cut off before it answered them."""
        settings = self.policy().queue
        tried = list(passed)
        while True:
            began = self.clock()
            answered: dict[str, tuple[int, str]] = {}  # as this upstream answers
            try:
                sent = await send(
                    upstream,
                    entry.mail_from,
                    pending,
                    data,
                    envelope_id=entry.queue_id,
                    go_on=self._going_on,
                    replies=answered,
                )
            except BaseException as exc:
                self._suspensions.ended(upstream, entry.queue_id, began, None, self.clock(), 0.0)
                if not (isinstance(exc, asyncio.CancelledError) and self._stopping):
                    raise
                # cut off by the stop (``stop``): an attempt all the same, each recipient
                # with the reply it got or none, on record before the next start's
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                said = CUT_OFF if sent_in_full(exc) else CUT_SHORT
                cut = set(pending) - answered.keys()
                return Attempt({**dict.fromkeys(pending, (451, said)), **answered}), upstream, cut
            self._reached(upstream, entry.queue_id, began, sent, settings)
            if sent.crowded or sent.unreachable is None:
                return sent, upstream, set()
            tried.append((upstream, sent.unreachable))
            failed = upstream
            upstream = self._next_fallback(entry, chain, upstream, tried)
            if upstream is None:
                if len(tried) == 1:
                    return sent, None, set()
                return _unusable(pending, tried), None, set()
            log.info(
                "%s: upstream %s unusable (%s): trying fallback %s",
                entry.queue_id,
                failed.name,
                sent.unreachable,
                upstream.name,
            )

    def _admits(
        self, entry: QueueEntry, upstream: Upstream, now: float, arrival: float, wait_here: bool
    ) -> float | None:
        """``Suspensions.admits`` with the queue's settings: None when ``entry`` may
        try ``upstream`` now."""
        queue = self.policy().queue
        wait, lifetime = queue.first_retry, queue.lifetime
        return self._suspensions.admits(
            upstream, entry.queue_id, now, wait, arrival, lifetime, wait_here=wait_here
        )

    def _next_fallback(
        self,
        entry: QueueEntry,
        chain: list[Upstream],
        after: Upstream,
        tried: list[tuple[Upstream, str]],
    ) -> Upstream | None:
        """The fallback after ``after`` the message may try now; those passed over
        for a suspension are added to ``tried`` with what their last try found."""
        for upstream in chain[chain.index(after) + 1 :]:
            arrival = self._steps.arrival(entry.arrival)
            if self._admits(entry, upstream, self.clock(), arrival, wait_here=False) is None:
                return upstream
            tried.append((upstream, self._suspensions.reply(upstream)))
        return None

    def _going_on(self) -> bool:
        """Whether an attempt may start a further transaction (``relay.deliver``)."""
        return self._starting

    def _reached(
        self,
        upstream: Upstream,
        queue_id: str,
        began: float,
        sent: Attempt,
        settings: QueueSettings,
    ) -> None:
        """What an attempt found of its upstream: unusable, its messages wait (said
        once); usable again, the ones that waited go now; crowded, nothing."""
        was = self._suspensions.suspended(upstream)
        now, wait, unreachable = self.clock(), settings.first_retry, sent.unreachable
        unusable = None if sent.crowded else unreachable is not None
        self._slots_learn(upstream, sent.crowded, unusable is False)
        waiting = self._suspensions.ended(
            upstream, queue_id, began, unusable, now, wait, unreachable or ""
        )
        if self._suspensions.suspended(upstream):
            if unusable:
                self._show_suspension(upstream.name, True)
        elif was:
            self._show_suspension(upstream.name, False)
        if unreachable is not None and not was and self._suspensions.suspended(upstream):
            fallbacks = upstream.fallback if isinstance(upstream, SmtpUpstream) else ()
            others = f"go through {_fallback_names(fallbacks)}" if fallbacks else "wait for it"
            log.warning(
                "upstream %s suspended: %s; one message is tried every %gs, the others %s",
                upstream.name,
                unreachable,
                wait,
                others,
            )
        if waiting is not None:
            self._release(upstream.name, waiting, now, "reached again")
        if unusable is False:
            self._stood_in(upstream, now)

    def _stood_in(self, fallback: Upstream, now: float) -> None:
        """``fallback`` was reached: the mail that waited for a suspended upstream
        it stands in for, while it was suspended too, goes through it now."""
        for upstream in self._suspensions.upstreams():
            names = upstream.fallback if isinstance(upstream, SmtpUpstream) else ()
            waiting = self._suspensions.let_go(upstream) if fallback.name in names else set()
            if waiting:
                how = f"suspended, its fallback {fallback.name} reached"
                self._release(upstream.name, waiting, now, how)

    def _slots_learn(self, upstream: Upstream, crowded: bool, reached: bool) -> None:
        """An upstream's connection limit, as its refusals of one connection more
        show it, narrows its slots; deliveries widen them again (``relay.slots``)."""
        name = upstream.name
        limit = self._limits.get(name)
        if limit is None:
            return
        if crowded:
            before = limit.size
            limit.crowded()
            self._limited[name] = upstream
            if limit.size < before:
                log.info(
                    "upstream %s refused a connection over its limit: %s"
                    " of %d in this worker until deliveries show room for more",
                    name,
                    quantity(limit.size, "delivery slot"),
                    limit.full,
                )
        elif reached:
            limit.reached()

    def _forget_limits(self, upstreams: Mapping[str, Upstream]) -> None:
        """An upstream a reload pointed elsewhere, or renamed, starts with all its
        slots, as it starts afresh for the suspensions: the narrowing was
        another smarthost's limit."""
        for name, was in list(self._limited.items()):
            if upstreams.get(name) != was:
                del self._limited[name]
                if name in self._limits:
                    self._limits[name].widen_fully()

    def _reached_elsewhere(self) -> None:
        """Another worker's attempt, begun since this one's last failure, reached an
        upstream this worker holds mail for: it goes now."""
        if self._tally is None:
            return
        now = self.clock()
        for upstream in self._suspensions.upstreams():
            if self._tally.reached_since_held(upstream.name):
                waiting = self._suspensions.reached(upstream, now)
                self._show_suspension(upstream.name, False)
                self._release(upstream.name, waiting or set(), now, "reached by another worker")
                self._stood_in(upstream, now)

    def _release(self, name: str, waiting: set[str], now: float, how: str) -> None:
        going = [waiter for waiter in waiting if waiter in self._schedule]
        said = quantity(len(going), "waiting message")
        go = "goes" if len(going) == 1 else "go"
        log.info("upstream %s %s: %s %s now", name, how, said, go)
        for waiter in going:
            self._plan(waiter, now)
        self._wake.set()

    def _show_suspension(self, name: str, held: bool) -> None:
        """For the metrics: the upstream found unusable just now (told at each such
        failure, so that another worker's earlier delivery does not hide it), or
        no longer held back."""
        if self._tally is None:
            return
        if held:
            self._shown_suspended.add(name)
        elif name in self._shown_suspended:
            self._shown_suspended.discard(name)
        else:
            return
        self._tally.suspended(name, held)

    async def _store(self, entry: QueueEntry) -> bool:
        """Whether the spool took the deferral. One it refuses is kept in memory
        instead, and the trouble logged once, not at every attempt; a restart
        forgets it (retried sooner). The caller keeps an entry whose recipients'
        outcomes changed (``Untold``)."""
        try:
            await asyncio.to_thread(self.spool.update, entry)
        except NoSuchEntry:
            raise
        except SpoolError as exc:
            self._unstored[entry.queue_id] = (entry.next_attempt, entry.attempts)
            if self._store_error is None:
                log.error(
                    "cannot store deferrals; their next attempts are kept in memory, and a"
                    " message some of whose recipients were delivered, failed or suppressed"
                    " stays locked until its outcomes are stored: %s",
                    exc,
                )
            self._store_error = exc
            return False
        self._unstored.pop(entry.queue_id, None)
        if self._store_error is not None:
            log.info("deferrals stored again")
            self._store_error = None
        return True

    def _remembered(self, entry: QueueEntry) -> QueueEntry:
        """The entry as stored, with the deferral the spool could not store; a
        ``relay queue retry`` stored since (next attempt 0) makes it due now."""
        if entry.next_attempt == 0.0:
            self._unstored.pop(entry.queue_id, None)
        when, attempts = self._unstored.get(entry.queue_id, (0.0, 0))
        entry.next_attempt = max(entry.next_attempt, when)
        entry.attempts = max(entry.attempts, attempts)
        return entry

    async def _refuse(
        self,
        entry: QueueEntry,
        pending: list[str],
        refusal: str,
        replies: dict[str, tuple[int, str]],
        shared: Mapping[str, str],
        via: str | None = None,
    ) -> Outcome:
        """The message refused as its client hears it (``refusal``); the automatic
        BCC copy, which the upstream may have taken, fails with it, not sent."""
        for address in pending:
            code, reply = replies.get(address, (451, ""))
            if code < 500:
                reply = f"not sent: the message was refused ({refusal})"
            self._settle(entry, address, FAILED, reply, via)
        refused = [(a, replies[a][1]) for a in pending if a in replies]
        await self._suppress(entry, self.policy(), refused, shared)
        try:
            await self.recorder.flush(entry.queue_id, keep=True)
        except AuditError as exc:
            return await self._keep_unrecorded(entry, pending, refusal, exc)
        try:
            await asyncio.to_thread(self.spool.remove, entry.queue_id)
        except SpoolError as exc:
            if self.spool.message_path(entry.queue_id).exists():
                raise  # still queued: busy, and the next attempt tells the sender
            log.error("%s refused; its removal may not be durable: %s", entry.queue_id, exc)
        return Outcome("refused", refusal)

    async def _keep_unrecorded(
        self, entry: QueueEntry, pending: list[str], reply: str, error: AuditError
    ) -> Outcome:
        """A refusal whose records the audit log refused: removed now, the message
        would end with no final record. It stays queued, pending, with its next
        attempt planned and stored; its client hears 250, and the next refusal
        reaches the sender as a notice. Its ``failed`` records go with the
        failures; the rest stay for its next records. An address it put on the
        suppression list stays listed, its ``listed`` record written apart from
        the message (``_record_listed``), as the next refusal finds the address
        listed already."""
        self.recorder.set_aside(entry.queue_id, "failed")
        entry.next_attempt = self.clock() + backoff(self.policy().queue, entry.attempts, self.rng)
        for rcpt in entry.recipients:
            if rcpt.address in pending:
                rcpt.status = PENDING
        log.error(
            "%s: AUDIT LOG WRITE FAILED, so not bounced: kept in the queue until %s: %s",
            entry.queue_id,
            local_time(entry.next_attempt),
            error,
        )
        try:
            await asyncio.to_thread(self.spool.update, entry)
        except SpoolError as exc:  # the arrival's record stays: tried again sooner
            log.error("%s: cannot store the next attempt: %s", entry.queue_id, exc)
        self._plan(entry.queue_id, entry.next_attempt)
        return Outcome("deferred", reply)

    async def _flush(self, entry: QueueEntry) -> bool:
        """A deferral's records; False when the log refuses them, which leaves
        them with the recorder for the caller to keep with the entry."""
        try:
            await self.recorder.flush(entry.queue_id, keep=True)
        except AuditError as exc:
            log.error(
                "%s: AUDIT LOG WRITE FAILED, the deferral kept, locked, until the log takes it: %s",
                entry.queue_id,
                exc,
            )
            return False
        return True

    async def _recorded(self, untold: Untold) -> bool:
        """Whether a kept deferral's records are written and it is stored now, as
        its attempt would have; then its next attempt is planned. Records once
        written are not written again while the spool refuses the outcomes."""
        try:
            await asyncio.to_thread(self.recorder.write, untold.records)
        except AuditError:
            return False
        untold.records = []
        if not await self._store(untold.entry) and untold.unstored:
            return False
        self._plan(untold.entry.queue_id, untold.entry.next_attempt)
        return True

    def _store_written(self, untold: Untold) -> None:
        """A kept deferral's outcomes the log took before it refused the rest (a
        refusal written with its listing, ``_record_listed``), stored now. Left
        pending on the spool, a stop or a crash before the log took the rest had
        the next start record the refused address again, ``suppressed`` once
        listed, failing the automatic copy with it, or send to it again. Stored
        on the event loop: awaited in a thread, the stop could let the kept entry
        go meanwhile, storing it whole, and this older part landed over it."""
        unwritten = {r["recipient"] for r in untold.records if r["event"] in FINAL_EVENTS}
        done = {
            r.address: r
            for r in untold.entry.recipients
            if r.status != PENDING and r.address not in unwritten
        }
        if not done:  # nothing on record to store; a broken spool said otherwise
            return
        queue_id = untold.entry.queue_id
        try:
            stored = self.spool.load(queue_id)
            written = [r for r in stored.recipients if r.status == PENDING and r.address in done]
            for rcpt in written:
                rcpt.status, rcpt.reply = done[rcpt.address].status, done[rcpt.address].reply
                rcpt.updated = done[rcpt.address].updated
            if written:
                self.spool.update(stored)
        except SpoolError as exc:
            log.error("%s: cannot store the outcomes on record: %s", queue_id, exc)

    async def _record_again(self, untold: Untold) -> Outcome:
        """A kept deferral's turn: stored once its records are written and the
        spool takes it, else kept again, a little later each time. Taken out of
        the kept ones first, so that a stop meanwhile does not store it too."""
        try:
            if await self._recorded(untold):
                return Outcome("deferred")
            return self._keep(untold.entry, untold.lock, untold, deferred=True)
        finally:
            untold.lock.close()  # unless kept again

    async def _suppress(
        self,
        entry: QueueEntry,
        policy: Policy,
        refused: list[tuple[str, str]],
        shared: Mapping[str, str],
    ) -> None:
        """Put the addresses the upstream refused as not existing on the suppression
        list, so that no later message goes to them: mail to dead mailboxes is
        what gets a platform's mail taken for spam. Only a recipient's own
        refusal lists it (``shared``: those whose reply was the transaction's).
        A list that cannot be written does not change the delivery's outcome."""
        settings = policy.suppression
        if settings is None:
            return
        when, scope = now(), _refused_for(entry, policy)
        hard = [(a, r) for a, r in refused if r[:1] == "5" and dsn(r) in settings.hard_bounce]
        entries = []
        for address, reply in hard:
            if address in shared:
                log.info(
                    "%s: <%s> is not put on the suppression list: %s (%s)",
                    entry.queue_id,
                    address,
                    shared[address],
                    reply,
                )
                continue
            user = _tenant_user(entry, policy, address)
            if user is not None:
                log.warning(
                    "%s: <%s> is not put on the suppression list: %s, where the relay's"
                    " notices and copies go; check the user's address in the policy (%s)",
                    entry.queue_id,
                    address,
                    user,
                    reply,
                )
            elif self._listed(address, scope or "") is None:  # the entry keeps its first date
                entries.append(Suppression(address, scope, BOUNCE, when, reply, entry.queue_id))
        if entries:
            await self._add_listed(settings.file, entries, entry)

    async def _add_listed(
        self, path: Path, entries: list[Suppression], entry: QueueEntry | None = None
    ) -> None:
        """With the entries kept from writes the list refused; kept again if it
        refuses this one too (``Backlog``). ``entry``: the message whose
        refusals ``entries`` are. What is listed already is decided under the
        file's lock: two workers refused the same address at once, and both
        listed it. Only what was written is said and recorded as listed."""
        kept = self._unlisted.kept()
        held = {k.key for k in kept}  # bounced again while kept: the first refusal stands
        items = [*kept, *(e for e in entries if e.key not in held)]
        if not items:
            return
        try:
            read = await asyncio.to_thread(
                SuppressionFile(path).add_unlisted, items, _later_refusal, every_tenant=True
            )
        except SuppressionError as exc:
            self._unlisted.keep(items[len(kept) :], exc)
            if entry is not None and len(items) > len(kept):
                self._kept_ids[entry.queue_id] = entry.message_id
            return
        self._unlisted.written(kept)
        written = added(items, read, _later_refusal, every_tenant=True)
        for item in written:
            log.info(
                "%s: <%s> is on the suppression list now, for %s (%s)",
                item.queue_id,
                item.address,
                "every tenant" if item.tenant is None else f"tenant {item.tenant}",
                item.detail,
            )
        await self._record_listed(written, entry)

    async def _record_listed(self, items: list[Suppression], entry: QueueEntry | None) -> None:
        """A ``listed`` record for each entry written, on its message, written at
        once: with ``entry``'s records so far (its refusal first), those kept
        from other messages alone, as those messages may have ended meanwhile.
        One the audit log refuses waits for it apart from its message
        (``_write_listings``): kept for the message's next records, it was
        lost with a message deleted or finished meanwhile, or with the worker."""
        ids = {**self._kept_ids, **({entry.queue_id: entry.message_id} if entry else {})}
        for item in items:
            self.recorder.listed(item, ids.get(item.queue_id or ""))
        still = {k.queue_id for k in self._unlisted.kept()}
        self._kept_ids = {q: m for q, m in self._kept_ids.items() if q in still}
        for queue_id in {item.queue_id for item in items}:
            try:
                await self.recorder.flush(queue_id, keep=True)
            except AuditError as exc:
                self._listings += self.recorder.set_aside(queue_id, "listed")
                log.error(
                    "%s: AUDIT LOG WRITE FAILED, its listing kept until the log takes it: %s",
                    queue_id,
                    exc,
                )

    async def _write_listings(self, stopping: bool = False) -> None:
        """The ``listed`` records the audit log refused, once it takes records
        again; at the stop a last try, and those it refuses still are named."""
        listings, self._listings = self._listings, []
        if not listings:
            return
        try:
            await asyncio.to_thread(self.recorder.write, listings)
        except AuditError as exc:
            self._listings = listings + self._listings
            if stopping:
                log.error(
                    "stopping before the audit log took the record of %s, which %s on the"
                    " suppression list: %s (%s)",
                    quantity(len(listings), "listing"),
                    "stays" if len(listings) == 1 else "stay",
                    " ".join(f"{r['queue_id']}:<{r['recipient']}>" for r in listings),
                    exc,
                )

    def _listed(self, address: str, tenant: str) -> Suppression | None:
        """The entry keeping ``address`` from ``tenant``'s mail; None also when the
        list cannot be read (said where the messages are refused for it)."""
        if self._suppressions is None:
            return None
        try:
            return self._suppressions.current().find(address, tenant)
        except SuppressionError:
            return None

    def _drop_listed(self, entry: QueueEntry) -> list[Callable[[], None]]:
        """Recipients listed since their message came (another message's bounce,
        ``relay bounce``, ``relay suppression add``) are not sent to either: a
        deferred message reached an address that had bounced or complained
        meanwhile. Each ends suppressed as at acceptance, its sender told; the
        automatic copy of a document nobody is left to get goes with them, as
        it would have at acceptance. The list is the worker's index, one
        ``stat`` an attempt; one that cannot be read leaves the check to the
        next attempt (the acceptance side refuses mail for it and says so). A
        recipient still pending after a refusal for good is one whose records
        the audit log refused (``_keep_unrecorded``): the address its refusal
        listed goes again, for the refusal to be on record.

        Only the entry in memory changes here: the lines and records are
        returned, for the attempt to make (``_say``) once nothing can stop it.
        Made here, an attempt that waited (a suspended upstream) or failed to
        read its message left them behind, and each later one added its own:
        three ``suppressed`` records for one recipient, or one followed by a
        ``delivered`` once the address was taken off the list meanwhile."""
        if self._suppressions is None or not entry.pending():
            return []
        try:
            listing = self._suppressions.current()
        except SuppressionError:
            return []
        said: list[Callable[[], None]] = []
        for rcpt in entry.pending():
            if (rcpt.reply or "")[:1] == "5":  # its refusal went unrecorded: it goes again
                continue
            found = listing.find(rcpt.address, entry.tenant)
            if found is not None:
                rcpt.status, rcpt.reply = SUPPRESSED, f"not sent: {found.describe()}"
                rcpt.updated = self.clock()
                said.append(
                    functools.partial(self.recorder.suppressed_later, entry, rcpt.address, found)
                )
        if said:
            said += self._drop_lone_copy(entry)
        return said

    def _drop_lone_copy(self, entry: QueueEntry) -> list[Callable[[], None]]:
        """The automatic copy fails, not sent, once every recipient the client
        named is suppressed: at acceptance such a message got no copy. Its
        ``failed`` line and record are returned, as ``_drop_listed``'s are."""
        copies = [r for r in entry.pending() if not r.notify]  # a notice's are all its own
        named = [r for r in entry.recipients if r.notify or r.status != PENDING]
        if not copies or not named or any(r.status != SUPPRESSED for r in named):
            return []
        for rcpt in copies:
            self._note(entry, rcpt.address, NO_COPY).status = FAILED
        return [functools.partial(self.recorder.failed, entry, r.address, NO_COPY) for r in copies]

    def _settle(
        self, entry: QueueEntry, address: str, status: str, reply: str, via: str | None = None
    ) -> None:
        """``via``: the upstream that answered, when not the entry's own (a fallback)."""
        rcpt = self._note(entry, address, reply)
        rcpt.status = status
        if status == DELIVERED:
            self.recorder.delivered(entry, address, reply, via)
        elif status == FAILED:
            self.recorder.failed(entry, address, reply, via)
        else:
            self.recorder.expired(entry, address, reply, via)

    def _note(self, entry: QueueEntry, address: str, reply: str) -> RecipientState:
        rcpt = next(r for r in entry.recipients if r.address == address)
        rcpt.reply = reply
        rcpt.updated = self.clock()
        return rcpt

    async def _notify(self, entry: QueueEntry, policy: Policy) -> bool:
        """Queue a notice for the failures the sender has not heard of yet; each is
        told once (``notify`` goes False), so one that fails while others are
        deferred is told now, as Postfix does, not when the last is done (days
        later, or never if the message is deleted meanwhile). Never for mail
        with an empty envelope sender, notices included (RFC 5321 4.5.5)."""
        told = self._told.get(entry.queue_id, set())
        failures = [
            r
            for r in entry.recipients
            if r.status in (FAILED, EXPIRED, SUPPRESSED) and r.notify and r.address not in told
        ]
        due = telling(
            entry.mail_from,
            entry.notify_address,
            [r.address for r in failures],
            lambda address: self._listed(address, entry.tenant),
        )
        if due is None:
            return True
        if due.withheld is not None:
            log.info(
                "%s: no failure notice: <%s> is on the suppression list since %s",
                entry.queue_id,
                entry.notify_address,
                due.withheld.since,
            )
            for rcpt in failures:
                rcpt.notify = False
            return True
        notice, data = build_notice(policy, entry, failures, self.clock())
        try:
            await asyncio.to_thread(self.spool.put, notice, data)
        except SpoolError as exc:
            log.error("%s could not queue the failure notice: %s", entry.queue_id, exc)
            return False
        self.recorder.notice(entry, notice)
        self.submit(notice.queue_id)
        for rcpt in failures:
            rcpt.notify = False  # stored with the deferral; until then, and if that fails:
            told.add(rcpt.address)
        self._told[entry.queue_id] = told
        return True

    async def _finish(
        self, entry: QueueEntry, policy: Policy, lock: EntryLock, untold: Untold | None = None
    ) -> Outcome:
        """Queue a notice for the failures the sender should hear of, then drop the entry.

        If the spool cannot take the notice (a full disk), the entry stays,
        locked, with its records, and the notice is tried again, each time
        later (up to a RESCAN); at a stop it goes without."""
        if not await self._notify(entry, policy):
            return self._keep(entry, lock, untold)
        self._told.pop(entry.queue_id, None)
        records = [] if untold is None else untold.records
        records += self.recorder.take(entry.queue_id)
        backlogged = self._backlogged()
        await self._done(Finished(entry.queue_id, records, EntryLock(lock.take()), entry.size))
        if backlogged:
            self._wake.set()  # what was held back may start now
        statuses = {r.status for r in entry.recipients}
        return Outcome(DELIVERED if statuses == {DELIVERED} else FAILED)

    def _keep(
        self,
        entry: QueueEntry,
        lock: EntryLock,
        untold: Untold | None,
        deferred: bool = False,
        unstored: list[str] | None = None,
    ) -> Outcome:
        """Keep the entry, locked, with its records, until its turn comes (a second
        later, then later each time, up to a RESCAN): locked, no other worker
        sends it again, nor can ``relay queue`` change it meanwhile."""
        tries = 0 if untold is None else untold.tries + 1
        records = [] if untold is None else untold.records
        records += self.recorder.take(entry.queue_id)
        if untold is not None:
            unstored = untold.unstored
        kept = Untold(entry, records, EntryLock(lock.take()), tries, deferred, unstored or [])
        self._untold[entry.queue_id] = kept
        self._plan(entry.queue_id, self.clock() + _again_in(tries))
        return Outcome("deferred")
