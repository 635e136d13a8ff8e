"""Searching, showing and reporting on the fixture log, plain and compressed."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.audit import AuditLog, commands, events, render, verify
from relay.audit.commands import report_main, search_main, show_main
from relay.audit.render import CSV_COLUMNS, TABLE_COLUMNS, csv_row, timeline, write_csv
from relay.audit.search import LOOKBACK_DAYS, Owners, parse_when, report, search, show
from tests.relayproc import piped_into_head
from tests.test_audit_fixture import (
    ACME_INVOICE,
    ACME_QUOTE,
    GLOBEX,
    START,
    Clock,
    build,
    read_all,
    received,
)  # fmt: skip

ROOT = Path(__file__).resolve().parent.parent
ACME = [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 17, 18]
INVOICE_1 = [2, 3, 4, 5, 6, 12, 17]


@pytest.fixture(params=["plain", "gzip"])
def log_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    build(tmp_path)
    if request.param == "gzip":
        AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=5))).maintain()
        assert len(list(tmp_path.glob("*.gz"))) == 2
    return tmp_path


def seqs(directory: Path, **filters: object) -> list[int]:
    return [r["seq"] for r in search(directory, **filters)]  # type: ignore[arg-type]


def test_filters(log_dir: Path) -> None:
    assert seqs(log_dir) == list(range(1, 19))
    assert seqs(log_dir, status="failed") == [9]
    assert seqs(log_dir, status="received") == [2, 7, 13]
    assert seqs(log_dir, queue_id=GLOBEX[0]) == [13, 14, 15, 16]
    assert seqs(log_dir, queue_id=GLOBEX[0], status="bounced") == [16]
    assert seqs(log_dir, message_id=ACME_INVOICE[1]) == INVOICE_1
    assert seqs(log_dir, message_id=ACME_INVOICE[1].strip("<>")) == INVOICE_1
    assert seqs(log_dir, message_id="inv-1001") == []


def test_tenant_user_and_type_follow_the_message_through_its_queue_id(log_dir: Path) -> None:
    assert seqs(log_dir, tenant="acme") == ACME
    assert seqs(log_dir, tenant="globex") == [13, 14, 15, 16]
    assert seqs(log_dir, tenant="acme", user="eva") == [7, 8, 9, 10, 18]
    assert seqs(log_dir, doc_type="invoice") == [2, 3, 4, 5, 6, 12, 13, 14, 15, 16, 17]
    assert seqs(log_dir, tenant="acme", status="delivered") == [4, 6, 12]
    assert seqs(log_dir, tenant="acme", status="received") == [2, 7]
    assert seqs(log_dir, tenant="nobody") == []


def test_recipient_matches_any_recipient_field_without_case(log_dir: Path) -> None:
    assert seqs(log_dir, recipient="buyer@customer.example") == [2, 3, 4, 11, 13, 14, 15, 16, 17]
    assert seqs(log_dir, recipient="sales@prospect.example") == [7, 8, 9]
    assert seqs(log_dir, recipient="BUYER@customer.example", tenant="globex") == [13, 14, 15, 16]
    assert seqs(log_dir, recipient="customer.example") == []


def test_recipient_matches_with_or_without_angle_brackets(log_dir: Path) -> None:
    """As ``--message-id`` does: an address copied from an envelope or a header."""
    bare = seqs(log_dir, recipient="sales@prospect.example")
    assert bare and seqs(log_dir, recipient="<Sales@Prospect.example>") == bare
    assert seqs(log_dir, recipient=" <sales@prospect.example> ", status="failed") == [9]


def test_time_window_by_day_and_time(log_dir: Path) -> None:
    assert seqs(log_dir, since="2024-05-07") == list(range(12, 19))
    assert seqs(log_dir, until="2024-05-06") == list(range(1, 12))
    assert seqs(log_dir, since="2024-05-07", until="2024-05-07") == [12, 13, 14, 15]
    assert seqs(log_dir, since="2024-05-06T09:05:02Z", until="2024-05-06T09:15:02Z") == [4, 5, 6]


def test_records_in_a_later_days_file_are_in_the_window_of_their_time(log_dir: Path) -> None:
    """The writer moves on to the next day's name when today's file was compressed,
    and never goes back to an older file when the clock steps back: a window
    that skipped files by their name lost those records from search and report."""
    reported = report(log_dir, since="2024-05-07", until="2024-05-07")
    assert reported
    (day,) = log_dir.glob("audit-2024-05-07.jsonl*")
    day.rename(log_dir / day.name.replace("2024-05-07", "2024-05-09"))
    assert seqs(log_dir, since="2024-05-07", until="2024-05-07") == [12, 13, 14, 15]
    assert seqs(log_dir, until="2024-05-07") == list(range(1, 16))
    assert seqs(log_dir, until="2024-05-06") == list(range(1, 12))  # not looked into for it
    assert report(log_dir, since="2024-05-07", until="2024-05-07") == reported


@pytest.mark.parametrize("day", ["20240507", "2024-05-07", " 2024-05-07 "])
def test_a_day_in_any_iso_form_is_the_whole_day(log_dir: Path, day: str) -> None:
    """``--until 20240507`` was read as that day's midnight: the day itself was left out."""
    assert seqs(log_dir, since=day, until=day) == [12, 13, 14, 15]
    whole = report(log_dir, since="2024-05-07", until="2024-05-07")
    assert report(log_dir, since=day, until=day) == whole
    assert any(row["delivered"] for row in whole)


