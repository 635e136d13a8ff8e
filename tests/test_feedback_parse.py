"""Reading bounces and complaints as servers write them: the failed recipients
with their status and diagnostic, the original message's Message-ID and Subject,
and None for what the relay does not act on."""

from __future__ import annotations

import base64
import logging
import quopri
import time
from email.message import Message
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.feedback import parse
from relay.feedback.parse import DIAGNOSTIC_LIMIT, read
from relay.feedback.report import BOUNCE, COMPLAINT, Failure, Report

SAMPLES = Path(__file__).parent / "messages" / "feedback"

EXCHANGE_DIAGNOSTIC = (
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)


def _sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def test_a_postfix_bounce_gives_each_recipient_its_own_status_and_diagnostic() -> None:
    """The second recipient's Final-Recipient is the address an alias on the
    sending side rewrote it to; its Original-Recipient, the address as the relay
    was given it, is the one reported and the one its block is found by."""
    assert read(_sample("postfix-two-failed.eml")) == Report(
        BOUNCE,
        (
            Failure(
                "Full.Box@Supplier.example",
                "5.2.2",
                "552 5.2.2 <full.box@supplier-mail.example>: mailbox over quota",
            ),
            Failure(
                "nobody@buyer.example",
                "5.1.1",
                "550 5.1.1 <nobody@buyer.example>: Recipient address rejected: "
                "User unknown in virtual mailbox table",
            ),
        ),
        message_id="<4711.erp@acme.example>",
        envelope_id="Q7F3K2M9WX",
        queue_ids=("4F2A31C0E5",),  # the returned Received fields' (another hop's here)
    )


def _global(classic: bytes, encoding: str) -> bytes:
    """The Postfix bounce in RFC 6533's UTF-8 form, as an SMTPUTF8 server writes
    it: its report part ``message/global-delivery-status`` (base64 or 8bit),
    the message returned as ``message/global``, or its header alone as
    ``message/global-headers`` in quoted-printable."""
    head, rest = classic.split(b"Content-Type: message/delivery-status\n\n", 1)
    status, tail = rest.split(b"\n--", 1)
    if encoding == "base64":
        status = base64.encodebytes(status.replace(b"\n", b"\r\n"))
    report = (
        b"Content-Type: message/global-delivery-status\n"
        + (b"Content-Transfer-Encoding: base64\n" if encoding == "base64" else b"")
        + b"\n"
        + status
    )
    if encoding == "base64":
        returned, _ = tail.split(
            b"Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n", 1
        )[1].split(b"\n\n", 1)
        tail = tail.split(b"Content-Type: message/rfc822", 1)[0] + (
            b"Content-Type: message/global-headers\nContent-Transfer-Encoding: quoted-printable\n\n"
            + quopri.encodestring(returned + b"\n")
            + b"\n--4F2A31C0E5.1795511702/mail.platform.example--\n"
        )
    else:
        tail = tail.replace(b"Content-Type: message/rfc822", b"Content-Type: message/global")
    return head + report + b"\n--" + tail


@pytest.mark.parametrize("encoding", ["8bit", "base64"])
@pytest.mark.parametrize("typed", ["rfc822", "utf-8"])
def test_a_bounce_in_the_utf8_form_of_rfc_6533_reads_as_the_classic_one(
    encoding: str, typed: str
) -> None:
    """Its status part and returned message were not looked at: the bounce was
    read from its words alone, with no status, envelope ID or Message-ID, as
    about a message the audit log did not have, and its address was never
    listed. Its recipients may have RFC 6533's address type, utf-8."""
    classic = _sample("postfix-two-failed.eml")
    written = classic.replace(b"-Recipient: rfc822;", f"-Recipient: {typed};".encode())
    assert read(_global(written, encoding)) == read(classic)


def test_an_exchange_ndr_returns_the_original_header_only() -> None:
    assert read(_sample("exchange-ndr.eml")) == Report(
        BOUNCE,
        (Failure("purchasing@contoso-buyer.example", "5.1.10", EXCHANGE_DIAGNOSTIC),),
        message_id="<4712.erp@acme.example>",
        queue_ids=("15.20.7000.12",),
    )


def test_a_gmail_dsn_diagnostic_spanning_reply_lines_is_one_line() -> None:
    assert read(_sample("gmail-dsn.eml")) == Report(
        BOUNCE,
        (
            Failure(
                "orders.desk@buyer-mail.example",
                "5.1.1",
                "550-5.1.1 The mailbox you addressed is not known here. Check the "
                "550-5.1.1 address for typing errors or stray spaces. "
                "550 5.1.1 mx.buyer-mail.example "
                "x7-20020a05600c4e0700b0040c1d2e3f4si556677wmq.88 - smtp",
            ),
        ),
        message_id="<4713.erp@acme.example>",
    )


QMAIL_FAILURE = Failure(
    "Sales@OldHost.example", "5.1.1", "No mailbox by that name is kept on this host. (#5.1.1)"
)

QMAIL = Report(
    BOUNCE,
    (QMAIL_FAILURE,),
    message_id="<4715.erp@acme.example>",
)


def test_a_qmail_bounce_gives_the_status_and_reason_written_under_the_address() -> None:
    """qmail writes plain text, no delivery-status part and no returned part: the
    original's header is read from the copy inline below the text (it was
    not, and the bounce reached no message and told nobody), and the status
    from its "(#5.1.1)" (it was 5.0.0, so a dead mailbox was never listed,
    and the user was told "no reason given")."""
    assert read(_sample("qmail-failure.eml")) == QMAIL


def test_a_qmail_bounce_quoting_the_remote_server_takes_its_code() -> None:
    raw = _sample("qmail-failure.eml").replace(
        b"No mailbox by that name is kept on this host. (#5.1.1)\n",
        b"192.0.2.7 does not like recipient.\nRemote host said: 550 5.1.1 unknown user\n"
        b"Giving up on 192.0.2.7.\n",
    )
    assert read(raw).failures == (  # type: ignore[union-attr]
        Failure(
            "Sales@OldHost.example",
            "5.1.1",
            "192.0.2.7 does not like recipient. Remote host said: 550 5.1.1 unknown user"
            " Giving up on 192.0.2.7.",
        ),
    )


def test_a_text_bounce_with_no_code_under_the_address_gives_none() -> None:
    raw = _sample("qmail-failure.eml").replace(b" (#5.1.1)", b"")
    assert read(raw).failures == (  # type: ignore[union-attr]
        Failure("Sales@OldHost.example", None, "No mailbox by that name is kept on this host."),
    )


