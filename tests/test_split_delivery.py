"""A message split over several transactions by the upstream's recipient limit."""

from __future__ import annotations

from pathlib import Path

from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_queue_e2e import configure, send


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
