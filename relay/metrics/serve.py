"""``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, in threads of their own.

The supervisor's main loop waits for signals and the workers' loops carry
the mail: neither should wait on a scraper. Each request has a thread, so a
client that stalls (one is cut off after ``TIMEOUT`` of silence) holds up no
health check; scrapes take turns, as the counting keeps state. A connection
takes a thread only once it has sent something: until then it waits in the
server's own thread, so that clients that connect and send nothing cannot
starve the health checks. One that has not sent its whole request within
``SILENT`` gives its slot up to a new one when every slot is taken.

``/healthz`` says whether the relay's main loop still comes round (it is for
restarting a stuck relay, so it checks nothing else); ``/readyz`` whether it
can take mail: every worker running, the queue and the audit log writable,
no write to the disk (an fsync) waiting for ``SLOW`` seconds or more.
An unreachable upstream is in neither: mail is queued meanwhile, and a
restart would not bring the upstream back.

All three answer from the moment the port is bound: the start reads the
whole spool first (6 to 11 s for 50,000 messages), and a probe with a short
timeout that got no answer meanwhile took the relay for hung.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay import lowports, statefiles
from relay.clocksteps import ClockSteps
from relay.diskwait import SLOW, DiskWaits
from relay.errors import RelayError
from relay.hostport import host_port
from relay.ingress.diskspace import reserve_for, shortage
from relay.ingress.filelimit import metrics_waiting
from relay.metrics import status
from relay.metrics.collect import RelayCollector
from relay.policy.model import MetricsSettings, Policy
from relay.ratelimit import RateCounts
from relay.spool.store import WRITTEN_IN
from relay.tally import Tally

log = logging.getLogger("relay")

TIMEOUT = 5.0  # seconds a client may leave its connection silent
DEADLINE = 10.0  # seconds a connection may last, however it trickles
MAX_CLIENTS = 32
# Connections the kernel holds for accept, capped by net.core.somaxconn. At
# socketserver's 5 a burst (a local process opening connections in a loop,
# scrapers at once) overflowed the queue: the kernel dropped the rest, a
# health check among them unanswered for seconds. Queued, each is accepted
# in turn and waits for its request without a thread; past ``MAX_CLIENTS``
# one that sent it takes the slot of the connection silent longest, or waits
# for one up to ``SLOT_WAIT`` and is closed only then.
BACKLOG = 4096
SLOT_WAIT = 1.0  # seconds
ACCEPTED_AT_ONCE = 64  # connections accepted before those that sent something are read
# Seconds a connection may go without sending its whole request and keep its
# slot from a new one: a client sends it as it connects, well within this.
SILENT = 0.5
SLOT_POLL = 0.05  # seconds between looks for a slot, or a silent connection to cut
# Signals none of the server's threads takes: the process's own are the main
# thread's (the supervisor waits for them in ``sigtimedwait``); the faults a
# thread causes itself cannot be held back.
HELD_BACK = signal.valid_signals() - {
    signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP,
    signal.SIGSYS,
}  # fmt: skip
READING = "starting: reading the spool"
ABOUT_TO_SERVE = "starting: the spool is read, not serving yet"


class MetricsError(RelayError):
    """The metrics listener could not be opened; says where and why."""


class _Server(ThreadingHTTPServer):
    """A thread per request, so that a client that stalls holds up nobody else,
    and at most ``MAX_CLIENTS`` of them; the relay's stop waits for none.

    A connection waits for its first bytes in the server's own thread, with no
    slot: taking a thread each as they were accepted, 1,000 connections that
    sent nothing held a health check behind them for 16 s, half a second (the
    ``SILENT`` they were each given) for every 32. At most ``most_waiting`` of
    them wait, each a file (``metrics_waiting``): past that the one waiting
    longest is closed once it has had ``SILENT`` to send its request, and any
    is closed after ``TIMEOUT``."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.open_requests: set[socket.socket] = set()  # for a forked worker to close
        # connections whose request is not read yet, oldest first: when each was accepted
        self._unheard: dict[socket.socket, float] = {}
        self._unheard_lock = threading.Lock()
        # accepted, nothing read from them yet: when each was accepted, oldest first
        self.waiting: dict[socket.socket, tuple[Any, float]] = {}
        # sent something, waiting for a slot: since when, oldest first
        self.ready: deque[tuple[socket.socket, Any, float]] = deque()
        self._turn_since = 0.0  # monotonic time the first of them began to wait its turn
        self.most_waiting = metrics_waiting(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.selector: selectors.BaseSelector | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._accept_after = 0.0  # monotonic time: accepting paused, for want of room
        super().__init__(address, _Handler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accepts, waits for what each connection sends, and gives those that sent
        something a thread, until ``shutdown``; looks for it every ``poll_interval``."""
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                self.selector = selector
                self.socket.setblocking(False)
                selector.register(self.socket, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    self._round(selector, poll_interval)
        finally:
            self.selector = None
            self._stopping.clear()
            self._stopped.set()

    def _round(self, selector: selectors.BaseSelector, poll_interval: float) -> None:
        listening = False
        for key, _ in selector.select(self._next_look(poll_interval)):
            if key.fileobj is self.socket:
                listening = True
            else:
                self._heard_from(selector, key.fileobj)  # type: ignore[arg-type]
        self._give_slots()
        now = time.monotonic()
        if listening:
            self._accept(selector, now)
        elif self._accept_after and now >= self._accept_after:
            self._accept_after = 0.0
            selector.register(self.socket, selectors.EVENT_READ)
        while self.waiting:
            oldest, (_, since) = next(iter(self.waiting.items()))
            if now - since < TIMEOUT:
                break
            self._drop(selector, oldest)

    def _next_look(self, poll_interval: float) -> float:
        """Soon enough to give a slot, cut a silent connection, or accept again."""
        wait = poll_interval
        if self.ready:  # waited for a slot already
            return 0.0
        if self._accept_after:
            wait = min(wait, max(0.0, self._accept_after - time.monotonic()))
        if self.waiting:
            since = next(iter(self.waiting.values()))[1]
            wait = min(wait, max(0.0, since + TIMEOUT - time.monotonic()))
        return wait

    def _accept(self, selector: selectors.BaseSelector, now: float) -> None:
        """A few at a time: those that have sent something are read in between.
        With ``most_waiting`` held, the one waiting longest makes room once it
        has had ``SILENT`` to send; until then the next waits in the kernel's
        queue, so that a burst of clients that send as they connect loses none
        (closed at once, 1,750 of 3,000 health checks were)."""
        for _ in range(ACCEPTED_AT_ONCE):
            if len(self.waiting) + len(self.ready) >= self.most_waiting:
                oldest = next(iter(self.waiting.items()), None)
                if oldest is None or now - oldest[1][1] < SILENT:
                    after = now + SLOT_POLL if oldest is None else oldest[1][1] + SILENT
                    self._pause(selector, after)
                    return
            try:
                request, client_address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(selector, now + SLOT_POLL)
                    if self.waiting:
                        self._drop(selector, next(iter(self.waiting)))
                return  # otherwise one gone before it was accepted
            if len(self.waiting) + len(self.ready) >= self.most_waiting:
                self._drop(selector, next(iter(self.waiting)))  # had its SILENT, as above
            self.waiting[request] = (client_address, now)
            selector.register(request, selectors.EVENT_READ)

    def _pause(self, selector: selectors.BaseSelector, until: float) -> None:
        """No accepting until ``until``: the connections wait in the kernel's queue."""
        selector.unregister(self.socket)
        self._accept_after = until

    def _heard_from(self, selector: selectors.BaseSelector, request: socket.socket) -> None:
        """It sent something, or hung up: its turn for a slot."""
        selector.unregister(request)
        client_address, _ = self.waiting.pop(request)
        self.ready.append((request, client_address, time.monotonic()))

    def _drop(self, selector: selectors.BaseSelector, request: socket.socket) -> None:
        selector.unregister(request)
        del self.waiting[request]
        self.shutdown_request(request)

    def _give_slots(self) -> None:
        """Past ``MAX_CLIENTS``, the oldest waits for a slot, cutting a connection
        silent over ``SILENT`` to free one, for ``SLOT_WAIT`` at most, and those
        behind it wait their turn (timed from then: 3,000 quick requests at
        once take 2 s). Waited for here, not in ``select``, so that a burst
        takes each slot as it frees: looking every ``SLOT_POLL``, 32 were
        answered at a time."""
        while self.ready:
            if not self.slots.acquire(blocking=False):
                self._cut_silent()
                if not self.slots.acquire(timeout=SLOT_POLL):
                    break
            request, client_address, _ = self.ready.popleft()
            self._turn_since = time.monotonic()
            self.open_requests.add(request)
            with self._unheard_lock:
                self._unheard[request] = time.monotonic()
            try:
                self.process_request(request, client_address)
            except RuntimeError:  # no thread to be had: logged, and served on
                self.handle_error(request, client_address)
                self.open_requests.discard(request)
                self.slots.release()
                self.shutdown_request(request)
        now = time.monotonic()
        if self.ready and now - max(self._turn_since, self.ready[0][2]) > SLOT_WAIT:
            self.shutdown_request(self.ready.popleft()[0])
            self._turn_since = now

    def shutdown(self) -> None:
        """The loop stops at its next look, ``poll_interval`` at most."""
        self._stopping.set()
        self._stopped.wait()

    def server_close(self) -> None:
        """The connections that never had a thread are closed with the port."""
        super().server_close()
        for request in list(self.waiting):
            self.shutdown_request(request)
        self.waiting.clear()
        while self.ready:
            self.shutdown_request(self.ready.popleft()[0])

    def _cut_silent(self) -> None:
        """Ends the connection that has waited longest for its request, if that is
        over ``SILENT``. Only its reading is shut: a request that came in just
        now is still read and answered; a client that sent none reads the end."""
        with self._unheard_lock:  # held, so that its thread cannot close it meanwhile
            oldest = next(iter(self._unheard.items()), None)
            if oldest is None or time.monotonic() - oldest[1] < SILENT:
                return
            del self._unheard[oldest[0]]
            with contextlib.suppress(OSError):
                oldest[0].shutdown(socket.SHUT_RD)

    def heard(self, request: socket.socket) -> None:
        """Its request is read: the connection keeps its slot until it is answered."""
        with self._unheard_lock:
            self._unheard.pop(request, None)

    def shutdown_request(self, request: Any) -> None:
        """Off the list of those to cut before it is closed: cut after, its file
        descriptor's number could be another's already."""
        self.heard(request)
        super().shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The slot its connection took before the thread began is given back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open_requests.discard(request)
            self.slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        """A scraper that hung up before its answer is its own business; anything
        else is a fault of the relay's, with its traceback in the log."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        log.exception("metrics: a request failed")


class MetricsServer:
    def __init__(self, settings: MetricsSettings, policy: Policy) -> None:
        """Bound next to the listeners, before the state is touched: a port taken
        stops the start as a listener's does. Served from here, saying that the
        relay starts until ``start``."""
        self.settings = settings
        self._policy: Callable[[], Policy] = lambda: policy
        family = socket.AF_INET6 if ":" in settings.address else socket.AF_INET
        try:
            self._http = _Server((settings.address, settings.port), family)
        except OSError as exc:
            where = _where(settings)
            why = f"{exc.strerror}{lowports.hint(exc.errno, settings.port)}"
            raise MetricsError(f"cannot listen for metrics on {where}: {why}") from exc
        self._http.relay = self  # type: ignore[attr-defined]
        # One thread counts, whoever asks: the counting keeps state, and its
        # allocations stay in one thread's memory arena, not in one per request.
        self._counting = concurrent.futures.ThreadPoolExecutor(1, "metrics-count")
        self._quiet = threading.Lock()  # held while counting, and while the supervisor forks
        self._registry = CollectorRegistry(auto_describe=False)
        self._disk: DiskWaits | None = None
        self._starting: str | None = READING  # None once served whole
        self._serve()

    def _serve(self) -> None:
        """The thread begins with every signal held back, as do the threads it
        starts: begun before the supervisor held its own back, it took the
        process's SIGCHLD and SIGTERM from the supervisor's ``sigtimedwait``."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_BACK)
        try:
            self._thread = threading.Thread(
                target=self._http.serve_forever, name="metrics", kwargs={"poll_interval": 0.5}
            )
            self._thread.daemon = True
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def begin(
        self,
        rates: RateCounts,
        tally: Tally,
        records: int = 0,
        disk: DiskWaits | None = None,
        steps: ClockSteps | None = None,
        queued: Iterable[tuple[str, str, int]] | None = None,
    ) -> None:
        """Count from here: once the state is open, before the workers start, so
        that nothing they do is missed; ``records``, the audit records the start
        wrote (its ``policy_loaded``, what recovery wrote again) are counted too;
        ``disk``, the writes in progress, for the gauge and ``/readyz``;
        ``steps``, the clock's steps the process that looks at them sees;
        ``queued``, the queued messages as the start read them (``RelayCollector``)."""
        self._disk = disk
        self._registry.register(
            RelayCollector(self._current, rates, tally, records, disk, steps, queued)
        )
        self._starting = ABOUT_TO_SERVE

    def start(self, current: Callable[[], Policy]) -> None:
        """The relay serves: the metrics and both checks say what it does from
        here, reading the policy in use from ``current`` at each request."""
        self._policy = current
        self._starting = None
        if not status.STATUS.stopping:  # a stop taken during the start: it never served
            log.info("metrics on http://%s/metrics", _where(self.settings))

    def starting(self) -> str | None:
        """What the start is doing, until the relay serves; None from then on.
        A stop asked for meanwhile is said as a serving relay's is."""
        if self._starting is not None and status.STATUS.stopping:
            return "stopping"
        return self._starting

    def stop(self) -> None:
        self._http.shutdown()
        self._thread.join(timeout=10)
        self._http.server_close()
        self._counting.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        """No count under way while the supervisor forks a worker: the worker would
        keep the directories and files it had open for as long as it lives."""
        with self._quiet:
            yield

    def close_in_child(self) -> None:
        """A forked worker's copies of the listening socket, of the connections
        waiting or being answered, and of what watches them: the worker serves
        none of them."""
        http = self._http
        waiting = [*http.open_requests, *http.waiting, *(ready for ready, _, _ in http.ready)]
        for request in waiting:
            with contextlib.suppress(OSError):
                os.close(request.fileno())
        if http.selector is not None:
            with contextlib.suppress(OSError, ValueError):
                os.close(http.selector.fileno())  # type: ignore[attr-defined]
        os.close(http.fileno())

    def metrics(self) -> bytes:
        return self._counting.submit(self._count).result()

    def _count(self) -> bytes:
        with self._quiet:
            return generate_latest(self._registry)

    def _current(self) -> Policy:
        return self._policy()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        policy = self._current()
        state = status.STATUS
        # read once: the supervisor's thread changes them, and a 503 said "2 of 2
        # running", the count read again after a worker's death was noted
        running, expected = state.workers_running, state.workers_expected
        checks = {
            "workers": f"{running} of {expected} running",
            "queue": _writable(*(policy.queue.directory / name for name in WRITTEN_IN)),
            "audit": _writable(policy.audit.directory),
        }
        # not ready once no listener takes mail: a small listener's may still go on
        reserve = min((reserve_for(x.max_message_size) for x in policy.listeners), default=0)
        state_directories = {"queue": policy.queue.directory, "audit": policy.audit.directory}
        for name, directory in state_directories.items():
            if checks[name] == "writable":
                checks[name] = shortage(directory, reserve) or "writable"
        if policy.suppression is not None:
            checks["suppression"] = _readable(policy.suppression.file)
        checks["disk"] = _answering(self._disk, policy.queue.directory.parent)
        ready = running >= expected > 0 and all(
            checks[name] == "writable" for name in ("queue", "audit")
        )
        ready = ready and checks["disk"] == "answering"
        if state.stopping:  # its listeners are closed already
            return False, {"relay": "stopping", **checks}
        return ready and checks.get("suppression", "readable") == "readable", checks


def _answering(disk: DiskWaits | None, state: Path) -> str:
    """Read here, in the server's thread: the supervisor's loop may be the one
    waiting for the disk, and the clients of a worker that waits get no reply."""
    waiting = None if disk is None else disk.longest()
    if disk is None or waiting is None:
        return "answering"
    seconds = waiting.seconds(time.monotonic_ns())
    if seconds < SLOW:
        return "answering"
    name = disk.name(waiting.index, waiting.pid)
    return f"{name}: a write to the disk under {state} has not finished for {seconds:.0f}s"


def _readable(file: Path) -> str:
    """Every message is refused with 451 while the list cannot be read: a relay
    that takes no mail is not ready for it. A list not made yet is empty. A FIFO
    there is refused unopened: its open waited for a writer, and held the
    health check's thread for ever."""
    try:
        with statefiles.read_plain(file) as listing:
            listing.read(1)
    except FileNotFoundError:
        return "readable"
    except OSError as exc:
        return f"{file} not readable: {exc.strerror}"
    return "readable"


def _writable(*directories: Path) -> str:
    for directory in directories:
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"{directory} not writable"
    return "writable"


def _where(settings: MetricsSettings) -> str:
    return host_port(settings.address, settings.port)


class _Handler(BaseHTTPRequestHandler):
    timeout = TIMEOUT
    server_version = "relay"

    def setup(self) -> None:
        super().setup()
        self._cutoff = threading.Timer(DEADLINE, self._cut)
        self._cutoff.daemon = True
        self._cutoff.start()

    def _cut(self) -> None:
        """A client sending a byte now and then is never silent for ``TIMEOUT``:
        without a deadline, a few of them would hold every slot for good."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._cutoff.cancel()
        super().finish()

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.server.heard(self.connection)  # type: ignore[attr-defined]
        return parsed

    def version_string(self) -> str:
        return self.server_version

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        relay: MetricsServer = self.server.relay  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        starting = relay.starting()
        if starting is not None and path in ("/metrics", "/healthz", "/readyz"):
            self._starting(path, starting)
        elif path == "/metrics":
            try:
                body = relay.metrics()
            except (RelayError, OSError) as exc:
                log.error("metrics: %s", exc)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"{exc}\n".encode())
                return
            self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive = status.alive()
            code = HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(code, b"ok\n" if alive else b"the main loop is stuck\n")
        elif path == "/readyz":
            ready, checks = relay.readiness()
            body = json.dumps({"ready": ready, "checks": checks}, indent=1).encode() + b"\n"
            code = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(code, body, "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"/metrics, /healthz or /readyz\n")

    def _starting(self, path: str, why: str) -> None:
        """Alive, not ready, and no metrics yet: a 503 fails the scrape (``up``
        0), where the counts at 0 and an empty queue served meanwhile would
        read as a relay with nothing queued, its workers all gone."""
        if path == "/healthz":
            self._send(HTTPStatus.OK, f"{why}\n".encode())
        elif path == "/readyz":
            checks = {"relay": why}
            body = json.dumps({"ready": False, "checks": checks}, indent=1).encode() + b"\n"
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json")
        else:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{why}\n".encode())

    def _send(self, code: HTTPStatus, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every 15 seconds are not news for the operational log."""
