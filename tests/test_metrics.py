"""Metrics and health end to end: a real relay (two workers, or one process), a real
upstream refusing and deferring some recipients, scraped over loopback HTTP and
read with Prometheus's own parser."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics.serve import MetricsServer
from relay.policy.load import load
from relay.policy.model import Policy
from tests.relayproc import RelayProcess, in_data, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_queue_e2e import configure, relay_cli, send

ROOT = Path(__file__).resolve().parent.parent
REFUSE = {
    "gone@example.org": "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown",
    "later@example.org": "450 4.2.1 Mailbox busy",
}


def _get(port: int, path: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body, kind = _get(port, "/metrics")
    assert code == 200 and kind.startswith("text/plain"), (code, body)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _metrics_policy(policy_file: Path, port: int, sink_port: int, metrics: int, workers: int):
    extra = f"workers: {workers}\nmetrics: {{address: 127.0.0.1, port: {metrics}}}\n"
    return configure(policy_file, port, sink_port, extra)


def _offer(port: int, sender: str) -> int:
    """The reply to the end of DATA of a small message from ``sender``."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail(sender)
        client.rcpt("one@example.org")
        code, _ = client.data(b"Subject: hello\r\n\r\nhello\r\n")
    return code


def test_the_counts_are_those_of_the_audit_log(policy_file: Path, tmp_path: Path) -> None:
    """Two workers; a message sent, one with a recipient refused for good and one
    deferred, one refused by the policy: each count says so, per tenant and in
    Postfix's words, the queue holds the deferred one and the list the refused
    address; a broken policy on SIGHUP shows as a failed reload."""
    with SinkServer(Sink(refuse=dict(REFUSE))) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            wait_for(lambda: f"metrics on http://127.0.0.1:{metrics}/metrics" in relay.log())
            before = _samples(metrics)
            send(port, rcpts=("ok@example.org",))
            send(port, rcpts=("gone@example.org", "later@example.org", "ok2@example.org"))
            assert _offer(port, "nobody@unknown.example") == 550  # a sender nobody knows
            wait_for(lambda: relay.log().count("status=deferred") >= 1)
            wait_for(lambda: len(sink.sink.messages) >= 3)  # two messages and a notice
            wait_for(
                lambda: _value(_samples(metrics), "relay_deliveries_total", tenant="acme",
                               status="sent") >= 3
            )  # fmt: skip
            after = _samples(metrics)
            assert _value(after, "relay_messages_received_total", tenant="acme") == 2
            for selector in ("s1", "e1"):  # RSA and Ed25519, both on each message
                signed = {"domain": "platform.example", "selector": selector}
                assert _value(after, "relay_dkim_signatures_total", **signed) == 2
            for selector in ("s1", "e1"):
                signed = {"domain": "platform.example", "selector": selector}
                assert ("relay_dkim_signatures_total", tuple(sorted(signed.items()))) in before
            assert _value(after, "relay_messages_rejected_total", **{"class": "5xx"}) == 1
            sent = _value(after, "relay_deliveries_total", tenant="acme", status="sent")
            assert sent == 3  # ok@, ok2@ and the sender's notice about gone@
            assert _value(after, "relay_deliveries_total", tenant="acme", status="bounced") == 1
            assert _value(after, "relay_deliveries_total", tenant="acme", status="deferred") >= 1
            assert _value(after, "relay_workers", state="running") == 2
            assert _value(after, "relay_workers", state="configured") == 2
            assert _value(after, "relay_queue_messages", queue="deferred") == 1
            assert _value(after, "relay_queue_oldest_message_age_seconds", queue="deferred") > 0
            assert _value(after, "relay_suppression_list_entries") == 1
            assert _value(after, "relay_config_last_reload_successful") == 1
            assert _value(after, "relay_audit_records_total") > 0
            assert _value(before, "relay_messages_received_total", tenant="acme") == 0

            policy.write_text(policy.read_text() + "\nnot yaml: [\n")
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload failed" in relay.log())
            failed = _samples(metrics)
            assert _value(failed, "relay_config_last_reload_successful") == 0

            moved = free_port()
            text = policy.read_text().replace("\nnot yaml: [\n", "")
            policy.write_text(text.replace(f"port: {metrics}}}", f"port: {moved}}}"))
            relay.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "policy reloaded" in relay.log())
            assert (
                f"metrics changed (127.0.0.1:{metrics} to 127.0.0.1:{moved}):"
                " takes effect after a restart" in relay.log()
            )
            again = _samples(metrics)
            assert _value(again, "relay_config_last_reload_successful") == 1
            stamp = "relay_config_last_reload_success_timestamp_seconds"
            assert _value(again, stamp) > _value(after, stamp)


