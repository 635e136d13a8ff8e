"""The list as a worker holds it: 21 bytes an entry, not a Python object each.

Every recipient of every message is looked up. Held as dataclasses in a
dictionary, a 100,000-entry list took 78 MB of each worker's memory and two
seconds to load. Here an entry is a 64-bit BLAKE2b hash of its address, in
a sorted array, beside its scope, reason and time: a lookup is a binary
search, and an address not on the list is taken for one with a chance of
about one in 10^14 a lookup at that size. The entry's detail (the refusal
that put it there) stays in the file, for the tools.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from hashlib import blake2b

from relay.suppression.entry import REASONS, Suppression, millis, time_text

MAX_SCOPES = 65535  # tenants with entries of their own, besides "all"


def address_hash(address: str) -> int:
    digest = blake2b(address.lower().encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SuppressionList:
    """A snapshot: what ``decide`` looks addresses up in. It never changes, so a
    message is decided against one list whatever the file does meanwhile."""

    def __init__(
        self,
        hashes: array[int],
        scopes: array[int],
        reasons: array[int],
        since: array[int],
        names: tuple[str | None, ...],
    ) -> None:
        self._hashes, self._scopes, self._reasons, self._since = hashes, scopes, reasons, since
        self._names = names

    def find(self, address: str, tenant: str) -> Suppression | None:
        """What keeps ``address`` from ``tenant``'s mail: its own entry, else the one
        for all tenants (as the address is written in the message)."""
        if not self._hashes:
            return None
        key = address_hash(address)
        i = bisect_left(self._hashes, key)
        found = None
        while i < len(self._hashes) and self._hashes[i] == key:
            scope = self._names[self._scopes[i]]
            if scope == tenant:
                return self._entry(i, address)
            if scope is None:
                found = i
            i += 1
        return None if found is None else self._entry(found, address)

    def _entry(self, i: int, address: str) -> Suppression:
        scope = self._names[self._scopes[i]]
        return Suppression(address, scope, REASONS[self._reasons[i]], time_text(self._since[i]))

    def __len__(self) -> int:
        return len(self._hashes)


EMPTY = SuppressionList(array("Q"), array("H"), array("B"), array("q"), (None,))


class Builder:
    """Applies the file's changes in order, the last for an address and scope
    winning. Changes gather in a dictionary of integers and are merged into
    the sorted arrays at the snapshot, in one pass: put into the arrays one
    by one, each moving the entries after it, 200,000 lines appended to a
    500,000-entry list held a worker's event loop for 20 seconds."""

    def __init__(self) -> None:
        self._names: list[str | None] = [None]
        self._scope_of: dict[str | None, int] = {None: 0}
        # (hash << 16 | scope) -> (ms << 2 | reason), None: removed
        self._changes: dict[int, int | None] = {}
        self._hashes, self._scopes = array("Q"), array("H")
        self._reasons, self._since = array("B"), array("q")

    def add(self, address: str, tenant: str | None, reason: str, since: str) -> None:
        """ValueError if ``since`` is not a time."""
        key, scope = address_hash(address), self._scope(tenant)
        ms, why = millis(since), REASONS.index(reason)
        self._changes[key << 16 | scope] = ms << 2 | why

    def remove(self, address: str, tenant: str | None) -> None:
        self._changes[address_hash(address) << 16 | self._scope(tenant)] = None

    def snapshot(self) -> SuppressionList:
        """The list as applied so far. Its arrays are never changed again: the next
        merge makes new ones."""
        if self._changes:
            self._merge()
        return SuppressionList(
            self._hashes, self._scopes, self._reasons, self._since, tuple(self._names)
        )

    def _merge(self) -> None:
        """The entries between two changes are copied a slice at a time, in C."""
        hashes, scopes = self._hashes, self._scopes
        if not hashes:  # the first reading, of the whole file: only appends
            changes = self._changes
            keys = sorted(k for k, v in changes.items() if v is not None)
            values = [changes[k] for k in keys]
            self._hashes = array("Q", [k >> 16 for k in keys])
            self._scopes = array("H", [k & 0xFFFF for k in keys])
            self._reasons = array("B", [v & 3 for v in values])
            self._since = array("q", [v >> 2 for v in values])
            self._changes = {}
            return
        old = (hashes, scopes, self._reasons, self._since)
        new = tuple(array(column.typecode) for column in old)
        start = 0
        for packed, value in sorted(self._changes.items()):
            key, scope = packed >> 16, packed & 0xFFFF
            i = self._position(key, scope)
            for into, column in zip(new, old, strict=True):
                into.extend(column[start:i])
            there = i < len(hashes) and hashes[i] == key and scopes[i] == scope
            start = i + 1 if there else i
            if value is not None:
                for into, item in zip(new, (key, scope, value & 3, value >> 2), strict=True):
                    into.append(item)
        for into, column in zip(new, old, strict=True):
            into.extend(column[start:])
        self._hashes, self._scopes, self._reasons, self._since = new
        self._changes = {}

    def _position(self, key: int, scope: int) -> int:
        """Where (key, scope) is, or goes: entries of one address are in scope order."""
        i = bisect_left(self._hashes, key)
        while i < len(self._hashes) and self._hashes[i] == key and self._scopes[i] < scope:
            i += 1
        return i

    def _scope(self, tenant: str | None) -> int:
        scope = self._scope_of.get(tenant)
        if scope is None:
            if len(self._names) > MAX_SCOPES:
                raise ValueError(f"more than {MAX_SCOPES} tenants with entries of their own")
            scope = self._scope_of[tenant] = len(self._names)
            self._names.append(tenant)
        return scope