def test_the_join_looks_back_before_since(log_dir: Path) -> None:
    assert seqs(log_dir, since="2024-05-08", tenant="acme") == [17, 18]
    assert seqs(log_dir, since="2024-05-08", tenant="acme", lookback_days=0) == []


def test_unknown_status_is_refused(log_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown status 'sent'"):
        list(search(log_dir, status="sent"))


def test_json_output_is_the_stored_lines(log_dir: Path) -> None:
    out = io.StringIO()
    assert search_main(log_dir, tenant="globex", output="json", out=out, err=io.StringIO()) == 0
    stored = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in read_all(log_dir)]
    assert out.getvalue().splitlines() == stored[12:16]


def test_csv_round_trips_through_dictreader(tmp_path: Path) -> None:
    build(tmp_path)
    log = AuditLog(tmp_path, clock=Clock(START + timedelta(days=2, hours=1)))
    log.append(
        events.failed(
            queue_id="Q9",
            message_id='<"odd", id@x>',
            recipient="a@b",
            reply='550 "no", really\r\nnot, at all; =cmd|x',
        )
    )
    records = read_all(tmp_path)
    out = io.StringIO()
    assert write_csv(records, out) == len(records)
    rows = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert CSV_COLUMNS[-3:] == ("prev", "hash", "found_by")  # added later, so placed last
    assert CSV_COLUMNS.index("reply") == 25  # where it stood before found_by was added
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert {k: v for k, v in row.items() if v} == {
            k: v for k, v in csv_row(record).items() if v
        }
    received = rows[1]
    assert received["rcpt_tos"].split() == ["buyer@customer.example", "ap@customer.example"]
    assert received["dkim"] == "platform.example/s1 platform.example/e1"
    assert rows[9]["suppression.reason"] == "complaint"
    assert rows[-1]["reply"] == '550 "no", really\r\nnot, at all; =cmd|x'
    assert rows[-1]["message_id"] == '<"odd", id@x>'


def test_table_is_aligned_and_safe(log_dir: Path) -> None:
    log = AuditLog(log_dir, clock=Clock(START + timedelta(days=2, hours=1)))
    log.append(
        events.failed(
            queue_id="Q9", message_id=None, recipient="a@b", reply="550 \x1b[31mred\x1b[0m"
        )
    )
    out = io.StringIO()
    assert search_main(log_dir, since="2024-05-08", out=out, err=io.StringIO()) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == list(TABLE_COLUMNS)
    column = lines[0].index("queue_id")
    assert all(line[column - 2 : column] == "  " for line in lines)
    assert lines[1].split()[:3] == ["2024-05-08T00:15:02.000Z", "bounced", GLOBEX[0]]
    assert "5.2.2 smtp; 552 mailbox full" in lines[1]
    assert "\x1b" not in out.getvalue() and "?[31mred?[0m" in lines[-1]


def test_search_main_exit_codes(log_dir: Path) -> None:
    err = io.StringIO()
    out = io.StringIO()
    assert search_main(log_dir, tenant="nobody", out=out, err=err) == 1
    assert out.getvalue() == "  ".join(TABLE_COLUMNS) + "\n"  # the header, as ever
    assert search_main(log_dir, status="sent", out=io.StringIO(), err=err) == 2
    assert search_main(log_dir, since="last tuesday", out=io.StringIO(), err=err) == 2
    assert search_main(log_dir, output="xml", out=io.StringIO(), err=err) == 2
    assert search_main(log_dir / "nope", out=io.StringIO(), err=err) == 2
    out = io.StringIO()
    assert search_main(log_dir, status="failed", output="csv", out=out, err=err) == 0
    assert [r["seq"] for r in csv.DictReader(io.StringIO(out.getvalue()))] == ["9"]


@pytest.mark.parametrize(
    ("given", "flag"),
    [({"message_id": ""}, "--message-id"), ({"message_id": "<>"}, "--message-id"),
     ({"queue_id": " "}, "--queue-id"), ({"recipient": ""}, "--recipient"),
     ({"tenant": ""}, "--tenant"), ({"user": " "}, "--user"), ({"doc_type": ""}, "--doc-type")],
)  # fmt: skip
def test_an_empty_filter_value_is_an_error(log_dir: Path, given: dict, flag: str) -> None:
    """An unset shell variable (``--message-id "$ID"``) made an empty needle, found
    at every byte: the search grew to gigabytes and never ended. ``--tenant ''``
    filtered nothing: every record of every tenant."""
    err = io.StringIO()
    assert search_main(log_dir, **given, out=io.StringIO(), err=err) == 2
    assert err.getvalue() == (
        f"relay audit search: {flag} is empty: give the value to look for, or leave it out\n"
    )


