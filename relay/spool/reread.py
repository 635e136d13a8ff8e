"""The spool's records as last read, read again only where their files changed.

The engine reads every record once a ``RESCAN`` in case one changed behind
its back; with 50,000 queued, parsing them all held the GIL for seconds a
minute, and mail was neither taken nor delivered meanwhile. A stat per file
says what changed: a record whose files have the inode, size, mtime and
ctime they had at the last read is what was read then. Git's index trusts a
stat the same way, with the same exception: a file changed again within the
timestamps' resolution of its read keeps its stamp ("racily clean"), so a
changed record read less than ``RACY`` seconds after its file's ctime is
read again at the next scan too. An entry's file is never written once it
has its name, so its first record needs no such care, and the engine hands
over those of the entries it was given as they were accepted (``seed``):
each worker read every new message once. Only what the caller keeps of a
record is held.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from relay.spool.entry import QueueEntry
from relay.spool.store import NoSuchEntry, Spool, SpoolError, Stamp, stamp

T = TypeVar("T")

#: Seconds before a scan within which a file's change makes its record be read
#: again whatever its stamp says: coarse file system clocks tick that slowly.
RACY = 2.0


class Reread(Generic[T]):
    """``Spool.loaded`` with each record turned into what ``keep`` takes of it,
    remembered per queue ID with its files' stamps. A record that cannot be
    read is not remembered: it is tried again at the next scan."""

    def __init__(
        self,
        spool: Spool,
        keep: Callable[[QueueEntry], T],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self._keep = keep
        self._clock = clock  # the wall clock, which the files' times are read against
        # a stamp of None: read too soon after its change to be trusted
        self._known: dict[str, tuple[Stamp | None, Stamp | None, T]] = {}
        self.reads = 0  # records read since the start, for the tests and the profile

    def seed(self, queue_id: str, entry_file: os.stat_result, first: QueueEntry) -> None:
        """The entry just stored, its file's stat taken after: its first record is
        ``first``, and stays so while the file is the same."""
        self._known[queue_id] = (stamp(entry_file), None, self._keep(first))

    def loaded(self) -> Iterator[tuple[str, T | SpoolError]]:
        """Each entry, oldest first, with what is kept of its record or why it
        cannot be read; entries gone since the last call are forgotten."""
        recent = int((self._clock() - RACY) * 1e9)
        known, self._known = self._known, {}
        for queue_id, entry, record in self.spool.stamps():
            kept = known.get(queue_id)
            if kept is not None and kept[0] == entry and kept[1] == record:
                self._known[queue_id] = kept
                yield queue_id, kept[2]
                continue
            try:
                self.reads += 1
                found = self._keep(self.spool.load(queue_id))
            except NoSuchEntry:
                continue
            except SpoolError as exc:
                yield queue_id, exc
                continue
            racy = record is not None and record[3] >= recent
            self._known[queue_id] = (None if racy else entry, record, found)
            yield queue_id, found
