"""An upstream's delivery slots (``queue.concurrency``), taken in turns.

After an outage the backlog is due at once and every message of it waits
for a slot; in one line, an invoice accepted once the smarthost was back
waited behind all of them (30,000 at 123 a second: four minutes). A
message just accepted (``fresh``) and the mail that was already waiting
take a free slot in turns, so each gets half of the upstream while both
wait, and all of it when the other does not.

Within each, the tenants take turns too: one company's ERP sending
thousands of documents in a loop, within its hourly limit, held every other
company's mail on a shared smarthost behind all of them (18 s at a sink
taking five a second). Each tenant's own mail keeps its order.

An attempt that would wait may be parked in line instead (``park``): a
queue ID with no task, no open file and no message bytes, started when its
turn comes. A stalled upstream's backlog of thousands of messages holds
nothing else while it waits.

A smarthost with a connection limit below ``queue.concurrency`` (Microsoft
365 takes three per mailbox) refused every connection over it with a 421,
and each refused message waited its backoff: a burst of twenty took a
``first_retry`` for all but three. As Postfix lowers a destination's
concurrency on such failures, a refusal over the limit (``crowded``) lowers
the slots to the attempts still under way, and each round of as many
deliveries as there are slots gives one back (``reached``), up to the
configured number, one at a time a minute apart at most (``WIDEN_AFTER``):
widened each round, the smarthost refused one connection more at every
round, each a deferral on record. Refused with no other attempt under way,
the limit is the other workers' to fill: the one slot left rests
``REST`` before it is given back, or each waiting message took it in turn
and was refused at once, tens of refusals a second while another worker
held the connections idle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

WIDEN_AFTER = 60.0  # seconds from the last change of the slots to the next widening
REST = 2.0  # seconds a slot refused alone waits before its next attempt (the engine's retry)

Turn = asyncio.Future[None]
# a parked attempt: called with the slot handed to it, which it gives back
Granted = Callable[[], None]


class _Line:
    """The attempts of one kind waiting for a slot, a queue per tenant, the
    tenants served in rotation."""

    def __init__(self) -> None:
        self._tenants: collections.OrderedDict[str, collections.deque[Turn | Granted]] = (
            collections.OrderedDict()
        )

    def __bool__(self) -> bool:
        return bool(self._tenants)

    def append(self, tenant: str, turn: Turn | Granted) -> None:
        self._tenants.setdefault(tenant, collections.deque()).append(turn)

    def popleft(self) -> Turn | Granted:
        tenant, turns = next(iter(self._tenants.items()))
        turn = turns.popleft()
        if turns:
            self._tenants.move_to_end(tenant)
        else:
            del self._tenants[tenant]
        return turn

    def remove(self, tenant: str, turn: Turn) -> None:
        """ValueError when it is no longer waiting."""
        turns = self._tenants.get(tenant)
        if turns is None:
            raise ValueError(turn)
        turns.remove(turn)
        if not turns:
            del self._tenants[tenant]


class Slots:
    def __init__(
        self,
        size: int,
        tasks: dict[bool, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``tasks``: attempts waiting in line as tasks, by kind (fresh or not),
        counted with those of the engine's other upstreams when it is shared:
        the engine asks at every start, and a sum over thousands of upstreams
        each time cost more than the start."""
        self._size = size
        self._free = size
        self._retired = 0  # slots taken out of use by ``crowded``
        self._owed = 0  # slots to take out of use as they come back
        self._reached = 0  # deliveries since the slots last changed, while some are out
        self._clock = clock
        self._changed = 0.0  # when ``crowded`` or ``reached`` last changed them
        self._rest = False  # the next slot given back rests first (``crowded``)
        self._resting: asyncio.TimerHandle | None = None
        self._fresh = _Line()
        self._waiting = _Line()
        self._fresh_next = True  # whose turn it is when both wait
        self._tasks = tasks if tasks is not None else {True: 0, False: 0}

    @property
    def size(self) -> int:
        """The slots in use now: ``queue.concurrency``, less what a limit took out."""
        return self._size - self._retired - self._owed

    @property
    def full(self) -> int:
        """``queue.concurrency`` as these slots were made with it."""
        return self._size

    def crowded(self) -> None:
        """An attempt holding a slot was refused a connection over the upstream's
        limit: as many slots as the other attempts under way hold, at least one."""
        held = self._size - self._retired - self._free
        self._rest = held <= 1
        excess = self.size - max(1, held - 1)
        if excess <= 0:
            return
        taken = min(self._free, excess)
        self._free -= taken
        self._retired += taken
        self._owed += excess - taken
        self._reached = 0
        self._changed = self._clock()

    def reached(self) -> None:
        """An attempt got through: after as many as there are slots, and
        ``WIDEN_AFTER`` since the last change, one more slot."""
        if self.size >= self._size:
            return
        self._reached += 1
        if self._reached < self.size or self._clock() - self._changed < WIDEN_AFTER:
            return
        self._reached = 0
        self._changed = self._clock()
        self._widen(1)

    def widen_fully(self) -> None:
        """All of ``queue.concurrency`` again: the upstream is another now (a reload
        pointed its name elsewhere), whose limit nothing has shown."""
        self._rest = False
        if self._resting is not None:
            self._resting.cancel()
            self._resting = None
            self.give_back()
        self._widen(self._retired + self._owed)
        self._reached = 0

    def _widen(self, count: int) -> None:
        for _ in range(count):
            if self._owed:
                self._owed -= 1
            else:
                self._retired -= 1
                self.give_back()

    def locked(self) -> bool:
        """No slot is free now: an attempt would wait."""
        return self._free == 0

    def waiting(self, fresh: bool) -> int:
        """How many attempts of the kind wait in line as tasks (in every Slots
        sharing ``tasks``), parked ones aside: they hold no file, so the engine
        does not count them as under way."""
        return self._tasks[fresh]

    def park(self, fresh: bool, tenant: str, granted: Granted) -> None:
        """Wait in line without a task: at its turn ``granted`` is called with the
        slot taken for it, and it is for the caller to give it back."""
        if self._free > 0:
            self._free -= 1
            granted()
            return
        (self._fresh if fresh else self._waiting).append(tenant, granted)

    @contextlib.contextmanager
    def handed(self) -> Iterator[None]:
        """A parked attempt's slot, held until the attempt ends."""
        try:
            yield
        finally:
            self.give_back()

    @contextlib.asynccontextmanager
    async def slot(self, fresh: bool, tenant: str = "") -> AsyncIterator[None]:
        await self._take(fresh, tenant)
        try:
            yield
        finally:
            self.give_back()

    async def _take(self, fresh: bool, tenant: str) -> None:
        if self._free > 0:
            self._free -= 1
            return
        line = self._fresh if fresh else self._waiting
        turn: Turn = asyncio.get_running_loop().create_future()
        line.append(tenant, turn)
        self._tasks[fresh] += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give_back()  # handed over as it was cancelled: to the next
            else:
                with contextlib.suppress(ValueError):  # passed over already
                    line.remove(tenant, turn)
            raise
        finally:
            self._tasks[fresh] -= 1

    def give_back(self) -> None:
        """The slot to the next in line, whose turn it is; else it is free; or,
        after ``crowded``, out of use, or back after its rest."""
        if self._rest:
            self._rest = False
            self._resting = asyncio.get_running_loop().call_later(REST, self._rested)
            return
        if self._owed:
            self._owed -= 1
            self._retired += 1
            return
        lines = (self._fresh, self._waiting) if self._fresh_next else (self._waiting, self._fresh)
        for line in lines:
            while line:
                turn = line.popleft()
                if isinstance(turn, asyncio.Future) and turn.done():  # cancelled, left to its owner
                    continue
                self._fresh_next = line is self._waiting
                if isinstance(turn, asyncio.Future):
                    turn.set_result(None)
                else:
                    turn()
                return
        self._free += 1

    def _rested(self) -> None:
        self._resting = None
        self.give_back()