def test_an_inline_copy_without_a_message_id_identifies_nothing() -> None:
    raw = _sample("qmail-failure.eml").replace(b"Message-ID: <4715.erp@acme.example>\n", b"")
    assert read(raw) == Report(BOUNCE, (QMAIL_FAILURE,))


def test_an_inline_copy_below_a_summary_of_fields_gives_its_message_id() -> None:
    """A server that sums up the message's From and Subject above the copy it
    returns: that first block of fields names no message, and taken for the
    copy's header, the bounce found none in the audit log."""
    raw = _sample("qmail-failure.eml").replace(
        b"--- Below this line is a copy of the message.\n",
        b"The message was:\n\nFrom: Acme Accounts <accounts@platform.example>\n"
        b"Subject: Statement of account November\n\n"
        b"--- Below this line is a copy of the message.\n",
    )
    assert read(raw) == QMAIL


def test_an_exim_failure_in_words_gives_the_remote_servers_code() -> None:
    assert read(_sample("exim-failure.eml")) == Report(
        BOUNCE,
        (
            Failure(
                "bob@buyer.example",
                "5.1.1",
                "host mbox.buyer.example [192.0.2.5] SMTP error from remote mail server"
                " after RCPT TO:<bob@buyer.example>: 550 5.1.1 No such user",
            ),
        ),
        message_id="<4718.erp@acme.example>",
    )


def test_an_exim_delay_warning_under_a_subject_of_its_own_is_no_bounce() -> None:
    """Exim's warning is the sysadmin's to word (``warn_message_file``): under a
    subject the reader does not know, the warning detector's verdict still
    keeps the address still being tried from being taken for a failure."""
    raw = _sample("exim-delayed.eml").replace(
        b"Subject: Warning: message 1tQ4Wb-0001Zx-1C delayed 24 hours",
        b"Subject: Nachricht 1tQ4Wb-0001Zx-1C seit 24 Stunden nicht zugestellt",
    )
    assert b"Subject: Nachricht" in raw
    assert read(raw) is None


def test_a_dsn_that_also_fails_a_recipient_is_a_bounce_whatever_its_subject_says() -> None:
    """Its status blocks decide, not its words: a report titled "Delayed Mail"
    that fails one recipient beside the one still tried lists the failed one,
    or its sender is never told and the dead address is mailed again."""
    raw = _sample("postfix-delayed.eml").replace(
        b"Will-Retry-Until: Sun, 29 Nov 2026 10:14:58 +0100 (CET)\n",
        b"Will-Retry-Until: Sun, 29 Nov 2026 10:14:58 +0100 (CET)\n\n"
        b"Final-Recipient: rfc822; gone@buyer.example\n"
        b"Action: failed\n"
        b"Status: 5.1.1\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 No such user\n",
    )
    report = read(raw)
    assert report is not None and report.kind == BOUNCE
    assert report.failures == (Failure("gone@buyer.example", "5.1.1", "550 5.1.1 No such user"),)


@pytest.mark.parametrize(
    "name", ["exim-delayed.eml", "postfix-delayed-text.eml", "sendmail-warning.eml"]
)
def test_a_delay_warning_in_words_is_no_bounce(name: str) -> None:
    """flufl.bounce's scan stops at its first detector with a verdict, and a
    generic one took these warnings for failures: the user was told the
    document came back while it was still being tried, and the real bounce
    that followed was "already recorded", so the address was never listed."""
    assert read(_sample(name)) is None


def test_each_address_of_a_text_bounce_has_its_own_reason() -> None:
    """Exim puts no empty line between the addresses: each took the lines up to
    the next empty one, so all three got the last one's 5.1.1 and were listed,
    a full mailbox and an unroutable domain with them."""
    failures = read(_sample("exim-failure-three.eml")).failures  # type: ignore[union-attr]
    assert [(f.recipient, f.status) for f in failures] == [
        ("accounts@gone.example", None),
        ("bob@buyer.example", "5.1.1"),
        ("full@buyer.example", None),
    ]
    assert failures[0].diagnostic == "Unrouteable address"
    assert failures[2].diagnostic is not None and failures[2].diagnostic.endswith(
        "552 Mailbox is full"
    )


@pytest.mark.parametrize(
    "returned",
    [b"Subject: Invoice 4718 has not yet been delivered\nTo: bob@buyer.example\n",
     b"Subject: Invoice 4718\n\nIt has not yet been delivered to\nbob@buyer.example\n"],
)  # fmt: skip
def test_a_delay_in_the_returned_copy_does_not_hide_the_failure(returned: bytes) -> None:
    """The warning detector read the copy of the document too: an ERP's
    reminder saying "has not yet been delivered" made a real 5.1.1 no bounce."""
    raw = _sample("exim-failure.eml").replace(
        b"To: bob@buyer.example\nSubject: Invoice 4718\n", returned
    )
    assert [(f.recipient, f.status) for f in read(raw).failures] == [  # type: ignore[union-attr]
        ("bob@buyer.example", "5.1.1")
    ]


def test_a_text_bounce_is_read_in_its_charset_and_only_a_permanent_code_taken() -> None:
    raw = _sample("qmail-failure.eml").replace(
        b"No mailbox by that name is kept on this host. (#5.1.1)",
        "Empfänger unbekannt. (#5.1.1)".encode("latin-1"),
    )
    latin = b"MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
    raw = raw.replace(b"Subject: failure notice\n", b"Subject: failure notice\n" + latin)
    assert read(raw).failures == (  # type: ignore[union-attr]
        Failure("Sales@OldHost.example", "5.1.1", "Empfänger unbekannt. (#5.1.1)"),
    )
    lifetime = _sample("qmail-failure.eml").replace(
        b"No mailbox by that name is kept on this host. (#5.1.1)",
        b"I'm not going to try again; this message has been in the queue too long."
        b"\nRemote host said: 451 4.4.2 try later",
    )
    assert read(lifetime).failures[0].status is None  # type: ignore[union-attr]


def test_a_non_dsn_bounce_from_an_8bit_sender_name_is_still_read() -> None:
    """flufl.bounce's Sina detector raised on it, which ended the scan: the
    bounce was ignored with exit 0, so the mail system dropped it."""
    raw = _sample("qmail-failure.eml").replace(
        b"From: MAILER-DAEMON@", b"From: Syst\xe8me de messagerie <MAILER-DAEMON@"
    )
    raw = raw.replace(
        b"MAILER-DAEMON@mx.oldhost.example\n", b"MAILER-DAEMON@mx.oldhost.example>\n", 1
    )
    assert read(raw) == QMAIL


