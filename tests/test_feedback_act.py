"""Acting on a bounce or complaint about a message a real relay delivered: the
audit log finds it, the address is listed, the sender's notice is queued."""

from __future__ import annotations

import contextlib
import json
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.audit import AuditError, AuditLog
from relay.feedback.act import act, find_original
from relay.feedback.parse import read
from relay.feedback.report import BOUNCE, COMPLAINT, Failure, Report
from relay.policy.load import load
from relay.policy.model import Policy
from relay.record import Recorder
from relay.spool import Spool, SpoolError
from relay.suppression import Suppression, SuppressionFile
from tests.relayproc import RelayProcess, wait_for
from tests.sink import DsnSink, DsnSinkServer, Received, Sink, SinkServer, free_port
from tests.test_queue_e2e import audit_events, configure, relay_cli, send

INVOICE = (
    b"From: jan@acme.example\r\nTo: buyer@example.org, boss@example.org\r\n"
    b"Subject: Invoice 4711\r\nMessage-ID: <inv-4711@erp.acme.example>\r\n\r\n"
    b"Please find the invoice attached.\r\n"
)


def _lone(number: int, copy: bool = False) -> bytes:
    """The invoice, numbered ``number``, to buyer@ alone; without ``copy`` a
    document of a type whose sender gets no copy."""
    lone = INVOICE.replace(b"<inv-4711@", b"<inv-%d@" % number)
    lone = lone.replace(b", boss@example.org", b"")
    return lone if copy else lone.replace(b"Invoice 4711", b"Statement %d" % number)


@contextlib.contextmanager
def _running_again(path: Path, sink: Sink, log: Path) -> Iterator[int]:
    """The relay of ``delivered`` and its upstream, started again on their ports."""
    text = path.read_text()
    port = int(text.split("port: ", 1)[1].split("\n", 1)[0])
    sink_port = int(text.split("port: ", 2)[2].split("\n", 1)[0])
    with SinkServer(sink, port=sink_port), RelayProcess(path, port, log):
        yield port


@pytest.fixture
def delivered(policy_file: Path, tmp_path: Path) -> tuple[Path, str, Sink]:
    """The invoice delivered by a real relay, which has stopped since."""
    sink = Sink()
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            queue_id = send(port, INVOICE, ("buyer@example.org", "boss@example.org"))
            sink.wait(1)
    return policy, queue_id, sink


def _act(policy: Policy, report: Report) -> list[str]:
    assert policy.suppression is not None
    with AuditLog(policy.audit.directory) as audit:
        outcome = act(
            policy,
            report,
            Recorder(audit),
            SuppressionFile(policy.suppression.file),
            Spool(policy.queue.directory, create=False),
        )
    return outcome.lines


def _listed(policy: Policy) -> dict[str, tuple[str | None, str, str | None]]:
    assert policy.suppression is not None
    return {
        e.address: (e.tenant, e.reason, e.queue_id)
        for e in SuppressionFile(policy.suppression.file).entries().entries
    }


def test_a_hard_bounce_is_recorded_on_its_message_suppressed_and_told(
    delivered: tuple[Path, str, Sink],
) -> None:
    path, queue_id, _ = delivered
    policy = load(path)
    report = Report(
        BOUNCE,
        (Failure("Boss@example.org", "5.1.1", "550 5.1.1 <boss@example.org>: User unknown"),),
        message_id="<inv-4711@erp.acme.example>",
    )
    lines = _act(policy, report)
    assert lines[0] == "boss@example.org: bounced (5.1.1), suppressed"
    assert lines[1].startswith("jan@acme.example told (notice ")
    assert _listed(policy) == {"boss@example.org": ("acme", "bounce", queue_id)}
    # a report anyone can write, Acme's users among them, with the queue ID the
    # 250 gave them: it listed the address for every tenant's mail
    assert policy.suppression is not None
    listed = SuppressionFile(policy.suppression.file).current()
    assert listed.find("boss@example.org", "acme") is not None
    assert listed.find("boss@example.org", "globex") is None
    events = audit_events(path, queue_id)
    assert events[-3:] == [
        ("bounced", "boss@example.org"),
        ("listed", "boss@example.org"),  # as a listing at delivery is
        ("notified", "jan@acme.example"),
    ]
    shown = relay_cli(path, "audit", "show", queue_id, "--format", "json")
    records = {r["event"]: r for r in map(json.loads, shown.stdout.splitlines())}
    bounced = records["bounced"]
    assert bounced["dsn_status"] == "5.1.1"
    assert bounced["diagnostic"] == "550 5.1.1 <boss@example.org>: User unknown"
    (entry,) = SuppressionFile(policy.suppression.file).entries().entries
    assert records["listed"]["suppression"] == {"reason": "bounce", "since": entry.since}
    assert (records["listed"]["for_tenant"], records["listed"]["detail"]) == ("acme", entry.detail)
    queued = relay_cli(path, "queue", "list", "--json")
    (notice,) = [json.loads(line) for line in queued.stdout.splitlines()]
    assert notice["recipients"][0]["address"] == "jan@acme.example"


