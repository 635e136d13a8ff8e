"""Failed logins slowed down, then refused per login and address, across workers.

A wrong password costs its scrypt (~50 ms of CPU, in a thread) by design,
so a client guessing passwords as fast as it can would keep every core busy
and starve the ERPs' mail. As Postfix's ``smtpd_error_sleep_time`` and
anvil's ``smtpd_client_auth_rate_limit`` do, each failure is answered only
after ``DELAY`` seconds; a client address with ``PER_LOGIN`` failures at one
login name within ``WINDOW`` seconds gets ``454 4.7.0`` for that login, and
one with ``PER_CLIENT`` failures at any for every AUTH, with no scrypt,
until the oldest of them is that old (a connection itself is closed after
ten AUTH commands, ``listen``). The lock of one login leaves the others be:
one company's ERP retrying a stale password locked every company behind the
same address (a hosted ERP server, a shared NAT) out of its mail, while a
guesser at several names still meets the address's. Checks of one address
run at most as many at once as it has tries left, in all workers together, the others waiting
for their turn: a failure is known only once its scrypt is over, and a
burst of guesses on as many connections at once all got checked. A login
that succeeds forgets its address's failures at that login name, not the
others: a client holding one login's password could otherwise guess at
another's without end, logging in rightly after every nine guesses. The
kernel hands connections to any worker, so the failures are in a
``sharedtable``: a worker's slot for an address holds the time and login
(a hash of the name) of its own last ``2 * PER_CLIENT`` failures there and of
the last success of as many logins as all workers' failures may name, and
every worker reads them all, so a client gets its tries once, not once a
worker.
A client is counted by ``clientlimit.counted_as``: an IPv6 one by its /64,
whose 2**64 addresses got their tries each. A full row gives the slot of the
client that counts least to a new one, never a locked client's: past the
row's room the failures went uncounted, so one host with a /64 filled it
and switched the lock-out off for everyone.
The log line of each failure names the client's address for fail2ban.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from relay.ingress.clientlimit import ClientCounts, ClientRow, counted_as
from relay.sharedtable import EVICT_AMONG, Row, SharedTable, key_of

log = logging.getLogger("relay")

DELAY = 1.0  # seconds before a failed login's reply
PER_CLIENT = 20  # failed logins of one address within WINDOW, at any logins: AUTH is refused
PER_LOGIN = 10  # failed logins at one login name: that login is refused from the address
WINDOW = 600.0  # seconds
CLIENTS = 4096  # clients with failures in the window, per worker; past that the least given up
TURN_POLL = 0.05  # seconds between looks of a check waiting for its turn
# the checks under way are counted in the connection counts' table, under a
# name no listener has: the supervisor clears a dead worker's row there
CHECKING = "\0auth checks"
NO_LOGIN = 0  # a failure without a login name to it (not UTF-8, none given): no success clears it
SUCCESSES, FAILURES = 0, 1  # the two parts of a slot

TOO_MANY_FROM = "454 4.7.0 Too many failed logins from {client}, try again in {wait}"
TOO_MANY_AS = (
    "454 4.7.0 Too many failed logins with this login name from {client}, try again in {wait}"
)


class AuthFailures:
    def __init__(
        self,
        per_client: int = PER_CLIENT,
        window: float = WINDOW,
        per_login: int | None = None,
        delay: float = DELAY,
        clients: int = CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        shared: Row | None = None,
        checks: ClientRow | None = None,
    ) -> None:
        """``shared``: this worker's row of a ``table(workers)``, ``checks`` its row
        of the connection counts (``clientlimit``); without them the counts are
        this process's alone. ``per_login``: ``PER_LOGIN``, at most ``per_client``."""
        self.per_client = per_client
        self.per_login = min(PER_LOGIN if per_login is None else per_login, per_client)
        self.window = window
        self.delay = delay
        self.clock = clock
        self._row = shared if shared is not None else table(1, per_client, clients).row(0)
        self._checks = checks if checks is not None else ClientCounts(1).row(0)
        self._said_full = -60_000  # ms: when the log last said a failure went uncounted

    def locked(self, client: str, login: str | None = None) -> float:
        """Seconds until ``client`` may try again (at ``login``, when given); 0 when
        it may now."""
        failures = self._recent(client)
        wait = self._wait([t for t, _ in failures], self.per_client)
        if login is None:
            return wait
        name = _login(login)
        return max(wait, self._wait([t for t, n in failures if n == name], self.per_login))

    def _wait(self, times: list[int], limit: int) -> float:
        if len(times) < limit:
            return 0.0
        return max((times[-limit] + self._window_ms - self._now()) / 1000, 0.0)

    def address_locked(self, client: str) -> bool:
        """Whether every login is refused from ``client``, not only some."""
        return self.locked(client) > 0

    async def turn(self, client: str, login: str | None = None) -> bool:
        """Wait until ``client``'s password at ``login`` may be checked, False if
        either is locked meanwhile; on True the caller calls ``checked`` once it
        has said how the check went. Right passwords wait too, briefly: an ERP
        that opens a dozen connections at once is not refused for the checks of
        its own logins. The address's checks under way count against the
        login's tries left too: which login each is at is not kept."""
        while True:
            if self._full(client, login, 0):
                return False
            # counted first, then looked at, the failures too: two workers that
            # looked first could both take the last place (a full row: not
            # counted, as a connection), and a failure a check that has left
            # recorded in between was seen by neither
            counted = self._checks.enter(CHECKING, counted_as(client))
            under_way = self._checks.open(CHECKING, counted_as(client))
            if not counted or not self._full(client, login, under_way):
                return True
            self._checks.leave(CHECKING, counted_as(client))
            await asyncio.sleep(TURN_POLL * random.uniform(0.5, 1.5))  # not in step with them

    def _full(self, client: str, login: str | None, under_way: int) -> bool:
        """Whether the failures and the other checks under way (``under_way``
        counts this one) take every try the address or the login has left."""
        failures = self._recent(client)
        name = _login(login)
        mine = sum(1 for _, n in failures if n == name)
        others = max(under_way - 1, 0)
        return len(failures) + others >= self.per_client or mine + others >= self.per_login

    def checked(self, client: str) -> None:
        self._checks.leave(CHECKING, counted_as(client))

    def failed(self, client: str, login: str | None = None) -> bool:
        """Count a failure at ``login``; whether the address or the login is
        locked out now.
        It takes the place of one no longer counted (past the window, or
        forgiven by a later success at its login): a client holding one
        login's password failed and logged in there again and again, and its
        forgiven failures pushed its guesses at another login out, never
        locked. A worker keeps twice as many failures as lock an address:
        checks let through before a lock end after it, up to as many again,
        and each must count, or failures at the client's own login, forgiven
        later, took their places (dropped during the lock, they went
        uncounted alike)."""
        base = self._slot(_key(client))
        if base is not None:
            bases = list(self._row.found(_key(client)))
            successes = self._events(bases, SUCCESSES)
            horizon = self._now() - self._window_ms
            _, _, count = self._part(base, FAILURES)

            def keeps(i: int) -> tuple[bool, int]:
                event = self._event(base, FAILURES, i)
                return _counts(event, successes, horizon), event[0]

            self._put(base, FAILURES, min(range(count), key=keeps), _login(login))
        return self.locked(client, login) > 0

    def succeeded(self, client: str, login: str) -> None:
        """The address's failures at ``login`` until now are forgiven, in every
        worker. A worker keeps the last success of as many logins as every
        worker keeps failures, so that each failure still counted may have
        its login's: with fewer, a dozen ERPs behind one address correcting a
        typo each pushed out one another's successes, their typos counted
        again, and one more failure locked them all out. A success that
        forgives nothing is not kept; one of the same login is replaced,
        else one that forgives nothing any more."""
        name = _login(login)
        bases = list(self._row.found(_key(client)))
        successes = self._events(bases, SUCCESSES)
        failures = self._events(bases, FAILURES)
        horizon = self._now() - self._window_ms
        base = self._row.mine(_key(client))
        same = [] if base is None else self._same(base, name)
        if not same and not any(_counts(f, successes, horizon) and f[1] == name for f in failures):
            return
        base = base if base is not None else self._slot(_key(client))
        if base is None:
            return
        _, _, count = self._part(base, SUCCESSES)
        places = range(count)

        def forgives(i: int) -> tuple[int, int]:
            at, ok = mine = self._event(base, SUCCESSES, i)
            others = [e for e in successes if e != mine]
            return sum(
                1 for t, n in failures if n == ok and t <= at and _counts((t, n), others, horizon)
            ), at

        self._put(base, SUCCESSES, same[0] if same else min(places, key=forgives), name)

    def _same(self, base: int, name: int) -> list[int]:
        """The places of the slot at ``base`` holding a success at ``name``."""
        _, _, count = self._part(base, SUCCESSES)
        return [i for i in range(count) if self._event(base, SUCCESSES, i)[1] == name]

    def _slot(self, key: int) -> int | None:
        """This worker's slot for ``key``; in a full row, the slot that counts least
        of the few near its place (``sharedtable.EVICT_AMONG``). None when each of
        those is locked: what ``key`` did is not counted, said at most once a
        minute. Ranking the whole row, past the locked slots, took seconds of
        the event loop's CPU for each failure of a new client."""
        base = self._row.own(key, self._done, self._rank)
        now = self._now()
        if base is None and now >= self._said_full + 60_000:
            self._said_full = now
            log.error(
                "failed logins: a worker's table of %d clients is full and the %d near a new"
                " one's place are locked out: its failures are not counted",
                self._row.table.slots,
                EVICT_AMONG,
            )
        return base

    def _rank(self, base: int) -> tuple[int, int] | None:
        """How much giving up the slot at ``base`` would change: its failures
        that count, and the other workers' it forgives alone, which would count
        again; then its newest time. None when its client is locked, or would
        be without it: a legitimate client's forgiven typos are not to lock it
        out."""
        bases = list(self._row.found(self._row.words[base - 1]))
        others = [b for b in bases if b != base]
        horizon = self._now() - self._window_ms
        before = self._counted(bases, bases, horizon)
        after = self._counted(others, others, horizon)
        if self._locks(before) or self._locks(after):
            return None
        mine = len(self._counted([base], bases, horizon))
        unforgiven = len(after) - (len(before) - mine)
        return mine + unforgiven, self._newest(base)

    def _counted(
        self, bases: list[int], forgiving: list[int], horizon: int
    ) -> list[tuple[int, int]]:
        """The failures of the slots at ``bases`` that the successes of those at
        ``forgiving`` leave counted, oldest first."""
        successes = self._events(forgiving, SUCCESSES)
        return sorted(f for f in self._events(bases, FAILURES) if _counts(f, successes, horizon))

    def _locks(self, failures: list[tuple[int, int]]) -> bool:
        """Whether ``failures`` (oldest first) lock the client or one of its logins
        now. A failure without a login name locks no login."""
        if self._wait([t for t, _ in failures], self.per_client):
            return True
        names = {n for _, n in failures} - {NO_LOGIN}
        return any(
            self._wait([t for t, n in failures if n == name], self.per_login) for name in names
        )

    def _put(self, base: int, part: int, at: int, name: int) -> None:
        times, names, _ = self._part(base, part)
        self._row.words[names + at] = name  # before the time it goes with
        self._row.words[times + at] = self._now()

    def _part(self, base: int, part: int) -> tuple[int, int, int]:
        """Where the times and the logins of a slot's failures or successes begin,
        and how many it keeps: twice ``per_client`` failures, then the
        successes of as many logins as that many failures in each worker may
        name."""
        failures = 2 * self.per_client
        if part == FAILURES:
            return base, base + failures, failures
        successes = (self._row.table.stride - 1) // 2 - failures
        times = base + 2 * failures
        return times, times + successes, successes

    @property
    def _window_ms(self) -> int:
        return int(self.window * 1000)

    def _now(self) -> int:
        """Milliseconds, never 0 (an empty word)."""
        return int(self.clock() * 1000) + 1

    def _recent(self, client: str) -> list[tuple[int, int]]:
        """(time, login) of the address's failures still counted, every worker's,
        oldest first: within the window, and not forgiven."""
        bases = list(self._row.found(_key(client)))
        return self._counted(bases, bases, self._now() - self._window_ms)

    def _event(self, base: int, part: int, i: int) -> tuple[int, int]:
        """(time, login) of place ``i``: time 0 for none (the clock starts at the boot)."""
        times, names, _ = self._part(base, part)
        return self._row.words[times + i], self._row.words[names + i]

    def _events(self, bases: list[int], part: int) -> list[tuple[int, int]]:
        """Every (time, login) the slots at ``bases`` hold of ``part``."""
        words = self._row.words
        found = []
        for base in bases:
            times, names, count = self._part(base, part)
            # each time read before its login, as _event: written the other way round
            pairs = zip(words[times : times + count], words[names : names + count], strict=True)
            found += [e for e in pairs if e[0]]
        return found

    def _done(self, base: int) -> bool:
        """A slot whose times are all past the window counts for nothing any more."""
        newest = self._newest(base)
        return newest == 0 or newest <= self._now() - self._window_ms

    def _newest(self, base: int) -> int:
        """The slot's latest time, 0 for none. Read a part at once: a full row
        looks at each of its slots for every client new to it."""
        words = self._row.words
        newest = 0
        for part in (SUCCESSES, FAILURES):
            times, _, count = self._part(base, part)
            newest = max(newest, *words[times : times + count])
        return newest


def _counts(failure: tuple[int, int], successes: list[tuple[int, int]], horizon: int) -> bool:
    """Whether a failure counts: within the window, and no success at its login
    since (in the same millisecond included: the order is not known)."""
    t, name = failure
    return t > horizon and not any(at >= t and name == ok for at, ok in successes)


def _key(client: str) -> int:
    return key_of(counted_as(client))


def _login(name: str | None) -> int:
    return NO_LOGIN if name is None else key_of(name)


def table(workers: int, per_client: int = PER_CLIENT, clients: int = CLIENTS) -> SharedTable:
    """A slot: twice ``per_client`` failures and as many successes for each worker, a
    time and a login each (``AuthFailures._part``)."""
    return SharedTable("failed logins", workers, clients, 4 * per_client * (1 + workers))
