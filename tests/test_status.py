"""``relay status`` against a real relay of two workers: running or not, the policy
it runs against the file as it reads now, and the mail waiting."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay import server, statelock, status, supervisor
from relay.metrics import status as metrics_status
from relay.policy.load import load
from tests.policyfiles import variant
from tests.relayproc import RelayProcess, wait_for
from tests.sink import free_port
from tests.test_queue_e2e import ROOT, configure, relay_cli, send


def _status(policy: Path) -> tuple[int, list[str]]:
    done = relay_cli(policy, "status")
    return done.returncode, done.stdout.splitlines()


def _digest(policy: Path) -> str:
    done = relay_cli(policy, "check")
    assert done.returncode == 0, done.stderr
    found = re.search(r"\b([0-9a-f]{12})\b", done.stdout + done.stderr)
    assert found is not None, done.stdout
    return found.group(1)


@pytest.mark.parametrize(("workers", "how"), [(2, "2 worker processes"), (1, "in one process")])
def test_status_follows_the_relay_its_policy_and_its_queue(
    policy_file: Path, tmp_path: Path, workers: int, how: str
) -> None:
    port = free_port()
    policy = configure(policy_file, port, free_port(), f"workers: {workers}\n")  # upstream down
    first = _digest(policy)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        assert relay.proc is not None
        pid = relay.proc.pid
        send(port)
        send(port)
        wait_for(lambda: relay.log().count("status=deferred") >= 2)
        code, lines = _status(policy)
        assert code == 0, lines
        assert re.fullmatch(rf"relay: running, PID {pid} since \S+, {how}", lines[0])
        assert lines[1] == f"policy: {first} in use, as {policy} reads now"
        assert re.fullmatch(  # the second waits for the suspended upstream, or was tried
            r"queue: (0 not tried yet, 2|1 not tried yet, 1) deferred, held or rescheduled by"
            r" hand;"
            r" the oldest came (under a minute|1 min) ago",
            lines[2],
        ), lines[2]

        policy.write_text(policy.read_text().replace("name: Acme AS", "name: Acme ASA"))
        second = _digest(policy)
        code, lines = _status(policy)
        assert lines[1] == (
            f"policy: {first} in use; {policy} now reads {second}: a reload puts it in use"
            f" (systemctl reload erp-relay, or kill -HUP {pid})"
        )
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "policy reloaded" in relay.log())
        assert _status(policy)[1][1] == f"policy: {second} in use, as {policy} reads now"

        policy.write_text(policy.read_text().replace("name: Acme ASA", "nmae: Acme ASA"))
        code, lines = _status(policy)
        assert code == 0
        assert lines[1].startswith(f"policy: {second} in use; {policy} does not load (")
        assert lines[1].endswith(f": a reload keeps {second}")

        # what a reload leaves for a restart is said as long as it waits, not only logged
        text = policy.read_text().replace("nmae: Acme ASA", "name: Acme ASA")
        policy.write_text(text.replace(f"workers: {workers}\n", f"workers: {workers + 1}\n"))
        lines = _status(policy)[1]  # not reloaded yet: the relay's workers, not the file's
        assert re.fullmatch(rf"relay: running, PID {pid} since \S+, {how}", lines[0]), lines[0]
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: relay.log().count("policy reloaded") >= 2)
        lines = _status(policy)[1]
        # the workers running, not "1 of 2 ... starting again" for a change left for later
        assert re.fullmatch(rf"relay: running, PID {pid} since \S+, {how}", lines[0]), lines[0]
        assert lines[2] == f"policy: waits for a restart: workers {workers} to {workers + 1}"
        assert lines[3].startswith("queue: ")
    code, lines = _status(policy)
    assert code == 3
    assert lines[0] == f"relay: not running (state directory {tmp_path / 'state'})"


def _execd(pid: int, last: bytes) -> bool:
    """Started is not yet exec'd: on a busy machine the child's command line was
    still empty when the test looked at what it runs."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2:-1] == [last]


