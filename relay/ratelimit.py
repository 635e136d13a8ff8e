"""How many recipients each tenant's mail went to in the last hour, across workers.

A tenant's ``recipients_per_hour`` caps what a stolen ERP login, or an ERP
gone wrong in a loop, can send under the platform's DKIM signature before
someone notices (Postfix's anvil does this per client). The counts are in a
``sharedtable``: each worker writes its own row and reads them all to
decide, so two workers deciding at the same moment may each let one message
through past the limit. They live in memory, as anvil's do: a restart of the
relay forgets the last hour. A tenant's slot holds ``BUCKETS`` buckets, each
the minute it counts (upper 32 bits) and the count (lower 32); the minutes
are the monotonic clock's, the same in every process and never set.

The hour is counted in whole minutes, and the minute ``MINUTES`` back counts
whole too: mail sent in a minute's last second stopped counting 59 minutes
and a second later, so a tenant could send twice its limit in an hour that
straddled it. Now nothing sent in the last 60 minutes is forgotten, and a
recipient counts for 60 to 61 minutes.

A worker's row is sized at the start, before the fork, for ``ROOM`` times
the policy's limited tenants (at least ``SLOTS``), a slot being 504 bytes
(2 MB a worker at the least): sized for every tenant, 20,000 tenants and 8
workers took 155 MB of shared memory, made resident by the first metrics
scrape. Each tenant that sends in an hour takes a slot. A tenant with a
limit in the worker's policy as it is now keeps its slot while it counts
anything, also one a reload limited before its next message; one without
gives its slot to a newcomer when the few near the newcomer's place are
all taken, the least counted first, so that beyond a few thousand tenants
sending in an hour the unlimited ones' counts are approximate (a heavy
sender's the last to go). A full row of 4,096 tenants used to count
nothing more, and every tenant after them sent past its limit; now a
limited tenant that finds no slot (a reload limited more tenants than the
row was made for) is not counted, and its mail is refused (``uncounted``)
rather than let through uncounted, until a restart makes room.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from relay.errors import Rejected
from relay.policy.model import Policy, Tenant
from relay.quantity import quantity
from relay.sharedtable import Row, SharedTable, key_of

SLOTS = 4096  # the fewest a worker's row holds: room for tenants without a limit
ROOM = 2  # slots a row has for each limited tenant of the policy the relay starts with
REACH = 64  # slots from a tenant's place that may hold its own (``sharedtable``)
MINUTES = 60
BUCKETS = MINUTES + 1  # the minutes counted: this one and the 60 before it
LATEST = BUCKETS  # the word after the buckets: the last minute the slot counted in
Counted = tuple[int, int]  # where ``add`` counted: the slot's base, and ``Row.given`` of it


def refusal(tenant: Tenant, wanted: int, sent: int) -> Rejected | None:
    """The reply to a message for ``wanted`` recipients when the tenant's mail went to
    ``sent`` in the last hour, or None: 450 while the hour is full (the ERP keeps
    the message and tries again), 550 for more than the limit allows at all."""
    limit = tenant.recipients_per_hour
    if limit is None:
        return None
    if wanted > limit:
        many = quantity(wanted, "recipient")
        text = f"{many}, more than tenant {tenant.id} may send to in an hour"
        return Rejected(550, "5.7.1", f"{text} ({limit})")
    if sent + wanted > limit:  # "48 of 50" alone read as room left
        text = f"Tenant {tenant.id} has sent to {quantity(sent, 'recipient')} in the last hour"
        would = f"this message's {wanted} would make {sent + wanted}"
        return Rejected(450, "4.7.1", f"{text}; {would}, of {limit} allowed: try again later")
    return None


def uncounted(tenant: Tenant) -> Rejected:
    """The reply to a limited tenant's message that this worker has no room to
    count: let through, it would pass the limit unseen."""
    return Rejected(
        451,
        "4.3.0",
        f"Tenant {tenant.id}'s recipients cannot be counted against its limit of"
        f" {tenant.recipients_per_hour} an hour: the relay has no room for the count;"
        " try again later",
    )


def limited_tenants(policy: Policy) -> list[str]:
    """The tenants ``policy`` gives a ``recipients_per_hour``: the ones whose slots
    are kept, and so the ones the table is sized for."""
    return [t.id for t in policy.tenants.values() if t.recipients_per_hour is not None]


def counted(rcpt_tos: Sequence[str], suppressed: Iterable[str]) -> int:
    """The recipients a message counts for: those it is sent to. One on the
    suppression list is never tried (its state in the queue is final), so an
    ERP mailing a list full of bounced addresses is not held to its limit by
    mail that never went; the relay's own automatic copy and failure notices
    are not counted either. A message sent to nobody counts as one all the
    same: its notice goes out, signed, with the client's subject in it, and a
    stolen login sent such notices to the tenant's users past every limit."""
    skipped = set(suppressed)
    return max(sum(1 for address in rcpt_tos if address not in skipped), 1)


