"""Upstreams that could not be used at all, left alone for a while.

Postfix's ``qmgr`` marks a destination it cannot connect to as dead and
defers its mail without trying each message. Without that, every message due
for an upstream that is down made its own connection: thousands of queued
messages came back as a burst of connections at the smarthost the moment it
was restarted, and a host that drops packets held every delivery slot for a
whole timeout per message. Once an attempt finds the upstream unusable (not
reached, TLS failed, no greeting or EHLO, the relay's login refused), the worker
tries one message a ``first_retry`` and plans the others for the end of the
wait; the first attempt that reaches the upstream lets them all go, also
another worker's begun since (the engine asks the workers' shared table):
with several workers, one found a smarthost's connection limit, filled by
the others' connections, and held its mail while they delivered.

One try at a time: while it runs, the others wait, however long the
upstream's ``timeout`` (a host that drops packets, a 20 s timeout and a 4 s
``first_retry`` had five tries holding slots at once). A failure suspends
nothing when another attempt reached the upstream after the failing one
began; and a connection refused as a limit refuses while another to the
upstream is open (or one opening opens) is the smarthost's connection
limit (``relay.upstream.Crowded``), no verdict either way. An upstream is
known by its settings, not its name: a reload that points the name elsewhere
starts afresh.

Nothing is recorded for a message that waits: it was not tried, so it keeps
its attempts, its backoff and its lifetime. It waits no longer than its
lifetime: past it, the engine ends it with the reply of the try that found
the upstream unusable, its last try too (``Engine._tried_for_it``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar


@dataclass
class _Suspended:
    since: float  # when the failure that suspended it ended
    until: float  # the next message is tried then
    wait: float  # first_retry when it was suspended
    reply: str = ""  # what the last try that found it unusable was told
    trying: str | None = None  # the queue ID of the try under way
    chosen: str | None = None  # the waiting message let through to try, until ``until``
    waiting: set[str] = field(default_factory=set)  # queue IDs planned for later
    tried: set[str] = field(default_factory=set)  # queue IDs whose try found it unusable

    def lets(self, queue_id: str) -> bool:
        """Whether ``queue_id`` is the message chosen to try, and none tries yet."""
        return self.chosen == queue_id and self.trying is None


K = TypeVar("K", bound=Hashable)  # what an upstream is known by


class Suspensions(Generic[K]):
    def __init__(self) -> None:
        self._suspended: dict[K, _Suspended] = {}
        self._reached: dict[K, float] = {}  # when an attempt last reached it
        self._waiting_for: dict[str, K] = {}  # queue ID -> the upstream it waits for
        self._arrivals: dict[str, float] = {}  # queue ID -> when it came, for its lifetime
        self._last_now = float("-inf")

    def _with_clock(self, now: float) -> None:
        """The times kept moved back with a wall clock set back: a suspension then
        held new mail for the size of the step, and an attempt begun after the
        step counted as begun before the failure, which lifted nothing."""
        step = now - self._last_now
        self._last_now = max(self._last_now, now) if step > -1.0 else now
        if step > -1.0:
            return
        for suspended in self._suspended.values():
            suspended.since += step
            suspended.until += step
        self._reached = {upstream: at + step for upstream, at in self._reached.items()}

    def admits(
        self,
        upstream: K,
        queue_id: str,
        now: float,
        wait: float,
        arrival: float = math.inf,
        lifetime: float = math.inf,
        wait_here: bool = True,
    ) -> float | None:
        """None when ``queue_id`` may be tried now: nothing suspends ``upstream``,
        or its wait is over, no try is under way, and this message is the one that
        tries; otherwise when to look again, at the end of its lifetime
        (``arrival`` and ``lifetime``) at the latest: planned for the end of the
        wait, each message past it came one wait behind the one before. Past
        it, the message no longer waits: not tried, it ends. Without
        ``wait_here`` a message not let through is not counted among those
        waiting for ``upstream``: it may go through another (a fallback)."""
        self._with_clock(now)
        expires = arrival + lifetime
        suspended = self._suspended.get(upstream)
        if suspended is None:
            return None
        later = None if suspended.lets(queue_id) else self._later(suspended, now)
        if later is not None and not wait_here:
            return min(later, expires)
        if later is not None and now >= expires:
            self.unwait(queue_id)
            return later
        if later is not None:
            suspended.waiting.add(queue_id)
            self._waiting_for[queue_id] = upstream
            self._arrivals[queue_id] = arrival
            return min(later, expires)
        suspended.trying, suspended.until, suspended.chosen = queue_id, now + wait, None
        self.unwait(queue_id)
        return None

    def unwait(self, queue_id: str) -> None:
        """``queue_id`` waits for no upstream any more: it goes another way."""
        upstream = self._waiting_for.pop(queue_id, None)
        self._arrivals.pop(queue_id, None)
        if upstream in self._suspended:
            self._suspended[upstream].waiting.discard(queue_id)

    def waits(self, queue_id: str, now: float, lifetime: float = math.inf) -> float | None:
        """When to look again at a message known to wait for a suspension that
        still holds, without reading its entry: a rescan makes every waiting
        message due (its record says so), and each was read and locked again
        only to wait; None when it may go on to its attempt.

        At the end of a wait the first to ask is chosen to try and the others
        wait another: all of them came due together, and each was read and
        locked for ``admits`` to send all but one back (half a second of the
        event loop for 5,000). A chosen message that never gets to its try
        (another worker holds it) is passed over when that wait ends."""
        self._with_clock(now)
        upstream = self._waiting_for.get(queue_id)
        suspended = None if upstream is None else self._suspended.get(upstream)
        if suspended is None:
            return None
        expires = self._arrivals.get(queue_id, math.inf) + lifetime  # the lifetime now
        if suspended.lets(queue_id) or now >= expires:
            return None
        later = self._later(suspended, now)
        if later is None:
            suspended.chosen, suspended.until = queue_id, now + suspended.wait
            return None
        return min(later, expires)

    @staticmethod
    def _later(suspended: _Suspended, now: float) -> float | None:
        if now < suspended.until:
            return suspended.until
        return None if suspended.trying is None else now + suspended.wait

    def ended(
        self,
        upstream: K,
        queue_id: str,
        began: float,
        unusable: bool | None,
        now: float,
        wait: float,
        reply: str = "",
    ) -> set[str] | None:
        """``queue_id``'s attempt, which ``began`` then, ended. Unusable: the upstream
        is suspended unless an attempt reached it since (None is returned).
        Reached (False): the messages that waited for it, or None when it was not
        suspended or when the attempt began before the failure that suspended it
        (a long transaction on a connection made before the upstream went down
        released every waiting message onto it). None: the attempt found out
        nothing (it raised). ``reply``: what an unusable one was told."""
        self._with_clock(now)
        suspended = self._suspended.get(upstream)
        if suspended is not None and suspended.trying == queue_id:
            suspended.trying = None
        if unusable is None:
            return None
        if not unusable:
            if suspended is not None and began < suspended.since:
                self._reached[upstream] = now
                return None
            return self.reached(upstream, now)
        if self._reached.get(upstream, began - 1.0) >= began:
            return None
        if suspended is None:
            suspended = self._suspended[upstream] = _Suspended(now, now + wait, wait)
        suspended.until, suspended.wait, suspended.reply = now + wait, wait, reply
        suspended.tried.add(queue_id)
        return None

    def reached(self, upstream: K, now: float) -> set[str] | None:
        """An attempt begun since the failure reached ``upstream`` (this worker's,
        or another's): the messages that waited for it, None if none did."""
        self._with_clock(now)
        self._reached[upstream] = now
        suspended = self._suspended.pop(upstream, None)
        if suspended is None:
            return None
        for waiter in suspended.waiting:
            self._waiting_for.pop(waiter, None)
            self._arrivals.pop(waiter, None)
        return suspended.waiting

    def let_go(self, upstream: K) -> set[str]:
        """The messages waiting for ``upstream``, no longer waiting for it though it
        stays suspended: a fallback of theirs was reached, and they go through it."""
        suspended = self._suspended.get(upstream)
        if suspended is None:
            return set()
        waiting, suspended.waiting = suspended.waiting, set()
        for waiter in waiting:
            self._waiting_for.pop(waiter, None)
            self._arrivals.pop(waiter, None)
        return waiting

    def suspended(self, upstream: K) -> bool:
        return upstream in self._suspended

    def reply(self, upstream: K) -> str:
        """What the last try that found ``upstream`` unusable was told."""
        suspended = self._suspended.get(upstream)
        return "" if suspended is None else suspended.reply

    def upstreams(self) -> list[K]:
        """The upstreams suspended now."""
        return list(self._suspended)

    def keep(self, queued: Collection[str], upstreams: Collection[K]) -> None:
        """Forget messages no longer queued (delivered by another worker, deleted,
        expired) and upstreams the policy no longer has (a reload changed their
        settings): a suspension may last weeks (a revoked account password).
        A suspension none of whose messages is queued any more is forgotten too:
        it holds nothing back, and the metrics said the worker held the
        upstream's mail while its queue was empty. The next message tries at
        once, as after a start."""
        queued = set(queued)
        for queue_id in self._waiting_for.keys() - queued:
            upstream = self._waiting_for.pop(queue_id)
            if upstream in self._suspended:
                self._suspended[upstream].waiting.discard(queue_id)
        for upstream in (self._suspended.keys() | self._reached.keys()) - set(upstreams):
            for waiter in self._suspended.pop(upstream, _Suspended(0.0, 0.0, 0.0)).waiting:
                self._waiting_for.pop(waiter, None)
            self._reached.pop(upstream, None)
        self._arrivals = {q: at for q, at in self._arrivals.items() if q in self._waiting_for}
        for upstream, suspended in list(self._suspended.items()):
            suspended.tried &= queued
            if not (suspended.tried or suspended.waiting or suspended.trying):
                del self._suspended[upstream]

    def try_now(self, now: float) -> None:
        """A sysadmin asked for the queue now (``relay queue retry``, ``release``):
        each suspended upstream's next message tries at once, also while another
        try seems under way; one for each, not all of them, in case it is still down."""
        self._with_clock(now)
        for suspended in self._suspended.values():
            suspended.until = min(suspended.until, now)
            suspended.trying = suspended.chosen = None
