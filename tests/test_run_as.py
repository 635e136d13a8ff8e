"""A relay started as root with ``run_as`` binds its ports as root, then runs
as the service user: the processes that parse what clients send are not
root's. Run as root here, with nobody as the service user, in a directory
nobody can read (pytest's own is root's alone)."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policybuilds import BUILDS_SAID
from tests.policyfiles import POLICIES
from tests.relayproc import RelayProcess, terminate, wait_for
from tests.sink import free_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="root starts the relay here"
)

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory everyone may enter, holding a policy nobody may read and a
    state directory and outbox that are nobody's."""
    directory = Path(tempfile.mkdtemp(prefix="relay-run-as-"))
    try:
        directory.chmod(0o755)
        shutil.copytree(POLICIES / "keys", directory / "keys")
        for key in (directory / "keys").iterdir():
            os.chown(key, 0, NOBODY)
            key.chmod(0o640)
        for name in ("state", "outbox"):
            (directory / name).mkdir()
            os.chown(directory / name, NOBODY, NOBODY)
        yield directory
    finally:
        shutil.rmtree(directory)


def _policy(directory: Path, port: int, run_as: str, workers: int = 2) -> Path:
    text = (POLICIES / "minimal.yaml").read_text().replace("port: 2525", f"port: {port}")
    path = directory / "relay.yaml"
    path.write_text(f"{text}state_directory: state\nworkers: {workers}\nrun_as: {run_as}\n")
    return path


def _privileged_port() -> int:
    """A free port below 1024, which only root (or the capability) may bind."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
    for port in range(600 + 17 * worker, 1000):
        probe = subprocess.run(
            [sys.executable, "-c", f"import socket; socket.create_server(('127.0.0.1', {port}))"],
            capture_output=True, check=False, timeout=10,
        )  # fmt: skip
        if probe.returncode == 0:
            return port
    pytest.skip("no free port below 1024")


def _readable_by_nobody(python: str, env: dict[str, str] | None = None) -> bool:
    """Whether ``python`` started as root still imports once it is nobody, as
    the relay does: it finds its library as root, and reads it on as nobody."""
    drop = f"import os; os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})"
    tried = subprocess.run(
        [python, "-c", f"{drop}; import relay.server, uvloop, concurrent.futures.thread"],
        capture_output=True, check=False, timeout=60, env=env, cwd="/",
    )  # fmt: skip
    return tried.returncode == 0


def _python_for_nobody() -> tuple[str, dict[str, str]]:
    """An interpreter, and its environment, with which nobody can run the relay:
    this one, or the system's of the same version beside this one's packages
    when this one lives where nobody may look (under /root)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{sysconfig.get_paths()['purelib']}")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/python{version}"):
        if os.path.exists(python) and _readable_by_nobody(python, env):
            return python, env
    pytest.skip("no Python here that nobody can read the relay with")


def _ids(pid: int) -> tuple[str, str, str]:
    """The real, effective, saved and file-system uids, gids and groups of a process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return fields["Uid"].split(), fields["Gid"].split(), fields["Groups"].split()


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found]


def test_started_as_root_it_binds_then_serves_as_the_service_user(public: Path) -> None:
    python, env = _python_for_nobody()
    port = _privileged_port()
    policy = _policy(public, port, "nobody")
    groups = "import os; os.setgroups([0])"  # root's own, as a login or sudo gives it
    with RelayProcess(
        policy, port, public / "relay.log", python=python, env=env, prelude=groups
    ) as relay:
        assert relay.proc is not None
        workers = _children(relay.proc.pid)
        assert len(workers) == 2
        for pid in (relay.proc.pid, *workers):
            uids, gids, groups = _ids(pid)
            assert uids == [str(NOBODY)] * 4, (pid, uids)
            assert gids == [str(NOBODY)] * 4, (pid, gids)
            assert "0" not in groups
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail(
                "jan@acme.example", ["buyer@example.org"], b"Subject: Invoice 42\r\n\r\nbody\r\n"
            )
        wait_for(lambda: any((public / "outbox").glob("*.eml")))
        relay.signal(signal.SIGHUP)  # the keys read again, as nobody
        relay.wait_reloaded(1)
        log = relay.log()
        assert relay.stop() == 0
    assert "running as nobody (uid 65534, gid 65534) now that the listeners are bound" in log
    assert "running as root" not in log
    made = [public / "state", *(public / "state").rglob("*"), *(public / "outbox").iterdir()]
    assert {path.stat().st_uid for path in made} == {NOBODY}


def test_the_service_user_reading_what_root_read_builds_the_policy_once(public: Path) -> None:
    """Read again as the service user, the policy was built again: as long
    again (seconds for thousands of tenants) with the ports bound and silent.
    The files read alike as root's build stands; a key that differs, or that
    user cannot read, is built again to say which (the test below)."""
    python, env = _python_for_nobody()
    port = _privileged_port()
    policy = _policy(public, port, "nobody")
    with RelayProcess(
        policy, port, public / "relay.log", python=python, env=env, prelude=BUILDS_SAID
    ) as relay:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail(
                "jan@acme.example", ["buyer@example.org"], b"Subject: Invoice 42\r\n\r\nbody\r\n"
            )
        wait_for(lambda: any((public / "outbox").glob("*.eml")))
        log = relay.log()
        assert relay.stop() == 0
    assert log.count("the policy built") == 1, log
    assert "running as nobody (uid 65534, gid 65534) now that the listeners are bound" in log


def test_a_key_only_root_can_read_stops_the_start_before_the_state_is_touched(
    public: Path,
) -> None:
    python, env = _python_for_nobody()
    port = _privileged_port()
    policy = _policy(public, port, "nobody", workers=1)
    key = public / "keys" / "platform.example.s1.private"
    os.chown(key, 0, 0)
    key.chmod(0o600)
    done = subprocess.run(
        [python, "-m", "relay", "serve", "-c", str(policy)],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert f"dkim.keys[0].key_file: cannot read {key}: Permission denied" in done.stderr
    assert f"{policy}: invalid as user nobody reads it, not starting" in done.stderr
    assert list((public / "state").iterdir()) == []


def test_a_python_nobody_cannot_read_stops_the_start(public: Path) -> None:
    """The interpreter imports as it goes: under root's home it would fail mid-message."""
    if _readable_by_nobody(sys.executable, dict(os.environ, PYTHONPATH=str(ROOT))):
        pytest.skip("nobody can read this Python")
    policy = _policy(public, _privileged_port(), "nobody", workers=1)
    done = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(policy)],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert "run_as: nobody: cannot read /" in done.stderr
    assert "install them where nobody can read them" in done.stderr
    assert list((public / "state").iterdir()) == []