@pytest.mark.parametrize("output", ["table", "json", "csv"])
def test_a_search_piped_into_head_ends_quietly(policy_file: Path, output: str) -> None:
    """``relay audit search | head -1`` in a pipefail script: the reader going away
    is no unreadable log (exit 2), it ends as ``relay queue list | head`` does."""
    with AuditLog(policy_file.parent / "state" / "audit", clock=Clock()) as log:
        log.append_many(
            [
                events.failed(queue_id=f"Q{n}", message_id=None, recipient="a@b", reply="550 no")
                for n in range(3000)
            ]
        )
    status, errors = piped_into_head("audit", "search", "-c", str(policy_file), "--format", output)
    assert (status, errors) == (1, "")


def test_show_is_the_whole_timeline_in_order(log_dir: Path) -> None:
    by_queue = show(log_dir, ACME_INVOICE[0])
    assert [r["seq"] for r in by_queue] == INVOICE_1
    assert show(log_dir, ACME_INVOICE[1]) == by_queue
    assert show(log_dir, ACME_INVOICE[1].strip("<>")) == by_queue
    assert show(log_dir, "Q-none") == []
    text = timeline(by_queue)
    expected = [
        "Message <inv-1001@erp.acme.example>, queue ID Q0000000000000A1",
        "2024-05-06T09:05:00.000Z  received from 192.0.2.10 (login erp-acme, listener submission)",
        "    tenant acme, user jan, document invoice (rule invoice-header)",
        "    envelope <jan@acme.example> to <buyer@customer.example>, <ap@customer.example>",
        '    From      Jan <jan@acme.example> -> "Jan via Platform" <noreply@platform.example>',
        "    Reply-To  - -> Jan <jan@acme.example>",
        "    BCC added jan@acme.example",
        "    DKIM      platform.example/s1, platform.example/e1",
        "    upstream  smarthost, 48213 bytes, policy 9f2c9f2c9f2c",
        "2024-05-06T09:05:00.000Z  queued for 3 recipient(s), 49001 bytes (queue ID Q0000000000000A1)",  # noqa: E501
        "Recipients:",
        "  buyer@customer.example",
        "    2024-05-06T09:05:02.000Z  delivered  250 2.0.0 Ok: queued as 4Vx1 (via smarthost, attempt 1)",  # noqa: E501
        "    2024-05-08T00:15:02.000Z  complained feedback type abuse",
        "  ap@customer.example",
        "    2024-05-06T09:05:02.000Z  deferred   451 4.7.1 Greylisted (next attempt 2024-05-07T00:05:02.000Z)",  # noqa: E501
        "    2024-05-07T00:15:02.000Z  delivered  250 2.0.0 Ok (via smarthost, attempt 2)",
        "  jan@acme.example",
        "    2024-05-06T09:05:02.000Z  delivered  250 2.0.0 Ok: queued as 4Vx2 (via smarthost, attempt 1)",  # noqa: E501
    ]
    assert text.splitlines() == expected
    again = [{**r, "queue_id": "Q0000000000000B1"} for r in by_queue]  # sent again, same ID
    both = timeline(sorted([*by_queue, *again], key=lambda r: r["seq"]))
    renamed = [line.replace("Q0000000000000A1", "Q0000000000000B1") for line in expected]
    assert both.splitlines() == [*expected, "", *renamed]


def test_show_says_how_the_user_was_found_when_the_record_does(log_dir: Path) -> None:
    by_queue = show(log_dir, ACME_INVOICE[0])
    found = [{**r, "found_by": "auth_login"} if r["event"] == "received" else r for r in by_queue]
    said = "    tenant acme, user jan (found by auth_login), document invoice (rule invoice-header)"
    assert said in timeline(found).splitlines()


def test_show_main(log_dir: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert show_main(log_dir, "<quote-77@erp.acme.example>", out=out, err=err) == 0
    assert "    subject   Quote 77" in out.getvalue()
    assert "deleted by root: eva@acme.example" in out.getvalue()
    assert "on the suppression list (complaint) since 2024-04-01T00:00:00.000Z" in out.getvalue()
    out = io.StringIO()
    assert show_main(log_dir, GLOBEX[0], output="json", out=out, err=err) == 0
    assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()] == [13, 14, 15, 16]
    assert show_main(log_dir, "nothing", out=io.StringIO(), err=err) == 1


def test_show_takes_a_queue_id_in_any_case(log_dir: Path) -> None:
    """``audit search --queue-id`` and ``queue show`` take any case; show said "no records"."""
    assert show(log_dir, GLOBEX[0].lower()) == show(log_dir, GLOBEX[0])
    assert [r["seq"] for r in show(log_dir, GLOBEX[0].lower())] == [13, 14, 15, 16]
    assert show(log_dir, ACME_QUOTE[1].upper()) == []  # a Message-ID's case is its own


