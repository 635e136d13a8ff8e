"""Counts every worker reads and each writes its own part of, without a lock.

One anonymous shared mapping is made before the workers fork; worker i owns
row i, so a word has one writer and the readers sum the rows. A row holds
``slots`` slots found by a 64-bit hash of their key with linear probing;
a slot is a header word (the hash, 0 when never used) and ``width`` words
of the user's. An 8-byte store is one machine word: a reader sees a word
whole. A slot is never emptied again, so no probe chain is ever cut; the
owner may give a slot to another key when ``reclaimable`` says its words
count for nothing any more, and a reader then finds the old key nowhere,
which is what those words said. A full row may give one away that still
counts, when the owner says (``rank``) which of a few count least; its
readers lose what it said, as the owner chose. A table made with a
``reach`` keeps each key in one of the first ``reach`` slots from its place,
so that looking a key up, or for room, in a row that has filled costs a
few slots' worth: unbounded, each new key in a full row read the whole
row, milliseconds a message, and each lookup of a key it lacked as much.

Used for the tenants' hourly recipients (``ratelimit``), the clients'
open connections (``ingress.clientlimit``) and failed logins
(``ingress.authlimit``), and the counts for the metrics (``tally``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
from collections.abc import Callable, Iterator

EVICT_AMONG = 16  # slots a full row ranks to give one to a new key, from the key's place

log = logging.getLogger("relay")


# Made once per start, before the workers fork, so all of them place a key alike;
# unkeyed, a client's place in a row could be worked out beforehand, and a
# few locked clients chosen at one place left the failures of those placed
# there uncounted (``Row._evict`` ranks the slots near a key's place only).
_SECRET = os.urandom(16)


def stamp(when: float) -> int:
    """A time (seconds) as a word, in ms: never 0, which reads as none."""
    return max(1, round(when * 1000))


def key_of(text: str) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=_SECRET).digest()
    return int.from_bytes(digest) or 1


class SharedTable:
    def __init__(
        self, name: str, rows: int, slots: int, width: int, reach: int | None = None
    ) -> None:
        self.name = name  # for the log, if a row fills
        self.rows = rows
        self.slots = slots
        self.reach = slots if reach is None else min(reach, slots)
        # the slots a full row may give a key: with no reach, the first few only
        self.among = EVICT_AMONG if reach is None else self.reach
        self.stride = 1 + width
        self._map = mmap.mmap(-1, rows * slots * self.stride * 8)
        self.words = memoryview(self._map).cast("Q")

    def row(self, index: int) -> Row:
        """Worker ``index``'s view; -1 for a reader that owns no row."""
        return Row(self, index)


class Row:
    def __init__(self, table: SharedTable, index: int) -> None:
        self.table = table
        self.words = table.words
        self.index = index
        self._own: dict[int, int] = {}  # key -> base of its slot in this row
        self._given: dict[int, int] = {}  # base -> the times this process gave its slot
        self._full_said = False

    def found(self, key: int) -> Iterator[int]:
        """The base (first word after the header) of ``key``'s slot in each row that has one."""
        for index in range(self.table.rows):
            base = self._own.get(key) if index == self.index else None
            if base is None:
                base = self._find(index, key)
            if base is not None:
                yield base

    def mine(self, key: int) -> int | None:
        """The base of ``key``'s slot in this worker's row, if it has one."""
        base = self._own.get(key)
        if base is None:
            base = self._find(self.index, key)
            if base is not None:
                self._own[key] = base
        return base

    def given(self, base: int) -> int:
        """How many times this process has given the slot at ``base`` to a key: with
        the base, a caller that kept where it wrote tells that slot from one
        given away and taken again since, by the same key at the same place."""
        return self._given.get(base, 0)

    def own(
        self,
        key: int,
        reclaimable: Callable[[int], bool] | None = None,
        rank: Callable[[int], tuple[int, ...] | None] | None = None,
    ) -> int | None:
        """The base of ``key``'s slot in this worker's row, claimed if need be; None
        when the row is full (said in the log once, unless ``rank`` is given: the
        caller says it). A worker started in the place of one that ended finds
        the slots it left. ``rank``: how much a slot in use still counts, None
        for one never to give away; with it a full row gives ``key`` the slot
        that counts least of the first ``EVICT_AMONG`` from ``key``'s place, so
        that its probes stay short and the ranking costs a few slots' worth;
        when none of those may be given, the first of the rest of its reach
        that may."""
        base = self.mine(key)
        if base is None:
            base = self._claim(key, reclaimable)
            if base is None and rank is not None:
                base = self._evict(key, rank)
            elif base is None and not self._full_said:
                table = self.table
                log.error(
                    "%s: %d keys in a worker's table, no room for more", table.name, table.slots
                )
                self._full_said = True
            if base is not None:
                self._own[key] = base
        return base

    def _claim(self, key: int, reclaimable: Callable[[int], bool] | None) -> int | None:
        for at in self._probes(key):
            header = self.words[at]
            if header == 0 or (reclaimable is not None and reclaimable(at + 1)):
                return self._give(at, key)
        return None

    def _evict(self, key: int, rank: Callable[[int], tuple[int, ...] | None]) -> int | None:
        """The least counted of the first ``EVICT_AMONG`` slots from ``key``'s place,
        and only when none of them may be given the rest of the table's reach
        (``among``): a key whose first few slots were all kept was refused though
        one further on in its reach was not, and ranking the whole reach each
        time doubled the cost of a new key in a full row. Without a reach,
        looking on past slots never to give away ranked a whole row for each
        new key, seconds of CPU when most were. None when none may be given."""
        ranked: list[tuple[tuple[int, ...], int]] = []
        for n, at in enumerate(itertools.islice(self._probes(key), self.table.among)):
            if n >= EVICT_AMONG and ranked:
                break
            order = rank(at + 1)
            if order is not None:
                ranked.append((order, at))
        return self._give(min(ranked)[1], key) if ranked else None

    def _probes(self, key: int) -> Iterator[int]:
        """Where the headers of this row's slots are, in ``key``'s probe order."""
        table = self.table
        start = key % table.slots
        for probe in range(table.reach):
            yield (self.index * table.slots + (start + probe) % table.slots) * table.stride

    def _give(self, at: int, key: int) -> int:
        """The slot with its header at ``at``, emptied, is ``key``'s now: its old
        key's readers find it nowhere (its words zeroed first, what they said
        read as nothing meanwhile)."""
        table = self.table
        if self.words[at] != 0:
            self._own.pop(self.words[at], None)
            self.words[at + 1 : at + table.stride] = _zeros(table.stride - 1)
        self.words[at] = key
        self._given[at + 1] = self._given.get(at + 1, 0) + 1
        return at + 1

    def _find(self, index: int, key: int) -> int | None:
        table = self.table
        start = key % table.slots
        for probe in range(table.reach):
            at = (index * table.slots + (start + probe) % table.slots) * table.stride
            header = self.words[at]
            if header == key:
                return at + 1
            if header == 0:
                return None
        return None


def _zeros(count: int) -> memoryview:
    return memoryview(bytes(8 * count)).cast("Q")