def test_exims_generic_status_gives_way_to_the_code_in_its_diagnostic() -> None:
    """Exim writes Status 5.0.0 for every permanent failure; the remote server's
    5.1.1 is in Diagnostic-Code, and only a code of the same class is taken."""
    raw = _sample("postfix-two-failed.eml").replace(b"Status: 5.1.1", b"Status: 5.0.0")
    failures = read(raw).failures  # type: ignore[union-attr]
    assert [f.status for f in failures] == ["5.2.2", "5.1.1"]
    raw = raw.replace(b"550 5.1.1 <nobody", b"450 4.1.1 <nobody")
    assert [f.status for f in read(raw).failures] == ["5.2.2", "5.0.0"]  # type: ignore[union-attr]


def test_exims_generic_status_gives_way_to_a_multiline_replys_code() -> None:
    """Gmail's refusal is a multiline reply (``550-5.1.1 ...``), which Exim
    quotes in Diagnostic-Code under its Status 5.0.0: read as 5.0.0, a dead
    Gmail mailbox was no hard bounce by the usual codes, and was mailed again."""
    raw = _sample("gmail-dsn.eml").replace(b"Status: 5.1.1", b"Status: 5.0.0")
    assert [f.status for f in read(raw).failures] == ["5.1.1"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "name",
    [
        "postfix-delayed.eml",
        "out-of-office.eml",
        "out-of-office-colleagues.eml",
        "auto-acknowledgement.eml",
        "challenge-inline-copy.eml",
        "spam-to-return-path.eml",
        "garbage.bin",
    ],
)
def test_what_is_neither_a_hard_bounce_nor_a_complaint_is_none(name: str) -> None:
    assert read(_sample(name)) is None


