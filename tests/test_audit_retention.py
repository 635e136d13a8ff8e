"""Retention in a real relay whose clock starts far ahead of its audit log."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess
from tests.sink import SinkServer, free_port
from tests.test_queue_e2e import configure, relay_cli, send

FAKETIME = shutil.which("faketime")


def _a_year_ahead() -> dict[str, str]:
    """The environment starting a process with its wall clock 365 days on: faketime's
    own, without the wrapper process, which would take the SIGTERM that stops the relay."""
    assert FAKETIME is not None
    preload = subprocess.run(
        [FAKETIME, "-f", "+0d", sys.executable, "-c", "import os; print(os.environ['LD_PRELOAD'])"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    return {**os.environ, "LD_PRELOAD": preload, "FAKETIME": "+365d"}


@pytest.mark.skipif(FAKETIME is None, reason="needs faketime")
def test_a_start_with_the_clock_a_year_ahead_deletes_no_audit_history(
    policy_file: Path, tmp_path: Path
) -> None:
    """A VM booting with a bad RTC, before NTP: the records are minutes old."""
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port, "audit: {retention_days: 2}\n")
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            send(port)
        with RelayProcess(policy, port, tmp_path / "ahead.log", env=_a_year_ahead()) as ahead:
            log = ahead.log()
    assert "deleted audit-" not in log, log[-3000:]
    assert "is more than retention_days (2) past the log's records of" in log, log[-3000:]
    done = relay_cli(policy, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deleted by retention" not in done.stdout + done.stderr
