"""The state directory's lock, with real processes holding it."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from relay import statelock
from relay.statelock import StateBusy, StateUnreadable

DIGEST = "3f9a2b1c4d5e" * 5 + "3f9a"
STARTING = (statelock.STARTING,)  # its note from the lock taken until it serves


def test_a_second_holder_is_told_the_first_ones_pid(tmp_path: Path) -> None:
    lock = statelock.hold(tmp_path, DIGEST)
    try:
        with pytest.raises(StateBusy) as busy:
            statelock.hold(tmp_path, DIGEST)  # another open file description: flock refuses it
        assert f"in use by the relay with PID {os.getpid()}:" in str(busy.value)
    finally:
        lock.close()
    statelock.hold(tmp_path, DIGEST).close()  # closed: free again


def test_a_state_directory_it_makes_is_its_users_alone_and_the_pid_file_readable(
    tmp_path: Path,
) -> None:
    """The queue and the keys' copies are in it; ``relay status`` by a monitoring
    user reads the PID file."""
    state = tmp_path / "state"
    old = os.umask(0o022)
    try:
        statelock.hold(state, DIGEST).close()
    finally:
        os.umask(old)
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / statelock.LOCK_NAME).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_workers_left_by_a_supervisor_that_died_are_named_as_such(
    tmp_path: Path, reaped: bool
) -> None:
    """Its PID is in the file, but it is gone: "stop that one" would send the
    sysadmin looking for a process that is not there. Also while its parent has
    not reaped it yet: ``relay status`` said "running" (exit 0) meanwhile."""
    ready_read, ready_write = os.pipe()
    supervisor = os.fork()
    if supervisor == 0:
        code = 1
        try:
            statelock.hold(tmp_path, DIGEST)
            if os.fork() == 0:  # the "worker": keeps the inherited lock, then waits
                os.write(ready_write, f"{os.getpid()}\n".encode())
                time.sleep(30)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_write)
    worker = int(os.read(ready_read, 32))
    os.close(ready_read)
    if reaped:
        os.waitpid(supervisor, 0)
    else:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{supervisor}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the supervisor never ended"
            time.sleep(0.02)
    try:
        with pytest.raises(StateBusy) as busy:
            statelock.hold(tmp_path, DIGEST)
        assert (
            f"in use by the workers of a relay whose supervisor (PID {supervisor}) is gone"
            in str(busy.value)
        )
        assert statelock.holder(tmp_path) is None
        assert statelock.held(tmp_path)
    finally:
        os.kill(worker, signal.SIGKILL)
        if not reaped:
            os.waitpid(supervisor, 0)
    deadline = time.monotonic() + 10
    while True:  # the orphan is reaped by init, not by the test
        try:
            statelock.hold(tmp_path, DIGEST).close()
            break
        except StateBusy:
            assert time.monotonic() < deadline, "the lock outlived its holders"
            time.sleep(0.05)


def test_a_symbolic_link_in_its_place_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("not the relay's\n")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "relay.pid").symlink_to(victim)
    with pytest.raises(OSError):
        statelock.hold(tmp_path / "state", DIGEST)
    assert victim.read_text() == "not the relay's\n"


def test_a_copy_of_a_live_state_directory_names_no_relay(tmp_path: Path) -> None:
    """``cp -a`` of a running relay's state directory (a backup, a move): status
    on the copy said the relay ran there and advised signalling it, and a relay
    started on the copy blamed it for a port another relay held."""
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir()
    lock = statelock.hold(live, DIGEST)
    try:
        shutil.copytree(live, copy)
        assert statelock.holder(live) == statelock.Holder(os.getpid(), DIGEST, STARTING)
        assert statelock.holder(copy) is None
    finally:
        lock.close()
    lock = statelock.hold(copy, DIGEST)  # the copy's own relay writes it anew
    try:
        assert statelock.holder(copy) == statelock.Holder(os.getpid(), DIGEST, STARTING)
    finally:
        lock.close()


def test_the_policy_file_is_read_back_whole_and_an_older_file_names_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file a reload reads, absolute and with its spaces, through a reload's
    note too; an older relay's start line ends at the inode, and names none."""
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    lock = statelock.hold(state, DIGEST, Path("my policy.yaml"))
    try:
        expected = str(tmp_path / "my policy.yaml")
        assert statelock.holder(state) == statelock.Holder(os.getpid(), DIGEST, STARTING, expected)
        statelock.note_policy(state, DIGEST, ["waits for a restart: x"], Path("my policy.yaml"))
        held = statelock.holder(state)
        assert held is not None and (held.source, held.pending) == (
            expected,
            ("waits for a restart: x",),
        )
        lines = (state / statelock.LOCK_NAME).read_text().split("\n")
        lines[2] = " ".join(lines[2].split()[:4])  # as an older relay wrote it
        (state / statelock.LOCK_NAME).write_text("\n".join(lines))
        assert statelock.holder(state) == statelock.Holder(
            os.getpid(), DIGEST, ("waits for a restart: x",)
        )
    finally:
        lock.close()


