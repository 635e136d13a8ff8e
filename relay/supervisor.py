"""Worker processes: one event loop per core, like Postfix's master and its smtpd.

One event loop runs on one core, and receiving, signing and delivering a
message is CPU work, so a busy relay runs ``workers`` processes. The
supervisor binds the listeners (a port in use fails the start, not a
worker), forks the workers, which all accept on the same sockets, and
then only watches: it restarts a worker that dies, passes SIGHUP on after
checking the policy itself (a broken file reaches no worker), records each
policy version once, runs the audit log's daily upkeep, and on SIGTERM
lets every worker finish its transactions before exiting. On SIGHUP the
workers load what the supervisor checked: the policy's text and the bytes of
every file it read (keys, certificates, passwords), handed over in the state
directory for the moment of the reload, never the files themselves, which
may have changed again. Each worker answers which policy it then runs, and
the supervisor says the policy is reloaded once every one runs it; one that
does not is named and replaced by a worker started with the new policy.

Each worker is a whole relay: its own spool writer, delivery engine,
upstream connections and audit writer. They share the spool (entries are
locked across processes) and the audit log (appends are serialised by a
file lock and keep one hash chain). A worker whose supervisor is gone,
even by ``kill -9``, stops on its own (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from relay import statelock
from relay.auditwrite import AuditWrite
from relay.clocksteps import ClockSteps
from relay.diskwatch import DiskWatch
from relay.ingress import Sockets
from relay.metrics import status as metrics_status
from relay.policy import pickled, yamlsource
from relay.policy.files import RefusedFile
from relay.policy.model import Policy, Sources
from relay.quantity import quantity
from relay.server import (
    AUDIT_UPKEEP,
    LOCK_FILE_CHECK,
    STOP_GRACE,
    SharedCounts,
    audit_upkeep,
    in_use,
    keep_lock_file,
    note_in_use,
    read_policy,
    record_policy,
    reloaded,
    said_reloading,
    serve,
    settle_orphans,
    spool_upkeep,
    stopping_now,
)
from relay.startwatch import STOPS

if TYPE_CHECKING:
    from relay.metrics.serve import MetricsServer

HANDOVER = "policy.handover.json"  # a reload's policy, for the workers

log = logging.getLogger("relay")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
READY_TIMEOUT = 30.0  # for every worker to be serving
STOP_TIMEOUT = STOP_GRACE + 10  # a worker's grace, then its last records and closing
RELOAD_TIMEOUT = 30.0  # for every worker to answer a reload
AUDIT_TICK = 0.1  # seconds between looks for a stop signal while an audit write waits
UNREAD = 0  # a worker's answer to a reload whose number it could not read: reloads count from 1
RESTART_DELAY = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # by quick deaths in a row
QUICK = 10.0  # a worker dying sooner than this after its start counts as a crash loop
GIVE_UP = 5  # quick deaths in a row of one worker that stop the relay
EX_SOFTWARE = 70
_PR_SET_PDEATHSIG = 1


@dataclass
class _Worker:
    index: int
    pid: int
    started: float
    quick_deaths: int = 0


class WorkerLink:
    """A worker's side of the supervisor: readiness, the checked policy and the
    answer to it, and noticing the supervisor is gone."""

    def __init__(
        self,
        index: int,
        supervisor: int,
        ready_fd: int | None,
        handover: Path,
        answers: int,
        clock_steps: ClockSteps | None = None,
    ) -> None:
        """``clock_steps``: the steps of the clock the supervisor saw, so that a worker
        started anew does not expire the mail queued before one."""
        self.index = index
        self.clock_steps = clock_steps
        self.supervisor = supervisor
        self._ready_fd = ready_fd
        self._handover = handover
        self._answers = answers
        # one of the workers the relay started with, not a replacement: the first
        # scan of a large queue is said by worker 0 of these alone, once a start
        self.first_start = ready_fd is not None
        self._reload: int | None = None  # the number of the supervisor's reload taken up
        self._said_orphaned = False

    def checked_policy(self, path: Path, old: Policy) -> Policy | None:
        """The policy the supervisor checked and recorded, built from the text and
        the files' bytes it read, not from the files as they are now: they may
        have changed again since, and no worker may run a policy nobody checked
        (or one the others do not run)."""
        self._reload = UNREAD  # answered all the same: the supervisor waits for it
        try:
            self._reload, sources, built = _handed_over(self._handover.read_bytes())
        except FileNotFoundError:
            log.warning(
                "worker %d: no policy handed over: a reload is a SIGHUP to the supervisor"
                " (pid %d), which checks the policy first; keeping policy %s",
                self.index,
                self.supervisor,
                old.digest[:12],
            )
            return None
        except (OSError, ValueError) as exc:
            log.error(
                "worker %d: cannot read the policy handed over: %s; keeping policy %s",
                self.index,
                exc,
                old.digest[:12],
            )
            return None
        try:
            read = pickled.loads(built) if built is not None else None
        except ValueError as exc:  # built again from the text: slower, as good
            log.warning("worker %d: %s; building it from the text", self.index, exc)
            read = None
        if read is not None and read.sources != sources:
            read = None
        return reloaded(path, old, quiet=True, data=sources.text, files=sources.files, built=read)

    def answer(self, running: Policy) -> None:
        """Tells the supervisor which policy runs here after its reload."""
        if self._reload is None:
            return
        line = f"{self._reload} {os.getpid()} {running.digest}\n".encode()
        self._reload = None
        try:
            os.write(self._answers, line)  # shorter than PIPE_BUF: whole or not at all
        except OSError as exc:
            log.error("worker %d: cannot answer the reload: %s", self.index, exc)

    def ready(self) -> None:
        """Serving, with its own signal handlers: the signals held back since the
        fork (a SIGHUP or SIGTERM then would have killed it) come through now."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        if self._ready_fd is not None:
            os.write(self._ready_fd, b"r")
            os.close(self._ready_fd)
            self._ready_fd = None

    async def watch_parent(self, stop: Callable[[], None]) -> None:
        """The death signal covers a supervisor that dies; this covers a race at fork."""
        while not self.orphaned():
            await asyncio.sleep(1.0)
        stop()

    def orphaned(self) -> bool:
        """Whether the supervisor is gone, said in the log the first time: the
        death signal is a SIGTERM, which alone reads like an ordinary stop."""
        if os.getppid() == self.supervisor:
            return False
        if not self._said_orphaned:
            log.error("worker %d: the supervisor is gone; stopping", self.index)
            self._said_orphaned = True
        return True