@pytest.mark.parametrize("field", [b"", b"From: \r\n", b"From: undisclosed\r\n"])
def test_a_bounce_without_a_from_address_is_still_read(
    field: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """flufl.bounce's Yale detector raised on a From with no address, and that
    ended the scan before the detector that knows the format: the bounce was
    read as none, with two tracebacks on stderr."""
    head, body = _sample("qmail-failure.eml").replace(b"\r\n", b"\n").split(b"\n\n", 1)
    lines = [line for line in head.split(b"\n") if not line.lower().startswith(b"from:")]
    without = b"\n".join(lines) + b"\n" + field.replace(b"\r\n", b"\n") + b"\n" + body
    assert read(without) == QMAIL
    assert read(b"Subject: hello\r\n\r\nhello\r\n") is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_report_type_in_capitals_is_still_a_complaint() -> None:
    """RFC 2045 parameter values such as ``report-type`` are compared without
    case: ``Feedback-Report`` read as a bounce found no failure in it, and the
    recipient who complained was mailed again."""
    raw = _sample("yahoo-arf.eml").replace(
        b"report-type=feedback-report", b"report-type=Feedback-Report"
    )
    assert b"report-type=Feedback-Report" in raw
    report = read(raw)
    assert report is not None and report.kind == COMPLAINT
    assert report.failures == (Failure("Buyer.Desk@yahoo-mail.example"),)


def test_a_yahoo_complaint_names_the_recipient_in_its_report_fields() -> None:
    """The returned message's To is redacted; Original-Rcpt-To is the recipient."""
    assert read(_sample("yahoo-arf.eml")) == Report(
        COMPLAINT,
        (Failure("Buyer.Desk@yahoo-mail.example"),),
        message_id="<4716.erp@acme.example>",
        feedback_type="abuse",
    )


def test_a_microsoft_complaint_naming_the_recipient_only_in_the_returned_to_names_none() -> None:
    """The returned To may not name who complained (a Cc or Bcc recipient did):
    the audit log says whom the message went to."""
    assert read(_sample("microsoft-jmrp.eml")) == Report(
        COMPLAINT,
        (),
        message_id="<4717.erp@acme.example>",
        feedback_type="abuse",
    )


def test_a_complaint_naming_several_recipients_names_each_once() -> None:
    raw = _sample("yahoo-arf.eml").replace(
        b"Original-Rcpt-To: <Buyer.Desk@yahoo-mail.example>\n",
        b"Original-Rcpt-To: <Buyer.Desk@yahoo-mail.example>\n"
        b"Original-Rcpt-To: second@yahoo-mail.example\n"
        b"Removal-Recipient: buyer.desk@YAHOO-MAIL.example\n"
        b"Feedback-Type: second-type-ignored\n",
    )
    report = read(raw)
    assert report is not None
    assert report.failures == (
        Failure("Buyer.Desk@yahoo-mail.example"),
        Failure("second@yahoo-mail.example"),
    )
    assert report.feedback_type == "abuse"


def test_a_removal_recipient_names_the_recipient_when_no_original_rcpt_to_does() -> None:
    raw = (
        _sample("yahoo-arf.eml")
        .replace(b"Feedback-Type: abuse\n", b"Feedback-Type: Opt-Out\n")
        .replace(b"Original-Rcpt-To:", b"Removal-Recipient:")
    )
    report = read(raw)
    assert report is not None
    assert report.failures == (Failure("Buyer.Desk@yahoo-mail.example"),)
    assert report.feedback_type == "opt-out"


def test_a_complaint_whose_returned_to_names_several_addresses_names_none() -> None:
    raw = _sample("microsoft-jmrp.eml").replace(
        b'To: "Procurement Team" <Procurement.Team@outlook-buyer.example>\n',
        b'To: "Procurement Team" <Procurement.Team@outlook-buyer.example>,\n'
        b'  "Doe, Desk" <desk@outlook-buyer.example>\n',
    )
    report = read(raw)
    assert report == Report(
        COMPLAINT,
        (),
        message_id="<4717.erp@acme.example>",
        feedback_type="abuse",
    )


@pytest.mark.parametrize("kind", ["not-spam", "auth-failure", "virus", "other"])
def test_feedback_that_asks_for_no_less_mail_is_not_a_complaint(kind: str) -> None:
    """RFC 6430's not-spam is the opposite of a complaint; a DMARC failure report
    (RFC 6591) and the rest say nothing of what the recipient wants."""
    raw = _sample("yahoo-arf.eml").replace(
        b"Feedback-Type: abuse\n", f"Feedback-Type: {kind}\n".encode()
    )
    assert read(raw) is None


def test_a_feedback_report_without_its_feedback_type_is_not_a_complaint() -> None:
    """RFC 5965 requires the field: one without it was taken for abuse, and its
    recipient suppressed on a report that said nothing of what it wanted."""
    raw = _sample("yahoo-arf.eml").replace(b"Feedback-Type: abuse\n", b"")
    assert b"Feedback-Type" not in raw and read(raw) is None


def test_a_feedback_report_without_its_feedback_report_part_is_not_a_complaint() -> None:
    raw = (
        b"From: fbl@isp.example\nTo: bounces@platform.example\nSubject: report\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type="Feedback-Report"; boundary="b"\n\n'
        b"--b\nContent-Type: text/plain\n\nA complaint.\n--b--\n"
    )
    assert read(raw) is None


def test_a_feedback_report_part_in_base64_is_read_as_well() -> None:
    """The email package parses any message/* part as a message, encoded or not;
    base64 fields end up as the body of a message without headers."""
    fields = b"Feedback-Type: fraud\r\nOriginal-Rcpt-To: Pay@bank.example\r\n"
    raw = (
        b"From: fbl@isp.example\nTo: bounces@platform.example\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\n\n'
        b"--b\nContent-Type: message/feedback-report\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(fields)
        + b"\n--b--\n"
    )
    assert read(raw) == Report(COMPLAINT, (Failure("Pay@bank.example"),), feedback_type="fraud")


@pytest.mark.parametrize("encoding", [b"", b"Content-Transfer-Encoding: 7bit\n"])
@pytest.mark.parametrize(
    "type_field",
    [b"Feedback-Type: abuse", b"Feedback-Type: abuse (spam)", b"Feedback-Type: (spam) abuse"],
)
def test_a_feedback_report_part_begun_with_a_blank_line_is_read(
    encoding: bytes, type_field: bytes
) -> None:
    """Fields after a blank line are the body of a message without headers; read
    only for base64, the complaint was ignored for want of its type. A comment
    after the type is allowed (RFC 5965)."""
    raw = (
        b"From: fbl@isp.example\nTo: bounces@platform.example\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\n\n'
        b"--b\nContent-Type: message/feedback-report\n"
        + encoding
        + b"\n\n"
        + type_field
        + b"\nOriginal-Rcpt-To: Pay@bank.example\n"
        + b"\n--b--\n"
    )
    assert read(raw) == Report(COMPLAINT, (Failure("Pay@bank.example"),), feedback_type="abuse")


@pytest.mark.parametrize("agent", ["Grüße".encode(), "Grüße".encode("latin-1")])
def test_an_8bit_feedback_part_begun_with_a_blank_line_is_read_without_a_traceback(
    agent: bytes,
) -> None:
    """Its bytes, read as U+FFFD by the email package, were encoded to ASCII, and
    relay bounce ended in a traceback."""
    raw = (
        b"From: fbl@isp.example\nTo: bounces@platform.example\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\n\n'
        b"--b\nContent-Type: message/feedback-report\nContent-Transfer-Encoding: 8bit\n\n\n"
        b"Feedback-Type: abuse\nOriginal-Rcpt-To: a@b.example\nUser-Agent: " + agent + b"\n"
        b"\n--b--\n"
    )
    assert read(raw) == Report(COMPLAINT, (Failure("a@b.example"),), feedback_type="abuse")


def test_a_long_diagnostic_is_cut_at_the_limit() -> None:
    long = "x" * (DIAGNOSTIC_LIMIT * 3)
    raw = _sample("exchange-ndr.eml").replace(
        EXCHANGE_DIAGNOSTIC.encode(), f"550 5.1.10 {long}".encode()
    )
    report = read(raw)
    assert report is not None
    assert report.failures[0].diagnostic == f"550 5.1.10 {long}"[:DIAGNOSTIC_LIMIT]


def test_a_long_reason_in_words_is_cut_at_the_limit() -> None:
    """A text bounce's reason, as a DSN's diagnostic: a server that writes its
    whole transcript under the address would fill the audit record."""
    long = "x" * (DIAGNOSTIC_LIMIT * 3)
    raw = _sample("qmail-failure.eml").replace(
        b"No mailbox by that name", f"No mailbox {long} by that name".encode()
    )
    report = read(raw)
    assert report is not None
    assert report.failures[0].diagnostic == f"No mailbox {long}"[:DIAGNOSTIC_LIMIT]


def test_unencoded_utf8_in_a_bounce_reads_as_utf8() -> None:
    raw = (
        _sample("exchange-ndr.eml")
        .replace(b"Subject: Order confirmation 4712", "Subject: Auftragsbestätigung 4712".encode())
        .replace(b"Recipient not found", "Empfänger unbekannt".encode())
    )
    report = read(raw)
    assert report is not None
    assert report.failures[0].diagnostic == (
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Empfänger unbekannt by SMTP address lookup"
    )


def test_a_bounce_returning_a_ten_megabyte_attachment_is_read() -> None:
    attachment = _ten_megabytes_base64()
    raw = _sample("postfix-two-failed.eml").replace(
        b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n",
        b'Content-Type: multipart/mixed; boundary="inner"\n\n--inner\n'
        b"Content-Type: text/plain\n\nSee the attachment.\n--inner\n"
        b"Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        + attachment
        + b"\n--inner--\n",
    )
    assert len(raw) > 10_000_000
    report = read(raw)
    assert report is not None
    assert [f.status for f in report.failures] == ["5.2.2", "5.1.1"]
    assert report.message_id == "<4711.erp@acme.example>"


def _ten_megabytes_base64() -> bytes:
    return base64.encodebytes(bytes(range(256)) * (10 * 4096))


def test_a_message_with_a_ten_megabyte_attachment_and_no_dsn_is_read_in_time() -> None:
    """Without a delivery-status part every heuristic detector reads the whole
    body: over the attachment itself that took 15 seconds."""
    raw = _sample("out-of-office.eml").replace(
        b"--_000_ooo77_--",
        b"--_000_ooo77_\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        + _ten_megabytes_base64()
        + b"\n--_000_ooo77_--",
    )
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    assert read(raw) is None
    assert time.process_time() - started < 5


def test_a_qmail_bounce_returning_ten_megabytes_inline_names_its_recipient_in_time() -> None:
    raw = _sample("qmail-failure.eml") + b"x" * 70 + b"\n" + _ten_megabytes_base64()
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    assert read(raw) == QMAIL
    assert time.process_time() - started < 5


def test_a_message_nested_deeper_than_the_parser_recurses_is_none() -> None:
    raw = b"From: a@b.example\nMIME-Version: 1.0\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(3000)
    )
    assert read(raw + b"Content-Type: text/plain\n\nx\n") is None


@pytest.mark.parametrize(
    "name", ["postfix-two-failed.eml", "exchange-ndr.eml", "yahoo-arf.eml", "gmail-dsn.eml"]
)
def test_a_report_cut_off_anywhere_does_not_stop_the_reader(name: str) -> None:
    """A truncated report has a multipart that never closes, a delivery-status
    block without its fields, a header cut in its middle."""
    raw = _sample(name)
    for end in range(0, len(raw), 37):
        report = read(raw[:end])
        assert report is None or report.kind in (BOUNCE, COMPLAINT)


