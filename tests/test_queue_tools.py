"""The queue commands against a real spool, as a sysadmin would run them."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from relay.audit import AuditError, AuditLog
from relay.queueid import new_queue_id
from relay.record import Recorder
from relay.spool import DELIVERED, QueueEntry, Spool, tools
from tests import spoolkit
from tests.readonly import read_only
from tests.spoolkit import locked_elsewhere
from tests.test_audit_fixture import read_all

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"From: alice@acme.example\r\nSubject: Invoice 7\r\n\r\nSECRET BODY\r\n"
ARRIVAL = 1_795_000_000.0


#: ``relay queue delete`` where what it records is not the question
unaudited_delete = functools.partial(tools.delete, record=lambda queue_id, entry: None)


def make_entry(queue_id: str | None = None, **changes: object) -> QueueEntry:
    """Entries at a fixed arrival time, so listings can be pinned exactly."""
    return spoolkit.make_entry(queue_id, arrival=ARRIVAL, next_attempt=ARRIVAL + 600, **changes)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def two(spool: Spool) -> list[QueueEntry]:
    """An older entry with one recipient deferred and one delivered, and a newer one."""
    first = make_entry(new_queue_id(now_ns=int(ARRIVAL * 1e9)))
    first.recipients[0].reply = "451 4.7.1 Greylisted, \x1b[31mtry later"
    first.recipients[1].status = DELIVERED
    first.recipients[1].reply = "250 2.0.0 Ok"
    second = make_entry(new_queue_id(), mail_from="", size=2000, tenant="globex")
    for entry in (first, second):
        spool.put(entry, MESSAGE)
    return [first, second]


def run(
    command: object, spool: Spool, *args: object, stdin: str = "", **options: object
) -> tuple[tools.Outcome, str, str]:
    out, err = io.StringIO(), io.StringIO()
    outcome = command(spool, *args, out, err, io.StringIO(stdin), **options)  # type: ignore[operator]
    return outcome, out.getvalue(), err.getvalue()


def listing(spool: Spool, as_json: bool = False) -> str:
    out = io.StringIO()
    assert tools.list_queue(spool, out, as_json=as_json) == 0
    return out.getvalue()


def test_empty_queue(spool: Spool) -> None:
    assert listing(spool) == "Mail queue is empty\n"
    assert listing(spool, as_json=True) == ""


def test_list_like_mailq(spool: Spool, two: list[QueueEntry]) -> None:
    first, second = two
    lines = listing(spool).splitlines()
    assert lines[0].startswith("-Queue ID-") and lines[0].endswith("-Sender/Recipient-------")
    when = time.strftime("%a %b %d %H:%M:%S %z", time.localtime(ARRIVAL))
    assert lines[1].split() == [first.queue_id, "3000", *when.split(), "bounces@platform.example"]
    assert lines[2].strip() == "(451 4.7.1 Greylisted, ?[31mtry later)"
    assert lines[3].strip() == "customer@example.net"
    assert lines[3].index("customer") == lines[1].index("bounces@")
    assert lines[4] == ""
    assert lines[5].split()[0] == second.queue_id
    assert lines[5].endswith(" MAILER-DAEMON")
    assert [line.strip() for line in lines[6:8]] == [
        "customer@example.net",
        "archive@acme.example",
    ]
    assert lines[-1] == "-- 4 Kbytes in 2 Requests."
    assert "archive@acme.example" not in "\n".join(lines[:5])  # delivered: not listed


#: 2026-10-25 00:30 UTC: 02:30 in Berlin's summer time, an hour before 02:30 in its winter time
FALL_BACK = 1_792_888_200.0


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Central European time, written out so that no zone database is needed."""
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_list_tells_apart_the_hour_that_repeats_when_summer_time_ends(
    spool: Spool, berlin: None
) -> None:
    """Both listed as ``Sun Oct 25 02:30:00``: which came first, and which
    lines of the relay's log (which give the offset) are whose, could not be told."""
    for arrival in (FALL_BACK, FALL_BACK + 3600):
        entry = spoolkit.make_entry(
            new_queue_id(now_ns=int(arrival * 1e9)), arrival=arrival, next_attempt=arrival
        )
        spool.put(entry, MESSAGE)
    lines = listing(spool).splitlines()
    first, second = lines[1], lines[5]
    assert " ".join(first.split()[2:7]) == "Sun Oct 25 02:30:00 +0200"
    assert " ".join(second.split()[2:7]) == "Sun Oct 25 02:30:00 +0100"
    assert lines[0].index("-Sender") == first.index("bounces@") == lines[2].index("customer@")


