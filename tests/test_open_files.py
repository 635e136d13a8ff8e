"""The relay's open-file limit: each connection, and each accepted message until
its delivery begins, holds a file. At a soft limit of 1024 (the default most
systems start services with) libuv accepts and closes the connections past it,
and neither the client nor the log says why; the relay raises the soft limit
to the hard one at start, and says so when the hard one is low."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.relayproc import RelayProcess
from tests.sink import free_port
from tests.test_queue_e2e import configure, send

CONNECTIONS = 200  # well past the soft limit the relay is started with


def greeted(port: int, count: int) -> list[bytes]:
    """The first line each of ``count`` connections, held open together, gets."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        return [connection.recv(512).split(b"\r\n")[0] for connection in held]
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


def test_a_low_hard_limit_is_reported(policy_file: Path, tmp_path: Path) -> None:
    port = free_port()
    policy = configure(policy_file, port, free_port())
    with RelayProcess(policy, port, tmp_path / "relay.log", open_files=(512, 512)) as relay:
        assert send(port)
    assert "open files: limited to 512" in relay.log()
    assert "LimitNOFILE" in relay.log()
