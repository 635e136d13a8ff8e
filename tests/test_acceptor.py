"""The receiving side's last step when the disk fails: a message refused with 451
is never delivered, even when the spool will not let go of it at once; a full
disk or quota is told as such (452 4.3.1), and the client tries again later."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from relay import engine as engine_module
from relay import pipeline
from relay.audit import AuditError
from relay.engine import Attempt, Engine
from relay.errors import SmtpReply
from relay.pipeline import Acceptor
from relay.policy.load import load
from relay.ratelimit import RateCounts
from relay.record import Recorder
from relay.spool import Spool
from relay.spool import store as spool_store
from relay.submission import Submission
from tests.test_engine_warm import running

MESSAGE = (
    b"From: Kari <kari@acme.example>\r\nTo: customer@example.org\r\nSubject: Invoice 1\r\n\r\nx\r\n"
)


class FullAudit(Recorder):
    """An audit log that cannot take the message's records (a full or broken disk)."""

    def write(self, records: list[dict[str, Any]], sync: bool = True) -> int:
        raise AuditError("audit log write failed: [Errno 5] Input/output error")


async def test_a_refused_message_the_spool_keeps_is_never_delivered(
    policy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit write failed, the client got 451, and removing the entry failed
    too (EIO, a file system gone read-only): its lock was let go, and the
    engine's next scan delivered it, with no record in the audit log (it reached
    the upstream 24 s later)."""
    monkeypatch.setattr(engine_module, "RESCAN", 0.1)
    monkeypatch.setattr(pipeline, "REMOVAL_RETRY", 0.5)
    spool = Spool(tmp_path / "spool")
    remove_many = spool.remove_many
    refusals = [OSError(5, "Input/output error")] * 2

    def failing_removal(queue_ids: list[str], **options: Any) -> list[Exception | None]:
        if refusals:
            return [refusals.pop()]
        return remove_many(queue_ids, **options)

    monkeypatch.setattr(spool, "remove_many", failing_removal)
    attempts: list[str] = []

    async def attempt(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        attempts.append(sender)
        return Attempt(dict.fromkeys(rcpts, (250, "250 2.0.0 ok")))

    policy = load(policy_file)
    engine = Engine(spool, lambda: policy, attempt, Recorder(None))
    submission = Submission(
        "local", "127.0.0.1", None, "kari@acme.example", ("customer@example.org",), MESSAGE
    )
    async with running(engine):
        acceptor = Acceptor(spool, engine, FullAudit(None))
        with pytest.raises(SmtpReply) as refused:
            await acceptor.process(policy, submission)
        assert refused.value.line == "451 4.3.0 Audit log write failed, try again later"
        (kept,) = list(spool.entries())
        await asyncio.sleep(1.0)  # rescans every 0.1 s; the removal is tried again at 0.5 s
        assert attempts == []
        deadline = time.monotonic() + 20
        # the file goes in a thread; the entry is let go once the loop has its answer
        while (
            list(spool.entries()) or kept.queue_id in engine.accepting
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert list(spool.entries()) == []
        assert kept.queue_id not in engine.accepting
        await asyncio.sleep(0.3)
    assert attempts == []


class RefusingAudit(Recorder):
    """An audit log on a disk that refuses the write with ``error``."""

    def __init__(self, error: int) -> None:
        super().__init__(None)
        self.error = error

    def write(self, records: list[dict[str, Any]], sync: bool = True) -> int:
        try:
            raise OSError(self.error, os.strerror(self.error))
        except OSError as exc:
            raise AuditError(f"audit log: {exc.strerror}") from exc


WRITE_ERRORS = [
    (errno.ENOSPC, "452 4.3.1 Insufficient system storage, try again later"),
    (errno.EDQUOT, "452 4.3.1 Insufficient system storage, try again later"),
    (errno.EIO, None),
]


@pytest.mark.parametrize(("error", "reply"), WRITE_ERRORS)
async def test_a_spool_write_that_finds_the_disk_full_is_a_452(
    policy_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: int,
    reply: str | None,
) -> None:
    def failing_write(fd: int, chunks: Any) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(spool_store, "_write_all", failing_write)
    refused = await _refusal(policy_file, tmp_path, Recorder(None))
    assert refused == (reply or "451 4.3.0 Queue write failed, try again later")


@pytest.mark.parametrize(("error", "reply"), WRITE_ERRORS)
async def test_an_audit_write_that_finds_the_disk_full_is_a_452(
    policy_file: Path, tmp_path: Path, error: int, reply: str | None
) -> None:
    refused = await _refusal(policy_file, tmp_path, RefusingAudit(error))
    assert refused == (reply or "451 4.3.0 Audit log write failed, try again later")


async def test_a_refused_message_gives_its_count_back_to_the_minute_it_was_taken_in(
    policy_file: Path, tmp_path: Path
) -> None:
    """Given back to the minute of the refusal, the recipients of a message taken
    in at a minute's last second were still counted for the hour once it ended:
    the tenant was held to its ``recipients_per_hour`` for mail never sent."""
    last_second = 1_800_000_059.5  # a minute's last second
    rates = RateCounts(1).row(0)
    spool = Spool(tmp_path / "spool")
    policy = load(policy_file)
    engine = Engine(spool, lambda: policy, _never, Recorder(None))
    submission = Submission(
        "local", "127.0.0.1", None, "kari@acme.example", ("customer@example.org",), MESSAGE
    )
    acceptor = Acceptor(spool, engine, FullAudit(None), rates=rates, clock=lambda: last_second)
    async with running(engine):
        with pytest.raises(SmtpReply):
            await acceptor.process(policy, submission)
    assert rates.sent("acme", last_second) == 0


async def _never(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
    raise AssertionError("a refused message was delivered")


async def _refusal(policy_file: Path, tmp_path: Path, audit: Recorder) -> str:
    """The reply to one message; nothing of it may be left in the spool."""
    spool = Spool(tmp_path / "spool")

    async def attempt(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        raise AssertionError("a refused message was delivered")

    policy = load(policy_file)
    engine = Engine(spool, lambda: policy, attempt, Recorder(None))
    submission = Submission(
        "local", "127.0.0.1", None, "kari@acme.example", ("customer@example.org",), MESSAGE
    )
    async with running(engine):
        with pytest.raises(SmtpReply) as refused:
            await Acceptor(spool, engine, audit).process(policy, submission)
    assert list(spool.entries()) == []
    return refused.value.line


def test_a_refused_messages_own_id_is_recorded_on_one_line() -> None:
    """Read from the raw field, a folded ID kept its line break and tab: the
    refusal's audit record is found by the ERP's ID, written on one line."""
    data = (
        b"From: x@nowhere.example\r\nMessage-ID: <rej-2@erp.example>\r\n (ERP\r\n\t7)\r\n\r\nhi\r\n"
    )
    assert pipeline._given_message_id(data) == "<rej-2@erp.example> (ERP 7)"
