"""Reuse logged-in upstream SMTP connections across messages.

An ERP sends in bursts, and a fresh TCP + EHLO + STARTTLS + AUTH per message
costs the upstream more than the message does. Connections are kept per
``PoolKey``: host, port, TLS mode, login name and a keyed digest of the
password. Two tenants' credentials can therefore never share a connection
(Haraka #2788; Postfix disables its cache under sender-dependent auth for
the same reason), and a password changed by a policy reload never reuses a
connection logged in with the old one.

A connection goes back to the idle set only when the transaction left it in
step with the server (accepted, or refused with a clean reply); a timeout,
lost connection or cancellation closes it. A reused connection gets ``RSET``
first, and one that fails it is replaced quietly, not reported as a failed
delivery: on its own before the transaction, or, to a server that offers
PIPELINING, as the first command of the transaction's group (``Lease.reset``;
the caller then takes a new lease when ``pipelining.Stale`` says it failed).
Idle connections get ``QUIT`` after ``idle_timeout`` from a single reaper
task, which exits whenever nothing is idle.

With several workers each has a pool of its own, and a smarthost's
connection limit counts them all: the connections open and being opened are
counted in the workers' shared table (``relay.ingress.clientlimit``), so that
a worker refused over a limit the others fill does not take the smarthost
for down. Such a worker also says it wants one (``want``), and another
worker QUITs one idle connection to the smarthost for it: each worker's
idle connections are its own, and a burst's last worker held the whole
limit idle for ``idle_timeout`` while the other's mail was refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiosmtplib

from relay.hostport import host_port
from relay.policy.model import SmtpUpstream, TlsMode
from relay.sharedtable import stamp
from relay.upstream.pipelining import Unfinished

if TYPE_CHECKING:
    from relay.ingress.clientlimit import ClientRow

IDLE_TIMEOUT = 30.0  # seconds; Postfix uses 2, but ERPs send in bursts a few seconds apart
REUSE_LIMIT = 100  # messages per connection, as Postfix's smtp_connection_reuse_count_limit
MAX_IDLE_PER_KEY = 10  # the engine's default concurrency per upstream
QUIT_TIMEOUT = 5.0  # a goodbye is not worth waiting longer for
OPENING_STEPS = 6  # look-up, connect, greeting, EHLO, STARTTLS's EHLO, login: a timeout each
SHARED_LOOK = 0.05  # seconds between looks at the other workers' openings
WANTED_LOOK = 1.0  # seconds between looks, while connections are idle, at what others want
WANTED_FOR = 10.0  # seconds a worker's want of a connection is served after it said it

# the shared table's "listeners" these counts go under (no listener's name is empty)
OPEN = "\0upstream connections"
OPENING = "\0upstream connections being opened"
WANTED = "\0upstream connection wanted"  # when, in ms on the monotonic clock
SERVED = "\0upstream connection given"  # the want a connection was last QUIT for

Opener = Callable[[], Awaitable[aiosmtplib.SMTP]]

log = logging.getLogger("relay")

_SALT = os.urandom(16)  # the digest identifies a password within this process only
_IN_STEP = (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused, ValueError)


@dataclass(frozen=True)
class PoolKey:
    """Everything a connection's login depends on; connections are shared only within one key."""

    host: str
    port: int
    tls: TlsMode
    username: str | None
    secret: bytes = field(repr=False)
    helo_name: str | None = None
    ca_pem: str | None = field(default=None, repr=False)
    tls_name: str | None = None

    @classmethod
    def of(cls, upstream: SmtpUpstream, password: str | None) -> PoolKey:
        secret = b""
        if password is not None:
            raw = password.encode("utf-8", "surrogateescape")
            secret = hashlib.blake2b(raw, key=_SALT, digest_size=16).digest()
        return cls(
            upstream.host.lower(),
            upstream.port,
            upstream.tls,
            upstream.username,
            secret,
            upstream.helo_name,
            upstream.ca_pem,
            upstream.tls_name,
        )


@dataclass(frozen=True)
class Lease:
    """A connection for one transaction; ``reset``: its RSET is still to be sent,
    first in the transaction's pipelined group; ``reused``: it carried one before."""

    client: aiosmtplib.SMTP
    reset: bool = False
    reused: bool = False


@dataclass(eq=False)
class _Connection:
    key: PoolKey
    client: aiosmtplib.SMTP
    shared: ClientRow | None = None  # where it is counted as open, until closed
    uses: int = 0
    idle_since: float = 0.0

    def close(self) -> None:
        self.client.close()
        if self.shared is not None:
            self.shared.leave(OPEN, _label(self.key))
            self.shared = None


