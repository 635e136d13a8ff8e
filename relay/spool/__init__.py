"""The durable spool: a message answered with 250 is on disk and survives a crash."""

from relay.spool.entry import (
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    SUPPRESSED,
    QueueEntry,
    RecipientState,
)
from relay.spool.store import NoSuchEntry, Spool, SpoolBusy, SpoolError

__all__ = [
    "DELIVERED",
    "EXPIRED",
    "FAILED",
    "PENDING",
    "SUPPRESSED",
    "NoSuchEntry",
    "QueueEntry",
    "RecipientState",
    "Spool",
    "SpoolBusy",
    "SpoolError",
]
