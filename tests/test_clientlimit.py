"""``max_connections_per_client``: the open connections counted across workers, and a real
relay with two workers refusing the connection past the limit."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.ingress.clientlimit import ClientCounts, counted_as
from tests import ingress_harness
from tests.minimal_policy import listener
from tests.test_workers import Relay, configure, free_port, serving

BURST = 200
ALL_BUSY = b"421 4.3.2 Too many connections, try again later\r\n"
REFUSED = b"421 4.7.0 Too many connections from 127.0.0.1, try again later\r\n"


def test_every_worker_reads_what_the_others_have_open() -> None:
    counts = ClientCounts(2)
    first, second = counts.row(0), counts.row(1)
    assert first.enter("local", "192.0.2.7") and first.enter("local", "192.0.2.7")
    assert second.enter("local", "192.0.2.7")
    assert second.enter("submission", "192.0.2.7")
    assert first.open("local", "192.0.2.7") == second.open("local", "192.0.2.7") == 3
    assert first.open("submission", "192.0.2.7") == 1  # each listener has its own count
    second.leave("local", "192.0.2.7")
    assert first.open("local", "192.0.2.7") == 2
    counts.row(0).clear()  # worker 0's replacement: its connections ended with it
    assert second.open("local", "192.0.2.7") == 0
    assert second.open("submission", "192.0.2.7") == 1


@pytest.mark.parametrize(
    ("client", "counted"),
    [
        ("2001:db8:1:2::7", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("192.0.2.7", "192.0.2.7"),
        ("?", "?"),
    ],
)
def test_an_ipv6_client_is_counted_by_its_64_a_mapped_one_as_ipv4(
    client: str, counted: str
) -> None:
    assert counted_as(client) == counted


def test_connections_from_another_address_of_the_64_count_for_the_client() -> None:
    """Counted by address, a host with a /64 opened a connection from each of
    as many addresses as it liked, and met no limit."""
    clients = ClientCounts(1).row(0)
    limited = replace(listener(address="::1", allow=("::1/128",)), max_connections_per_client=1)
    with ingress_harness.Relay([limited], clients=clients) as relay:
        assert clients.enter(limited.name, counted_as("::2"))  # open from ::2 meanwhile
        with ingress_harness.Raw(relay.port, host="::1") as raw:
            assert raw.greeting == ["421 4.7.0 Too many connections from ::/64, try again later"]
        clients.leave(limited.name, counted_as("::2"))
        with ingress_harness.Raw(relay.port, host="::1") as raw:
            assert raw.greeting[0].startswith("220 ")


def test_the_refusal_s_log_line_names_the_64_that_had_the_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It said the connections were open from the address, which had none."""
    caplog.set_level(logging.WARNING, logger="relay")
    clients = ClientCounts(1).row(0)
    limited = replace(listener(address="::1", allow=("::1/128",)), max_connections_per_client=1)
    with ingress_harness.Relay([limited], clients=clients) as relay:
        assert clients.enter(limited.name, counted_as("::2"))
        with ingress_harness.Raw(relay.port, host="::1") as raw:
            assert raw.greeting[0].startswith("421 ")
    said = [r.getMessage() for r in caplog.records if " open from " in r.getMessage()]
    assert said == [
        f"refused client=::1 on listener {limited.name}: 1 connection open from ::/64"
        " already, its max_connections_per_client"
    ]


def _relay(policy_file: Path, tmp_path: Path, limits: str) -> Iterator[Relay]:
    port = free_port()
    path = configure(policy_file, port)
    text = path.read_text().replace(f"    port: {port}\n", f"    port: {port}\n{limits}", 1)
    path.write_text(text)
    with serving(path, port, tmp_path / "relay.log") as running:
        yield running


@pytest.fixture
def limited(policy_file: Path, tmp_path: Path) -> Iterator[Relay]:
    yield from _relay(policy_file, tmp_path, "    max_connections_per_client: 3\n")


@pytest.fixture
def busy(policy_file: Path, tmp_path: Path) -> Iterator[Relay]:
    limits = "    max_connections_per_client: 3\n    max_connections: 4\n"
    yield from _relay(policy_file, tmp_path, limits)


