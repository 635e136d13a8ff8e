"""The record stage keeps each message's audit records apart until they are written."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from relay.audit import AuditError, AuditLog, verify
from relay.audit import events as ev
from relay.record import Recorder
from tests.spoolkit import make_entry


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


# Recorder: records of messages flushed together go out in one append.


@pytest.fixture
def appends(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The queue IDs of the records of every ``AuditLog.append_many`` call."""
    calls: list[list[str]] = []
    real = AuditLog.append_many

    def counting(self: AuditLog, records: list[dict]) -> None:
        calls.append([record["queue_id"] for record in records])
        real(self, records)

    monkeypatch.setattr(AuditLog, "append_many", counting)
    return calls


def delivered(queue_id: str, recipient: str) -> dict:
    return ev.delivered(
        queue_id=queue_id,
        message_id=None,
        recipient=recipient,
        upstream="default",
        reply="250 2.0.0 Ok",
        attempts=1,
    )


async def test_concurrent_flushes_share_one_append(
    tmp_path: Path, appends: list[list[str]]
) -> None:
    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    recorder.add(queued("A"))
    recorder.add(queued("B"))
    recorder.add(delivered("A", "a@example.org"))
    recorder.add(delivered("B", "b@example.org"))

    await asyncio.gather(recorder.flush("A"), recorder.flush("B"))

    assert appends == [["A", "A", "B", "B"]]
    assert written(audit_dir) == ["A", "A", "B", "B"]
    result = verify(audit_dir)
    assert result.ok, result.problem
    assert result.records == 4

    # A later flush is a separate append that continues the same chain.
    recorder.add(delivered("C", "c@example.org"))
    await recorder.flush("C")
    assert appends == [["A", "A", "B", "B"], ["C"]]
    result = verify(audit_dir)
    assert result.ok, result.problem
    assert result.records == 5


async def test_a_failed_shared_append_fails_both_flushes(
    tmp_path: Path, appends: list[list[str]]
) -> None:
    """A regular file where the audit directory was makes the write fail, even for root."""
    audit_dir = tmp_path / "audit"
    recorder = Recorder(AuditLog(audit_dir))
    recorder.add(queued("A"))
    recorder.add(queued("B"))
    shutil.rmtree(audit_dir)
    audit_dir.write_text("not a directory")

    results = await asyncio.gather(recorder.flush("A"), recorder.flush("B"), return_exceptions=True)

    assert [type(r) for r in results] == [AuditError, AuditError]
    assert appends == [["A", "B"]]  # one attempt for both
    assert audit_dir.read_text() == "not a directory"

    # With the directory back, the next flushes are written and the log verifies.
    audit_dir.unlink()
    recorder.audit = AuditLog(audit_dir)
    recorder.add(queued("C"))
    recorder.add(queued("D"))
    await asyncio.gather(recorder.flush("C"), recorder.flush("D"))
    assert appends[1:] == [["C", "D"]]
    assert written(audit_dir) == ["C", "D"]
    assert verify(audit_dir).ok


def test_a_delivery_line_after_the_clock_was_set_back_has_no_negative_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its delay was arrival to now: about minus a day for mail that arrived
    before a step back of a day, which Postfix-minded log readers take as is."""
    caplog.set_level(logging.INFO, logger="relay")
    now = time.time()
    entry = make_entry(arrival=now + 86400)
    Recorder(None, clock=lambda: now).delivered(entry, "customer@example.net", "250 2.0.0 ok")
    assert ", delay=0.0, dsn=2.0.0, status=sent" in caplog.text


def test_a_delivery_with_no_enhanced_status_logs_dsn_2_0_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A directory upstream answers ``written to PATH``: its line said ``dsn=-``,
    where Postfix's line of a delivery, and log tools reading it, have a code."""
    caplog.set_level(logging.INFO, logger="relay")
    Recorder(None).delivered(make_entry(), "customer@example.net", "written to /srv/outbox/x.eml")
    assert ", dsn=2.0.0, status=sent (written to /srv/outbox/x.eml)" in caplog.text
