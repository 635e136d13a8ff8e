"""The supervisor's writes to the audit log, each in a thread of its own.

Each ends in an fsync. On a disk that hangs, a reload's ``policy_loaded``
record held the supervisor's loop in it: a SIGTERM then (``systemctl stop``)
was neither logged nor passed on to the workers until the disk answered,
and they kept their listeners, taking clients that waited for a 250 the
disk could not give. The loop waits for the write in short steps instead,
taking the stop signals meanwhile (``Supervisor._with_audit``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class AuditWrite:
    """One write, ``work``, begun at once."""

    def __init__(self, work: Callable[[], None]) -> None:
        self._work = work
        self._error: Exception | None = None
        # a daemon: a stop that gave up waiting for it exits all the same; it inherits
        # the supervisor's blocked signals, so that none is taken in it
        self._thread = threading.Thread(target=self._run, name="audit-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._work()
        except Exception as exc:  # raised again in the supervisor's thread, as before
            self._error = exc

    def ended(self, wait: float) -> bool:
        """Whether the write has ended, waiting up to ``wait`` seconds for it;
        an error it raised is raised here."""
        self._thread.join(wait)
        if self._thread.is_alive():
            return False
        error, self._error = self._error, None
        if error is not None:
            raise error
        return True
