"""Hard bounces the list file refused (a full disk, a file made read-only),
kept in the worker's memory and added with the next write that works.

The delivery's outcome is final either way; only the entry would be lost,
and with it the protection it gives: mail to a dead mailbox is what gets a
platform's mail taken for spam. A worker that stops with entries still kept
names them in its log, so a sysadmin can add them by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from relay.quantity import quantity
from relay.suppression.entry import Key, Suppression

log = logging.getLogger("relay.engine")

LIMIT = 100_000  # about the size of a large list; beyond it, the oldest are counted only


class Backlog:
    def __init__(self, limit: int = LIMIT) -> None:
        self._kept: dict[Key, Suppression] = {}
        self._limit = limit
        self._dropped = 0

    def __bool__(self) -> bool:
        return bool(self._kept)

    def kept(self) -> list[Suppression]:
        """To be written with the next entries; they stay kept until ``written``."""
        return list(self._kept.values())

    def keep(self, entries: Iterable[Suppression], error: Exception) -> None:
        """An address kept twice keeps its first refusal, as the list would."""
        for item in entries:
            if item.key in self._kept:
                continue
            log.error(
                "%s: <%s> is kept in memory until the suppression list can be written: %s",
                item.queue_id,
                item.address,
                error,
            )
            self._kept[item.key] = item
        while len(self._kept) > self._limit:
            del self._kept[next(iter(self._kept))]
            self._dropped += 1

    def written(self, entries: Iterable[Suppression]) -> None:
        """``entries``: those of ``kept`` that a write that worked carried (or
        that are listed meanwhile)."""
        if not self._kept:
            return
        for item in entries:
            self._kept.pop(item.key, None)
        if not self._kept:
            log.info("the suppression list can be written again")

    def abandon(self) -> None:
        """At the stop: what is still kept is lost with the process, so it is named."""
        if not self._kept and not self._dropped:
            return
        addresses = " ".join(sorted(item.address for item in self._kept.values()))
        dropped = f" and {self._dropped} more not named" if self._dropped else ""
        many = len(self._kept) + self._dropped != 1
        log.error(
            "stopping with %s refused as not existing that the suppression list"
            " could not take%s; add %s with `relay suppression add`: %s",
            quantity(len(self._kept), "address", "addresses"),
            dropped,
            "them" if many else "it",
            addresses,
        )
        self._kept.clear()
        self._dropped = 0
