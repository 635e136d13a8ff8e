"""What a stop does to deliveries under way, against a real upstream that is slow to
answer the end of the message: nothing new starts once the stop has begun, and an
attempt the grace cuts off is on record as one that may have reached the upstream.
"""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.audit import reader
from relay.engine import CUT_OFF
from relay.server import STOP_GRACE
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Received, Sink, SinkServer, free_port


@dataclass
class SlowToAnswer(Sink):
    """Takes each message as it arrives, then waits ``delays[recipient]`` seconds
    before its 250: a smarthost that has queued the mail but answers late."""

    delays: dict[str, float] = field(default_factory=dict)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        taken = Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        self.messages.append(taken)
        await asyncio.sleep(max(self.delays.get(r, 0.0) for r in envelope.rcpt_tos))
        return self.data_reply


def send(port: int, rcpt: str) -> None:
    message = f"From: jan@acme.example\r\nTo: {rcpt}\r\nSubject: x\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        assert client.sendmail("jan@acme.example", [rcpt], message) == {}


def arrivals(sink: Sink, rcpt: str) -> int:
    return sum(rcpt in m.rcpt_tos for m in sink.messages)


def test_a_stop_starts_no_delivery_and_admits_the_one_it_cuts_off(
    policy_file: Path, tmp_path: Path
) -> None:
    """``slow@`` is answered long after the grace, ``mid@`` within it, and ``next@``
    waits for a delivery slot until ``mid@``'s ends, after the stop began. It used
    to start then, have its reply cut off by the grace and be sent again at the
    next start, and the audit log had one delivery of each, at attempt 1."""
    sink = SlowToAnswer(delays={"slow@example.org": 60.0, "mid@example.org": 4.0})
    port = free_port()
    with SinkServer(sink) as server:
        upstream = (
            f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {server.port}\n"
            "    tls: none\n    timeout: 120\n"
        )
        text = policy_file.read_text().replace("port: 2525", f"port: {port}")
        text = text.replace("  default:\n    type: directory\n    path: outbox\n", upstream)
        policy_file.write_text(text + "workers: 1\nqueue:\n  concurrency: 2\n")
        with RelayProcess(policy_file, port, tmp_path / "first.log") as relay:
            send(port, "slow@example.org")
            send(port, "mid@example.org")
            wait_for(lambda: len(sink.messages) == 2)
            send(port, "next@example.org")  # queued: both slots are taken
            relay.signal(15)
            assert relay.proc is not None
            assert relay.proc.wait(STOP_GRACE + 15) == 0, relay.log()
        first = relay.log()
        assert arrivals(sink, "next@example.org") == 0, first
        assert "giving up 1 delivery attempt(s)" in first, first

        sink.delays.clear()
        with RelayProcess(policy_file, port, tmp_path / "second.log"):
            wait_for(lambda: arrivals(sink, "next@example.org") == 1)
            wait_for(lambda: arrivals(sink, "slow@example.org") == 2)
    audit = policy_file.parent / "state" / "audit"
    records = list(reader.records(audit))
    deferred = [(r["recipient"], r["reply"]) for r in records if r["event"] == "deferred"]
    delivered = {(r["recipient"], r["attempts"]) for r in records if r["event"] == "delivered"}
    assert deferred == [("slow@example.org", CUT_OFF)]
    assert delivered == {
        ("slow@example.org", 2),
        ("mid@example.org", 1),
        ("next@example.org", 1),
    }
    assert [arrivals(sink, r) for r in ("mid@example.org", "next@example.org")] == [1, 1]
