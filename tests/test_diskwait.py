"""A disk that hangs under the relay's fsyncs (``tests.slowdisk``): the log, ``/readyz``
and the metrics say so while the clients wait, and say when it answers again."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import diskwait
from relay.diskwait import SLOW, DiskWaits
from relay.diskwatch import DiskWatch
from relay.policy.load import load
from relay.spool import Spool
from tests.relayproc import RelayProcess, in_data, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.slowdisk import slow_disk
from tests.test_metrics import _get, _metrics_policy, _samples, _value
from tests.test_server import _accepts

ROOT = Path(__file__).resolve().parent.parent
WARNED = "a write to the disk has not finished for"
ENDED = "the write to the disk that waited ended after about"

OVERLAPPING = """
import os, sys, threading, time
from relay import diskwait

waits = diskwait.DiskWaits(1)
waits.use(0)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
until = time.monotonic() + 2.0

def fsyncs(offset):
    time.sleep(offset)
    while time.monotonic() < until:
        diskwait.fsync(fd)

threads = [threading.Thread(target=fsyncs, args=(offset,)) for offset in (0.0, 0.1)]
for thread in threads:
    thread.start()
seen = 0.0
while any(thread.is_alive() for thread in threads):
    waiting = waits.longest()
    if waiting is not None:
        seen = max(seen, waiting.seconds(time.monotonic_ns()))
    time.sleep(0.005)
