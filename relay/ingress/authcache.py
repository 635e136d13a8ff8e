"""Passwords verified lately, so that an ERP's next login costs no scrypt.

Many ERPs open a connection, and log in, for every document they send; a
scrypt verification is ~50 ms of CPU by design, which made each of those
messages cost more than everything else the relay does for it. Like
Dovecot's auth cache, a password that verified against a login's hash is
remembered for a while, as a keyed digest (the key is random per process and
never leaves it): the same password for the same login *and the same hash*
passes at once. A hash changed in the policy, or a login removed, no longer
matches; failures are never remembered, so a wrong password always costs
its scrypt. A digest is kept for an hour from its verification at most,
also when nobody asks for it again (a replaced hash's), so that a memory
dump of a worker holds no older ones; past ``SIZE`` logins the oldest
verified goes first. One cache serves every listener of a worker.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

TTL = 3600.0  # seconds a verified password is remembered, as Dovecot's auth_cache_ttl
SIZE = 1024  # logins remembered, per worker process


class Verified:
    def __init__(
        self, ttl: float = TTL, size: int = SIZE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._known: collections.OrderedDict[tuple[str, str], tuple[bytes, float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._known)

    def known(self, login: str, password_hash: str, password: bytes) -> bool:
        """Whether this password verified against this hash within the TTL."""
        self._expire()
        found = self._known.get((login, password_hash))
        if found is None:
            return False
        return hmac.compare_digest(found[0], self._digest(login, password))

    def remember(self, login: str, password_hash: str, password: bytes) -> None:
        """Call only after the password verified against ``password_hash``."""
        self._expire()
        key = (login, password_hash)
        self._known[key] = (self._digest(login, password), self.clock() + self.ttl)
        self._known.move_to_end(key)
        while len(self._known) > self.size:
            self._known.popitem(last=False)

    def _expire(self) -> None:
        """Oldest first: every entry lives the same TTL from its (re)verification."""
        now = self.clock()
        while self._known:
            key, (_, until) = next(iter(self._known.items()))
            if until > now:
                return
            del self._known[key]

    def _digest(self, login: str, password: bytes) -> bytes:
        return hmac.new(self._key, login.encode() + b"\0" + password, hashlib.sha256).digest()
