"""``relay status``: whether the relay runs, with which policy, and what waits.

The questions a sysadmin asks first, answered at a glance as ``postfix status``
does: is the relay running (the PID its state directory's lock file names,
alive, and its worker processes); is the policy file what it runs (the file's
digest against the one the relay noted at its start and at each reload: an
edit not reloaded yet, or one the reload refused, shows here, and what a
reload could not take up: listener settings, workers, a certificate clients
would refuse); and is mail
waiting (the queue's messages and the age of the oldest). The exit status is
LSB's for a status action: 0 running, 1 dead (the supervisor gone, its
workers not yet), 3 not running, 4 unknown.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TextIO

from relay import statefiles, statelock
from relay.quantity import quantity
from relay.spool import Spool
from relay.spool.store import SpoolError

EX_DEAD = 1  # LSB: dead, its PID file left (here, and its workers not gone yet)
EX_NOT_RUNNING = 3
EX_UNKNOWN = 4  # LSB: the status cannot be told (run as the relay's user, or root)


# what the policy file reads as: its version and workers, or None and its problems
Read = tuple[str | None, int | None, list[str]]


def main(path: Path, queue_directory: Path, out: TextIO, read: Read) -> int:
    """``queue_directory``: the state the relay uses, found even while ``path``
    does not load; ``read``: the file as ``relay.cli`` read it, once."""
    state = queue_directory.parent
    try:
        running = statelock.holder(state)
    except statelock.StateUnreadable as exc:
        out.write(f"relay: cannot tell whether it runs: {exc}\n")
        return EX_UNKNOWN
    orphaned = running is None and statelock.held(state)
    digest, workers, problems = read
    if running is not None:
        workers = _running_workers(state, running.digest) or workers
    lines = [
        ORPHANED if orphaned else _relay(running, state, workers),
        _policy(path, running, digest, problems),
        *(
            f"policy: {note}"
            for note in (running.pending if running else ())
            if note not in (statelock.STOPPING, statelock.STARTING)
        ),
        _queue(queue_directory),
    ]
    out.write("".join(f"{line}\n" for line in lines))
    if orphaned:
        return EX_DEAD
    return 0 if running is not None else EX_NOT_RUNNING


def not_running(state: Path) -> bool:
    """Whether no relay serves from ``state``, as ``main`` tells it: workers a
    killed supervisor left serve on. False where it cannot be told."""
    try:
        return statelock.holder(state) is None and not statelock.held(state)
    except statelock.StateUnreadable:
        return False


ORPHANED = (
    "relay: its supervisor is gone; its worker processes still hold the state"
    " directory until the end of their stop's grace; relay serve refuses to start until then"
)


def _processes(count: int) -> str:
    return "process" if count == 1 else "processes"


def _running_workers(state: Path, digest: str) -> int | None:
    """The worker processes the running relay started with, as it recorded them:
    the file's number is another while a change of it waits for its reload and
    a restart, and read as processes missing ("2 of 3 … starting again"). A
    record of another version than the one running is a relay's before it
    (one rolled back to, which keeps none, left it): not this relay's."""
    try:
        with statefiles.open_read(state / statelock.CHECKED_FILES) as file:
            record = json.loads(file.read())
        workers = record["workers"]
    except FileNotFoundError:
        return 1  # a relay in one process keeps no record
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable here, or made before the record had this field
    if record.get("digest") != digest:
        return None
    return workers if isinstance(workers, int) and workers > 0 else None


def _relay(running: statelock.Holder | None, state: Path, configured: int | None) -> str:
    """``configured``: the worker processes the relay runs, as it recorded them
    (``_running_workers``; the policy file's number when that cannot be read),
    or as a reload's note of a change left for the restart says."""
    if running is None:
        return f"relay: not running (state directory {state})"
    pid = running.pid
    workers = _children(pid)
    started = _started(pid)
    since = "" if started is None else f" since {time.strftime('%Y-%m-%dT%H:%M:%S%z', started)}"
    if statelock.STOPPING in running.pending:
        finishing = f", {workers} worker {_processes(workers)} finishing"
        return f"relay: stopping, PID {pid}{since}{finishing if workers else ''}"
    if statelock.STARTING in running.pending:
        # its first workers are not "starting again", as after a crash
        return f"relay: starting, PID {pid}{since}, {_starting(workers, configured)}"
    for note in running.pending:
        if note.startswith(f"{statelock.WAITS}workers "):
            configured = int(note.removeprefix(statelock.WAITS).split()[1])
    if configured is not None and configured > 1 and workers < configured:
        # a supervisor between workers read as a relay "in one process"
        how = f"{workers} of {configured} worker processes (the others starting again: see its log)"
    else:
        how = "in one process" if not workers else f"{workers} worker {_processes(workers)}"
    return f"relay: running, PID {pid}{since}, {how}"