def _workers(relay: RelayProcess) -> list[int]:
    assert relay.proc is not None
    found = subprocess.run(
        ["pgrep", "-P", str(relay.proc.pid)], capture_output=True, text=True, timeout=10
    )
    return [int(pid) for pid in found.stdout.split()]


def test_health_and_readiness(policy_file: Path, tmp_path: Path) -> None:
    """``/healthz`` answers while the supervisor's loop comes round; ``/readyz`` is
    503, naming what is missing, while a worker that died is being replaced,
    and 200 again once it is; once the relay has stopped, nobody listens."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            assert _get(metrics, "/healthz")[:2] == (200, b"ok\n")
            code, body, kind = _get(metrics, "/readyz")
            assert (code, kind) == (200, "application/json"), body
            answer = json.loads(body)
            assert answer["ready"] is True
            assert answer["checks"] == {
                "workers": "2 of 2 running", "queue": "writable", "audit": "writable",
                "suppression": "readable", "disk": "answering",
            }  # fmt: skip
            assert _get(metrics, "/nothing")[0] == 404

            os.kill(_workers(relay)[0], signal.SIGKILL)
            seen: list[tuple[int, bytes]] = []
            wait_for(lambda: seen.append(_get(metrics, "/readyz")[:2]) or seen[-1][0] == 503)
            assert json.loads(seen[-1][1])["checks"]["workers"] == "1 of 2 running"
            wait_for(lambda: _get(metrics, "/readyz")[0] == 200)
            assert _get(metrics, "/healthz")[0] == 200
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", metrics)) != 0


@pytest.mark.parametrize("workers", [2, 1])
def test_a_stopping_relay_is_not_ready_and_says_it_stops(
    policy_file: Path, tmp_path: Path, workers: int
) -> None:
    """From SIGTERM on its listeners are closed: /readyz said 200 "2 of 2 running"
    for the whole grace, and ``relay status`` that workers were starting again.
    A client left in the middle of its message holds the stop up meanwhile."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=workers)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with in_data(port):
                relay.signal(signal.SIGTERM)
                wait_for(lambda: _get(metrics, "/readyz")[0] == 503)
                checks = json.loads(_get(metrics, "/readyz")[1])["checks"]
                assert checks["relay"] == "stopping", checks
                wait_for(lambda: _value(_samples(metrics), "relay_workers", state="running") == 1)
                relay.signal(signal.SIGHUP)  # a reload wrote its note over the stop's
                wait_for(lambda: "SIGHUP while stopping: not reloaded" in relay.log())
                status = relay_cli(policy, "status")
                assert status.returncode == 0, status
                said = status.stdout.splitlines()[0]
                assert said.startswith("relay: stopping, PID "), status.stdout
                assert said.endswith(", 1 worker process finishing") == (workers > 1), said
            assert relay.proc is not None
            assert relay.proc.wait(20) == 0, relay.log()
        assert relay_cli(policy, "status").returncode == 3


def test_a_queue_directory_messages_cannot_be_written_in_is_not_ready(
    policy_file: Path, tmp_path: Path
) -> None:
    """Every message was refused with 451 while /readyz said the queue was
    writable: it looked at ``queue/``, where the relay writes nothing."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=1)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            assert _get(metrics, "/readyz")[0] == 200
            spool_msg = tmp_path / "state" / "queue" / "msg"
            spool_msg.rename(tmp_path / "msg.saved")
            spool_msg.write_text("not a directory")  # no one writes in it, root included
            code, body, _ = _get(metrics, "/readyz")
            assert code == 503, body
            assert json.loads(body)["checks"]["queue"] == f"{spool_msg} not writable"
            spool_msg.unlink()
            (tmp_path / "msg.saved").rename(spool_msg)
            assert _get(metrics, "/readyz")[0] == 200


def test_one_process_serves_its_own_metrics(policy_file: Path, tmp_path: Path) -> None:
    """``workers: 1`` runs without a supervisor: the one process serves them."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=1)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            assert "serving in one process" in relay.log()
            send(port)
            sink.sink.wait(1)
            wait_for(
                lambda: _value(_samples(metrics), "relay_deliveries_total", tenant="acme",
                               status="sent") == 1
            )  # fmt: skip
            samples = _samples(metrics)
            assert _value(samples, "relay_messages_received_total", tenant="acme") == 1
            assert _value(samples, "relay_workers", state="running") == 1
            assert _get(metrics, "/readyz")[0] == 200
            # every record the log has, the start's policy_loaded included (it was one short)
            logged = sum(
                len(day.read_text().splitlines())
                for day in (tmp_path / "state" / "audit").glob("*.jsonl")
            )
            assert _value(samples, "relay_audit_records_total") == logged