def test_report_counts_per_tenant_and_type(log_dir: Path) -> None:
    zero = dict.fromkeys(
        ("sent", "delivered", "failed", "expired", "bounced", "suppressed", "complaints"), 0
    ) | {"deleted": 0}
    assert report(log_dir) == [
        {
            "tenant": "acme",
            "doc_type": "invoice",
            **zero,
            "sent": 1,
            "delivered": 3,
            "complaints": 1,
        },
        {
            "tenant": "acme",
            "doc_type": "quote",
            **zero,
            "sent": 1,
            "failed": 1,
            "suppressed": 1,
            "deleted": 1,
        },
        {
            "tenant": "globex",
            "doc_type": "invoice",
            **zero,
            "sent": 1,
            "delivered": 1,
            "bounced": 1,
        },
    ]
    assert report(log_dir, since="2024-05-07") == [
        {"tenant": "acme", "doc_type": "invoice", **zero, "delivered": 1, "complaints": 1},
        {"tenant": "acme", "doc_type": "quote", **zero, "deleted": 1},
        {
            "tenant": "globex",
            "doc_type": "invoice",
            **zero,
            "sent": 1,
            "delivered": 1,
            "bounced": 1,
        },
    ]


def test_a_failure_notice_counts_under_the_tenant_of_its_message(tmp_path: Path) -> None:
    """A notice has no ``received`` record of its own: without its link it was a
    ``? ?`` row, an unknown tenant in the month's report."""
    clock = build(tmp_path)
    q, m = ACME_QUOTE
    notice = "Q00000000000N1"
    with AuditLog(tmp_path, clock=clock) as log:
        log.append(
            events.notified(
                queue_id=q, message_id=m, recipient="eva@acme.example", notice_queue_id=notice
            )
        )
        log.append(
            events.delivered(
                queue_id=notice,
                message_id=f"<{notice}@platform.example>",
                recipient="eva@acme.example",
                upstream="smarthost",
                reply="250 ok",
                attempts=1,
            )
        )
    rows = report(tmp_path, since="2024-05-08")
    assert [(r["tenant"], r["doc_type"], r["sent"], r["delivered"]) for r in rows] == [
        ("acme", "invoice", 0, 0),
        ("acme", "notice", 0, 1),
        ("acme", "quote", 0, 0),  # its deletion
        ("globex", "invoice", 0, 0),
    ]
    story = timeline(show(tmp_path, q))
    assert f"failure notice to eva@acme.example queued as {notice}" in story


def test_report_outputs(log_dir: Path) -> None:
    out = io.StringIO()
    assert report_main(log_dir, out=out, err=io.StringIO()) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "tenant",
        "doc_type",
        "sent",
        "delivered",
        "failed",
        "expired",
        "bounced",
        "suppressed",
        "complaints",
        "deleted",
    ]
    assert lines[-1].split() == ["TOTAL", "3", "4", "1", "0", "1", "1", "1", "1"]
    out = io.StringIO()
    report_main(log_dir, output="csv", out=out, err=io.StringIO())
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[2] == {
        "tenant": "globex",
        "doc_type": "invoice",
        "sent": "1",
        "delivered": "1",
        "failed": "0",
        "expired": "0",
        "bounced": "1",
        "suppressed": "0",
        "complaints": "0",
        "deleted": "0",
    }
    out = io.StringIO()
    report_main(log_dir, since="2024-05-08", output="json", out=out, err=io.StringIO())
    assert [json.loads(line)["tenant"] for line in out.getvalue().splitlines()] == [
        "acme",
        "acme",
        "globex",
    ]
    assert report_main(log_dir, since="soon", out=io.StringIO(), err=io.StringIO()) == 2


