"""The relay's open-file limit: each connection, and each accepted message until
its delivery begins, holds a file. At a soft limit of 1024 (the default most
systems start services with) libuv accepts and closes the connections past it,
and neither the client nor the log says why; the relay raises the soft limit
to the hard one at start, and says so when the hard one is low."""

from __future__ import annotations

import resource
import smtplib
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relay.ingress.filelimit import FileRoom
from tests.ingress_harness import Raw, Relay
from tests.minimal_policy import listener
from tests.relayproc import RelayProcess
from tests.sink import free_port
from tests.test_queue_e2e import SMALL, configure, send

CONNECTIONS = 200  # well past the soft limit the relay is started with


def greeted(port: int, count: int, then: Callable[[], None] = lambda: None) -> list[bytes]:
    """The first line each of ``count`` connections, held open together, gets;
    ``then`` is done while they are open."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        replies = [connection.recv(512).split(b"\r\n")[0] for connection in held]
        then()
        return replies
    finally:
        for connection in held:
            connection.close()


def test_a_low_soft_limit_is_raised_and_every_connection_is_served(
    policy_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    policy = configure(policy_file, port, free_port(), "workers: 1\n")  # all in one process
    with RelayProcess(policy, port, tmp_path / "relay.log", open_files=(64, 2048)) as relay:
        replies = greeted(port, CONNECTIONS)
        assert send(port)  # and a whole transaction after them
    assert len(replies) == CONNECTIONS
    assert all(reply.startswith(b"220 ") for reply in replies), set(replies)
    assert "open files: limit raised from 64 to 2048" in relay.log()


def test_a_hard_limit_too_low_to_serve_stops_the_start(policy_file: Path) -> None:
    """Under 28 files the relay started, took connections and answered every
    message 451 (``Queue write failed``), its warning promising a connection a
    worker; under 20 it failed at the audit log or with a traceback."""
    policy = configure(policy_file, free_port(), free_port())

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    done = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(policy)],
        capture_output=True, text=True, timeout=60, preexec_fn=limited, check=False,
    )  # fmt: skip
    assert done.returncode == 71, done.stderr
    assert "open files: a limit of 40 is too few to serve" in done.stderr
    assert not (policy.parent / "state").exists()  # nothing of the state touched
    checked = relay_cli_limited(policy, 40)  # the unit's ExecStartPre stops there first
    assert checked.returncode == 71, checked.stderr
    assert ": open files: a limit of 40 is too few to serve" in checked.stderr
    assert checked.stderr.rstrip().endswith("; relay serve would not start")


def test_a_low_hard_limit_is_reported(policy_file: Path, tmp_path: Path) -> None:
    port = free_port()
    policy = configure(policy_file, port, free_port())
    with RelayProcess(policy, port, tmp_path / "relay.log", open_files=(512, 512)) as relay:
        assert send(port)
    assert "open files: limited to 512" in relay.log()
    assert "LimitNOFILE" in relay.log()


FLOOD = 300  # well past what a limit of 128 leaves two workers room for
OUT_OF_FILES = b"421 4.3.2 Out of file descriptors for more connections, try again later"


def test_past_its_room_a_worker_refuses_with_421_and_open_sessions_still_queue(
    policy_file: Path, tmp_path: Path
) -> None:
    """At 128 open files connections past the limit were closed with no reply,
    and a session already open got 451 for its message (the spool could not
    open its file); no metric or log line said why."""
    port, metrics = free_port(), free_port()
    extra = f"workers: 2\nmetrics: {{address: 127.0.0.1, port: {metrics}}}\n"
    policy = configure(policy_file, port, free_port(), extra)
    with RelayProcess(policy, port, tmp_path / "relay.log", open_files=(128, 128)) as relay:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as session:
            session.ehlo()
            replies = greeted(port, FLOOD, then=lambda: _transaction(session))
        refused = _refused(metrics)
    assert all(r.startswith(b"220 ") or r == OUT_OF_FILES for r in replies), set(replies)
    assert refused == replies.count(OUT_OF_FILES) > 0
    said = relay.log().count("out of file descriptors for more connections")
    assert 1 <= said <= 2  # once in each worker, not a line a connection
    assert "max_connections" not in relay.log()  # the test policy sets none


def test_limits_a_low_open_files_limit_leaves_out_of_reach_are_said(
    policy_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    listener = "    auth: optional\n"
    limits = listener + "    max_connections: 1000\n    max_connections_per_client: 50\n"
    policy_file.write_text(policy_file.read_text().replace(listener, limits, 1))
    policy = configure(policy_file, port, free_port(), "workers: 2\n")
    with RelayProcess(policy, port, tmp_path / "relay.log", open_files=(128, 128)) as relay:
        assert send(port)
    log = relay.log()
    assert "listener local: max_connections 1000 cannot be reached" in log
    assert "max_connections_per_client 50 cannot be reached" in log
    assert (
        "at most 6 connections a worker, 12 in all with 2 workers, and the rest are refused" in log
    )
    checked = relay_cli_limited(policy, 128)
    assert checked.returncode == 0, checked.stderr
    assert "max_connections 1000 cannot be reached under an open-files limit of 128" in (
        checked.stderr
    )


def relay_cli_limited(policy: Path, files: int) -> subprocess.CompletedProcess[str]:
    """``relay check`` started under an open-files limit, as in the unit's ExecStartPre."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", str(policy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files)),
    )


def _transaction(session: smtplib.SMTP) -> None:
    session.mail("jan@acme.example")
    session.rcpt("one@example.org")
    code, reply = session.data(SMALL)
    assert code == 250, reply


def _refused(metrics: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
        body = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "relay_smtp_connections_refused_total"
        and sample.labels.get("reason") == "out_of_files"
    )


def test_a_worker_takes_connections_up_to_its_room_and_refuses_the_next() -> None:
    """Its room is the connections it may have open: the last place taken, not
    refused one early (a plain connection is among those open as it is judged)."""
    with Relay([listener()]) as relay:
        assert relay.ingress is not None
        relay.ingress.files = FileRoom(1024, 2)
        with Raw(relay.port) as first, Raw(relay.port) as second:
            assert first.greeting[0].startswith("220 ")
            assert second.greeting[0].startswith("220 ")
            with Raw(relay.port) as third:
                assert third.greeting == [OUT_OF_FILES.decode()]
