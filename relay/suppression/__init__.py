"""The suppression list: addresses the relay no longer sends to (``store``), and
``relay suppression``, the sysadmin's view of it (``tools``)."""

from relay.suppression.store import (
    BOUNCE,
    COMPLAINT,
    EMPTY,
    MANUAL,
    REASONS,
    Suppression,
    SuppressionError,
    SuppressionFile,
    SuppressionList,
    now,
)

__all__ = [
    "BOUNCE",
    "COMPLAINT",
    "EMPTY",
    "MANUAL",
    "REASONS",
    "Suppression",
    "SuppressionError",
    "SuppressionFile",
    "SuppressionList",
    "now",
]