class RateCounts:
    """The shared table; ``row(i)`` is worker i's view of it."""

    def __init__(self, workers: int, limited: int = 0) -> None:
        """``limited``: the policy's limited tenants at the start (``limited_tenants``);
        a reload cannot grow the table."""
        slots = max(SLOTS, ROOM * limited)
        self._table = SharedTable("rate limits", workers, slots, BUCKETS + 1, REACH)

    def row(self, index: int, policy: Callable[[], Policy] | None = None) -> RateRow:
        """``policy``: the worker's, as it is now; its limited tenants keep their
        slots. None: a row that keeps none."""
        return RateRow(self._table.row(index), policy)

    def sent(self, tenant: str, now: float) -> int:
        """For a reader that is no worker (the metrics)."""
        return RateRow(self._table.row(-1)).sent(tenant, now)


class RateRow:
    def __init__(self, row: Row, policy: Callable[[], Policy] | None = None) -> None:
        self._row = row
        self._policy = policy
        self._limited: tuple[Policy, frozenset[int]] | None = None  # the policy, its hashes

    @property
    def slots(self) -> int:
        """The tenants the row has room for."""
        return self._row.table.slots

    def sent(self, tenant: str, now: float) -> int:
        """Recipients of the tenant's mail in the 60 minutes up to ``now``, all
        workers', and in the rest of the minute 60 minutes back (see above)."""
        minute = int(now // 60)
        return sum(self._hour(base, minute) for base in self._row.found(key_of(tenant)))

    def add(self, tenant: str, count: int, now: float) -> Counted | None:
        """``count`` more in this worker's row for the minute of ``now``: where they
        were counted, for ``give_back``; None when the row has no room for the
        tenant (see above)."""
        minute = int(now // 60)
        base = self._row.own(
            key_of(tenant), lambda at: self._idle(at, minute), lambda at: self._rank(at, minute)
        )
        if base is None:
            return None
        at = base + minute % BUCKETS
        word = self._row.words[at]
        current = word & 0xFFFFFFFF if word >> 32 == minute else 0
        self._row.words[at] = (minute << 32) | min(current + count, 0xFFFFFFFF)
        self._row.words[base + LATEST] = minute
        return base, self._row.given(base)

    def give_back(self, count: int, now: float, where: Counted) -> None:
        """``count`` that ``add`` counted ``where`` for the minute of ``now`` taken off
        again, never below nothing, unless the slot has gone to a tenant since.
        Looked up by the tenant, a slot given away since and taken again lost
        the newer messages' count instead; so did one the tenant took back at
        the same place, which a newcomer's count, small as it is when the tenant
        comes back, makes likely. A minute whose bucket has gone to a later one
        finds nothing to take from (it is out of the hour)."""
        base, given = where
        minute = int(now // 60)
        words = self._row.words
        at = base + minute % BUCKETS
        if self._row.given(base) == given and words[at] >> 32 == minute:
            words[at] = (minute << 32) | max(0, (words[at] & 0xFFFFFFFF) - count)

    def _hour(self, base: int, minute: int) -> int:
        """What the slot at ``base`` counts in the hour up to ``minute``."""
        oldest = minute - MINUTES
        return sum(
            word & 0xFFFFFFFF
            for word in self._row.words[base : base + BUCKETS]
            if oldest <= word >> 32 <= minute
        )

    def _rank(self, base: int, minute: int) -> tuple[int] | None:
        """A tenant limited in the worker's policy now never gives its slot away: a
        mark written with its counts stayed "no limit" after a reload limited it,
        until its next message, and its hour went to a newcomer meanwhile. The
        others go least counted first."""
        if self._row.words[base - 1] in self._kept():
            return None
        return (self._hour(base, minute),)

    def _kept(self) -> frozenset[int]:
        """The hashes of the tenants the worker's policy limits, worked out once a
        policy (only a crowded row asks)."""
        if self._policy is None:
            return frozenset()
        policy = self._policy()
        if self._limited is None or self._limited[0] is not policy:
            self._limited = (policy, frozenset(map(key_of, limited_tenants(policy))))
        return self._limited[1]

    def _idle(self, base: int, minute: int) -> bool:
        """A tenant whose slot counts nothing in the last hour gives it up. One word
        says so: read from its buckets, a row crowded by thousands of tenants
        without a limit read 61 words a slot for each newcomer, 0.1 ms a
        message."""
        return self._row.words[base + LATEST] < minute - MINUTES