def _starting(workers: int, configured: int | None) -> str:
    """What a relay not serving yet is doing: reading the whole spool comes
    first (6 to 11 s for 50,000 messages), then its workers are started. The
    note does not say which of the two, so before any worker: neither."""
    if not workers:
        return "not serving yet"
    of = "" if configured is None else f" of {configured}"
    return f"{workers}{of} worker {_processes(configured or workers)} started"


def _policy(
    path: Path, running: statelock.Holder | None, digest: str | None, problems: list[str]
) -> str:
    if digest is None:
        count = quantity(len(problems), "problem")
        them = "it" if len(problems) == 1 else "them"
        broken = f"{path} does not load ({count}: relay check -c {path} names {them})"
        if running is None or not running.digest:
            return f"policy: {broken}"
        kept = running.digest[:12]
        if reads_another(running, path):  # a reload never reads this file
            return f"policy: {kept} in use; {broken}: {_elsewhere(running)}"
        if statelock.STOPPING in running.pending:  # no reload: the next start reads it
            return f"policy: {kept} in use; {broken}: the next start refuses it as it reads now"
        return f"policy: {kept} in use; {broken}: a reload keeps {kept}"
    if running is None or not running.digest:
        return f"policy: {path} reads {digest[:12]}"
    other = version_in_use(running, digest)
    if other is None:
        return f"policy: {digest[:12]} in use, as {path} reads now"
    return f"policy: {other} in use; {path} now reads {digest[:12]}: {put_in_use(running, path)}"


def version_in_use(running: statelock.Holder, digest: str) -> str | None:
    """The version ``running`` uses where the file now reads another (an edit
    not reloaded yet, or one its reload refused); ``relay preview`` says it too,
    as a preview of such a file is not what the relay does."""
    if not running.digest or running.digest == digest:
        return None
    return running.digest[:12]


def put_in_use(running: statelock.Holder, path: Path) -> str:
    """How the version of the file ``path`` comes into use: a relay stopping
    takes up no reload, and one reading another file (``path`` a copy edited
    beside the running one) never reads this one."""
    if reads_another(running, path):
        return _elsewhere(running)
    if statelock.STOPPING in running.pending:
        return "the next start puts it in use"
    return f"a reload puts it in use (systemctl reload erp-relay, or kill -HUP {running.pid})"


def _elsewhere(running: statelock.Holder) -> str:
    return f"the running relay reads {running.source}, not this file"


def reads_another(running: statelock.Holder, path: Path) -> bool:
    """Whether ``running`` reads another policy file than ``path``: the same file
    (device and inode) by another name is not, as through a symbolic link, a
    hard link or a bind mount (the host's view of a relay in a container). A
    relay that did not record its file is taken to read this one."""
    if not running.source:
        return False
    try:
        return not os.path.samefile(running.source, path)
    except OSError:  # one is not there, or not to be looked at from here
        return os.path.realpath(running.source) != os.path.realpath(path)


def _queue(directory: Path) -> str:
    try:
        waiting = Spool(directory, create=False).waiting(time.time())
    except SpoolError as exc:
        return f"queue: cannot be read: {exc}"
    active, deferred = waiting["active"], waiting["deferred"]
    if not active.count and not deferred.count:
        return "queue: empty"
    age = max(active.oldest, deferred.oldest)
    oldest = f"; the oldest came {_age(age)} ago" if age else ""
    # a record changed by a try or by a queue tool: retry and release make an
    # entry never tried count as the second, which costs a read of every record to tell
    return (
        f"queue: {active.count} not tried yet, {deferred.count} deferred, held"
        f" or rescheduled by hand{oldest}"
    )


def _age(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return "under a minute"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _children(pid: int) -> int:
    """The worker processes of ``pid``: its children that run what it runs, its
    forks (Linux's /proc; 0 where there is none). As a container's init the
    relay is the parent of every orphan in it too (a ``docker exec``'s child
    left behind), each of which was counted as a worker."""
    try:
        entries = os.listdir("/proc")
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return 0
    count = 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and fields[1] == str(pid):
                count += Path(f"/proc/{entry}/cmdline").read_bytes() == command
        except OSError:
            continue
    return count


def _started(pid: int) -> time.struct_time | None:
    """When ``pid`` started, in local time (None where /proc does not say)."""
    started = statelock.started_at(pid)
    return None if started is None else time.localtime(started)