def test_list_says_when_a_waiting_entry_is_tried_next(spool: Spool) -> None:
    """mailq's layout has no column for it; a deferred message's next try was
    nowhere but in the raw record."""
    later = time.time() + 3600
    waiting = spoolkit.make_entry(next_attempt=later)
    held = spoolkit.make_entry(next_attempt=later, held=True)  # not tried at all
    due = spoolkit.make_entry(next_attempt=0.0)
    for entry in (waiting, held, due):
        spool.put(entry, MESSAGE)
    entries = listing(spool).split("\n", 1)[1].split("\n\n")[:-1]  # no header, no total
    blocks = {block.split()[0].rstrip("!"): block for block in entries}
    said = [line.strip() for line in blocks.pop(waiting.queue_id).splitlines()]
    assert said[-1] == f"(next attempt {tools._when(later)})"
    assert not any("next attempt" in block for block in blocks.values())
    one = Spool(spool.directory.parent / "one")
    one.put(due, MESSAGE)
    assert listing(one).endswith(f"\n-- {due.size // 1024} Kbytes in 1 Request.\n")


def test_list_after_the_clock_was_set_back_says_when_the_engine_tries_next(spool: Spool) -> None:
    """Written a day ahead of a clock set back a day, its stored next attempt
    read as tomorrow, while the engine tried it within its wait of seeing it;
    the tool cannot tell when that was, so it says so."""
    ahead = time.time() + 86400
    entry = spoolkit.make_entry(arrival=ahead, next_attempt=ahead + 600)
    spool.put(entry, MESSAGE)
    before = time.time()
    said = listing(spool).splitlines()
    record = json.loads(listing(spool, as_json=True))
    after = time.time()
    shown = next(line.strip() for line in said if "next attempt" in line)
    assert shown == (
        "(next attempt at most 600 s after the relay saw it: stored before the clock"
        f" was set back, as {tools._when(ahead + 600)})"
    )
    assert int(before + 600) <= record["next_attempt_time"] <= after + 600  # at the latest
    tools.retry(spool, [entry.queue_id], io.StringIO(), io.StringIO())
    assert "next attempt" not in listing(spool)  # due now, not "as Thu Jan  1 1970"


def test_list_json_like_postqueue(spool: Spool, two: list[QueueEntry]) -> None:
    records = [json.loads(line) for line in listing(spool, as_json=True).splitlines()]
    assert [r["queue_id"] for r in records] == [e.queue_id for e in two]
    first = records[0]
    assert set(first) == {
        "queue_name",
        "queue_id",
        "arrival_time",
        "next_attempt_time",
        "message_size",
        "sender",
        "recipients",
        "tenant",
        "user",
        "doc_type",
        "upstream",
        "dkim",
    }
    assert first["dkim"] == []  # a message the relay did not sign
    assert first["queue_name"] == "deferred"  # an attempt left it waiting (greylisted)
    assert records[1]["queue_name"] == "active"  # not tried yet
    assert first["arrival_time"] == int(ARRIVAL)
    assert first["next_attempt_time"] == int(ARRIVAL) + 600
    before = int(time.time())
    tools.retry(spool, [first["queue_id"]], io.StringIO(), io.StringIO())
    retried = json.loads(listing(spool, as_json=True).splitlines()[0])
    assert before <= retried["next_attempt_time"] <= time.time()  # due now, not in 1970
    assert first["message_size"] == 3000
    assert first["recipients"] == [
        {
            "address": "customer@example.net",
            "delay_reason": "451 4.7.1 Greylisted, \x1b[31mtry later",
        }
    ]
    assert records[1]["sender"] == ""
    assert records[1]["recipients"][0] == {"address": "customer@example.net"}
    assert (records[1]["tenant"], records[1]["user"], records[1]["doc_type"]) == (
        "globex",
        "alice",
        "invoice",
    )
    assert [r["upstream"] for r in records] == ["default", "default"]


