"""A message split over several transactions by the upstream's recipient limit."""

from __future__ import annotations

import time
from pathlib import Path

from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_queue_e2e import SMALL, audit_events, configure, send


def test_a_stop_in_the_middle_of_a_split_message_sends_nobody_a_second_copy(
    policy_file: Path, tmp_path: Path
) -> None:
    """With an upstream taking one recipient per transaction, a stop cut the
    attempt off: the replies of its finished transactions were lost with it, and
    those recipients got the message again at the next start."""
    port, upstream = free_port(), free_port()
    policy = configure(policy_file, port, upstream, "workers: 1\n")
    rcpts = [f"r{n}@example.org" for n in range(40)]
    with SinkServer(Sink(most=1, delay=0.05), port=upstream) as sink:
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            send(port, rcpts=tuple(rcpts))
            wait_for(lambda: len(sink.sink.messages) >= 3)
            assert relay.stop() == 0
        assert len(sink.sink.messages) < len(rcpts)  # stopped half-way
        with RelayProcess(policy, port, tmp_path / "relay2.log"):
            got = sink.sink.wait(len(rcpts), timeout=30)
    copies = [rcpt for message in got for rcpt in message.rcpt_tos]
    assert sorted(copies) == sorted(rcpts), "each recipient once"


def test_recipients_over_a_limit_answered_552_5_5_3_are_delivered_in_further_transactions(
    policy_file: Path, tmp_path: Path
) -> None:
    """RFC 821's code for the limit: every recipient past it failed for good, the
    automatic BCC copy too, and the sender got a failure notice."""
    port, upstream = free_port(), free_port()
    policy = configure(policy_file, port, upstream)
    rcpts = ("one@example.org", "two@example.org", "three@example.org")
    over = "552 5.5.3 Too many recipients"
    with (
        SinkServer(Sink(most=2, over_most=over), port=upstream) as sink,
        RelayProcess(policy, port, tmp_path / "relay.log") as relay,
    ):
        qid = send(port, SMALL.replace(b"Subject: Hello", b"Subject: Invoice 1"), rcpts)
        got = sink.sink.wait(2)
        wait_for(lambda: "status=sent" in relay.log())
        time.sleep(0.5)
        assert len(sink.sink.messages) == 2, "no failure notice"
    assert [m.rcpt_tos for m in got] == [list(rcpts[:2]), [rcpts[2], "jan@acme.example"]]
    assert audit_events(policy, qid)[2:] == [
        ("delivered", "one@example.org"),
        ("delivered", "two@example.org"),
        ("delivered", "three@example.org"),
        ("delivered", "jan@acme.example"),
    ]
