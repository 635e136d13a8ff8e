"""The metrics' counts as the audit log's day files grow, are cut, torn and roll over."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from relay.audit import AuditLog, events
from relay.audit.reader import TORN_END
from relay.engine import RESCAN
from relay.metrics import follow, status
from relay.metrics.follow import RECENT, UNKNOWN, UNLINKED_WAIT, AuditFollower
from tests.test_audit_fixture import received

DAY1 = "audit-2026-12-02.jsonl"
DAY2 = "audit-2026-12-03.jsonl"


def _line(event: str, queue_id: str, seq: int = 0, **fields: object) -> bytes:
    record = {"v": 1, "seq": seq, "event": event, "queue_id": queue_id, **fields}
    record.update(prev=f"{seq - 1:064x}", hash=f"{seq:064x}")
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _append(directory: Path, name: str, *lines: bytes) -> None:
    with open(directory / name, "ab") as log:
        log.write(b"".join(lines))


def _message(queue_id: str, tenant: str, *recipients: str) -> list[bytes]:
    return [
        _line("received", queue_id, tenant=tenant),
        _line("queued", queue_id, recipients=list(recipients)),
    ]


def test_counting_starts_at_the_end_of_the_log_as_found(tmp_path: Path) -> None:
    _append(tmp_path, DAY1, *_message("A", "acme", "x@example.org"))
    follower = AuditFollower(tmp_path)
    assert follower.update().received == {}
    _append(tmp_path, DAY1, *_message("B", "acme", "y@example.org"))
    assert follower.update().received == {"acme": 1}
    assert follower.update().received == {"acme": 1}  # read once


def test_a_line_still_being_written_waits_for_its_end(tmp_path: Path) -> None:
    follower = AuditFollower(tmp_path)
    line = _line("received", "A", tenant="acme")
    _append(tmp_path, DAY1, line[:10])
    assert follower.update().received == {}
    _append(tmp_path, DAY1, line[10:])
    counts = follower.update()
    assert counts.received == {"acme": 1} and counts.unreadable == 0


def test_the_next_days_file_is_followed_after_the_rest_of_the_last(tmp_path: Path) -> None:
    _append(tmp_path, DAY1, b"")
    follower = AuditFollower(tmp_path)
    _append(tmp_path, DAY1, *_message("A", "acme", "x@example.org"))
    _append(tmp_path, DAY2, *_message("B", "globex", "y@example.org"))
    _append(tmp_path, DAY2, _line("delivered", "A", recipient="x@example.org"))
    counts = follower.update()
    assert counts.received == {"acme": 1, "globex": 1}
    assert counts.deliveries == {("acme", "sent"): 1}


def test_the_days_before_the_one_followed_are_not_read_again(tmp_path: Path) -> None:
    """Once the next day's file is followed, every scrape after the first of the
    new day read the earlier ones again from their start, each message of
    them counted once more."""
    _append(tmp_path, DAY1, b"")
    follower = AuditFollower(tmp_path)
    _append(tmp_path, DAY1, *_message("A", "acme", "x@example.org"))
    _append(tmp_path, DAY2, *_message("B", "globex", "y@example.org"))
    assert follower.update().received == {"acme": 1, "globex": 1}
    records = follower.counts.records
    _append(tmp_path, DAY2, *_message("C", "globex", "z@example.org"))
    counts = follower.update()
    assert counts.received == {"acme": 1, "globex": 2}
    assert counts.records == records + 2


def test_outcomes_and_late_reports_carry_the_messages_tenant(tmp_path: Path) -> None:
    """Deliveries in Postfix's words; the failure notice is its tenant's too; a
    bounce or complaint after the message ended still finds it; a message never
    seen is ``unknown``, once no link to it can come any more; a message queued
    before the start is known from the queue."""
    clock = _Clock()
    follower = AuditFollower(tmp_path, queued=[("OLD", "globex", 1)], clock=clock)
    _append(
        tmp_path,
        DAY1,
        *_message("A", "acme", "ok@example.org", "gone@example.org", "later@example.org"),
        _line("suppressed", "A", recipient="listed@example.org"),
        _line("delivered", "A", recipient="ok@example.org"),
        _line("failed", "A", recipient="gone@example.org"),
        _line("notified", "A", recipient="jan@acme.example", notice_queue_id="N"),
        _line("delivered", "N", recipient="jan@acme.example"),
        _line("deferred", "A", recipient="later@example.org"),
        _line("expired", "A", recipient="later@example.org"),
        _line("bounced", "A", recipient="ok@example.org"),
        _line("complained", "A", recipient="ok@example.org"),
        _line("delivered", "OLD", recipient="a@example.org"),
        _line("delivered", "NEVER", recipient="b@example.org"),
        _line("rejected", "R1", reply="550 5.7.1 unknown sender"),
        _line("rejected", "R2", reply="451 4.3.0 try again later"),
        _line("rejected", "R3", reply="554 5.7.1 relay access denied"),
    )
    counts = follower.update()
    assert (UNKNOWN, "sent") not in counts.deliveries
    clock.now += UNLINKED_WAIT
    counts = follower.update()
    assert counts.deliveries == {
        ("acme", "suppressed"): 1,
        ("acme", "sent"): 2,
        ("acme", "bounced"): 1,
        ("acme", "deferred"): 1,
        ("acme", "expired"): 1,
        ("globex", "sent"): 1,
        (UNKNOWN, "sent"): 1,
    }
    assert counts.bounces == {"acme": 1} and counts.complaints == {"acme": 1}
    assert counts.rejected == {"5xx": 2, "4xx": 1}
    assert counts.records == 16


def test_a_notices_outcome_before_its_link_is_its_tenants(tmp_path: Path) -> None:
    """An attempt's records the audit log refused are written again at its kept
    entry's turn, after the failure notice it queued was delivered: the
    notice's ``delivered`` record comes before the ``notified`` one that says
    whose it is. It was counted under ``unknown``, and the notice was waited
    for for good; an outcome no link follows is ``unknown`` in the end."""
    clock = _Clock()
    log = AuditLog(tmp_path)
    follower = AuditFollower(tmp_path, clock=clock)
    rcpts = ["ok@example.org", "gone@example.org"]
    log.append_many(_arrived_a(rcpts))
    log.append(_delivered("N", "jan@acme.example"))  # the notice, its link not written yet
    log.append(_delivered("NEVER", "b@example.org"))  # a message no link will name
    assert follower.update().deliveries == {}
    clock.now += UNLINKED_WAIT / 2
    log.append_many([_delivered("A", "ok@example.org"), *_bounced_a_noticed_as_n()])
    assert follower.update().deliveries == {("acme", "sent"): 2, ("acme", "bounced"): 1}
    assert follower._pending == {}
    clock.now += UNLINKED_WAIT / 2
    counts = follower.update()
    assert counts.deliveries[(UNKNOWN, "sent")] == 1 and counts.deliveries[("acme", "sent")] == 2


def test_a_link_written_again_at_the_next_rescan_still_names_the_notice(
    tmp_path: Path,
) -> None:
    """The records of a deferral the audit log refused are written again up to a
    ``RESCAN`` later; the notice delivered meanwhile is its tenant's still."""
    clock = _Clock()
    log = AuditLog(tmp_path)
    follower = AuditFollower(tmp_path, clock=clock)
    log.append_many(_arrived_a(["gone@example.org"]))
    log.append(_delivered("N", "jan@acme.example"))
    follower.update()
    clock.now += RESCAN + 1
    assert follower.update().deliveries == {}
    log.append_many(_bounced_a_noticed_as_n())
    assert follower.update().deliveries == {("acme", "sent"): 1, ("acme", "bounced"): 1}


