"""A reload's policy reaches the workers built: each built it again from the
text, seconds of libyaml for a large policy with the interpreter lock held,
while its SMTP sessions stood still."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.policy import load as load_module
from relay.policy import pickled
from relay.policy.load import load
from relay.policy.model import Policy
from relay.supervisor import WorkerLink, _handing_over
from tests.policyfiles import variant


@pytest.fixture
def answers() -> Iterator[int]:
    read, write = os.pipe()
    yield write
    os.close(read)
    os.close(write)


def _old_and_new(tmp_path: Path) -> tuple[Path, Policy, Policy]:
    """The policy a worker runs, and the one a reload hands it: a tenant renamed."""
    path = variant(tmp_path, "name: Acme AS", "name: Acme AS")
    old = load(path)
    path.write_text(path.read_text().replace("name: Acme AS", "name: Acme ASA"))
    return path, old, load(path)


def _handed(tmp_path: Path, policy: Policy, built: bytes | None = None) -> Path:
    assert policy.sources is not None
    handover = tmp_path / "policy.handover.json"
    handover.write_bytes(_handing_over(7, policy.sources, policy))
    if built is not None:  # what a damaged handover holds instead
        text = handover.read_text()
        start = text.index('"built": "') + len('"built": "')
        handover.write_text(text[:start] + built.decode() + text[text.index('"', start) :])
    return handover


def test_a_worker_takes_the_policy_the_supervisor_built(
    tmp_path: Path, answers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is built again: the worker's load would fail the test."""
    path, old, new = _old_and_new(tmp_path)
    link = WorkerLink(0, os.getpid(), None, _handed(tmp_path, new), answers)

    def built_again(*args: object, **kwargs: object) -> Policy:
        raise AssertionError("the worker built the policy again")

    monkeypatch.setattr(load_module, "load", built_again)
    taken = link.checked_policy(path, old)
    assert taken is not None and taken.digest == new.digest
    assert taken.tenants["acme"].name == "Acme ASA"
    assert taken.sources == new.sources


def test_a_handover_whose_built_policy_cannot_be_read_is_built_from_its_text(
    tmp_path: Path, answers: int, caplog: pytest.LogCaptureFixture
) -> None:
    path, old, new = _old_and_new(tmp_path)
    damaged = _handed(tmp_path, new, b"bm90IGEgcGlja2xl")
    link = WorkerLink(0, os.getpid(), None, damaged, answers)
    taken = link.checked_policy(path, old)
    assert taken is not None and taken.digest == new.digest
    assert "worker 0: not a built policy" in caplog.text


def test_a_built_policy_survives_its_bytes_whole(policy_file: Path) -> None:
    policy = load(policy_file)
    assert pickled.loads(pickled.dumps(policy)) == policy
    with pytest.raises(ValueError, match="not a built policy"):
        pickled.loads(b"\x80\x05K\x01.")  # a pickled 1
