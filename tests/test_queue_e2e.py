"""The durable queue end to end: a real relay process, a real sink that misbehaves."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay import message
from relay.audit import AuditLog, events, reader
from relay.policy.load import load
from relay.record import operator
from relay.spool import Spool
from tests.readonly import read_only
from tests.relayproc import RelayProcess, piped_into_head, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.spoolkit import make_entry
from tests.test_decide_account import with_account

ROOT = Path(__file__).parent.parent
MESSAGES_PER_CLIENT = 500
KILLS = 5
SMALL = b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: Hello\r\n\r\nhi\r\n"


def configure(policy_file: Path, relay_port: int, sink_port: int, extra: str = "") -> Path:
    text = policy_file.read_text().replace("port: 2525", f"port: {relay_port}")
    smtp = (
        f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {sink_port}\n"
        "    tls: none\n    timeout: 5\n"
    )
    text = text.replace("  default:\n    type: directory\n    path: outbox\n", smtp)
    text += "queue: {first_retry: 0.5, max_retry: 1, lifetime: 3600}\n" + extra
    policy_file.write_text(text)
    return policy_file


def send(port: int, data: bytes = SMALL, rcpts: tuple[str, ...] = ("one@example.org",)) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail("jan@acme.example")
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, reply = client.data(data)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def relay_cli(policy: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args[:2], "-c", str(policy), *args[2:]],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, input=stdin,
    )  # fmt: skip


def relay_cli_again(policy: Path, *args: str, stdin: str | None = None) -> int:
    """A queue tool run again while it finds the message "being delivered right
    now", as its message says to: a delivery attempt holds the entry a moment,
    and on a busy machine that moment is long. Its last exit status."""
    deadline = time.monotonic() + 30
    done = relay_cli(policy, *args, stdin=stdin)
    while "being delivered right now" in done.stderr and time.monotonic() < deadline:
        time.sleep(0.2)
        done = relay_cli(policy, *args, stdin=stdin)
    return done.returncode


def audit_records(policy: Path, queue_id: str) -> list[dict]:
    done = relay_cli(policy, "audit", "show", queue_id, "--format", "json")
    assert done.returncode == 0, done.stderr
    return (
        json.loads(done.stdout)
        if done.stdout.lstrip().startswith("[")
        else [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    )


def audit_events(policy: Path, queue_id: str) -> list[str]:
    return [(r["event"], r.get("recipient")) for r in audit_records(policy, queue_id)]


def test_upstream_down_then_back_delivers_everything(policy_file: Path, tmp_path: Path) -> None:
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        ids = [send(port) for _ in range(3)]
        wait_for(lambda: relay.log().count("status=deferred") >= 3)
        listed = relay_cli(policy, "queue", "list", "--json")
        assert {json.loads(line)["queue_id"] for line in listed.stdout.splitlines()} == set(ids)
        with SinkServer(port=sink_port) as sink:
            sink.sink.wait(3)
            wait_for(lambda: relay.log().count("status=sent") >= 3)
        wait_for(lambda: relay_cli(policy, "queue", "list").stdout.strip() == "Mail queue is empty")
    events = audit_events(policy, ids[0])
    shown = relay_cli(policy, "audit", "show", ids[0], "--format", "json").stdout
    received = next(r for r in map(json.loads, shown.splitlines()) if r["event"] == "received")
    assert received["found_by"] == "envelope_sender"  # no login: the order's next source
    retries = len(events) - 3
    assert retries >= 1
    assert events == [
        ("received", None),
        ("queued", None),
        *[("deferred", "one@example.org")] * retries,
        ("delivered", "one@example.org"),
    ]


def test_the_list_names_the_selectors_a_waiting_message_is_signed_with(
    policy_file: Path, tmp_path: Path
) -> None:
    """A message waiting goes with the signature it was accepted with, however
    late: after a key rotation the old selector's record stays published until
    no message in the queue lists it."""
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port)
        wait_for(lambda: "status=deferred" in relay.log())
        listed = relay_cli(policy, "queue", "list", "--json")
    (record,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert record["queue_id"] == queue_id
    assert record["dkim"] == ["platform.example/s1", "platform.example/e1"]


def free_ipv6_port() -> int | None:
    """A port nothing listens on at ::1, or None where this host has no ::1."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def test_a_deferral_names_an_ipv6_upstream_in_brackets(policy_file: Path, tmp_path: Path) -> None:
    """``::1:38710`` in the reply, the log and the audit record reads as another
    address, port unknown; the relay's other messages write ``[::1]:38710``."""
    upstream_port = free_ipv6_port()
    if upstream_port is None:
        pytest.skip("no ::1 on this host")
    port = free_port()
    policy = configure(policy_file, port, upstream_port)
    policy.write_text(policy.read_text().replace("host: 127.0.0.1", "host: '::1'"))
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port)
        wait_for(lambda: "status=deferred" in relay.log())
    said = f"Upstream default ([::1]:{upstream_port}): Connection refused (connecting)"
    assert f"451 4.4.1 {said}" in relay.log()
    shown = relay_cli(policy, "audit", "show", queue_id, "--format", "json").stdout
    deferred = next(r for r in map(json.loads, shown.splitlines()) if r["event"] == "deferred")
    assert deferred["reply"] == f"451 4.4.1 {said}"


def test_a_notice_writes_its_date_in_utc_as_plus_0000(policy_file: Path, tmp_path: Path) -> None:
    """It wrote ``GMT``, an obsolete zone a writer must not make (RFC 5322
    4.3), where the Date and Received the relay adds to a document say ``+0000``."""
    refusing = Sink(refuse={"two@example.org": "550 5.1.1 <two@example.org>: no such user"})
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            send(port, SMALL, ("one@example.org", "two@example.org"))
            original, notice = sink.sink.wait(2)
    documents = message.read(original.data)
    received = documents.get("Received") or ""
    for date in (documents.get("Date") or "", received, message.read(notice.data).get("Date")):
        assert date.endswith(" +0000") and "GMT" not in date, date
    body = notice.data.split(b"\r\n\r\n", 1)[1].decode()
    assert re.search(r"\nReceived: +\w{3}, \d{2} \w{3} \d{4} [\d:]{8} \+0000, by the", body)