print(seen)
"""


def test_overlapping_fsyncs_show_the_oldest_one_not_the_busy_spell(tmp_path: Path) -> None:
    """Two threads, each fsyncing for 200 ms in turn, the one 100 ms behind the
    other, for 2 s: some fsync is in progress all the while, but none waits
    longer than 200 ms, and neither may the age read from the table."""
    env, _ = slow_disk(tmp_path, delay_ms=200)
    done = subprocess.run(
        [sys.executable, "-c", OVERLAPPING, str(tmp_path / "file")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = float(done.stdout)
    assert 0.15 < seen < 0.4, seen


def _offer(port: int, replies: list[int]) -> None:
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    client.ehlo()
    client.mail("jan@acme.example")
    client.rcpt("one@example.org")
    replies.append(client.data(b"Subject: hello\r\n\r\nhello\r\n")[0])
    with contextlib.suppress(smtplib.SMTPServerDisconnected):  # a relay that stops
        client.quit()
    client.close()


@dataclass
class _Slow:
    relay: RelayProcess
    port: int
    metrics: int
    delay: Path  # what the fsyncs wait for: "0", or "-1" to hang
    sink: SinkServer


@contextlib.contextmanager
def _relay_on_slow_disk(
    policy_file: Path, tmp_path: Path, workers: int = 2, prelude: str = ""
) -> Iterator[_Slow]:
    """A relay whose fsyncs wait as its delay file says (``slow_disk``), serving."""
    env, delay = slow_disk(tmp_path)
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=workers)
        log = tmp_path / "relay.log"
        with RelayProcess(policy, port, log, env=env, prelude=prelude) as relay:
            wait_for(lambda: f"metrics on http://127.0.0.1:{metrics}/metrics" in relay.log())
            yield _Slow(relay, port, metrics, delay, sink)


@pytest.mark.parametrize("workers", [2, 1])
def test_a_hung_disk_is_said_while_the_client_waits_and_when_it_answers(
    policy_file: Path, tmp_path: Path, workers: int
) -> None:
    """Every fsync hung: the client waits for its 250, and the log had no line,
    ``/readyz`` said 200 and no metric moved. Now a WARNING names the process
    and the state directory, ``/readyz`` is 503 saying how long, the gauge is
    past 5 s; once the disk answers, an INFO line, 200, the 250 and the delivery."""
    with _relay_on_slow_disk(policy_file, tmp_path, workers) as slow:
        relay, port, metrics, delay = slow.relay, slow.port, slow.metrics, slow.delay
        state = load(relay.policy).queue.directory.parent
        assert _get(metrics, "/readyz")[0] == 200
        assert _value(_samples(metrics), "relay_disk_write_waiting_seconds") == 0
        delay.write_text("-1")
        replies: list[int] = []
        client = threading.Thread(target=_offer, args=(port, replies))
        client.start()
        wait_for(lambda: WARNED in relay.log())
        warning = next(line for line in relay.log().splitlines() if WARNED in line)
        assert "WARNING" in warning or "<4>" in warning or "warning" in warning.lower()
        assert f"the disk under {state} is slow or not answering" in warning, warning
        assert ("worker " if workers > 1 else "the relay (pid ") in warning, warning
        code, body, _ = _get(metrics, "/readyz")
        assert code == 503, body
        said = json.loads(body)["checks"]["disk"]
        assert f"a write to the disk under {state} has not finished for" in said, said
        assert _value(_samples(metrics), "relay_disk_write_waiting_seconds") > 5
        assert replies == []  # still waiting for its 250
        delay.write_text("0")
        client.join(60)
        assert replies == [250]
        wait_for(lambda: ENDED in relay.log())
        wait_for(lambda: _get(metrics, "/readyz")[0] == 200)
        assert json.loads(_get(metrics, "/readyz")[1])["checks"]["disk"] == "answering"
        assert _value(_samples(metrics), "relay_disk_write_waiting_seconds") < 5
        slow.sink.sink.wait(1)


def test_a_directory_upstreams_hung_disk_is_not_the_state_disk(
    policy_file: Path, tmp_path: Path
) -> None:
    """An outbox on a disk that hangs holds its deliveries, not the 250: the
    watch warned that clients waited on the state directory's disk, and
    ``/readyz`` said 503, while mail was taken at full speed."""
    env, delay = slow_disk(tmp_path, only="/outbox/")
    port, metrics = free_port(), free_port()
    text = policy_file.read_text().replace("port: 2525", f"port: {port}")
    extra = f"workers: 2\nmetrics: {{address: 127.0.0.1, port: {metrics}}}\n"
    policy_file.write_text(text + extra)
    outbox = load(policy_file).upstreams["default"].path
    with RelayProcess(policy_file, port, tmp_path / "relay.log", env=env) as relay:
        wait_for(lambda: f"metrics on http://127.0.0.1:{metrics}/metrics" in relay.log())
        delay.write_text("-1")
        replies: list[int] = []
        _offer(port, replies)
        assert replies == [250]
        wait_for(lambda: outbox.is_dir() and any(outbox.iterdir()))  # its file, waiting
        time.sleep(SLOW + 1.5)
        assert not list(outbox.glob("*.eml"))  # still waiting
        assert WARNED not in relay.log()
        assert _get(metrics, "/readyz")[0] == 200
        assert _value(_samples(metrics), "relay_disk_write_waiting_seconds") == 0
        delay.write_text("0")
        wait_for(lambda: len(list(outbox.glob("*.eml"))) == 1)


def test_a_minute_between_warnings_the_next_counting_those_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disk that hangs again and again warned of each time floods the journal:
    one WARNING a minute per process, its INFO when that write ends, and the
    next WARNING counts the slow writes in between. Driven through the shared
    table, as a worker's fsync writes it."""
    waits = DiskWaits(2)
    watch = DiskWatch(waits, lambda: Path("/srv/state"))
    slot = waits.width + 1  # worker 1's first thread
    waits.words[waits.width] = 4242  # its pid
    second = 1_000_000_000
    start = 100 * second

    def hang(began: int, looked: int) -> list[str]:
        caplog.clear()
        waits.words[slot] = began
        watch.look(looked)
        waits.words[slot] = 0
        watch.look(looked + second)
        return [f"{r.levelname} {r.getMessage()}" for r in caplog.records]

    with caplog.at_level(logging.INFO, logger="relay"):
        assert hang(start, start + 4 * second) == []  # under 5 s: not slow yet
        said = hang(start, start + 6 * second)
        assert said == [
            "WARNING worker 1 (pid 4242): a write to the disk has not finished for 6s: its"
            " clients wait for their 250 meanwhile; the disk under /srv/state is slow or not"
            " answering",
            "INFO worker 1 (pid 4242): the write to the disk that waited ended after about 7s",
        ], said
        assert hang(start + 20 * second, start + 30 * second) == []
        assert hang(start + 40 * second, start + 50 * second) == []
        said = hang(start + 60 * second, start + 70 * second)
        assert len(said) == 2 and said[0].endswith(
            "(2 more since the last such line, not logged)"
        ), said


