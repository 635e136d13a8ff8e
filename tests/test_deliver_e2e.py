"""Refusals end to end: a real relay process and a real upstream that refuses per recipient."""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_queue_e2e import SMALL, audit_events, audit_records, configure, relay_cli, send

REFUSE = {
    "bad@example.org": "550 5.1.1 No such user",
    "soft@example.org": "450 4.2.1 try later",
    "deny@example.org": "553 5.7.1 Relaying denied",
}


def test_every_recipient_refused_fails_the_permanent_ones_and_defers_only_the_other(
    policy_file: Path, tmp_path: Path
) -> None:
    """The 5xx recipients are not retried for days because another got a 4xx: they
    fail at once, the sender hears of them, and each line quotes its own reply."""
    refusing = Sink(refuse=dict(REFUSE))
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            qid = send(port, rcpts=tuple(REFUSE))
            (notice,) = sink.sink.wait(1)
            wait_for(lambda: relay.log().count(f"{qid}: to=<soft@example.org>") >= 2)
            lines = relay.log()
    assert notice.mail_from == "<>" and notice.rcpt_tos == ["jan@acme.example"]
    body = notice.data.split(b"\r\n\r\n", 1)[1].decode()
    assert "bad@example.org" in body and "deny@example.org" in body
    assert "soft@example.org" not in body
    said = re.findall(rf"{qid}: to=<([^>]+)>.*status=(\w+) \((.*)\)", lines)
    assert set(said[:3]) == {
        ("bad@example.org", "bounced", REFUSE["bad@example.org"]),
        ("soft@example.org", "deferred", REFUSE["soft@example.org"]),
        ("deny@example.org", "bounced", REFUSE["deny@example.org"]),
    }
    assert {(address, status) for address, status, _ in said[3:]} == {
        ("soft@example.org", "deferred")
    }
    events = audit_events(policy, qid)
    assert ("failed", "bad@example.org") in events and ("failed", "deny@example.org") in events
    assert ("deferred", "bad@example.org") not in events


def test_a_recipient_refused_before_the_upstream_closed_fails_with_its_own_reply(
    policy_file: Path, tmp_path: Path
) -> None:
    """The upstream takes ok@, refuses perm@ with 550, answers bye@ 421 and closes:
    perm@ fails at once and its sender is told the 550; ok@ is retried for the
    connection lost and bye@ with the 421. All three were retried with the
    connection lost, perm@ until its lifetime ran out, its 550 never told."""
    refuse = {
        "perm@example.org": "550 5.1.1 User unknown",
        "bye@example.org": "421 4.7.0 Too many errors, closing",
    }
    with SinkServer(Sink(refuse=refuse)) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            qid = send(port, rcpts=("ok@example.org", "perm@example.org", "bye@example.org"))
            (notice,) = sink.sink.wait(1)
            wait_for(lambda: relay.log().count(f"{qid}: to=<bye@example.org>") >= 2)
            done = relay_cli(policy, "audit", "show", qid, "--format", "json")
    body = notice.data.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace")
    assert "perm@example.org" in body and "User unknown" in body
    assert "ok@example.org" not in body and "bye@example.org" not in body
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    first = {}
    for record in records:
        if record["event"] in ("failed", "deferred"):
            first.setdefault(record["recipient"], (record["event"], record["reply"]))
    assert first["perm@example.org"] == ("failed", "550 5.1.1 User unknown")
    assert first["bye@example.org"] == (
        "deferred",
        "451 4.7.0 Too many errors, closing (upstream replied 421 4.7.0)",
    )
    assert first["ok@example.org"][0] == "deferred"
    assert "connection lost" in first["ok@example.org"][1]
    assert ("deferred", "perm@example.org") not in audit_events(policy, qid)


def test_mail_with_an_empty_envelope_sender_keeps_it_and_gets_no_notice(
    policy_file: Path, tmp_path: Path
) -> None:
    """RFC 5321 4.5.5: a null reverse-path is not replaced by a real one, and no
    notice is sent about such a message; the platform's bounce address made
    one that receivers would answer with bounces of their own."""
    refusing = Sink(refuse=dict(REFUSE))
    with SinkServer(refusing) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("<>")
                client.rcpt("one@example.org")
                client.rcpt("bad@example.org")
                code, reply = client.data(SMALL)
            assert code == 250, reply
            qid = reply.decode().rsplit(" ", 1)[1]
            (sent,) = sink.sink.wait(1)
            wait_for(lambda: f"{qid}: to=<bad@example.org>" in relay.log())
            # a notice would be queued, and on record, before the message left the queue
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
    assert sent.mail_from == "<>"
    assert sorted(sent.rcpt_tos) == ["one@example.org"]
    assert ("failed", "bad@example.org") in audit_events(policy, qid)
    assert "notified" not in {event for event, _ in audit_events(policy, qid)}
    assert len(sink.sink.messages) == 1  # no notice


@pytest.mark.parametrize("at", ["RCPT", "DATA"])
def test_a_reply_code_smtp_does_not_have_is_quoted_with_no_status_made_up(
    policy_file: Path, tmp_path: Path, at: str
) -> None:
    """RFC 3463 has classes 2, 4 and 5 only: a ``650 what`` was quoted as
    ``(upstream replied 650 6.0.0)`` in the log, the audit log and the queue's
    listing, a status the upstream never sent and none has. The message is
    deferred with the relay's own ``451 4.4.0`` all the same."""
    odd = "650 what"
    upstream = Sink(refuse={"one@example.org": odd}) if at == "RCPT" else Sink(data_reply=odd)
    said = "451 4.4.0 what (upstream replied 650)"
    with SinkServer(upstream) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            qid = send(port)
            wait_for(lambda: f"{qid}: to=<one@example.org>" in relay.log())
            listed = relay_cli(policy, "queue", "list")
            listed_json = relay_cli(policy, "queue", "list", "--json")
            lines = relay.log()
    assert re.search(
        rf"{qid}: to=<one@example.org>.*dsn=4\.4\.0, status=deferred \({re.escape(said)}\)", lines
    )
    deferred = [r for r in audit_records(policy, qid) if r["event"] == "deferred"]
    assert deferred and {r["reply"] for r in deferred} == {said}
    assert "upstream replied 650)" in listed.stdout, listed.stdout
    for text in (lines, listed.stdout, listed_json.stdout, json.dumps(deferred)):
        assert "6.0.0" not in text
