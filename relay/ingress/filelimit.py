"""Connections a worker takes for the open files its limit leaves it.

At its open-files limit a worker's accept fails, and libuv closes the
connection it could not take with no reply and nothing in the log; the
sessions already open then fail their spool writes (``451 4.3.0``) and the
audit log its records. So each worker takes connections only as far as its
limit leaves room for them beside its own files (``room``), and refuses the
rest with a ``421``, as past ``max_connections``. The count is the worker's
own: each is a process of its own, with its own table of files.
"""

from __future__ import annotations

import logging
import resource
import time

from relay.engine import file_budget
from relay.policy.model import Policy
from relay.quantity import quantity

log = logging.getLogger("relay")

#: The soft limit is raised no further than this, even when the hard one is
#: unlimited: a file table that size is already more than a relay needs.
MOST_FILES = 1 << 20
#: A worker's files that are no connection's nor the engine's: the standard
#: streams and the log, the listening sockets, the event loop's own (epoll, its
#: wake-up pipes), the supervisor's pipe, the spool and state directories and
#: locks, the audit log, DNS lookups, a reload's reads of the policy and its
#: keys, and, in one process, the metrics server and its clients.
OWN_FILES = 64
#: Files a connection may hold: its socket, and its message's spool file while
#: it is written.
PER_CONNECTION = 2
#: Connections the metrics server keeps waiting for their first bytes, at the
#: most: each is a file, so no more than a sixteenth of the limit.
METRICS_WAITING = 4096
OUT_OF_FILES = "421 4.3.2 Out of file descriptors for more connections, try again later"
SAID_EVERY = 3600.0  # seconds between warnings while connections are refused for it


def serve_limit() -> int:
    """The open-files limit ``relay serve`` runs under when started as this
    process was: it raises the soft limit to the hard one (``raise_open_files``),
    so ``relay check`` in the unit's ExecStartPre knows the unit's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    return max(soft, MOST_FILES if hard == resource.RLIM_INFINITY else min(hard, MOST_FILES))


def metrics_waiting(soft: int) -> int:
    """Connections the metrics server may keep waiting for their first bytes
    under a soft limit of ``soft``: a few thousand silent ones cost no request
    thread, but each a file, and in one process the worker's connections need
    the rest."""
    if soft == resource.RLIM_INFINITY:
        return METRICS_WAITING
    return max(1, min(METRICS_WAITING, soft // 16))


def room(soft: int, policy: Policy) -> int | None:
    """Connections one worker may have open under a soft limit of ``soft``;
    None: no limit. Its own files are kept out (``OWN_FILES``), and so is what
    the delivery engine may hold at the most: a quarter of the limit for
    accepted messages waiting for their delivery (``file_budget``), and for
    each attempt under way its entry's file and its upstream connection, up
    to ``queue.concurrency`` an upstream (idle pooled connections among them)
    and no more than the engine's other quarter; in one process, the metrics
    server's connections waiting for their requests (``metrics_waiting``).
    Each connection counts as two files (``PER_CONNECTION``): what is left
    then still lets every open session write its message and the audit log
    its record."""
    if soft == resource.RLIM_INFINITY:
        return None
    budget = file_budget(soft)
    attempts = min(policy.queue.concurrency * max(1, len(policy.upstreams)), budget)
    reserve = OWN_FILES + budget + 2 * attempts
    if policy.metrics is not None and policy.workers == 1:
        reserve += metrics_waiting(soft)
    return max(1, (soft - reserve) // PER_CONNECTION)


def too_few(soft: int) -> str | None:
    """Why ``relay serve`` does not start under ``soft`` open files; None where it
    may. Under 28 it took connections and answered every message 451."""
    if soft == resource.RLIM_INFINITY or soft >= OWN_FILES:
        return None
    return (
        f"open files: a limit of {soft} is too few to serve: the relay holds about 25 files"
        f" before its first connection, and keeps {OWN_FILES} for its own; raise the hard"
        " limit (LimitNOFILE in the unit, ulimit -Hn)"
    )


def unreachable(soft: int, policy: Policy) -> list[str]:
    """What of the listeners' connection limits the workers cannot reach under
    ``soft``, said with the numbers: each would refuse past its room first."""
    each = room(soft, policy)
    if each is None:
        return []
    most = each * policy.workers
    said = []
    for listener in policy.listeners:
        for setting in ("max_connections", "max_connections_per_client"):
            limit = getattr(listener, setting)
            if limit is not None and limit > most:
                said.append(
                    f"listener {listener.name}: {setting} {limit} cannot be reached under an"
                    f" open-files limit of {soft}: at most {quantity(each, 'connection')} a worker,"
                    f" {most} in all with {quantity(policy.workers, 'worker')}, and the rest are"
                    " refused (421 4.3.2); raise LimitNOFILE in the unit, or lower the setting"
                )
    return said


class FileRoom:
    """One worker's room for connections, and the warning of refusals for want of it."""

    def __init__(self, soft: int, most: int | None) -> None:
        self.soft = soft
        self.most = most
        self._said = -SAID_EVERY  # monotonic time of the last warning
        self._unsaid = 0  # refused since then, not said yet

    def full(self, others: int) -> bool:
        """Whether a connection must be refused, ``others`` being open in this worker."""
        return self.most is not None and others >= self.most

    def refused(self, client: str, listener: str, said: str) -> None:
        """Warned of at the first refusal, then at most once every ``SAID_EVERY``
        with the count since: a flood of connections wrote a line each."""
        self._unsaid += 1
        now = time.monotonic()
        if now - self._said < SAID_EVERY:
            return
        log.warning(
            "refused client=%s on listener %s: out of file descriptors for more connections:"
            " %s open in this worker, the most its open-files limit of %d leaves room for"
            " beside its own files; %d refused so since this was last said (the metrics count"
            " each); raise LimitNOFILE in the unit%s",
            client,
            listener,
            self.most,
            self.soft,
            self._unsaid,
            said,
        )
        self._said, self._unsaid = now, 0


def of_this_process(policy: Policy) -> FileRoom:
    """The room the limit this worker runs under leaves it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FileRoom(soft, room(soft, policy))