class _Delivering(io.StringIO):
    """The listing's reader, while the relay delivers the queue's last entry
    as the first is written."""

    def __init__(self, spool: Spool, first: str, last: str) -> None:
        super().__init__()
        self.spool, self.first, self.last = spool, first, last

    def write(self, text: str) -> int:
        if self.first in text and self.last in self.spool.ids():
            self.spool.remove(self.last)
        return super().write(text)


@pytest.mark.parametrize("as_json", [False, True])
def test_list_writes_each_entry_as_it_reads_it(
    spool: Spool, two: list[QueueEntry], as_json: bool
) -> None:
    """The listing read the whole queue before writing a line: with 50,000
    queued, ``relay queue list | head`` waited 3 to 6 s and held 150 MB. Read
    as it is written, an entry delivered meanwhile is no longer listed."""
    out = _Delivering(spool, two[0].queue_id, two[1].queue_id)
    assert tools.list_queue(spool, out, as_json=as_json) == 0
    said = out.getvalue()
    assert two[0].queue_id in said
    assert two[1].queue_id not in said
    if not as_json:
        assert said.endswith("-- 2 Kbytes in 1 Request.\n"), said


def test_hold_and_release(spool: Spool, two: list[QueueEntry]) -> None:
    first, second = two
    outcome, out, err = run(tools.hold, spool, [second.queue_id])
    assert outcome.code == 0 and err == ""
    assert [e.queue_id for e in outcome.entries] == [second.queue_id]
    assert out == "Placed on hold: 1 message\n"
    assert spool.load(second.queue_id).held
    assert f"{second.queue_id}! " in listing(spool)
    assert f"{first.queue_id}  " in listing(spool)
    queues = [json.loads(line)["queue_name"] for line in listing(spool, as_json=True).splitlines()]
    assert queues == ["deferred", "hold"]

    again, out, err = run(tools.hold, spool, [second.queue_id])
    assert again == (0, []) and out == "Placed on hold: 0 messages\n"
    assert err == f"{second.queue_id}: already on hold, left as it was\n"
    _, _, err = run(tools.release, spool, [first.queue_id])
    assert err == f"{first.queue_id}: not on hold, left as it was\n"
    _, _, err = run(tools.hold, spool, ["ALL"])
    assert err == ""  # only what was named is said
    run(tools.release, spool, [first.queue_id])

    outcome, out, _ = run(tools.release, spool, [second.queue_id.lower() + "!"])
    assert outcome.code == 0 and len(outcome.entries) == 1
    assert out == "Released from hold: 1 message\n"
    assert not spool.load(second.queue_id).held
    assert spool.last_kick() > 0.0


def test_retry_makes_entries_due_and_kicks(spool: Spool, two: list[QueueEntry]) -> None:
    first, second = two
    assert spool.last_kick() == 0.0
    outcome, out, _ = run(tools.retry, spool, [first.queue_id])
    assert outcome.code == 0
    assert spool.load(first.queue_id).next_attempt == 0
    assert spool.load(second.queue_id).next_attempt == ARRIVAL + 600
    assert spool.last_kick() > 0.0
    assert out == "Scheduled for retry: 1 message\n"

    run(tools.hold, spool, [second.queue_id])
    outcome, _, err = run(tools.retry, spool, [second.queue_id])
    assert outcome == (1, []) and "on hold" in err
    outcome, out, err = run(tools.retry, spool, ["ALL"])
    assert outcome.code == 0 and err == ""  # a held entry is simply not part of ALL
    assert [e.queue_id for e in outcome.entries] == [first.queue_id]


def test_delete_by_id_returns_the_entries_for_the_audit(
    spool: Spool, two: list[QueueEntry]
) -> None:
    first, second = two
    outcome, out, err = run(unaudited_delete, spool, [first.queue_id])
    assert outcome.code == 0 and err == "" and out == "Deleted: 1 message\n"
    assert outcome.entries == [first]
    assert spool.ids() == [second.queue_id]
    assert not spool.message_path(first.queue_id).exists()


def test_delete_ids_from_stdin(spool: Spool, two: list[QueueEntry]) -> None:
    stdin = f"\n  {two[0].queue_id.lower()}\n{two[1].queue_id}!\n\n{two[0].queue_id}\n"
    outcome, out, err = run(unaudited_delete, spool, ["-"], stdin=stdin)
    assert outcome.code == 0 and err == ""
    assert outcome.entries == two
    assert spool.ids() == []
    assert out == "Deleted: 2 messages\n"