def connect(port: int, source: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    """A connection from ``source`` and the first line the relay said on it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        reply += chunk
    return sock, reply


def test_past_the_limit_a_connection_is_told_421_whichever_worker_takes_it(
    limited: Relay,
) -> None:
    """Counted per worker, two workers would take up to six."""
    opened = [connect(limited.port) for _ in range(6)]
    try:
        greeted = [sock for sock, reply in opened if reply.startswith(b"220 ")]
        refused = [reply for _, reply in opened if not reply.startswith(b"220 ")]
        assert len(greeted) == 3
        assert refused == [REFUSED] * 3
        said = (
            "WARNING refused client=127.0.0.1 on listener local: 3 connections open from it"
            " already, its max_connections_per_client"
        )
        assert said in limited.log()
        greeted[0].sendall(b"QUIT\r\n")
        greeted[0].recv(512)
        greeted[0].close()
        for _ in range(100):  # its close reaches the relay a moment later
            sock, reply = connect(limited.port)
            opened.append((sock, reply))
            if reply.startswith(b"220 "):
                break
        assert reply.startswith(b"220 "), reply
    finally:
        for sock, _ in opened:
            sock.close()


def test_past_max_connections_every_client_is_told_421_until_one_ends(busy: Relay) -> None:
    """Four open on the listener, whichever workers hold them: a client within its
    own limit is refused too, and taken again once a connection has ended."""
    opened = [connect(busy.port) for _ in range(4)]  # the 4th: from it, past its 3
    try:
        assert [reply[:4] for _, reply in opened] == [b"220 "] * 3 + [REFUSED[:4]]
        assert opened[3][1] == REFUSED
        opened.append(connect(busy.port, "127.0.0.2"))
        assert opened[-1][1].startswith(b"220 ")
        opened.append(connect(busy.port, "127.0.0.3"))
        assert opened[-1][1] == ALL_BUSY
        said = (
            "WARNING refused client=127.0.0.3 on listener local: 4 connections open on it"
            " already, its max_connections"
        )
        assert said in busy.log()
        opened[0][0].close()
        for _ in range(100):  # its close reaches the relay a moment later
            opened.append(connect(busy.port, "127.0.0.3"))
            if opened[-1][1].startswith(b"220 "):
                break
        assert opened[-1][1].startswith(b"220 "), opened[-1][1]
    finally:
        for sock, _ in opened:
            sock.close()


def test_a_client_refused_for_its_own_limit_takes_no_place_from_the_others(busy: Relay) -> None:
    """A client stuck reconnecting at its own limit: its refused connections were
    counted on the listener too, until each ended, and others were told the
    relay was full while it was not (3 held of 4)."""
    held = [connect(busy.port, "127.0.0.2") for _ in range(3)]
    flooding = threading.Event()

    def flood() -> None:
        while not flooding.is_set():
            try:
                sock, reply = connect(busy.port, "127.0.0.2")
            except ConnectionResetError:  # closed by the relay before it was read
                continue
            sock.close()
            assert reply in (REFUSED.replace(b".1,", b".2,"), b""), reply

    threads = [threading.Thread(target=flood) for _ in range(8)]
    try:
        assert all(reply.startswith(b"220 ") for _, reply in held)
        for thread in threads:
            thread.start()
        replies = [quit_after_greeting(busy.port, "127.0.0.3") for _ in range(40)]
    finally:
        flooding.set()
        for thread in threads:
            thread.join(10)
        for sock, _ in held:
            sock.close()
    assert all(reply.startswith(b"220 ") for reply in replies), set(replies)


def quit_after_greeting(port: int, source: str) -> bytes:
    """The greeting, then QUIT and the relay's close: its place is free again."""
    sock, reply = connect(port, source)
    with sock:
        if reply.startswith(b"220 "):
            sock.sendall(b"QUIT\r\n")
            while sock.recv(512):
                pass
    return reply


def test_a_burst_taken_by_both_workers_at_once_stays_within_the_limit(limited: Relay) -> None:
    """A burst of one client's connections, all held open, spread over both
    workers as they arrive: never more greeted than the limit, whichever
    worker took each."""
    for _ in range(3):
        greetings = asyncio.run(_burst(limited.port, BURST))
        greeted = sum(line.startswith(b"220 ") for line in greetings)
        assert 1 <= greeted <= 3, greeted
        assert all(line in (REFUSED, b"") or line.startswith(b"220 ") for line in greetings)
        limited.wait_for(lambda: connect_and_quit(limited.port), "the burst's connections gone")


async def _burst(port: int, count: int) -> list[bytes]:
    """``count`` connections at once, each held until all are answered; their first lines."""
    opened = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(count))
    )
    try:
        return await asyncio.gather(
            *(asyncio.wait_for(reader.readline(), 10) for reader, _ in opened)
        )
    finally:
        for _, writer in opened:
            writer.close()


def connect_and_quit(port: int) -> bool:
    """Whether a connection was greeted now (and then ended at once)."""
    sock, reply = connect(port)
    with sock:
        return reply.startswith(b"220 ")


def test_workers_killed_with_their_connections_leave_no_count_behind(limited: Relay) -> None:
    opened = [connect(limited.port) for _ in range(3)]
    try:
        assert all(reply.startswith(b"220 ") for _, reply in opened)
        workers = {index: pid for index, pid in limited.started()}
        for pid in workers.values():
            os.kill(pid, signal.SIGKILL)
        limited.wait_for(lambda: limited.log().count("was killed by SIGKILL") == 2, "reaped")
        sock, reply = connect(limited.port)  # waits in the backlog for a new worker
        opened.append((sock, reply))
        assert reply.startswith(b"220 "), reply  # the dead workers' three are gone
    finally:
        for sock, _ in opened:
            sock.close()


def test_a_leave_with_nothing_counted_counts_nothing() -> None:
    """A count never goes below none: a leave too many was a ValueError from the
    shared table's unsigned words, and the next connection not counted right."""
    row = ClientCounts(1).row(0)
    row.leave("local", "192.0.2.1")
    assert row.enter("local", "192.0.2.1")
    row.leave("local", "192.0.2.1")
    row.leave("local", "192.0.2.1")
    assert row.open("local", "192.0.2.1") == 0
    assert row.enter("local", "192.0.2.1")
    assert row.open("local", "192.0.2.1") == 1