class Supervisor:
    def __init__(
        self,
        policy_path: Path,
        policy: Policy,
        sockets: Sockets,
        metrics: MetricsServer | None,
        shared: SharedCounts,
        lock: statelock.Lock,
        clock_steps: ClockSteps | None = None,
    ) -> None:
        """``clock_steps``: those the metrics read, looked at here each second."""
        self.policy_path = policy_path
        self.policy = policy
        # every upstream name a policy in use has had: a worker may have begun
        # attempts under one a reload has renamed since
        self.upstreams_named = set(policy.upstreams)
        self.running_workers = policy.workers  # a reload's change waits for a restart
        self.sockets = sockets
        self.shared = shared  # made before the first fork: shared by every worker
        self.workers: dict[int, _Worker] = {}  # by pid
        # the running policy's text, for the queue and audit tools
        self.checked = policy.queue.directory.parent / statelock.CHECKED_NAME
        # what the workers load at a reload, there until each has answered: it holds keys
        self.handover = policy.queue.directory.parent / HANDOVER
        self.clock_steps = clock_steps or ClockSteps()  # handed to each worker as it starts
        self.reloads = 0
        self._answers, self._answering = os.pipe()  # each worker's "RELOAD PID DIGEST\n"
        os.set_blocking(self._answers, False)
        os.set_blocking(self._answering, False)  # a worker never waits on the supervisor
        self._partial = b""
        # index -> (when, quick deaths, the pid of the worker it replaces)
        self.restarts: dict[int, tuple[float, int, int]] = {}
        self.kill_at: dict[int, float] = {}  # pid -> when, for workers a reload stopped
        self.metrics = metrics  # bound, counting; saying "starting" until the workers serve
        self.lock = lock  # its file kept by the supervisor, which notes the policy in it
        self.disk = DiskWatch(shared.disk, lambda: self.policy.queue.directory.parent)
        self.told: float | None = None  # when the workers were told to stop (monotonic)
        self._writing: AuditWrite | None = None  # the audit write a stop was taken in

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # the metrics thread held them already
        self.shared.disk.use(self.shared.disk.supervisor, keep_ended=True)
        try:
            code = self._start()
            if code == 0:
                metrics_status.loaded()
                self._started_metrics()
                self._serving()
                code = self._watch()
            self._stop()
            self._audit_written()
            self.disk.look(last=True)  # a write that ended in the stop, after the loop's looks
            log.info("stopped")
            return code
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            while signal.sigtimedwait(SIGNALS, 0) is not None:
                pass  # a signal left pending would end the process by its default action
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _start(self) -> int:
        keep_policy_text(self.policy.queue.directory.parent, self.policy)
        pipes = {}
        for index in range(self.policy.workers):
            read_fd, write_fd = os.pipe()
            self._spawn(index, write_fd)
            os.close(write_fd)
            pipes[read_fd] = index
        deadline = time.monotonic() + READY_TIMEOUT
        said_stop = False
        try:
            while pipes:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("workers %s did not start in time", sorted(pipes.values()))
                    return EX_SOFTWARE
                stops = signal.sigpending() & STOPS
                if stops and not said_stop:  # taken by ``_watch`` once they serve
                    said_stop = True
                    log.info(
                        "%s while the workers start: stopping once they serve",
                        min(stops).name,
                    )
                    stopping_now(self.policy)  # for /readyz and relay status meanwhile
                    for pid in self.workers:  # each held it back: it stops as it serves
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGTERM)
                readable, _, _ = select.select(list(pipes), [], [], min(left, 0.2))
                for fd in readable:
                    if os.read(fd, 1) != b"r":
                        return self._failed_start(pipes.pop(fd))
                    os.close(fd)
                    del pipes[fd]
        finally:
            for fd in pipes:
                os.close(fd)
        # told to stop as they started, they took no mail: not "serving"
        doing = "stopping" if said_stop else "serving"
        log.info("%s %s", quantity(len(self.workers), "worker"), doing)
        return 0

    def _failed_start(self, index: int) -> int:
        """A worker that cannot start will not start on a retry either: stop, say why.
        Every worker reaped is let go of: one that died with it (all abort under a
        low LimitNPROC), left counted, was waited for through the stop's whole
        timeout and then failed the supervisor's own wait."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            failed = None
            for pid, status in self._reaped():
                worker = self.workers.pop(pid, None)
                if worker is not None and worker.index == index:
                    failed = status
            if failed is not None:
                log.error("worker %d %s while starting", index, _how(failed))
                code = os.waitstatus_to_exitcode(failed)
                return code if code > 0 else EX_SOFTWARE
            time.sleep(0.05)
        return EX_SOFTWARE

    def _started_metrics(self) -> None:
        if self.metrics is not None:
            metrics_status.workers(len(self.workers), self.policy.workers)
            metrics_status.beat()
            self.metrics.start(lambda: self.policy)

    def _serving(self) -> None:
        """The lock file's note that the relay starts is gone: ``relay status``
        counts its workers from here, one missing as one started again; a stop
        said while they started stays said."""
        note_in_use(self.policy)

    def _watch(self) -> int:
        next_upkeep = time.monotonic() + AUDIT_UPKEEP
        next_look = time.monotonic() + LOCK_FILE_CHECK
        while self.told is None:  # else taken in an audit write: the workers are told
            self.clock_steps.look()
            metrics_status.beat()
            metrics_status.workers(len(self.workers), self.policy.workers)
            self.disk.look()
            due = [when for when, _, _ in self.restarts.values()] + list(self.kill_at.values())
            timeout = max(0.0, min([1.0, *(when - time.monotonic() for when in due)]))
            info = signal.sigtimedwait(SIGNALS, timeout)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._take_stop()
                return 0
            if info is not None and info.si_signo == signal.SIGHUP:
                if signal.sigpending() & STOPS:  # taken first, the lower number
                    log.info("SIGHUP while stopping: not reloaded")
                    continue  # the stop, next: its workers may be ending, not to start again
                if self._reload():
                    return EX_SOFTWARE
            if self._reap_and_restart():
                return EX_SOFTWARE
            if self.told is not None:  # taken in the reload's or the dead worker's audit write
                continue
            self._kill_overdue()
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + LOCK_FILE_CHECK
                keep_lock_file(self.lock, self.policy)
            if time.monotonic() >= next_upkeep:
                next_upkeep += AUDIT_UPKEEP
                self._upkeep()
        return 0

    def _reap_and_restart(self) -> bool:
        """Workers that ended are started again; True when one keeps dying at its start
        (``GIVE_UP`` times in a row): the relay stops, for its service manager to
        start it afresh. A new version installed over a running relay did this: each
        replacement worker, forked from the old supervisor, read the new files and
        failed, and the supervisor kept the port and the state lock, taking no mail
        and delivering none, with systemd seeing nothing wrong."""
        for pid, status in self._reaped():
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self.shared.clients.row(worker.index).clear()  # its connections ended with it
            self.shared.tally.row(worker.index).ended_with_worker(self.upstreams_named)
            self.shared.disk.clear(worker.index)
            metrics_status.worker_ended()
            if self.told is not None:  # taken in an audit write below: told, not crashed
                self._ended_while_stopping(worker, status)
                continue
            quick = worker.quick_deaths + 1 if time.monotonic() - worker.started < QUICK else 0
            if quick >= GIVE_UP:
                log.critical(
                    "worker %d (pid %d) %s, the %dth time in a row within %gs of its start:"
                    " stopping the relay, for its service manager to start it afresh (a new"
                    " version installed over a running relay does this; see the log above)",
                    worker.index,
                    pid,
                    _how(status),
                    quick,
                    QUICK,
                )
                return True
            delay = RESTART_DELAY[min(quick, len(RESTART_DELAY) - 1)]
            log.log(
                logging.WARNING if status == 0 else logging.ERROR,  # a crash stays an error
                "worker %d (pid %d) %s; starting a new one in %gs",
                worker.index,
                pid,
                _how(status),
                delay,
            )
            self.restarts[worker.index] = (time.monotonic() + delay, quick, pid)
            why = f"worker {worker.index} (pid {pid}) ended"
            self._with_audit(lambda audit, why=why: settle_orphans(self.policy, audit, why))
        if self.told is not None:
            return False  # none started again: the relay stops
        for index, (when, quick, _) in list(self.restarts.items()):
            if when <= time.monotonic():
                del self.restarts[index]
                self._spawn(index, None, quick)
        return False

    def _kill_overdue(self) -> None:
        """A worker a reload told to stop that is still there ``STOP_TIMEOUT`` later
        (stuck in a regular expression, or stopped) is killed, so that its
        replacement starts: until then the relay runs a worker short."""
        for pid, when in list(self.kill_at.items()):
            if pid not in self.workers:
                del self.kill_at[pid]
            elif when <= time.monotonic():
                del self.kill_at[pid]
                index = self.workers[pid].index
                log.error(
                    "worker %d (pid %d) did not stop in %gs: killing it",
                    index,
                    pid,
                    STOP_TIMEOUT,
                )
                _signal(pid, signal.SIGKILL)

    def _spawn(self, index: int, ready_fd: int | None, quick_deaths: int = 0) -> None:
        supervisor = os.getpid()
        with self.metrics.forking() if self.metrics is not None else contextlib.nullcontext():
            pid = os.fork()
        if pid == 0:  # the worker
            code = EX_SOFTWARE
            try:
                os.close(self._answers)
                if self.metrics is not None:
                    self.metrics.close_in_child()
                link = WorkerLink(
                    index, supervisor, ready_fd, self.handover, self._answering, self.clock_steps
                )
                code = _worker(self.policy_path, self.policy, self.sockets, link, self.shared)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = _Worker(index, pid, time.monotonic(), quick_deaths)
        log.info("worker %d started (pid %d)", index, pid)

    def _reload(self) -> bool:
        """True when a worker gave up meanwhile (``_reap_and_restart``): the relay stops."""
        said_reloading(self.policy_path)
        try:
            data = yamlsource.read_bytes(self.policy_path)
        except (OSError, RefusedFile) as exc:
            log.error("reload failed: %s: keeping policy %s", exc, self.policy.digest[:12])
            metrics_status.reload_failed()
            return False
        read = read_policy(self.policy_path, self.policy, data=data)
        new = None if read is None else reloaded(self.policy_path, self.policy, built=read)
        if read is None or new is None or new.sources is None:
            return False
        self.reloads += 1
        try:
            try:
                _write_private(self.handover, _handing_over(self.reloads, new.sources, read))
                _write_checked(self.checked, new, self.running_workers)
            except OSError as exc:
                log.error("reload failed: cannot hand the policy to the workers: %s", exc)
                metrics_status.reload_failed()
                return False
            old, self.policy = self.policy, new  # a worker started from now on runs it
            self.upstreams_named |= set(new.upstreams)
            statelock.note_policy(
                new.queue.directory.parent, new.digest, new.pending, self.policy_path
            )
            self._with_audit(lambda audit: record_policy(audit, self.policy_path, new))
            if self.told is not None:
                self._not_passed_on(new, old)
                return False
            metrics_status.loaded()
            asked = {pid: worker.index for pid, worker in self.workers.items()}
            self._read_answers()  # late ones, to reloads before: none is about this one
            for pid in asked:
                _signal(pid, signal.SIGHUP)
            return self._confirm(asked, new, old)
        finally:
            _remove_handover(self.handover)

    def _not_passed_on(self, new: Policy, old: Policy) -> None:
        """A stop taken in the reload's record: the workers stop on the policy they
        run, which ``relay status``, the metrics and the tools name again. Until
        then they named the reload's, as in any reload before the workers answer:
        switched only after the record, they disagreed while it waited (status
        named the old, the tools' copy the new, and took the workers for dying)."""
        log.info(
            "reload to policy %s not passed on to the workers: stopping; they stop"
            " running policy %s",
            new.digest[:12],
            old.digest[:12],
        )
        self.policy = old
        note_in_use(old)  # with the stop's note
        try:
            _write_checked(self.checked, old, self.running_workers)
        except OSError as exc:
            log.warning("cannot keep the running policy's text for the tools: %s", exc)

    def _confirm(self, asked: dict[int, int], new: Policy, old: Policy) -> bool:
        """``policy reloaded`` once every worker ``asked`` runs ``new``. One that kept
        another, or did not answer in time, is named and stopped: its replacement is
        started with ``new``, so mail does not go out under two policies until the
        next reload. One that ended meanwhile is replaced with ``new`` anyway; True
        when one gave up meanwhile, which the wait had let pass, the relay serving
        on a worker short for good."""
        waiting = dict(asked)
        kept: dict[int, str] = {}
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while waiting and time.monotonic() < deadline:
            metrics_status.beat()  # waiting for the workers is not being stuck
            self.disk.look()  # a worker that does not answer may be waiting for the disk
            if _stop_pending():
                return False  # the stop comes first; every worker ends with it
            select.select([self._answers], [], [], 0.05)
            for reload, pid, digest in self._read_answers():
                answered = reload in (self.reloads, UNREAD) and waiting.pop(pid, None) is not None
                if answered and digest != new.digest:
                    kept[pid] = digest
            if self._reap_and_restart():
                return True
            if self.told is not None:  # taken while a dead worker's mail was settled
                return False
            for pid in [pid for pid in waiting if pid not in self.workers]:
                del waiting[pid]
        if not kept and not waiting:
            in_use(new, old)
            return False
        for pid, index in asked.items():
            if pid in kept or pid in waiting:
                why = (
                    f"kept policy {kept[pid][:12]}"
                    if pid in kept
                    else f"did not answer within {RELOAD_TIMEOUT:g}s"
                )
                log.error(
                    "reload to policy %s: worker %d (pid %d) %s; stopping it, to be"
                    " replaced by one running policy %s",
                    new.digest[:12],
                    index,
                    pid,
                    why,
                    new.digest[:12],
                )
                _signal(pid, signal.SIGTERM)
                self.kill_at[pid] = time.monotonic() + STOP_TIMEOUT
        return False

    def _read_answers(self) -> list[tuple[int, int, str]]:
        """The workers' answers to reloads that have come in whole: (reload, pid, digest)."""
        while True:
            try:
                chunk = os.read(self._answers, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        found = []
        for line in lines:
            try:
                reload, pid, digest = line.decode("ascii").split(" ")
                found.append((int(reload), int(pid), digest))
            except ValueError:
                log.warning("a worker's answer to a reload is garbled: %r", line)
        return found

    def _upkeep(self) -> None:
        """Not in ``_with_audit``'s thread: compressing a large closed day takes
        seconds of a healthy disk, and a stop taken meanwhile cut it off at its
        exit, leaving its temporary file and an error that blamed the disk."""
        self._audit(audit_upkeep)
        spool_upkeep(self.policy)

    def _with_audit(self, work: Callable[..., None]) -> None:
        """``work`` on the audit log, in a thread of its own (``relay.auditwrite``):
        a stop signal taken while it waits for the disk is said and passed on to
        the workers at once, the write left to end meanwhile (``_audit_written``)."""
        if self.told is not None:
            return  # the write the stop was taken in may still hold the log
        writing = AuditWrite(lambda: self._audit(work))
        while not writing.ended(AUDIT_TICK):
            if signal.sigtimedwait(STOPS, 0) is not None:
                self._writing = writing
                self._take_stop()
                return

    def _audit(self, work: Callable[..., None]) -> None:
        from relay.audit import AuditError
        from relay.record import audit_log

        try:
            with audit_log(self.policy.audit) as audit:
                work(audit)
        except AuditError as exc:
            log.error("cannot open the audit log: %s", exc)

    def _audit_written(self) -> None:
        """The write a stop was taken in, waited for until the workers' own
        timeout: its record is not cut off by the exit when the disk answers."""
        writing, self._writing = self._writing, None
        if writing is None or self.told is None or writing.ended(0):
            return
        log.info("stopping: waiting for the supervisor's write to the audit log")
        if not writing.ended(max(0.0, self.told + STOP_TIMEOUT - time.monotonic())):
            log.error(
                "the supervisor's write to the audit log did not end within %gs of the"
                " stop: exiting without it; the disk under %s is slow or not answering",
                STOP_TIMEOUT,
                self.policy.queue.directory.parent,
            )

    def _take_stop(self) -> None:
        """A SIGTERM or SIGINT: said, and passed on to every worker, as it is taken."""
        log.info("stopping: telling %s", quantity(len(self.workers), "worker"))
        self._tell_workers()

    def _tell_workers(self) -> float:
        """SIGTERM to every worker, once; when they were told. A new worker the log
        said would start, not started yet (its delay, or the dead one's mail
        settled on a disk that did not answer), is said not to be: none starts
        from here on."""
        if self.told is not None:
            return self.told
        self.told = time.monotonic()
        stopping_now(self.policy)
        for sock in (s for group in self.sockets.values() for s in group):
            sock.close()  # the workers close theirs: no new connection is accepted
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)
        for index, (_, _, pid) in sorted(self.restarts.items()):
            log.info(
                "worker %d (pid %d): no new one is started after all: the relay is stopping",
                index,
                pid,
            )
        self.restarts.clear()
        return self.told

    def _stop(self) -> None:
        """SIGTERM to every worker; whoever is still there ``STOP_TIMEOUT`` after it is killed."""
        deadline = self._tell_workers() + STOP_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            metrics_status.beat()
            self.disk.look()  # a worker that does not stop may be waiting for the disk
            metrics_status.workers(len(self.workers), self.policy.workers)
            info = signal.sigtimedwait({signal.SIGCHLD, signal.SIGHUP}, 0.2)
            if info is not None and info.si_signo == signal.SIGHUP:
                log.info("SIGHUP while stopping: not reloaded")
            for pid, status in self._reaped():
                worker = self.workers.pop(pid, None)
                if worker is not None:
                    self._ended_while_stopping(worker, status)
        for pid in list(self.workers):
            log.error("worker (pid %d) did not stop in %gs: killing it", pid, STOP_TIMEOUT)
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.workers.clear()

    @staticmethod
    def _ended_while_stopping(worker: _Worker, status: int) -> None:
        if os.waitstatus_to_exitcode(status) != 0:
            log.warning("worker %d %s while stopping", worker.index, _how(status))

    @staticmethod
    def _reaped() -> list[tuple[int, int]]:
        found = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            found.append((pid, status))
        return found


def _worker(
    policy_path: Path, policy: Policy, sockets: Sockets, link: WorkerLink, shared: SharedCounts
) -> int:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_DFL)  # still blocked: see WorkerLink.ready
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != link.supervisor:
        return 0
    return uvloop.run(serve(policy_path, policy, sockets, link, shared=shared))