def test_a_message_without_headers_is_none(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL):
        assert read(b"just some text\nwithout any header\n") is None


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_none_or_a_report(raw: bytes) -> None:
    report = read(raw)
    assert report is None or isinstance(report, Report)


@given(
    st.sampled_from(["postfix-two-failed.eml", "yahoo-arf.eml", "microsoft-jmrp.eml"]),
    st.integers(min_value=0, max_value=3000),
    st.binary(min_size=1, max_size=40),
)
@example("microsoft-jmrp.eml", 1499, b"\x80")  # a charset name no codec knows
@settings(max_examples=300, deadline=None)
def test_a_sample_with_bytes_spliced_in_gives_none_or_a_report(
    name: str, at: int, noise: bytes
) -> None:
    raw = _sample(name)
    report = read(raw[:at] + noise + raw[at:])
    assert report is None or isinstance(report, Report)


def test_a_text_bounce_in_base64_gives_its_returned_message_id() -> None:
    """Exim names the failed addresses in X-Failed-Recipients, whatever the body's
    encoding; the inline copy's Message-ID was looked for in the base64 text."""
    head, body = _sample("exim-failure.eml").split(b"\n\n", 1)
    raw = (
        head + b"\nX-Failed-Recipients: bob@buyer.example\nMIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(body)
    )
    report = read(raw)
    assert report is not None
    assert (report.message_id, report.failures[0].status) == ("<4718.erp@acme.example>", "5.1.1")


def test_a_sendmail_report_with_transient_errors_too_names_the_failures_only() -> None:
    """flufl.bounce's sendmail pattern runs from the first heading on, so the
    address still being tried was recorded as bounced and its sender told."""
    report = read(_sample("sendmail-failure-mixed.eml"))
    assert report is not None
    assert [(f.recipient, f.status) for f in report.failures] == [("nobody@buyer.example", "5.1.1")]


def test_a_sendmail_report_listing_transient_errors_first_still_names_the_failure() -> None:
    """The transient section ends at the next heading, not only at an empty line:
    a permanent section right below it was read as still being tried, and the
    dead address was never listed."""
    raw = _sample("sendmail-failure-mixed.eml")
    permanent, transient = raw.split(b"\n\n   ----- The following addresses had transient")
    head, permanent = permanent.split(b"   ----- The following addresses had permanent")
    transient, rest = transient.split(b"\n\n", 1)
    raw = (
        head
        + b"   ----- The following addresses had transient"
        + transient
        + b"\n   ----- The following addresses had permanent"
        + permanent
        + b"\n\n"
        + rest
    )
    assert raw.index(b"slow@other.example") < raw.index(b"<nobody@buyer.example>")
    report = read(raw)
    assert report is not None
    assert [(f.recipient, f.status) for f in report.failures] == [("nobody@buyer.example", "5.1.1")]


def test_a_complaint_gives_the_envelope_id_the_relay_sent() -> None:
    """RFC 5965's Original-Envelope-Id names the relay's queue ID, which finds the
    very message where two tenants' ERPs used one Message-ID."""
    raw = _sample("yahoo-arf.eml").replace(
        b"Version: 1\n", b"Version: 1\nOriginal-Envelope-Id: Q7F3K2M9WX\n"
    )
    report = read(raw)
    assert report is not None and report.envelope_id == "Q7F3K2M9WX"


@pytest.mark.parametrize("charset", ["undefined", "idna", '"utf-8\\0"'])
def test_a_charset_anyone_can_name_does_not_stop_the_reader(charset: str) -> None:
    """The report's charset, read since the text is decoded, raised for names
    Python knows but cannot decode with (and a NUL): a traceback in the pipe."""
    raw = _sample("qmail-failure.eml").replace(
        b"Subject: failure notice\n",
        b"Subject: failure notice\nMIME-Version: 1.0\nContent-Type: text/plain; charset="
        + charset.encode()
        + b"\n",
    )
    assert read(raw) == QMAIL


def test_a_report_in_words_encoded_as_base64_is_read() -> None:
    """flufl.bounce read the body still encoded: qmail's report was none."""
    head, body = _sample("qmail-failure.eml").split(b"\n\n", 1)
    raw = (
        head + b"\nMIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n"
        b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(body)
    )
    assert read(raw) == QMAIL


def test_a_report_in_words_in_base64_with_crlf_line_ends_gives_its_codes() -> None:
    """Decoded, a base64 body keeps the CRLF its writer encoded: read so, no
    address line matched, and qmail's 5.1.1 was lost, the dead mailbox not a
    hard bounce."""
    head, body = _sample("qmail-failure.eml").split(b"\n\n", 1)
    raw = (
        head + b"\nMIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n"
        b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(body.replace(b"\n", b"\r\n"))
    )
    assert read(raw) == QMAIL


def test_a_complaint_gives_the_queue_id_of_the_relays_received_field() -> None:
    """A complaint returning the message whole names it by the relay's queue ID in
    its Received field, where two tenants' ERPs used one Message-ID."""
    raw = _sample("yahoo-arf.eml").replace(
        b"Content-Disposition: inline\n\n",
        b"Content-Disposition: inline\n\nReceived: from erp.acme.example by relay.platform.example"
        b"\n  with ESMTPSA id Q7F3K2M9WX; Thu, 26 Nov 2026 07:58:01 +0000\n",
    )
    report = read(raw)
    assert report is not None and report.queue_ids == ("Q7F3K2M9WX",)


def test_exchange_2003_quoting_the_address_gives_it_without_the_quotes() -> None:
    raw = (
        b"From: System Administrator <postmaster@buyer.example>\n"
        b"To: bounces@platform.example\nSubject: Undeliverable: Invoice 4721\n\n"
        b"Your message\n\n  To:      'nobody@buyer.example'\n  Subject: Invoice 4721\n\n"
        b"did not reach the following recipient(s):\n\n"
        b"'nobody@buyer.example' on Fri, 4 Dec 2026 10:12:01 +0100\n"
        b"    The e-mail account does not exist at the organization this message was sent to.\n"
        b"    <exchange.buyer.example #5.1.1>\n"
    )
    report = read(raw)
    assert report is not None
    assert [(f.recipient, f.status) for f in report.failures] == [("nobody@buyer.example", "5.1.1")]


