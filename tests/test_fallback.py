"""Failover between upstreams end to end: a real relay process whose upstream
``main`` names ``backup`` in its ``fallback`` list, both real servers on
loopback (or nothing listening where one is down)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dkimtools import dkimpy_verify
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_queue_e2e import audit_records, relay_cli, send

SUSPENSION = 10.0  # first_retry: longer than the waits below that say "without waiting"


def _smtp(name: str, port: int, extra: str = "") -> str:
    return (
        f"  {name}:\n    type: smtp\n    host: 127.0.0.1\n    port: {port}\n"
        f"    tls: none\n    timeout: 5\n{extra}"
    )


def _configure(
    policy_file: Path,
    relay_port: int,
    main: int,
    backup: int,
    first_retry: float = 1.0,
    extra: str = "",
) -> Path:
    text = policy_file.read_text().replace("port: 2525", f"port: {relay_port}")
    upstreams = _smtp("main", main, "    fallback: [backup]\n") + _smtp("backup", backup)
    text = text.replace("  default:\n    type: directory\n    path: outbox\n", upstreams)
    text = text.replace("upstream: default", "upstream: main")
    most = max(2.0, first_retry)
    text += f"queue: {{first_retry: {first_retry}, max_retry: {most}, lifetime: 3600}}\n"
    text += extra
    policy_file.write_text(text)
    return policy_file


class Greets421:
    """A smarthost in maintenance: every connection is answered ``421`` at its
    greeting and closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                self.connections += 1
                conn.sendall(b"421 4.3.2 Service not available, closing channel\r\n")

    def __enter__(self) -> Greets421:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture
def ports() -> tuple[int, int, int]:
    return free_port(), free_port(), free_port()


@pytest.fixture
def backup(ports: tuple[int, int, int]) -> Iterator[SinkServer]:
    with SinkServer(port=ports[2]) as server:
        yield server


def _delivered(policy: Path, queue_id: str) -> list[dict]:
    return [r for r in audit_records(policy, queue_id) if r["event"] == "delivered"]


def _queue_empty(policy: Path) -> bool:
    return relay_cli(policy, "queue", "list").stdout.strip() == "Mail queue is empty"


def test_an_upstream_not_listening_fails_over_to_its_fallback(
    policy_file: Path,
    tmp_path: Path,
    ports: tuple[int, int, int],
    backup: SinkServer,
    dns_records: dict[str, str],
) -> None:
    port, main, _ = ports
    policy = _configure(policy_file, port, main, backup.port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port)
        (got,) = backup.sink.wait(1)
        wait_for(lambda: _queue_empty(policy))
        time.sleep(1.5)  # a retry's time: nothing is sent again
        log = relay.log()
    assert len(backup.sink.messages) == 1
    assert got.rcpt_tos == ["one@example.org"]
    assert dkimpy_verify(got.data, dns_records)
    (record,) = _delivered(policy, queue_id)
    assert record["upstream"] == "backup"
    assert f"{queue_id}: to=<one@example.org>, relay=backup," in log
    said = re.search(rf"{queue_id}: upstream main unusable \((.*)\): trying fallback backup", log)
    assert said is not None
    assert said.group(1).startswith(f"451 4.4.1 Upstream main (127.0.0.1:{main}):")
    assert "upstream main suspended:" in log
    assert "the others go through fallback backup" in log


def test_a_421_greeting_fails_over_to_the_fallback(
    policy_file: Path, tmp_path: Path, ports: tuple[int, int, int], backup: SinkServer
) -> None:
    port, main, _ = ports
    policy = _configure(policy_file, port, main, backup.port)
    with Greets421(main) as refusing, RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port)
        backup.sink.wait(1)
        wait_for(lambda: _queue_empty(policy))
        log = relay.log()
    assert refusing.connections >= 1
    assert len(backup.sink.messages) == 1
    assert _delivered(policy, queue_id)[0]["upstream"] == "backup"
    assert re.search(rf"{queue_id}: upstream main unusable \(451 .*421.*\): trying fallback", log)


