"""The ERP's Message-ID without its angle brackets, as legacy ERPs write it:
kept, with the brackets, so that the ERP's ID finds the message in the audit log."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from relay import message, pipeline
from relay.errors import Rejected
from relay.submission import Submission
from tests.relayproc import RelayProcess
from tests.sink import SinkServer, free_port
from tests.test_decisions import msg, run
from tests.test_queue_e2e import configure, relay_cli


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("INV-555.20261203@senger-erp", "<INV-555.20261203@senger-erp>"),
        ("(ERP 4) INV-555@senger-erp.example", "<INV-555@senger-erp.example>"),
        ('"inv 555"@[10.0.0.1]', '<"inv 555"@[10.0.0.1]>'),
    ],
)
def test_a_message_id_without_brackets_gets_them(policy_file: Path, given: str, kept: str) -> None:
    """It was replaced by one the relay made, and the ERP's ID was nowhere."""
    data = msg("From: Jan <jan@acme.example>", "To: c@example.org", f"Message-ID: {given}")
    p = run(policy_file, data)
    assert message.read(p.message).get_all("Message-ID") == (kept,)
    assert f"Message-ID {given!r} had no angle brackets (RFC 5322 3.6.4): added" in (
        p.decision.reasons
    )


def test_the_erps_message_id_without_brackets_finds_it_in_the_audit_log(
    policy_file: Path, tmp_path: Path
) -> None:
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("jan@acme.example")
                client.rcpt("one@example.org")
                data = msg(
                    "From: jan@acme.example",
                    "To: one@example.org",
                    "Message-ID: INV-555.20261203@senger-erp",
                )
                code, reply = client.data(data)
            assert code == 250, reply
            (sent,) = sink.sink.wait(1)
    done = relay_cli(policy, "audit", "search", "--message-id", "INV-555.20261203@senger-erp")
    assert done.returncode == 0, done.stderr
    assert reply.decode().rsplit(" ", 1)[1] in done.stdout
    assert message.read(sent.data).get("Message-ID") == "<INV-555.20261203@senger-erp>"


@pytest.mark.parametrize("length", [997, 998])
def test_a_message_id_the_brackets_would_take_past_998_is_refused(
    policy_file: Path, length: int
) -> None:
    """The README quotes this reply: the line fits without the brackets, and with
    them no fold can bring it within the 998 characters a line may have."""
    given = "INV-555." + "1" * (length - len("Message-ID: INV-555.@erp.example")) + "@erp.example"
    data = msg("From: Jan <jan@acme.example>", "To: c@example.org", f"Message-ID: {given}")
    assert len(f"Message-ID: {given}") == length
    with pytest.raises(Rejected) as refused:
        run(policy_file, data)
    shown = repr(f"<{given}>")[:77] + "..."
    assert refused.value.line == (
        "550 5.6.0 Header value refused: Message-ID value cannot be folded within 998"
        f" characters: {shown}"
    )
    fits = given.replace("1", "", length - 996)  # a line of 996: room for the brackets
    p = run(
        policy_file, msg("From: Jan <jan@acme.example>", "To: c@example.org", f"Message-ID: {fits}")
    )
    assert message.read(p.message).get("Message-ID") == f"<{fits}>"


@pytest.mark.parametrize(
    "given",
    ["(sent by (ERP 4)) <INV-556@senger-erp.example>", '<"inv (556)"@senger-erp.example> (x\\)y)'],
)
def test_comments_around_a_message_id_are_not_part_of_it(policy_file: Path, given: str) -> None:
    """A nested comment was read as part of the ID, which was replaced."""
    data = msg("From: Jan <jan@acme.example>", "To: c@example.org", f"Message-ID: {given}")
    assert message.read(run(policy_file, data).message).get_all("Message-ID") == (given,)


def test_a_long_message_id_of_unclosed_comments_is_replaced_in_time(policy_file: Path) -> None:
    """A regular expression for comments went over the rest of the value from each
    "(": 64 KB of "\\(" held the worker, and every session on it, for 8 s."""
    given = "\r\n ".join(["\\(" * 450] * 72)
    data = msg("From: Jan <jan@acme.example>", "To: c@example.org", f"Message-ID: {given}")
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    ids = message.read(run(policy_file, data).message).get_all("Message-ID")
    assert time.process_time() - started < 2
    assert ids is not None and len(ids) == 1 and ids[0].endswith(">") and "\\(" not in ids[0]


def test_the_queue_entry_holds_the_id_and_date_as_sent(policy_file: Path) -> None:
    """The entry's Message-ID is what a bounce and the audit log's ``queued``
    record are matched by: a folded field's " <id>" found no bounce. Its Date is
    the one sent, the relay's where the message's was no date."""
    data = msg(
        "From: Jan <jan@acme.example>",
        "To: c@example.org",
        "Message-ID:\r\n <INV-557@senger-erp.example>",
        "Date: 06.12.2026 18:00:00",
    )
    p = run(policy_file, data)
    sub = Submission("local", "127.0.0.1", None, "erp@erp.acme.example", ("c@example.org",), data)
    entry = pipeline._entry(p, sub)
    assert entry.message_id == "<INV-557@senger-erp.example>"
    assert entry.date == message.read(p.message).get("Date") == "Mon, 23 Nov 2026 09:30:00 +0000"
