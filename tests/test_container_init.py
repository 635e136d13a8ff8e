"""The relay as a container's init: PID 1 of a PID namespace of its own, as
``docker run`` starts it, made here with util-linux's ``unshare`` (root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policyfiles import variant
from tests.relayproc import terminate, wait_for
from tests.sink import free_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="root makes the PID namespace here",
)

ROOT = Path(__file__).resolve().parent.parent


class Container:
    """``unshare --pid --fork`` and the relay it starts as PID 1, known here by
    its PID in this namespace."""

    def __init__(self, policy: Path, log: Path) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                 sys.executable, "-m", "relay", "serve", "-c", str(policy)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        self.pid = 0
        wait_for(self._started, 10)

    def _started(self) -> bool:
        try:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
            found = children.read_text().split()
        except OSError:
            return False
        self.pid = int(found[0]) if found else 0
        return bool(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """``docker stop``: SIGTERM to the init, from outside; its exit status."""
        if self.unshare.poll() is None and self.pid:
            os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.unshare.wait(20)  # unshare ends with its child, as its status
        return terminate(self.unshare, 5)


@pytest.fixture
def policy(tmp_path: Path) -> Iterator[Path]:
    yield variant(tmp_path, "port: 2525", f"port: {free_port()}")


def _with_workers(policy: Path, count: int) -> Path:
    policy.write_text(policy.read_text().replace("tenants:\n", f"workers: {count}\ntenants:\n"))
    return policy


def test_status_from_the_host_finds_the_relay_its_file_names_as_pid_1(
    policy: Path, tmp_path: Path
) -> None:
    """Its file says PID 1, the host's init: status said its supervisor was gone (exit 1)."""
    container = Container(_with_workers(policy, 2), tmp_path / "relay.log")
    try:
        wait_for(lambda: "2 workers serving" in container.log())
        subprocess.run(  # an orphan the init adopts is no worker of its
            ["nsenter", "-t", str(container.pid), "-p", "-m", "sh", "-c", "sleep 30 & exit 0"],
            check=True, timeout=30,
        )  # fmt: skip
        adopted: list[int] = []
        wait_for(lambda: bool(adopted.extend(_children(container.pid, "sleep")) or adopted), 5)
        done = subprocess.run(
            [sys.executable, "-m", "relay", "status", "-c", str(policy)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        second = variant(tmp_path / "second", "port: 2525", f"port: {free_port()}")
        second.write_text(
            second.read_text().replace(
                "tenants:", f"state_directory: {policy.parent / 'state'}\ntenants:"
            )
        )
        refused = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "-c", str(second)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        os.kill(adopted[0], signal.SIGKILL)
    finally:
        assert container.stop() == 0, container.log()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"relay: running, PID {container.pid}"), done.stdout
    assert ", 2 worker processes" in done.stdout.splitlines()[0], done.stdout
    assert (policy.parent / "state" / "relay.pid").read_text().startswith("1\n")
    assert refused.returncode == 75, refused.stderr
    assert f"is in use by the relay with PID {container.pid}:" in refused.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_asked_for_while_it_starts_is_not_lost(
    policy: Path, tmp_path: Path, workers: int
) -> None:
    """The kernel drops a signal its init has no handler for: ``docker stop``
    while the relay started went on to SIGKILL ten seconds later."""
    container = Container(_with_workers(policy, workers), tmp_path / "relay.log")
    try:
        wait_for(lambda: "running as root" in container.log())  # started, not yet serving
        os.kill(container.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while container.unshare.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = container.unshare.poll() is not None
    finally:
        code = container.stop()
    assert stopped, container.log()
    assert code == 0, container.log()
    assert container.log().rstrip().endswith("INFO stopped")


def test_in_one_process_it_reaps_the_orphans_it_adopts(policy: Path, tmp_path: Path) -> None:
    """A ``docker exec``'s child left behind is the init's to reap: as one
    process the relay left each a zombie for the container's life."""
    container = Container(_with_workers(policy, 1), tmp_path / "relay.log")
    try:
        wait_for(lambda: "serving in one process" in container.log())
        subprocess.run(
            ["nsenter", "-t", str(container.pid), "-p", "-m", "sh", "-c", "sleep 1 & exit 0"],
            check=True, timeout=30,
        )  # fmt: skip
        adopted: list[int] = []
        wait_for(lambda: bool(adopted.extend(_children(container.pid, "sleep")) or adopted), 5)
        wait_for(lambda: not Path(f"/proc/{adopted[0]}").exists(), 10)  # a zombie is still there
    finally:
        assert container.stop() == 0, container.log()


def _children(parent: int, name: str) -> list[int]:
    """The processes named ``name`` whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, _, rest = (entry / "stat").read_text().rpartition(")")
        except OSError:
            continue
        if head.partition("(")[2] == name and int(rest.split()[1]) == parent:
            found.append(int(entry.name))
    return found
