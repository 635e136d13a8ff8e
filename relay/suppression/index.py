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
    winning. The first reading gathers them in a dictionary of integers and
    sorts once; later ones (a few lines appended) go into the arrays."""

    def __init__(self) -> None:
        self._names: list[str | None] = [None]
        self._scope_of: dict[str | None, int] = {None: 0}
        self._bulk: dict[int, int] | None = {}  # (hash << 16 | scope) -> (ms << 2 | reason)
        self._hashes, self._scopes = array("Q"), array("H")
        self._reasons, self._since = array("B"), array("q")

    def add(self, address: str, tenant: str | None, reason: str, since: str) -> None:
        """ValueError if ``since`` is not a time."""
        key, scope = address_hash(address), self._scope(tenant)
        ms, why = millis(since), REASONS.index(reason)
        if self._bulk is not None:
            self._bulk[key << 16 | scope] = ms << 2 | why
            return
        i = self._position(key, scope)
        if i < len(self._hashes) and (self._hashes[i], self._scopes[i]) == (key, scope):
            self._reasons[i], self._since[i] = why, ms
            return
        for column, value in (
            (self._hashes, key),
            (self._scopes, scope),
            (self._reasons, why),
            (self._since, ms),
        ):
            column.insert(i, value)

    def remove(self, address: str, tenant: str | None) -> None:
        key, scope = address_hash(address), self._scope(tenant)
        if self._bulk is not None:
            self._bulk.pop(key << 16 | scope, None)
            return
        i = self._position(key, scope)
        if i < len(self._hashes) and (self._hashes[i], self._scopes[i]) == (key, scope):
            for column in (self._hashes, self._scopes, self._reasons, self._since):
                del column[i]

    def snapshot(self) -> SuppressionList:
        """The list as applied so far, in arrays of its own."""
        if self._bulk is not None:
            for packed, value in sorted(self._bulk.items()):
                self._hashes.append(packed >> 16)
                self._scopes.append(packed & 0xFFFF)
                self._reasons.append(value & 3)
                self._since.append(value >> 2)
            self._bulk = None
        return SuppressionList(
            array("Q", self._hashes),
            array("H", self._scopes),
            array("B", self._reasons),
            array("q", self._since),
            tuple(self._names),
        )

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