def test_a_bounce_spelling_the_address_in_another_case_is_on_the_recipients_record(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """A DSN that wrote boss@'s address as its server spells it was recorded so:
    the message's timeline showed boss@ delivered and Boss@ bounced, two
    recipients where it had one, and the sender was told of neither twice."""
    path, queue_id, sink = delivered
    policy = load(path)
    returned = b"Message-ID: <inv-4711@erp.acme.example>\r\nSubject: Invoice 4711"
    report = read(_dsn(returned, "Boss@Example.ORG"))
    assert report is not None
    assert _act(policy, report)[0] == "boss@example.org: bounced (5.1.1), suppressed"
    shown = relay_cli(path, "audit", "show", "<inv-4711@erp.acme.example>").stdout
    recipients = shown.split("Recipients:\n", 1)[1]
    assert [line for line in recipients.splitlines() if not line.startswith("    ")] == [
        "  buyer@example.org",
        "  boss@example.org",
        "  jan@acme.example",
    ]
    assert "Boss@Example.ORG" not in shown
    found = relay_cli(
        path, "audit", "search", "--recipient", "BOSS@example.org", "--format", "json"
    )
    records = [json.loads(line) for line in found.stdout.splitlines()]
    assert {r["recipient"] for r in records if "recipient" in r} == {"boss@example.org"}
    assert _listed(policy) == {"boss@example.org": ("acme", "bounce", queue_id)}
    with _running_again(path, sink, tmp_path / "again.log"):
        sink.wait(2)
    text = sink.messages[1].data.split(b"\r\n\r\n", 1)[1].replace(b"=\r\n", b"")
    assert b"boss@example.org" in text and b"buyer@example.org" not in text


def test_a_listed_bounce_keeps_the_receiving_servers_words(
    delivered: tuple[Path, str, Sink],
) -> None:
    """The suppression list says why an address is on it: the server's own words
    (``relay suppression list`` shows them), the bare code only where it gave none."""
    path, _, _ = delivered
    policy = load(path)
    said = "550 5.1.1 <boss@example.org>: User unknown"
    report = Report(
        BOUNCE, (Failure("boss@example.org", "5.1.1", said),), "<inv-4711@erp.acme.example>"
    )
    _act(policy, report)
    report = Report(BOUNCE, (Failure("buyer@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    _act(policy, report)
    assert policy.suppression is not None
    details = {
        e.address: e.detail for e in SuppressionFile(policy.suppression.file).entries().entries
    }
    assert details == {"boss@example.org": said, "buyer@example.org": "5.1.1"}


def test_a_complaint_about_an_address_its_bounce_listed_lists_it_no_second_time(
    delivered: tuple[Path, str, Sink],
) -> None:
    """The entry a bounce of the same message added is no entry of the complaint's
    own taking before: taken for one, the complaint said it listed the
    address and put a second "listed" record on the message."""
    path, queue_id, _ = delivered
    policy = load(path)
    bounce = Report(BOUNCE, (Failure("boss@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    _act(policy, bounce)
    assert policy.suppression is not None
    (entry,) = SuppressionFile(policy.suppression.file).entries().entries
    complaint = Report(
        COMPLAINT, (Failure("boss@example.org"),), "<inv-4711@erp.acme.example>", None, "abuse"
    )
    assert _act(policy, complaint)[0] == (
        f"boss@example.org: complained, not suppressed (on the list already, since {entry.since})"
    )
    assert audit_events(path, queue_id).count(("listed", "boss@example.org")) == 1


def test_an_address_listed_before_keeps_its_date_and_a_listed_sender_gets_no_notice(
    delivered: tuple[Path, str, Sink],
) -> None:
    """The bounce listed the address again, with a later date; and the notice went
    to a sender whose own mailbox was on the list."""
    path, queue_id, _ = delivered
    policy = load(path)
    assert policy.suppression is not None
    before = [
        Suppression("boss@example.org", None, "bounce", "2026-01-02T03:04:05.000Z"),
        Suppression("jan@acme.example", "acme", "complaint", "2026-01-03T03:04:05.000Z"),
    ]
    SuppressionFile(policy.suppression.file).add(before)
    report = Report(
        BOUNCE,
        (Failure("Boss@example.org", "5.1.1", "550 5.1.1 <boss@example.org>: User unknown"),),
        message_id="<inv-4711@erp.acme.example>",
    )
    lines = _act(policy, report)
    assert lines == [
        "boss@example.org: bounced (5.1.1), not suppressed"
        " (on the list already, since 2026-01-02T03:04:05.000Z)",
        "no notice: jan@acme.example is on the suppression list since 2026-01-03T03:04:05.000Z",
    ]
    assert len(SuppressionFile(policy.suppression.file).entries().entries) == 2
    assert ("bounced", "boss@example.org") in audit_events(path, queue_id)  # recorded all the same


def test_the_queued_notice_reaches_the_sender_and_names_the_bounce(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """The running relay delivers what ``relay bounce`` queued (here: at its next start)."""
    path, _, sink = delivered
    policy = load(path)
    report = Report(
        BOUNCE,
        (Failure("boss@example.org", "5.2.1", "550 5.2.1 mailbox disabled"),),
        message_id="<inv-4711@erp.acme.example>",
    )
    _act(policy, report)
    with _running_again(path, sink, tmp_path / "again.log"):
        sink.wait(2)
    notice = sink.messages[1]
    assert notice.rcpt_tos == ["jan@acme.example"]
    head, body = notice.data.split(b"\r\n\r\n", 1)
    assert b"Subject: Undelivered: your document to boss@example.org, sent " in head
    assert b"In-Reply-To: <inv-4711@erp.acme.example>" in head
    text = body.decode().replace("=\r\n", "")
    assert "could not be delivered to everyone" in text
    assert "boss@example.org" in text and "buyer@example.org" not in text
    assert "Reason:     the receiving server returned it after accepting it (5.2.1)\r\n" in text
    assert "mailbox disabled" not in text  # the report's own words: anyone may write them


def test_a_soft_coded_bounce_is_recorded_but_not_suppressed(
    delivered: tuple[Path, str, Sink],
) -> None:
    path, queue_id, _ = delivered
    policy = load(path)
    report = Report(
        BOUNCE,
        (Failure("buyer@example.org", "5.7.1", "550 5.7.1 spam policy"),),
        message_id="<inv-4711@erp.acme.example>",
    )
    lines = _act(policy, report)
    assert lines[0] == "buyer@example.org: bounced (5.7.1), not suppressed (not a hard bounce code)"
    assert _listed(policy) == {}
    assert ("bounced", "buyer@example.org") in audit_events(path, queue_id)


def test_a_bounce_without_a_code_is_on_record_as_a_permanent_failure(
    delivered: tuple[Path, str, Sink],
) -> None:
    """A bounce in words that gives no status code is still a permanent failure:
    the audit log says 5.0.0 (RFC 3463's "other or undefined"), which an
    auditor's search by status finds, and the address is not listed."""
    path, queue_id, _ = delivered
    policy = load(path)
    report = Report(BOUNCE, (Failure("boss@example.org"),), "<inv-4711@erp.acme.example>")
    lines = _act(policy, report)
    assert (
        lines[0] == "boss@example.org: bounced (no status), not suppressed (not a hard bounce code)"
    )
    (bounced,) = [r for r in _records(policy) if r["event"] == "bounced"]
    assert (bounced["queue_id"], bounced["dsn_status"]) == (queue_id, "5.0.0")
    assert _listed(policy) == {}


def test_a_bounce_of_a_message_with_an_empty_envelope_sender_tells_nobody(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """A message sent with MAIL FROM:<> is itself a notification (RFC 5321
    4.5.5): its bounce lists the address, but no notice answers it."""
    path, _, sink = delivered
    policy = load(path)
    with _running_again(path, sink, tmp_path / "again.log") as port:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            client.mail("")
            client.rcpt("buyer@example.org")
            code, reply = client.data(_lone(4716))
        assert code == 250, reply
        sink.wait(2)
    report = Report(BOUNCE, (Failure("buyer@example.org", "5.1.1"),), "<inv-4716@erp.acme.example>")
    assert _act(policy, report) == [
        "buyer@example.org: bounced (5.1.1), suppressed",
        "no notice: the message had an empty envelope sender (RFC 5321 4.5.5)",
    ]
    assert Spool(policy.queue.directory, create=False).ids() == []


def test_a_complaint_suppresses_for_the_tenant_only_and_names_a_lone_recipient(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """A redacted complaint (no recipient) about a message to two people lists
    nobody; about a message to one, that one, for the message's tenant."""
    path, _, sink = delivered
    policy = load(path)
    complaint = Report(COMPLAINT, (), message_id="<inv-4711@erp.acme.example>")
    assert _act(policy, complaint) == [
        "names no recipient, and its message went to 3 (the sender's own copy among them):"
        " which one complained is not known, none is suppressed"
    ]
    assert _listed(policy) == {}
    with _running_again(path, sink, tmp_path / "again.log") as port:
        queue_id = send(port, _lone(4712), ("buyer@example.org",))
        sink.wait(2)
    redacted = Report(COMPLAINT, (), message_id="<inv-4712@erp.acme.example>")
    lines = _act(policy, redacted)
    assert lines[0] == "buyer@example.org: complained, suppressed"
    assert _listed(policy) == {"buyer@example.org": ("acme", "complaint", queue_id)}
    assert ("complained", "buyer@example.org") in audit_events(path, queue_id)
    spool = Spool(policy.queue.directory, create=False)
    (notice,) = [spool.read_message(q) for q in spool.ids()]
    head, body = notice.split(b"\r\n\r\n", 1)
    assert b"Subject: Complaint about: your document to buyer@example.org, sent " in head
    assert b"reported it as spam" in body and b"buyer@example.org" in body


def test_a_complaint_naming_nobody_about_a_message_its_sender_had_a_copy_of_lists_nobody(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """The invoice reached buyer@ and, as the automatic copy, its sender: a
    complaint that names nobody may be the sender's own provider's, yet
    buyer@ was listed and the sender told buyer@ had complained."""
    path, _, sink = delivered
    policy = load(path)
    with _running_again(path, sink, tmp_path / "again.log") as port:
        queue_id = send(port, _lone(4715, copy=True), ("buyer@example.org",))
        sink.wait(2)
    redacted = Report(COMPLAINT, (), message_id="<inv-4715@erp.acme.example>")
    assert _act(policy, redacted) == [
        "names no recipient, and its message went to 2 (the sender's own copy among them):"
        " which one complained is not known, none is suppressed"
    ]
    assert _listed(policy) == {}
    assert Spool(policy.queue.directory, create=False).ids() == []  # nobody told
    assert "complained" not in [e for e, _ in audit_events(path, queue_id)]
    # a bounce or a complaint that names buyer@ is about buyer@ all the same
    bounce = Report(BOUNCE, (Failure("buyer@example.org", "5.7.1"),), "<inv-4715@erp.acme.example>")
    assert _act(policy, bounce)[0] == (
        "buyer@example.org: bounced (5.7.1), not suppressed (not a hard bounce code)"
    )
    named = Report(COMPLAINT, (Failure("buyer@example.org"),), "<inv-4715@erp.acme.example>")
    assert _act(policy, named)[0] == "buyer@example.org: complained, suppressed"
    assert _listed(policy) == {"buyer@example.org": ("acme", "complaint", queue_id)}


def test_a_document_sent_twice_is_found_by_the_recipient_the_report_names(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """An ERP that sends an invoice again, to someone else, reuses its Message-ID:
    a bounce of the first recipient belongs to the first message, not the newest."""
    path, first, sink = delivered
    policy = load(path)
    with _running_again(path, sink, tmp_path / "again.log") as port:
        second = send(port, INVOICE, ("third@example.org",))
        sink.wait(2)
    about = Report(BOUNCE, (Failure("boss@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    original = find_original(policy.audit.directory, about)
    assert original is not None and original.queue_id == first
    about = Report(BOUNCE, (Failure("third@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    original = find_original(policy.audit.directory, about)
    assert original is not None and original.queue_id == second


def test_a_document_sent_again_to_the_same_recipient_has_its_bounce_on_the_newest(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """An ERP sends an invoice again, to the same people, under its Message-ID: a
    bounce naming only that ID goes on the newest copy's timeline, the one
    most likely just returned; the first copy's stays as it ended."""
    path, first, sink = delivered
    policy = load(path)
    with _running_again(path, sink, tmp_path / "again.log") as port:
        second = send(port, INVOICE, ("buyer@example.org", "boss@example.org"))
        sink.wait(2)
    about = Report(BOUNCE, (Failure("boss@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    assert _act(policy, about)[0] == "boss@example.org: bounced (5.1.1), suppressed"
    assert ("bounced", "boss@example.org") in audit_events(path, second)
    assert ("bounced", "boss@example.org") not in audit_events(path, first)


def test_a_complaint_weeks_later_still_finds_its_message(
    delivered: tuple[Path, str, Sink],
) -> None:
    """A recipient presses "spam" when reading the document, which can be weeks
    after it was sent: the complaint must still find it in the audit log, or
    the address is never listed and the company keeps mailing a complainer."""
    path, queue_id, _ = delivered
    policy = load(path)
    about = Report(
        COMPLAINT, (Failure("buyer@example.org"),), "<inv-4711@erp.acme.example>", None, "abuse"
    )
    weeks_later = datetime.now(UTC).date() + timedelta(days=25)
    original = find_original(policy.audit.directory, about, today=weeks_later)
    assert original is not None and original.queue_id == queue_id
    months_later = weeks_later + timedelta(days=35)
    assert find_original(policy.audit.directory, about, today=months_later) is None


def test_a_report_about_an_unknown_message_is_recorded_without_one_and_lists_nothing(
    delivered: tuple[Path, str, Sink],
) -> None:
    path, _, _ = delivered
    policy = load(path)
    report = Report(BOUNCE, (Failure("x@example.org", "5.1.1", "unknown"),), message_id="<nope@x>")
    assert find_original(policy.audit.directory, report) is None
    lines = _act(policy, report)
    assert lines == [
        "x@example.org: bounced (5.1.1), not suppressed (its message is not in the audit log)",
        "no notice: the message is not in the audit log",
    ]
    assert _listed(policy) == {}  # anyone can mail the return path
    found = relay_cli(path, "audit", "search", "--status", "bounced", "--format", "json")
    (record,) = [json.loads(line) for line in found.stdout.splitlines()]
    assert record["queue_id"] is None and record["message_id"] == "<nope@x>"


@pytest.mark.parametrize("message_id", ["<nope@x>"])
def test_a_report_about_an_unknown_message_taken_again_is_recorded_once(
    delivered: tuple[Path, str, Sink], message_id: str | None
) -> None:
    """Each taking added a record with no queue ID: a complaint run five times
    was five complaints in the log."""
    path, _, _ = delivered
    policy = load(path)
    report = Report(COMPLAINT, (Failure("victim@example.org"),), message_id, feedback_type="abuse")
    first = _act(policy, report)
    assert first[0] == (
        "victim@example.org: complained, not suppressed (its message is not in the audit log)"
    )
    assert _act(policy, report) == ["victim@example.org: already recorded with no queue ID"]
    other = Report(COMPLAINT, (Failure("victim@example.org"),), "<other@x>", feedback_type="abuse")
    assert _act(policy, other)[0].startswith("victim@example.org: complained, not suppressed")
    complained = [r for r in _records(policy) if r["event"] == "complained"]
    assert [(r["queue_id"], r["message_id"]) for r in complained] == [
        (None, message_id),
        (None, "<other@x>"),
    ]


def test_the_platforms_own_addresses_are_never_suppressed(
    delivered: tuple[Path, str, Sink],
) -> None:
    """A bounce heuristic that takes the return path quoted in an auto-reply for a
    failed recipient would otherwise list the relay's own bounce address."""
    path, _, _ = delivered
    policy = load(path)
    report = Report(
        BOUNCE,
        (
            Failure("Bounces@Platform.example", "5.1.1"),
            Failure("noreply@platform.example", "5.1.1"),
        ),
        message_id="<inv-4711@erp.acme.example>",
    )
    assert _act(policy, report) == [
        "names only the platform's own addresses, which are never suppressed"
    ]
    assert _listed(policy) == {}


def test_a_bounce_naming_someone_the_message_did_not_go_to_lists_nobody(
    delivered: tuple[Path, str, Sink],
) -> None:
    """A recipient of the invoice knows its Message-ID: a bounce forged with it
    must not stop the tenant's mail to a third address, nor add it to the
    invoice's story in the audit log."""
    path, queue_id, _ = delivered
    policy = load(path)
    report = Report(BOUNCE, (Failure("rival@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    assert _act(policy, report) == ["rival@example.org: not recorded: its message did not go to it"]
    assert _listed(policy) == {}
    assert "rival@example.org" not in {r for _, r in audit_events(path, queue_id)}


def test_a_complaint_naming_a_placeholder_is_about_the_lone_recipient(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    path, _, sink = delivered
    policy = load(path)
    with _running_again(path, sink, tmp_path / "again.log") as port:
        queue_id = send(port, _lone(4713), ("buyer@example.org",))
        sink.wait(2)
    report = Report(COMPLAINT, (Failure("redacted@isp.example"),), "<inv-4713@erp.acme.example>")
    lines = _act(policy, report)
    assert lines[:2] == [
        "names redacted@isp.example, whom the message did not go to: taken as redacted",
        "buyer@example.org: complained, suppressed",
    ]
    assert _listed(policy) == {"buyer@example.org": ("acme", "complaint", queue_id)}


def _sent_again_with_buyer_listed(
    delivered: tuple[Path, str, Sink], tmp_path: Path, copy: bool = True
) -> tuple[Policy, str]:
    """The invoice sent again to buyer@ and boss@, buyer@ on the list: it went
    to boss@ only (and, with ``copy``, to its sender). The policy, and the new
    message's queue ID."""
    path, _, sink = delivered
    policy = load(path)
    assert policy.suppression is not None
    SuppressionFile(policy.suppression.file).add(
        [Suppression("buyer@example.org", None, "manual", "2026-01-01T00:00:00.000Z")]
    )
    again = INVOICE.replace(b"<inv-4711@", b"<inv-4714@")
    if not copy:
        again = again.replace(b"Invoice 4711", b"Statement 4714")
    with _running_again(path, sink, tmp_path / "again.log") as port:
        queue_id = send(port, again, ("buyer@example.org", "boss@example.org"))
        sink.wait(3)  # the invoice to boss@, the notice about buyer@
    return policy, queue_id


def test_a_complaint_naming_nobody_is_about_the_one_recipient_the_message_reached(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """Microsoft's feedback loop names no recipient. The invoice went to two,
    but one of them was on the list and never had it: the complaint was
    dropped ("which one complained is not known"), nothing recorded or
    listed, and the complainer kept getting the tenant's mail."""
    policy, queue_id = _sent_again_with_buyer_listed(delivered, tmp_path, copy=False)
    report = Report(COMPLAINT, (), "<inv-4714@erp.acme.example>")
    assert _act(policy, report)[0] == "boss@example.org: complained, suppressed"
    assert _listed(policy)["boss@example.org"] == ("acme", "complaint", queue_id)


def test_a_complaint_naming_nobody_about_a_message_none_still_had_says_why(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """Both recipients bounced since: the line said the message "went to 0",
    and that which one complained was not known."""
    path, _, sink = delivered
    policy = load(path)
    statement = INVOICE.replace(b"<inv-4711@", b"<inv-4716@").replace(b"Invoice", b"Statement")
    with _running_again(path, sink, tmp_path / "again.log") as port:
        send(port, statement, ("buyer@example.org", "boss@example.org"))
        sink.wait(2)
    gone = (Failure("buyer@example.org", "5.1.1"), Failure("boss@example.org", "5.1.1"))
    _act(policy, Report(BOUNCE, gone, "<inv-4716@erp.acme.example>"))
    redacted = Report(COMPLAINT, (), "<inv-4716@erp.acme.example>")
    assert _act(policy, redacted) == [
        "names no recipient, and of its message's 2 recipients, 2 bounced since:"
        " none is left it can be about, none is suppressed"
    ]
    # sent again, both on the list now (buyer@ by hand, boss@ by the bounce)
    policy, _ = _sent_again_with_buyer_listed(delivered, tmp_path, copy=False)
    redacted = Report(COMPLAINT, (), "<inv-4714@erp.acme.example>")
    assert _act(policy, redacted) == [
        "names no recipient, and of its message's 2 recipients, 2 never had it"
        " (refused, expired or suppressed): none is left it can be about, none is suppressed"
    ]


def test_a_notice_about_a_bounce_counts_a_suppressed_recipient_as_not_reached(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """The invoice went to boss@ only: buyer@ was on the list. boss@ bouncing later
    means nobody got it, not "not everyone"."""
    policy, _ = _sent_again_with_buyer_listed(delivered, tmp_path)
    report = Report(BOUNCE, (Failure("boss@example.org", "5.2.2"),), "<inv-4714@erp.acme.example>")
    _act(policy, report)
    spool = Spool(policy.queue.directory, create=False)
    (notice,) = [spool.read_message(q) for q in spool.ids()]
    body = notice.split(b"\r\n\r\n", 1)[1].replace(b"=\r\n", b"")
    assert b"none of its recipients got it" in body
    assert b"buyer@example.org" not in body  # told already, when it was suppressed


def _immutable(path: Path) -> bool:
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_a_report_taken_again_after_a_failed_audit_write_tells_the_sender_once(
    delivered: tuple[Path, str, Sink],
) -> None:
    """The mail system hands the report over again after an exit 75: the notice
    is queued only once its records are written, so the retries queue none."""
    path, queue_id, _ = delivered
    policy = load(path)
    (day,) = sorted(policy.audit.directory.glob("*.jsonl"))
    if not _immutable(day):
        pytest.skip("the file system takes no immutable flag here")
    report = Report(BOUNCE, (Failure("boss@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    try:
        for _ in range(2):
            with pytest.raises(AuditError):
                _act(policy, report)
    finally:
        subprocess.run(["chattr", "-i", str(day)], check=True)
    assert list(Spool(policy.queue.directory, create=False).ids()) == []
    assert _act(policy, report)[0] == "boss@example.org: bounced (5.1.1), suppressed"
    assert len(list(Spool(policy.queue.directory, create=False).ids())) == 1
    # listed by the first taking, on record once the log takes it
    assert [e for e, _ in audit_events(path, queue_id)].count("listed") == 1
    assert len(_listed(policy)) == 1
    assert policy.suppression is not None
    assert policy.suppression.file.read_text().count("boss@example.org") == 1


def test_a_report_taken_twice_is_recorded_and_told_once(
    delivered: tuple[Path, str, Sink],
) -> None:
    """A mail system may deliver one report twice; the second changes nothing."""
    path, queue_id, _ = delivered
    policy = load(path)
    report = Report(BOUNCE, (Failure("boss@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    first = _act(policy, report)
    assert first[0] == "boss@example.org: bounced (5.1.1), suppressed"
    assert _act(policy, report) == ["boss@example.org: already recorded"]
    assert [e for e, _ in audit_events(path, queue_id)].count("bounced") == 1
    assert len(list(Spool(policy.queue.directory, create=False).ids())) == 1


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_a_report_recorded_whose_notice_failed_is_told_when_taken_again(
    delivered: tuple[Path, str, Sink],
) -> None:
    """Exit 75 after the records were written but the queue took no notice: the
    mail system's retry queues the notice, and records nothing twice."""
    path, queue_id, _ = delivered
    policy = load(path)
    queue = policy.queue.directory
    report = Report(BOUNCE, (Failure("boss@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    locked = [d for d in queue.iterdir() if d.is_dir()]
    if not all(_immutable(d) for d in locked):
        pytest.skip("the file system takes no immutable flag here")
    try:
        with pytest.raises(SpoolError):
            _act(policy, report)
    finally:
        for directory in locked:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    lines = _act(policy, report)
    assert lines[0] == "boss@example.org: already recorded"
    assert lines[1].startswith("jan@acme.example told (notice ")
    assert [e for e, _ in audit_events(path, queue_id)].count("bounced") == 1
    assert len(list(Spool(queue, create=False).ids())) == 1


def test_the_notice_names_the_document_as_the_audit_log_has_it(
    policy_file: Path, tmp_path: Path
) -> None:
    """With subjects on record, the notice takes the relay's own, not the one the
    bounce returned (which whoever sent the bounce wrote)."""
    sink = Sink()
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port, "audit: {record_subject: yes}\n")
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            send(port, INVOICE, ("buyer@example.org", "boss@example.org"))
            sink.wait(1)
    loaded = load(policy)
    report = Report(
        BOUNCE, (Failure("boss@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>", "Lies"
    )
    _act(loaded, report)
    spool = Spool(loaded.queue.directory, create=False)
    (notice,) = [spool.read_message(q) for q in spool.ids()]
    assert b"Subject: Undelivered: Invoice 4711\r\n" in notice


def test_a_bounce_is_found_by_the_queue_id_the_relay_sent_as_envid(
    policy_file: Path, tmp_path: Path
) -> None:
    """To an upstream that offers DSN the relay sends its queue ID as ENVID; the
    bounce returns it (Original-Envelope-Id), and names the message exactly,
    whatever Message-ID the ERP reused or the bounce left out."""
    sink = DsnSink()
    with DsnSinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            first = send(port, INVOICE, ("buyer@example.org", "boss@example.org"))
            second = send(port, INVOICE, ("buyer@example.org",))  # the same Message-ID
            sink.wait(2)
    assert sorted(sink.dsn_options) == sorted([["RET=HDRS", f"ENVID={q}"] for q in (first, second)])
    loaded = load(policy)
    report = Report(BOUNCE, (Failure("buyer@example.org", "5.1.1"),), envelope_id=first)
    lines = _act(loaded, report)
    assert lines[0] == "buyer@example.org: bounced (5.1.1), suppressed"
    assert ("bounced", "buyer@example.org") in audit_events(policy, first)
    assert ("bounced", "buyer@example.org") not in audit_events(policy, second)


def test_a_bounce_returning_the_envelope_id_in_lower_case_finds_its_message(
    delivered: tuple[Path, str, Sink],
) -> None:
    """Queue IDs are taken in any case, as the queue and audit tools take them: a
    server that folds the ENVID it returns still names the message, and one
    named by its queue ID alone is not lost."""
    path, queue_id, _ = delivered
    policy = load(path)
    report = Report(BOUNCE, (Failure("boss@example.org", "5.1.1"),), envelope_id=queue_id.lower())
    assert _act(policy, report)[0] == "boss@example.org: bounced (5.1.1), suppressed"
    assert ("bounced", "boss@example.org") in audit_events(path, queue_id)


def _dsn(returned_header: bytes, recipient: str) -> bytes:
    """A bounce as a DSN-less upstream writes it (no Original-Envelope-Id), the
    message's header returned whole."""
    return (
        b"From: MAILER-DAEMON@mx.example.org\r\nTo: bounces@platform.example\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nThe mail system could not deliver it.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.org\r\n\r\n"
        b"Final-Recipient: rfc822; " + recipient.encode() + b"\r\nAction: failed\r\n"
        b"Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
        b"\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n" + returned_header + b"\r\n--b--\r\n"
    )


def _one_message_id_two_tenants(
    policy_file: Path,
    tmp_path: Path,
    acme_rcpts: tuple[str, ...],
    listed_for_globex: str = "",
    listed_for_all: str = "",
) -> tuple[Path, str, Received | None]:
    """Acme's invoice to ``acme_rcpts`` and Globex's, with the same Message-ID, to
    buyer@ (``listed_for_globex`` on Globex's list first, ``listed_for_all`` on
    every tenant's): the policy, Acme's queue ID and its message as the sink
    got it (None if it got none)."""
    sink = Sink()
    globex = INVOICE.replace(b"From: jan@acme.example", b"From: hank@globex.example")
    listed = [(listed_for_globex, "globex"), (listed_for_all, None)]
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        entries = [Suppression(a, t, "manual", "2026-01-01T00:00:00.000Z") for a, t in listed if a]
        if entries:
            (tmp_path / "state").mkdir(exist_ok=True)
            SuppressionFile(tmp_path / "state" / "suppression.jsonl").add(entries)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            acme_id = send(port, INVOICE, acme_rcpts)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("hank@globex.example", ["buyer@example.org"], globex)
            if listed_for_all:  # buyer@ gets none; the senders' copies go, then none is left
                loaded = load(policy)
                wait_for(lambda: [r["event"] for r in _records(loaded)].count("suppressed") == 2)
                wait_for(lambda: Spool(loaded.queue.directory, create=False).ids() == [])
                return policy, acme_id, None
            acme_sent = next(m for m in sink.wait(2) if b"jan@acme.example" in m.data)
    return policy, acme_id, acme_sent


def test_a_message_id_two_tenants_used_is_charged_to_neither_but_by_its_queue_id(
    policy_file: Path, tmp_path: Path
) -> None:
    """Two companies' ERPs numbered a document alike: a bounce or complaint that
    named the message by Message-ID alone went to the newest, the other
    tenant's, whose user was told of a customer it never wrote to, while the
    sender kept mailing the address. The relay's Received field, in the header
    the report returns, names the message exactly."""
    policy, acme_id, acme_sent = _one_message_id_two_tenants(
        policy_file, tmp_path, ("buyer@example.org",)
    )
    loaded = load(policy)
    globex_id = next(
        r["queue_id"]
        for r in _records(loaded)
        if r["event"] == "received" and r["tenant"] == "globex"
    )
    by_message_id = Report(
        BOUNCE, (Failure("buyer@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>"
    )
    assert _act(loaded, by_message_id) == [
        "messages of more than one tenant have this Message-ID, and the report names none"
        f" of them by queue ID: {acme_id} (acme/jan), {globex_id} (globex/hank)",
        "buyer@example.org: not acted on, as more than one of them went there:"
        " recorded with no queue ID, not suppressed",
    ]
    # on record all the same, as a report about a message the log does not have;
    # once, if it comes again, and not for someone neither message went to
    again = Report(
        BOUNCE,
        (Failure("buyer@example.org", "5.1.1"), Failure("victim@example.com", "5.1.1")),
        "<inv-4711@erp.acme.example>",
    )
    assert _act(loaded, again)[1:] == [
        "buyer@example.org: already recorded with no queue ID",
        "victim@example.com: not recorded: none of its messages went to it",
    ]
    unattributed = [r for r in _records(loaded) if r["event"] == "bounced"]
    assert [(r["queue_id"], r["message_id"], r["recipient"]) for r in unattributed] == [
        (None, "<inv-4711@erp.acme.example>", "buyer@example.org")
    ]
    assert _listed(loaded) == {}
    assert Spool(loaded.queue.directory, create=False).ids() == []  # nobody told

    header = acme_sent.data.split(b"\r\n\r\n", 1)[0]
    report = read(_dsn(header, "buyer@example.org"))
    assert report is not None and acme_id in report.queue_ids
    assert _act(loaded, report)[0] == "buyer@example.org: bounced (5.1.1), suppressed"
    assert ("bounced", "buyer@example.org") in audit_events(policy, acme_id)
    assert ("bounced", "buyer@example.org") not in audit_events(policy, globex_id)


def test_a_recipient_only_one_tenants_message_went_to_is_acted_on_in_a_shared_report(
    policy_file: Path, tmp_path: Path
) -> None:
    """A report naming by Message-ID alone a recipient both companies' messages
    went to, and one only Acme's did: the whole report was held up, and the
    dead address Acme alone mailed was never listed, nor Jan told."""
    policy, acme_id, _ = _one_message_id_two_tenants(
        policy_file, tmp_path, ("buyer@example.org", "boss@example.org")
    )
    loaded = load(policy)
    report = Report(
        BOUNCE,
        (Failure("buyer@example.org", "5.1.1"), Failure("boss@example.org", "5.1.1")),
        "<inv-4711@erp.acme.example>",
    )
    lines = _act(loaded, report)
    assert lines[1:3] == [
        "buyer@example.org: not acted on, as more than one of them went there:"
        " recorded with no queue ID, not suppressed",
        f"boss@example.org: only {acme_id} (acme/jan) went there:",
    ]
    assert lines[3] == "  boss@example.org: bounced (5.1.1), suppressed"
    assert lines[4].startswith("  jan@acme.example told (notice ")
    assert _listed(loaded) == {"boss@example.org": ("acme", "bounce", acme_id)}
    assert ("bounced", "boss@example.org") in audit_events(policy, acme_id)
    assert ("bounced", "buyer@example.org") not in audit_events(policy, acme_id)


def test_a_shared_message_id_is_charged_to_the_tenant_whose_copy_reached_the_recipient(
    policy_file: Path, tmp_path: Path
) -> None:
    """Globex's copy never went to buyer@ (on Globex's list), Acme's did: the hard
    bounce was "not acted on, as more than one of them went there"."""
    policy, acme_id, _ = _one_message_id_two_tenants(
        policy_file, tmp_path, ("buyer@example.org",), listed_for_globex="buyer@example.org"
    )
    loaded = load(policy)
    assert loaded.suppression is not None and loaded.suppression.file.parent == tmp_path / "state"
    report = Report(BOUNCE, (Failure("buyer@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    assert _act(loaded, report)[0] == "buyer@example.org: bounced (5.1.1), suppressed"
    listed = SuppressionFile(loaded.suppression.file).entries().entries
    assert ("acme", "bounce", acme_id) in [(e.tenant, e.reason, e.queue_id) for e in listed]


def test_a_shared_message_id_whose_copies_never_reached_the_recipient_records_nothing(
    policy_file: Path, tmp_path: Path
) -> None:
    """Both tenants' copies were suppressed for buyer@: a report about it, which
    anyone can send to the return path, was recorded, "as more than one of
    them went there", where none did."""
    policy, _, _ = _one_message_id_two_tenants(
        policy_file, tmp_path, ("buyer@example.org",), listed_for_all="buyer@example.org"
    )
    loaded = load(policy)
    report = Report(BOUNCE, (Failure("buyer@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    assert _act(loaded, report)[1:] == [
        "buyer@example.org: not recorded: none of its messages reached it"
    ]
    assert "bounced" not in [r["event"] for r in _records(loaded)]
    assert Spool(loaded.queue.directory, create=False).ids() == []  # nobody told


def _records(policy: Policy) -> list[dict]:
    return [
        json.loads(line)
        for day in sorted(policy.audit.directory.glob("*.jsonl"))
        for line in day.read_text().splitlines()
    ]


def test_a_bounce_about_a_recipient_the_message_never_reached_is_neither_recorded_nor_told(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """Anyone can mail the return path: a report naming a recipient refused at
    delivery (or, here, suppressed) was recorded as bounced and told its sender
    a second time, that the server had "returned it after accepting it"."""
    policy, queue_id = _sent_again_with_buyer_listed(delivered, tmp_path)
    report = Report(BOUNCE, (Failure("buyer@example.org", "5.1.1"),), "<inv-4714@erp.acme.example>")
    assert _act(policy, report) == ["buyer@example.org: not recorded: its message never reached it"]
    assert Spool(policy.queue.directory, create=False).ids() == []  # no notice
    records = [r for r in _records(policy) if r.get("queue_id") == queue_id]
    assert "bounced" not in {r["event"] for r in records}


def test_a_bounce_is_about_the_copy_that_reached_its_recipient(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """The document sent again under its Message-ID, this time not to buyer@ (on
    the list now): buyer@'s bounce, naming the Message-ID only, was taken as
    about the newest copy, which never reached it, and dropped."""
    path, first, sink = delivered
    policy = load(path)
    assert policy.suppression is not None
    SuppressionFile(policy.suppression.file).add(
        [Suppression("buyer@example.org", None, "manual", "2026-01-01T00:00:00.000Z")]
    )
    with _running_again(path, sink, tmp_path / "again.log") as port:
        second = send(port, INVOICE, ("buyer@example.org", "boss@example.org"))
        sink.wait(3)  # the invoice to boss@, the notice about buyer@
    report = Report(BOUNCE, (Failure("buyer@example.org", "5.1.1"),), "<inv-4711@erp.acme.example>")
    assert _act(policy, report)[0].startswith("buyer@example.org: bounced (5.1.1)")
    bounced = [r for r in _records(policy) if r["event"] == "bounced"]
    assert [r["queue_id"] for r in bounced] == [first] != [second]
    # taken again (a mail system's retry): the copy the first taking recorded
    assert _act(policy, report)[0] == "buyer@example.org: already recorded"


def test_a_report_naming_a_user_of_the_tenant_lists_nobody(
    delivered: tuple[Path, str, Sink], tmp_path: Path
) -> None:
    """The relay's notices and automatic copies go to the tenant's users: a
    complaint about the sender's copy (forged, or the sender's own provider's)
    listed the sender, who heard of no failure again; a bounce of a colleague
    the document went to listed the colleague."""
    path, _, sink = delivered
    policy = load(path)
    document = _lone(4721, copy=True).replace(
        b"To: buyer@example.org", b"To: buyer@example.org, Salg@acme.example"
    )
    with _running_again(path, sink, tmp_path / "again.log") as port:
        send(port, document, ("buyer@example.org", "Salg@acme.example"))
        sink.wait(2)
    why = (
        "the relay's notices and copies are the user's; a mailbox really gone is taken out"
        " of the policy"
    )
    complaint = Report(COMPLAINT, (Failure("jan@acme.example"),), "<inv-4721@erp.acme.example>")
    assert _act(policy, complaint) == [
        f"jan@acme.example: complained, not suppressed (user jan of acme: {why})",
        "no notice: the report is about the sender's own copy",
    ]
    bounce = Report(BOUNCE, (Failure("salg@acme.example", "5.1.1"),), "<inv-4721@erp.acme.example>")
    lines = _act(policy, bounce)
    assert (
        lines[0] == f"Salg@acme.example: bounced (5.1.1), not suppressed (user kari of acme: {why})"
    )
    assert lines[1].startswith("jan@acme.example told (notice ")  # it did not reach Kari
    assert _listed(policy) == {}
    nothing = relay_cli(path, "audit", "search", "--status", "listed")
    assert (nothing.returncode, nothing.stdout.splitlines()[1:]) == (1, [])


def test_a_report_naming_more_recipients_than_a_message_has_is_acted_on_for_as_many(
    delivered: tuple[Path, str, Sink],
) -> None:
    """One forged report naming 20,000 recipients of a message the log does not
    have wrote 20,000 records into the audit log, kept for years, and the
    report's totals counted each."""
    path, _, _ = delivered
    policy = load(path)
    most = max(listener.max_recipients for listener in policy.listeners) + 1  # the copy
    failures = tuple(Failure(f"x{n}@example.org", "5.1.1") for n in range(most + 500))
    lines = _act(policy, Report(BOUNCE, failures, message_id="<nope@x>"))
    assert len(lines) == most + 2
    assert lines[-1] == (
        f"500 more recipients not acted on: a report is taken for at most {most},"
        " as many as one message goes to"
    )
    bounced = [r for r in _records(policy) if r["event"] == "bounced"]
    assert [r["recipient"] for r in bounced] == [f.recipient for f in failures[:most]]
    report = relay_cli(path, "audit", "report", "--format", "json")
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    assert sum(r["bounced"] for r in rows) == 0  # about no message of the relay's
