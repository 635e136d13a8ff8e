"""Connections open from one client address, and on a listener, counted across workers.

A listener's ``max_connections_per_client`` is Postfix's
``smtpd_client_connection_count_limit``: an ERP stuck opening connections in
a loop, or a scanner, would otherwise take every file the relay may open
and every ERP's mail would wait behind it. Its ``max_connections`` is Exim's
``smtp_accept_max`` (Postfix's process limit, without the queue of waiting
connections): many clients at once, each within its own limit, cannot take
all the memory either. The kernel hands connections to
any worker, so a count per worker would allow that many times the limit:
the counts are in a ``sharedtable``, a worker's row holding what it has open.
A worker that ends loses its connections with it: the supervisor clears its
row as it reaps it, before a replacement could take the place.
"""

from __future__ import annotations

from relay.sharedtable import Row, SharedTable, key_of

SLOTS = 4096  # client addresses with connections open at once, per worker

TOO_MANY = "421 4.7.0 Too many connections from {client}, try again later"
ALL_BUSY = "421 4.3.2 Too many connections, try again later"
EVERYONE = ""  # the listener's count of all clients' connections (no address is empty)


class ClientCounts:
    """The shared table; ``row(i)`` is worker i's view of it."""

    def __init__(self, workers: int) -> None:
        self._table = SharedTable("connection limits", workers, SLOTS, 1)

    def row(self, index: int) -> ClientRow:
        return ClientRow(self._table.row(index))


class ClientRow:
    def __init__(self, row: Row) -> None:
        self._row = row

    def clear(self) -> None:
        """The connections of the worker that had this row ended with it."""
        table = self._row.table
        start = self._row.index * table.slots * table.stride
        for at in range(start + 1, start + table.slots * table.stride, table.stride):
            self._row.words[at] = 0

    def open(self, listener: str, client: str) -> int:
        """Connections from ``client`` open on ``listener`` now, every worker's."""
        words = self._row.words
        return sum(words[base] for base in self._row.found(_key(listener, client)))

    def enter(self, listener: str, client: str) -> bool:
        """Count one more; False when this worker's row has no room (not counted)."""
        base = self._row.own(_key(listener, client), self._unused)
        if base is None:
            return False
        self._row.words[base] += 1
        return True

    def leave(self, listener: str, client: str) -> None:
        base = self._row.own(_key(listener, client))
        if base is not None and self._row.words[base] > 0:
            self._row.words[base] -= 1

    def _unused(self, base: int) -> bool:
        return self._row.words[base] == 0


def _key(listener: str, client: str) -> int:
    return key_of(f"{listener}\0{client}")