def _stop_pending() -> bool:
    return bool(signal.sigpending() & {signal.SIGTERM, signal.SIGINT})


def _handing_over(reload: int, sources: Sources, read: Policy) -> bytes:
    """What the workers take the policy of reload number ``reload`` from: the
    policy as the supervisor built it (``relay.policy.pickled``), and the
    sources, to build it from if that cannot be read."""
    files = {name: base64.b64encode(data).decode() for name, data in sources.files.items()}
    handing = {"reload": reload, "text": base64.b64encode(sources.text).decode(), "files": files}
    try:
        handing["built"] = base64.b64encode(pickled.dumps(read)).decode()
    except ValueError as exc:
        log.warning("%s: the workers build it from its text", exc)
    return json.dumps(handing).encode()


def _handed_over(data: bytes) -> tuple[int, Sources, bytes | None]:
    """The reload number, the sources and the built policy in ``_handing_over``'s
    form (None for a handover without it); ValueError if not."""
    try:
        found = json.loads(data)
        files = {name: base64.b64decode(text) for name, text in found["files"].items()}
        built = found.get("built")
        return (
            int(found["reload"]),
            Sources(base64.b64decode(found["text"]), files),
            None if built is None else base64.b64decode(built),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a policy handed over: {exc!r}") from exc


def keep_policy_text(state: Path, policy: Policy | None) -> None:
    """The running policy's text for the queue and audit tools (``relay.cli``), as
    it was read, whatever the file holds now; and no handover, which holds
    keys, left by a supervisor that died in a reload. A relay in one process
    passes no ``policy``: a copy a relay with workers left (or ``cp -a``
    brought along) would have the tools go by a policy that no longer runs."""
    try:
        _remove_handover(state / HANDOVER)  # a crash in a reload left it
        if policy is not None:
            _write_checked(state / statelock.CHECKED_NAME, policy, policy.workers)
        else:
            (state / statelock.CHECKED_NAME).unlink(missing_ok=True)
            (state / statelock.CHECKED_FILES).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot keep the running policy's text for the tools: %s", exc)


def _write_checked(checked: Path, policy: Policy, workers: int) -> None:
    """The text, and the version with the names of the files it read: a tool
    finding the policy file and those files as they were then needs none of
    what it did not use built again (seconds for thousands of tenants). And
    the worker processes the relay runs, for ``relay status`` to count them
    against while the file asks for another number (a change not in use)."""
    assert policy.sources is not None  # the supervisor's policies keep theirs
    record = {
        "policy": os.path.realpath(policy.source),  # a copy (``cp -a``) is another file
        "digest": policy.digest,
        "files": sorted(policy.sources.files),
        "workers": workers,
    }
    # no secret in it: whoever may look into the state directory (a monitoring
    # group) reads it, or status counted the workers against the file's number
    _write_private(checked.with_name(statelock.CHECKED_FILES), json.dumps(record).encode(), 0o644)
    _write_private(checked, policy.sources.text)


def _remove_handover(handover: Path) -> None:
    """The handover and a half-written one: both hold keys and passwords."""
    handover.unlink(missing_ok=True)
    _tmp_of(handover).unlink(missing_ok=True)


def _tmp_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with a file only the relay's user can read (or
    ``mode``): a new file, never one found in its place (nor where a link found
    there points)."""
    tmp = _tmp_of(path)
    tmp.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no empty file behind
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from exc


# what a SIGABRT most often means in a worker, which says nothing as it aborts
ABORTED = (
    " (most likely a thread or memory it could not get: the limit on processes,"
    " RLIMIT_NPROC, LimitNPROC or TasksMax in the unit, or on memory, RLIMIT_AS,"
    " LimitAS or MemoryMax)"
)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _how(status: int) -> str:
    """A worker that stops cleanly unasked was told to by a signal sent to it
    alone: "exited with status 0" in an ERROR read as a crash. One that aborts
    leaves no line of its own: libuv aborts when it cannot start a thread."""
    if status == 0:
        return "stopped, exit status 0, as a SIGTERM sent to it alone makes it"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        hint = ABORTED if signum == signal.SIGABRT else ""
        return f"was killed by {signal.Signals(signum).name}{hint}"
    return f"exited with status {os.WEXITSTATUS(status)}"