def _exchange_2000(heading: bytes, returned_body: bytes = b"body\n") -> bytes:
    return (
        b"From: System Administrator <postmaster@buyer.example>\nTo: bounces@platform.example\n"
        b"Subject: Undeliverable: Letter 7\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="----_=_NextPart_001"\n\n'
        b'------_=_NextPart_001\nContent-Type: text/plain; charset="windows-1252"\n'
        b"Content-Transfer-Encoding: quoted-printable\n\n"
        b"Your message did not reach some or all of the intended recipients.\n\n"
        b"      Subject:  Letter 7\n      Sent:     06.12.2026 10:38\n\n"
        + heading
        + b"\n\n      'legacy@buyer.example' on 06.12.2026 10:40\n"
        b"            The e-mail account does not exist at the organization this messag=\n"
        b"e was sent to.  Check the e-mail address, or contact the recipient directly =\n"
        b"to find out the correct address.\n"
        b"            <EXCH01.buyer.example #5.1.1>\n\n"
        b"------_=_NextPart_001\nContent-Type: message/rfc822\n\n"
        b"Message-ID: <let7@erp.acme>\nSubject: Letter 7\nTo: legacy@buyer.example\n\n"
        + returned_body
        + b"------_=_NextPart_001--\n"
    )


@pytest.mark.parametrize(
    "heading",
    [
        b"The following recipient(s) cannot be reached:",
        b"The following recipient(s) could not be reached:",
    ],
)
def test_an_exchange_2000_bounce_in_words_is_read(heading: bytes) -> None:
    """Read as neither a bounce nor a complaint: flufl.bounce knows Exchange
    5.5's wording only, so the dead address was never listed."""
    report = read(_exchange_2000(heading))
    assert report is not None
    assert [(f.recipient, f.status) for f in report.failures] == [("legacy@buyer.example", "5.1.1")]
    assert report.message_id == "<let7@erp.acme>"


def test_an_exchange_2000_bounce_naming_a_unicode_mailbox_too_names_the_others() -> None:
    """A mailbox whose name is not ASCII, on the list beside the others: taken,
    its address failed the detectors, and the whole bounce was read as none."""
    heading = b"The following recipient(s) cannot be reached:"
    raw = _exchange_2000(heading).replace(
        heading + b"\n\n",
        heading + b"\n\n      'j=FCrgen@buyer.example' on 06.12.2026 10:40\n"
        b"            <EXCH01.buyer.example #5.1.1>\n\n",
    )
    report = read(raw)
    assert report is not None
    assert [(f.recipient, f.status) for f in report.failures] == [("legacy@buyer.example", "5.1.1")]


def test_an_exchange_2000_bounce_takes_no_address_from_the_copy_it_returns() -> None:
    body = b"Minutes:\n      'kari@buyer.example' on 06.12.2026 10:00 said yes\n"
    report = read(_exchange_2000(b"The following recipient(s) cannot be reached:", body))
    assert report is not None
    assert [f.recipient for f in report.failures] == ["legacy@buyer.example"]


def test_an_exchange_2000_bounce_with_its_subject_encoded_is_read() -> None:
    """Exchange encodes the whole subject when the original's has an umlaut."""
    raw = _exchange_2000(b"The following recipient(s) cannot be reached:").replace(
        b"Subject: Undeliverable: Letter 7",
        b"Subject: =?utf-8?q?Undeliverable:_Rechnung_f=C3=BCr_M=C3=A4rz?=",
    )
    report = read(raw)
    assert report is not None and [f.recipient for f in report.failures] == ["legacy@buyer.example"]


def test_an_exchange_2000_bounce_whose_subject_is_folded_is_read() -> None:
    """A subject folded before its first word begins with the fold's space."""
    raw = _exchange_2000(b"The following recipient(s) cannot be reached:").replace(
        b"Subject: Undeliverable: Letter 7", b"Subject:\n Undeliverable: Letter 7"
    )
    report = read(raw)
    assert report is not None and [f.recipient for f in report.failures] == ["legacy@buyer.example"]


def test_an_exchange_2000_bounce_takes_no_address_after_its_list_ends() -> None:
    """The list ends at the first line that is not indented: an address in the
    text below it (a reply quoted, an earlier failure) failed in no such list."""
    raw = _exchange_2000(b"The following recipient(s) cannot be reached:").replace(
        b"            <EXCH01.buyer.example #5.1.1>\n\n",
        b"            <EXCH01.buyer.example #5.1.1>\n\n"
        b"Forwarded earlier:\n      'kari@buyer.example' on 05.12.2026 09:00\n\n",
    )
    report = read(raw)
    assert report is not None and [f.recipient for f in report.failures] == ["legacy@buyer.example"]


def test_an_exchange_2000_report_without_a_text_of_its_own_reads_none_from_its_copy() -> None:
    """Only the report's own text part is read: one whose notice came in HTML
    alone returns a copy whose text may quote such a list (a person who
    forwarded an earlier bounce), and that address did not fail."""
    heading = b"The following recipient(s) cannot be reached:"
    raw = _exchange_2000(
        heading, heading + b"\n\n      'kari@buyer.example' on 06.12.2026 10:00\n"
    ).replace(b'Content-Type: text/plain; charset="windows-1252"', b"Content-Type: text/html")
    assert read(raw) is None


def test_a_reply_quoting_an_exchange_2000_bounce_is_no_bounce() -> None:
    """A person forwarding the bounce to ask what it means wrote the heading and
    the address too: read as a report, the colleague asked about was listed."""
    raw = _exchange_2000(b"The following recipient(s) cannot be reached:")
    raw = raw.replace(b"Subject: Undeliverable: Letter 7", b"Subject: RE: Undeliverable: Letter 7")
    raw = raw.replace(b"From: System Administrator <postmaster@buyer.example>", b"From: alice@acme")
    assert read(raw) is None


def test_an_exchange_2000_bounce_in_a_charset_python_cannot_decode_is_read_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = _exchange_2000(b"The following recipient(s) cannot be reached:")
    raw = raw.replace(b'charset="windows-1252"', b'charset="idna"')
    with caplog.at_level(logging.WARNING):
        report = read(raw)
    assert report is not None and [f.recipient for f in report.failures] == ["legacy@buyer.example"]
    assert caplog.records == []


