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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from relay.errors import Rejected
from relay.policy.model import Tenant
from relay.sharedtable import Row, SharedTable, key_of

SLOTS = 4096
MINUTES = 60
BUCKETS = MINUTES + 1  # the minutes counted: this one and the 60 before it


def refusal(tenant: Tenant, wanted: int, sent: int) -> Rejected | None:
    """The reply to a message for ``wanted`` recipients when the tenant's mail went to
    ``sent`` in the last hour, or None: 450 while the hour is full (the ERP keeps
    the message and tries again), 550 for more than the limit allows at all."""
    limit = tenant.recipients_per_hour
    if limit is None:
        return None
    if wanted > limit:
        text = f"{wanted} recipients, more than tenant {tenant.id} may send to in an hour"
        return Rejected(550, "5.7.1", f"{text} ({limit})")
    if sent + wanted > limit:  # "48 of 50" alone read as room left
        text = f"Tenant {tenant.id} has sent to {sent} recipients in the last hour"
        would = f"this message's {wanted} would make {sent + wanted}"
        return Rejected(450, "4.7.1", f"{text}; {would}, of {limit} allowed: try again later")
    return None


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

    def __init__(self, workers: int) -> None:
        self._table = SharedTable("rate limits", workers, SLOTS, BUCKETS)

    def row(self, index: int) -> RateRow:
        return RateRow(self._table.row(index))

    def sent(self, tenant: str, now: float) -> int:
        """For a reader that is no worker (the metrics)."""
        return RateRow(self._table.row(-1)).sent(tenant, now)


class RateRow:
    def __init__(self, row: Row) -> None:
        self._row = row

    def sent(self, tenant: str, now: float) -> int:
        """Recipients of the tenant's mail in the 60 minutes up to ``now``, all
        workers', and in the rest of the minute 60 minutes back (see above)."""
        minute = int(now // 60)
        oldest = minute - MINUTES
        words = self._row.words
        total = 0
        for base in self._row.found(key_of(tenant)):
            for word in words[base : base + BUCKETS]:
                if oldest <= word >> 32 <= minute:
                    total += word & 0xFFFFFFFF
        return total

    def add(self, tenant: str, count: int, now: float) -> None:
        """``count`` more (or fewer, given back) in this worker's row for the minute of
        ``now``; a give-back for a minute whose slot has gone to a later one finds
        nothing to take from (it is out of the hour)."""
        minute = int(now // 60)
        base = self._row.own(key_of(tenant), lambda at: self._idle(at, minute))
        if base is None:
            return
        at = base + minute % BUCKETS
        word = self._row.words[at]
        if count < 0 and word >> 32 != minute:
            return
        current = word & 0xFFFFFFFF if word >> 32 == minute else 0
        self._row.words[at] = (minute << 32) | max(0, min(current + count, 0xFFFFFFFF))

    def _idle(self, base: int, minute: int) -> bool:
        """A tenant whose slot counts nothing in the last hour gives it up."""
        oldest = minute - MINUTES
        return all(w >> 32 < oldest for w in self._row.words[base : base + BUCKETS])
