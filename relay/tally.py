"""What happens only inside a worker, counted for the metrics.

The audit log says what became of each message, but not what a sysadmin
looks at when the relay is under attack or cut off: the connections made
and refused, the logins that failed, the TLS handshakes that broke, the
upstream attempts that did not go through. Each worker adds to its own row
of a ``sharedtable`` made before the fork; the metrics sum the rows at the
scrape. A row outlives the worker that wrote it (a replacement takes it
up), so a count falls back to 0 only when the relay restarts, which
Prometheus's ``rate()`` takes in its stride.

A count's key is its name and label values; the reader asks for the ones
the policy and the names below allow, so the labels stay bounded by the
policy (listeners and upstreams), never a client's address.

A worker's row is sized at the start, before the fork, for ``ROOM`` times the
counts the policy names (``counts_named``), and a worker gives the slot of a count
its policy no longer names to a new one: a row of a fixed size took a slot
for each name any policy had had, and once it was full, after some 2,300
upstreams (tenants' own accounts), the attempts at new ones went uncounted
and a worker holding mail for one never saw another worker reach it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from relay.policy.model import Policy
from relay.sharedtable import Row, SharedTable, key_of, stamp

log = logging.getLogger("relay")

SLOTS = 16384  # the fewest a worker's row holds: room for the names a reload adds
ROOM = 2  # slots a row has for each count the policy the relay starts with names
HALF = 0xFFFFFFFF

CONNECTION = "connection"  # (listener)
REFUSED = "refused"  # (listener, reason)
DROPPED = "dropped"  # (listener, reason)
TLS_FAILED = "tls failed"  # (listener)
AUTH = "auth"  # (listener, result)
NO_ROOM = "no room"  # (listener): a 452 4.3.1, for want of space
UPSTREAM = "upstream"  # (upstream, result)
SUSPENDED = "suspended"  # (upstream): the failure it holds its mail for ended then, ms; 0: none
REACHED = "reached"  # (upstream): when the last attempt that reached it began, ms
# both on the monotonic clock
# (upstream): attempts begun (the upper half, modulo 2**32) and ended (the lower), one
# word, so that a slot given to another count takes both: apart, a name the
# policy dropped and took back could keep its begun and lose its ended, and
# every attempt it had made showed as under way for good
ATTEMPTS = "attempts"

REFUSED_REASONS = ("not_allowed", "too_many", "too_many_from_client", "out_of_files")
DROPPED_REASONS = ("timeout", "errors")
AUTH_RESULTS = ("ok", "failed", "locked")
UPSTREAM_RESULTS = ("sent", "deferred", "refused")


def counts_named(policy: Policy) -> list[tuple[str, ...]]:
    """The counts ``policy`` may have: twelve a listener, six an upstream."""
    keys: list[tuple[str, ...]] = []
    for listener in policy.listeners:
        name = listener.name
        keys += [(CONNECTION, name), (TLS_FAILED, name), (NO_ROOM, name)]
        keys += [(REFUSED, name, reason) for reason in REFUSED_REASONS]
        keys += [(DROPPED, name, reason) for reason in DROPPED_REASONS]
        keys += [(AUTH, name, result) for result in AUTH_RESULTS]
    for upstream in policy.upstreams:
        keys += [(UPSTREAM, upstream, result) for result in UPSTREAM_RESULTS]
        keys += [(SUSPENDED, upstream), (REACHED, upstream), (ATTEMPTS, upstream)]
    return keys


class Tally:
    """The shared table; ``row(i)`` is worker i's part of it."""

    def __init__(self, workers: int, counts: int = 0) -> None:
        """``counts``: as many as the policy the relay starts with names; a reload
        cannot grow the table."""
        slots = max(SLOTS, ROOM * counts)
        self._table = SharedTable("metrics counts", workers, slots, 1)
        self._reader = self._table.row(-1)

    def row(self, index: int, policy: Callable[[], Policy] | None = None) -> TallyRow:
        """``policy``: the worker's, as it is now; the slots of counts it does not
        name go to new ones."""
        return TallyRow(self._table, index, policy)

    def total(self, *key: str) -> int:
        """Every worker's count of ``key``, for the metrics."""
        words = self._reader.words
        return sum(words[base] for base in self._reader.found(_key(key)))

    def under_way(self, upstream: str) -> int:
        """Attempts at ``upstream`` begun and not ended, in all workers."""
        words = self._reader.words
        return sum(_open(words[base]) for base in self._reader.found(_key((ATTEMPTS, upstream))))

    def holding(self, upstream: str) -> int:
        """The workers holding back ``upstream``'s mail that no attempt has reached it
        since: one worker's suspension is its own, and a worker with no mail for
        the upstream learns nothing of another's deliveries to it."""
        words = self._reader.words
        reached = _latest_reach(self._reader, upstream)
        found = self._reader.found(_key((SUSPENDED, upstream)))
        return sum(1 for base in found if words[base] and words[base] >= reached)


