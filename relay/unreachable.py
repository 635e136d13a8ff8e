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

Nothing is recorded for a message that waits: it was not tried, so it keeps
its attempts, its backoff and its lifetime (a message past its lifetime is
tried all the same, as its last try).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Suspended:
    until: float  # the next message is tried then
    reply: str  # what the last try found
    waiting: set[str] = field(default_factory=set)  # queue IDs planned for ``until``


class Suspensions:
    def __init__(self) -> None:
        self._upstreams: dict[str, _Suspended] = {}

    def admits(self, upstream: str, queue_id: str, now: float, wait: float) -> float | None:
        """None when ``queue_id`` may be tried now: nothing suspends ``upstream``,
        or its wait is over and this message is the one that tries (the next
        one waits ``wait`` more, unless its try answers first); otherwise when
        to look again."""
        suspended = self._upstreams.get(upstream)
        if suspended is None:
            return None
        if now < suspended.until:
            suspended.waiting.add(queue_id)
            return suspended.until
        suspended.until = now + wait
        suspended.waiting.discard(queue_id)
        return None

    def failed(self, upstream: str, reply: str, now: float, wait: float) -> bool:
        """The upstream could not be used: wait ``wait`` from now. True when it
        was not suspended before."""
        suspended = self._upstreams.get(upstream)
        if suspended is None:
            self._upstreams[upstream] = _Suspended(now + wait, reply)
            return True
        suspended.until, suspended.reply = now + wait, reply
        return False

    def reached(self, upstream: str) -> set[str] | None:
        """The upstream answered: the messages that waited for it, or None when it
        was not suspended."""
        suspended = self._upstreams.pop(upstream, None)
        return None if suspended is None else suspended.waiting

    def clear(self) -> None:
        """A sysadmin asked for every message now (``relay queue retry``), as after
        bringing the upstream back: the next tries find out again."""
        self._upstreams.clear()