def _exchange_2000_de(subject: bytes, text: bytes) -> bytes:
    """Exchange 2003's report in German, its text in Latin-1 quoted-printable."""
    return (
        b"From: postmaster@cust.example\nTo: bounces@platform.example\n"
        b"Subject: " + subject + b"\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="X15"\n\n'
        b"--X15\nContent-Type: text/plain; charset=iso-8859-1\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n"
        + quopri.encodestring(text)
        + b"\n--X15\nContent-Type: message/rfc822\n\n"
        b"Received: from [127.0.0.1] by relay.platform.example with ESMTP\n"
        b" id 25YFTWLS8379Q1ND; Sun, 06 Dec 2026 14:59:26 +0000\n"
        b"Message-ID: <beta7@erp>\nSubject: Quote-7\nTo: onlybeta@cust.example\n\n"
        b"document\n--X15--\n"
    )


_GERMAN_NDR = (
    "Die Nachricht hat einige oder alle Empfänger nicht erreicht.\n\n"
    "      Betreff:  Quote-7\n      Gesendet: 06.12.2026 15:59\n\n"
    "Folgende(r) Empfänger konnte(n) nicht erreicht werden:\n\n"
    "      onlybeta@cust.example am 06.12.2026 16:00\n"
    "            550 5.1.1 RESOLVER.ADR.RecipNotFound; not found\n"
).encode("latin-1")


def test_a_german_exchange_2000_bounce_in_words_is_read() -> None:
    """Read as neither a bounce nor a complaint, where the English one was read."""
    report = read(_exchange_2000_de(b"Unzustellbar: Quote-7", _GERMAN_NDR))
    assert report is not None
    (failure,) = report.failures
    assert (failure.recipient, failure.status) == ("onlybeta@cust.example", "5.1.1")
    assert (report.message_id, report.queue_ids) == ("<beta7@erp>", ("25YFTWLS8379Q1ND",))


@pytest.mark.parametrize(
    ("subject", "text"),
    [
        (
            b"=?iso-8859-1?q?Zustellung_verz=F6gert:_Quote-7?=",
            "Die Zustellung an diese Empfänger oder Gruppen ist verzögert:\n\n"
            "      onlybeta@cust.example am 06.12.2026 16:00\n"
            "            451 4.4.0 Primary target IP address responded with: 421 4.2.1\n\n"
            "Es wird weiterhin versucht, die Nachricht zuzustellen.\n",
        ),
        (
            b"Abwesenheitsnotiz: Quote-7",
            "Ich bin bis 10.12.2026 nicht im Büro. In dringenden Fällen:\n\n"
            "      kollege@cust.example am 07.12.2026 wieder erreichbar\n"
            "            Telefon 0123 550 5.1.1\n",
        ),
    ],
)
def test_a_german_delay_notice_or_out_of_office_is_no_bounce(subject: bytes, text: str) -> None:
    """Only an ``Unzustellbar:`` report under its heading is read as one."""
    assert read(_exchange_2000_de(subject, text.encode("latin-1"))) is None
    assert read(_exchange_2000_de(subject, _GERMAN_NDR)) is None


def _dsn_naming(count: int) -> bytes:
    blocks = b"".join(
        b"\nFinal-Recipient: rfc822; User%d@Buyer.example\nAction: failed\n"
        b"Status: 5.1.%d\nDiagnostic-Code: smtp; 550 5.1.%d no user %d\n" % (i, i % 10, i % 10, i)
        for i in range(count)
    )
    return (
        b"From: MAILER-DAEMON@mx.example\nSubject: Undelivered Mail Returned to Sender\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status;"
        b' boundary="B"\n'
        b"\n--B\nContent-Type: text/plain\n\nYour message could not be delivered.\n"
        b"\n--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n"
        + blocks
        + b"\n--B\nContent-Type: text/rfc822-headers\n\n"
        + b"Message-ID: <m1@platform.example>\n\n--B--\n"
    )


def _qmail_naming(count: int) -> bytes:
    return (
        b"From: MAILER-DAEMON@mx.example\nSubject: failure notice\n\n"
        b"Hi. This is the qmail-send program at mx.example.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        + b"".join(
            b"<user%d@buyer.example>:\nNo mailbox %d here. (#5.1.%d)\n\n" % (i, i, i % 10)
            for i in range(count)
        )
        + b"<user1@buyer.example>:\nA second paragraph for one address. (#5.7.1)\n\n"
    )


def _read_timed(raw: bytes, count: int) -> tuple[dict[str, Failure], float]:
    """The report's failures by recipient (there must be ``count``, a relay's
    listeners taking as many), and the seconds it took."""
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    report = read(raw, most=count)
    elapsed = time.process_time() - started
    assert report is not None and len(report.failures) == count
    return {f.recipient.lower(): f for f in report.failures}, elapsed


def test_a_dsn_naming_thousands_of_recipients_gives_each_its_own_block_in_time() -> None:
    """Each address's block was searched for among all of them: 3,000 took 10 s,
    and a report may be 64 MB."""
    by_recipient, elapsed = _read_timed(_dsn_naming(3000), 3000)
    assert by_recipient["user1234@buyer.example"] == Failure(
        "User1234@Buyer.example", "5.1.4", "550 5.1.4 no user 1234"
    )
    assert elapsed < 5


def test_a_text_bounce_naming_thousands_of_addresses_gives_each_its_own_lines_in_time() -> None:
    """Each address's lines were searched for among all of the text's: 3,000 took
    2.7 s. An address written twice keeps its first paragraph."""
    by_recipient, elapsed = _read_timed(_qmail_naming(3000), 3000)
    assert by_recipient["user2345@buyer.example"] == Failure(
        "user2345@buyer.example", "5.1.5", "No mailbox 2345 here. (#5.1.5)"
    )
    assert by_recipient["user1@buyer.example"].diagnostic == "No mailbox 1 here. (#5.1.1)"
    assert elapsed < 2


def test_a_status_that_is_no_code_is_taken_for_none() -> None:
    """The code goes into the notice the sender gets, signed: a report's writer
    put words there, run together (``5.1.1_our_bank_details_changed...``)."""
    raw = _sample("postfix-two-failed.eml").replace(
        b"Status: 5.1.1", b"Status: 5.1.1_Our_bank_details_changed:_pay_to_NO93", 1
    )
    report = read(raw)
    assert report is not None
    assert sorted(str(f.status) for f in report.failures) == ["5.2.2", "None"]


