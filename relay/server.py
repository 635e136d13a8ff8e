"""``relay serve``: the daemon's lifecycle around the listeners.

SIGHUP reloads the policy. A broken file never replaces a working policy:
the problems are logged and the old one stays, so ``systemctl reload`` with
a typo does not take mail down. Listener settings are bound into the open
sockets, and the state directory and the audit key into the open spool and
audit chain, so changes to them are reported and wait for a restart.

SIGTERM and SIGINT stop accepting at once, let transactions and deliveries
under way finish for up to ``STOP_GRACE`` seconds in all (an ERP that got no
reply would send the message again) and exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import resource
import signal
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

# What a worker runs is imported here, before the supervisor forks: imported in the
# worker, a replacement for one that died read a newer version installed over the
# running relay, and failed against the older modules its supervisor had loaded.
from relay import keygen, oplog, statelock
from relay.audit import AuditError
from relay.clocksteps import ClockSteps
from relay.deliver import attempt, counted
from relay.diskwait import DiskWaits
from relay.diskwatch import DiskWatch
from relay.engine import Engine
from relay.errors import PolicyError, RelayError
from relay.hostport import host_port
from relay.ingress import authlimit, filelimit, start
from relay.ingress.authlimit import AuthFailures
from relay.ingress.clientlimit import ClientCounts
from relay.ingress.diskspace import DiskGuard
from relay.ingress.listen import kept_min_version
from relay.metrics import status as metrics_status
from relay.pipeline import Acceptor
from relay.policy import tlspair
from relay.policy.model import Listener, Policy, TlsFiles
from relay.quantity import quantity
from relay.ratelimit import RateCounts, limited_tenants
from relay.record import Recorder, audit_log
from relay.sharedtable import SharedTable
from relay.spool import QueueEntry, Spool
from relay.startwatch import LARGE_QUEUE, STOPS, StartWatch
from relay.statelock import StateBusy
from relay.suppression import SuppressionFile
from relay.tally import Tally, counts_named
from relay.upstream import pool
from relay.upstream.pool import close_default_pool

if TYPE_CHECKING:
    from relay.audit import AuditLog
    from relay.ingress import Ingress, Sockets
    from relay.metrics.serve import MetricsServer
    from relay.settle import Settled
    from relay.supervisor import WorkerLink

log = logging.getLogger("relay")

STOP_GRACE = 10.0
AUDIT_UPKEEP = 86400.0
LOCK_FILE_CHECK = 2.0  # seconds between looks at the lock file, removed or replaced
LEFTOVER_AGE = 3600.0  # seconds; see spool_upkeep
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78


@dataclasses.dataclass(frozen=True)
class SharedCounts:
    """What the workers count together (``relay.sharedtable``), made before they fork."""

    rates: RateCounts
    clients: ClientCounts
    logins: SharedTable  # failed logins (``relay.ingress.authlimit``)
    tally: Tally  # for the metrics
    disk: DiskWaits  # the fsyncs in progress (``relay.diskwait``)

    @classmethod
    def made(cls, policy: Policy) -> SharedCounts:
        """Sized for ``policy``'s limited tenants and names: a reload cannot grow the
        tables."""
        workers = policy.workers
        return cls(
            RateCounts(workers, len(limited_tenants(policy))),
            ClientCounts(workers),
            authlimit.table(workers),
            Tally(workers, len(counts_named(policy))),
            DiskWaits(workers),
        )


class PolicyHolder:
    """The current policy; swapping one reference is atomic for every reader."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def run(policy_path: Path) -> int:
    """``relay serve``: bind the listeners, open the state, then serve in one
    process or, with ``workers`` above 1, in worker processes under a supervisor.
    Binding comes first: a relay that cannot listen (another one has the port)
    must not touch the state, nor record in its audit log a policy that never
    served; nor must one whose state directory another relay holds
    (``relay.statelock``). A SIGTERM or SIGINT before it serves is said at once
    and stops it once the spool is read (``relay.startwatch``)."""
    oplog.configure()
    with StartWatch() as watch:
        return _run(Path(policy_path), watch)


def _run(policy_path: Path, watch: StartWatch) -> int:
    from relay.ingress import bind

    policy = _load(policy_path)
    if policy is None:
        log.error("%s: invalid policy, not starting", policy_path)
        return EX_CONFIG
    if policy.run_as is None:
        _warn_if_root()
    too_few = filelimit.too_few(raise_open_files(policy))
    if too_few is not None:
        log.error("%s; not starting", too_few)
        return EX_OSERR
    try:
        sockets = bind(policy.listeners)
    except OSError as exc:
        return _not_bound(policy, exc.strerror or str(exc))
    try:
        metrics = _open_metrics(policy)
    except RelayError as exc:
        _close(sockets, None)
        return _not_bound(policy, str(exc))
    try:
        policy = _as_user(policy_path, policy)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        _close(sockets, metrics)
        return EX_CONFIG
    try:
        lock = statelock.hold(policy.queue.directory.parent, policy.digest, policy_path)
    except StateBusy as exc:
        log.error("%s", exc)
        _close(sockets, metrics)
        return EX_TEMPFAIL
    except OSError as exc:
        log.error("cannot lock the state directory: %s%s", exc, _owner_hint(policy, str(exc)))
        _close(sockets, metrics)
        return EX_CANTCREAT
    try:
        return _serve_locked(policy_path, policy, sockets, metrics, lock, watch)
    finally:
        lock.close()