def test_one_recipient_refused_others_delivered_and_sender_told(
    policy_file: Path, tmp_path: Path
) -> None:
    refusing = Sink(refuse={"two@example.org": "550 5.1.1 <two@example.org>: no such user"})
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            data = SMALL.replace(b"Subject: Hello", b"Subject: Invoice 4711")
            qid = send(port, data, ("one@example.org", "two@example.org", "three@example.org"))
            original, notice = sink.sink.wait(2)
            assert original.rcpt_tos == ["one@example.org", "three@example.org", "jan@acme.example"]
            assert notice.mail_from == "<>"  # the null sender: a notice never bounces
            assert notice.rcpt_tos == ["jan@acme.example"]
            text = message.read(notice.data)
            assert text.get("Subject") == "Undelivered: Invoice 4711"
            assert text.get("Auto-Submitted") == "auto-generated"
            body = notice.data.split(b"\r\n\r\n", 1)[1].decode()
            assert "two@example.org" in body and "no such user" in body and qid in body
            time.sleep(0.5)
            assert len(sink.sink.messages) == 2
    assert audit_events(policy, qid) == [
        ("received", None),
        ("queued", None),
        ("delivered", "one@example.org"),
        ("failed", "two@example.org"),
        ("delivered", "three@example.org"),
        ("delivered", "jan@acme.example"),
        ("listed", "two@example.org"),  # a 5.1.1: on the suppression list now
        ("notified", "jan@acme.example"),  # the notice: queued under an ID of its own
    ]
    # as the queue tools take it: pasted in lower case
    found = relay_cli(policy, "audit", "search", "--queue-id", qid.lower(), "--format", "json")
    assert found.returncode == 0, found.stderr
    assert {json.loads(line)["queue_id"] for line in found.stdout.splitlines()} == {qid}
    report = relay_cli(policy, "audit", "report", "--format", "json")
    rows = {(r["tenant"], r["doc_type"]): r for r in map(json.loads, report.stdout.splitlines())}
    assert rows.keys() == {("acme", "invoice"), ("acme", "notice")}, report.stdout
    assert rows["acme", "notice"]["delivered"] == 1


def test_a_failure_is_told_at_once_while_another_recipient_is_deferred(
    policy_file: Path, tmp_path: Path
) -> None:
    """two@ is refused, three@ deferred: the sender hears of two@ now, not once
    three@ is done (that can be days), and only once."""
    refusing = Sink(
        refuse={
            "two@example.org": "550 5.1.1 <two@example.org>: no such user",
            "three@example.org": "451 4.2.0 <three@example.org>: mailbox busy",
        }
    )
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            qid = send(port, SMALL, ("one@example.org", "two@example.org", "three@example.org"))
            first, notice = sink.sink.wait(2)
            assert notice.mail_from == "<>" and notice.rcpt_tos == ["jan@acme.example"]
            body = notice.data.split(b"\r\n\r\n", 1)[1].decode()
            assert "two@example.org" in body and "three@example.org" not in body
            assert "three@example.org" not in first.rcpt_tos  # deferred meanwhile
            del refusing.refuse["three@example.org"]
            later = sink.sink.wait(3)[2]
            assert later.rcpt_tos == ["three@example.org"]
            time.sleep(0.5)
            assert len(sink.sink.messages) == 3  # no second notice when the message is done
    events_of = audit_events(policy, qid)
    assert ("failed", "two@example.org") in events_of
    assert events_of[-1] == ("delivered", "three@example.org")


def test_failed_automatic_bcc_never_produces_a_notice(policy_file: Path, tmp_path: Path) -> None:
    refusing = Sink(refuse={"jan@acme.example": "550 5.2.2 mailbox full"})
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            send(port, SMALL.replace(b"Subject: Hello", b"Subject: Invoice 1"))
            sink.sink.wait(1)
            wait_for(lambda: "status=bounced" in relay.log())
            time.sleep(1.0)
            assert len(sink.sink.messages) == 1
            assert "failure notice" not in relay.log()


def test_immediate_mode_passes_a_permanent_refusal_back(policy_file: Path, tmp_path: Path) -> None:
    refusing = Sink(refuse={"one@example.org": "550 5.1.1 <one@example.org>: mailbox unknown"})
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        policy.write_text(
            policy.read_text().replace("auth: optional", "auth: optional\n    immediate: 10")
        )
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("jan@acme.example")
                client.rcpt("one@example.org")
                code, reply = client.data(SMALL)
            assert (code, reply) == (550, b"5.1.1 <one@example.org>: mailbox unknown")
            assert relay_cli(policy, "queue", "list").stdout.strip() == "Mail queue is empty"
            refused = re.findall(r" INFO ([0-9A-Z]{16}): refused client=(.*)", relay.log())
            assert refused == [
                (
                    refused[0][0],
                    "127.0.0.1 login=- from=<jan@acme.example> to=<one@example.org>:"
                    " 550 5.1.1 <one@example.org>: mailbox unknown"
                    " (the upstream's refusal, passed back: not sent, not kept)",
                )
            ]
            assert f"{refused[0][0]}: client=127.0.0.1 " in relay.log()  # its queued line
            time.sleep(0.5)
            assert sink.sink.messages == []
            qid = send(port, SMALL, ("two@example.org",))
            assert sink.sink.wait(1)[0].rcpt_tos == ["two@example.org"]
    assert audit_events(policy, qid) == [
        ("received", None),
        ("queued", None),
        ("delivered", "two@example.org"),
    ]


class RefusingSender(Sink):
    async def handle_MAIL(self, *_: Any) -> str:
        return "550 5.7.60 Client does not have permissions to send as this sender"


