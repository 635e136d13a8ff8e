"""Root running the queue tools on a state directory the service user owns, as
the README has it: a link that user put in a file's place had root chown and
overwrite a root-only file, chown a root-only directory, or print one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.audit import AuditLog, events
from relay.spool import Spool
from tests import spoolkit
from tests.test_queue_e2e import relay_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root runs the tools here")

SERVICE = 65534  # nobody: the service user, which owns the state directory
SECRET = b"root:$6$not-for-the-service-user\n"


@pytest.fixture
def state(policy_file: Path, tmp_path: Path) -> tuple[Path, str]:
    """The state directory with one queued message and an audit log, given to
    the service user; the message's queue ID."""
    state = tmp_path / "state"
    entry, spool = spoolkit.make_entry(size=20), Spool(state / "queue")
    spool.put(entry, b"Subject: x\r\n\r\nbody\r\n")
    spool.update(entry)  # a record beside it, as a hold or a try leaves
    AuditLog(state / "audit").append(events.policy_loaded(policy_file="p", policy_sha256="0" * 64))
    for path in (state, *state.rglob("*")):
        os.lchown(path, SERVICE, SERVICE)
    return state, entry.queue_id


def _planted(link: Path, target: Path) -> None:
    """What the service user can do in its own directory: replace a file by a link."""
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(target)
    os.lchown(link, SERVICE, SERVICE)


def _root_only(path: Path, directory: bool = False) -> Callable[[], tuple[int, int, bytes]]:
    """A root-only file or directory, and what to compare of it afterwards."""
    if directory:
        path.mkdir(mode=0o700)
    else:
        path.write_bytes(SECRET)
        path.chmod(0o600)

    def seen() -> tuple[int, int, bytes]:
        info = os.lstat(path)
        return info.st_uid, info.st_mode, b"" if directory else path.read_bytes()

    return seen


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("audit/.head", ("queue", "hold")),
        ("audit/.lock", ("queue", "hold")),
        ("queue/kick", ("queue", "retry")),
    ],
)
def test_a_tool_run_by_root_leaves_a_file_behind_a_link_alone(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path, name: str, command: tuple[str, str]
) -> None:
    directory, queue_id = state
    seen = _root_only(tmp_path / "root-only")
    before = seen()
    _planted(directory / name, tmp_path / "root-only")
    done = relay_cli(policy_file, *command, queue_id)
    assert seen() == before, done.stdout + done.stderr
    assert done.returncode != 0 or name == "queue/kick"


@pytest.mark.parametrize("name", ["audit/.head", "audit/.lock"])
def test_a_hard_link_in_a_files_place_is_not_given_away(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path, name: str
) -> None:
    """Where the kernel does not protect hard links, the service user can link
    root's file into its directory: two names, so not handed over."""
    directory, queue_id = state
    seen = _root_only(tmp_path / "root-only")
    before = seen()
    (directory / name).unlink()
    os.link(tmp_path / "root-only", directory / name)
    done = relay_cli(policy_file, "queue", "hold", queue_id)
    assert seen() == before, done.stdout + done.stderr
    assert done.returncode != 0


def test_a_day_file_behind_a_link_is_neither_taken_nor_written(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path
) -> None:
    directory, queue_id = state
    (day,) = (directory / "audit").glob("audit-*.jsonl")
    target = tmp_path / "root-only"
    target.write_bytes(day.read_bytes())
    target.chmod(0o600)
    before = target.read_bytes()
    _planted(day, target)
    done = relay_cli(policy_file, "queue", "hold", queue_id)
    assert (os.lstat(target).st_uid, target.read_bytes()) == (0, before), done.stderr
    assert done.returncode != 0


