"""Failed logins slowed down, then refused per client address.

A wrong password costs its scrypt (~50 ms of CPU, in a thread) by design,
so a client guessing passwords as fast as it can would keep every core busy
and starve the ERPs' mail. As Postfix's ``smtpd_error_sleep_time`` and
anvil's ``smtpd_client_auth_rate_limit`` do, each failure is answered only
after ``DELAY`` seconds, and a client address with ``PER_CLIENT`` failures
within ``WINDOW`` seconds gets ``454 4.7.0`` for every AUTH, with no scrypt,
until the oldest of them is that old (a connection itself is closed after
ten AUTH commands, ``listen``). A login that succeeds forgets its address's
failures. Each worker process counts on its own, so a client spread over
several workers may get that many times the tries; the log line of each
failure names the client for fail2ban.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

DELAY = 1.0  # seconds before a failed login's reply
PER_CLIENT = 10  # failed logins of one address within WINDOW, then AUTH is refused
WINDOW = 600.0  # seconds
CLIENTS = 4096  # addresses remembered, per worker process; the oldest go first

TOO_MANY_FROM = "454 4.7.0 Too many failed logins from {client}, try again in {wait} seconds"


class AuthFailures:
    def __init__(
        self,
        per_client: int = PER_CLIENT,
        window: float = WINDOW,
        delay: float = DELAY,
        clients: int = CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_client = per_client
        self.window = window
        self.delay = delay
        self.clients = clients
        self.clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def locked(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        times = self._recent(client)
        if times is None or len(times) < self.per_client:
            return 0.0
        return max(times[0] + self.window - self.clock(), 0.0)

    def failed(self, client: str) -> bool:
        """Count a failure; whether it locked the address out just now."""
        times = self._recent(client)
        if times is None:
            times = self._failures[client] = collections.deque(maxlen=self.per_client)
            while len(self._failures) > self.clients:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(client)
        times.append(self.clock())
        return len(times) == self.per_client

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _recent(self, client: str) -> collections.deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        horizon = self.clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times