def test_a_metrics_port_in_use_stops_the_start(policy_file: Path, tmp_path: Path) -> None:
    """As with a listener's port: the relay says which and does not start, and
    records nothing of a policy that never served."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = taken.getsockname()[1]
        port = free_port()
        policy = _metrics_policy(policy_file, port, free_port(), metrics, workers=2)
        done = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "-c", str(policy)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 71, done.stderr
    assert f"cannot listen for metrics on 127.0.0.1:{metrics}: Address already in use" in (
        done.stderr
    )
    assert "workers serving" not in done.stderr
    audit = load(policy).audit.directory
    assert not audit.exists() or not list(audit.glob("audit-*")), "the state was touched"


def test_a_scraper_that_hangs_up_is_not_a_fault(policy_file: Path, caplog) -> None:
    """A client gone before its answer leaves no traceback in the operational log;
    a fault of the relay's does."""
    from relay.metrics.serve import MetricsServer
    from relay.policy.load import load
    from relay.policy.model import MetricsSettings
    from relay.spool import Spool

    policy = load(configure(policy_file, free_port(), free_port()))
    Spool(policy.queue.directory)  # the state a started relay has
    server = MetricsServer(MetricsSettings("127.0.0.1", free_port()), policy)
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ValueError("a bug")):
            try:
                raise error
            except (BrokenPipeError, ValueError):
                server._http.handle_error(None, ("127.0.0.1", 1))
    finally:
        server.stop()
    faults = [r for r in caplog.records if r.getMessage() == "metrics: a request failed"]
    assert len(faults) == 1 and faults[0].exc_info[0] is ValueError


BURST = 1000  # connections opened at once, each asking for /healthz


def test_a_burst_of_connections_is_answered_not_dropped(policy_file: Path) -> None:
    """At a listen backlog of 5 a burst overflowed the kernel's queue: of 1,000
    health checks at once about 270 were answered within 3 s, a local process
    opening connections in a loop made ``/readyz`` fail; past 32 at once, each
    was closed unanswered."""
    from relay.metrics.serve import MetricsServer
    from relay.policy.load import load
    from relay.policy.model import MetricsSettings
    from relay.spool import Spool

    policy = load(configure(policy_file, free_port(), free_port()))
    Spool(policy.queue.directory)
    server = MetricsServer(MetricsSettings("127.0.0.1", free_port()), policy)
    server.start(lambda: policy)
    try:
        answered = _burst(server.settings.port, BURST, within=60.0)  # a bound, not a target
    finally:
        server.stop()
    assert answered == BURST


def _burst(port: int, count: int, within: float) -> int:
    """How many of ``count`` connections, opened together, had an HTTP answer in time."""
    waiting = selectors.DefaultSelector()
    opened = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            opened.append(sock)
            sock.connect_ex(("127.0.0.1", port))
            waiting.register(sock, selectors.EVENT_WRITE)
        answered, deadline = 0, time.monotonic() + within
        while waiting.get_map() and time.monotonic() < deadline:
            for key, _ in waiting.select(0.1):
                answered += _step(waiting, key.fileobj)  # type: ignore[arg-type]
        return answered
    finally:
        for sock in opened:
            sock.close()


def _step(waiting: selectors.BaseSelector, sock: socket.socket) -> int:
    """The request once connected, then its answer's first bytes: 1 for an answer."""
    if waiting.get_key(sock).events == selectors.EVENT_WRITE:
        with contextlib.suppress(OSError):
            sock.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        waiting.modify(sock, selectors.EVENT_READ)
        return 0
    waiting.unregister(sock)
    try:
        return int(sock.recv(16).startswith(b"HTTP/1.0 "))
    except OSError:
        return 0