def test_delete_all(spool: Spool, two: list[QueueEntry]) -> None:
    outcome, out, _ = run(unaudited_delete, spool, ["ALL"])
    assert outcome == (0, two) and out == "Deleted: 2 messages\n"
    assert spool.ids() == [] and listing(spool) == "Mail queue is empty\n"


def test_unknown_ids_are_reported_and_the_rest_done(spool: Spool, two: list[QueueEntry]) -> None:
    unknown = new_queue_id()
    for command in (unaudited_delete, tools.hold, tools.release, tools.retry):
        outcome, _, err = run(command, spool, [unknown, "../../etc/passwd"])
        assert outcome == (1, [])
        assert f"{unknown}: no such queue entry" in err
        assert "../../ETC/PASSWD: not a queue ID" in err
    outcome, _, _ = run(unaudited_delete, spool, [unknown, two[0].queue_id])
    assert outcome == (1, [two[0]])
    assert spool.ids() == [two[1].queue_id]


@pytest.mark.parametrize("typed", ["all", "All", " all "])
def test_all_not_in_capitals_is_refused_saying_how_to_write_it(
    spool: Spool, two: list[QueueEntry], typed: str
) -> None:
    """It said "ALL: not a queue ID", naming the very keyword the sysadmin meant."""
    for command in (unaudited_delete, tools.hold, tools.release, tools.retry):
        outcome, _, err = run(command, spool, [typed])
        assert outcome == (1, [])
        assert err == f"{typed.strip()}: not a queue ID (for every message, type ALL in capitals)\n"
    assert spool.ids() == sorted(entry.queue_id for entry in two)
    outcome, _, err = run(tools.hold, spool, ["-"], stdin="all\n")
    assert (outcome, err) == ((1, []), "ALL: not a queue ID\n")  # on stdin, IDs only


def test_busy_entry_is_skipped(spool: Spool, two: list[QueueEntry]) -> None:
    """Named, a busy entry is an error; under ALL it is said but the command
    succeeds (a cron job's ``hold ALL`` failed whenever mail was moving)."""
    first, second = two
    with locked_elsewhere(spool.directory, first.queue_id):
        outcome, out, err = run(tools.hold, spool, ["ALL"])
        assert outcome.code == 0 and out == "Placed on hold: 1 message\n"
        assert err == (
            f"{first.queue_id}: {tools.LOCKED}; skipped: delivered now, or left queued as it"
            " was (name it to try again)\n"
        )
        for targets, stdin in (([first.queue_id], ""), (["-"], first.queue_id)):
            outcome, _, err = run(tools.hold, spool, targets, stdin=stdin)
            assert outcome == (1, [])
            assert err == f"{first.queue_id}: {tools.LOCKED}; skipped, try again\n"
        outcome, _, err = run(unaudited_delete, spool, ["ALL"])
        assert outcome.code == 0 and [e.queue_id for e in outcome.entries] == [second.queue_id]
        assert f"{first.queue_id}: {tools.LOCKED}; skipped:" in err
    assert spool.ids() == [first.queue_id]
    assert not spool.load(first.queue_id).held


def test_show_prints_record_and_headers_not_body(spool: Spool, two: list[QueueEntry]) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert tools.show(spool, two[0].queue_id, out, err) == 0
    record_text, headers = out.getvalue().split("\n\n", 1)
    assert QueueEntry.from_json(record_text) == two[0]
    record = json.loads(record_text)  # the epoch numbers as they were, and readable too
    assert record["arrival"] == ARRIVAL and record["next_attempt"] == ARRIVAL + 600
    assert datetime.fromisoformat(record["arrival_local"]).timestamp() == ARRIVAL
    assert datetime.fromisoformat(record["next_attempt_local"]).timestamp() == ARRIVAL + 600
    assert "updated_local" not in record["recipients"][0]  # never tried: no time to show
    assert headers == "From: alice@acme.example\nSubject: Invoice 7\n"
    assert "SECRET BODY" not in out.getvalue()

    out, err = io.StringIO(), io.StringIO()
    assert tools.show(spool, new_queue_id(), out, err) == 1
    assert "no such queue entry" in err.getvalue() and out.getvalue() == ""


