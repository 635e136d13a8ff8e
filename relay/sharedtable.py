"""Counts every worker reads and each writes its own part of, without a lock.

One anonymous shared mapping is made before the workers fork; worker i owns
row i, so a word has one writer and the readers sum the rows. A row holds
``slots`` slots found by a 64-bit hash of their key with linear probing;
a slot is a header word (the hash, 0 when never used) and ``width`` words
of the user's. An 8-byte store is one machine word: a reader sees a word
whole. A slot is never emptied again, so no probe chain is ever cut; the
owner may give a slot to another key when ``reclaimable`` says its words
count for nothing any more, and a reader then finds the old key nowhere,
which is what those words said.

Used for the tenants' hourly recipients (``ratelimit``), the clients'
open connections (``ingress.clientlimit``) and failed logins
(``ingress.authlimit``), and the counts for the metrics (``tally``).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from collections.abc import Callable, Iterator

log = logging.getLogger("relay")


def key_of(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest()) or 1


class SharedTable:
    def __init__(self, name: str, rows: int, slots: int, width: int) -> None:
        self.name = name  # for the log, if a row fills
        self.rows = rows
        self.slots = slots
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
        self._full_said = False

    def found(self, key: int) -> Iterator[int]:
        """The base (first word after the header) of ``key``'s slot in each row that has one."""
        for index in range(self.table.rows):
            base = self._own.get(key) if index == self.index else None
            if base is None:
                base = self._find(index, key)
            if base is not None:
                yield base

    def own(self, key: int, reclaimable: Callable[[int], bool] | None = None) -> int | None:
        """The base of ``key``'s slot in this worker's row, claimed if need be; None
        when the row is full (said in the log once). A worker started in the place
        of one that ended finds the slots it left."""
        base = self._own.get(key)
        if base is None:
            base = self._find(self.index, key)
            if base is None:
                base = self._claim(key, reclaimable)
            if base is not None:
                self._own[key] = base
        return base

    def _claim(self, key: int, reclaimable: Callable[[int], bool] | None) -> int | None:
        table = self.table
        start = key % table.slots
        for probe in range(table.slots):
            at = (self.index * table.slots + (start + probe) % table.slots) * table.stride
            header = self.words[at]
            if header != 0 and (reclaimable is None or not reclaimable(at + 1)):
                continue
            if header != 0:
                self._own = {k: b for k, b in self._own.items() if b != at + 1}
                self.words[at + 1 : at + table.stride] = _zeros(table.stride - 1)
            self.words[at] = key
            return at + 1
        if not self._full_said:
            log.error("%s: %d keys in a worker's table, no room for more", table.name, table.slots)
            self._full_said = True
        return None

    def _find(self, index: int, key: int) -> int | None:
        table = self.table
        start = key % table.slots
        for probe in range(table.slots):
            at = (index * table.slots + (start + probe) % table.slots) * table.stride
            header = self.words[at]
            if header == key:
                return at + 1
            if header == 0:
                return None
        return None


def _zeros(count: int) -> memoryview:
    return memoryview(bytes(8 * count)).cast("Q")