def test_silent_connections_give_their_slots_up_to_a_health_check(policy_file: Path) -> None:
    """More connections than the server has slots, none of them sending anything:
    each held its slot for the whole of its timeout, and a health check behind
    them waited as long (at 32 of them it was closed unanswered after 1 s, at
    40 answered after 4.4 s). One silent for half a second gives its slot up
    to the next, and the server still holds no more connections than slots."""
    from relay.metrics.serve import MAX_CLIENTS

    server, policy = _metrics_server(policy_file)
    # those holding the slots silent for over half a second
    answer, took, held = _health_behind_silent(server, policy, MAX_CLIENTS + 8, settle=0.7)
    assert answer == (200, b"ok\n")
    assert took < 2.0, f"answered after {took:.1f}s"
    assert held <= MAX_CLIENTS


MANY_SILENT = 1000  # about 16 s of delay before a health check once


def _timed_health(port: int) -> tuple[tuple[int, bytes], float]:
    """``/healthz``'s answer and the seconds it took, waited for long enough to
    measure a delay rather than give up on it."""
    began = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as answer:
        said = answer.status, answer.read()
    return said, time.monotonic() - began


@pytest.fixture
def files() -> Iterator[None]:
    """Room for both ends of a few thousand connections in this process: 1,024,
    a common soft limit, is too few for them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _metrics_server(policy_file: Path, limit: int | None = None) -> tuple[MetricsServer, Policy]:
    """A metrics server of its own, not started, and its policy; built under an
    open-files limit of ``limit``, which bounds the connections it keeps waiting."""
    import resource

    from relay.metrics import status
    from relay.policy.model import MetricsSettings
    from relay.spool import Spool

    policy = load(configure(policy_file, free_port(), free_port()))
    Spool(policy.queue.directory)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit or soft, hard))
    try:
        server = MetricsServer(MetricsSettings("127.0.0.1", free_port()), policy)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    status.beat()
    return server, policy


def _health_behind_silent(
    server: MetricsServer, policy: Policy, count: int, settle: float
) -> tuple[tuple[int, bytes], float, int]:
    """``/healthz``'s answer, its seconds and the requests the server held, asked
    ``settle`` seconds after ``count`` connections that send nothing; the
    server is stopped after."""
    server.start(lambda: policy)
    address = ("127.0.0.1", server.settings.port)
    silent: list[socket.socket] = []
    try:
        silent.extend(socket.create_connection(address, timeout=5) for _ in range(count))
        time.sleep(settle)  # accepted, or in the kernel's queue
        answer, took = _timed_health(server.settings.port)
        held = len(server._http.open_requests)
    finally:
        for sock in silent:
            sock.close()
        server.stop()
    return answer, took, held


@pytest.mark.usefixtures("files")
def test_many_silent_connections_hold_up_no_health_check(policy_file: Path) -> None:
    """1,000 connections opened at once, none sending anything: a health check
    behind them was answered after 16 s, half a second for every 32, as each
    took a request thread until it was found silent. Waiting for their first
    bytes costs them no thread, and the check is answered at once."""
    server, policy = _metrics_server(policy_file)
    answer, took, _ = _health_behind_silent(server, policy, MANY_SILENT, settle=0.2)
    assert answer == (200, b"ok\n")
    assert took < 2.0, f"answered after {took:.1f}s"


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed it: its end read, nothing to read yet otherwise."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.usefixtures("files")
def test_the_connections_waiting_longest_are_closed_past_the_bound(policy_file: Path) -> None:
    """Connections waiting for their first bytes are files of the relay's: past the
    bound its open-files limit sets (a sixteenth of it), the one waiting longest
    is closed once it has waited half a second, as the next is accepted, and
    the rest wait on (they were cut one every 50 ms from then on, whatever
    their number, the first 36 of 100 in 2.3 s)."""
    from relay.ingress.filelimit import metrics_waiting

    server, policy = _metrics_server(policy_file, 1024)
    most = metrics_waiting(1024)
    server.start(lambda: policy)
    address = ("127.0.0.1", server.settings.port)
    silent: list[socket.socket] = []
    try:
        silent.extend(socket.create_connection(address, timeout=5) for _ in range(most + 36))
        oldest, newest = silent[:36], silent[36:]
        wait_for(lambda: all(_closed(sock) for sock in oldest), timeout=1.5)
        still = sum(not _closed(sock) for sock in newest)
        answer, took = _timed_health(server.settings.port)
    finally:
        for sock in silent:
            sock.close()
        server.stop()
    assert still == most
    assert answer == (200, b"ok\n") and took < 2.0, took


@pytest.mark.usefixtures("files")
def test_a_burst_of_requests_past_the_bound_is_answered_whole(policy_file: Path) -> None:
    """The one waiting longest is closed past the bound only once it has waited
    half a second: closed at once, the requests of a burst were closed before
    they were read, 1,750 of 3,000 answered with nothing."""
    from relay.ingress.filelimit import metrics_waiting

    server, policy = _metrics_server(policy_file, 1024)
    burst = 4 * metrics_waiting(1024)
    address = ("127.0.0.1", server.settings.port)
    clients: list[socket.socket] = []
    try:
        for _ in range(burst):  # in the kernel's queue, each with its request
            client = socket.create_connection(address, timeout=20)
            client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            clients.append(client)
        server.start(lambda: policy)
        answers = []
        for client in clients:
            with client.makefile("rb") as reply:
                answers.append(reply.readline())
    finally:
        for client in clients:
            client.close()
        server.stop()
    assert answers.count(b"HTTP/1.0 200 OK\r\n") == burst, {a: answers.count(a) for a in answers}


def test_what_the_workers_do_as_they_start_is_counted(policy_file: Path, tmp_path: Path) -> None:
    """A message left queued by an upstream outage goes out the moment the relay
    starts again and leaves the queue before anyone scrapes: it is counted,
    under its tenant, which only its queue entry said."""
    port, metrics, sink_port = free_port(), free_port(), free_port()
    policy = _metrics_policy(policy_file, port, sink_port, metrics, workers=2)
    with RelayProcess(policy, port, tmp_path / "first.log") as relay:
        send(port)
        wait_for(lambda: "status=deferred" in relay.log())
    with SinkServer(Sink(), port=sink_port) as sink, RelayProcess(policy, port, tmp_path / "2.log"):
        sink.sink.wait(1)
        wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
        wait_for(
            lambda: _value(_samples(metrics), "relay_deliveries_total", tenant="acme",
                           status="sent") == 1
        )  # fmt: skip
        samples = _samples(metrics)
    assert _value(samples, "relay_deliveries_total", tenant="unknown", status="sent") == 0
    assert _value(samples, "relay_messages_received_total", tenant="acme") == 0


def _answers(port: int, path: str) -> int | None:
    try:
        return _get(port, path)[0]
    except OSError:  # turned away while every slot is taken
        return None


def test_clients_that_trickle_hold_the_slots_for_a_while_only(
    policy_file: Path, tmp_path: Path
) -> None:
    """More trickling clients than the server has slots, each sending a byte now and
    then and never a whole request: each is cut off at the deadline, and the
    health check is answered again."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=1)
        done = threading.Event()

        def trickle() -> None:
            try:
                with socket.create_connection(("127.0.0.1", metrics), timeout=5) as slow:
                    while not done.wait(0.5):
                        slow.sendall(b"X")
            except OSError:
                return  # cut off

        with RelayProcess(policy, port, tmp_path / "relay.log"):
            wait_for(lambda: _answers(metrics, "/healthz") == 200)
            slow = [threading.Thread(target=trickle, daemon=True) for _ in range(40)]
            try:
                for thread in slow:
                    thread.start()
                time.sleep(1.0)
                wait_for(lambda: _answers(metrics, "/healthz") == 200, timeout=30)
                wait_for(lambda: sum(not thread.is_alive() for thread in slow) == len(slow))
            finally:
                done.set()
                for thread in slow:
                    thread.join(timeout=10)


