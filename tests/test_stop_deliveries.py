"""What a stop does to deliveries, against a real upstream that is slow to answer
the end of the message: from the signal on no attempt starts, also while a client's
transaction holds the stop up; an attempt the grace cuts off is on record as one
that may have reached the upstream, with the replies it did get; and a client of an
``immediate`` listener is told 250 at once, its message queued.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.audit import reader
from relay.engine import CUT_OFF
from relay.server import STOP_GRACE
from tests.relayproc import RelayProcess, in_data, wait_for
from tests.sink import Received, Sink, SinkServer, free_port
from tests.test_queue_e2e import send


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


def arrivals(sink: Sink, rcpt: str) -> int:
    return sum(rcpt in m.rcpt_tos for m in sink.messages)


def configure(policy_file: Path, port: int, upstream_port: int, extra: str = "") -> None:
    upstream = (
        f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {upstream_port}\n"
        "    tls: none\n    timeout: 120\n"
    )
    text = policy_file.read_text().replace("port: 2525", f"port: {port}")
    text = text.replace("  default:\n    type: directory\n    path: outbox\n", upstream)
    policy_file.write_text(text + "workers: 1\n" + extra)


def outcomes(policy_file: Path) -> tuple[list[tuple[str, str]], set[tuple[str, int]]]:
    """The deferrals (recipient, reply) in order, and the deliveries (recipient, attempt)."""
    records = list(reader.records(policy_file.parent / "state" / "audit"))
    deferred = [(r["recipient"], r["reply"]) for r in records if r["event"] == "deferred"]
    delivered = {(r["recipient"], r["attempts"]) for r in records if r["event"] == "delivered"}
    return deferred, delivered


def stopped(relay: RelayProcess) -> str:
    assert relay.proc is not None
    assert relay.proc.wait(STOP_GRACE + 15) == 0, relay.log()
    return relay.log()


def test_a_stop_starts_no_delivery_and_admits_the_one_it_cuts_off(
    policy_file: Path, tmp_path: Path
) -> None:
    """``slow@`` is answered long after the grace, ``mid@`` within it, and ``next@``
    waits for a delivery slot until ``mid@``'s ends, after the signal, while a
    client's transaction holds the stop up. It used to start then, have its reply
    cut off by the grace and go again at the next start, and the audit log had
    one delivery of each, at attempt 1."""
    sink = SlowToAnswer(delays={"slow@example.org": 60.0, "mid@example.org": 3.0})
    port = free_port()
    with SinkServer(sink) as server:
        configure(policy_file, port, server.port, "queue:\n  concurrency: 2\n")
        with RelayProcess(policy_file, port, tmp_path / "first.log") as relay:
            send(port, rcpts=("slow@example.org",))
            send(port, rcpts=("mid@example.org",))
            wait_for(lambda: len(sink.messages) == 2)
            send(port, rcpts=("next@example.org",))  # queued: both slots are taken
            with in_data(port):
                relay.signal(signal.SIGTERM)
                time.sleep(5)  # mid@'s slot is free by now
            first = stopped(relay)
        assert arrivals(sink, "next@example.org") == 0, first
        assert "cutting off 1 delivery attempt" in first, first

        sink.delays.clear()
        with RelayProcess(policy_file, port, tmp_path / "second.log"):
            wait_for(lambda: arrivals(sink, "next@example.org") == 1)
            wait_for(lambda: arrivals(sink, "slow@example.org") == 2)
    deferred, delivered = outcomes(policy_file)
    assert deferred == [("slow@example.org", CUT_OFF)]
    assert delivered == {
        ("slow@example.org", 2),
        ("mid@example.org", 1),
        ("next@example.org", 1),
    }
    assert [arrivals(sink, r) for r in ("mid@example.org", "next@example.org")] == [1, 1]


def test_recipients_answered_before_the_cut_keep_their_replies(
    policy_file: Path, tmp_path: Path
) -> None:
    """An upstream taking two recipients a transaction answered the first two, and
    the stop cut the second transaction off: the two were recorded as cut off
    too, "before the upstream's reply", and sent again."""
    sink = SlowToAnswer(most=2, delays={"slow@example.org": 60.0})
    rcpts = ("one@example.org", "two@example.org", "slow@example.org", "four@example.org")
    port = free_port()
    with SinkServer(sink) as server:
        configure(policy_file, port, server.port)
        with RelayProcess(policy_file, port, tmp_path / "first.log") as relay:
            send(port, rcpts=rcpts)
            wait_for(lambda: len(sink.messages) == 2)
            relay.signal(signal.SIGTERM)
            stopped(relay)
        sink.delays.clear()
        with RelayProcess(policy_file, port, tmp_path / "second.log"):
            wait_for(lambda: arrivals(sink, "four@example.org") == 2)
    assert [arrivals(sink, r) for r in rcpts] == [1, 1, 2, 2]
    deferred, delivered = outcomes(policy_file)
    assert deferred == [("slow@example.org", CUT_OFF), ("four@example.org", CUT_OFF)]
    assert delivered == {
        ("one@example.org", 1),
        ("two@example.org", 1),
        ("slow@example.org", 2),
        ("four@example.org", 2),
    }


def test_an_immediate_listener_answers_250_at_once_once_the_relay_stops(
    policy_file: Path, tmp_path: Path
) -> None:
    """A message that ends after the signal is queued, not tried: its client, who
    would have waited for the attempt and then been told 421 at the end of the
    grace (read as not accepted: sent again), hears 250 at once."""
    sink = SlowToAnswer(delays={"held@example.org": 60.0})
    port = free_port()
    with SinkServer(sink) as server:
        configure(policy_file, port, server.port)
        text = policy_file.read_text()
        policy_file.write_text(
            text.replace("    auth: optional\n", "    auth: optional\n    immediate: 10\n")
        )
        with RelayProcess(policy_file, port, tmp_path / "first.log") as relay:
            with in_data(port) as client:
                relay.signal(signal.SIGTERM)
                time.sleep(0.5)
                began = time.monotonic()
                client.sendall(b"held\r\n.\r\n")
                wait_for(lambda: b"250 2.0.0 Ok: queued as " in client.recv(4096))
                assert time.monotonic() - began < 5
            stopped(relay)
        assert sink.messages == []
        with RelayProcess(policy_file, port, tmp_path / "second.log"):
            wait_for(lambda: arrivals(sink, "held@example.org") == 1)