def _handed(monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """The views the detectors are handed, as ``read`` runs."""
    views: list[Message] = []
    failed = parse._failed

    def kept(view: Message) -> frozenset[bytes]:
        views.append(view)
        return failed(view)

    monkeypatch.setattr(parse, "_failed", kept)
    return views


def test_the_detectors_are_handed_a_bounded_text_however_many_parts_a_report_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cut was per text part: 49 MB of 100-byte text parts handed each
    detector every part, almost two minutes and 584 MB. The parts first in the
    report are still read, a qmail bounce among them."""
    part = b"--B\nContent-Type: text/plain\n\n" + b"x" * 100 + b"\n"
    first = _sample("qmail-failure.eml").split(b"\n\n", 1)[1]
    raw = (
        b"From: MAILER-DAEMON@mx.example\nSubject: failure notice\n"
        b'Content-Type: multipart/mixed; boundary="B"\n\n'
        b"--B\nContent-Type: text/plain\n\n" + first + part * 20_000 + b"--B--\n"
    )
    views = _handed(monkeypatch)
    report = read(raw)
    (view,) = views
    parts = list(view.walk())
    text = sum(len(p.get_payload()) for p in parts if isinstance(p.get_payload(), str))
    assert len(parts) <= 1 + (1 << 20) // 1024  # a part counts 1 KiB of the budget
    assert text <= 1 << 20
    assert report is not None and report.failures == QMAIL.failures


def test_the_detectors_are_handed_a_bounded_text_however_large_its_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each text part is cut at 256 KiB, and all of them together at 1 MiB: a
    report of many large text parts, which anyone can send to the return path,
    kept each detector reading for as long as its parts were many."""
    part = b"--B\nContent-Type: text/plain\n\n" + (b"x" * 99 + b"\n") * 3000
    first = _sample("qmail-failure.eml").split(b"\n\n", 1)[1]
    raw = (
        b"From: MAILER-DAEMON@mx.example\nSubject: failure notice\n"
        b'Content-Type: multipart/mixed; boundary="B"\n\n'
        b"--B\nContent-Type: text/plain\n\n" + first + part * 8 + b"--B--\n"
    )
    views = _handed(monkeypatch)
    report = read(raw)
    (view,) = views
    sizes = [len(p.get_payload()) for p in view.walk() if isinstance(p.get_payload(), str)]
    assert max(sizes) <= 256 * 1024 and sum(sizes) <= 1 << 20, sizes
    assert report is not None and report.failures == QMAIL.failures


def test_a_dsn_naming_more_recipients_than_the_relay_acts_on_is_read_for_as_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every block was read, and each detector walked them all: 600,000 in a
    41 MB report took a minute and 959 MB, for a report acted on for 101. How
    many were not read is kept, for the command to say."""
    views = _handed(monkeypatch)
    report = read(_dsn_naming(3000), most=101)
    assert report is not None
    assert [f.recipient for f in report.failures] == sorted(
        (f"User{i}@Buyer.example" for i in range(101)), key=str.lower
    )
    assert report.unread == 3000 - 101
    (view,) = views
    (status,) = (p for p in view.walk() if p.get_content_type() == "message/delivery-status")
    assert len(status.get_payload()) == 1 + 101  # the per-message block, and the recipients'


def _with_text_parts_first(count: int, size: int) -> bytes:
    """The Postfix bounce with ``count`` text parts of ``size`` bytes before its
    status part, as a server that writes its notice in several languages does."""
    boundary = b"--4F2A31C0E5.1795511702/mail.platform.example\n"
    text = boundary + b"Content-Type: text/plain; charset=utf-8\n\n" + b"x" * size + b"\n"
    status = boundary + b"Content-Description: Delivery report"
    return _sample("postfix-two-failed.eml").replace(status, text * count + status, 1)


def test_a_dsn_whose_status_part_comes_after_the_text_budget_is_read_for_its_recipients() -> None:
    """The status part was dropped with the text the budget had no room for:
    after five text parts of 294 KB, only the recipient the words named was
    found, and the other one's mailbox stayed on the platform's lists."""
    report = read(_with_text_parts_first(5, 294 * 1024))
    assert report is not None
    assert [(f.recipient, f.status) for f in report.failures] == [
        ("Full.Box@Supplier.example", "5.2.2"),
        ("nobody@buyer.example", "5.1.1"),
    ]


def test_status_parts_past_the_text_budget_are_kept_for_the_most_recipients_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept whatever the text budget, empty status parts after it would all be
    handed to the detectors: each counts as one recipient at least."""
    empty = b"--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n\n"
    head = (
        b"From: MAILER-DAEMON@mx.example\nSubject: Undelivered Mail Returned to Sender\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
    )
    text = (b"--B\nContent-Type: text/plain\n\n" + b"x" * (300 * 1024) + b"\n") * 4
    raw = head + text + empty * 500 + b"--B--\n"
    views = _handed(monkeypatch)
    read(raw, most=101)
    (view,) = views
    status = [p for p in view.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(status) == 101


def _dsn_of(*blocks: tuple[bytes, bytes, bytes]) -> bytes:
    """A DSN with a block for one@buyer.example per (action, status, reply)."""
    written = b"".join(
        b"\nFinal-Recipient: rfc822; one@buyer.example\nAction: %s\nStatus: %s\n"
        b"Diagnostic-Code: smtp; %s\n" % block
        for block in blocks
    )
    return (
        b"From: MAILER-DAEMON@mx.example\nSubject: Undelivered Mail Returned to Sender\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status;"
        b' boundary="B"\n'
        b"\n--B\nContent-Type: text/plain\n\nYour message could not be delivered.\n"
        b"\n--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n"
        + written
        + b"\n--B\nContent-Type: text/rfc822-headers\n\n"
        + b"Message-ID: <m1@platform.example>\n\n--B--\n"
    )


DELAYED = (b"delayed", b"4.4.7", b"451 4.4.7 try again later")
NO_USER = (b"failed", b"5.1.1", b"550 5.1.1 no such user")
POLICY = (b"failed", b"5.7.1", b"550 5.7.1 refused by policy")


@pytest.mark.parametrize("order", ["delay first", "failure first"])
def test_an_address_delayed_then_failed_in_one_report_has_the_failures_status(
    order: str,
) -> None:
    """RFC 3464 gives a recipient a block per action a report is about: the
    delay's block, written first, stood for the failure, whose 4.4.7 is no hard
    bounce code, and the mailbox that is gone was never listed."""
    blocks = (DELAYED, NO_USER) if order == "delay first" else (NO_USER, DELAYED)
    report = read(_dsn_of(*blocks))
    assert report is not None
    assert report.failures == (Failure("one@buyer.example", "5.1.1", "550 5.1.1 no such user"),)


def test_an_address_failed_twice_in_one_report_has_its_first_failures_status() -> None:
    """Two failures for one address (two hosts tried, each refusing): the first,
    as the reporting server wrote them; both are permanent, and neither is
    more the address's than the other."""
    report = read(_dsn_of(POLICY, NO_USER))
    assert report is not None
    assert report.failures == (
        Failure("one@buyer.example", "5.7.1", "550 5.7.1 refused by policy"),
    )