def test_a_relay_killed_with_its_lock_file_left_is_not_running(tmp_path: Path) -> None:
    """The file names a PID that is gone: the kernel dropped the lock with it."""
    child = subprocess.Popen(["true"])
    child.wait()
    (tmp_path / statelock.LOCK_NAME).write_text(f"{child.pid}\nabc\n")
    assert statelock.holder(tmp_path) is None
    relay = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "serve"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        wait_for(lambda: _execd(relay.pid, b"serve") and _execd(other.pid, b"30"), 10)
        (tmp_path / statelock.LOCK_NAME).write_text(f"{relay.pid}\nabc\n")
        assert statelock.holder(tmp_path) == statelock.Holder(relay.pid, "abc")
        # after a reboot its PID may be any program's: that is not a relay running
        (tmp_path / statelock.LOCK_NAME).write_text(f"{other.pid}\nabc\n")
        assert statelock.holder(tmp_path) is None
        # nor another relay (a "serve") than the process that wrote the file
        start = statelock._start(relay.pid)
        assert start is not None
        ticks, boot = start
        lock_file = tmp_path / statelock.LOCK_NAME
        lock_file.write_text(f"{relay.pid}\nabc\nstart {int(ticks) - 100} {boot}\nx y\n")
        assert statelock.holder(tmp_path) is None
        lock_file.write_text(f"{relay.pid}\nabc\nstart {ticks} {boot}\nx y\n")
        an_hour_ago = time.time() - 3600  # a clock set forward since: the start still tells
        os.utime(lock_file, (an_hour_ago, an_hour_ago))
        assert statelock.holder(tmp_path) == statelock.Holder(relay.pid, "abc", ("x y",))
    finally:
        for proc in (relay, other):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda path: path.mkdir(), "a directory, not a regular file"),
        (
            lambda path: path.symlink_to(path.with_name("elsewhere")),
            "a symbolic link, not a regular file",
        ),
    ],
)
def test_a_lock_file_that_cannot_be_read_is_an_unknown_status(
    policy_file: Path, make: Callable[[Path], object], why: str
) -> None:
    """A traceback and exit 1 before, where monitoring expects a status."""
    policy = configure(policy_file, free_port(), free_port())
    state = policy.parent / "state"
    state.mkdir()
    make(state / statelock.LOCK_NAME)
    code, lines = _status(policy)
    assert code == 4
    assert lines == [
        f"relay: cannot tell whether it runs: cannot read {state / 'relay.pid'}: {why}"
    ]


def test_workers_outliving_their_killed_supervisor_are_not_a_relay_stopped(
    policy_file: Path,
) -> None:
    """Said "not running" (exit 3) while relay serve refused to start: the workers
    of a supervisor killed with SIGKILL serve on for their stop's grace."""
    policy = configure(policy_file, free_port(), free_port())
    state = policy.parent / "state"
    state.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (state / statelock.LOCK_NAME).write_text(f"{gone.pid}\nabc\n")
    hold = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR);"
    hold += " fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(30)"
    worker = subprocess.Popen(
        [sys.executable, "-c", hold, str(state / statelock.LOCK_NAME)], stdout=subprocess.PIPE
    )
    try:
        assert worker.stdout is not None
        worker.stdout.readline()  # locked
        code, lines = _status(policy)
    finally:
        worker.kill()
        worker.wait()
    assert code == 1
    assert lines[0] == status.ORPHANED
    assert _status(policy)[0] == 3  # and once they are gone, not running


def test_a_policy_that_is_no_yaml_still_finds_a_running_relay(
    policy_file: Path, tmp_path: Path
) -> None:
    """A relay in one process keeps no copy of the policy it runs: status said
    only the syntax error and 78, as if no state directory could be found."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), "workers: 1\n")
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        policy.write_text(policy.read_text() + "listeners: [\n")
        code, lines = _status(policy)
    assert code == 0
    assert lines[0].startswith("relay: running, PID ")
    assert (
        f" in use; {policy} does not load (1 problem: relay check -c {policy} names it):"
        in (lines[1])
    )


def test_a_broken_copy_beside_the_running_policy_is_not_what_a_reload_reads(
    policy_file: Path, tmp_path: Path
) -> None:
    """A copy edited beside the relay's file that does not load was said to be
    kept out by a reload ("a reload keeps ..."), which never reads it."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), "workers: 1\n")
    copy = policy.with_name("bad-copy.yaml")
    copy.write_text(policy.read_text().replace("name: Acme AS", "nmae: Acme AS"))
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        running = _digest(policy)
        code, lines = _status(copy)
    assert code == 0, lines
    assert lines[1].startswith(f"policy: {running} in use; {copy} does not load ("), lines
    assert lines[1].endswith(f": the running relay reads {policy}, not this file"), lines


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root's setpriv")
def test_a_user_who_may_not_look_into_the_state_directory_is_told_so(
    policy_file: Path, tmp_path: Path
) -> None:
    """A monitoring agent under its own user met a traceback and exit 1 (which
    says the supervisor is gone) where it may read neither the keys nor the state."""
    policy = configure(policy_file, free_port(), free_port())
    state = policy.parent / "state"
    state.mkdir(mode=0o700)
    (state / statelock.LOCK_NAME).write_text(f"{os.getpid()}\nabc\n")
    for path in (state, *(policy.parent / "keys").iterdir()):
        os.chown(path, 65534, 65534)
    done = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         sys.executable, "-m", "relay", "status", "-c", str(policy)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("relay: cannot tell whether it runs: cannot read ")


