"""A FIFO where the suppression list should be: its open waits for a writer,
and held the relay's start, its workers, /readyz and the tools for ever. Each
is bounded here, and the FIFO released at the end, so the code before the
fix fails rather than hangs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from relay.policy.load import load
from tests.relayproc import RelayProcess
from tests.sink import Sink, SinkServer, free_port
from tests.test_metrics import _get, _metrics_policy, _offer
from tests.test_queue_e2e import configure

ROOT = Path(__file__).parent.parent
SAID = "a FIFO, not a regular file"


@contextlib.contextmanager
def fifo_listed(policy: Path) -> Iterator[Path]:
    """The policy's suppression list made a FIFO; whatever still waits on it is
    let go at the end."""
    suppression = load(policy).suppression
    assert suppression is not None
    listed = suppression.file
    listed.parent.mkdir(parents=True, exist_ok=True)
    listed.unlink(missing_ok=True)
    os.mkfifo(listed)
    try:
        yield listed
    finally:
        with contextlib.suppress(OSError):  # no reader waiting: nothing to let go
            os.close(os.open(listed, os.O_WRONLY | os.O_NONBLOCK))


def relay_cli(policy: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args[:2], "-c", str(policy), *args[2:]],
        capture_output=True, text=True, timeout=20, check=False, cwd=ROOT,
    )  # fmt: skip


def test_a_relay_started_on_a_fifo_exits_saying_what_it_is(
    policy_file: Path, tmp_path: Path
) -> None:
    """Not left waiting at its start: it exits as for a state directory it
    cannot open, which systemd sees fail."""
    port = free_port()
    policy = configure(policy_file, port, free_port())
    with fifo_listed(policy) as listed:
        served = relay_cli(policy, "serve")
    assert served.returncode == 73, served.stderr
    said = f"cannot open the state directory: cannot write the suppression list {listed}: {SAID}"
    assert said in served.stderr


def test_a_fifo_made_while_it_runs_refuses_mail_and_readyz_answers(
    policy_file: Path, tmp_path: Path
) -> None:
    """The message's worker and the health check's thread each waited for ever."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=1)
        with (
            RelayProcess(policy, port, tmp_path / "relay.log") as relay,
            fifo_listed(policy) as listed,
        ):
            code, body, _ = _get(metrics, "/readyz")
            offered = _offer(port, "jan@acme.example")
            log = relay.log()
    assert code == 503
    assert json.loads(body)["checks"]["suppression"] == f"{listed} not readable: {SAID}"
    assert offered == 451
    assert f"cannot read the suppression list {listed}: {SAID}" in log
    assert not sink.sink.messages


def test_a_reload_with_a_fifo_for_a_list_is_taken_and_says_what_it_is(
    policy_file: Path, tmp_path: Path
) -> None:
    """The reload's look for entries of tenants the policy no longer has waited
    for ever: ``systemctl reload`` hung, and the stop after it too."""
    port = free_port()
    policy = configure(policy_file, port, free_port())
    with (
        RelayProcess(policy, port, tmp_path / "relay.log") as relay,
        fifo_listed(policy) as listed,
    ):
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(1)
        log = relay.log()
    assert f"ERROR cannot read the suppression list {listed}: {SAID}" in log


def test_check_refuses_a_fifo_and_the_tools_say_what_it_is(policy_file: Path) -> None:
    """``relay check`` (the unit's ExecStartPre) and ``relay suppression list``
    waited for ever."""
    policy = configure(policy_file, free_port(), free_port())
    with fifo_listed(policy) as listed:
        checked = relay_cli(policy, "check")
        shown = relay_cli(policy, "suppression", "list")
        added = relay_cli(policy, "suppression", "add", "one@example.org")
    assert checked.returncode == 78, checked.stderr
    assert f"the suppression list {listed} is {SAID}" in checked.stderr
    assert (shown.returncode, added.returncode) == (66, 73), shown.stderr + added.stderr
    assert f"cannot read the suppression list {listed}: {SAID}" in shown.stderr
    assert f"cannot write the suppression list {listed}: {SAID}" in added.stderr


def test_a_directory_for_a_list_is_said_so_by_serve_and_add(policy_file: Path) -> None:
    """``relay check`` and ``/readyz`` said "a directory, not a regular file"; the
    start and ``relay suppression add``, which open it to write, said "Is a
    directory": one fault in two words."""
    policy = configure(policy_file, free_port(), free_port())
    suppression = load(policy).suppression
    assert suppression is not None
    listed = suppression.file
    listed.parent.mkdir(parents=True, exist_ok=True)
    listed.unlink(missing_ok=True)
    listed.mkdir()
    served = relay_cli(policy, "serve")
    added = relay_cli(policy, "suppression", "add", "one@example.org")
    said = f"cannot write the suppression list {listed}: a directory, not a regular file"
    assert served.returncode == 73 and said in served.stderr, served.stderr
    assert added.returncode == 73 and said in added.stderr, added.stderr
