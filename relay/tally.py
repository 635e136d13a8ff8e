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
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from relay.sharedtable import Row, SharedTable, key_of, stamp

# counts per worker: twelve per listener, seven per upstream (2,000 tenants'
# own accounts and the platform's take 14,000)
SLOTS = 16384

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
BEGUN = "attempts begun"  # (upstream)
ENDED = "attempts ended"  # (upstream): one under way is begun and not ended yet

REFUSED_REASONS = ("not_allowed", "too_many", "too_many_from_client", "out_of_files")
DROPPED_REASONS = ("timeout", "errors")
AUTH_RESULTS = ("ok", "failed", "locked")
UPSTREAM_RESULTS = ("sent", "deferred", "refused")


class Tally:
    """The shared table; ``row(i)`` is worker i's part of it."""

    def __init__(self, workers: int) -> None:
        self._table = SharedTable("metrics counts", workers, SLOTS, 1)
        self._reader = self._table.row(-1)

    def row(self, index: int) -> TallyRow:
        return TallyRow(self._table, index)

    def total(self, *key: str) -> int:
        """Every worker's count of ``key``, for the metrics."""
        words = self._reader.words
        return sum(words[base] for base in self._reader.found(_key(key)))

    def under_way(self, upstream: str) -> int:
        """Attempts at ``upstream`` begun and not ended, in all workers."""
        return max(0, self.total(BEGUN, upstream) - self.total(ENDED, upstream))

    def holding(self, upstream: str) -> int:
        """The workers holding back ``upstream``'s mail that no attempt has reached it
        since: one worker's suspension is its own, and a worker with no mail for
        the upstream learns nothing of another's deliveries to it."""
        words = self._reader.words
        reached = _latest_reach(self._reader, upstream)
        found = self._reader.found(_key((SUSPENDED, upstream)))
        return sum(1 for base in found if words[base] and words[base] >= reached)


class TallyRow:
    def __init__(self, table: SharedTable, index: int) -> None:
        self._row = table.row(index)
        self._bases: dict[tuple[str, ...], int] = {}

    def add(self, *key: str) -> None:
        """One more of ``key`` (a name above and its label values)."""
        base = self._base(key)
        if base is not None:
            self._row.words[base] += 1

    def began(self, upstream: str) -> bool:
        """One more attempt at ``upstream`` under way; False, and not counted, when
        the row has no room for its end too: it would count as under way for good."""
        begun, ended = self._base((BEGUN, upstream)), self._base((ENDED, upstream))
        if begun is None or ended is None:
            return False
        self._row.words[begun] += 1
        return True

    def ended_with_worker(self, upstreams: Iterable[str]) -> None:
        """The worker of this row is gone (killed): the attempts it had under way
        ended with it, or they would count as under way for good."""
        for upstream in upstreams:  # looked up, not claimed: names it never tried take none
            begun = self._row.mine(_key((BEGUN, upstream)))
            ended = self._row.mine(_key((ENDED, upstream)))
            if begun is not None and ended is not None:
                self._row.words[ended] = self._row.words[begun]

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
        """None when the row is full: said in the log once."""
        base = self._bases.get(key)
        if base is None:
            base = self._row.own(_key(key))
            if base is not None:
                self._bases[key] = base
        return base


def _latest_reach(row: Row, upstream: str) -> int:
    """When the last attempt that reached ``upstream`` began, in any worker; 0: none."""
    words = row.words
    return max((words[base] for base in row.found(_key((REACHED, upstream)))), default=0)


def _key(key: tuple[str, ...]) -> int:
    return key_of("\0".join(key))