def test_not_root_it_must_already_be_the_service_user(public: Path) -> None:
    python, env = _python_for_nobody()
    policy = _policy(public, _privileged_port() + 20000, "daemon", workers=1)
    done = subprocess.run(
        [*AS_NOBODY, python, "-m", "relay", "serve", "-c", str(policy)],
        capture_output=True, text=True, check=False, timeout=60, env=env, cwd="/",
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert (
        "run_as: daemon: the relay runs as nobody and only root can become daemon:"
        " start it as root or as daemon"
    ) in done.stderr
    assert list((public / "state").iterdir()) == []


def test_started_as_the_service_user_it_serves_as_that_user(public: Path) -> None:
    python, env = _python_for_nobody()
    port = free_port()
    policy = _policy(public, port, "nobody", workers=1)
    drop = f"import os; os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})"
    with RelayProcess(
        policy, port, public / "relay.log", python=python, env=env, prelude=drop
    ) as relay:
        assert relay.proc is not None
        assert _ids(relay.proc.pid)[0] == [str(NOBODY)] * 4
        assert relay.stop() == 0
    assert "running as root" not in relay.log()


def test_a_changed_run_as_waits_for_a_restart(public: Path) -> None:
    python, env = _python_for_nobody()
    port = _privileged_port()
    policy = _policy(public, port, "nobody", workers=1)
    with RelayProcess(policy, port, public / "relay.log", python=python, env=env) as relay:
        policy.write_text(policy.read_text().replace("run_as: nobody", "run_as: daemon"))
        relay.signal(signal.SIGHUP)
        wait_for(lambda: "policy reloaded" in relay.log())
        status = subprocess.run(
            [python, "-m", "relay", "status", "-c", str(policy)],
            capture_output=True, text=True, check=False, timeout=60, env=env,
        )  # fmt: skip
        assert relay.proc is not None
        assert _ids(relay.proc.pid)[0] == [str(NOBODY)] * 4
        assert terminate(relay.proc, 15) == 0
    assert "run_as changed (nobody to daemon): takes effect after a restart" in relay.log()
    assert "run_as nobody to daemon" in status.stdout + status.stderr


@pytest.mark.parametrize("made", ["by-root", "queue-by-root", "not-yet", "behind-root"])
def test_a_state_directory_the_user_cannot_write_says_what_to_run(public: Path, made: str) -> None:
    """Root's earlier runs leave root's state; a new one must be made as the user's."""
    python, env = _python_for_nobody()
    policy = _policy(public, _privileged_port(), "nobody", workers=1)
    state = public / "state"
    if made == "by-root":
        os.chown(state, 0, 0)
        hint = f"(the relay runs as nobody: chown -R nobody: {state})"
    elif made == "queue-by-root":
        (state / "queue").mkdir(mode=0o700)
        hint = f"(the relay runs as nobody: chown -R nobody: {state})"
    elif made == "behind-root":
        state.rmdir()
        (public / "closed").mkdir(mode=0o700)
        state = public / "closed" / "state"
        state.mkdir()
        os.chown(state, NOBODY, NOBODY)
        policy.write_text(
            policy.read_text().replace("state_directory: state", f"state_directory: {state}")
        )
        hint = f"(the relay runs as nobody, which cannot reach {state}: let it pass above)"
    else:
        state.rmdir()
        state = public / "fresh" / "state"
        policy.write_text(
            policy.read_text().replace("state_directory: state", f"state_directory: {state}")
        )
        hint = f"(the relay runs as nobody: install -d -m 0700 -o nobody {state})"
    done = subprocess.run(
        [python, "-m", "relay", "serve", "-c", str(policy)],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 73, done.stderr
    assert "Permission denied" in done.stderr
    assert hint in done.stderr