def test_a_link_after_the_wait_leaves_nothing_waiting(tmp_path: Path) -> None:
    """A ``notified`` record after its notice's outcome was given up on took the
    notice for one yet to end: it was waited for for good."""
    clock = _Clock()
    log = AuditLog(tmp_path)
    follower = AuditFollower(tmp_path, clock=clock)
    rcpts = ["gone@example.org"]
    log.append_many(_arrived_a(rcpts))
    log.append(_delivered("N", "jan@acme.example"))
    follower.update()
    clock.now += UNLINKED_WAIT + 1
    assert follower.update().deliveries == {(UNKNOWN, "sent"): 1}
    log.append_many(_bounced_a_noticed_as_n())
    assert follower.update().deliveries == {(UNKNOWN, "sent"): 1, ("acme", "bounced"): 1}
    assert follower._pending == {}


def test_a_notice_linked_after_the_wait_has_its_tenant_from_then_on(tmp_path: Path) -> None:
    """A late link found the notice given up on and left it ``unknown``: its
    delivery after the link was counted so too."""
    clock = _Clock()
    log = AuditLog(tmp_path)
    follower = AuditFollower(tmp_path, clock=clock)
    rcpts = ["gone@example.org"]
    log.append_many(
        [
            *_arrived_a(rcpts),
            events.deferred(
                queue_id="N", message_id=None, recipient="jan@acme.example",
                reply="451 4.4.1 later", next_attempt="2026-12-07T03:00:00Z",
            ),
        ]
    )  # fmt: skip
    follower.update()
    clock.now += UNLINKED_WAIT + 1
    follower.update()
    log.append(
        events.notified(
            queue_id="A", message_id="<a@acme.example>", recipient="jan@acme.example",
            notice_queue_id="N",
        )
    )  # fmt: skip
    follower.update()
    log.append(_delivered("N", "jan@acme.example"))
    assert follower.update().deliveries == {(UNKNOWN, "deferred"): 1, ("acme", "sent"): 1}
    assert follower._pending == {"A": ["acme", 1, {"gone@example.org"}]}