class TallyRow:
    def __init__(
        self, table: SharedTable, index: int, policy: Callable[[], Policy] | None = None
    ) -> None:
        self._row = table.row(index)
        self._bases: dict[tuple[str, ...], tuple[int, int]] = {}  # key -> its hash, its base
        self._policy = policy
        self._named: tuple[Policy, frozenset[int]] | None = None  # the policy, its keys' hashes

    def add(self, *key: str) -> None:
        """One more of ``key`` (a name above and its label values)."""
        base = self._base(key)
        if base is not None:
            self._row.words[base] += 1

    def began(self, upstream: str) -> bool:
        """One more attempt at ``upstream`` under way; False, and not counted, when
        the row has no room for it: its ``ended`` is then not to be said."""
        base = self._base((ATTEMPTS, upstream))
        if base is None:
            return False
        word = self._row.words[base]
        self._row.words[base] = (((word >> 32) + 1) & HALF) << 32 | (word & HALF)
        return True

    def ended(self, upstream: str) -> None:
        """An attempt ``began`` counted has ended. Its slot given to another count
        meanwhile (the policy no longer names ``upstream``), it finds none under
        way, and takes none off."""
        base = self._base((ATTEMPTS, upstream))
        if base is not None and _open(self._row.words[base]):
            word = self._row.words[base]
            self._row.words[base] = (word & ~HALF) | ((word + 1) & HALF)

    def ended_with_worker(self, upstreams: Iterable[str]) -> None:
        """The worker of this row is gone (killed): the attempts it had under way
        ended with it, or they would count as under way for good."""
        for upstream in upstreams:  # looked up, not claimed: names it never tried take none
            base = self._row.mine(_key((ATTEMPTS, upstream)))
            if base is not None:
                begun = self._row.words[base] >> 32
                self._row.words[base] = begun << 32 | begun

    def suspended(self, upstream: str, held: bool) -> None:
        """The worker's last attempt at ``upstream`` found it unusable just now, and
        the worker holds back its mail (``relay.unreachable``); or it no longer
        holds it (False)."""
        self._put(stamp(time.monotonic()) if held else 0, SUSPENDED, upstream)

    def reached(self, upstream: str, began: float) -> None:
        """An attempt that began then (``time.monotonic``) reached ``upstream``:
        whichever worker made it, no suspension from before it holds for the
        metrics. The monotonic clock is the same in every process, and a wall
        clock set back would have dated a later failure before an older reach.
        The latest begin stays: a long attempt ending after a later short one put
        its older begin back, and a reach since a failure went unseen."""
        base = self._base((REACHED, upstream))
        if base is not None:
            self._row.words[base] = max(self._row.words[base], stamp(began))

    def reached_since_held(self, upstream: str) -> bool:
        """Whether an attempt begun after this worker's last failure at ``upstream``
        reached it, in any worker: the upstream is there. With several workers
        a connection limit filled by the others' connections read as the
        upstream down, and this worker held its mail a ``first_retry`` while
        the others delivered (the metrics already said it held nothing)."""
        base = self._row.mine(_key((SUSPENDED, upstream)))
        held = 0 if base is None else self._row.words[base]
        return bool(held) and _latest_reach(self._row, upstream) > held

    def _put(self, value: int, *key: str) -> None:
        base = self._base(key)
        if base is not None:
            self._row.words[base] = value

    def _base(self, key: tuple[str, ...]) -> int | None:
        """None when the row is full: said in the log once. A slot kept from before
        is checked to be the key's still, as it goes to another once the policy
        no longer names the key."""
        kept = self._bases.get(key)
        if kept is not None and self._row.words[kept[1] - 1] == kept[0]:
            return kept[1]
        hashed = _key(key)
        words, named = self._row.words, None if self._policy is None else self._in(self._policy())
        unnamed = None if named is None else lambda b: words[b - 1] not in named
        base = self._row.own(hashed, unnamed)
        if base is not None:
            self._bases[key] = (hashed, base)
        return base

    def _in(self, policy: Policy) -> frozenset[int]:
        """The hashes of the counts ``policy`` names, the only ones the metrics ask
        for; worked out once a policy, and a reload that names more than the row
        was made for is said."""
        if self._named is None or self._named[0] is not policy:
            hashes = frozenset(_key(key) for key in counts_named(policy))
            self._named = (policy, hashes)
            room = self._row.table.slots // ROOM
            if len(hashes) > room:
                log.warning(
                    "metrics counts: the policy names %d counts (twelve a listener, six an"
                    " upstream), more than the %d a worker's table was made for at the start:"
                    " some may not be counted; restart the relay to make room",
                    len(hashes),
                    room,
                )
        return self._named[1]


def _open(word: int) -> int:
    """The attempts under way in an ``ATTEMPTS`` word: begun less ended."""
    return ((word >> 32) - (word & HALF)) & HALF


def _latest_reach(row: Row, upstream: str) -> int:
    """When the last attempt that reached ``upstream`` began, in any worker; 0: none."""
    words = row.words
    return max((words[base] for base in row.found(_key((REACHED, upstream)))), default=0)


def _key(key: tuple[str, ...]) -> int:
    return key_of("\0".join(key))