@pytest.mark.parametrize("command", [("queue", "list"), ("status",)])
def test_a_queue_directory_behind_a_link_is_not_given_away(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    directory, _ = state
    seen = _root_only(tmp_path / "root-only", directory=True)
    before = seen()
    _planted(directory / "queue" / "env", tmp_path / "root-only")
    done = relay_cli(policy_file, *command)
    assert seen() == before, done.stdout + done.stderr


def test_show_does_not_print_a_file_behind_a_link(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path
) -> None:
    directory, queue_id = state
    _root_only(tmp_path / "root-only")
    _planted(directory / "queue" / "msg" / queue_id, tmp_path / "root-only")
    done = relay_cli(policy_file, "queue", "show", queue_id)
    assert SECRET.decode().strip() not in done.stdout + done.stderr
    assert done.returncode != 0


def test_an_audit_directory_root_linked_elsewhere_is_followed(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path
) -> None:
    """A log moved to a disk of its own is a link root made: still the log."""
    directory, queue_id = state
    moved = tmp_path / "audit-disk"
    shutil.move(directory / "audit", moved)
    (directory / "audit").symlink_to(moved)
    done = relay_cli(policy_file, "queue", "hold", queue_id)
    assert done.returncode == 0, done.stderr
    assert b'"event":"held"' in b"".join(p.read_bytes() for p in moved.glob("audit-*.jsonl"))


@pytest.mark.parametrize("command", [("audit", "search"), ("audit", "verify"), ("audit", "report")])
def test_an_audit_directory_another_user_linked_elsewhere_is_not_read_by_root(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path, command: tuple[str, str]
) -> None:
    """Linked to a root-only log, it was read and its records printed."""
    directory, _ = state
    hidden = tmp_path / "root-only-log"
    shutil.copytree(directory / "audit", hidden)
    hidden.chmod(0o700)
    _planted(directory / "audit", hidden)
    done = relay_cli(policy_file, *command)
    assert done.returncode != 0
    assert "policy_loaded" not in done.stdout and "1 record" not in done.stdout
    assert "which root does not follow" in done.stderr


def test_a_suppression_list_behind_a_link_is_not_read_by_root(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path
) -> None:
    directory, _ = state
    hidden = tmp_path / "root-only-list"
    hidden.write_text(
        '{"v":1,"op":"add","address":"secret@example.org","tenant":null,"reason":"manual",'
        '"since":"2026-01-01T00:00:00.000Z"}\n'
    )
    hidden.chmod(0o600)
    _planted(directory / "suppression.jsonl", hidden)
    done = relay_cli(policy_file, "suppression", "list")
    assert "secret@example.org" not in done.stdout + done.stderr
    assert done.returncode != 0


def test_verify_waits_on_no_lock_behind_a_link(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path
) -> None:
    """A day file's torn last line is read again under the writers' lock: through
    a linked .lock, root's verify waited on whatever lock the service user held
    there, and then read the day file through a link."""
    import fcntl

    directory, _ = state
    (day,) = (directory / "audit").glob("audit-*.jsonl")
    with day.open("ab") as torn:
        torn.write(b'{"torn')
    target = tmp_path / "root-only"
    target.write_bytes(b"")
    _planted(directory / "audit" / ".lock", target)
    with target.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the service user holding it would
        done = relay_cli(policy_file, "audit", "verify")  # times out (60 s) if it waits
    assert done.returncode != 0, done.stdout


def test_a_running_policy_behind_a_link_is_not_gone_by(
    policy_file: Path, state: tuple[Path, str], tmp_path: Path
) -> None:
    """With the policy broken, root's tools go by the copy of the running one in
    the state directory: behind a link, by a file the service user chose."""
    directory, _ = state
    hidden = tmp_path / "root-only.yaml"
    shutil.copy(policy_file, hidden)
    hidden.chmod(0o600)
    _planted(directory / "policy.checked.yaml", hidden)
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"state_directory: {directory}\nlisteners: [\n")
    done = relay_cli(broken, "queue", "list")
    assert "goes by the policy the relay runs" not in done.stderr
    assert done.returncode != 0
