"""How many recipients each tenant's mail went to in the last hour, across workers.

A tenant's ``recipients_per_hour`` caps what a stolen ERP login, or an ERP
gone wrong in a loop, can send under the platform's DKIM signature before
someone notices (Postfix's anvil does this per client). The counts are in
one anonymous shared mapping made before the workers fork: each worker
writes only its own row, so no lock is needed, and reads every row to
decide. Two workers deciding at the same moment may each let one message
through past the limit. The counts live in memory, as anvil's do: a restart
of the relay forgets the last hour.

A row holds ``SLOTS`` tenants, found by a hash of the tenant ID with linear
probing; a slot is a 64-bit header (the hash, 0 when free) and ``MINUTES``
buckets, each the minute it counts (upper 32 bits) and the count (lower 32).
One 8-byte store is one machine word, so a reader sees a bucket whole.
"""

from __future__ import annotations

import hashlib
import logging
import mmap

from relay.errors import Rejected
from relay.policy.model import Tenant

log = logging.getLogger("relay")

SLOTS = 4096
MINUTES = 60
_WIDTH = 1 + MINUTES  # words per slot


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
    if sent + wanted > limit:
        text = f"Tenant {tenant.id} has sent to {sent} recipients in the last hour"
        return Rejected(450, "4.7.1", f"{text}, of {limit} allowed: try again later")
    return None


def _key(tenant: str) -> int:
    return int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=8).digest()) or 1


class RateCounts:
    """The shared mapping; ``row(i)`` is worker i's view of it."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, workers * SLOTS * _WIDTH * 8)
        self._words = memoryview(self._map).cast("Q")

    def row(self, index: int) -> RateRow:
        return RateRow(self._words, self.workers, index)

    def sent(self, tenant: str, now: float) -> int:
        """For a reader that is no worker (the metrics): every row, none of them its own."""
        return RateRow(self._words, self.workers, -1).sent(tenant, now)


class RateRow:
    def __init__(self, words: memoryview, workers: int, index: int) -> None:
        self._words = words
        self._workers = workers
        self._index = index
        self._slots: dict[int, int] = {}  # key -> slot in this row, once claimed
        self._full_said = False

    def sent(self, tenant: str, now: float) -> int:
        """Recipients of the tenant's mail in the 60 minutes up to ``now``, all workers'."""
        key = _key(tenant)
        minute = int(now // 60)
        oldest = minute - MINUTES + 1
        words = self._words
        total = 0
        for index in range(self._workers):
            slot = self._find(index, key)
            if slot is None:
                continue
            base = (index * SLOTS + slot) * _WIDTH + 1
            for word in words[base : base + MINUTES]:
                if oldest <= word >> 32 <= minute:
                    total += word & 0xFFFFFFFF
        return total

    def add(self, tenant: str, count: int, now: float) -> None:
        """``count`` more (or fewer, given back) in this worker's row for the minute of ``now``."""
        key = _key(tenant)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._claim(key)
            if slot is None:
                return
        minute = int(now // 60)
        at = (self._index * SLOTS + slot) * _WIDTH + 1 + minute % MINUTES
        word = self._words[at]
        current = word & 0xFFFFFFFF if word >> 32 == minute else 0
        self._words[at] = (minute << 32) | max(0, min(current + count, 0xFFFFFFFF))

    def _find(self, index: int, key: int) -> int | None:
        if index == self._index and key in self._slots:
            return self._slots[key]
        words = self._words
        start = key % SLOTS
        for probe in range(SLOTS):
            slot = (start + probe) % SLOTS
            header = words[(index * SLOTS + slot) * _WIDTH]
            if header == key:
                return slot
            if header == 0:
                return None
        return None

    def _claim(self, key: int) -> int | None:
        start = key % SLOTS
        for probe in range(SLOTS):
            slot = (start + probe) % SLOTS
            at = (self._index * SLOTS + slot) * _WIDTH
            if self._words[at] in (0, key):
                self._words[at] = key
                self._slots[key] = slot
                return slot
        if not self._full_said:
            log.error("rate limits: %d tenants counted in one worker, no room for more", SLOTS)
            self._full_said = True
        return None