def test_show_keeps_a_senders_terminal_codes_off_the_terminal(spool: Spool) -> None:
    """The record is JSON, which escapes only what is below 0x20: a subject the
    sender chose reached the tty with its C1 codes (CSI, OSC) as they came."""
    entry = make_entry(new_queue_id(), subject="\u009b2J\u009d0;pwned\x07 Invoice")
    entry.recipients[0].reply = "451 \u0085later\u2028"
    spool.put(entry, MESSAGE)
    out, err = io.StringIO(), io.StringIO()
    assert tools.show(spool, entry.queue_id, out, err) == 0
    record_text = out.getvalue().split("\n\n", 1)[0]
    assert not any("\x7f" <= c <= "\x9f" or c in "\u2028\u2029" for c in record_text)
    assert "\\u009b2J\\u009d0;pwned\\u0007 Invoice" in record_text
    assert QueueEntry.from_json(record_text) == entry  # the same record, written safely


def test_a_damaged_record_can_still_be_deleted(spool: Spool, two: list[QueueEntry]) -> None:
    damaged = two[0].queue_id
    (spool.directory / "env" / f"{damaged}.json").write_text('{"version": 1}')
    assert listing(spool).count("Request") == 1
    outcome, _, _ = run(tools.hold, spool, [damaged])
    assert outcome.code == 1
    outcome, out, err = run(unaudited_delete, spool, ["ALL"])
    assert outcome == (0, [two[1]]) and out == "Deleted: 2 messages\n"  # the damaged one too
    assert f"{damaged}: deleted an unreadable record" in err
    assert spool.ids() == [] and not spool.message_path(damaged).exists()


@pytest.mark.parametrize(
    "damage",
    [
        {"arrival": float("nan")},
        {"next_attempt": 1e300},
        {"arrival": float("inf")},
        {"next_attempt": -1e300},
        {"updated": float("-inf")},
    ],
)
def test_a_record_with_a_time_out_of_range_is_damaged_not_the_whole_listing(
    spool: Spool, two: list[QueueEntry], damage: dict[str, float]
) -> None:
    """``NaN`` and ``1e300`` are JSON numbers to Python: the record loaded, and
    ``relay queue list`` and ``show`` failed on it for the whole queue
    (``timestamp out of range``)."""
    damaged, other = two
    record = json.loads(damaged.to_json())
    where = record["recipients"][0] if "updated" in damage else record
    where.update(damage)
    (spool.directory / "env" / f"{damaged.queue_id}.json").write_text(json.dumps(record))
    said = listing(spool)
    assert f"{damaged.queue_id}  " in said and "(unreadable queue entry)" in said
    assert other.queue_id in said and said.endswith("in 2 Requests.\n")
    records = [json.loads(line) for line in listing(spool, True).splitlines()]
    assert [(r["queue_id"], "unreadable" in r) for r in records] == [
        (damaged.queue_id, True),
        (other.queue_id, False),
    ]
    out, err = io.StringIO(), io.StringIO()
    assert tools.show(spool, damaged.queue_id, out, err) == 1
    assert "unreadable queue record" in err.getvalue() and out.getvalue() == ""
    assert tools.show(spool, other.queue_id, io.StringIO(), err) == 0


def test_an_entry_whose_first_record_is_damaged_is_listed_as_unreadable_and_counted(
    spool: Spool, two: list[QueueEntry]
) -> None:
    """``relay status`` and the metrics counted it, and the listing left it out:
    two messages queued, one listed, and nothing on stdout said why."""
    damaged, other = two
    (spool.directory / "env" / f"{damaged.queue_id}.json").unlink(missing_ok=True)
    path = spool.message_path(damaged.queue_id)
    path.write_bytes(b"#" + path.read_bytes()[1:])  # its first record's mark
    counted = sum(state.count for state in spool.waiting(time.time()).values())
    lines = listing(spool).splitlines()
    when = time.strftime("%a %b %d %H:%M:%S %z", time.localtime(ARRIVAL))
    size = str(path.stat().st_size)
    said = [damaged.queue_id, size, *when.split(), "(unreadable", "queue", "entry)"]
    assert lines[1].split() == said
    assert lines[1].index("(unreadable") == lines[0].index("-Sender")  # in the sender's column
    assert lines[2].strip() == f"({path}: unreadable queue record: no record in the entry's file)"
    assert other.queue_id in lines[4]
    assert (
        lines[-1]
        == f"-- {(path.stat().st_size + other.size) // 1024} Kbytes in {counted} Requests."
    )
    records = [json.loads(line) for line in listing(spool, as_json=True).splitlines()]
    assert len(records) == counted == 2
    assert records[0] == {
        "queue_name": "active",
        "queue_id": damaged.queue_id,
        "arrival_time": int(ARRIVAL),
        "next_attempt_time": None,
        "message_size": path.stat().st_size,
        "sender": None,
        "recipients": [],
        "tenant": None,
        "user": None,
        "doc_type": None,
        "upstream": None,
        "dkim": [],
        "unreadable": f"{path}: unreadable queue record: no record in the entry's file",
    }
    assert records[1]["queue_id"] == other.queue_id and set(records[0]) - set(records[1]) == {
        "unreadable"
    }