def test_a_relay_in_one_process_removes_the_copy_a_relay_with_workers_left(
    policy_file: Path, tmp_path: Path
) -> None:
    """A state directory moved with ``cp -a`` brought the copy a relay with
    workers had kept, naming the old directory: with the file broken, status
    said "not running" (exit 3) of the relay that ran, and the queue and
    audit tools looked at the old queue and chain."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), "workers: 1\n")
    state = tmp_path / "state"
    state.mkdir()
    copy = policy.read_text().replace("workers: 1\n", f"state_directory: {tmp_path / 'old'}\n")
    (state / "policy.checked.yaml").write_text(copy)
    (state / "policy.handover.json").write_text("{}")
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        policy.write_text(policy.read_text() + "listeners: [\n")
        code, lines = _status(policy)
        assert not (state / "policy.checked.yaml").exists()
        assert not (state / "policy.handover.json").exists()
    assert code == 0
    assert lines[0].startswith("relay: running, PID ")


def test_a_record_of_workers_another_version_left_is_not_counted_against(
    policy_file: Path, tmp_path: Path
) -> None:
    """Rolled back to a version that keeps no record of its workers, the relay
    in one process was said to run "0 of 2 worker processes", from the record
    the newer one had left."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), "workers: 1\n")
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        left = {"policy": str(policy), "digest": "0" * 64, "files": [], "workers": 2}
        (tmp_path / "state" / statelock.CHECKED_FILES).write_text(json.dumps(left))
        code, lines = _status(policy)
    assert code == 0
    assert re.fullmatch(r"relay: running, PID \d+ since \S+, in one process", lines[0]), lines[0]


def test_the_tools_pass_over_a_copy_that_names_another_state_directory(
    policy_file: Path, tmp_path: Path
) -> None:
    policy = configure(policy_file, free_port(), free_port())
    state = tmp_path / "state"
    state.mkdir()
    copy = policy.read_text() + f"state_directory: {tmp_path / 'old'}\n"
    (state / "policy.checked.yaml").write_text(copy)
    policy.write_text(policy.read_text().replace("unknown_sender:", "unknown_sendr:"))
    listed = relay_cli(policy, "queue", "list")
    assert "does not load, but its state settings do, so this goes by them" in listed.stderr
    assert f"relay queue: {state / 'queue'}: no queue here" in listed.stderr