SECOND = 1_000_000_000


def _a_write_since_100s() -> tuple[DiskWaits, DiskWatch]:
    """Worker 1, pid 4242, in a write begun at 100 s of the monotonic clock."""
    waits = DiskWaits(2)
    watch = DiskWatch(waits, lambda: Path("/srv/state"))
    waits.words[waits.width] = 4242
    waits.words[waits.width + 1] = 100 * SECOND
    return waits, watch


def test_a_write_is_warned_of_at_5s_not_before(caplog: pytest.LogCaptureFixture) -> None:
    _, watch = _a_write_since_100s()
    with caplog.at_level(logging.INFO, logger="relay"):
        watch.look(105 * SECOND - 1)
        assert caplog.records == []
        watch.look(105 * SECOND)
    assert [r.getMessage() for r in caplog.records] == [
        "worker 1 (pid 4242): a write to the disk has not finished for 5s: its clients wait"
        " for their 250 meanwhile; the disk under /srv/state is slow or not answering"
    ]


def test_the_supervisors_writes_are_kept_for_the_log_from_5s() -> None:
    """Its own fsyncs, said when its loop comes round: those under 5 s are not slow."""
    waits = DiskWaits(1)
    waits.use(waits.supervisor, keep_ended=True)
    try:
        diskwait._note_end(time.monotonic_ns() - 4 * SECOND)
        assert diskwait.ended() == []
        diskwait._note_end(time.monotonic_ns() - 6 * SECOND)
        assert len(diskwait.ended()) == 1
    finally:
        diskwait._forgotten()


def test_the_oldest_of_a_workers_writes_is_the_one_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its second thread's write, begun 3 s later, is not what its clients wait for longest."""
    waits, watch = _a_write_since_100s()
    waits.words[waits.width + 2] = 103 * SECOND
    with caplog.at_level(logging.INFO, logger="relay"):
        watch.look(106 * SECOND)
    assert waits.longest() == diskwait.Waiting(1, 4242, 100 * SECOND)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("worker 1 (pid 4242): a write to the disk has not finished for 6s:")