def test_outcomes_past_the_most_held_are_given_up_on_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted to make room, the oldest was forgotten: its late link made it a
    notice waited for for good."""
    monkeypatch.setattr(follow, "UNLINKED_MAX", 1)
    log = AuditLog(tmp_path)
    follower = AuditFollower(tmp_path, clock=_Clock())
    log.append(_delivered("N", "jan@acme.example"))
    log.append(_delivered("M", "kari@acme.example"))
    assert follower.update().deliveries == {(UNKNOWN, "sent"): 1}
    log.append(
        events.notified(
            queue_id="A", message_id=None, recipient="jan@acme.example", notice_queue_id="N"
        )
    )
    follower.update()
    assert "N" not in follower._pending


def _arrived_a(rcpts: list[str]) -> list[dict]:
    return [
        received(("A", "<a@acme.example>"), "acme", "jan", "invoice", rcpts),
        events.queued(queue_id="A", message_id="<a@acme.example>", recipients=rcpts, size=9),
    ]


def _bounced_a_noticed_as_n() -> list[dict]:
    """gone@ refused for good, and its sender's notice queued as N."""
    return [
        events.failed(
            queue_id="A", message_id="<a@acme.example>", recipient="gone@example.org",
            reply="550 5.1.1 unknown",
        ),
        events.notified(
            queue_id="A", message_id="<a@acme.example>", recipient="jan@acme.example",
            notice_queue_id="N",
        ),
    ]  # fmt: skip


def _delivered(queue_id: str, recipient: str) -> dict:
    return events.delivered(
        queue_id=queue_id, message_id=None, recipient=recipient, upstream="default",
        reply="250 2.0.0 Ok", attempts=1,
    )  # fmt: skip


class _Clock:
    """The follower's monotonic clock, moved on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_recipient_suppressed_while_its_message_waited_ends_it(tmp_path: Path) -> None:
    """A queued recipient listed while its message waited ends ``suppressed``:
    not counted as an end, the message was remembered for good; one suppressed
    at arrival, never queued, ends nothing, or its message was let go early."""
    follower = AuditFollower(tmp_path, queued=[("OLD", "globex", 1)])
    _append(
        tmp_path,
        DAY1,
        *_message("A", "acme", "ok@example.org", "Late@example.org"),
        _line("suppressed", "A", recipient="listed@example.org"),  # at arrival
        _line("delivered", "A", recipient="ok@example.org"),
        _line("suppressed", "A", recipient="late@example.org"),  # while it waited
        _line("suppressed", "OLD", recipient="a@example.org"),
    )
    follower.update()
    assert follower._pending == {}
    _append(
        tmp_path,
        DAY1,
        *_message("B", "acme", "ok@example.org", "other@example.org"),
        _line("suppressed", "B", recipient="listed@example.org"),
        _line("delivered", "B", recipient="ok@example.org"),
    )
    follower.update()
    assert list(follower._pending) == ["B"]  # other@ still to come


def test_finished_messages_are_kept_only_so_long(tmp_path: Path) -> None:
    """The oldest is forgotten, not the newest: a late bounce is mostly the
    latest messages'."""
    follower = AuditFollower(tmp_path)
    lines = []
    for n in range(RECENT + 1):
        lines += [*_message(f"Q{n}", "globex" if n == 0 else "acme", "x@example.org")]
        lines.append(_line("delivered", f"Q{n}", recipient="x@example.org"))
    _append(tmp_path, DAY1, *lines)
    follower.update()
    _append(tmp_path, DAY1, _line("bounced", "Q0"), _line("bounced", f"Q{RECENT}"))
    assert follower.update().bounces == {UNKNOWN: 1, "acme": 1}


