"""Reports that name a recipient in Unicode (RFC 6533's utf-8 address type),
taken by ``relay bounce`` on the state of a relay that sent to the recipient
in the xn-- form, as it sends every address."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.feedback.parse import read
from relay.feedback.report import BOUNCE
from tests.relayproc import RelayProcess
from tests.sink import Sink, SinkServer, free_port
from tests.test_feedback_command import _bounce, _listed, _send
from tests.test_queue_e2e import audit_events, configure

RECIPIENT = "kunde2@xn--bcher-kva.example"


def _global_dsn(final_recipient: str, sent_to: str = RECIPIENT) -> bytes:
    """A Postfix bounce in RFC 6533's UTF-8 form, as an SMTPUTF8 server writes it."""
    return f"""\
From: MAILER-DAEMON@mail.platform.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: bounces@platform.example
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain; charset=utf-8

This is the mail system at host mail.platform.example.

--B
Content-Type: message/global-delivery-status

Reporting-MTA: dns; mail.platform.example

Final-Recipient: utf-8; {final_recipient}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 User unknown

--B
Content-Type: message/global-headers

From: Acme Accounts <accounts@platform.example>
To: {sent_to}
Subject: Rechnung 4720
Message-ID: <4720.erp@acme.example>

--B--
""".encode()


def _invoice_sent(
    policy_file: Path, tmp_path: Path, recipient: str = RECIPIENT
) -> tuple[Path, str]:
    with SinkServer(Sink()) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            queue_id = _send(port, "<4720.erp@acme.example>", (recipient,))
            server.sink.wait(1)
    return policy, queue_id


@pytest.mark.parametrize(
    "written", ["kunde2@bücher.example", "kunde2@b\\x{FC}cher.example", "Kunde2@BÜCHER.example"]
)
def test_a_recipient_in_the_unicode_form_is_the_one_sent_to_in_the_xn_form(
    policy_file: Path, tmp_path: Path, written: str
) -> None:
    """The report was "neither a bounce nor a complaint": flufl.bounce skips an
    address that is not ASCII, and the relay had sent to the xn-- form."""
    policy, queue_id = _invoice_sent(policy_file, tmp_path)
    taken = _bounce(policy, _global_dsn(written))
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.splitlines()[:2] == [
        f"bounce about {queue_id} (acme/jan)",
        f"{RECIPIENT}: bounced (5.1.1), suppressed",
    ]
    assert _listed(policy) == {RECIPIENT: ("acme", "bounce")}
    assert ("bounced", RECIPIENT) in audit_events(policy, queue_id)


@pytest.mark.parametrize(
    ("written", "sent_to"),
    [
        ("kunde@faß.example", "kunde@xn--fa-hia.example"),
        ("kunde@ς.example", "kunde@xn--3xa.example"),
        (
            # Persian, a ZWNJ between its two parts
            "kunde@\u0646\u0627\u0645\u0647\u200c\u0627\u06cc.example",
            "kunde@xn--mgba3gch31f060k.example",
        ),
    ],
)
def test_a_recipient_is_read_in_the_form_the_erp_sent_to(
    policy_file: Path, tmp_path: Path, written: str, sent_to: str
) -> None:
    """IDNA2008's form, as the ERP and the receiving server convert: Python's
    codec (IDNA2003) read faß.example as fass.example, and the bounce was
    about nobody the message went to, while the address stayed unsuppressed."""
    policy, queue_id = _invoice_sent(policy_file, tmp_path, sent_to)
    taken = _bounce(policy, _global_dsn(written, sent_to))
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.splitlines()[:2] == [
        f"bounce about {queue_id} (acme/jan)",
        f"{sent_to}: bounced (5.1.1), suppressed",
    ]
    assert _listed(policy) == {sent_to: ("acme", "bounce")}


def test_a_local_part_in_unicode_names_nobody_the_message_went_to(
    policy_file: Path, tmp_path: Path
) -> None:
    """The relay sends to ASCII addresses only, so no message of its went there:
    the report is a bounce about nobody it sent to, not one that is ignored."""
    policy, queue_id = _invoice_sent(policy_file, tmp_path)
    taken = _bounce(policy, _global_dsn("künde@bücher.example"))
    assert taken.returncode == 0, taken.stderr
    said = taken.stdout.encode("latin-1").decode()
    assert said.splitlines() == [
        f"bounce about {queue_id} (acme/jan)",
        "künde@xn--bcher-kva.example: not recorded: its message did not go to it",
    ]
    assert "neither" not in taken.stderr
    assert _listed(policy) == {}


def test_a_report_whose_action_says_error_names_a_local_part_in_unicode() -> None:
    """``Action: error``, as older servers write a failure, counts as ``failed``
    does: read as no report, the recipient in Unicode it names was said to
    be neither a bounce nor a complaint."""
    raw = _global_dsn("künde@bücher.example").replace(b"Action: failed", b"Action: error")
    report = read(raw)
    assert report is not None and report.kind == BOUNCE
    assert [f.recipient for f in report.failures] == ["künde@xn--bcher-kva.example"]