def odd_file(path: Path, kind: str) -> str:
    """A file of ``kind`` at ``path`` that is no plain file; what the tools call it."""
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "symbolic link":
        path.symlink_to(path.parent)
    else:
        with socket.socket(socket.AF_UNIX) as bound:
            bound.bind(os.fspath(path))
    return f"a {kind}, not a regular file"


ODD = pytest.mark.parametrize("kind", ["FIFO", "symbolic link", "socket"])


@ODD
@pytest.mark.parametrize("verb", ["hold", "release", "retry", "delete"])
def test_all_skips_what_is_not_a_plain_file_as_the_listing_does(
    spool: Spool, two: list[QueueEntry], verb: str, kind: str
) -> None:
    """A FIFO named like an entry made ``hold ALL`` from cron exit 1 ("a named
    ID not handled") after doing its work; named, it is one. A link or a
    socket was not even said to be one."""
    fifo = spool.directory / "msg" / "ZZZZZZZZZZZZZZZZ"
    what = odd_file(fifo, kind)
    if verb == "release":
        run(tools.hold, spool, [entry.queue_id for entry in two])
    command = unaudited_delete if verb == "delete" else getattr(tools, verb)
    outcome, _, err = run(command, spool, ["ALL"])
    assert outcome.code == 0
    assert [e.queue_id for e in outcome.entries] == [e.queue_id for e in two]
    assert err == f"ZZZZZZZZZZZZZZZZ skipped unreadable queue entry: {fifo}: {what}\n"
    outcome, _, err = run(command, spool, ["zzzzzzzzzzzzzzzz"])
    assert outcome == (1, []) and err == f"ZZZZZZZZZZZZZZZZ: {fifo}: {what}\n"
    assert fifo.exists() or fifo.is_symlink()


@ODD
def test_an_entry_whose_record_is_not_a_plain_file_is_left_not_deleted(
    spool: Spool, two: list[QueueEntry], kind: str
) -> None:
    """``env/ID.json`` a FIFO, ``delete ALL`` took the entry for one with a
    damaged record, and deleted its message with no message ID or recipients
    on record."""
    first, second = two
    record = spool.directory / "env" / f"{first.queue_id}.json"
    what = odd_file(record, kind)
    recorded: list[str] = []

    def record_it(queue_id: str, entry: QueueEntry | None) -> None:
        recorded.append(queue_id)

    outcome, out, err = run(tools.delete, spool, ["ALL"], record=record_it)
    assert outcome == (0, [second]) and out == "Deleted: 1 message\n"
    assert err == f"{first.queue_id} skipped unreadable queue entry: {record}: {what}\n"
    outcome, out, err = run(tools.delete, spool, [first.queue_id], record=record_it)
    assert outcome == (1, []) and out == "Deleted: 0 messages\n"
    assert err == f"{first.queue_id}: {record}: {what}\n"
    assert recorded == [second.queue_id]
    assert spool.ids() == [first.queue_id] and (record.exists() or record.is_symlink())


def test_each_deletion_is_recorded_before_its_message_goes(
    spool: Spool, two: list[QueueEntry]
) -> None:
    seen: list[tuple[str, bool, bool]] = []

    def record(queue_id: str, entry: QueueEntry | None) -> None:
        seen.append((queue_id, entry is not None, spool.message_path(queue_id).exists()))

    outcome, _, err = run(tools.delete, spool, ["ALL"], record=record)
    assert outcome == (0, two) and err == ""
    assert seen == [(e.queue_id, True, True) for e in two]
    assert spool.ids() == []