def test_a_client_that_stalls_holds_up_neither_checks_nor_the_stop(
    policy_file: Path, tmp_path: Path
) -> None:
    """One connection sends a byte now and then and never a whole request: the
    health checks and scrapes are answered meanwhile, and SIGTERM stops the
    relay without waiting for that client."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        done = threading.Event()

        def trickle() -> None:
            with socket.create_connection(("127.0.0.1", metrics), timeout=5) as slow:
                slow.sendall(b"GET /metrics HTTP/1.1\r\n")
                while not done.wait(0.5):
                    slow.sendall(b"X")

        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            wait_for(lambda: _get(metrics, "/healthz")[0] == 200)
            slow = threading.Thread(target=trickle, daemon=True)
            slow.start()
            try:
                time.sleep(1.0)  # the trickle has begun
                assert _get(metrics, "/healthz")[:2] == (200, b"ok\n")
                assert _get(metrics, "/readyz")[0] == 200
                assert _value(_samples(metrics), "relay_workers", state="running") == 2
                assert relay.proc is not None
                relay.proc.send_signal(signal.SIGTERM)
                relay.proc.wait(timeout=25)  # the trickle goes on for 60 s if not stopped
                assert relay.proc.returncode == 0
            finally:
                done.set()
                slow.join(timeout=10)


def test_an_unreadable_list_leaves_out_its_gauge_not_the_scrape(
    policy_file: Path, tmp_path: Path
) -> None:
    """The relay refuses mail with 451 while its list cannot be read: exactly when
    the other counts are wanted. The list's gauge is left out, said once in the
    log, and comes back with the list; /readyz says 503 meanwhile (it said 200)."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=1)
        listed = load(policy).suppression
        assert listed is not None
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            listed.file.unlink(missing_ok=True)
            listed.file.mkdir()
            assert _offer(port, "jan@acme.example") == 451
            wait_for(
                lambda: _value(_samples(metrics), "relay_messages_rejected_total",
                               **{"class": "4xx"}) == 1
            )  # fmt: skip
            samples = _samples(metrics)
            assert not any(name == "relay_suppression_list_entries" for name, _ in samples)
            assert _value(samples, "relay_workers", state="running") == 1
            code, body, _ = _get(metrics, "/readyz")  # it takes no mail: not ready for any
            assert code == 503
            said = json.loads(body)["checks"]["suppression"]
            assert said == f"{listed.file} not readable: a directory, not a regular file"
            listed.file.rmdir()
            wait_for(lambda: ("relay_suppression_list_entries", ()) in _samples(metrics))
            assert _get(metrics, "/readyz")[0] == 200
            log = relay.log()
    assert log.count("metrics: the suppression list is left out") == 1
    assert "metrics: the suppression list is read again" in log


