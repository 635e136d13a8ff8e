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

from relay.sharedtable import SharedTable, key_of

SLOTS = 8192  # counts per worker: ten per listener, three per upstream

CONNECTION = "connection"  # (listener)
REFUSED = "refused"  # (listener, reason)
DROPPED = "dropped"  # (listener, reason)
TLS_FAILED = "tls failed"  # (listener)
AUTH = "auth"  # (listener, result)
UPSTREAM = "upstream"  # (upstream, result)

REFUSED_REASONS = ("not_allowed", "too_many", "too_many_from_client")
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


class TallyRow:
    def __init__(self, table: SharedTable, index: int) -> None:
        self._row = table.row(index)
        self._bases: dict[tuple[str, ...], int] = {}

    def add(self, *key: str) -> None:
        """One more of ``key`` (a name above and its label values)."""
        base = self._bases.get(key)
        if base is None:
            base = self._row.own(_key(key))
            if base is None:
                return  # the row is full: said in the log once
            self._bases[key] = base
        self._row.words[base] += 1


def _key(key: tuple[str, ...]) -> int:
    return key_of("\0".join(key))