def test_a_deletion_the_audit_log_cannot_record_leaves_the_message(
    spool: Spool, two: list[QueueEntry]
) -> None:
    first, second = two

    def record(queue_id: str, entry: QueueEntry | None) -> None:
        if queue_id == first.queue_id:
            raise AuditError("audit log /var/lib/relay/audit: No space left on device")

    outcome, out, err = run(tools.delete, spool, ["ALL"], record=record)
    assert outcome == (1, [second]) and out == "Deleted: 1 message\n"
    assert f"{first.queue_id}: not deleted, the audit log cannot record it" in err
    assert "No space left on device" in err
    assert spool.ids() == [first.queue_id]
    assert spool.load(first.queue_id) == first


def test_a_damaged_record_is_recorded_as_deleted_too(
    spool: Spool, two: list[QueueEntry], tmp_path: Path
) -> None:
    damaged = two[0].queue_id
    (spool.directory / "env" / f"{damaged}.json").write_text('{"version": 1}')
    recorder = Recorder(AuditLog(tmp_path / "audit"))

    def record(queue_id: str, entry: QueueEntry | None) -> None:
        recorder.deleted(queue_id, entry, "root")
        recorder.flush_sync(queue_id)

    outcome, _, _ = run(tools.delete, spool, [damaged], record=record)
    assert outcome == (0, [])
    (deleted,) = read_all(tmp_path / "audit")
    assert deleted["event"] == "deleted" and deleted["queue_id"] == damaged
    assert deleted["message_id"] is None and deleted["recipients"] == []


@pytest.mark.parametrize("verb", ["hold", "release"])
def test_hold_and_release_are_recorded_once_stored_naming_who_acted(
    spool: Spool, two: list[QueueEntry], tmp_path: Path, verb: str
) -> None:
    """A held message delivered after its lifetime had nothing in the audit log to
    explain the gap; a change the log refuses is put back."""
    from relay.audit import events

    second = two[1]
    if verb == "release":
        run(tools.hold, spool, [second.queue_id])
    event = {"hold": events.held, "release": events.released}[verb]
    audit = AuditLog(tmp_path / "audit")

    def record(queue_id: str, entry: QueueEntry | None) -> None:
        assert entry is not None and entry.held == (verb == "hold")
        assert spool.load(queue_id).held == entry.held  # stored first
        audit.append(event(queue_id=queue_id, message_id=entry.message_id, by="root"))

    outcome, _, err = run(getattr(tools, verb), spool, [second.queue_id], record=record)
    assert outcome.code == 0 and err == ""
    (written,) = read_all(tmp_path / "audit")
    held = "held" if verb == "hold" else "released"
    assert (written["event"], written["queue_id"], written["by"]) == (held, second.queue_id, "root")

    def refused(queue_id: str, entry: QueueEntry | None) -> None:
        raise AuditError("audit log: No space left on device")

    undo = "release" if verb == "hold" else "hold"
    outcome, _, err = run(getattr(tools, undo), spool, [second.queue_id], record=refused)
    assert outcome == (1, [])
    undone = "released" if undo == "release" else "held"
    assert f"{second.queue_id}: not {undone}, the audit log cannot record it" in err
    assert err.endswith("No space left on device (left as it was)\n")
    assert spool.load(second.queue_id).held == (verb == "hold")


@pytest.mark.parametrize("verb", ["hold", "release"])
def test_a_hold_or_release_that_cannot_be_stored_is_not_on_record(
    spool: Spool, two: list[QueueEntry], tmp_path: Path, verb: str
) -> None:
    """Recorded before it was stored, a change ``env/`` refused (a full disk, an
    immutable directory) was in the audit log while the message stayed held, or
    was delivered."""
    first = two[0]
    if verb == "release":
        run(tools.hold, spool, [first.queue_id])
    recorder = Recorder(AuditLog(tmp_path / "audit"))

    def record(queue_id: str, entry: QueueEntry | None) -> None:
        recorder.deleted(queue_id, entry, "root")  # any record: none may be written
        recorder.flush_sync(queue_id)

    with read_only(spool.directory / "env", 0o500):
        outcome, out, err = run(getattr(tools, verb), spool, [first.queue_id], record=record)
    assert outcome == (1, []) and out.endswith(": 0 messages\n")
    assert err.startswith(f"{first.queue_id}: ") and "env" in err
    assert read_all(tmp_path / "audit") == []
    assert spool.load(first.queue_id).held == (verb == "release")