def test_a_lock_file_read_while_a_reload_writes_it_names_the_relay(tmp_path: Path) -> None:
    """A reload empties the file, then writes it: a status read in between
    found no relay, said its supervisor was gone and exited 1."""
    lock = statelock.hold(tmp_path, DIGEST)
    try:
        text = (tmp_path / statelock.LOCK_NAME).read_bytes()
        os.ftruncate(lock.file, 0)  # as a reload leaves it for a moment
        later = threading.Timer(0.03, lambda: os.pwrite(lock.file, text, 0))
        later.start()
        try:
            assert statelock.holder(tmp_path) == statelock.Holder(os.getpid(), DIGEST, STARTING)
        finally:
            later.join()
    finally:
        lock.close()


def test_a_relay_whose_directory_was_removed_still_notes_its_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started from a release directory an upgrade then removed: every reload's
    and the stop's note failed (no current directory), and status said a
    reload would put in use what already ran."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    state = tmp_path / "state"
    policy = tmp_path / "relay.yaml"
    lock = statelock.hold(state, DIGEST, policy)
    try:
        held = statelock.Holder(os.getpid(), DIGEST, STARTING, str(policy))
        assert statelock.holder(state) == held
        statelock.note_policy(state, "1" * 64, [], Path("relative.yaml"))
        assert statelock.holder(state) == statelock.Holder(os.getpid(), "1" * 64)
    finally:
        lock.close()


def test_a_removed_or_replaced_lock_file_keeps_its_lock_and_is_written_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Removed as a stale PID file, the locked file was found by its name no more:
    a second relay made another and locked that. Replaced (a copy put back),
    status read a file no relay held."""
    path = tmp_path / statelock.LOCK_NAME
    lock = statelock.hold(tmp_path, DIGEST)
    try:
        lock.keep(DIGEST)
        assert not caplog.records  # as it was: not written again
        path.unlink()
        with pytest.raises(StateBusy):
            statelock.hold(tmp_path, DIGEST)
        assert not path.exists()  # the refused one made none
        lock.keep(DIGEST, ["waits for a restart: x"])
        assert statelock.holder(tmp_path) == statelock.Holder(
            os.getpid(), DIGEST, ("waits for a restart: x",)
        )
        copy = tmp_path / "copy"
        shutil.copy(path, copy)
        copy.replace(path)
        assert statelock.holder(tmp_path) is None  # this test's process is no relay serve
        lock.keep(DIGEST)
        assert statelock.holder(tmp_path) == statelock.Holder(os.getpid(), DIGEST)
        assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
        assert f"{path} was removed or replaced while the relay runs" in caplog.text
    finally:
        lock.close()
    statelock.hold(tmp_path, DIGEST).close()  # closed: free again, the file kept


@pytest.mark.parametrize("kind", ["fifo", "directory", "link"])
def test_something_else_in_the_lock_files_place_keeps_no_one_waiting(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO put in its place held every open until a writer came: a status
    and a second start waited for ever, and so did a reload's note, the
    supervisor deaf to SIGTERM meanwhile."""
    path = tmp_path / statelock.LOCK_NAME
    lock = statelock.hold(tmp_path, DIGEST)
    try:
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
        else:
            path.symlink_to(tmp_path / "elsewhere")
        done: list[object] = []

        def look() -> None:
            with pytest.raises(StateUnreadable):  # this test's process is no relay serve
                statelock.holder(tmp_path)
            statelock.note_policy(tmp_path, DIGEST)
            done.append("noted")

        worker = threading.Thread(target=look, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "waited on what is in the lock file's place"
        assert done == ["noted"]
        assert f"cannot note the policy in use in {path}" in caplog.text
    finally:
        lock.close()
