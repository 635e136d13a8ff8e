"""An upstream's delivery slots (``queue.concurrency``), taken in turns.

After an outage the backlog is due at once and every message of it waits
for a slot; in one line, an invoice accepted once the smarthost was back
waited behind all of them (30,000 at 123 a second: four minutes). A
message just accepted (``fresh``) and the mail that was already waiting
take a free slot in turns, so each gets half of the upstream while both
wait, and all of it when the other does not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class Slots:
    def __init__(self, size: int) -> None:
        self._free = size
        self._fresh: collections.deque[asyncio.Future[None]] = collections.deque()
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._fresh_next = True  # whose turn it is when both wait

    def locked(self) -> bool:
        """No slot is free now: an attempt would wait."""
        return self._free == 0

    @contextlib.asynccontextmanager
    async def slot(self, fresh: bool) -> AsyncIterator[None]:
        await self._take(fresh)
        try:
            yield
        finally:
            self._give_back()

    async def _take(self, fresh: bool) -> None:
        if self._free > 0:
            self._free -= 1
            return
        line = self._fresh if fresh else self._waiting
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give_back()  # handed over as it was cancelled: to the next
            else:
                with contextlib.suppress(ValueError):  # passed over already
                    line.remove(turn)
            raise

    def _give_back(self) -> None:
        """The slot to the next in line, whose turn it is; else it is free."""
        lines = (self._fresh, self._waiting) if self._fresh_next else (self._waiting, self._fresh)
        for line in lines:
            while line:
                turn = line.popleft()
                if turn.done():  # cancelled, and left to its owner
                    continue
                self._fresh_next = line is self._waiting
                turn.set_result(None)
                return
        self._free += 1
