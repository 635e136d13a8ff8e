"""The suppression list: addresses the relay no longer sends to. ``entry`` is
one entry and a line of the file, ``store`` the file, ``index`` the list as
a worker holds it, ``backlog`` the entries the file refused for a while,
``tools`` ``relay suppression``, the sysadmin's view."""

from relay.suppression.backlog import Backlog
from relay.suppression.entry import BOUNCE, COMPLAINT, MANUAL, REASONS, Suppression, now
from relay.suppression.index import EMPTY, SuppressionList
from relay.suppression.store import Listing, SuppressionError, SuppressionFile

__all__ = [
    "BOUNCE",
    "COMPLAINT",
    "EMPTY",
    "MANUAL",
    "REASONS",
    "Backlog",
    "Listing",
    "Suppression",
    "SuppressionError",
    "SuppressionFile",
    "SuppressionList",
    "now",
]