def test_a_recipients_refusal_is_about_the_message_not_the_host(
    policy_file: Path, tmp_path: Path, ports: tuple[int, int, int], backup: SinkServer
) -> None:
    """As Postfix: a 5xx or 4xx to RCPT is the upstream's answer for that
    recipient; the fallback is for an upstream that cannot be used at all."""
    port, main, _ = ports
    refusing = Sink(
        refuse={
            "gone@example.org": "550 5.1.1 No such user",
            "full@example.org": "450 4.2.2 Mailbox full",
        }
    )
    policy = _configure(policy_file, port, main, backup.port)
    rcpts = ("gone@example.org", "full@example.org", "one@example.org")
    primary = SinkServer(refusing, port=main)
    with primary, RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port, rcpts=rcpts)
        wait_for(lambda: relay.log().count("to=<full@example.org>, relay=main,") >= 2)
        log = relay.log()
    assert [m.rcpt_tos for m in primary.sink.messages if "one@example.org" in m.rcpt_tos] == [
        ["one@example.org"]
    ]
    assert backup.sink.messages == []
    assert f"{queue_id}: to=<gone@example.org>, relay=main," in log
    assert re.search(rf"{queue_id}: to=<gone@example.org>, relay=main, .*status=bounced", log)
    assert re.search(rf"{queue_id}: to=<full@example.org>, relay=main, .*status=deferred", log)
    assert "trying fallback" not in log
    assert "suspended" not in log


def test_while_suspended_mail_goes_through_the_fallback_then_back(
    policy_file: Path, tmp_path: Path, ports: tuple[int, int, int], backup: SinkServer
) -> None:
    """Mail does not wait for the suspension's ``first_retry``: it goes through
    the fallback. The suspension's one try still goes to ``main``: once that
    reaches it, mail goes there again."""
    port, main, _ = ports
    # one worker: each suspends on its own, and one suspension is what is looked at
    policy = _configure(policy_file, port, main, backup.port, SUSPENSION, "workers: 1\n")
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        first = send(port)
        backup.sink.wait(1)
        began = time.monotonic()
        ids = [send(port) for _ in range(4)]
        backup.sink.wait(5, timeout=SUSPENSION / 2)
        assert time.monotonic() - began < SUSPENSION / 2
        wait_for(lambda: _queue_empty(policy))
        for queue_id in [first, *ids]:
            (record,) = _delivered(policy, queue_id)
            assert (record["upstream"], record["attempts"]) == ("backup", 1)
        log = relay.log()
        # said for the try that suspended it, not again for each message that followed
        assert log.count("WARNING upstream main suspended:") == 1
        assert log.count("trying fallback backup") == 1
        with SinkServer(port=main) as primary:
            time.sleep(SUSPENSION - (time.monotonic() - began) + 0.5)  # the wait is over
            tried = send(port)
            primary.sink.wait(1)
            wait_for(lambda: "upstream main reached again" in relay.log())
            again = send(port)
            primary.sink.wait(2)
            wait_for(lambda: _queue_empty(policy))
    assert len(backup.sink.messages) == 5
    assert _delivered(policy, tried)[0]["upstream"] == "main"
    assert _delivered(policy, again)[0]["upstream"] == "main"


def test_with_both_down_mail_is_deferred_saying_so_and_kept(
    policy_file: Path, tmp_path: Path, ports: tuple[int, int, int]
) -> None:
    port, main, backup_port = ports
    policy = _configure(policy_file, port, main, backup_port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port)
        wait_for(lambda: "status=deferred" in relay.log())
        line = next(x for x in relay.log().splitlines() if "status=deferred" in x)
        listed = relay_cli(policy, "queue", "list").stdout
        with SinkServer(port=backup_port) as backup:
            (got,) = backup.sink.wait(1, timeout=20)
            wait_for(lambda: _queue_empty(policy))
            time.sleep(1.5)  # a retry's time: nothing is sent again
    assert queue_id in listed
    assert f"{queue_id}: to=<one@example.org>, relay=main," in line
    reply = line.split("status=deferred (", 1)[1]
    assert reply.startswith(f"451 4.4.1 Upstream main (127.0.0.1:{main}):")
    assert f"; fallback backup: 451 4.4.1 Upstream backup (127.0.0.1:{backup_port}):" in reply
    assert got.rcpt_tos == ["one@example.org"]
    assert len(backup.sink.messages) == 1
    assert _delivered(policy, queue_id)[0]["upstream"] == "backup"