def test_parse_when() -> None:
    now = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
    assert parse_when("7d", now=now) == datetime(2024, 5, 3, 12, 0, tzinfo=UTC)
    assert parse_when("12h", now=now) == datetime(2024, 5, 10, 0, 0, tzinfo=UTC)
    assert parse_when("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_when("2024-05-01", end=True) == datetime(2024, 5, 2, tzinfo=UTC)
    assert parse_when("2024-05-01T10:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_when("2024-05-01T12:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_when(None) is None
    with pytest.raises(ValueError):
        parse_when("tuesday")


def test_table_names_the_tenant_of_later_events(log_dir: Path) -> None:
    out = io.StringIO()
    assert search_main(log_dir, status="bounced", out=out, err=io.StringIO()) == 0
    assert out.getvalue().splitlines()[1].split()[3:7] == [
        "globex", "hank", "invoice", "buyer@customer.example"
    ]  # fmt: skip


def test_the_table_prints_before_the_search_ends(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table held every matching record before printing one: 1.5 GB of
    memory for 400,000 records, where JSON streamed in 70 MB."""
    monkeypatch.setattr(render, "TABLE_BLOCK", 5)
    finished: list[bool] = []

    def watched(*args: object) -> Iterator[dict[str, object]]:
        yield from search(*args)  # type: ignore[arg-type]
        finished.append(True)

    class Out(io.StringIO):
        first_write_after_the_end: bool | None = None

        def write(self, text: str) -> int:
            if self.first_write_after_the_end is None:
                self.first_write_after_the_end = bool(finished)
            return super().write(text)

    monkeypatch.setattr(commands, "search", watched)
    out = Out()
    assert search_main(log_dir, out=out, err=io.StringIO()) == 0
    assert finished and out.first_write_after_the_end is False
    assert len(out.getvalue().splitlines()) > 18


@pytest.mark.parametrize(("block", "header_lines"), [(1, 3), (2, 2), (5, 1)])
def test_a_table_in_blocks_widens_its_columns_and_repeats_the_header(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch, block: int, header_lines: int
) -> None:
    """Printed in blocks, a table is the same rows; the columns widen when a
    block needs them to (here the fixture's second and third records)."""
    whole = io.StringIO()
    assert search_main(log_dir, out=whole, err=io.StringIO()) == 0
    monkeypatch.setattr(render, "TABLE_BLOCK", block)
    out = io.StringIO()
    assert search_main(log_dir, out=out, err=io.StringIO()) == 0
    lines = out.getvalue().splitlines()
    headers = [n for n, line in enumerate(lines) if line.split() == list(TABLE_COLUMNS)]
    assert headers[0] == 0 and len(headers) == header_lines
    assert all((h - n) % block == 0 for n, h in enumerate(headers))  # above a block
    rows = [line.split() for line in lines if line.split() != list(TABLE_COLUMNS)]
    assert rows == [line.split() for line in whole.getvalue().splitlines()[1:]]
    starts = [[lines[h].index(c) for c in TABLE_COLUMNS] for h in headers]
    for before, after in itertools.pairwise(starts):
        assert before != after and all(b <= a for b, a in zip(before, after, strict=True))
    for start, end in zip(headers, [*headers[1:], len(lines)], strict=True):
        column = lines[start].index("queue_id")
        assert all(line[column - 2 : column] == "  " for line in lines[start:end])


def test_the_table_remembers_messages_for_the_look_back_only(tmp_path: Path) -> None:
    """The tenant of later events came from every matching message's ``received``
    record at once; over a year, that alone outgrew a small server's memory."""
    clock = Clock()
    with AuditLog(tmp_path, clock=clock) as log:
        for n in range(2 * LOOKBACK_DAYS):
            ids = (f"Q{n:015d}", f"<{n}@erp.acme.example>")
            log.append(received(ids, "acme", "jan", "invoice", ["ap@customer.example"]))
            log.append(_delivered(ids[0]))
            clock.advance(days=1)
        # two look-backs after it was received; a later attempt's, not a copy of the first
        log.append(_delivered("Q000000000000000", attempts=2))
    owner = Owners(tmp_path)
    held = []
    for record in search(tmp_path, status="delivered"):
        found = owner(record)
        held.append(len(owner._known))
    assert max(held) <= LOOKBACK_DAYS + 2
    assert found is None
    out = io.StringIO()
    assert search_main(tmp_path, status="delivered", out=out, err=io.StringIO()) == 0
    lines = out.getvalue().splitlines()
    assert lines[1].split()[3:6] == ["acme", "jan", "invoice"]
    assert lines[-1].split()[3:6] == ["-", "-", "-"]


def _delivered(queue_id: str, attempts: int = 1) -> dict[str, object]:
    return events.delivered(
        queue_id=queue_id,
        message_id=None,
        recipient="ap@customer.example",
        upstream="smarthost",
        reply="250 2.0.0 Ok",
        attempts=attempts,
    )


def test_report_without_the_received_record(log_dir: Path) -> None:
    rows = report(log_dir, since="2024-05-08", lookback_days=0)
    assert [(r["tenant"], r["doc_type"], r["bounced"], r["complaints"]) for r in rows] == [
        ("?", "?", 1, 1)
    ]


def test_the_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.audit import bench

    assert bench.main(["3000", str(tmp_path)]) == 0
    assert verify(tmp_path).records >= 3000
    assert "search tenant=tenant07 status=failed (join)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "given",
    [{"since": "99999999d"}, {"until": "9999-12-31"}, {"since": "0001-01-01T00:00+05:00"},
     {"until": "0001-01-01T00:00Z"}, {"since": "9999999999999d"}],
)  # fmt: skip
def test_a_time_out_of_the_calendar_is_a_usage_error(log_dir: Path, given: dict) -> None:
    """``--until 9999-12-31`` (a day's end past the last day there is) was an
    OverflowError traceback and exit 1, which for search means "nothing matched"."""
    for main in (search_main, report_main):
        err = io.StringIO()
        assert main(log_dir, **given, out=io.StringIO(), err=err) == 2
        assert "is out of range: give a time between 0001-01-02 and 9999-12-30" in err.getvalue()
    with pytest.raises(ValueError, match="out of range"):
        parse_when(next(iter(given.values())), end="until" in given)


def test_the_first_day_there_is_still_searches_and_looks_back(log_dir: Path) -> None:
    """The join's look-back from ``--since 0001-01-01`` went before year 1."""
    out = io.StringIO()
    assert (
        search_main(log_dir, since="0001-01-02", tenant="globex", out=out, err=io.StringIO()) == 0
    )
    assert len(out.getvalue().splitlines()) == 5
    assert seqs(log_dir, since="0001-01-02", until="9999-12-30", tenant="acme") == ACME
    assert report(log_dir, since="0001-01-02") == report(log_dir)


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_a_damaged_compressed_day_is_an_error_naming_it(tmp_path: Path, damage: str) -> None:
    """A cut .gz was an EOFError traceback (exit 1: "nothing matched", "no such
    message"); garbage was blamed on the directory. verify already named the file."""
    build(tmp_path)
    AuditLog(tmp_path, compress_after_days=1, clock=Clock(START + timedelta(days=5))).maintain()
    gz = sorted(tmp_path.glob("*.gz"))[0]
    data = gz.read_bytes()
    gz.write_bytes(data[:-30] if damage == "cut" else data[:10] + b"\xff" * (len(data) - 10))
    runs = {
        "search": lambda err: search_main(tmp_path, out=io.StringIO(), err=err),
        "report": lambda err: report_main(tmp_path, out=io.StringIO(), err=err),
        "show": lambda err: show_main(tmp_path, ACME_INVOICE[0], out=io.StringIO(), err=err),
    }
    for verb, run in runs.items():
        err = io.StringIO()
        assert run(err) == 2
        assert err.getvalue().startswith(
            f"relay audit {verb}: {gz}: the compressed file is damaged: "
        ), err.getvalue()


def test_the_table_holds_no_more_when_its_first_row_comes_late(tmp_path: Path) -> None:
    """The first event asked about, a year into a search, read every ``received``
    record up to it into memory before forgetting the old ones."""
    clock = Clock()
    with AuditLog(tmp_path, clock=clock) as log:
        for n in range(3 * LOOKBACK_DAYS):
            ids = (f"Q{n:015d}", f"<{n}@erp.acme.example>")
            log.append(received(ids, "acme", "jan", "invoice", ["ap@customer.example"]))
            clock.advance(days=1)
        log.append(_delivered(f"Q{3 * LOOKBACK_DAYS - 1:015d}"))

    class Counted(Owners):
        most = 0

        def _forget_before(self, horizon: str) -> None:
            Counted.most = max(Counted.most, len(self._known))
            super()._forget_before(horizon)

    owner = Counted(tmp_path)
    (record,) = search(tmp_path, status="delivered")
    assert owner(record) == {"tenant": "acme", "user": "jan", "doc_type": "invoice"}
    assert Counted.most <= LOOKBACK_DAYS + 2


NOTICE = ("Q00000000000N1", "<Q00000000000N1@platform.example>")


def _with_a_notice(directory: Path) -> list[int]:
    """The fixture log, then a notice to eva about her quote, linked on day 3 and
    delivered on day 4: its records' seqs."""
    clock = build(directory)
    q, m = ACME_QUOTE
    with AuditLog(directory, clock=clock) as log:
        log.append(
            events.notified(
                queue_id=q, message_id=m, recipient="eva@acme.example", notice_queue_id=NOTICE[0]
            )
        )
        clock.advance(days=1)
        log.append_many(
            [
                events.deferred(
                    queue_id=NOTICE[0],
                    message_id=NOTICE[1],
                    recipient="eva@acme.example",
                    reply="451 4.7.1 Greylisted",
                    next_attempt=clock.now,
                ),
                events.delivered(
                    queue_id=NOTICE[0],
                    message_id=NOTICE[1],
                    recipient="eva@acme.example",
                    upstream="smarthost",
                    reply="250 ok",
                    attempts=2,
                ),
            ]
        )
    return [20, 21]


def test_a_failure_notice_is_found_under_the_tenant_and_user_of_its_message(
    tmp_path: Path,
) -> None:
    """A notice has no ``received`` record: ``--tenant acme --queue-id <notice>`` found
    nothing, and ``--doc-type notice`` listed none of the rows the report counts."""
    notice = _with_a_notice(tmp_path)
    assert seqs(tmp_path, tenant="acme", queue_id=NOTICE[0]) == notice
    assert seqs(tmp_path, tenant="acme", doc_type="notice") == notice
    assert seqs(tmp_path, tenant="acme", user="eva", doc_type="notice") == notice
    assert seqs(tmp_path, doc_type="notice") == notice
    assert seqs(tmp_path, tenant="acme", status="delivered") == [4, 6, 12, 21]
    assert seqs(tmp_path, tenant="acme", user="eva") == [7, 8, 9, 10, 18, 19, *notice]
    assert seqs(tmp_path, message_id=NOTICE[1], user="eva") == notice
    assert seqs(tmp_path, tenant="acme", since="2024-05-09") == notice  # linked the day before
    assert seqs(tmp_path, tenant="acme", doc_type="quote") == [7, 8, 9, 10, 18, 19]
    assert seqs(tmp_path, tenant="acme", user="jan", doc_type="notice") == []
    assert seqs(tmp_path, tenant="globex", doc_type="notice") == []
    assert seqs(tmp_path, doc_type="invoice", queue_id=NOTICE[0]) == []


def test_the_table_names_a_notice_by_its_message_s_tenant_and_user(tmp_path: Path) -> None:
    """The table showed ``- - -`` for a notice's records."""
    _with_a_notice(tmp_path)
    for given in ({"queue_id": NOTICE[0]}, {"tenant": "acme", "doc_type": "notice"}):
        out = io.StringIO()
        assert search_main(tmp_path, **given, out=out, err=io.StringIO()) == 0, given
        rows = [line.split()[1:7] for line in out.getvalue().splitlines()[1:]]
        assert rows == [
            ["deferred", NOTICE[0], "acme", "eva", "notice", "eva@acme.example"],
            ["delivered", NOTICE[0], "acme", "eva", "notice", "eva@acme.example"],
        ], given


def test_a_notice_whose_message_is_before_the_look_back_is_still_a_notice(
    tmp_path: Path,
) -> None:
    _with_a_notice(tmp_path)
    owner = Owners(tmp_path, since="2024-05-09", lookback_days=1)
    (record,) = search(tmp_path, since="2024-05-09", status="delivered", lookback_days=1)
    assert owner(record) == {"tenant": None, "user": None, "doc_type": "notice"}
    owner = Owners(tmp_path, since="2024-05-09", lookback_days=0)
    assert owner(record) is None  # its link is before the look-back too


@pytest.mark.parametrize("ident", [NOTICE[0], NOTICE[0].lower(), NOTICE[1]])
def test_show_of_a_notice_says_which_message_it_is_about(tmp_path: Path, ident: str) -> None:
    """Show of a notice printed only its recipient's attempts: not that it was a
    notice, nor which message it was about."""
    notice = _with_a_notice(tmp_path)
    found = show(tmp_path, ident)
    assert [r["seq"] for r in found] == [19, *notice]  # the link, then the notice's own
    out = io.StringIO()
    assert show_main(tmp_path, ident, out=out, err=io.StringIO()) == 0
    assert out.getvalue().splitlines() == [
        f"Failure notice {NOTICE[1]}, queue ID {NOTICE[0]}",
        "2024-05-08T00:15:02.000Z  written to eva@acme.example about message"
        f" {ACME_QUOTE[1]}, queue ID {ACME_QUOTE[0]}",
        "Recipients:",
        "  eva@acme.example",
        "    2024-05-09T00:15:02.000Z  deferred   451 4.7.1 Greylisted"
        " (next attempt 2024-05-09T00:15:02.000Z)",
        "    2024-05-09T00:15:02.000Z  delivered  250 ok (via smarthost, attempt 2)",
    ]
    original = timeline(show(tmp_path, ACME_QUOTE[0])).splitlines()  # told as before
    assert original[0] == f"Message {ACME_QUOTE[1]}, queue ID {ACME_QUOTE[0]}"
    assert f"failure notice to eva@acme.example queued as {NOTICE[0]}" in original[-6]


def test_the_report_counts_the_recipients_deleted_from_the_queue(tmp_path: Path) -> None:
    """``relay queue delete``'s records were in no column: a deleted recipient
    was counted nowhere, neither delivered nor failed."""
    _with_a_notice(tmp_path)
    ids = ("Q0000000000000A9", "<inv-1002@erp.acme.example>")
    rcpts = ["a@customer.example", "b@customer.example", "c@customer.example"]
    clock = Clock(START + timedelta(days=3, hours=2))
    with AuditLog(tmp_path, clock=clock) as log:
        log.append(received(ids, "acme", "jan", "invoice", rcpts))
        log.append(
            events.deleted(queue_id=ids[0], message_id=ids[1], by="root", recipients=rcpts[1:])
        )
        log.append(
            events.deleted(
                queue_id=NOTICE[0], message_id=NOTICE[1], by="root", recipients=["eva@acme.example"]
            )
        )
        log.append(
            events.deleted(queue_id="Q0000000000000X1", message_id=None, by="root", recipients=[])
        )
    rows = report(tmp_path, since="2024-05-09")
    assert [
        (r["tenant"], r["doc_type"], r["sent"], r["delivered"], r["deleted"]) for r in rows
    ] == [
        ("?", "?", 0, 0, 0),  # a queue record that could not be read: no recipients known
        ("acme", "invoice", 1, 0, 2),
        ("acme", "notice", 0, 1, 1),
    ]
    out = io.StringIO()
    assert report_main(tmp_path, since="2024-05-09", out=out, err=io.StringIO()) == 0
    lines = [line.split() for line in out.getvalue().splitlines()]
    assert lines[0][-1] == "deleted" and lines[-1][0] == "TOTAL" and lines[-1][-1] == "3"


def test_an_outcome_written_again_counts_once_and_a_later_attempt_again(tmp_path: Path) -> None:
    """A restart writes a crashed worker's outcomes again, perhaps a day later:
    the copy is not a second delivery, in the report of either day; a later
    attempt's delivery to the same recipient is one."""
    clock = Clock()
    ids = ("Q0000000000000R1", "<r-1@erp.acme.example>")
    with AuditLog(tmp_path, clock=clock) as log:
        log.append(received(ids, "acme", "jan", "invoice", ["ap@customer.example"]))
        log.append(_delivered(ids[0]))
        clock.advance(days=1)
        log.append(_delivered(ids[0]))  # the copy, at the restart
        log.append(_delivered(ids[0], attempts=2))

    def delivered(**window: str) -> int:
        return sum(r["delivered"] for r in report(tmp_path, **window))

    assert delivered() == 2
    assert delivered(until="2024-05-06") == 1
    assert delivered(since="2024-05-07") == 1
    assert [r["attempts"] for r in search(tmp_path, status="delivered")] == [1, 2]
    assert [r["seq"] for r in show(tmp_path, ids[0])] == [1, 2, 4]
    # search, as the report, lists the copy of an outcome written before the window nowhere
    later = {"since": "2024-05-07"}
    for given in ({}, {"status": "delivered"}, {"tenant": "acme"}, {"queue_id": ids[0]},
                  {"recipient": "AP@customer.example"}):  # fmt: skip
        assert [r["seq"] for r in search(tmp_path, **later, **given)] == [4], given
    with AuditLog(tmp_path, clock=clock) as log:  # the same day, earlier than the window
        clock.advance(hours=1)
        log.append(_delivered(ids[0], attempts=3))
        clock.advance(hours=1)
        log.append(_delivered(ids[0], attempts=3))
    assert [r["seq"] for r in search(tmp_path, since="2024-05-07T10:30:00Z")] == []
    assert [r["seq"] for r in search(tmp_path, since="2024-05-07T09:30:00Z")] == [5]


def test_show_tells_who_held_and_released_a_message(tmp_path: Path) -> None:
    clock = Clock()
    ids = ("Q0000000000000H1", "<h-1@erp.acme.example>")
    with AuditLog(tmp_path, clock=clock) as log:
        log.append(received(ids, "acme", "jan", "invoice", ["ap@customer.example"]))
        log.append(events.held(queue_id=ids[0], message_id=ids[1], by="root"))
        clock.advance(days=1)
        log.append(events.released(queue_id=ids[0], message_id=ids[1], by="ops"))
    story = timeline(show(tmp_path, ids[0]))
    assert "2024-05-06T09:00:00.000Z  held by root\n" in story
    assert "2024-05-07T09:00:00.000Z  released by ops\n" in story
    assert [r["event"] for r in search(tmp_path, status="held")] == ["held"]


def test_a_message_id_recorded_with_space_around_it_is_found_without(tmp_path: Path) -> None:
    """Records made before the relay unfolded the ERP's Message-ID hold " <id>":
    show, search and so the bounces looking for the message found none."""
    log = AuditLog(tmp_path, clock=Clock(START))
    log.append(received(("Q0000000000000F1", " <folded@erp.example>  "), "acme", "jan",
                        "invoice", ["buyer@customer.example"]))  # fmt: skip
    assert [r["queue_id"] for r in show(tmp_path, "<folded@erp.example>")] == ["Q0000000000000F1"]
    assert [r["seq"] for r in search(tmp_path, message_id="folded@erp.example")] == [1]


def test_show_of_a_notice_not_tried_yet_says_which_message_it_is_about(tmp_path: Path) -> None:
    """Before its first attempt a notice has only its link: show printed the
    link's one line, as if of another message, and never said what it was about."""
    build(tmp_path)
    q, m = ACME_QUOTE
    with AuditLog(tmp_path, clock=Clock(START + timedelta(days=2))) as log:
        log.append(
            events.notified(
                queue_id=q, message_id=m, recipient="eva@acme.example", notice_queue_id=NOTICE[0]
            )
        )
    out = io.StringIO()
    assert show_main(tmp_path, NOTICE[0], out=out, err=io.StringIO()) == 0
    assert out.getvalue().splitlines() == [
        f"Failure notice -, queue ID {NOTICE[0]}",
        f"2024-05-08T09:00:00.000Z  written to eva@acme.example about message {m}, queue ID {q}",
        f"    no attempt on record yet: relay queue show {NOTICE[0]}",
    ]


def test_search_reads_back_for_copies_only_as_far_as_a_restart_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart writes again only outcomes it read in the log's last
    REWRITE_REACH bytes: search --since reads no further back for their
    originals (it read the 30 days before it whatever their size), counting
    a compressed day at ten times its size."""
    from datetime import date

    from relay.audit import reader
    from relay.audit.search import _rewritten_days

    sizes = {1: 400, 2: 30, 3: 500, 4: 60, 5: 70}
    for day, size in sizes.items():
        name = f"audit-2026-11-0{day}.jsonl" + (".gz" if day == 2 else "")
        (tmp_path / name).write_bytes(b"x" * size)
    monkeypatch.setattr(reader, "REWRITE_REACH", 600)
    before = date(2026, 11, 6)
    # 70, 60, then 500 reaches 630: day 3 is the last read; day 2 is never reached
    assert _rewritten_days(tmp_path, before, date(2026, 11, 1)) == {
        date(2026, 11, d) for d in (3, 4, 5)
    }
    monkeypatch.setattr(reader, "REWRITE_REACH", 800)  # day 2's 30 bytes count as 300
    assert _rewritten_days(tmp_path, before, date(2026, 11, 1)) == {
        date(2026, 11, d) for d in (2, 3, 4, 5)
    }
    assert _rewritten_days(tmp_path, before, date(2026, 11, 4)) == {
        date(2026, 11, d) for d in (4, 5)
    }
    assert _rewritten_days(tmp_path, date(2026, 11, 4), date(2026, 11, 1)) == {
        date(2026, 11, d) for d in (2, 3)
    }
