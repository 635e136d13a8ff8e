"""``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, in a thread of their own.

The supervisor's main loop waits for signals and the workers' loops carry
the mail: neither should wait on a scraper. One thread answers one request
at a time, so a scrape's reading of the audit log and the spool never runs
twice at once; a client that stalls is cut off after ``TIMEOUT``.

``/healthz`` says whether the relay's main loop still comes round (it is for
restarting a stuck relay, so it checks nothing else); ``/readyz`` whether it
can take mail: every worker running, the queue and the audit log writable.
An unreachable upstream is in neither: mail is queued meanwhile, and a
restart would not bring the upstream back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay.errors import RelayError
from relay.metrics import status
from relay.metrics.collect import RelayCollector
from relay.policy.model import MetricsSettings, Policy
from relay.server import host_port

log = logging.getLogger("relay")

TIMEOUT = 5.0  # seconds a client may take to send its request


class MetricsError(RelayError):
    """The metrics listener could not be opened; says where and why."""


class _Server(HTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A scraper that hung up before its answer is its own business; anything
        else is a fault of the relay's, with its traceback in the log."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        log.exception("metrics: a request failed")


class MetricsServer:
    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        self._policy: Callable[[], Policy] | None = None
        family = socket.AF_INET6 if ":" in settings.address else socket.AF_INET
        server_class = type("_Server", (_Server,), {"address_family": family})
        try:
            self._http = server_class((settings.address, settings.port), _Handler)
        except OSError as exc:
            where = _where(settings)
            raise MetricsError(f"cannot listen for metrics on {where}: {exc.strerror}") from exc
        self._http.relay = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self._registry: CollectorRegistry | None = None

    def start(self, current: Callable[[], Policy]) -> None:
        """Serve, reading the policy in use from ``current`` at each request."""
        self._policy = current
        # counting starts here, at the audit log's end: what the relay does from now on
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(RelayCollector(self._current))
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="metrics", kwargs={"poll_interval": 0.5}
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("metrics on http://%s/metrics", _where(self.settings))

    def stop(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(timeout=10)
        self._http.server_close()

    def close_in_child(self) -> None:
        """A forked worker's copy of the listening socket: the worker never serves it."""
        os.close(self._http.fileno())

    def metrics(self) -> bytes:
        assert self._registry is not None, "started"
        return generate_latest(self._registry)

    def _current(self) -> Policy:
        assert self._policy is not None, "started"
        return self._policy()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        policy = self._current()
        state = status.STATUS
        checks = {
            "workers": f"{state.workers_running} of {state.workers_expected} running",
            "queue": _writable(policy.queue.directory),
            "audit": _writable(policy.audit.directory),
        }
        ready = state.workers_running >= state.workers_expected > 0 and all(
            checks[name] == "writable" for name in ("queue", "audit")
        )
        return ready, checks


def open_metrics(policy: Policy) -> MetricsServer | None:
    """The listener bound (not yet served), if the policy has a ``metrics`` section:
    a port taken is an error at the start, like a listener's."""
    return None if policy.metrics is None else MetricsServer(policy.metrics)


def _writable(directory: os.PathLike) -> str:
    return "writable" if os.access(directory, os.W_OK | os.X_OK) else f"{directory} not writable"


def _where(settings: MetricsSettings) -> str:
    return host_port(settings.address, settings.port)


class _Handler(BaseHTTPRequestHandler):
    timeout = TIMEOUT
    server_version = "relay"
    sys_version = ""

    def do_GET(self) -> None:
        relay: MetricsServer = self.server.relay  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
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

    def _send(self, code: HTTPStatus, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every 15 seconds are not news for the operational log."""
