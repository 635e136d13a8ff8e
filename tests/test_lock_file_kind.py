"""A lock file that is a directory, as ``relay serve`` and ``relay status`` find it."""

from __future__ import annotations

from pathlib import Path

from relay import statelock
from relay.policy.load import load
from tests.sink import free_port
from tests.test_queue_e2e import configure, relay_cli


def _state_with_a_directory_for_lock(policy_file: Path) -> tuple[Path, Path]:
    policy = configure(policy_file, free_port(), free_port())
    lock = load(policy).queue.directory.parent / statelock.LOCK_NAME
    lock.mkdir(parents=True)
    return policy, lock


def test_serve_names_a_directory_in_the_lock_files_place_as_the_other_state_files(
    policy_file: Path,
) -> None:
    """It said Python's "Is a directory", where every other state file found so
    says what it is in place of a regular file."""
    policy, lock = _state_with_a_directory_for_lock(policy_file)
    done = relay_cli(policy, "serve")
    assert done.returncode == 73, done.stderr
    assert f"cannot lock the state directory: {lock}: a directory, not a regular file" in (
        done.stderr
    )
    assert "Is a directory" not in done.stderr


def test_status_names_a_directory_in_the_lock_files_place_as_the_other_state_files(
    policy_file: Path,
) -> None:
    policy, lock = _state_with_a_directory_for_lock(policy_file)
    done = relay_cli(policy, "status")
    assert done.returncode == 4, done.stdout
    assert done.stdout.splitlines()[0] == (
        f"relay: cannot tell whether it runs: cannot read {lock}: a directory, not a regular file"
    )
