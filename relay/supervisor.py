"""Worker processes: one event loop per core, like Postfix's master and its smtpd.

One event loop runs on one core, and receiving, signing and delivering a
message is CPU work, so a busy relay runs ``workers`` processes. The
supervisor binds the listeners (a port in use fails the start, not a
worker), forks the workers, which all accept on the same sockets, and
then only watches: it restarts a worker that dies, passes SIGHUP on after
checking the policy itself (a broken file reaches no worker), records each
policy version once, runs the audit log's daily upkeep, and on SIGTERM
lets every worker finish its transactions before exiting. On SIGHUP the
workers load the text the supervisor checked (``policy.checked.yaml`` in
the state directory), never the file itself, which may have changed again.

Each worker is a whole relay: its own spool writer, delivery engine,
upstream connections and audit writer. They share the spool (entries are
locked across processes) and the audit log (appends are serialised by a
file lock and keep one hash chain). A worker whose supervisor is gone,
even by ``kill -9``, stops on its own (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from relay.ingress import Sockets
from relay.policy import yamlsource
from relay.policy.files import RefusedFile
from relay.policy.model import Policy
from relay.server import (
    AUDIT_UPKEEP,
    STOP_GRACE,
    audit_upkeep,
    in_use,
    record_policy,
    reloaded,
    serve,
    settle_orphans,
    spool_upkeep,
)

log = logging.getLogger("relay")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
READY_TIMEOUT = 30.0  # for every worker to be serving
STOP_TIMEOUT = STOP_GRACE + 10  # a worker's grace, then its last records and closing
RESTART_DELAY = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # by quick deaths in a row
QUICK = 10.0  # a worker dying sooner than this after its start counts as a crash loop
EX_SOFTWARE = 70
_PR_SET_PDEATHSIG = 1


@dataclass
class _Worker:
    index: int
    pid: int
    started: float
    quick_deaths: int = 0


class WorkerLink:
    """A worker's side of the supervisor: readiness, the checked policy, and
    noticing the supervisor is gone."""

    def __init__(self, index: int, supervisor: int, ready_fd: int | None, checked: Path) -> None:
        self.index = index
        self.supervisor = supervisor
        self._ready_fd = ready_fd
        self._checked = checked
        self._said_orphaned = False

    def checked_policy(self, path: Path, old: Policy) -> Policy | None:
        """The policy text the supervisor checked and recorded, not the file as it is
        now: it may have changed again since, and no worker may run a text nobody
        checked (or one the others do not run)."""
        try:
            data = self._checked.read_bytes()
        except OSError as exc:
            log.error("worker %d: cannot read the checked policy: %s", self.index, exc)
            return None
        return reloaded(path, old, quiet=True, data=data)

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
    def __init__(self, policy_path: Path, policy: Policy, sockets: Sockets) -> None:
        self.policy_path = policy_path
        self.policy = policy
        self.sockets = sockets
        self.workers: dict[int, _Worker] = {}  # by pid
        # the policy text the workers load on SIGHUP: the one the supervisor checked
        self.checked = policy.queue.directory.parent / "policy.checked.yaml"
        self.restarts: dict[int, tuple[float, int]] = {}  # index -> (when, quick deaths)

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            code = self._start()
            if code == 0:
                code = self._watch()
            self._stop()
            log.info("stopped")
            return code
        finally:
            while signal.sigtimedwait(SIGNALS, 0) is not None:
                pass  # a signal left pending would end the process by its default action
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _start(self) -> int:
        self._hand_over_policy()
        pipes = {}
        for index in range(self.policy.workers):
            read_fd, write_fd = os.pipe()
            self._spawn(index, write_fd)
            os.close(write_fd)
            pipes[read_fd] = index
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while pipes:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("workers %s did not start in time", sorted(pipes.values()))
                    return EX_SOFTWARE
                readable, _, _ = select.select(list(pipes), [], [], min(left, 0.2))
                for fd in readable:
                    if os.read(fd, 1) != b"r":
                        return self._failed_start(pipes.pop(fd))
                    os.close(fd)
                    del pipes[fd]
        finally:
            for fd in pipes:
                os.close(fd)
        log.info("%d workers serving", len(self.workers))
        return 0

    def _hand_over_policy(self) -> None:
        """The text the workers would load on a SIGHUP sent to them directly: the
        text of the policy they run, as it was read, whatever the file holds now."""
        sources = self.policy.sources
        try:
            if sources is not None:
                _write_private(self.checked, sources.text)
            else:
                self.checked.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot hand the policy to the workers: %s", exc)

    def _failed_start(self, index: int) -> int:
        """A worker that cannot start will not start on a retry either: stop, say why."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for pid, status in self._reaped():
                worker = self.workers.pop(pid, None)
                if worker is not None and worker.index == index:
                    log.error("worker %d %s while starting", index, _how(status))
                    code = os.waitstatus_to_exitcode(status)
                    return code if code > 0 else EX_SOFTWARE
            time.sleep(0.05)
        return EX_SOFTWARE

    def _watch(self) -> int:
        next_upkeep = time.monotonic() + AUDIT_UPKEEP
        while True:
            due = [when for when, _ in self.restarts.values()]
            timeout = max(0.0, min([1.0, *(when - time.monotonic() for when in due)]))
            info = signal.sigtimedwait(SIGNALS, timeout)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping: telling %d workers", len(self.workers))
                return 0
            if info is not None and info.si_signo == signal.SIGHUP:
                self._reload()
            self._reap_and_restart()
            if time.monotonic() >= next_upkeep:
                next_upkeep += AUDIT_UPKEEP
                self._upkeep()

    def _reap_and_restart(self) -> None:
        for pid, status in self._reaped():
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            quick = worker.quick_deaths + 1 if time.monotonic() - worker.started < QUICK else 0
            delay = RESTART_DELAY[min(quick, len(RESTART_DELAY) - 1)]
            log.error(
                "worker %d (pid %d) %s; starting a new one in %gs",
                worker.index,
                pid,
                _how(status),
                delay,
            )
            self.restarts[worker.index] = (time.monotonic() + delay, quick)
            why = f"worker {worker.index} (pid {pid}) ended"
            self._with_audit(lambda audit, why=why: settle_orphans(self.policy, audit, why))
        for index, (when, quick) in list(self.restarts.items()):
            if when <= time.monotonic():
                del self.restarts[index]
                self._spawn(index, None, quick)

    def _spawn(self, index: int, ready_fd: int | None, quick_deaths: int = 0) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = EX_SOFTWARE
            try:
                link = WorkerLink(index, supervisor, ready_fd, self.checked)
                code = _worker(self.policy_path, self.policy, self.sockets, link)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = _Worker(index, pid, time.monotonic(), quick_deaths)
        log.info("worker %d started (pid %d)", index, pid)

    def _reload(self) -> None:
        try:
            data = yamlsource.read_bytes(self.policy_path)
        except (OSError, RefusedFile) as exc:
            log.error("reload failed: %s: keeping policy %s", exc, self.policy.digest[:12])
            return
        new = reloaded(self.policy_path, self.policy, data=data)
        if new is None:
            return
        try:
            _write_private(self.checked, data)
        except OSError as exc:
            log.error("reload failed: cannot hand the policy to the workers: %s", exc)
            return
        in_use(new, self.policy)
        self.policy = new
        self._with_audit(lambda audit: record_policy(audit, self.policy_path, new))
        for pid in self.workers:
            _signal(pid, signal.SIGHUP)

    def _upkeep(self) -> None:
        self._with_audit(audit_upkeep)
        spool_upkeep(self.policy)

    def _with_audit(self, work: Callable[..., None]) -> None:
        from relay.audit import AuditError
        from relay.record import audit_log

        try:
            with audit_log(self.policy.audit) as audit:
                work(audit)
        except AuditError as exc:
            log.error("cannot open the audit log: %s", exc)

    def _stop(self) -> None:
        """SIGTERM to every worker; whoever is still there after ``STOP_TIMEOUT`` is killed."""
        for sock in (s for group in self.sockets.values() for s in group):
            sock.close()  # the workers close theirs: no new connection is accepted
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
            for pid, status in self._reaped():
                worker = self.workers.pop(pid, None)
                if worker is not None and os.waitstatus_to_exitcode(status) != 0:
                    log.warning("worker %d %s while stopping", worker.index, _how(status))
        for pid in list(self.workers):
            log.error("worker (pid %d) did not stop in %gs: killing it", pid, STOP_TIMEOUT)
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.workers.clear()

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


def _worker(policy_path: Path, policy: Policy, sockets: Sockets, link: WorkerLink) -> int:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_DFL)  # still blocked: see WorkerLink.ready
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != link.supervisor:
        return 0
    return uvloop.run(serve(policy_path, policy, sockets, link))


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a file only the relay's user can read."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
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


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
