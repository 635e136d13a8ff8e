"""Steps of the wall clock forward, so that a queued message's lifetime is time
that passed, not a clock that jumped. Set six days ahead (a slip in ``date
-s``, a VM's clock put right the wrong way), every message waiting for a
retry expired at its next try, seconds after it came, and its sender was
told it had not been delivered within 5 days.

A step is told from time passing by the clock of time since boot, which
counts a suspended host's sleep (``CLOCK_BOOTTIME``): a host suspended for a
day did let a day pass. The supervisor looks too, and a worker it starts
anew begins with what it saw (``os.fork`` copies it); a relay started after
a step reads its messages' ages off the clock as it is, as Postfix does. A
step back is not undone for the messages (they live that much longer, and
none is failed early), except where it sets right a step forward seen
before.
"""

from __future__ import annotations

import time
from collections.abc import Callable

STEP = 60.0  # seconds the wall clock may gain on time passed between two looks
MOST = 64  # steps remembered; the oldest are let go


def since_boot() -> float:
    """Seconds since boot, time suspended included where the system counts it."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class ClockSteps:
    """The steps forward seen between looks: cheap enough to look at every
    attempt, and a look needs no regular pace, as two readings of each clock
    measure any step between them."""

    def __init__(
        self, wall: Callable[[], float] = time.time, boot: Callable[[], float] = since_boot
    ) -> None:
        self._wall = wall
        self._boot = boot
        self._last = (wall(), boot())
        # (the wall clock before the step, seconds gained); replaced whole, never
        # changed in place: the metrics' thread reads it while a look changes it
        self._steps: list[tuple[float, float]] = []
        self.taken_back = 0.0

    def look(self) -> float:
        """The seconds the wall clock gained (or lost, below 0) since the last
        look, where they are a step: 0.0 for time that passed. ``taken_back``
        then says how much of a step back set right steps forward."""
        self.taken_back = 0.0
        wall, boot = self._wall(), self._boot()
        last_wall, last_boot = self._last
        self._last = (wall, boot)
        gained = (wall - last_wall) - (boot - last_boot)
        if gained >= STEP:
            # the clock as it would read without the step: a message that came
            # between the last look and the step came before it
            self._steps = [*self._steps, (wall - gained, gained)][-MOST:]
            return gained
        if gained <= -STEP:
            self.taken_back = self._take_back(-gained)
            return gained
        return 0.0

    def _take_back(self, lost: float) -> float:
        """A step back sets right the steps forward before it, the last first;
        how much of it did."""
        left = lost
        steps = list(self._steps)
        while left > 0 and steps:
            before, gained = steps.pop()
            taken = min(gained, left)
            left -= taken
            if gained - taken >= STEP:  # the clocks' readings leave a sliver: no step
                steps.append((before, gained - taken))
        self._steps = steps
        return lost - left

    def arrival(self, arrival: float) -> float:
        """When a message that came at ``arrival`` came, on the clock as it reads
        now: later by each step forward since. Read from the metrics' thread
        too: the steps as one look left them, never half-way through the next."""
        steps = self._steps
        return arrival + sum(gained for before, gained in steps if arrival <= before)