def test_a_reload_that_ends_during_the_stop_keeps_the_stop_in_the_lock_file(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload under way at the signal wrote its note after the stop's, and
    ``relay status`` said "running" for the rest of the stop."""
    policy = load(policy_file)
    state = policy.queue.directory.parent
    lock = statelock.hold(state, policy.digest)
    try:
        monkeypatch.setattr(metrics_status, "STATUS", metrics_status.Status())
        server.stopping_now(policy)
        server.note_in_use(policy)  # the reload's, as it ends
        held = statelock.holder(state)
        assert held is not None and statelock.STOPPING in held.pending
        assert status._relay(held, state, 1).startswith("relay: stopping, PID ")
        # an edit the stop keeps from a reload: no advice to reload
        edited = status._policy(policy_file, held, "0123456789ab" * 4, [])
        assert edited.endswith("now reads 0123456789ab: the next start puts it in use"), edited
        # nor to a file that does not load: a reload keeps nothing now
        broken = status._policy(policy_file, held, None, ["relay.yaml:1:1: x"])
        assert broken.endswith(": the next start refuses it as it reads now"), broken
    finally:
        lock.close()


def test_a_policy_behind_a_link_switched_to_another_release_is_still_the_relays(
    tmp_path: Path,
) -> None:
    """The lock recorded the file the link led to at the start: with the link
    switched to the next release, status said no reload reads the file, and a
    reload did."""
    for release in ("v1", "v2"):
        (tmp_path / "releases" / release).mkdir(parents=True)
        (tmp_path / "releases" / release / "relay.yaml").write_text(release)
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v1")
    live = tmp_path / "relay.yaml"
    live.symlink_to(current / "relay.yaml")
    state = tmp_path / "state"
    state.mkdir()
    lock = statelock.hold(state, "0" * 64, live)
    try:
        switched = tmp_path / "current.new"
        switched.symlink_to(tmp_path / "releases" / "v2")
        switched.replace(current)
        running = statelock.holder(state)
        assert running is not None
        assert not status.reads_another(running, live)
        assert status.reads_another(running, tmp_path / "releases" / "v1" / "relay.yaml")
    finally:
        lock.close()


def test_a_policy_named_through_a_link_and_dot_dot_is_the_file_a_reload_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``conf/../relay.yaml`` with ``conf`` a link: the kernel opens the link's
    target's parent's file, and the path made absolute as text named another,
    which did not exist; status said no reload read the relay's own file."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "relay.yaml").write_text("x")
    (tmp_path / "conf").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    lock = statelock.hold(state, "0" * 64, Path("conf/../relay.yaml"))
    try:
        running = statelock.holder(state)
        assert running is not None
        assert not status.reads_another(running, tmp_path / "real" / "relay.yaml")
    finally:
        lock.close()


@pytest.mark.parametrize(("workers", "how"), [(2, "2 worker processes"), (1, "in one process")])
def test_a_removed_lock_file_keeps_a_second_relay_out_and_is_written_again(
    policy_file: Path, tmp_path: Path, workers: int, how: str
) -> None:
    """``rm relay.pid`` as a stale PID file: status said "not running" (exit 3)
    for the rest of the relay's life, and a relay on a copy of the policy with
    other ports started on the same spool, delivering its mail a second time."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), f"workers: {workers}\n")
    state = policy.parent / "state"
    lock_file = state / statelock.LOCK_NAME
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        assert relay.proc is not None
        pid = relay.proc.pid
        lock_file.unlink()
        code, lines = _status(policy)
        assert code == 0, lines
        assert re.fullmatch(rf"relay: running, PID {pid} since \S+, {how}", lines[0]), lines[0]
        second_port = free_port()
        second = tmp_path / "second.yaml"
        second.write_text(policy.read_text().replace(f"port: {port}", f"port: {second_port}"))
        code, said = _second_relay(second)
        assert code == 75, said
        assert f"ERROR state directory {state} is in use by the relay with PID {pid}" in said
        wait_for(
            lambda: "was removed or replaced while the relay runs: written again" in relay.log()
        )
        assert f"WARNING {lock_file} was removed or replaced" in relay.log()
        assert lock_file.read_text().split("\n")[0] == str(pid)
        code, lines = _status(policy)
        assert code == 0
        assert lines[1] == f"policy: {_digest(policy)} in use, as {policy} reads now"


def test_a_directory_in_the_lock_files_place_is_a_relay_running_when_one_holds_the_state(
    policy_file: Path, tmp_path: Path
) -> None:
    """The relay cannot write its file again over a directory: status said it
    could not tell (exit 4) for as long as the directory stayed, though the
    state directory's lock named the relay."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), "workers: 1\n")
    lock_file = policy.parent / "state" / statelock.LOCK_NAME
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        assert relay.proc is not None
        lock_file.unlink()
        lock_file.mkdir()
        code, lines = _status(policy)
        assert code == 0, lines
        assert lines[0].startswith(f"relay: running, PID {relay.proc.pid} since "), lines
    lock_file.rmdir()


def _second_relay(policy: Path) -> tuple[int | None, str]:
    """Its exit status and what it said; None where it served, stopped by its PID."""
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(policy)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        said, _ = relay.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        relay.terminate()
        said, _ = relay.communicate(timeout=30)
        return None, said.decode()
    return relay.returncode, said.decode()


@pytest.mark.parametrize(
    ("waited", "said"),
    [
        (59, "under a minute"),
        (90, "1 min"),
        (60 * 59 + 30, "59 min"),
        (3600 * 2 + 60 * 5, "2 h 5 min"),
        (86400 + 60 * 5, "1 d 0 h"),
        (86400 * 3 + 3600 * 4, "3 d 4 h"),
    ],
)
def test_the_oldest_messages_age_is_said_in_the_largest_units(
    tmp_path: Path, waited: int, said: str
) -> None:
    """Whether mail waits for minutes or for days is the first thing a sysadmin
    reads here; a relay not running is exit 3, its queue still counted."""
    from relay.queueid import new_queue_id
    from relay.spool import Spool
    from tests.spoolkit import make_entry

    queue = tmp_path / "state" / "queue"
    spool = Spool(queue)
    arrival = time.time() - waited
    spool.put(make_entry(new_queue_id(now_ns=int(arrival * 1e9)), arrival=arrival), b"x\r\n")
    out = io.StringIO()
    code = status.main(tmp_path / "relay.yaml", queue, out, ("0" * 64, 1, []))
    assert code == status.EX_NOT_RUNNING
    assert out.getvalue().splitlines()[-1] == (
        "queue: 1 not tried yet, 0 deferred, held or rescheduled by hand;"
        f" the oldest came {said} ago"
    )


def test_a_copy_of_a_site_with_a_broken_key_is_not_taken_for_the_running_policy(
    tmp_path: Path,
) -> None:
    """``cp -a`` of a relay's directory brought its record of the policy in use:
    the copy's text and the files the record names (the original's) were as
    recorded, so the tools took the copy as loaded, and said nothing of the
    key the copy itself holds, which no longer loads."""
    site = tmp_path / "site"
    policy = variant(site, "    port: 2525\n", "    port: 2525\n")
    (site / "state").mkdir()
    supervisor.keep_policy_text(site / "state", load(policy))
    copy = tmp_path / "copy"
    shutil.copytree(site, copy, symlinks=True)
    (copy / "keys" / "platform.example.s1.private").write_text("no key\n")
    listed = relay_cli(copy / "relay.yaml", "queue", "list")
    assert f"{copy / 'relay.yaml'}:14:17: dkim.keys[0].key_file: " in listed.stderr
    assert "does not load, so this goes by the policy the relay runs or last ran" in listed.stderr
    assert "does not load" not in relay_cli(policy, "queue", "list").stderr


@contextlib.contextmanager
def _held_here(tmp_path: Path, digest: str) -> Iterator[Path]:
    """The state directory held by this process, as a relay that recorded no
    policy file (an older version) holds it: its queue directory."""
    from relay.spool import Spool

    queue = tmp_path / "state" / "queue"
    Spool(queue)
    lock = statelock.hold(queue.parent, digest)
    try:
        statelock.note_policy(queue.parent, digest)  # served: no longer starting
        yield queue
    finally:
        lock.close()


def test_a_relay_that_recorded_no_policy_file_is_taken_to_read_this_one(tmp_path: Path) -> None:
    """Its lock file names no file: it reads the one asked about, and a reload
    puts the edit in use, not "the running relay reads , not this file"."""
    policy = tmp_path / "relay.yaml"
    with _held_here(tmp_path, "a" * 64) as queue:
        out = io.StringIO()
        code = status.main(policy, queue, out, ("b" * 64, 1, []))
    assert code == 0, out.getvalue()
    assert out.getvalue().splitlines()[1] == (
        f"policy: {'a' * 12} in use; {policy} now reads {'b' * 12}: a reload puts it in use"
        f" (systemctl reload erp-relay, or kill -HUP {os.getpid()})"
    )


def test_a_child_of_the_relay_that_runs_another_program_is_no_worker(tmp_path: Path) -> None:
    """As a container's init the relay is the parent of every orphan in it: a
    ``docker exec``'s child left behind was counted as a worker."""
    with _held_here(tmp_path, "a" * 64) as queue, subprocess.Popen(["sleep", "30"]) as other:
        try:
            out = io.StringIO()
            status.main(tmp_path / "relay.yaml", queue, out, ("a" * 64, 1, []))
        finally:
            other.kill()
    first = out.getvalue().splitlines()[0]
    assert re.fullmatch(rf"relay: running, PID {os.getpid()} since \S+, in one process", first)