def _sockets_of(pid: int) -> set[str]:
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link for link in links if link.startswith("socket:")}


def test_a_worker_started_during_a_request_holds_none_of_its_sockets(
    policy_file: Path, tmp_path: Path
) -> None:
    """The supervisor forks a dead worker's replacement while a client is connected
    to the metrics port: the new worker shares the listeners with the
    supervisor, but holds neither the metrics port nor that connection."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            assert relay.proc is not None
            wait_for(lambda: _answers(metrics, "/healthz") == 200)
            old, dying = _workers(relay)
            with socket.create_connection(("127.0.0.1", metrics), timeout=5):
                time.sleep(0.2)  # accepted, its request awaited
                os.kill(dying, signal.SIGKILL)
                wait_for(lambda: len(set(_workers(relay)) - {old, dying}) == 1, timeout=4)
                (new,) = set(_workers(relay)) - {old, dying}
                time.sleep(0.5)  # past the fork and what the child closes after it
                supervisors_own = _sockets_of(relay.proc.pid) - _sockets_of(old)
                assert len(supervisors_own) >= 2  # the metrics port and the connection
                assert not _sockets_of(new) & supervisors_own


@pytest.fixture
def metrics_here(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, Policy]]:
    """``_metrics_server`` serving, counting from the audit log's end, with one
    worker running: its port and its policy; the state it reports is the
    test's to set."""
    from relay.metrics import status
    from relay.ratelimit import RateCounts
    from relay.tally import Tally

    monkeypatch.setattr(status, "STATUS", status.Status())
    server, policy = _metrics_server(policy_file)
    policy.audit.directory.mkdir(parents=True, exist_ok=True)
    status.workers(1, 1)
    server.begin(RateCounts(1), Tally(1))
    server.start(lambda: policy)
    try:
        yield server.settings.port, policy
    finally:
        server.stop()


def test_a_relay_that_has_started_no_worker_yet_is_not_ready(
    metrics_here: tuple[int, Policy],
) -> None:
    """Between the metrics server's start and the first worker's, no listener
    takes mail: "0 of 0 running" must not read as every worker running."""
    from relay.metrics import status

    port, _ = metrics_here
    assert _get(port, "/readyz")[0] == 200
    status.workers(0, 0)
    code, body, _ = _get(port, "/readyz")
    assert code == 503, body
    assert json.loads(body)["checks"]["workers"] == "0 of 0 running"