@pytest.mark.parametrize("verb", ["hold", "release", "delete"])
def test_a_change_neither_recorded_nor_put_back_says_it_stands(
    spool: Spool, two: list[QueueEntry], verb: str
) -> None:
    """The audit log refuses the record, and ``env/`` then refuses the entry as
    it was: it stays changed (a deletion's hold), and the sysadmin is told so,
    not "left as it was"."""
    first = two[0]
    if verb == "release":
        run(tools.hold, spool, [first.queue_id])
    with contextlib.ExitStack() as later:

        def refused(queue_id: str, entry: QueueEntry | None) -> None:
            later.enter_context(read_only(spool.directory / "env", 0o500))
            raise AuditError("audit log: No space left on device")

        outcome, _, err = run(getattr(tools, verb), spool, [first.queue_id], record=refused)
    state = {"hold": "held", "release": "released", "delete": "not deleted but held"}[verb]
    assert outcome.code == 1
    assert [e.queue_id for e in outcome.entries] == ([] if verb == "delete" else [first.queue_id])
    assert err.startswith(
        f"{first.queue_id}: {state}, with no record of it: the audit log cannot record it"
        " (audit log: No space left on device), and putting it back failed ("
    )
    assert spool.load(first.queue_id).held == (verb != "release")


class _FullOutput(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("verb", ["release", "retry"])
def test_the_daemon_is_woken_also_when_the_summary_cannot_be_written(
    spool: Spool, verb: str
) -> None:
    """``release > /dev/full`` made its change (exit 74) but never woke the
    daemon: the message waited for its next scan."""
    entry = make_entry(held=verb == "release")
    spool.put(entry, MESSAGE)
    before = spool.last_kick()
    time.sleep(0.01)
    with pytest.raises(OSError):
        getattr(tools, verb)(spool, [entry.queue_id], _FullOutput(), io.StringIO())
    assert spool.last_kick() > before
    assert not spool.load(entry.queue_id).held


def test_a_deletion_cut_off_after_its_record_leaves_the_message_held(
    spool: Spool, two: list[QueueEntry]
) -> None:
    """Killed between the record and the removal, the tool left the message
    queued, and the daemon sent what the audit log said was deleted."""
    first = two[0]

    def record(queue_id: str, entry: QueueEntry | None) -> None:
        raise KeyboardInterrupt  # the record is written; the removal never comes

    with pytest.raises(KeyboardInterrupt):
        run(tools.delete, spool, [first.queue_id], record=record)
    assert spool.load(first.queue_id).held


@pytest.mark.parametrize("verb", ["release", "retry"])
def test_a_daemon_that_cannot_be_woken_makes_the_exit_status_1(spool: Spool, verb: str) -> None:
    """The change stands, but the daemon takes it up only at its next scan: a
    script that checks the exit status must learn the message does not go now."""
    entry = make_entry(held=verb == "release")
    spool.put(entry, MESSAGE)
    (spool.directory / "kick").mkdir()  # the daemon's signal cannot be written
    outcome, out, err = run(getattr(tools, verb), spool, [entry.queue_id])
    assert outcome.code == 1
    assert [e.queue_id for e in outcome.entries] == [entry.queue_id]
    assert "could not wake the daemon" in err
    assert out.endswith(": 1 message\n")
    assert not spool.load(entry.queue_id).held


def test_an_unreadable_entry_whose_record_was_changed_is_listed_as_deferred(
    spool: Spool, two: list[QueueEntry]
) -> None:
    """As ``relay status`` and the metrics count it: a record a try or a queue
    tool rewrote is the deferred queue's, whether or not it can be read."""
    damaged, _ = two
    run(tools.hold, spool, [damaged.queue_id])
    (spool.directory / "env" / f"{damaged.queue_id}.json").write_text("{not json")
    waiting = spool.waiting(time.time())
    assert (waiting["active"].count, waiting["deferred"].count) == (1, 1)
    records = {r["queue_id"]: r for r in map(json.loads, listing(spool, True).splitlines())}
    assert "unreadable" in records[damaged.queue_id]
    assert records[damaged.queue_id]["queue_name"] == "deferred"