def _warn_if_root() -> None:
    """Without ``run_as`` the relay keeps root's privileges once its ports are
    bound: every worker, parsing what clients send (SMTP, MIME, AUTH), would be
    root. Said at the start, as nothing else tells a relay started by hand from
    the unit's."""
    if os.geteuid() != 0:
        return
    log.warning(
        "running as root: the supervisor and every worker, which parse SMTP, MIME and AUTH"
        " from the network, keep root's privileges; set run_as: in the policy to the"
        " service user, or run it as that user, as systemd/erp-relay.service does"
        " (User=erp-relay, ports below 1024 with AmbientCapabilities=CAP_NET_BIND_SERVICE)"
    )


def _as_user(path: Path, policy: Policy) -> Policy:
    """The policy as the service user reads it, once root is given up
    (``relay.privileges``); the one read as root when nothing changed hands.
    Raises PolicyError when that user cannot read it whole, or it is not the
    policy the listeners were bound for."""
    from relay.policy.load import load
    from relay.privileges import PrivilegeError, become

    try:
        if not become(policy.run_as):
            return policy
    except PrivilegeError as exc:
        raise PolicyError([f"{path}: {exc}"]) from exc
    if _reads_alike(path, policy):
        return policy
    try:
        again = load(path)
    except PolicyError as exc:
        said = f"{path}: invalid as user {policy.run_as} reads it, not starting"
        raise PolicyError([*exc.problems, said]) from exc
    if again.digest != policy.digest:
        raise PolicyError([f"{path}: changed while the relay started; start it again"])
    return again


def _reads_alike(path: Path, policy: Policy) -> bool:
    """Whether this user reads the policy file and every file it names as they
    were read to build ``policy``: then that build stands, where building it
    again took as long again (the listeners bound and silent meanwhile). A
    file it cannot read, or one changed since, is built again, to say which."""
    from relay.policy.load import text_if_unchanged

    if policy.sources is None:
        return False
    return text_if_unchanged(path, policy.sources.files, policy.digest) is not None


def _owner_hint(policy: Policy, error: str) -> str:
    """A state directory root made, in part or whole, is not the service
    user's; one not made yet is to be made as that user's."""
    if policy.run_as is None or os.strerror(errno.EACCES) not in error:
        return ""
    directory, user = policy.queue.directory.parent, policy.run_as
    try:
        os.stat(directory)
    except FileNotFoundError:
        return f" (the relay runs as {user}: install -d -m 0700 -o {user} {directory})"
    except OSError:
        return f" (the relay runs as {user}, which cannot reach {directory}: let it pass above)"
    return f" (the relay runs as {user}: chown -R {user}: {directory})"


def _not_bound(policy: Policy, why: str) -> int:
    """A port is taken: by the relay already running on this state directory,
    the usual slip (a relay started by hand beside the service), that relay
    is named, as with other ports; else the port's error is said."""
    directory = policy.queue.directory.parent
    try:
        running = statelock.holder(directory)
    except RelayError:
        running = None
    if running is None:
        log.error("%s", why)
        return EX_OSERR
    log.error("%s", StateBusy(directory, str(running.pid)))
    return EX_TEMPFAIL


def _serve_locked(
    policy_path: Path,
    policy: Policy,
    sockets: Sockets,
    metrics: MetricsServer | None,
    lock: statelock.Lock,
    watch: StartWatch,
) -> int:
    import uvloop

    from relay.supervisor import Supervisor, keep_policy_text

    watch.on_stop(lambda: stopping_now(policy))
    if watch.asked is not None:  # before the spool is read: nothing to finish
        return _stopped_starting(policy, sockets, metrics)
    queued: list[tuple[str, str, int]] | None = None if metrics is None else []
    code, written = _open_state(policy, policy_path, watch, queued)
    if code:
        _close(sockets, metrics)
        return code
    if watch.asked is not None:
        return _stopped_starting(policy, sockets, metrics)
    if policy.workers == 1:
        keep_policy_text(policy.queue.directory.parent, None)
    for listener in policy.listeners:
        for sock in sockets[listener.name]:
            host, port = sock.getsockname()[:2]
            log.info("listening on %s (listener %s)", host_port(host, port), listener.name)
        _say_if_refused(listener)
    log.info("policy %s loaded from %s", policy.digest[:12], policy_path)
    # the workers' supervisor takes the signals from here on; one process, as it serves
    if (watch.end() if policy.workers > 1 else watch.asked) is not None:
        return _stopped_starting(policy, sockets, metrics)
    shared = SharedCounts.made(policy)  # by the workers forked from here
    # looked at by the engine alone, or by the supervisor, and read by the metrics
    steps = ClockSteps()
    if metrics is not None:  # counting from here, before anything is delivered
        metrics.begin(shared.rates, shared.tally, written, shared.disk, steps, queued)
    if policy.workers == 1:
        metrics_status.loaded()
        return uvloop.run(
            serve(
                policy_path,
                policy,
                sockets,
                metrics=metrics,
                shared=shared,
                lock=lock,
                steps=steps,
                watch=watch,
            )
        )
    return Supervisor(policy_path, policy, sockets, metrics, shared, lock, steps).run()


def _stopped_starting(policy: Policy, sockets: Sockets, metrics: MetricsServer | None) -> int:
    """A stop asked for before the relay served: as a stop once serving, with
    no transaction or delivery to wait for, as none began."""
    stopping_now(policy)
    log.info("stopping: no new connections; no worker started, no mail taken")
    _close(sockets, metrics)
    log.info("stopped")
    return 0


