"""Upstreams that could not be used at all, left alone for a while.

Postfix's ``qmgr`` marks a destination it cannot connect to as dead and
defers its mail without trying each message. Without that, every message due
for an upstream that is down made its own connection: thousands of queued
messages came back as a burst of connections at the smarthost the moment it
was restarted, and a host that drops packets held every delivery slot for a
whole timeout per message. Once an attempt finds the upstream unusable (not
reached, TLS failed, no greeting, the relay's login refused), the worker
tries one message a ``first_retry`` and plans the others for the end of the
wait; the first attempt that reaches the upstream lets them all go.

One try at a time: while it runs, the others wait, however long the
upstream's ``timeout`` (a host that drops packets, a 20 s timeout and a 4 s
``first_retry`` had five tries holding slots at once). A failure suspends
nothing when an attempt that began after it reached the upstream since: a
smarthost refusing the one connection over its limit (``421 Too many
connections``) while the others deliver is not down. An upstream is known
by its settings, not its name: a reload that points the name elsewhere
starts afresh.

Nothing is recorded for a message that waits: it was not tried, so it keeps
its attempts, its backoff and its lifetime (a message past its lifetime is
tried all the same, as its last try).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class _Suspended:
    until: float  # the next message is tried then
    trying: str | None = None  # the queue ID of the try under way
    waiting: set[str] = field(default_factory=set)  # queue IDs planned for later


class Suspensions:
    def __init__(self) -> None:
        self._suspended: dict[Hashable, _Suspended] = {}
        self._reached: dict[Hashable, float] = {}  # when an attempt last reached it

    def admits(self, upstream: Hashable, queue_id: str, now: float, wait: float) -> float | None:
        """None when ``queue_id`` may be tried now: nothing suspends ``upstream``,
        or its wait is over, no try is under way, and this message is the one that
        tries; otherwise when to look again."""
        suspended = self._suspended.get(upstream)
        if suspended is None:
            return None
        if suspended.trying is not None or now < suspended.until:
            suspended.waiting.add(queue_id)
            return suspended.until if now < suspended.until else now + wait
        suspended.trying, suspended.until = queue_id, now + wait
        suspended.waiting.discard(queue_id)
        return None

    def ended(
        self,
        upstream: Hashable,
        queue_id: str,
        began: float,
        unusable: bool | None,
        now: float,
        wait: float,
    ) -> set[str] | None:
        """``queue_id``'s attempt, which ``began`` then, ended. Unusable: the upstream
        is suspended unless an attempt reached it since (None is returned).
        Reached (False): the messages that waited for it, or None when it was not
        suspended. None: the attempt found out nothing (it raised)."""
        suspended = self._suspended.get(upstream)
        if suspended is not None and suspended.trying == queue_id:
            suspended.trying = None
        if unusable is None:
            return None
        if not unusable:
            self._reached[upstream] = now
            suspended = self._suspended.pop(upstream, None)
            return None if suspended is None else suspended.waiting
        if self._reached.get(upstream, began - 1.0) >= began:
            return None
        suspended = self._suspended.setdefault(upstream, _Suspended(now + wait))
        suspended.until = now + wait
        return None

    def suspended(self, upstream: Hashable) -> bool:
        return upstream in self._suspended

    def try_now(self, now: float) -> None:
        """A sysadmin asked for the queue now (``relay queue retry``, ``release``):
        each suspended upstream's next message tries at once, also while another
        try seems under way; one for each, not all of them, in case it is still down."""
        for suspended in self._suspended.values():
            suspended.until, suspended.trying = min(suspended.until, now), None
