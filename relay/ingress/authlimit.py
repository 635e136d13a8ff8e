"""Failed logins slowed down, then refused per client address, across workers.

A wrong password costs its scrypt (~50 ms of CPU, in a thread) by design,
so a client guessing passwords as fast as it can would keep every core busy
and starve the ERPs' mail. As Postfix's ``smtpd_error_sleep_time`` and
anvil's ``smtpd_client_auth_rate_limit`` do, each failure is answered only
after ``DELAY`` seconds, and a client address with ``PER_CLIENT`` failures
within ``WINDOW`` seconds gets ``454 4.7.0`` for every AUTH, with no scrypt,
until the oldest of them is that old (a connection itself is closed after
ten AUTH commands, ``listen``). Checks of one address run at most as many
at once as it has tries left, in all workers together, the others waiting
for their turn: a failure is known only once its scrypt is over, and a
burst of guesses on as many connections at once all got checked. A login
that succeeds forgets its address's failures at that login name, not the
others: a client holding one login's password could otherwise guess at
another's without end, logging in rightly after every nine guesses. The
kernel hands connections to any worker, so the failures are in a
``sharedtable``: a worker's slot for an address holds the time and login
(a hash of the name) of its own last ``PER_CLIENT`` failures there and of
the last success of as many logins (those that forget the most failures
still counted kept first), and every worker reads them all, so a client
gets its tries once, not once a worker.
The log line of each failure names the client for fail2ban.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from relay.ingress.clientlimit import ClientCounts, ClientRow
from relay.sharedtable import Row, SharedTable, key_of

DELAY = 1.0  # seconds before a failed login's reply
PER_CLIENT = 10  # failed logins of one address within WINDOW, then AUTH is refused
WINDOW = 600.0  # seconds
CLIENTS = 4096  # addresses with failures in the window, per worker; past that not counted
TURN_POLL = 0.05  # seconds between looks of a check waiting for its turn
# the checks under way are counted in the connection counts' table, under a
# name no listener has: the supervisor clears a dead worker's row there
CHECKING = "\0auth checks"
NO_LOGIN = 0  # a failure without a login name to it (not UTF-8, none given): no success clears it
SUCCESSES, FAILURES = 0, 1  # the two parts of a slot

TOO_MANY_FROM = "454 4.7.0 Too many failed logins from {client}, try again in {wait} seconds"


class AuthFailures:
    def __init__(
        self,
        per_client: int = PER_CLIENT,
        window: float = WINDOW,
        delay: float = DELAY,
        clients: int = CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        shared: Row | None = None,
        checks: ClientRow | None = None,
    ) -> None:
        """``shared``: this worker's row of a ``table(workers)``, ``checks`` its row
        of the connection counts (``clientlimit``); without them the counts are
        this process's alone."""
        self.per_client = per_client
        self.window = window
        self.delay = delay
        self.clock = clock
        self._row = shared if shared is not None else table(1, per_client, clients).row(0)
        self._checks = checks if checks is not None else ClientCounts(1).row(0)

    def locked(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        times = self._recent(client)
        if len(times) < self.per_client:
            return 0.0
        return max((times[-self.per_client] + self._window_ms - self._now()) / 1000, 0.0)

    async def turn(self, client: str) -> bool:
        """Wait until ``client``'s password may be checked, False if it is locked
        meanwhile; on True the caller calls ``checked`` once it has said how the
        check went. Right passwords wait too, briefly: an ERP that opens a dozen
        connections at once is not refused for the checks of its own logins."""
        while True:
            failures = len(self._recent(client))
            if failures >= self.per_client:
                return False
            # counted first, then looked at: two workers that looked first could
            # both take the last place (a full row: not counted, as a connection)
            counted = self._checks.enter(CHECKING, client)
            if not counted or failures + self._checks.open(CHECKING, client) <= self.per_client:
                return True
            self._checks.leave(CHECKING, client)
            await asyncio.sleep(TURN_POLL * random.uniform(0.5, 1.5))  # not in step with them

    def checked(self, client: str) -> None:
        self._checks.leave(CHECKING, client)

    def failed(self, client: str, login: str | None = None) -> bool:
        """Count a failure at ``login``; whether the address is locked out now."""
        base = self._row.own(key_of(client), self._done)
        if base is not None:
            times, _ = self._part(base, FAILURES)
            oldest = min(range(self.per_client), key=lambda i: self._row.words[times + i])
            self._put(base, FAILURES, oldest, _login(login))
        return len(self._recent(client)) >= self.per_client

    def succeeded(self, client: str, login: str) -> None:
        """The address's failures at ``login`` until now are forgotten, in every
        worker. The success takes the place of the same login's, else of the
        one that forgets the fewest failures still counted (the oldest of
        those): taking the oldest, a dozen other logins succeeding made an
        ERP's nine corrected typos count again, and one more failure locked
        every ERP at the address out."""
        base = self._row.own(key_of(client), self._done)
        if base is None:
            return
        words, name = self._row.words, _login(login)
        times, names = self._part(base, SUCCESSES)
        places = range(self.per_client)
        same = [i for i in places if words[times + i] and words[names + i] == name]
        failures = self._counted(client)

        def forgets(i: int) -> tuple[int, int]:
            ok, at = words[names + i], words[times + i]
            return sum(1 for t, n in failures if n == ok and t < at), at

        self._put(base, SUCCESSES, same[0] if same else min(places, key=forgets), name)

    def _put(self, base: int, part: int, at: int, name: int) -> None:
        times, names = self._part(base, part)
        self._row.words[names + at] = name  # before the time it goes with
        self._row.words[times + at] = self._now()

    def _part(self, base: int, part: int) -> tuple[int, int]:
        """Where the times and where the logins of a slot's successes or failures begin."""
        times = base + 2 * self.per_client * part
        return times, times + self.per_client

    @property
    def _window_ms(self) -> int:
        return int(self.window * 1000)

    def _now(self) -> int:
        """Milliseconds, never 0 (an empty word)."""
        return int(self.clock() * 1000) + 1

    def _recent(self, client: str) -> list[int]:
        """The times of the address's failures within the window, every worker's,
        oldest first, but those at a login that succeeded since."""
        bases = list(self._row.found(key_of(client)))
        successes = [ok for b in bases for ok in self._events(b, SUCCESSES)]
        return sorted(
            t
            for t, name in self._counted(client, bases)
            if not any(at > t and name == ok for at, ok in successes)
        )

    def _counted(self, client: str, bases: list[int] | None = None) -> list[tuple[int, int]]:
        """(time, login) of the address's failures within the window, every worker's."""
        if bases is None:
            bases = list(self._row.found(key_of(client)))
        horizon = self._now() - self._window_ms
        return [(t, name) for b in bases for t, name in self._events(b, FAILURES) if t > horizon]

    def _events(self, base: int, part: int) -> list[tuple[int, int]]:
        """(time, login) of each success or failure a slot holds (time 0: none;
        the clock starts at the boot)."""
        words = self._row.words
        times, names = self._part(base, part)
        return [
            (words[times + i], words[names + i]) for i in range(self.per_client) if words[times + i]
        ]

    def _done(self, base: int) -> bool:
        """A slot whose times are all past the window counts for nothing any more."""
        horizon = self._now() - self._window_ms
        events = (*self._events(base, SUCCESSES), *self._events(base, FAILURES))
        return all(t <= horizon for t, _ in events)


def _login(name: str | None) -> int:
    return NO_LOGIN if name is None else key_of(name)


def table(workers: int, per_client: int = PER_CLIENT, clients: int = CLIENTS) -> SharedTable:
    return SharedTable("failed logins", workers, clients, 4 * per_client)
