"""Spool test helpers shared by the store and queue-tool tests."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

from relay.queueid import new_queue_id
from relay.spool import PENDING, NoSuchEntry, QueueEntry, RecipientState, Spool
from relay.spool import store as store_module

ROOT = Path(__file__).resolve().parent.parent
LOCK_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from relay.spool import Spool
    with Spool(Path(sys.argv[1])).lock(sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def run_script(script: str, *args: str) -> str:
    """Run a Python snippet against the spool in its own process; its output."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
        check=True,
    )
    return done.stdout


def make_entry(
    queue_id: str | None = None,
    *,
    arrival: float | None = None,
    size: int = 3000,
    **changes: object,
) -> QueueEntry:
    """An invoice to a customer plus the sender's automatic BCC copy."""
    arrival = time.time() if arrival is None else arrival
    entry = QueueEntry(
        queue_id=queue_id or new_queue_id(),
        arrival=arrival,
        mail_from="bounces@platform.example",
        recipients=[
            RecipientState("customer@example.net", PENDING, notify=True),
            RecipientState("archive@acme.example", PENDING, notify=False),
        ],
        upstream="default",
        tenant="acme",
        user="alice",
        notify_address="alice@acme.example",
        doc_type="invoice",
        subject="Invoice 7",
        message_id="<7@acme.example>",
        date="Mon, 23 Nov 2026 09:30:00 +0100",
        size=size,
        client_address="10.0.0.5",
        auth_login="erp1",
        next_attempt=arrival,
    )
    for name, value in changes.items():
        setattr(entry, name, value)
    return entry


@contextlib.contextmanager
def locked_elsewhere(directory: Path, queue_id: str) -> Iterator[None]:
    """Another process holds the entry's lock for the duration."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(directory), queue_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=10)


def removed_while_waiting(spool: Spool, queue_id: str, remove: Callable[[], object]) -> list:
    """What ``spool.lock`` gave a thread that was waiting for the lock while the
    holder removed the entry: ``[None]`` if it got the lock, else the exception."""
    outcome: list[BaseException | None] = []
    real_flock = fcntl.flock
    waiting = threading.Event()

    def flock(fd: int, operation: int) -> None:
        if threading.current_thread() is waiter:
            waiting.set()  # the waiter has the file open and is about to block on it
        real_flock(fd, operation)

    def wait_for_lock() -> None:
        try:
            with spool.lock(queue_id):
                outcome.append(None)
        except NoSuchEntry as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_lock)
    with mock.patch.object(fcntl, "flock", flock), spool.lock(queue_id):
        waiter.start()
        assert waiting.wait(10)
        time.sleep(0.1)  # from its flock call into the kernel's wait
        remove()
    waiter.join(timeout=10)
    return outcome


def swept_before_locked(monkeypatch: pytest.MonkeyPatch, prefix: str) -> list[str]:
    """The spool's next lock of a file named ``prefix...`` finds it removed just
    before, as another process's sweep with its clock ahead may; the names
    removed so, for the test to see it happened."""
    flock = store_module.fcntl.flock
    swept: list[str] = []

    def sweep_first(fd: int, operation: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if not swept and Path(name).name.startswith(prefix):
            os.unlink(name)
            swept.append(name)
        flock(fd, operation)

    monkeypatch.setattr(store_module.fcntl, "flock", sweep_first)
    return swept