def test_immediate_mode_passes_a_refusal_of_the_relay_s_sender_back_as_temporary(
    policy_file: Path, tmp_path: Path
) -> None:
    """The upstream refusing the envelope sender the policy chose (an account
    that sends only as itself, its ``sender`` not set) is no fault of the
    document's: passed back as it came, the ERP dropped the document for good
    over a setting of the relay's, with a text about a sender not its own."""
    with SinkServer(RefusingSender()) as sink:
        port = free_port()
        policy = immediate(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            assert submit(port, ("one@example.org",), SMALL) == (
                451,
                b"4.7.0 Upstream default refused the relay's envelope sender"
                b" <bounces@platform.example> (550 5.7.60 Client does not have permissions"
                b" to send as this sender): a setting of the relay's, try again later",
            )
            assert relay_cli(policy, "queue", "list").stdout.strip() == "Mail queue is empty"
            assert "refused the envelope sender" in relay.log()
            assert sink.sink.messages == []


def test_immediate_0_is_off_and_answers_as_soon_as_queued(
    policy_file: Path, tmp_path: Path
) -> None:
    """0 is how a sysadmin writes "off", as the example's "Left out: answer as
    soon as it is queued" suggests: the policy was refused, the relay not started."""
    refusing = Sink(refuse={"one@example.org": UNKNOWN})
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        policy.write_text(
            policy.read_text().replace("auth: optional", "auth: optional\n    immediate: 0")
        )
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            qid = send(port)
            wait_for(lambda: ("failed", "one@example.org") in audit_events(policy, qid), 10)


INVOICE = SMALL.replace(b"Subject: Hello", b"Subject: Invoice 4711")
UNKNOWN = "550 5.1.1 <one@example.org>: mailbox unknown"


def immediate(policy_file: Path, port: int, sink_port: int) -> Path:
    policy = configure(policy_file, port, sink_port)
    text = policy.read_text().replace("auth: optional", "auth: optional\n    immediate: 10")
    policy.write_text(text)
    return policy


def submit(port: int, rcpts: tuple[str, ...], data: bytes = INVOICE) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail("jan@acme.example")
        for rcpt in rcpts:
            client.rcpt(rcpt)
        return client.data(data)


def audit_replies(policy: Path) -> list[tuple[str, str | None, str | None]]:
    done = relay_cli(policy, "audit", "search", "--format", "json")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return [(r["event"], r.get("recipient"), r.get("reply")) for r in records]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-at-a-time", "pipelining"])
def test_immediate_mode_refuses_an_invoice_whose_customer_is_refused_and_sends_no_copy(
    policy_file: Path, tmp_path: Path, pipelining: bool
) -> None:
    """The sender's automatic BCC copy is taken by the upstream, the customer is
    not: the ERP hears the refusal, so nothing goes, the copy neither (it went,
    and the refusal reached the sender as a notice while the ERP heard 250)."""
    refusing = Sink(refuse={"one@example.org": UNKNOWN}, pipelining=pipelining)
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = immediate(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            code, reply = submit(port, ("one@example.org",))
            assert (code, reply) == (550, b"5.1.1 <one@example.org>: mailbox unknown")
            assert relay_cli(policy, "queue", "list").stdout.strip() == "Mail queue is empty"
            time.sleep(1.0)  # past the first retry, had anything stayed
            assert sink.sink.messages == []  # no DATA: neither the copy nor a notice
            assert sink.sink.resets >= 1  # the transaction was reset instead
            assert "failure notice" not in relay.log()
    assert audit_replies(policy) == [
        ("policy_loaded", None, None),
        ("received", None, None),
        ("queued", None, None),
        ("failed", "one@example.org", UNKNOWN),
        ("failed", "jan@acme.example", f"not sent: the message was refused ({UNKNOWN})"),
        ("listed", "one@example.org", None),
    ]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-at-a-time", "pipelining"])
def test_immediate_mode_sends_an_invoice_one_of_whose_customers_is_taken(
    policy_file: Path, tmp_path: Path, pipelining: bool
) -> None:
    """A customer taken: the message goes, with its copy, as without the wait; a
    customer refused beside it reaches the sender as a notice."""
    refusing = Sink(refuse={"one@example.org": UNKNOWN}, pipelining=pipelining)
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = immediate(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            code, reply = submit(port, ("two@example.org",))
            assert code == 250, reply
            (alone,) = sink.sink.wait(1)
            assert alone.rcpt_tos == ["two@example.org", "jan@acme.example"]
            code, reply = submit(port, ("one@example.org", "three@example.org"))
            assert code == 250, reply
            both, notice = sink.sink.wait(3)[1:]
            assert both.rcpt_tos == ["three@example.org", "jan@acme.example"]
            assert notice.mail_from == "<>" and notice.rcpt_tos == ["jan@acme.example"]
            assert "one@example.org" in notice.data.decode()
            time.sleep(0.5)
            assert len(sink.sink.messages) == 3
    second = reply.decode().rsplit(" ", 1)[1]
    assert audit_events(policy, second) == [
        ("received", None),
        ("queued", None),
        ("failed", "one@example.org"),
        ("delivered", "three@example.org"),
        ("delivered", "jan@acme.example"),
        ("listed", "one@example.org"),
        ("notified", "jan@acme.example"),
    ]


def test_expired_messages_fail_and_tell_the_sender(policy_file: Path, tmp_path: Path) -> None:
    port, dead = free_port(), free_port()
    policy = configure(policy_file, port, dead)
    policy.write_text(policy.read_text().replace("lifetime: 3600", "lifetime: 2"))
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        qid = send(port)
        # at 2 s, but a machine busy with other work can take its time
        wait_for(lambda: "status=expired" in relay.log(), timeout=90)
    events = audit_events(policy, qid)
    retries = len(events) - 4
    assert events == [
        ("received", None),
        ("queued", None),
        *[("deferred", "one@example.org")] * retries,
        ("expired", "one@example.org"),
        ("notified", "jan@acme.example"),
    ]
    assert "failure notice" in relay.log()


def test_a_notice_that_expires_says_the_sender_was_not_told(
    policy_file: Path, tmp_path: Path
) -> None:
    """The notice of an expiry on the tenant's dead upstream goes that way too,
    and expired with nothing above INFO: nobody knew the sender never heard."""
    port, dead = free_port(), free_port()
    policy = configure(policy_file, port, dead)
    policy.write_text(policy.read_text().replace("lifetime: 3600", "lifetime: 2"))
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        qid = send(port)
        wait_for(lambda: "the sender was not told" in relay.log(), timeout=90)
        log = relay.log()
    notice = re.search(rf"{qid}: failure notice to=<jan@acme.example> queued as (\w+)", log)
    assert notice is not None, log
    said = (
        f"ERROR {qid}: the sender was not told: failure notice {notice[1]} to"
        " <jan@acme.example> expired (not delivered within 2 seconds; last reply: 451 4.4.1"
    )
    assert log.count(said) == 1, log
    assert audit_events(policy, notice[1])[-1] == ("expired", "jan@acme.example")
    found = relay_cli(
        policy, "audit", "search", "--doc-type", "notice", "--status", "expired", "--format", "json"
    )
    assert [json.loads(line)["queue_id"] for line in found.stdout.splitlines()] == [notice[1]]


def test_spool_write_failure_answers_451_and_relay_keeps_running(
    policy_file: Path, tmp_path: Path
) -> None:
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            spool_msg = tmp_path / "state" / "queue" / "msg"
            spool_msg.rename(tmp_path / "msg.saved")
            spool_msg.write_text("not a directory")
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("jan@acme.example")
                client.rcpt("one@example.org")
                code, reply = client.data(SMALL)
            assert (code, reply) == (451, b"4.3.0 Queue write failed, try again later")
            spool_msg.unlink()
            (tmp_path / "msg.saved").rename(spool_msg)
            send(port)
            sink.sink.wait(1)
            assert "cannot write to the spool" in relay.log()
    # refused as the policy's refusals are: a line that names the client, on record
    refusal = next(line for line in relay.log().splitlines() if " refused " in line)
    assert "client=127.0.0.1" in refusal and "from=<jan@acme.example>" in refusal, refusal
    assert "451 4.3.0 Queue write failed" in refusal, refusal
    rejected = [r for r in reader.records(tmp_path / "state" / "audit") if r["event"] == "rejected"]
    assert [r["reply"] for r in rejected] == ["451 4.3.0 Queue write failed, try again later"]


def test_hold_release_and_delete_while_running(policy_file: Path, tmp_path: Path) -> None:
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        keep, drop = send(port), send(port)
        assert relay_cli_again(policy, "queue", "hold", keep) == 0
        assert relay_cli_again(policy, "queue", "delete", "-", stdin=f"{drop}\n") == 0
        with SinkServer(port=sink_port) as sink:
            time.sleep(2.0)
            assert sink.sink.messages == []
            assert relay_cli(policy, "queue", "release", keep).returncode == 0
            sink.sink.wait(1)
    dropped = audit_events(policy, drop)
    assert dropped[:2] == [("received", None), ("queued", None)]
    assert set(dropped[2:-1]) <= {("deferred", "one@example.org")}
    assert dropped[-1] == ("deleted", None)
    kept = audit_events(policy, keep)
    assert kept[-1] == ("delivered", "one@example.org")
    assert ("held", None) in kept and ("released", None) in kept
    assert kept.index(("held", None)) < kept.index(("released", None))
    later = {("deferred", "one@example.org"), ("held", None), ("released", None)}
    assert set(kept[2:-1]) <= later
    assert relay_cli(policy, "audit", "verify").returncode == 0


def test_a_message_file_cut_short_is_held_not_sent(policy_file: Path, tmp_path: Path) -> None:
    """A deferred message's file cut short (a full disk, a restore, a hand) went
    out cut off and was recorded as delivered; one cut inside its record, with
    the changed record beside it, went out empty."""
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    msg = tmp_path / "state" / "queue" / "msg"
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        cut, emptied, whole = send(port), send(port), send(port)
        wait_for(lambda: relay.log().count("status=deferred") >= 3)
        held = relay_cli(policy, "queue", "hold", cut, emptied)
        assert held.returncode == 0, held.stderr
        sizes = {q: (msg / q).stat().st_size for q in (cut, emptied)}
        with open(msg / cut, "r+b") as file:
            file.truncate(sizes[cut] - 20)
        with open(msg / emptied, "r+b") as file:
            file.truncate(0)
        assert relay_cli(policy, "queue", "release", cut, emptied).returncode == 0
        with SinkServer(port=sink_port) as sink:
            assert relay_cli(policy, "queue", "retry", "ALL").returncode == 0
            sink.sink.wait(1)
            wait_for(lambda: relay.log().count("put on hold, not sent") >= 2)
            time.sleep(1.0)
            assert len(sink.sink.messages) == 1
        log = relay.log()
    assert log.count("put on hold, not sent") == 2
    assert re.search(rf"ERROR {cut} put on hold, not sent: \S*/msg/{cut}: \d+ bytes", log)
    assert re.search(rf"ERROR {emptied} put on hold, not sent: \S*/msg/{emptied}: 0 bytes", log)
    listed = relay_cli(policy, "queue", "list", "--json").stdout.splitlines()
    assert {(e["queue_id"], e["queue_name"]) for e in map(json.loads, listed)} == {
        (cut, "hold"),
        (emptied, "hold"),
    }
    assert audit_events(policy, whole)[-1] == ("delivered", "one@example.org")
    assert ("delivered", "one@example.org") not in audit_events(policy, cut)
    for queue_id, stored in ((cut, r"\d+"), (emptied, "0")):  # on record, as a hold by hand is
        holds = [r["by"] for r in audit_records(policy, queue_id) if r["event"] == "held"]
        assert holds[0] == operator(), holds
        said = rf"relay: {stored} bytes of message stored, its record says \d+"
        assert re.fullmatch(said, holds[-1]), holds
    assert relay_cli(policy, "audit", "verify").returncode == 0


def test_a_fifo_in_the_queue_is_skipped_by_the_start_and_the_tools(
    policy_file: Path, tmp_path: Path
) -> None:
    """A FIFO's open waits for a writer: one in msg/ kept the relay from ever
    serving, and ``relay queue list`` from ever answering."""
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        pass
    fifo = tmp_path / "state" / "queue" / "msg" / "0123456789ABCDEF"
    os.mkfifo(fifo)
    try:
        with (
            SinkServer(port=sink_port) as sink,
            RelayProcess(policy, port, tmp_path / "relay.log") as relay,
        ):
            send(port)
            sink.sink.wait(1)
            listed = subprocess.run(
                [sys.executable, "-m", "relay", "queue", "list", "-c", str(policy)],
                capture_output=True, text=True, timeout=20, check=False, cwd=ROOT,
            )  # fmt: skip
        log = relay.log()
    finally:
        with contextlib.suppress(OSError):  # whatever still waits on it goes on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert "0123456789ABCDEF skipped unreadable queue entry" in log
    assert "a FIFO, not a regular file" in listed.stderr + listed.stdout


def test_all_skips_a_fifo_and_leaves_an_entry_whose_record_is_one(
    policy_file: Path, tmp_path: Path
) -> None:
    """``hold ALL`` from cron exited 1 for a FIFO in ``msg/``, and ``delete ALL``
    deleted the message whose ``env/ID.json`` was one, as an unreadable record."""
    port = free_port()
    policy = configure(policy_file, port, free_port())  # no upstream: the messages stay
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        kept, gone = send(port), send(port)
    queue = tmp_path / "state" / "queue"
    os.mkfifo(queue / "msg" / "ZZZZZZZZZZZZZZZZ")
    (queue / "env" / f"{kept}.json").unlink(missing_ok=True)  # its deferral's
    os.mkfifo(queue / "env" / f"{kept}.json")
    for verb in ("hold", "release", "retry", "delete"):
        done = relay_cli(policy, "queue", verb, "ALL")
        assert done.returncode == 0, done.stderr
        assert "ZZZZZZZZZZZZZZZZ skipped unreadable queue entry: " in done.stderr
        assert f"{kept} skipped unreadable queue entry: " in done.stderr
    assert ("deleted", None) in audit_events(policy, gone)
    assert ("deleted", None) not in audit_events(policy, kept)
    assert (queue / "msg" / kept).is_file()


def test_the_relays_log_says_what_the_queue_tools_did_once(
    policy_file: Path, tmp_path: Path
) -> None:
    """Each change is logged under its queue ID by one of three workers, and a
    deletion made while the relay was stopped at its next start, with its time."""
    port = free_port()
    policy = configure(policy_file, port, free_port(), "workers: 3\n")  # no upstream
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        qid, later = send(port), send(port)
        wait_for(lambda: relay.log().count("status=deferred") >= 2)
        for verb in ("hold", "release", "retry", "delete"):
            assert relay_cli_again(policy, "queue", verb, qid) == 0
        done = [
            f"{qid}: {what} (relay queue {verb} by {operator()})"
            for verb, what in (
                ("hold", "placed on hold"),
                ("release", "released from hold"),
                ("retry", "scheduled for retry"),
                ("delete", "removed"),
            )
        ]
        wait_for(lambda: done[-1] in relay.log())
        time.sleep(2.5)  # every worker looked again
        lines = [line for line in relay.log().splitlines() if " (relay queue " in line]
        lines = [line for line in lines if f" {qid}: " in line]
        assert [line.split(" INFO ", 1)[1] for line in lines] == done
    assert relay_cli(policy, "queue", "delete", later).returncode == 0
    note = next((tmp_path / "state" / "queue" / "notes").iterdir())
    stored = json.loads(note.read_text())
    note.write_text(json.dumps({**stored, "at": stored["at"] - 3600}))
    with RelayProcess(policy, port, tmp_path / "again.log") as relay:
        wait_for(lambda: f"{later}: removed (relay queue delete by {operator()} at " in relay.log())
    assert list((tmp_path / "state" / "queue" / "notes").iterdir()) == []


def test_an_id_not_in_the_queue_names_the_queue_looked_in(
    policy_file: Path, tmp_path: Path
) -> None:
    """Staging's policy file given for production's said only "no such queue
    entry", as for a message delivered since: the wrong file went unseen."""
    port = free_port()
    policy = configure(policy_file, port, free_port())  # no upstream: the message stays
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        queue_id = send(port)
    staging = tmp_path / "staging.yaml"
    staging_port = free_port()
    text = policy.read_text().replace(f"port: {port}", f"port: {staging_port}")
    staging.write_text(text + f"state_directory: {tmp_path / 'staging'}\n")
    with RelayProcess(staging, staging_port, tmp_path / "staging.log"):
        pass  # its own state, its queue empty
    done = relay_cli(staging, "queue", "delete", queue_id)
    assert done.returncode == 1
    assert done.stderr == f"{queue_id}: no such queue entry in {tmp_path / 'staging' / 'queue'}\n"
    assert done.stdout == "Deleted: 0 messages\n"
    assert queue_id in relay_cli(policy, "queue", "list").stdout
    shown = relay_cli(staging, "queue", "show", queue_id)
    assert shown.returncode == 1
    assert shown.stderr.endswith(f"no such queue entry in {tmp_path / 'staging' / 'queue'}\n")


def test_delete_refuses_to_remove_what_the_audit_log_cannot_record(
    policy_file: Path, tmp_path: Path
) -> None:
    """With the audit log unwritable, ``relay queue delete`` says so and keeps the
    message; once the log is back, the deletion is its last record."""
    port = free_port()
    policy = configure(policy_file, port, free_port())  # no upstream: the message stays
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        queue_id = send(port)
    audit_dir = tmp_path / "state" / "audit"
    audit_dir.rename(tmp_path / "audit.away")
    audit_dir.write_text("not a directory")
    done = relay_cli(policy, "queue", "delete", queue_id)
    assert done.returncode == 1
    assert "nothing deleted" in done.stderr and "audit" in done.stderr
    assert queue_id in relay_cli(policy, "queue", "list").stdout
    audit_dir.unlink()
    (tmp_path / "audit.away").rename(audit_dir)
    done = relay_cli(policy, "queue", "delete", queue_id)
    assert done.returncode == 0, done.stderr
    assert relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n"
    assert audit_events(policy, queue_id)[-1] == ("deleted", None)
    assert relay_cli(policy, "audit", "verify").returncode == 0


def test_a_hold_or_release_the_queue_cannot_store_is_not_on_record(
    policy_file: Path, tmp_path: Path
) -> None:
    """Recorded before it was stored, a hold or release that ``env/`` refused (a
    full disk, ``chattr +i``) was in the audit log while the message stayed as
    it was: released on record, and still held."""
    port = free_port()
    policy = configure(policy_file, port, free_port())  # no upstream: the message stays
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        queue_id = send(port)
    env = tmp_path / "state" / "queue" / "env"
    with read_only(env, 0o500):
        done = relay_cli(policy, "queue", "hold", queue_id)
    assert done.returncode == 1 and f"{queue_id}: " in done.stderr
    assert ("held", None) not in audit_events(policy, queue_id)
    assert f"{queue_id} " in relay_cli(policy, "queue", "list").stdout  # not held: no !
    assert relay_cli(policy, "queue", "hold", queue_id).returncode == 0
    with read_only(env, 0o500):
        done = relay_cli(policy, "queue", "release", queue_id)
    assert done.returncode == 1 and f"{queue_id}: " in done.stderr
    assert ("released", None) not in audit_events(policy, queue_id)
    assert f"{queue_id}!" in relay_cli(policy, "queue", "list").stdout
    assert relay_cli(policy, "audit", "verify").returncode == 0


def test_kill_9_loses_no_acknowledged_message(policy_file: Path, tmp_path: Path) -> None:
    """Send over several connections, kill -9 the relay at random moments, restart it:
    every message that got a 250 reaches the sink; duplicates are only possible at kills.
    A message that got no answer is sent again, so a slow restart costs time, not
    messages (the test once skipped them, and failed when a restart was slow)."""
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            """As an ERP does: a message without a 250 is sent again."""
            for i in range(MESSAGES_PER_CLIENT):
                body = f"Subject: m-{n}-{i}\r\n".encode()
                data = SMALL.replace(b"Subject: Hello\r\n", body)
                while not stop.is_set():
                    try:
                        send(port, data)
                    except (OSError, smtplib.SMTPException, AssertionError):
                        time.sleep(0.05)
                        continue
                    with lock:
                        acknowledged.append(f"m-{n}-{i}")
                    break

        workers = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        relay = RelayProcess(policy, port, tmp_path / "relay.log").__enter__()
        for worker in workers:
            worker.start()
        rng = random.Random(7)
        for _ in range(KILLS):
            time.sleep(rng.uniform(1.0, 4.0))
            relay.crash()
            relay = RelayProcess(policy, port, tmp_path / "relay.log").__enter__()
        for worker in workers:
            worker.join(240)
        stop.set()
        try:
            wait_for(lambda: _subjects(sink) >= set(acknowledged), timeout=60)
        finally:
            relay.stop()
        got = [message.read(m.data).subject for m in sink.sink.messages]
        duplicates = len(got) - len(set(got))
        print(f"acknowledged={len(acknowledged)} received={len(got)} duplicates={duplicates}")
        assert len(acknowledged) > 0.9 * 4 * MESSAGES_PER_CLIENT
        assert set(acknowledged) <= set(got)
        # per kill and client, at most: a message stored but unanswered (sent
        # again) and a delivery cut off before its record (delivered again)
        assert duplicates <= 2 * 4 * KILLS


def _subjects(sink: SinkServer) -> set[str]:
    return {message.read(m.data).subject for m in list(sink.sink.messages)}


def test_notice_for_a_long_non_ascii_subject(policy_file: Path, tmp_path: Path) -> None:
    refusing = Sink(refuse={"one@example.org": "550 5.1.1 no such user"})
    subject = "Faktura nr. 4711 for arbeid utført på Ørneveien 12 i Tromsø, januar-mars 2026"
    encoded = "=?utf-8?b?" + base64.b64encode(subject.encode()).decode() + "?="
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            send(port, SMALL.replace(b"Subject: Hello", f"Subject: {encoded}".encode()))
            notices = [m for m in sink.sink.wait(2) if m.mail_from == "<>"]
    assert message.read(notices[0].data).get("Subject") == f"Undelivered: {subject}"


def test_temporary_refusal_then_acceptance(policy_file: Path, tmp_path: Path) -> None:
    with SinkServer(Sink(data_reply="451 4.3.0 greylisted, try later")) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            qid = send(port)
            wait_for(lambda: "greylisted" in relay.log())
            sink.sink.data_reply = "250 2.0.0 sink accepted"
            sink.sink.wait(1)
            wait_for(lambda: "status=sent" in relay.log())
    events = audit_events(policy, qid)
    assert events[:3] == [
        ("received", None),
        ("queued", None),
        ("deferred", "one@example.org"),
    ]
    assert events[-1] == ("delivered", "one@example.org")


def test_a_smarthost_that_scans_before_it_answers_gets_the_message_once(
    policy_file: Path, tmp_path: Path
) -> None:
    """The reply to the end of the message comes after the command timeout (a
    content scanner): waited for, delivered once, and no deferral on record."""
    with SinkServer(Sink(delay=1.5)) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        policy.write_text(policy.read_text().replace("timeout: 5\n", "timeout: 0.3\n"))
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            qid = send(port)
            wait_for(lambda: "status=sent" in relay.log())
            time.sleep(1.0)  # past the retry a deferral would have brought
    assert len(sink.sink.messages) == 1
    assert audit_events(policy, qid) == [
        ("received", None),
        ("queued", None),
        ("delivered", "one@example.org"),
    ]


def test_a_relay_started_on_a_full_disk_serves_and_answers_451(
    policy_file: Path, tmp_path: Path
) -> None:
    """A full disk at start (here a file-size limit the audit log has reached)
    is a disk that fills up later on: the relay runs and refuses mail with
    451 until there is room, instead of exiting (a service manager would
    soon give up restarting it)."""
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "first.log"):
            for _ in range(6):
                send(port)
            wait_for(lambda: len(sink.sink.messages) == 6)
        (day,) = load(policy).audit.directory.glob("audit-*.jsonl")
        size = day.stat().st_size
        assert size > 3000  # room for the log lines, which the limit holds to it too
        with RelayProcess(policy, port, tmp_path / "relay.log", max_file_size=size) as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("jan@acme.example")
                client.rcpt("one@example.org")
                assert client.data(SMALL) == (451, b"4.3.0 Audit log write failed, try again later")
            assert "cannot write the audit log" in relay.log()
            assert f"{policy}) is in use with no policy_loaded record for it" in relay.log()
            assert "cannot open the state directory" not in relay.log()
        assert day.stat().st_size == size


def test_audit_write_failure_answers_451_and_leaves_no_outcome_unrecorded(
    policy_file: Path, tmp_path: Path
) -> None:
    """The audit log grows with every message while each spool file stays small, so a
    file-size limit makes the audit append fail first, as a full disk would. The
    refused message is not kept; a delivered one leaves the queue only with its
    outcome on record, and stays in it while the log cannot take that; one not
    tried yet waits, as no delivery starts while the log refuses records."""
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        log = tmp_path / "relay.log"
        with RelayProcess(policy, port, log, max_file_size=24_000) as relay:
            replies = []
            for _ in range(40):
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo()
                    client.mail("jan@acme.example")
                    client.rcpt("one@example.org")
                    replies.append(client.data(SMALL))
                if replies[-1][0] != 250:
                    break
            assert replies[-1] == (451, b"4.3.0 Audit log write failed, try again later")
            accepted = [reply.decode().rsplit(" ", 1)[-1] for code, reply in replies if code == 250]
            assert accepted
            assert "cannot write the audit log" in relay.log()
            paused = "no delivery starts until the audit log takes records again"
            wait_for(lambda: len(sink.sink.messages) == len(accepted) or paused in relay.log())
            time.sleep(1.0)  # the attempts under way at the pause finish
        sent = len(sink.sink.messages)
        assert sent <= len(accepted)
        listed = relay_cli(policy, "queue", "list", "--json").stdout.splitlines()
    still_queued = {json.loads(line)["queue_id"] for line in listed}
    assert still_queued <= set(accepted)
    for qid in accepted:
        on_record = ("delivered", "one@example.org") in audit_events(policy, qid)
        assert on_record != (qid in still_queued), qid
    said = log.read_text()
    assert ("kept in the queue" in said) <= bool(still_queued)
    assert (sent < len(accepted)) <= (paused in said)  # what was not sent waits for the log


def test_a_delivered_messages_file_carries_the_next_message(
    policy_file: Path, tmp_path: Path
) -> None:
    """The engine recycles what it delivered, and the next accepted message on
    the same worker is written into that file, whole and signed."""
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            msg = tmp_path / "state" / "queue" / "msg"

            def queue(client: smtplib.SMTP, rcpt: str, data: bytes) -> str:
                client.mail("jan@acme.example")
                client.rcpt(rcpt)
                code, reply = client.data(data)
                assert code == 250, reply
                return reply.decode().rsplit(" ", 1)[1]

            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:  # one worker
                client.ehlo()
                first = queue(client, "one@example.org", SMALL)
                free = msg / f".free.{first}"
                wait_for(free.exists)
                inode = free.stat().st_ino
                # reusable once the engine has let go of it and a directory fsync
                # has made its rename durable (the engine's, within two seconds)
                for attempt in range(20):
                    time.sleep(0.5)
                    later = queue(client, "two@example.org", SMALL + f"more {attempt}\r\n".encode())
                    wait_for((msg / f".free.{later}").exists)
                    if (msg / f".free.{later}").stat().st_ino == inode:
                        break
                else:
                    raise AssertionError("the first message's file was never reused")
            assert not free.exists()
            arrived = sink.sink.wait(attempt + 2)
            assert "one@example.org" in arrived[0].rcpt_tos
            assert "two@example.org" in arrived[-1].rcpt_tos
            assert "one@example.org" not in arrived[-1].rcpt_tos
            assert arrived[-1].data.endswith(f"\r\n\r\nhi\r\nmore {attempt}\r\n".encode())
            assert arrived[-1].data.startswith(b"DKIM-Signature:")


def test_a_restart_does_not_deliver_again_what_the_audit_log_says_was_delivered(
    policy_file: Path, tmp_path: Path
) -> None:
    """What a worker killed while the entry waited for its fsync leaves behind: the
    delivered record written, the entry still queued."""
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    with RelayProcess(policy, port, tmp_path / "first.log") as relay:
        qid = send(port)
        wait_for(lambda: "status=deferred" in relay.log())
    loaded = load(policy)
    with AuditLog(loaded.audit.directory) as audit:
        audit.append(
            events.delivered(
                queue_id=qid,
                message_id=None,
                recipient="one@example.org",
                upstream="default",
                reply="250 2.0.0 accepted before the crash",
                attempts=1,
            )
        )
    with (
        SinkServer(port=sink_port) as sink,
        RelayProcess(policy, port, tmp_path / "second.log") as relay,
    ):
        assert f"{qid}: finished before the restart" in relay.log()
        time.sleep(1.5)  # past the retry it was due for
        assert sink.sink.messages == []
        assert relay_cli(policy, "queue", "list").stdout.strip() == "Mail queue is empty"


def _hang_up_after_data(port: int, rcpt: str, how: str) -> bytes:
    """A client that writes its data, the dot and QUIT at once, then closes
    (``how``: "closed"), closes its sending side only ("half-closed"), or
    waits ("quit": as a TLS client does, whose close comes ~40 ms later; "quit
    in lower case": a command's case is the client's choice, RFC 5321 2.4),
    reading what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        for command in (
            None,
            b"EHLO erp\r\n",
            b"MAIL FROM:<jan@acme.example>\r\n",
            f"RCPT TO:<{rcpt}>\r\n".encode(),
            b"DATA\r\n",
        ):
            if command is not None:
                sock.sendall(command)
            while (line := reader.readline())[3:4] == b"-":
                pass
            assert line[:1] in (b"2", b"3"), line
        quit = b"quit\r\n" if how == "quit in lower case" else b"QUIT\r\n"
        sock.sendall(INVOICE + b".\r\n" + quit)
        if how == "closed":
            return b""
        if how == "half-closed":
            sock.shutdown(socket.SHUT_WR)
        return reader.read()


@pytest.mark.parametrize("how", ["closed", "half-closed", "quit", "quit in lower case"])
def test_an_immediate_client_that_hangs_up_leaves_its_refusal_to_a_notice(
    policy_file: Path, tmp_path: Path, how: str
) -> None:
    """Its 550 would have been the only word of the refusal, and it reads none:
    the invoice was dropped, its copy too, and the sending user never told."""
    refusing = Sink(refuse={"one@example.org": UNKNOWN})
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = immediate(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            replies = _hang_up_after_data(port, "one@example.org", how)
            copy, notice = sink.sink.wait(2)
            assert copy.rcpt_tos == ["jan@acme.example"]
            assert notice.mail_from == "<>" and notice.rcpt_tos == ["jan@acme.example"]
            assert "one@example.org" in notice.data.decode()
            wait_for(lambda: "failure notice to=<" in relay.log())
    if how != "closed":
        assert replies.startswith(b"250 2.0.0 Ok: queued as "), replies
    events_of = [event for event, _rcpt, _reply in audit_replies(policy)]
    assert events_of.count("notified") == 1
    assert ("failed", "one@example.org", UNKNOWN) in audit_replies(policy)


def test_a_refusal_after_the_immediate_wait_reaches_the_sender(
    policy_file: Path, tmp_path: Path
) -> None:
    """The ERP got its 250 when the wait ran out: a refusal that comes later is no
    longer its to hear, so the sending user gets the notice, as without the wait."""
    late = Sink(data_reply="550 5.7.1 refused after a while", delay=2.0)
    with SinkServer(late) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        policy.write_text(
            policy.read_text().replace("auth: optional", "auth: optional\n    immediate: 0.5")
        )
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            qid = send(port)
            wait_for(lambda: "failure notice" in relay.log())
            assert f"{qid}: failure notice to=<" in relay.log()
    assert ("failed", "one@example.org") in audit_events(policy, qid)


def test_a_listing_piped_into_head_ends_quietly(policy_file: Path) -> None:
    """``relay queue list | head``: the reader goes away, the listing stops, with
    no traceback on the terminal, and exit 141, as ``status`` and ``audit verify``
    exit (1 is ``show``'s "no such entry")."""
    policy = load(policy_file)
    spool = Spool(policy.queue.directory)
    entries = [make_entry(size=len(SMALL)) for _ in range(3000)]
    assert spool.put_many([(entry, (SMALL,)) for entry in entries]) == [None] * len(entries)
    status, errors = piped_into_head("queue", "list", "-c", str(policy_file))
    assert status == 141
    assert "Traceback" not in errors


def test_queue_tools_on_a_state_directory_with_no_queue_say_so_and_make_none(
    policy_file: Path,
) -> None:
    """A policy pointing elsewhere than where the relay runs (a changed
    ``state_directory`` waiting for a restart): "Mail queue is empty" would be a lie."""
    text = policy_file.read_text()
    assert "\nstate_directory:" not in text
    policy_file.write_text(text + "state_directory: elsewhere\n")
    state = load(policy_file).queue.directory.parent
    for verb in (["list"], ["show", "25Y1H0XKK5N1GHFX"], ["retry", "ALL"]):
        done = relay_cli(policy_file, "queue", *verb)
        assert done.returncode == 66, done
        why = "no queue here (has the relay run with this policy?)"
        assert done.stderr == f"relay queue: {state / 'queue'}: {why}\n"
    assert not state.exists()


def test_mail_waiting_for_a_removed_upstream_goes_the_way_of_its_tenant(
    policy_file: Path, tmp_path: Path
) -> None:
    """The sysadmin renames the smarthost and points the tenant at it while mail
    waits: that mail (and its notices) went on asking for the old name until it
    expired, its sender never told."""
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, free_port())  # nobody there: deferred
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port)
        wait_for(lambda: "status=deferred" in relay.log())
        text = policy.read_text().replace("upstream: default", "upstream: smarthost")
        text = text.replace("  default:\n    type: smtp\n", "  smarthost:\n    type: smtp\n")
        port_line = r"(smarthost:\n(?:    .*\n)*?    port: )\d+"
        policy.write_text(re.sub(port_line, rf"\g<1>{sink_port}", text))
        with SinkServer(port=sink_port) as sink:
            relay.signal(signal.SIGHUP)
            relay.wait_reloaded(1)
            assert b"Subject: Hello" in sink.sink.wait(1, timeout=30)[0].data
        wait_for(lambda: "upstream 'default' is no longer in the policy" in relay.log())
    assert relay.log().count("upstream 'default' is no longer in the policy") == 1
    assert audit_events(policy, queue_id)[-1] == ("delivered", "one@example.org")
    assert relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n"


def test_mail_an_earlier_version_queued_goes_as_it_went_then(
    policy_file: Path, tmp_path: Path
) -> None:
    """Its record notes no ``sends_as``: told by its envelope sender against a
    ``return_path`` the same edit changed, the platform's mail was taken for
    an account's and waited for an upstream that would never come back."""
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        queue_id = send(port)
        wait_for(lambda: "status=deferred" in relay.log())
    spool = Spool(load(policy).queue.directory)
    spool.update(dataclasses.replace(spool.load(queue_id), sends_as=None))
    text = policy.read_text().replace("upstream: default", "upstream: smarthost")
    text = text.replace("  default:\n    type: smtp\n", "  smarthost:\n    type: smtp\n")
    text = text.replace("return_path: bounces@platform.example", "return_path: b@platform.example")
    policy.write_text(pointed(text, "smarthost", sink_port))
    with SinkServer(port=sink_port) as sink, RelayProcess(policy, port, tmp_path / "again.log"):
        (sent,) = sink.sink.wait(1, timeout=30)
    assert sent.mail_from == "bounces@platform.example"
    assert audit_events(policy, queue_id)[-1] == ("delivered", "one@example.org")


PER = b"From: per@sevenoff.example\r\nTo: one@example.org\r\nSubject: Hello\r\n\r\nhi\r\n"


def with_down_account(policy_file: Path, port: int) -> Path:
    """The queue's test policy, tenant ``sevenoff`` on its own account (sending as
    post@sevenoff.example) and the others on ``default``, neither reachable."""
    return configure(with_account(policy_file, port=free_port()), port, free_port())


def pointed(text: str, name: str, port: int) -> str:
    return re.sub(rf"(  {name}:\n(?:    .*\n)*?    port: )\d+", rf"\g<1>{port}", text)


def held_after_reload(
    relay: RelayProcess, policy: Path, text: str, sink: SinkServer, old: str, tenant: str
) -> None:
    """The policy ``text`` put in use: the mail waiting for upstream ``old`` is
    not sent at two attempts, and its warning is said at the first alone,
    where it came at every attempt: 1,000 lines an hour for 1,000 messages."""
    policy.write_text(text)
    relay.signal(signal.SIGHUP)
    relay.wait_reloaded(1)
    waiting = f"upstream '{old}' is no longer in the policy, and tenant {tenant}'s"
    wait_for(lambda: waiting in relay.log())
    relay_cli(policy, "queue", "retry", "ALL")
    wait_for(lambda: relay.log().count(f"4.3.5 no upstream '{old}'") >= 2)
    assert relay.log().count(waiting) == 1
    assert sink.sink.messages == []


def test_mail_for_the_platform_waits_when_its_tenant_moves_to_an_account(
    policy_file: Path, tmp_path: Path
) -> None:
    """The platform's smarthost removed and the tenant put on a company's own
    account: its waiting mail, enveloped and signed for the platform, went
    through the account, which refused it for good (``550 5.7.60 SendAsDenied``).
    It waits for the old upstream, and goes once that is back."""
    port = free_port()
    policy = with_down_account(policy_file, port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay, SinkServer() as sink:
        queue_id = send(port)
        wait_for(lambda: "status=deferred" in relay.log())
        before = policy.read_text()
        text = re.sub(r"  default:\n(?:    .*\n)*", "", before).replace(
            "upstream: default", "upstream: company24"
        )
        held_after_reload(
            relay, policy, pointed(text, "company24", sink.port), sink, "default", "acme"
        )
        listed = json.loads(relay_cli(policy, "queue", "list", "--json").stdout)
        reason = listed["recipients"][0]["delay_reason"]
        assert reason == (
            "451 4.3.5 no upstream 'default': tenant acme's upstream 'company24' sends as"
            " post@sevenoff.example, and this message was written to go as the platform's"
            " addresses; put 'default' back in the policy, or relay queue delete it"
        )
        policy.write_text(pointed(before, "default", sink.port))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(2)
        (sent,) = sink.sink.wait(1)
    assert sent.mail_from == "bounces@platform.example"
    assert audit_events(policy, queue_id)[-1] == ("delivered", "one@example.org")


def per_deferred(relay: RelayProcess, port: int) -> None:
    """A message of sevenoff's, for its account, deferred as the account is down."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("per@sevenoff.example", ["one@example.org"], PER)
    wait_for(lambda: "status=deferred" in relay.log())


def test_mail_for_an_account_waits_when_its_tenant_moves_to_the_platform(
    policy_file: Path, tmp_path: Path
) -> None:
    """The reverse: mail From and enveloped as the company's account address went
    through the platform's smarthost, signed for the platform alone (DMARC
    unaligned), its bounces to the company's mailbox."""
    port = free_port()
    policy = with_down_account(policy_file, port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay, SinkServer() as sink:
        per_deferred(relay, port)
        text = re.sub(r"  company24:\n(?:    .*\n)*", "", policy.read_text())
        text = text.replace("upstream: company24", "upstream: default")
        text = pointed(text, "default", sink.port)
        held_after_reload(relay, policy, text, sink, "company24", "sevenoff")
    assert "sends as the platform's addresses, and this message was written to go as" in (
        relay.log()
    )


def test_mail_for_an_account_whose_sender_changed_waits(policy_file: Path, tmp_path: Path) -> None:
    """The account kept its name and took another ``sender``: the waiting mail,
    From and enveloped as the old address, went through it, to be refused for
    good. It waits until the sender is put back."""
    port = free_port()
    policy = with_down_account(policy_file, port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay, SinkServer() as sink:
        per_deferred(relay, port)
        before = policy.read_text()
        changed = before.replace("sender: post@sevenoff", "sender: billing@sevenoff")
        policy.write_text(pointed(changed, "company24", sink.port))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(1)
        held = "upstream 'company24' now sends as billing@sevenoff.example, and this message"
        wait_for(lambda: held in relay.log())
        relay_cli(policy, "queue", "retry", "ALL")
        wait_for(lambda: relay.log().count(f"4.3.5 {held}") >= 2)
        assert relay.log().count(f"held: {held}") == 1
        assert sink.sink.messages == []
        policy.write_text(pointed(before, "company24", sink.port))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(2)
        relay_cli(policy, "queue", "retry", "ALL")
        (sent,) = sink.sink.wait(1)
    assert sent.mail_from == "post@sevenoff.example"


def test_mail_for_an_account_renamed_with_the_same_sender_goes_on(
    policy_file: Path, tmp_path: Path
) -> None:
    """An account sending as the same address under a new name takes the mail
    as the old one would have."""
    port = free_port()
    policy = with_down_account(policy_file, port)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay, SinkServer() as sink:
        per_deferred(relay, port)
        text = policy.read_text().replace("company24", "company25")
        policy.write_text(pointed(text, "company25", sink.port))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(1)
        (sent,) = sink.sink.wait(1)
    assert sent.mail_from == "post@sevenoff.example"
    assert "upstream 'company24' is no longer in the policy: going through" in relay.log()


def test_a_new_state_directory_is_said_once(policy_file: Path, tmp_path: Path) -> None:
    """After a changed state_directory and a restart the mail still queued in the
    old one was never attempted, and the log said nothing but '0 messages'."""
    port = free_port()
    policy = configure(policy_file, port, free_port())
    logs = []
    for start in range(2):
        with RelayProcess(policy, port, tmp_path / f"relay-{start}.log") as relay:
            pass
        logs.append(relay.log())
    said = "holds no audit log yet: a new chain begins; mail a relay queued under another"
    assert [log.count(said) for log in logs] == [1, 0]


def test_the_audit_log_says_why_the_policy_decided_as_it_did(
    policy_file: Path, tmp_path: Path
) -> None:
    """It said what the From and Reply-To became, not why: that took the original
    message and ``relay preview`` with today's policy."""
    invoice = (
        b"From: jan@acme.example\r\nTo: buyer@example.org\r\nSubject: Invoice 77\r\n"
        b"X-Responsible: Eva <eva@acme.example>\r\n\r\nhi\r\n"
    )
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            queue_id = send(port, invoice, ("buyer@example.org",))
    shown = relay_cli(policy, "audit", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert "    why       envelope sender <jan@acme.example> is user 'jan'\n" in shown.stdout
    assert "    why       Reply-To from header X-Responsible: Eva <eva@acme.example>\n" in (
        shown.stdout
    )
    assert "Invoice 77" not in shown.stdout  # the rule's evidence quotes the subject


def test_retry_and_release_say_when_no_relay_runs_to_deliver(
    policy_file: Path, tmp_path: Path
) -> None:
    """ "Scheduled for retry: 2 messages", exit 0, read as tried now, with no relay
    running: postqueue -f says the mail system is down. Still scheduled."""
    state = policy_file.parent / "state"
    AuditLog(state / "audit").close()
    spool = Spool(state / "queue")
    for _ in range(2):
        spool.put(make_entry(), b"Subject: x\r\n\r\nx\r\n")
    note = (
        f"no relay is running on the state directory {state}: nothing is delivered until it"
        " starts\n"
    )
    done = relay_cli(policy_file, "queue", "retry", "ALL")
    assert (done.returncode, done.stdout) == (0, "Scheduled for retry: 2 messages\n")
    assert done.stderr == f"relay queue retry: {note}"
    assert all(entry.next_attempt == 0 for entry in spool.entries())
    assert relay_cli(policy_file, "queue", "hold", "ALL").stderr == ""
    done = relay_cli(policy_file, "queue", "release", "ALL")
    assert (done.returncode, done.stderr) == (0, f"relay queue release: {note}")


def test_retry_with_the_relay_running_says_nothing_more(policy_file: Path, tmp_path: Path) -> None:
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    # its next try far off, so that no try holds it busy as retry comes
    policy.write_text(
        policy.read_text().replace(
            "first_retry: 0.5, max_retry: 1", "first_retry: 600, max_retry: 600"
        )
    )
    spool = Spool(policy.parent / "state" / "queue")
    with RelayProcess(policy, port, tmp_path / "relay.log"):
        send(port)  # deferred: the upstream is down
        wait_for(lambda: [entry.attempts for entry in spool.entries()] == [1])
        done = relay_cli(policy, "queue", "retry", "ALL")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "Scheduled for retry: 1 message\n",
        "",
    )