class Pool:
    """Idle connections by key; each lease has its connection to itself until it ends.

    After ``close()`` the pool keeps nothing: leases still work, but every
    connection is closed with ``QUIT`` when its transaction ends. ``shared``:
    this worker's row of the table the workers count their connections in.
    """

    def __init__(
        self,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        reuse_limit: int = REUSE_LIMIT,
        max_idle_per_key: int = MAX_IDLE_PER_KEY,
        shared: ClientRow | None = None,
    ) -> None:
        self.shared = shared
        self.idle_timeout = idle_timeout
        self.reuse_limit = reuse_limit
        self.max_idle_per_key = max_idle_per_key
        self.opened = 0  # connections opened over the pool's life
        self._idle: dict[PoolKey, list[_Connection]] = {}
        self._leased: collections.Counter[PoolKey] = collections.Counter()
        self._opening: dict[PoolKey, set[asyncio.Future[bool]]] = {}
        self._wanting: set[str] = set()  # labels this pool said it wants, until it opens one
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    def open_count(self, key: PoolKey) -> int:
        """Connections to ``key`` open now: idle, in a transaction, or between the
        two (tried with RSET, being put back). One of them, the upstream is there."""
        return self._leased[key] + self.idle_count(key)

    def open_anywhere(self, key: PoolKey) -> int:
        """``open_count`` of every worker's pool (its login's, whatever the password)."""
        if self.shared is None:
            return self.open_count(key)
        return self.shared.open(OPEN, _label(key))

    def want(self, key: PoolKey) -> None:
        """Refused over a limit only the other workers' connections fill: one of
        theirs, idle, is to be closed for this worker."""
        if self.shared is not None:
            self.shared.mark(WANTED, _label(key), stamp(time.monotonic()))
            self._wanting.add(_label(key))

    def _spared(self, idle: list[_Connection]) -> list[_Connection]:
        """One of ``idle`` for each smarthost another worker wants a connection to
        that no worker has closed one for yet (the marks of that are shared: each
        worker closed one for the same want, three for one). Looked at by the
        reaper, not at every check-in: a look costs more as the table fills."""
        if self.shared is None:
            return []
        by_label: dict[str, _Connection] = {}
        for conn in idle:
            by_label.setdefault(_label(conn.key), conn)  # the oldest first
        given = []
        now = stamp(time.monotonic())
        for label, conn in by_label.items():
            wanted = self.shared.latest_elsewhere(WANTED, label)
            if wanted <= self.shared.latest(SERVED, label) or now - wanted > WANTED_FOR * 1000:
                continue
            if self.shared.mark(SERVED, label, wanted):  # unmarked, each look gave one more
                given.append(conn)
        return given

    async def opens_alongside(self, key: PoolKey, timeout: float) -> bool:
        """Whether one of the connections to ``key`` being opened now opens: as soon
        as one does, or when all have failed. Each is bounded by the upstream's
        timeouts, one per step (connect, greeting, EHLO, STARTTLS, login): a
        wait of one ``timeout`` ended before a slow greeting and login had, and
        the connection limit read as the upstream down. The other workers'
        openings are looked at until none is left, at most as long as one
        opening may take."""
        opening = set(self._opening.get(key, ()))
        while opening:
            done, opening = await asyncio.wait(opening, return_when=asyncio.FIRST_COMPLETED)
            if any(f.result() for f in done):
                return True
        if self.shared is None:
            return False
        label = _label(key)
        deadline = time.monotonic() + OPENING_STEPS * timeout
        while self.shared.open(OPENING, label) > self.shared.here(OPENING, label):
            if self.shared.open(OPEN, label) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(SHARED_LOOK)
        return self.shared.open(OPEN, label) > 0

    def idle_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(conns) for conns in self._idle.values())

    @contextlib.asynccontextmanager
    async def lease(self, key: PoolKey, opener: Opener, timeout: float) -> AsyncIterator[Lease]:
        """A connection for one transaction; ``opener`` makes a logged-in one when none is idle.

        Errors from ``opener`` pass through untouched, so the caller maps them
        with the stage it knows.
        """
        conn, reset = await self._acquire(key, opener, timeout)  # counted in _leased
        in_step = False
        try:
            yield Lease(conn.client, reset, conn.uses > 0)
            in_step = True
        except _IN_STEP:
            in_step = True
            raise
        except Unfinished as exc:  # a refusal after refused recipients: still in step
            in_step = isinstance(exc.error, _IN_STEP)
            raise
        finally:
            try:
                if in_step:
                    await self._check_in(conn)
                else:
                    conn.close()
            finally:
                self._let_go(key)

    async def close(self) -> None:
        """QUIT every idle connection; the daemon awaits this at shutdown."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.wait([self._reaper])
            self._reaper = None
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        await asyncio.gather(*(_quit(conn) for conn in idle))

    async def _acquire(
        self, key: PoolKey, opener: Opener, timeout: float
    ) -> tuple[_Connection, bool]:
        """An idle connection that still works, or a new one; counted in ``_leased``
        from the moment it is taken or made until ``lease`` lets it go."""
        while (conn := self._take(key)) is not None:
            self._leased[key] += 1
            kept = False
            try:
                conn.client.timeout = timeout
                if time.monotonic() >= conn.idle_since + self.idle_timeout:
                    await _quit(conn)
                elif conn.client.is_connected and conn.client.supports_extension("pipelining"):
                    kept = True
                    return conn, True
                elif await _usable(conn):
                    kept = True
                    return conn, False
            finally:
                if not kept:
                    self._let_go(key)
        conn = _Connection(key, *await self._open(key, opener))
        self._leased[key] += 1
        self.opened += 1
        return conn, False

    async def _open(self, key: PoolKey, opener: Opener) -> tuple[aiosmtplib.SMTP, ClientRow | None]:
        """``opener``'s connection, which ``opens_alongside`` can wait for meanwhile,
        and the table it is counted in as open, if any."""
        opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._opening.setdefault(key, set()).add(opened)
        label, shared = _label(key), self.shared
        opening = shared is not None and shared.enter(OPENING, label)
        made = counted = False
        try:
            client = await opener()
            made = True
            counted = shared is not None and shared.enter(OPEN, label)  # False: no room
            if shared is not None and label in self._wanting:  # its slot free for another key
                self._wanting.discard(label)
                shared.mark(WANTED, label, 0)
        finally:
            opened.set_result(made)
            waiting = self._opening[key]
            waiting.discard(opened)
            if not waiting:
                del self._opening[key]
            if opening and shared is not None:
                shared.leave(OPENING, label)
        return client, shared if counted else None

    def _let_go(self, key: PoolKey) -> None:
        self._leased[key] -= 1
        if not self._leased[key]:
            del self._leased[key]

    def _take(self, key: PoolKey) -> _Connection | None:
        """The most recently used idle connection, so the surplus ones age out."""
        conns = self._idle.get(key)
        if not conns:
            return None
        conn = conns.pop()
        if not conns:
            del self._idle[key]
        return conn

    async def _check_in(self, conn: _Connection) -> None:
        conn.uses += 1
        if not conn.client.is_connected:
            conn.close()
            return
        if (
            self._closed
            or conn.uses >= self.reuse_limit
            or self.idle_count(conn.key) >= self.max_idle_per_key
        ):
            await _quit(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while self._idle:
            now = time.monotonic()
            idle = [conn for conns in self._idle.values() for conn in conns]
            ending = [
                conn
                for conn in idle
                if now >= conn.idle_since + self.idle_timeout or not conn.client.is_connected
            ]
            ending += self._spared([conn for conn in idle if conn not in ending])
            for conn in ending:
                self._forget(conn)
            await asyncio.gather(*(_quit(conn) for conn in ending))
            if self._idle:
                first = min(c.idle_since for conns in self._idle.values() for c in conns)
                wait = first + self.idle_timeout - time.monotonic()
                if self.shared is not None:
                    wait = min(wait, WANTED_LOOK)
                await asyncio.sleep(max(wait, 0.0))

    def _forget(self, conn: _Connection) -> None:
        conns = self._idle[conn.key]
        conns.remove(conn)
        if not conns:
            del self._idle[conn.key]


async def _usable(conn: _Connection) -> bool:
    """A server may drop an idle connection at any time; RSET finds out before MAIL would."""
    if conn.client.is_connected:
        try:
            await conn.client.rset()
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.debug("upstream %s: idle connection stale: %s", _hostport(conn), exc)
        else:
            return True
    conn.close()
    return False


async def _quit(conn: _Connection) -> None:
    try:
        if conn.client.is_connected:
            await conn.client.quit(timeout=min(conn.client.timeout or QUIT_TIMEOUT, QUIT_TIMEOUT))
    except (aiosmtplib.SMTPException, OSError) as exc:
        log.debug("upstream %s: QUIT failed: %s", _hostport(conn), exc)
    finally:
        conn.close()


def _hostport(conn: _Connection) -> str:
    return host_port(conn.key.host, conn.key.port)


@functools.lru_cache(maxsize=1024)
def _label(key: PoolKey) -> str:
    """What a smarthost's limit counts: connections to one host and port, with one
    login (Microsoft 365 counts them per mailbox)."""
    return f"{host_port(key.host, key.port)}\0{key.username or ''}"


_default: tuple[asyncio.AbstractEventLoop, Pool] | None = None
_shared: ClientRow | None = None


def count_in(row: ClientRow) -> None:
    """The default pool counts its connections in this worker's row of the shared table."""
    global _shared
    _shared = row
    if _default is not None:
        _default[1].shared = row


def default_pool() -> Pool:
    """The pool ``deliver`` uses. Connections belong to the loop that opened them,
    so a different running loop (a test's) gets a pool of its own."""
    global _default
    loop = asyncio.get_running_loop()
    if _default is None or _default[0] is not loop:
        _default = (loop, Pool(shared=_shared))
    return _default[1]


async def close_default_pool() -> None:
    """QUIT the default pool's connections; a later ``deliver`` starts a fresh pool."""
    global _default
    if _default is not None and _default[0] is asyncio.get_running_loop():
        pool = _default[1]
        _default = None
        await pool.close()