def test_a_cut_or_torn_log_is_not_counted_twice(tmp_path: Path) -> None:
    _append(tmp_path, DAY1, *_message("A", "acme", "x@example.org"))
    follower = AuditFollower(tmp_path)
    (tmp_path / DAY1).write_bytes(b"")  # cut by hand
    assert follower.update().received == {}
    _append(tmp_path, DAY1, b'{"v":1,"seq":3,"event":"rec' + TORN_END)
    _append(tmp_path, DAY1, *_message("B", "acme", "y@example.org"))
    counts = follower.update()
    assert counts.received == {"acme": 1} and counts.unreadable == 1


def test_no_log_yet(tmp_path: Path) -> None:
    follower = AuditFollower(tmp_path / "audit")
    assert follower.update().records == 0
    (tmp_path / "audit").mkdir()
    _append(tmp_path / "audit", DAY1, *_message("A", "acme", "x@example.org"))
    assert follower.update().received == {"acme": 1}


def test_a_main_loop_that_stopped_coming_round_is_not_alive() -> None:
    status.beat()
    assert status.alive()
    status.STATUS.beat -= status.ALIVE_WITHIN + 1
    assert not status.alive()


def test_an_outcome_written_again_after_a_crash_counts_once(tmp_path: Path) -> None:
    """A dead worker's replacement writes the outcomes of its last moments again
    (relay.settle): the same record under a new seq and hash."""
    follower = AuditFollower(tmp_path)
    delivered = {"recipient": "x@example.org", "upstream": "default", "reply": "250 ok"}
    _append(
        tmp_path,
        DAY1,
        *_message("A", "acme", "x@example.org", "y@example.org"),
        _line("delivered", "A", 3, **delivered),
        _line("deferred", "A", 4, recipient="y@example.org", reply="450 busy"),
        _line("delivered", "A", 5, **delivered),
        _line("deferred", "A", 6, recipient="y@example.org", reply="450 busy"),
    )
    counts = follower.update()
    assert counts.deliveries == {("acme", "sent"): 1, ("acme", "deferred"): 2}
    assert counts.records == 6


def _compress(directory: Path, name: str) -> None:
    """As the audit log's upkeep does: the .gz complete, then the plain file gone."""
    (directory / f"{name}.gz").write_bytes(gzip.compress((directory / name).read_bytes()))
    (directory / name).unlink()


def test_the_rest_of_a_day_compressed_before_it_was_read_is_counted(tmp_path: Path) -> None:
    _append(tmp_path, DAY1, *_message("A", "acme", "x@example.org"))
    follower = AuditFollower(tmp_path)
    _append(tmp_path, DAY1, *_message("B", "acme", "y@example.org"))
    assert follower.update().received == {"acme": 1}
    _append(tmp_path, DAY1, *_message("C", "acme", "z@example.org"), b'{"v":1,"seq":9,')
    _append(tmp_path, DAY2, *_message("D", "globex", "w@example.org"))
    _compress(tmp_path, DAY1)
    counts = follower.update()
    assert counts.received == {"acme": 2, "globex": 1} and counts.unreadable == 0


def test_a_compressed_day_before_the_start_is_not_counted(tmp_path: Path) -> None:
    for n in range(50):
        _append(tmp_path, DAY1, *_message(f"A{n}", "acme", "x@example.org"))
    _compress(tmp_path, DAY1)
    follower = AuditFollower(tmp_path)
    assert follower.update().received == {}
    _append(tmp_path, DAY2, *_message("B", "acme", "y@example.org"))
    assert follower.update().received == {"acme": 1}


def test_a_backlog_is_read_a_piece_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape after a long gap read the whole backlog at once, three copies of
    it in memory, which the supervisor kept: now a piece at a time, lines cut
    between pieces counted once, in plain and compressed days alike."""
    from relay.metrics import follow

    reads: list[int] = []
    pread = os.pread
    monkeypatch.setattr(follow, "CHUNK", 100)
    monkeypatch.setattr(follow.os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    _append(tmp_path, DAY1, b"")
    follower = AuditFollower(tmp_path)
    for n in range(40):
        _append(tmp_path, DAY1, *_message(f"A{n}", "acme", "x@example.org"))
    counts = follower.update()
    assert counts.received == {"acme": 40} and counts.unreadable == 0
    assert reads and max(reads) <= 100
    for n in range(40):
        _append(tmp_path, DAY1, *_message(f"B{n}", "globex", "y@example.org"))
    _append(tmp_path, DAY2, b"")
    _compress(tmp_path, DAY1)
    counts = follower.update()
    assert counts.received == {"acme": 40, "globex": 40} and counts.unreadable == 0