def test_a_main_loop_that_has_not_come_round_is_not_healthy(
    metrics_here: tuple[int, Policy],
) -> None:
    from relay.metrics import status

    port, _ = metrics_here
    assert _get(port, "/healthz")[:2] == (200, b"ok\n")
    status.STATUS.beat = time.monotonic() - status.ALIVE_WITHIN - 1
    assert _get(port, "/healthz")[:2] == (503, b"the main loop is stuck\n")


def test_a_tenant_no_longer_in_the_policy_keeps_its_received_count(
    metrics_here: tuple[int, Policy],
) -> None:
    """A reload that takes a tenant out leaves what it sent before on record: its
    series gone read as a reset to Prometheus, and its messages uncounted."""
    from relay.audit import AuditLog
    from tests.test_audit_fixture import received

    port, policy = metrics_here
    assert "initech" not in policy.tenants
    log = AuditLog(policy.audit.directory)
    log.append(received(("Q1", "<1@initech.example>"), "initech", "ann", "invoice", ["x@y"]))
    log.close()
    samples = _samples(port)
    assert _value(samples, "relay_messages_received_total", tenant="initech") == 1
    assert ("relay_messages_received_total", (("tenant", "acme"),)) in samples


def test_the_queue_gauges_give_the_count_size_and_age_of_each_queue(
    metrics_here: tuple[int, Policy],
) -> None:
    from relay.queueid import new_queue_id
    from relay.spool import Spool
    from tests.spoolkit import make_entry

    port, policy = metrics_here
    spool = Spool(policy.queue.directory)
    arrival = time.time() - 3600
    entry = make_entry(new_queue_id(now_ns=int(arrival * 1e9)), arrival=arrival)
    spool.put(entry, b"x" * 5000)
    samples = _samples(port)
    size = spool.message_path(entry.queue_id).stat().st_size
    assert _value(samples, "relay_queue_messages", queue="active") == 1
    assert _value(samples, "relay_queue_bytes", queue="active") == size > 5000
    assert 3600 <= _value(samples, "relay_queue_oldest_message_age_seconds", queue="active") < 3660
    assert _value(samples, "relay_queue_messages", queue="deferred") == 0


def test_a_policy_file_that_cannot_be_read_at_a_reload_shows_as_a_failed_reload(
    policy_file: Path, tmp_path: Path
) -> None:
    """A policy file replaced by something the supervisor will not read (a FIFO)
    was logged as a failed reload while the metric went on saying the last one
    succeeded."""
    port, metrics = free_port(), free_port()
    policy = _metrics_policy(policy_file, port, free_port(), metrics, workers=2)
    good = policy.read_text()
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        wait_for(lambda: f"metrics on http://127.0.0.1:{metrics}/metrics" in relay.log())
        assert _value(_samples(metrics), "relay_config_last_reload_successful") == 1
        policy.unlink()
        os.mkfifo(policy)
        relay.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in relay.log())
        assert f"reload failed: {policy} is a FIFO, not a regular file" in relay.log()
        assert _value(_samples(metrics), "relay_config_last_reload_successful") == 0
        policy.unlink()
        policy.write_text(good)
        relay.signal(signal.SIGHUP)
        wait_for(lambda: "policy reloaded" in relay.log())
        assert _value(_samples(metrics), "relay_config_last_reload_successful") == 1


