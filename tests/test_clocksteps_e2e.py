"""A relay whose wall clock is set six days forward while it runs: the message
queued before keeps the lifetime it had left, in the workers that saw the
step and in those the supervisor starts again after it (``relay.clocksteps``)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests import test_queue_e2e as queue_e2e
from tests.sink import Sink, SinkServer, free_port
from tests.test_metrics import _samples
from tests.test_workers import Relay, kill_worker

# Python run in the relay's processes before it starts: the wall clock read by
# time.time is shifted by the seconds in a file, as ``date -s`` shifts it; the
# clock of time since boot is left as it is
SHIFTED = """
import time
_real = time.time
def _shifted():
    try:
        with open({path!r}) as shift:
            return _real() + float(shift.read() or 0)
    except (OSError, ValueError):
        return _real()
time.time = _shifted
"""


def test_a_worker_started_after_a_step_forward_does_not_expire_the_mail_before_it(
    policy_file: Path, tmp_path: Path
) -> None:
    shift = tmp_path / "shift"
    shift.write_text("0")
    port = free_port()
    sink = Sink(refuse={"one@example.org": "451 4.2.0 try later"})
    with SinkServer(sink) as upstream:
        queue_e2e.configure(policy_file, port, upstream.port, "workers: 2\n")
        relay = Relay(policy_file, port, tmp_path / "relay.log", SHIFTED.format(path=str(shift)))
        try:
            relay.wait_serving()
            queue_id = queue_e2e.send(port)
            deferred = re.compile(
                rf"relay\[(\d+)\] INFO {queue_id}: to=<one@example.org>, .* status=deferred"
            )
            relay.wait_for(lambda: deferred.search(relay.log()) is not None, "deferred")
            shift.write_text(str(6 * 86400))
            seen = "the clock was set forward by 6 days"
            relay.wait_for(lambda: relay.log().count(seen) == 2, "the step seen by both workers")
            time.sleep(3)  # the supervisor looks at the clock each second
            replacements = {kill_worker(relay, 0)[0], kill_worker(relay, 1)[0]}
            relay.wait_for(
                lambda: any(int(pid) in replacements for pid in deferred.findall(relay.log())),
                "deferred again by a worker started after the step",
            )
            assert "status=expired" not in relay.log()
            assert relay.log().count(seen) == 2  # the new workers knew it already
        finally:
            relay.stop()


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two workers"])
def test_the_oldest_messages_age_in_the_metrics_is_time_that_passed(
    policy_file: Path, tmp_path: Path, workers: int
) -> None:
    """The gauge read the age off the clock: six days old the moment the clock
    was set forward, while the relay gave the message the lifetime it had left,
    so ``RelayQueueOld`` fired for mail minutes old."""
    shift = tmp_path / "shift"
    shift.write_text("0")
    port, metrics = free_port(), free_port()
    sink = Sink(refuse={"one@example.org": "451 4.2.0 try later"})
    with SinkServer(sink) as upstream:
        extra = f"workers: {workers}\nmetrics: {{address: 127.0.0.1, port: {metrics}}}\n"
        queue_e2e.configure(policy_file, port, upstream.port, extra)
        relay = Relay(policy_file, port, tmp_path / "relay.log", SHIFTED.format(path=str(shift)))
        try:
            relay.wait_serving()
            queue_id = queue_e2e.send(port)
            relay.wait_for(lambda: f"{queue_id}: to=<one@example.org>" in relay.log(), "deferred")
            shift.write_text(str(6 * 86400))
            seen = "the clock was set forward by 6 days"
            relay.wait_for(lambda: relay.log().count(seen) == workers, "the step seen")
            time.sleep(2)  # the supervisor looks at the clock each second
            oldest = ("relay_queue_oldest_message_age_seconds", (("queue", "deferred"),))
            age = _samples(metrics)[oldest]  # there, not 0.0 for a gauge gone
            assert 0 <= age < 600, f"{age} s"
        finally:
            relay.stop()