def test_a_write_counted_while_quiet_and_then_warned_of_is_not_counted_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Slow within the minute after a warning, it is counted; still slow once
    the minute is over, it is the one warned of, not one more besides."""
    waits, watch = _a_write_since_100s()
    slot = waits.width + 1
    with caplog.at_level(logging.INFO, logger="relay"):
        watch.look(106 * SECOND)
        waits.words[slot] = 0
        watch.look(107 * SECOND)
        waits.words[slot] = 130 * SECOND
        watch.look(136 * SECOND)  # slow, 30 s after the warning: counted
        watch.look(170 * SECOND)  # still waiting, the minute over: warned of
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[1].endswith(
        "has not finished for 40s: its clients wait for their 250 meanwhile;"
        " the disk under /srv/state is slow or not answering"
    ), warnings


@pytest.mark.parametrize(
    ("looks", "ended", "said"),
    [(range(106, 111), 111, "about 11s"), (range(106, 107), 140, "6s to 40s")],
    ids=["at-each-second", "a-look-late"],
)
def test_the_end_of_a_write_says_how_long_it_took_as_far_as_the_looks_tell(
    caplog: pytest.LogCaptureFixture, looks: range, ended: int, said: str
) -> None:
    """The supervisor's loop, held by its own write, came round 33 s after a
    worker's write of 7 s had ended: "ended after about 40s". A write seen
    waiting at each look ends after about its length; one whose end a look
    came late to, after a range from the last look that saw it."""
    waits, watch = _a_write_since_100s()
    with caplog.at_level(logging.INFO, logger="relay"):
        for second in looks:
            watch.look(second * SECOND)
        waits.words[waits.width + 1] = 0
        watch.look(ended * SECOND)
    assert caplog.records[-1].getMessage() == (
        f"worker 1 (pid 4242): the write to the disk that waited ended after {said}"
    )


def test_a_worker_killed_in_its_write_is_not_said_to_have_ended_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Killed while its write hung, a worker got "the write ... ended after about
    12s", named by its replacement's pid. Whether the write finished before the
    process ended cannot be seen: what was seen is said."""
    waits, watch = _a_write_since_100s()
    with caplog.at_level(logging.INFO, logger="relay"):
        watch.look(106 * SECOND)
        waits.clear(1)
        watch.look(107 * SECOND)
        waits.words[waits.width] = 4343  # its replacement
        watch.look(108 * SECOND)
    assert [r.getMessage() for r in caplog.records][1:] == [
        "worker 1 (pid 4242) has ended; its write to the disk was still waiting when last"
        " looked at, after 6s"
    ]


def test_the_supervisors_own_slow_writes_are_said_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    waits = DiskWaits(2)
    watch = DiskWatch(waits, lambda: Path("/srv/state"))
    second = 1_000_000_000
    waits.use(waits.supervisor, keep_ended=True)
    try:
        with caplog.at_level(logging.INFO, logger="relay"):
            for at in (100, 113, 126, 170):
                diskwait._ended.append(((at - 6) * second, at * second))  # as _note_end keeps it
                watch.look(at * second)
    finally:
        diskwait._forgotten()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert said[1].endswith("(2 more since the last such line, not logged)"), said


