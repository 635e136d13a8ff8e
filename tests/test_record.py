"""The record stage keeps each message's audit records apart until they are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from relay.audit import AuditError, AuditLog
from relay.audit import events as ev
from relay.record import Recorder


def queued(queue_id: str) -> dict:
    return ev.queued(queue_id=queue_id, message_id=None, recipients=["a@example.org"], size=10)


def written(directory: Path) -> list[str]:
    lines = [
        line for f in sorted(directory.glob("audit-*.jsonl")) for line in f.read_text().splitlines()
    ]
    return [json.loads(line)["queue_id"] for line in lines]


async def test_flush_writes_only_that_messages_records(tmp_path: Path) -> None:
    recorder = Recorder(AuditLog(tmp_path))
    recorder.add(queued("A"))
    recorder.add(queued("B"))
    await recorder.flush("A")
    assert written(tmp_path) == ["A"]
    await recorder.flush("B")
    assert written(tmp_path) == ["A", "B"]


async def test_a_failed_flush_does_not_take_another_messages_records(tmp_path: Path) -> None:
    """Before: one shared buffer, so B's records went down with A's failed write and
    B's own flush found nothing to write, a 250 without audit records."""
    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    recorder.add(queued("A"))
    recorder.add(queued("B"))
    shutil.rmtree(audit_dir)
    audit_dir.write_text("not a directory")
    with pytest.raises(AuditError):
        await recorder.flush("A")
    audit_dir.unlink()
    recorder.audit = AuditLog(audit_dir)
    await recorder.flush("B")
    assert written(audit_dir) == ["B"]
