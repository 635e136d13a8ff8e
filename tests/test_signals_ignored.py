"""SIGUSR1 and SIGUSR2, which logrotate set-ups send out of habit, end nothing."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess, wait_for
from tests.sink import free_port
from tests.test_queue_e2e import configure, send


@pytest.mark.parametrize("workers", ["1", "2"])
def test_usr1_and_usr2_are_logged_and_ignored(
    policy_file: Path, tmp_path: Path, workers: str
) -> None:
    """They ended the relay by their default action, with no line from the process
    that died (the workers only said the supervisor was gone)."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), f"workers: {workers}\n")
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        assert relay.proc is not None
        pids = [relay.proc.pid, *map(int, re.findall(r"started \(pid (\d+)\)", relay.log()))]
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGUSR2)
        wait_for(lambda: relay.log().count("SIGUSR2 ignored") == len(pids))
        assert relay.log().count("SIGUSR1 ignored") == len(pids)
        assert send(port)  # its queue ID: accepted
        assert relay.proc.poll() is None
        assert relay.stop() == 0
    assert "supervisor is gone" not in relay.log()