def test_the_supervisors_last_look_says_a_slow_write_within_the_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its look as it exits comes after the stop's: a slow write counted there
    for a line a minute later was never said."""
    waits = DiskWaits(1)
    watch = DiskWatch(waits, lambda: Path("/srv/state"))
    waits.use(waits.supervisor, keep_ended=True)
    try:
        with caplog.at_level(logging.INFO, logger="relay"):
            for at, last in ((100, False), (120, True)):
                diskwait._ended.append(((at - 9) * SECOND, at * SECOND))  # as _note_end keeps it
                watch.look(at * SECOND, last=last)
    finally:
        diskwait._forgotten()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "a write to the disk took 9s to finish" in said[1], said


def test_the_supervisor_says_its_own_slow_write_when_its_loop_comes_round(
    policy_file: Path, tmp_path: Path
) -> None:
    """A SIGHUP while the disk hangs blocks the supervisor in its reload's audit
    record: ``/readyz`` said 200 all the while. It names the supervisor's write
    now, and the log says how long it took once the loop comes round again."""
    with _relay_on_slow_disk(policy_file, tmp_path) as slow:
        relay, metrics, delay = slow.relay, slow.metrics, slow.delay
        delay.write_text("-1")
        relay.signal(signal.SIGHUP)
        wait_for(lambda: _get(metrics, "/readyz")[0] == 503)
        said = json.loads(_get(metrics, "/readyz")[1])["checks"]["disk"]
        assert said.startswith("the supervisor (pid "), said
        wait_for(lambda: _value(_samples(metrics), "relay_disk_write_waiting_seconds") > 5)
        delay.write_text("0")
        relay.wait_reloaded(1)
        wait_for(lambda: "a write to the disk took " in relay.log())
        line = next(x for x in relay.log().splitlines() if "a write to the disk took " in x)
        assert "the supervisor (pid " in line and "WARNING" in line, line
        wait_for(lambda: _get(metrics, "/readyz")[0] == 200)


def test_a_worker_waiting_for_the_disk_through_the_stop_is_said(
    policy_file: Path, tmp_path: Path
) -> None:
    """SIGTERM while a worker's write hangs: the stop waits for it, up to its
    timeout, and the log said nothing of why meanwhile."""
    with _relay_on_slow_disk(policy_file, tmp_path) as slow:
        relay, port, metrics, delay = slow.relay, slow.port, slow.metrics, slow.delay
        delay.write_text("-1")
        replies: list[int] = []
        client = threading.Thread(target=_offer, args=(port, replies))
        client.start()
        wait_for(lambda: _value(_samples(metrics), "relay_disk_write_waiting_seconds") > 0)
        relay.signal(signal.SIGTERM)
        wait_for(lambda: WARNED in relay.log())
        delay.write_text("0")
        client.join(60)
        assert replies == [250]
        assert relay.stop() == 0


def test_a_stop_while_the_supervisors_reload_record_hangs_is_said_and_passed_on_at_once(
    policy_file: Path, tmp_path: Path
) -> None:
    """SIGHUP, then SIGTERM, while the disk hangs: the supervisor, held in its
    reload's audit record, neither logged the stop nor passed it on until the
    disk answered, and its workers kept taking clients that waited for a 250.
    Now both happen at once; the message in DATA then is taken, and once the
    disk answers it gets its 250 and stays queued, the record is written and
    the chain is whole."""
    with _relay_on_slow_disk(policy_file, tmp_path) as slow:
        relay, port, metrics, delay = slow.relay, slow.port, slow.metrics, slow.delay
        state = load(relay.policy).queue.directory.parent
        delay.write_text("-1")
        relay.signal(signal.SIGHUP)
        wait_for(lambda: _get(metrics, "/readyz")[0] == 503)
        assert json.loads(_get(metrics, "/readyz")[1])["checks"]["disk"].startswith(
            "the supervisor (pid "
        )
        with in_data(port) as client:
            relay.signal(signal.SIGTERM)
            wait_for(lambda: "INFO stopping: telling 2 workers" in relay.log(), timeout=5)
            wait_for(lambda: relay.log().count("INFO stopping: no new connections") == 2, 5)
            wait_for(lambda: not _accepts(port), timeout=5)
            client.sendall(b"hello\r\n.\r\n")  # its write waits for the disk too
            time.sleep(0.5)
            delay.write_text("0")
            assert client.recv(512).startswith(b"250 ")
        assert relay.proc is not None and relay.proc.wait(30) == 0
    text = relay.log()
    assert "policy reloaded" not in text and "Traceback" not in text, text
    assert "reload to policy " in text and text.rstrip().endswith("INFO stopped"), text
    assert len(Spool(state / "queue").ids()) == 1
    verified = subprocess.run(
        [sys.executable, "-m", "relay", "audit", "verify", "-c", str(relay.policy)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    found = subprocess.run(
        [sys.executable, "-m", "relay", "audit", "search", "-c", str(relay.policy),
         "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    )  # fmt: skip
    events = [json.loads(line)["event"] for line in found.stdout.splitlines() if line.strip()]
    assert events.count("policy_loaded") == 2, events


UPKEEP_SOON = "import relay.supervisor as supervisor\nsupervisor.AUDIT_UPKEEP = 2.0"


def test_a_stop_during_the_audit_logs_compression_waits_for_it(
    policy_file: Path, tmp_path: Path
) -> None:
    """The daily upkeep, which compresses closed days, ran in the thread a stop
    is taken in: a stop meanwhile ended the relay 20 s later with a large day's
    compression cut off, its temporary file left in the audit log's directory
    for good, and an ERROR that blamed a healthy disk. A stop waits for it, as
    it did before."""
    env, delay = slow_disk(tmp_path, only=".tmp")
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with policy.open("a") as out:
            out.write("audit: {compress_after_days: 1}\n")
        audit = load(policy).audit.directory
        log = tmp_path / "relay.log"
        with RelayProcess(policy, port, log, env=env, prelude=UPKEEP_SOON) as relay:
            wait_for(lambda: "metrics on" in relay.log())
            delay.write_text("3000")  # the compression's fsync: a large day, on a healthy disk
            day = tmp_path / "day"
            day.write_bytes(b'{"seq": 1}\n' * 1000)
            day.replace(audit / "audit-2026-11-01.jsonl")
            wait_for(lambda: any(p.name.endswith(".tmp") for p in audit.iterdir()), timeout=30)
            relay.signal(signal.SIGTERM)
            assert relay.proc is not None and relay.proc.wait(60) == 0
            text = relay.log()
    assert text.index("compressed audit-2026-11-01.jsonl") < text.index("stopping: telling")
    assert not [p.name for p in audit.iterdir() if p.name.endswith(".tmp")]
    assert "ERROR" not in text, text


def _stop_in_the_supervisors_hung_write(slow: _Slow, sighup: bool = True) -> None:
    """The supervisor held in its own write to the audit log (a reload's record,
    with ``sighup``), then SIGTERM: the workers stop, the supervisor waits for it."""
    if sighup:
        slow.delay.write_text("-1")
        slow.relay.signal(signal.SIGHUP)
    wait_for(lambda: _get(slow.metrics, "/readyz")[0] == 503)
    assert json.loads(_get(slow.metrics, "/readyz")[1])["checks"]["disk"].startswith(
        "the supervisor (pid "
    )
    slow.relay.signal(signal.SIGTERM)
    waiting = "stopping: waiting for the supervisor's write to the audit log"
    wait_for(lambda: waiting in slow.relay.log(), timeout=20)


def test_the_supervisors_slow_write_that_ends_during_the_stop_is_said(
    policy_file: Path, tmp_path: Path
) -> None:
    """Its write, hung past 5 s, ended as the stop waited for it: the relay said
    "stopped" and nothing of the slow disk, which its loop would have said."""
    with _relay_on_slow_disk(policy_file, tmp_path) as slow:
        began = time.monotonic()
        _stop_in_the_supervisors_hung_write(slow)
        time.sleep(max(0.0, began + SLOW + 1 - time.monotonic()))
        slow.delay.write_text("0")
        assert slow.relay.proc is not None and slow.relay.proc.wait(30) == 0
    text = slow.relay.log()
    took = [line for line in text.splitlines() if "a write to the disk took " in line]
    assert len(took) == 1 and "WARNING the supervisor (pid " in took[0], text
    assert text.index(took[0]) < text.rindex("INFO stopped"), text
    assert text.rstrip().endswith("INFO stopped"), text


def test_the_supervisors_write_that_never_ends_is_said_as_it_exits(
    policy_file: Path, tmp_path: Path
) -> None:
    """The stop gives up waiting for it: the log says so, naming the disk."""
    prelude = "import relay.supervisor as supervisor\nsupervisor.STOP_TIMEOUT = 3.0"
    with _relay_on_slow_disk(policy_file, tmp_path, prelude=prelude) as slow:
        _stop_in_the_supervisors_hung_write(slow)
        assert slow.relay.proc is not None and slow.relay.proc.wait(30) == 0
        state = load(slow.relay.policy).queue.directory.parent
    text = slow.relay.log()
    assert (
        "ERROR the supervisor's write to the audit log did not end within 3s of the stop:"
        f" exiting without it; the disk under {state} is slow or not answering"
    ) in text, text
    assert "a write to the disk took " not in text and text.rstrip().endswith("INFO stopped")


def test_status_names_the_policy_the_workers_stop_on_after_a_reload_not_passed_on(
    policy_file: Path, tmp_path: Path
) -> None:
    """A reload whose record hung when the stop came is not passed on to the
    workers, which stop on the policy they ran: ``relay status`` named the
    reload's, and the running relay's text for the tools was the reload's."""
    with _relay_on_slow_disk(policy_file, tmp_path) as slow:
        policy = slow.relay.policy
        old = load(policy).digest
        policy.write_text(policy.read_text() + "# edited\n")
        new = load(policy).digest
        assert new != old
        state = load(policy).queue.directory.parent
        _stop_in_the_supervisors_hung_write(slow)
        assert f"reload to policy {new[:12]} not passed on to the workers" in slow.relay.log()
        done = subprocess.run(
            [sys.executable, "-m", "relay", "status", "-c", str(policy)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        checked = json.loads((state / "policy.checked.files").read_text())
        samples = _samples(slow.metrics)
        slow.delay.write_text("0")
        assert slow.relay.proc is not None and slow.relay.proc.wait(30) == 0
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0].startswith("relay: stopping, PID "), done
    assert lines[1] == (
        f"policy: {old[:12]} in use; {policy} now reads {new[:12]}: the next start puts it in use"
    ), lines
    assert checked["digest"] == old, checked
    assert _value(samples, "relay_policy_info", version=old[:12]) == 1, samples


def test_status_while_a_reload_record_hangs_agrees_with_the_tools(
    policy_file: Path, tmp_path: Path
) -> None:
    """Switched to the new policy only once its record was written, the supervisor
    left ``relay status`` naming the old one while the tools' copy was the new:
    status took the new ``workers: 3`` for workers dying."""
    with _relay_on_slow_disk(policy_file, tmp_path) as slow:
        policy = slow.relay.policy
        text = policy.read_text()
        assert "workers: 2\n" in text
        policy.write_text(text.replace("workers: 2\n", "workers: 3\n"))
        new = load(policy).digest
        state = load(policy).queue.directory.parent
        slow.delay.write_text("-1")
        slow.relay.signal(signal.SIGHUP)
        wait_for(lambda: _get(slow.metrics, "/readyz")[0] == 503)
        done = subprocess.run(
            [sys.executable, "-m", "relay", "status", "-c", str(policy)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        checked = json.loads((state / "policy.checked.files").read_text())
        slow.delay.write_text("0")
        slow.relay.wait_reloaded(1)
    assert checked["digest"] == new, checked
    assert done.returncode == 0, done
    assert "starting again" not in done.stdout, done.stdout
    assert f"policy: {new[:12]} in use" in done.stdout, done.stdout


def test_a_worker_dead_while_the_disk_hangs_is_not_said_to_start_again_after_a_stop(
    policy_file: Path, tmp_path: Path
) -> None:
    """Killed while the disk hung, a worker was logged "starting a new one in 1s";
    the supervisor, settling its mail, took a stop meanwhile, and none was
    started: the log said so of none. Nor may one be started after the stop."""
    with _relay_on_slow_disk(policy_file, tmp_path) as slow:
        started = re.compile(r"INFO worker 1 started \(pid (\d+)\)$", re.M)
        (victim,) = map(int, started.findall(slow.relay.log()))
        slow.delay.write_text("-1")
        os.kill(victim, signal.SIGKILL)
        died = f"worker 1 (pid {victim}) was killed by SIGKILL; starting a new one in 1s"
        wait_for(lambda: died in slow.relay.log())
        _stop_in_the_supervisors_hung_write(slow, sighup=False)
        slow.delay.write_text("0")
        assert slow.relay.proc is not None and slow.relay.proc.wait(30) == 0
    text = slow.relay.log()
    assert started.findall(text) == [str(victim)], text
    said = [line.split(" INFO ")[-1] for line in text.splitlines() if f"(pid {victim})" in line]
    assert said[-1] == (
        f"worker 1 (pid {victim}): no new one is started after all: the relay is stopping"
    ), text
    assert text.index(said[-1]) > text.index("INFO stopping: telling 1 worker"), text
