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
row as it reaps it, before a replacement could take the place. The same
table counts each worker's connections to its upstreams
(``relay.upstream.pool``), for their connection limits.
An IPv6 client is counted by its /64 (``counted_as``), as the lock-out of
failed logins counts it.
"""

from __future__ import annotations

import functools
from ipaddress import IPv6Address, IPv6Network, ip_address

from relay.sharedtable import Row, SharedTable, key_of

SLOTS = 4096  # clients (an IPv6 one: its /64) with connections open at once, per worker
IPV6_PREFIX = 64  # the smallest network delegated to a site (RFC 6177): one client's

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

    def here(self, listener: str, client: str) -> int:
        """This worker's part of ``open``."""
        base = self._row.mine(_key(listener, client))
        return 0 if base is None else self._row.words[base]

    def mark(self, listener: str, client: str, value: int) -> bool:
        """A value of this worker's for the others to read (``latest_elsewhere``);
        False when the row has no room for it."""
        base = self._row.own(_key(listener, client), self._unused)
        if base is None:
            return False
        self._row.words[base] = value
        return True

    def latest_elsewhere(self, listener: str, client: str) -> int:
        """The highest value the other workers marked; 0: none."""
        return self.latest(listener, client, self._row.mine(_key(listener, client)))

    def latest(self, listener: str, client: str, leaving_out: int | None = None) -> int:
        """The highest value any worker marked (but at ``leaving_out``); 0: none."""
        words, found = self._row.words, self._row.found(_key(listener, client))
        return max((words[base] for base in found if base != leaving_out), default=0)

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


@functools.lru_cache(maxsize=4096)
def counted_as(client: str) -> str:
    """The client as its limits count it: an IPv6 address by its /64, an
    IPv4-mapped one as the IPv4 address, anything else as written. A host
    given a /64, as most are, holds 2**64 addresses: counted one by one, it
    changed address at each limit and met none. As Postfix's
    ``smtpd_client_ipv6_prefix_length``, shorter than its 84: a /64 is one
    site's, which may hold several of its hosts, never another's."""
    try:
        address = ip_address(client)
    except ValueError:
        return client
    if not isinstance(address, IPv6Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    host_bits = 128 - IPV6_PREFIX
    return str(IPv6Network((int(address) >> host_bits << host_bits, IPV6_PREFIX)))


@functools.lru_cache(maxsize=SLOTS)
def _key(listener: str, client: str) -> int:
    """Cached: the same few keys are asked for again and again (each connection,
    each look of an upstream pool's reaper)."""
    return key_of(f"{listener}\0{client}")