def _open_metrics(policy: Policy) -> MetricsServer | None:
    """The metrics port bound next to the listeners, if the policy
    has one. Imported only then: forked workers would carry the client library's
    pages in their memory for nothing."""
    if policy.metrics is None:
        return None
    from relay.metrics.serve import MetricsServer

    return MetricsServer(policy.metrics, policy)


def _close(sockets: Sockets, metrics: MetricsServer | None) -> None:
    for bound in sockets.values():
        for sock in bound:
            sock.close()
    if metrics is not None:
        metrics.stop()


#: Below this many open files a busy relay runs out: each connection takes one,
#: and so does each accepted message until its delivery begins.
FEW_FILES = 4096


def raise_open_files(policy: Policy) -> int:
    """The soft limit on open files raised to the hard one (as Go's runtime does);
    the limit in force. The soft default of 1024 is kept for programs that
    ``select`` on high descriptors; the event loops use epoll, and the
    supervisor's ``select`` watches only its few pipes, opened first. At that
    limit libuv accepts and closes connections at once, and neither the client
    nor the log says why; a limit that leaves a listener's connection limits out
    of reach (``filelimit``) is said too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = filelimit.serve_limit()
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("open files: limit raised from %d to %d", soft, want)
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("open files: cannot raise the limit of %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < FEW_FILES:
        log.warning(
            "open files: limited to %d; each connection and each message waiting for"
            " its delivery takes one: raise the hard limit (LimitNOFILE in the unit)",
            soft,
        )
    for said in filelimit.unreachable(soft, policy):
        log.warning("open files: %s", said)
    return soft


def _load(path: Path) -> Policy | None:
    from relay.policy.load import load

    try:
        return load(path)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        return None


def _open_state(
    policy: Policy,
    policy_path: Path,
    watch: StartWatch | None = None,
    queued: list[tuple[str, str, int]] | None = None,
) -> tuple[int, int]:
    """Recover the spool and open the audit log once, before any worker starts;
    an exit status, and the audit records written (the metrics count them too).
    The audit upkeep comes after the policy record: today's file then exists, so
    yesterday's is no longer the newest, which upkeep never touches, and is
    compressed now rather than a day later. ``watch`` says a long read of the
    spool as it goes on. ``queued`` is given what the metrics keep of each
    message left queued (``relay.metrics.collect.waiting``), from the records
    the recovery reads: read again for them, 50,000 took 2 s more before the
    relay served."""
    from relay.audit import AuditError
    from relay.record import audit_log
    from relay.spool import Spool, SpoolError
    from relay.suppression import SuppressionError, SuppressionFile

    try:
        spool = Spool(policy.queue.directory)
        _say_reading(spool, watch)
        recovered = spool.recover(read=None if queued is None else _keeping(queued))
        # a queue with mail in it keeps its audit log: a new one is made only for a
        # queue with none (a new state directory, or a first start that failed)
        with audit_log(policy.audit, create=not spool.ids()) as audit:
            first = audit.head[0]
            settled = _settle_recorded(spool, audit)
            record_policy(audit, policy_path, policy)  # a full disk: serve, answering 451
            audit_upkeep(audit)
            written = audit.head[0] - first
        if watch is not None:
            watch.reading(None)
        if policy.suppression is not None:
            SuppressionFile(policy.suppression.file).create()
    except (SpoolError, AuditError, SuppressionError, OSError) as exc:
        log.error("cannot open the state directory: %s%s", exc, _owner_hint(policy, str(exc)))
        return EX_CANTCREAT, 0
    _warn_of_strays(policy)
    _log_settled(settled, "the restart")
    if queued is not None:
        gone = {*settled.finished, *settled.unrecorded}
        queued[:] = [waiting for waiting in queued if waiting[0] not in gone]
    if first == 0:
        log.info(
            "state directory %s holds no audit log yet: a new chain begins; mail a relay"
            " queued under another state_directory is not delivered from here"
            " (docs/queue.md: moving the state directory)",
            policy.queue.directory.parent,
        )
    log.info(
        "spool %s: %s queued, any on hold included (relay queue list)",
        policy.queue.directory,
        quantity(recovered - len(settled.finished) - len(settled.unrecorded), "message"),
    )
    return 0, written


def _keeping(queued: list[tuple[str, str, int]]) -> Callable[[QueueEntry], None]:
    """Each record read put in ``queued`` as the metrics keep it: imported only
    for a relay with metrics, as ``_open_metrics`` imports their server."""
    from relay.metrics.collect import waiting

    return lambda entry: queued.append(waiting(entry))


def _say_reading(spool: Spool, watch: StartWatch | None) -> None:
    """A large spool's read said as it begins, and while it goes on: the log
    was silent for the seconds it took, with the listeners bound and no
    client greeted. Counted from one listing of the directory."""
    entries = len(spool.ids())
    if entries < LARGE_QUEUE:
        return
    log.info(
        "spool %s: reading %s before serving; clients are greeted once it is read",
        spool.directory,
        quantity(entries, "entry", "entries"),
    )
    if watch is not None:
        watch.reading(f"spool {spool.directory}")


def settle_orphans(policy: Policy, audit: AuditLog, why: str) -> None:
    """Entries a dead worker had delivered, their records written, wait for a
    removal that will not come, unlocked now: settled from the audit log, as at a
    start, before anyone delivers them again. A live worker's own are locked,
    and left alone."""
    from relay.spool import Spool, SpoolError

    try:
        spool = Spool(policy.queue.directory)
    except SpoolError as exc:
        log.warning("cannot open the spool to settle what %s left: %s", why, exc)
        return
    _log_settled(_settle_recorded(spool, audit), why)


def _log_settled(settled: Settled, why: str) -> None:
    if settled.behind is not None:
        log.error(
            "audit log: it ends at seq %d, but records up to seq %d were written"
            " (audit.head): restored from an older copy, or made anew; the messages"
            " queued that it does not name are kept and delivered, not taken for"
            " never acknowledged (said at each start until the log passes seq %d:"
            " docs/queue.md)",
            *settled.behind,
            settled.behind[1],
        )
    for queue_id in settled.finished:
        log.info("%s: finished before %s, per the audit log; removed", queue_id, why)
    for queue_id in settled.unrecorded:
        log.warning(
            "%s: stored but not on record before %s, so never acknowledged;"
            " removed (its client got no 250 and sends it again; unless the state"
            " directory was copied while a relay ran: docs/queue.md, backing up)",
            queue_id,
            why,
        )


def _settle_recorded(spool: Spool, audit: AuditLog) -> Settled:
    """Only saves deliveries: when it cannot, the engine delivers those entries again."""
    from relay.audit import AuditError
    from relay.settle import Settled, settle_recorded
    from relay.spool import SpoolError

    try:
        return settle_recorded(spool, audit)
    except (AuditError, SpoolError, OSError, ValueError) as exc:
        log.warning("cannot look up in the audit log what finished before the restart: %s", exc)
        return Settled()


async def serve(
    policy_path: Path,
    policy: Policy,
    sockets: Sockets,
    worker: WorkerLink | None = None,
    metrics: MetricsServer | None = None,
    shared: SharedCounts | None = None,
    lock: statelock.Lock | None = None,
    steps: ClockSteps | None = None,
    watch: StartWatch | None = None,
) -> int:
    """Receive and deliver until SIGTERM. As one of several workers (``worker``
    set) the supervisor keeps the audit log's upkeep and its policy records,
    the lock file, and serves the metrics; alone, this process serves
    ``metrics`` and keeps ``lock``'s file, its engine looks at the clock's
    ``steps`` that the metrics read, and the start's ``watch`` takes a stop
    until it serves (loading a large suppression list takes seconds)."""
    holder = PolicyHolder(policy)
    index = 0 if worker is None else worker.index
    if shared is not None:
        shared.disk.use(index)
    spool = Spool(policy.queue.directory)
    try:
        audit = audit_log(policy.audit)
    except AuditError as exc:  # gone since the start: see AuditLog
        log.error("cannot serve: %s", exc)
        return EX_CANTCREAT
    # the supervisor's, copied at the fork: the steps it saw before this worker began
    steps = (worker.clock_steps if worker is not None else steps) or ClockSteps()
    recorder = Recorder(audit, steps=steps)  # one, so receiving and delivering share each fsync
    ingress: Ingress | None = None

    def alone() -> bool:
        """One SMTP session in this process: the event loop has nothing better to do
        than its writes (see ``relay.groupcommit``)."""
        return ingress is not None and len(ingress.connections) <= 1

    tally = None if shared is None else shared.tally.row(index, holder.current)
    send = attempt if tally is None else counted(attempt, tally)
    suppressions = None if policy.suppression is None else SuppressionFile(policy.suppression.file)
    if suppressions is not None:
        _load_suppressions(suppressions)
    engine = Engine(
        spool,
        holder.current,
        send,
        recorder,
        alone=alone,
        suppressions=suppressions,
        tally=tally,
        steps=steps,
        say_first_scan=worker is None or (worker.index == 0 and worker.first_start),
    )
    rates = None if shared is None else shared.rates.row(index, holder.current)
    clients = None if shared is None else shared.clients.row(index)
    if clients is not None:
        pool.count_in(clients)
    failures = (
        AuthFailures()
        if shared is None
        else AuthFailures(shared=shared.logins.row(index), checks=clients)
    )
    acceptor = Acceptor(
        spool, engine, recorder, alone=alone, suppressions=suppressions, rates=rates
    )
    await _start_threads()
    # a stop asked for while this process started (the supervisor passes it on to
    # each worker, held back until it serves): no client is taken in meanwhile
    stop_first = (worker is not None and bool(signal.sigpending() & STOPS)) or (
        watch is not None and watch.asked is not None
    )
    ingress = await start(
        policy.listeners,
        holder.current,
        acceptor.process,
        {name: [] for name in sockets} if stop_first else sockets,
        refused=acceptor.refused,
        disk=DiskGuard(reclaim=lambda: spool.trim_recycled(keep=0.0, orphans=False)),
        clients=clients,
        failures=failures,
        tally=tally,
    )

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    delivering = loop.create_task(engine.run())
    delivering.add_done_callback(lambda task: _engine_ended(task, stopping))
    chores = [loop.create_task(_audit_upkeep(audit, holder.current))] if worker is None else []
    reloads: set[asyncio.Task[None]] = set()
    again: list[bool] = []  # a SIGHUP came during a reload: the last one must win

    def reload() -> None:
        if stopping.is_set():  # as the supervisor's: its note would hide the stop's
            log.info("SIGHUP while stopping: not reloaded")
            return
        if reloads:
            log.info("SIGHUP during a reload: reading the policy again after it")
            again[:] = [True]
            return
        task = loop.create_task(_reload(policy_path, holder, audit, worker, ingress))
        reloads.add(task)
        task.add_done_callback(reloaded_once)

    def reloaded_once(task: asyncio.Task[None]) -> None:
        reloads.discard(task)
        if again:
            again.clear()
            reload()

    def stop() -> None:
        if worker is not None:
            worker.orphaned()  # a SIGTERM from the death signal says why
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if worker is not None:
        chores.append(loop.create_task(worker.watch_parent(stopping.set)))
        worker.ready()  # also lets through the signals held back until now
    else:
        if os.getpid() == 1:
            chores.append(loop.create_task(_reap_adopted()))
        if lock is not None:
            note_in_use(holder.current())  # serving: the start's note in the lock file is gone
            chores.append(loop.create_task(_keep_lock_file(lock, holder.current)))
        asked = None if watch is None else watch.end()
        # held back since the start (relay.cli._serve), handled from here on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
        if asked is not None:  # taken by the watch, said then: stopped as from serving
            stop()
        else:
            log.info("serving in one process")
        if shared is not None:
            chores.append(_watch_disk(shared.disk, holder.current))
        if metrics is not None:
            metrics_status.workers(1, 1)
            chores.append(loop.create_task(_beat()))
            metrics.start(holder.current)
    try:
        await stopping.wait()
        if worker is None:
            stopping_now(holder.current())
        await _wind_down(ingress, engine, loop.time() + STOP_GRACE)
        failed = delivering.done() and _failure(delivering) is not None
        if not failed:
            await delivering
        await close_default_pool()
        for chore in chores:
            chore.cancel()
        audit.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if metrics is not None:
            metrics.stop()
    log.info("stopped")
    return 1 if failed else 0


def _watch_disk(waits: DiskWaits, current: Callable[[], Policy]) -> asyncio.Task[None]:
    """The log's lines about a disk that hangs, from a thread: the event loop may
    be the one waiting for it. Cancelling the task ends the thread."""
    watch = DiskWatch(waits, lambda: current().queue.directory.parent)
    ended = threading.Event()
    thread = threading.Thread(target=watch.every_second, args=(ended,), name="disk-watch")
    thread.daemon = True
    thread.start()

    async def watching() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    return asyncio.get_running_loop().create_task(watching())


async def _start_threads() -> None:
    """The event loop's thread pool started before any mail is taken: libuv starts
    it at its first use (a DNS lookup, an upstream's name) and aborts the process
    when it cannot (a low RLIMIT_NPROC or RLIMIT_AS). Aborting here, a worker
    fails its start, which the supervisor says, not a transaction later on."""
    await asyncio.get_running_loop().getaddrinfo("127.0.0.1", 0)


async def _reap_adopted() -> None:
    """As a container's init, in one process, the relay is the parent of every
    orphan in it (a ``docker exec``'s child left behind): each is reaped, or it
    stays a zombie for the container's life. Looked for each second, as the
    event loop keeps SIGCHLD; the relay starts no child of its own in one
    process, so no status it would need is taken."""
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        await asyncio.sleep(1.0)


async def _keep_lock_file(lock: statelock.Lock, current: Callable[[], Policy]) -> None:
    while True:
        await asyncio.sleep(LOCK_FILE_CHECK)
        keep_lock_file(lock, current())


async def _beat() -> None:
    """What ``/healthz`` reads: the event loop still comes round."""
    while True:
        metrics_status.beat()
        await asyncio.sleep(1.0)


def _load_suppressions(suppressions: SuppressionFile) -> None:
    """Read the list before serving (about 2 s for 100,000 entries), not at the
    first message; one that cannot be read is logged, and each message is
    refused for now until it can (``Acceptor``)."""
    from relay.suppression import SuppressionError

    try:
        listed = len(suppressions.current())
    except SuppressionError as exc:
        log.error("%s", exc)
        return
    log.info("suppression list %s: %s", suppressions.path, quantity(listed, "entry", "entries"))


def stopping_now(policy: Policy) -> None:
    """From the signal on, ``/readyz`` and ``relay status`` say the relay stops:
    its listeners are closed, and a monitor must not send ERPs to it."""
    metrics_status.stopping()
    note_in_use(policy)


def note_in_use(policy: Policy) -> None:
    """The policy in use and what waits for a restart, in the lock file for
    ``relay status``; and, from the signal on, that the relay stops: a reload
    under way at the signal writes its note after the stop's."""
    statelock.note_policy(policy.queue.directory.parent, *_noted(policy))


def keep_lock_file(lock: statelock.Lock, policy: Policy) -> None:
    """The lock file written again, as ``note_in_use`` writes it, where it was removed
    or replaced (``statelock.Lock.keep``)."""
    lock.keep(*_noted(policy))


def _noted(policy: Policy) -> tuple[str, list[str], Path]:
    stopping = [statelock.STOPPING] if metrics_status.STATUS.stopping else []
    return policy.digest, [*policy.pending, *stopping], policy.source


async def _wind_down(ingress: Ingress, engine: Engine, deadline: float) -> None:
    """Transactions, then deliveries, within one ``STOP_GRACE`` from the signal:
    deliveries under way run on while the transactions finish, so they have had
    the grace too; one after the other, each with its own, the stop took twice
    as long as said. No attempt starts from the signal on (``Engine.wind_down``):
    the grace would cut it off. The engine stops after the transactions, as a
    message taken in meanwhile is handed to it."""
    loop = asyncio.get_running_loop()
    log.info("stopping: no new connections; waiting up to %gs for transactions", STOP_GRACE)
    engine.wind_down()
    await ingress.close(max(0.0, deadline - loop.time()))
    await engine.stop(max(0.0, deadline - loop.time()))


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    return None if task.cancelled() else task.exception()


def _engine_ended(task: asyncio.Task[None], stopping: asyncio.Event) -> None:
    """A worker that no longer delivers must not go on accepting: it stops, and
    exits 1 for the supervisor (or systemd) to start it again."""
    error = _failure(task)
    if error is not None:
        log.critical("the delivery engine failed, stopping: %r", error, exc_info=error)
        stopping.set()


async def _reload(
    path: Path,
    holder: PolicyHolder,
    audit: AuditLog,
    worker: WorkerLink | None,
    ingress: Ingress | None,
) -> None:
    """Swap in the policy file's new version, and read the listeners' TLS
    certificates again (a reload is how a renewed one is taken up). A worker
    builds the policy from what the supervisor checked and recorded, and
    answers which one it runs: the supervisor says it is reloaded once all do."""
    old = holder.policy
    if worker is not None:
        new = await asyncio.to_thread(worker.checked_policy, path, old)
        if new is not None:
            _take_up(holder, new, ingress)
            log.info("worker %d: policy %s in use", worker.index, new.digest[:12])
        worker.answer(holder.policy)
        return
    said_reloading(path)
    new = await asyncio.to_thread(reloaded, path, old)
    if new is None:
        return
    _take_up(holder, new, ingress)
    metrics_status.loaded()
    note_in_use(new)
    in_use(new, old)
    await asyncio.to_thread(record_policy, audit, path, new)


def said_reloading(path: Path) -> None:
    """As a reload begins: a large policy takes seconds, silent until its end."""
    log.info("reloading: reading %s", path)


def _take_up(holder: PolicyHolder, new: Policy, ingress: Ingress | None) -> None:
    holder.policy = new
    if ingress is not None:
        ingress.reload_tls(new.listeners)


def read_policy(
    path: Path, old: Policy, data: bytes | None = None, files: Mapping[str, bytes] | None = None
) -> Policy | None:
    """The policy as the file (or ``data`` and ``files``) now has it, or None
    (logged, ``old`` kept) when it is broken."""
    from relay.policy.load import load

    try:
        return load(path, data, files)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
    except Exception:
        log.exception("reload failed")
    log.error("reload failed: keeping policy %s", old.digest[:12])
    metrics_status.reload_failed()
    return None


def in_use(new: Policy, old: Policy) -> None:
    """Said once the new policy is what the daemon runs, not when it was read."""
    log.info("policy reloaded: %s (was %s)", new.digest[:12], old.digest[:12])


def reloaded(
    path: Path,
    old: Policy,
    quiet: bool = False,
    data: bytes | None = None,
    files: Mapping[str, bytes] | None = None,
    built: Policy | None = None,
) -> Policy | None:
    """The policy file (or ``data``, its text, and ``files``, those it reads) read
    again (or ``built``, as ``read_policy`` read it elsewhere), or None (logged)
    when it is broken.

    The listeners stay as the daemon bound them: their settings (auth, allow,
    sizes, immediate) take effect at a restart, in every worker at once; a
    worker started later (one that died is replaced) must not serve a port
    differently from the others, nor a running one differently per message.
    The state directory and the audit key stay as opened, for the same reason,
    and so do ``workers`` and ``queue.concurrency`` (each engine fixes an
    upstream's limit when it first delivers there)."""
    read = built if built is not None else read_policy(path, old, data, files)
    if read is None:
        return None
    changed = _listener_changes(old.listeners, read.listeners)
    if changed and not quiet:  # before what the listeners serve until then
        log.warning(
            "listener settings changed (%s): they take effect after a restart", "; ".join(changed)
        )
    bound = _as_bound(old.listeners, read.listeners, quiet)
    new = _as_opened(old, dataclasses.replace(read, listeners=bound))
    if quiet:
        return new
    new = dataclasses.replace(new, pending=_not_taken_up(old, read, bound, changed))
    _warn_state_changed(old, read)
    _warn_of_replaced_keys(old, read)
    if read.workers != old.workers:
        log.warning(
            "workers changed (%d to %d): takes effect after a restart", old.workers, read.workers
        )
    if read.run_as != old.run_as:
        log.warning(
            "run_as changed (%s to %s): takes effect after a restart",
            _run_as(old),
            _run_as(read),
        )
    if read.metrics != old.metrics:
        log.warning(
            "metrics changed (%s to %s): takes effect after a restart",
            _metrics_at(old),
            _metrics_at(read),
        )
    if read.queue.concurrency != old.queue.concurrency:
        log.warning(
            "queue.concurrency changed (%d to %d): takes effect after a restart",
            old.queue.concurrency,
            read.queue.concurrency,
        )
    _warn_of_strays(new)
    gone = sorted(set(old.upstreams) - set(new.upstreams))
    if gone:
        log.warning(
            "upstreams removed (%s): messages already queued for them go through their"
            " tenant's upstream as the policy now has it where that sends as the old one"
            " did; the others, and those of a tenant no longer in the policy, are deferred"
            " until an upstream of that name is back, or expire",
            ", ".join(gone),
        )
    return new


def _warn_of_replaced_keys(old: Policy, read: Policy) -> None:
    """A new key under a selector in use: the relay signs with it from now on,
    and nothing else would tell that the mail it queued fails DKIM."""
    for key in keygen.replaced(old.dkim_keys, read.dkim_keys):
        log.warning(
            "DKIM key %s._domainkey.%s is another key under the same selector (%s): mail"
            " queued signed with the key before fails DKIM while the record publishes this"
            " one, and one record cannot publish both; give each key a selector of its own"
            " (docs/queue.md)",
            key.selector,
            key.domain,
            key.key_file,
        )


def _run_as(policy: Policy) -> str:
    return policy.run_as or "unset"


def _warn_of_strays(policy: Policy) -> None:
    """Suppression entries left for tenants the policy no longer has (one renamed)."""
    from relay.suppression import SuppressionError
    from relay.suppression.strays import stray_warning

    try:
        said = stray_warning(policy)
    except SuppressionError as exc:
        log.error("%s", exc)
        return
    if said is not None:
        log.warning("%s", said)


def _not_taken_up(
    old: Policy, read: Policy, bound: Sequence[Listener], changed: Sequence[str]
) -> tuple[str, ...]:
    """What the file says that the reloaded relay does not do, for ``relay status``
    (the log says each when the reload happens; status is asked days later)."""
    waiting = [f"listener {change}" for change in changed]
    if read.workers != old.workers:
        waiting.append(f"workers {old.workers} to {read.workers}")
    if read.run_as != old.run_as:
        waiting.append(f"run_as {_run_as(old)} to {_run_as(read)}")
    if read.queue.concurrency != old.queue.concurrency:
        waiting.append(f"queue.concurrency {old.queue.concurrency} to {read.queue.concurrency}")
    if read.metrics != old.metrics:
        waiting.append(f"metrics {_metrics_at(old)} to {_metrics_at(read)}")
    if read.queue.directory.parent != old.queue.directory.parent:
        waiting.append("state_directory")
    if read.audit.hmac_key != old.audit.hmac_key:
        waiting.append("audit.hmac_key_file")
    notes = [f"{statelock.WAITS}{item}" for item in waiting]
    files = {listener.name: listener.tls for listener in read.listeners}
    for listener in bound:
        named = files.get(listener.name)
        served = listener.tls
        if served and named and named.cert == served.cert and named.cert_pem != served.cert_pem:
            version = kept_min_version(served, named, "a certificate clients take")
            notes.append(
                f"listener {listener.name} serves the certificate from before, not the one"
                f" now in {named.cert} (the log says why){version}"
            )
    return tuple(notes)


def _metrics_at(policy: Policy) -> str:
    settings = policy.metrics
    return "none" if settings is None else host_port(settings.address, settings.port)


def _listener_changes(old: Sequence[Listener], new: Sequence[Listener]) -> list[str]:
    """What changed, per listener (``local: port, auth``), for the warning that it
    waits for a restart: a sysadmin should not have to diff the file to know."""
    before = {listener.name: listener for listener in old}
    after = {listener.name: listener for listener in new}
    changes = []
    for name in sorted(before.keys() | after.keys()):
        was, now = before.get(name), after.get(name)
        if was is None or now is None:
            changes.append(f"{name}: {'added' if was is None else 'removed'}")
        elif was != now:
            keys = [f.name for f in dataclasses.fields(now) if _differs(was, now, f.name)]
            changes.append(f"{name}: {', '.join(keys)}")
    return changes


def _differs(was: Listener, now: Listener, key: str) -> bool:
    return bool(getattr(was, key) != getattr(now, key))


def _as_opened(old: Policy, new: Policy) -> Policy:
    """The state directory and the audit key as the daemon opened them. The spool,
    the audit chain and the suppression list are open there; a new directory
    would start a second spool and a second chain beside them, and hard
    bounces would be listed in a file no worker reads. A new key would make
    the chain fail verification with either key from the record it changed
    at. So do ``workers``, ``queue.concurrency`` and ``metrics`` (the address
    bound) stay as they run, so that a reload compares with what runs, not
    with the file read before."""
    queue = dataclasses.replace(
        new.queue, directory=old.queue.directory, concurrency=old.queue.concurrency
    )
    audit = dataclasses.replace(
        new.audit, directory=old.audit.directory, hmac_key=old.audit.hmac_key
    )
    suppression = new.suppression
    if suppression is not None and old.suppression is not None:
        suppression = dataclasses.replace(suppression, file=old.suppression.file)
    return dataclasses.replace(
        new,
        queue=queue,
        audit=audit,
        suppression=suppression,
        workers=old.workers,
        metrics=old.metrics,
    )


def _warn_state_changed(old: Policy, read: Policy) -> None:
    if read.queue.directory.parent != old.queue.directory.parent:
        log.warning(
            "state_directory changed (%s to %s): takes effect after a restart; until then"
            " the spool, the audit log and the suppression list stay in the old one, while"
            " relay queue, audit, suppression and bounce, which read the policy file, look"
            " in the new one; mail still"
            " queued in the old one at the restart stays there unless it is moved"
            " (docs/queue.md: moving the state directory)",
            old.queue.directory.parent,
            read.queue.directory.parent,
        )
    if read.audit.hmac_key != old.audit.hmac_key:
        log.warning(
            "audit.hmac_key_file changed: takes effect after a restart; until then the"
            " audit log is written with the key it started with, while relay audit verify,"
            " which reads the policy file, uses the new one (see docs/audit-log.md on"
            " changing the key)"
        )


def _as_bound(
    old: Sequence[Listener], new: Sequence[Listener], quiet: bool = False
) -> tuple[Listener, ...]:
    """The listeners as bound, each with its certificate and key read again: a
    renewal is taken up, other changes wait. A listener whose ``tls`` now names
    other files keeps serving its own, and those are read again too: before,
    the bytes held since the start were served, and a renewal in place of the
    old files changed nothing."""
    read = {listener.name: listener.tls for listener in new}
    return tuple(
        dataclasses.replace(listener, tls=_tls_taken_up(listener, read.get(listener.name), quiet))
        if listener.tls is not None
        else listener
        for listener in old
    )


def _tls_taken_up(listener: Listener, read: TlsFiles | None, quiet: bool) -> TlsFiles:
    """The pair to serve (``_tls_as_bound``), with the ``min_version`` the file
    now says: a legacy client let in takes a reload, as a renewal does. Where
    the pair served before is kept (the new one refused, or not read), so is
    its ``min_version``: a ``tls`` refused is not taken up in part."""
    pair = _tls_as_bound(listener, read, quiet)
    if read is None or read.min_version is pair.min_version:
        return pair
    if pair is listener.tls:
        if not quiet:
            log.error(
                "listener %s: keeping TLS min_version %s with the certificate served before,"
                " not %s: a reload with a certificate clients take takes it up",
                listener.name,
                pair.min_version.value,
                read.min_version.value,
            )
        return pair
    return dataclasses.replace(pair, min_version=read.min_version)


def _say_if_refused(listener: Listener) -> None:
    """A start serves the certificate it finds, valid or not (there is no other),
    and said nothing of one clients refuse, where a reload says it and keeps the
    one it served: a restart after a bad renewal went unnoticed in the log."""
    if listener.tls is not None:
        now = datetime.now(UTC)
        refused = tlspair.validity_problem(listener.tls, now)
        if refused is not None:
            log.error("listener %s: serving it all the same: %s", listener.name, refused)
        elif (soon := tlspair.ends_soon(listener.tls, now)) is not None:
            log.warning("listener %s: %s", listener.name, soon)


def _tls_as_bound(listener: Listener, read: TlsFiles | None, quiet: bool) -> TlsFiles:
    """The pair to serve, read again. One clients would refuse (expired, or not
    valid yet: the wrong file copied by a renewal hook, a clock behind) does
    not replace one they take: it is an error in the log, and the one served
    stays, in every worker and in one started later; in place of one refused
    as well it is served, with a warning."""
    served = listener.tls
    assert served is not None
    if served == read:  # the same files, as the new policy read and checked them
        again = read
    else:
        try:
            again = tlspair.read_pair(served.cert, served.key)
        except (ssl.SSLError, OSError) as exc:
            if not quiet:
                log.error(
                    "listener %s: cannot read %s and %s again, which it serves until a restart;"
                    " keeping the certificate loaded before: %s",
                    listener.name,
                    served.cert,
                    served.key,
                    exc.strerror or exc,
                )
            return served
        if not quiet:
            log.info(
                "listener %s: until a restart it serves %s and %s, as bound, read again",
                listener.name,
                served.cert,
                served.key,
            )
    now = datetime.now(UTC)
    refused = tlspair.validity_problem(again, now)
    if refused is None:
        if not quiet and (soon := tlspair.ends_soon(again, now)) is not None:
            log.warning("listener %s: %s", listener.name, soon)
        return again
    if again.cert_pem != served.cert_pem and tlspair.validity_problem(served, now) is None:
        if not quiet:
            log.error(
                "listener %s: keeping the TLS certificate served before: %s", listener.name, refused
            )
        return served
    if not quiet:
        log.warning("listener %s: serving it all the same: %s", listener.name, refused)
    return again


def record_policy(audit: AuditLog, path: Path, policy: Policy) -> None:
    from relay.audit import events

    record = events.policy_loaded(policy_file=str(path), policy_sha256=policy.digest)
    try:
        audit.append(record)
    except RelayError as exc:
        log.error(
            "cannot write the audit log: %s; policy %s (%s) is in use with no policy_loaded"
            " record for it",
            exc,
            policy.digest[:12],
            path,
        )


async def _audit_upkeep(audit: AuditLog, current: Callable[[], Policy]) -> None:
    """The policy's retention and compression as they are at each run: a reload
    changes them at once (the supervisor's upkeep reads the policy each time)."""
    while True:
        await asyncio.sleep(AUDIT_UPKEEP)
        policy = current()
        audit.retention_days = policy.audit.retention_days
        audit.compress_after_days = policy.audit.compress_after_days
        await asyncio.to_thread(audit_upkeep, audit)
        await asyncio.to_thread(spool_upkeep, policy)


def spool_upkeep(policy: Policy) -> None:
    """What a crash left in the spool (temp files, files kept for reuse) that the
    start's recovery had to leave: a restart right after the crash finds them
    too young to be sure no process still writes them. Once a day, those older
    than an hour, or than the longest a client may stay silent mid-message."""
    from relay.spool import Spool, SpoolError

    idle = max((listener.idle_timeout for listener in policy.listeners), default=0.0)
    try:
        Spool(policy.queue.directory).recover(min_age=max(LEFTOVER_AGE, idle + 60.0))
    except SpoolError as exc:
        log.error("spool upkeep failed: %s", exc)


def audit_upkeep(audit: AuditLog) -> None:
    """Compress closed days and apply retention, as the policy asks; run once a day."""
    try:
        done = audit.maintain()
    except RelayError as exc:
        log.error("audit log upkeep failed: %s", exc)
        return
    for line in done:
        log.info("audit log: %s", line)