def test_a_listener_the_free_space_is_too_small_for_leaves_the_others_ready(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz weighs the free space against the smallest listener's reserve:
    one taking messages of up to 1 TiB refuses every MAIL (503 alone), but
    beside it one that takes mail makes the relay ready for mail (200)."""
    from relay.metrics import status
    from relay.ratelimit import RateCounts
    from relay.tally import Tally

    huge = f"    auth: optional\n    max_message_size: {2**40}\n"
    small = (
        f"  - name: small\n    address: 127.0.0.1\n    port: {free_port()}\n    auth: optional\n"
    )
    for listeners, ready in (("", False), (small, True)):
        text = policy_file.read_text()
        policy_file.write_text(text.replace("    auth: optional\n", huge + listeners, 1))
        monkeypatch.setattr(status, "STATUS", status.Status())
        server, policy = _metrics_server(policy_file)
        policy.audit.directory.mkdir(parents=True, exist_ok=True)
        status.workers(1, 1)
        server.begin(RateCounts(1), Tally(1))
        server.start(lambda policy=policy: policy)
        try:
            code, body, _ = _get(server.settings.port, "/readyz")
        finally:
            server.stop()
        policy_file.write_text(text)
        checks = json.loads(body)["checks"]
        assert (code == 200, checks["queue"] == "writable") == (ready, ready), body
        if not ready:
            assert checks["queue"].endswith("mail is refused (452 4.3.1)"), body


def test_a_head_request_has_no_body_and_a_query_is_no_other_path(
    metrics_here: tuple[int, Policy],
) -> None:
    """HEAD gets the headers alone: a body after them is read by the client as
    the start of its next answer. A scrape configuration with ``params``
    asks for ``/metrics?...``, which is ``/metrics`` still."""
    port, _ = metrics_here
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"HEAD /healthz HTTP/1.0\r\n\r\n")
        answer = b""
        while data := client.recv(4096):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and b"\r\nContent-Length: 3" in head, answer
    assert body == b"", answer
    code, body, kind = _get(port, "/metrics?module=relay")
    assert code == 200 and kind.startswith("text/plain"), body
    assert b"relay_build_info" in body


def test_bounces_and_complaints_are_counted_apart_under_the_messages_tenant(
    metrics_here: tuple[int, Policy],
) -> None:
    """A rise in complaints is what gets a platform address blocklisted; read
    as bounces it raised the wrong alert, if any."""
    from relay.audit import AuditLog, events
    from tests.test_audit_fixture import received

    port, policy = metrics_here
    log = AuditLog(policy.audit.directory)
    log.append(received(("Q1", "<1@acme.example>"), "acme", "jan", "invoice", ["x@y.example"]))
    for dsn in ("5.1.1", "5.2.2"):
        log.append(
            events.bounced(
                queue_id="Q1", message_id="<1@acme.example>", recipient="x@y.example",
                dsn_status=dsn, diagnostic=None,
            )
        )  # fmt: skip
    log.append(
        events.complained(
            queue_id="Q1", message_id="<1@acme.example>", recipient="x@y.example",
            feedback_type="abuse",
        )
    )  # fmt: skip
    log.close()
    samples = _samples(port)
    assert _value(samples, "relay_bounces_total", tenant="acme") == 2
    assert _value(samples, "relay_complaints_total", tenant="acme") == 1


def test_a_part_left_out_is_said_again_when_its_error_changes(
    metrics_here: tuple[int, Policy], caplog: pytest.LogCaptureFixture
) -> None:
    """Said once while it stays the same, not for every scrape; a new cause is
    news, or the log names one that has been put right."""
    import logging

    port, policy = metrics_here
    assert policy.suppression is not None
    listed = policy.suppression.file
    listed.unlink(missing_ok=True)
    listed.mkdir()
    with caplog.at_level(logging.INFO, logger="relay"):
        _samples(port)
        _samples(port)
        listed.rmdir()
        listed.symlink_to(listed.name)  # a link to itself
        _samples(port)
        listed.unlink()
        assert ("relay_suppression_list_entries", ()) in _samples(port)
    said = [r.getMessage() for r in caplog.records if "suppression list" in r.getMessage()]
    assert len(said) == 3, said
    assert said[0].endswith("a directory, not a regular file"), said
    assert said[1].endswith("Too many levels of symbolic links"), said
    assert said[2] == "metrics: the suppression list is read again"


def test_an_audit_log_that_cannot_be_read_leaves_out_its_counts_not_the_scrape(
    metrics_here: tuple[int, Policy],
) -> None:
    """Its directory replaced by a file, the scrape failed whole (500): the
    queue, the workers and the free space went unseen with it."""
    port, policy = metrics_here
    audit = policy.audit.directory
    audit.rename(audit.with_name("audit.away"))
    audit.write_text("not a directory\n")
    try:
        samples = _samples(port)
    finally:
        audit.unlink()
        audit.with_name("audit.away").rename(audit)
    assert not any(name == "relay_messages_received_total" for name, _ in samples)
    assert _value(samples, "relay_workers", state="running") == 1
    assert ("relay_queue_messages", (("queue", "active"),)) in samples
    assert ("relay_messages_received_total", (("tenant", "acme"),)) in _samples(port)
