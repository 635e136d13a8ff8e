"""The failure notice as built for the sender: it must be writable whatever the
document's subject held, since the subject comes from the ERP's message."""

from __future__ import annotations

import dataclasses
import quopri
from pathlib import Path

import dkim
import pytest
from dkim.util import parse_tag_value

from relay import message
from relay.notice import Telling, build_notice, signed_anew, telling
from relay.policy.load import load
from relay.spool import DELIVERED, EXPIRED, FAILED, PENDING, SUPPRESSED, RecipientState
from relay.suppression import BOUNCE, COMPLAINT, Suppression
from tests.dkimtools import dkimpy_each, dkimpy_verify
from tests.spoolkit import make_entry
from tests.test_decide_account import with_account


@pytest.mark.parametrize(
    ("subject", "shown"),
    [
        (
            "Invoice\x0b4711\x00x",
            "Undelivered: Invoice 4711 x",
        ),  # decoded from =?utf-8?q?...=0B...?=
        ("Faktura for Ørsted", "Undelivered: Faktura for Ørsted"),
        ("x" * 1000, "Undelivered: " + "x" * 1000),  # no space to fold at
    ],
)
def test_a_notice_is_built_for_any_subject(policy_file: Path, subject: str, shown: str) -> None:
    policy = load(policy_file)
    entry = make_entry(subject=subject)
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    _, data = build_notice(policy, entry, [failed], 1_790_000_000.0)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert message.read(data).get("Subject") == shown


@pytest.mark.parametrize(
    ("others", "opening"),
    [
        ([], "could not be delivered: none of its recipients got it."),
        ([DELIVERED], "could not be delivered to everyone."),
        ([PENDING], "could not be delivered to the recipients below; it is still being sent"),
        ([FAILED], "could not be delivered: none of its recipients got it."),
    ],
    ids=["alone", "another-delivered", "another-pending", "another-told-before"],
)
def test_a_notice_says_whether_anyone_got_the_document(
    policy_file: Path, others: list[str], opening: str
) -> None:
    """It said "could not be delivered to everyone" also when nobody got it. The
    relay's BCC copy delivered is nobody the sender meant; another recipient
    failed and told before is no longer ``notify``."""
    entry = make_entry()
    entry.recipients[0].status = EXPIRED
    entry.recipients[1].status = DELIVERED  # the archive copy
    for number, status in enumerate(others):
        entry.recipients.append(
            RecipientState(f"other{number}@example.net", status, notify=status != FAILED)
        )
    _, data = build_notice(load(policy_file), entry, entry.recipients[:1], 1_790_000_000.0)
    body = data.split(b"\r\n\r\n", 1)[1]
    text = quopri.decodestring(body.replace(b"\r\n", b"\n")).decode()
    assert text.startswith("A document you sent " + opening)
    assert "Recipient:  customer@example.net" in text


@pytest.mark.parametrize(
    ("sent_as", "thread"),
    [("<inv-4711@erp.acme.example>", "<inv-4711@erp.acme.example>"), ("", None)],
)
def test_a_notice_is_threaded_under_the_document_it_is_about(
    policy_file: Path, sent_as: str, thread: str | None
) -> None:
    """The sender has the document (the automatic copy) in the mailbox the notice
    goes to: a mail client files the notice under it; the body names its ID."""
    entry = make_entry(message_id=sent_as)
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    _, data = build_notice(load(policy_file), entry, [failed], 1_790_000_000.0)
    view = message.read(data)
    assert view.get("In-Reply-To") == thread and view.get("References") == thread
    body = quopri.decodestring(data.split(b"\r\n\r\n", 1)[1]).decode()
    assert f"Message-ID: {sent_as or '(none)'}\n" in body.replace("\r\n", "\n")
    signatures = [v for n, v in view.written if n == "DKIM-Signature"]
    assert signatures and all(("in-reply-to" in v) is (thread is not None) for v in signatures)


def test_a_subject_or_report_cannot_add_lines_to_the_notice(policy_file: Path) -> None:
    """The body printed them raw: a subject, or a bounce report anyone can mail to
    the return path, added lines to a notice the platform signs."""
    forged = "Invoice 40\r\nSent: today\u2028\r\nOur bank details changed: pay to XX00\x1b[31m"
    entry = make_entry(subject=forged)
    failed = RecipientState(
        "customer@example.net", FAILED, reply="550 5.1.1 gone\r\nPay to XX00", notify=True
    )
    _, data = build_notice(load(policy_file), entry, [failed], 1_790_000_000.0)
    body = quopri.decodestring(data.split(b"\r\n\r\n", 1)[1]).decode()
    lines = body.splitlines()
    assert not any(line.startswith(("Our bank", "Pay to", "Sent: today")) for line in lines)
    assert (
        "Document:   Invoice 40  Sent: today   Our bank details changed: pay to XX00 [31m" in lines
    )
    assert "Reason:     550 5.1.1 gone  Pay to XX00" in lines
    assert "\x1b" not in body


def test_recipients_refused_alike_share_one_reason(policy_file: Path) -> None:
    """1,000 recipients refused alike made a notice of 3,000 lines, every third
    the same reason."""
    entry = make_entry()
    same = "550 5.7.1 Relaying denied"
    failures = [
        RecipientState("a@example.net", FAILED, reply=same, notify=True),
        RecipientState("b@example.net", FAILED, reply="550 5.1.1 No such user", notify=True),
        RecipientState("c@example.net", FAILED, reply=same, notify=True),
    ]
    _, data = build_notice(load(policy_file), entry, failures, 1_790_000_000.0)
    lines = quopri.decodestring(data.split(b"\r\n\r\n", 1)[1]).decode().splitlines()
    start = lines.index("Recipients: a@example.net")
    assert lines[start : start + 7] == [
        "Recipients: a@example.net",
        "            c@example.net",
        f"Reason:     {same}",
        "",
        "Recipient:  b@example.net",
        "Reason:     550 5.1.1 No such user",
        "",
    ]


def test_a_reason_naming_each_address_is_still_one_reason(policy_file: Path) -> None:
    """Postfix puts the address in every refusal: 50 alike gave 50 reasons."""
    failures = [
        RecipientState(
            f"u{n}@Dest.example",
            FAILED,
            reply=f"550 5.1.1 <u{n}@dest.example>: Recipient address rejected: User unknown",
            notify=True,
        )
        for n in range(3)
    ]
    _, data = build_notice(load(policy_file), make_entry(), failures, 1_790_000_000.0)
    lines = quopri.decodestring(data.split(b"\r\n\r\n", 1)[1]).decode().splitlines()
    start = lines.index("Recipients: u0@Dest.example")
    assert lines[start : start + 4] == [
        "Recipients: u0@Dest.example",
        "            u1@Dest.example",
        "            u2@Dest.example",
        "Reason:     550 5.1.1 <each recipient's address>: Recipient address rejected:"
        " User unknown",
    ]


@pytest.mark.parametrize(
    ("reply", "advice"),
    [
        ("550 5.1.1 No such user", "Please check the address"),
        ("552 5.2.2 Mailbox full", "A mailbox that is full or not taking mail"),
        (
            "not delivered within 5 days; last reply: 451 4.4.1 Connection timed out",
            "The receiving server could not be reached",
        ),
        (
            "the receiving server returned it after accepting it (5.7.1): 554 5.7.1 Client"
            " host [192.0.2.10] blocked using zen.spamhaus.org",
            "refused the mail by its own rules",
        ),
        ("550 Go away", "Please check the address"),  # no code: the usual cause
        ("550 5.7.1 sending IP 5.2.2.10 is on a block list", "refused the mail by its own rules"),
        ("554 Client host [2.4.1.9] blocked", "Please check the address"),  # an IP, no code
        ("returned it: Client host (5.2.2.10) blocked", "Please check the address"),
        ("552 5.2.2.10 is not allowed", "Please check the address"),
        ("552 5.2.2. Mailbox full", "A mailbox that is full or not taking mail"),
        ("554 5.7.1(blocked by policy)", "refused the mail by its own rules"),
        ("returned it: Sorry, no mailbox here by that name. (#5.1.1)", "Please check the address"),
        ("returned it: Message rejected as spam (#5.7.1)", "refused the mail by its own rules"),
        ("552 5.3.4 Message size exceeds fixed limit", "too large for the receiving system"),
        ("552 5.2.3 Message length exceeds limit", "too large for the receiving system"),
        (
            "not delivered within 5 days; last reply: 451 4.3.5 Server configuration error",
            "A mail system on the way could not take",
        ),
        (
            "not delivered within 5 days; last reply: 451 4.3.0 service shutting down",
            "A mail system on the way could not take",
        ),
        (
            "550 5.5.0 Requested action not taken: mailbox unavailable",
            "Please check the address",
        ),
        (
            "not delivered within 5 days; last reply: 451 4.3.5 no upstream 'default':"
            " the policy no longer has it; put 'default' back",
            "The mail platform could not pass",
        ),
        (
            "not delivered within 5 days; last reply: 451 4.3.2 Not sent yet: the relay"
            " was stopping",
            "The mail platform could not pass",
        ),
        ("550 5.4.1 Recipient address rejected: Access denied", "Please check the address"),
        ("550 5.4.4 Unable to route", "Please check the address"),
    ],
    ids=[
        *("address", "mailbox-full", "timed-out", "block-list", "no-code", "ip"),
        *("ip-no-code", "ip-in-brackets", "ip-after-code", "code-and-dot", "code-and-bracket"),
        *("qmail-address", "qmail-policy", "too-big", "too-big-for-mailbox"),
        *("configuration", "shutting-down", "mailbox-unavailable", "no-upstream"),
        *("relay-stopping", "microsoft-unknown-recipient", "no-route"),
    ],
)
def test_the_advice_fits_the_reason(policy_file: Path, reply: str, advice: str) -> None:
    """A spam filter's refusal of the platform's mail told the user to check a
    right address, and nobody to tell the administrator whose problem it is; so
    did a message too big, an upstream's own trouble (4.3.x), and the relay's
    own deferrals (no upstream, not sent yet) when the message expired on them."""
    failed = RecipientState("customer@example.net", FAILED, reply=reply, notify=True)
    _, data = build_notice(load(policy_file), make_entry(), [failed], 1_790_000_000.0)
    text = quopri.decodestring(data.split(b"\r\n\r\n", 1)[1]).decode()
    said = [line for line in text.splitlines() if advice in line]
    assert len(said) == 1, text
    others = ("Please check the address", "A mailbox that", "The receiving server could not")
    others += ("The receiving server refused", "The mail platform", "The document or")
    others += ("A mail system on the way", "The receiving server did not", "The address is")
    assert sum(line.startswith(others) for line in text.splitlines()) == 1, text


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.2.1 <customer@example.net>: Mailbox disabled, not accepting messages",
        "the receiving server returned it after accepting it (5.1.1): 550 5.1.1 gone",
    ],
)
def test_a_refusal_the_relay_suppresses_on_says_so(policy_file: Path, reply: str) -> None:
    """A 5.2.1's notice said "try again in a while" about an address the relay had
    just put on the suppression list: the user sent it again, and was told it was
    on the list."""
    policy = load(policy_file)
    assert policy.suppression is not None and "5.2.1" in policy.suppression.hard_bounce
    failed = RecipientState("customer@example.net", FAILED, reply=reply, notify=True)
    _, data = build_notice(policy, make_entry(), [failed], 1_790_000_000.0)
    text = " ".join(quopri.decodestring(data.split(b"\r\n\r\n", 1)[1]).decode().split())
    assert "the relay sends nothing more to it" in text
    assert "try again in a while" not in text


@pytest.mark.parametrize(
    ("last", "also"),
    [
        ("450 4.2.0 Greylisted, see https://postgrey.example", None),
        ("451 4.4.1 Connection timed out", None),
        ("452 4.3.1 Insufficient system storage", "A mail system on the way"),
    ],
    ids=["greylisted", "timed-out", "their-system"],
)
def test_an_expiry_says_the_document_was_not_taken_in_time(
    policy_file: Path, last: str, also: str | None
) -> None:
    """An expiry on a greylisting's 4.2.0 read as "a mailbox that is full": its
    last reply was a temporary one, said as the reason, and it ran out of time."""
    reply = f"not delivered within 5d; last reply: {last}"
    expired = RecipientState("customer@example.net", EXPIRED, reply=reply, notify=True)
    _, data = build_notice(load(policy_file), make_entry(), [expired], 1_790_000_000.0)
    text = " ".join(_body(data))
    assert "did not take the document in the time the relay keeps trying" in text
    assert "A mailbox that is full" not in text and "could not be reached" not in text
    assert "Please check the address" not in text
    assert ("A mail system on the way" in text) is (also is not None)


def test_a_recipient_suppressed_for_a_complaint_is_not_said_to_be_a_wrong_address(
    policy_file: Path,
) -> None:
    """The address of a recipient who reported the mail as spam is right: "check the
    address" sent the user looking for a mistake, and to reach them another way."""
    complained = Suppression("buyer@example.net", "acme", COMPLAINT, "2026-11-01T08:00:00.000Z")
    bounced = Suppression("gone@example.net", None, BOUNCE, "2026-11-01T08:00:00.000Z")
    forged = dataclasses.replace(bounced, detail="(its recipient reported mail as spam)")
    failures = [
        RecipientState(e.address, SUPPRESSED, notify=True, reply=f"not sent: {e.describe()}")
        for e in (complained, forged)
    ]
    policy = load(policy_file)
    text = " ".join(_body(build_notice(policy, make_entry(), failures[:1], 1.79e9)[1]))
    assert "The address is right: its recipient reported your company's mail as spam" in text
    assert "Please check the address" not in text and "the address works again" not in text
    text = " ".join(_body(build_notice(policy, make_entry(), failures[1:], 1.79e9)[1]))
    assert "Please check the address" in text and "The address is right" not in text


def _body(data: bytes) -> list[str]:
    return quopri.decodestring(data.split(b"\r\n\r\n", 1)[1]).decode().splitlines()


@pytest.mark.parametrize(
    ("date", "sent"),
    [("Mon, 23 Nov 2026 09:30:00 +0100", True), ("", False)],
    ids=["document-date", "none-known"],
)
def test_sent_is_the_documents_date_and_the_relays_time_is_said_as_such(
    policy_file: Path, date: str, sent: bool
) -> None:
    """The "Sent" line showed the document's Date at delivery, and in a notice
    from a bounce report (no Date on record) the time the relay took it, unsaid
    which."""
    entry = make_entry(date=date, arrival=1_790_000_000.0)
    failed = RecipientState("customer@example.net", FAILED, reply="550 5.1.1 gone", notify=True)
    _, data = build_notice(load(policy_file), entry, [failed], 1_790_000_100.0)
    lines = _body(data)
    assert ("Sent:       Mon, 23 Nov 2026 09:30:00 +0100" in lines) is sent
    assert sum(line.startswith("Sent:") for line in lines) == int(sent)
    assert "Received:   Mon, 21 Sep 2026 14:13:20 +0000, by the mail relay" in lines


def test_a_refusal_and_a_suppressed_recipient_say_each_advice_once(policy_file: Path) -> None:
    """A 5.1.1 the relay listed and a recipient suppressed before each said
    "check the address", the second time under the suppression paragraph."""
    failures = [
        RecipientState("gone@example.net", FAILED, reply="550 5.1.1 No such user", notify=True),
        RecipientState("listed@example.net", SUPPRESSED, reply="not sent: listed", notify=True),
    ]
    _, data = build_notice(load(policy_file), make_entry(), failures, 1_790_000_000.0)
    text = "\n".join(_body(data))
    for said in ("Please check the address", "ask your mail administrator to take it off"):
        assert text.count(said) == 1, text
    assert "the relay sends nothing more to it" in text
    assert "The relay sends nothing to an address on its suppression list" in text


def test_a_notice_from_the_audit_log_alone_names_the_document_by_its_recipients(
    policy_file: Path,
) -> None:
    """Without a subject on record the notice says so, and names the document by
    whom it went to and when, not by a subject someone else wrote."""
    failures = [
        RecipientState(f"u{n}@example.net", FAILED, reply="550 5.1.1 gone", notify=True)
        for n in range(3)
    ]
    entry = make_entry(subject="", date="", arrival=1_790_000_000.0)
    _, data = build_notice(load(policy_file), entry, failures, 1.8e9, subject_known=False)
    subject = message.read(data).get("Subject")
    assert (
        subject
        == "Undelivered: your document to u0@example.net and 2 more, sent 21 Sep 2026 14:13 UTC"
    )
    assert "Document:   (its subject was not recorded; the date and recipients name it)" in _body(
        data
    )
    _, data = build_notice(load(policy_file), entry, failures[:1], 1.8e9, subject_known=False)
    subject = message.read(data).get("Subject")
    assert subject == "Undelivered: your document to u0@example.net, sent 21 Sep 2026 14:13 UTC"


@pytest.mark.parametrize("cut", [-40, 10**9, 5, None])
def test_a_notice_whose_record_misplaces_its_signatures_is_sent_as_it_was_signed(
    policy_file: Path, cut: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-edited ``sign_again`` sent the message's last bytes alone, or
    nothing, or failed to sign at every try and never expired; such a notice
    now goes as ``relay bounce`` signed it. Where the record is right (None:
    as written), the signatures are made anew, not added to the old ones."""
    policy = load(policy_file)
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(policy, make_entry(), [failed], 1_790_000_000.0, sign_again=True)
    assert notice.sign_again
    entry = notice if cut is None else dataclasses.replace(notice, sign_again=cut)
    sent = signed_anew(policy, entry, data)
    if cut is not None:
        assert sent == data and "sent as relay bounce signed it" in caplog.text
        return
    assert sent.endswith(data[notice.sign_again :])
    assert sent.count(b"DKIM-Signature:") == data.count(b"DKIM-Signature:")
    assert "sent as relay bounce signed it" not in caplog.text


@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"])
@pytest.mark.parametrize(
    "other", [b"X-Other: 1\r\n", b"DKIM-Filter: OpenDKIM Filter v2.11.0 mx.example 4C2\r\n"]
)
def test_a_notice_whose_signatures_are_followed_by_another_field_is_sent_as_it_was(
    policy_file: Path, line_end: bytes, other: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the first field before ``sign_again`` was checked to be a signature:
    a field after it (a queue file edited by hand) was dropped with the old
    signatures and the notice sent without it. A bare LF ends a field as CR LF
    does: the relay reads messages written with either. A field whose name
    merely starts like a signature's (OpenDKIM's ``DKIM-Filter``) is another."""
    policy = load(policy_file)
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(policy, make_entry(), [failed], 1_790_000_000.0, sign_again=True)
    assert notice.sign_again
    signatures = data[: notice.sign_again - 2] + line_end
    edited = signatures + other + data[notice.sign_again :]
    entry = dataclasses.replace(notice, sign_again=len(signatures) + len(other))
    assert signed_anew(policy, entry, edited) == edited
    assert "sent as relay bounce signed it" in caplog.text


def test_a_notice_whose_record_cuts_a_signature_in_two_is_sent_as_it_was_signed(
    policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``sign_again`` that ends a folded signature's first line leaves its
    continuation lines to begin the message: signed anew, that message has no
    field for them to continue, and the notice could not be sent at all."""
    policy = load(policy_file)
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(policy, make_entry(), [failed], 1_790_000_000.0, sign_again=True)
    first_line = data.index(b"\r\n") + 2
    assert first_line < (notice.sign_again or 0) and data[first_line : first_line + 1] == b" "
    entry = dataclasses.replace(notice, sign_again=first_line)
    assert signed_anew(policy, entry, data) == data
    assert "sent as relay bounce signed it" in caplog.text


def test_mail_with_the_null_sender_gets_no_notice() -> None:
    """RFC 5321 4.5.5: a bounce or a notice passed through the relay (``MAIL
    FROM:<>``) is never answered with a notice, which could answer another's in
    turn; nor is a message none of whose recipients failed. The suppression list
    is not read for either."""
    looked: list[str] = []

    def find(address: str) -> Suppression | None:
        looked.append(address)
        return None

    assert telling("", "jan@acme.example", ["customer@example.net"], find) is None
    assert telling("erp@acme.example", "jan@acme.example", [], find) is None
    assert looked == []
    due = telling("erp@acme.example", "jan@acme.example", ["customer@example.net"], find)
    assert due == Telling("jan@acme.example", ("customer@example.net",), None)
    assert looked == ["jan@acme.example"]


def test_a_notice_says_it_is_automatic_and_is_signed(
    policy_file: Path, dns_records: dict[str, str]
) -> None:
    """Without ``Auto-Submitted`` an out-of-office reply answers the notice, and a
    mailbox that answers the relay's notice-sender is a loop (RFC 3834 5); a
    notice not signed fails DMARC for the platform's From."""
    entry = make_entry()
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(load(policy_file), entry, [failed], 1_790_000_000.0)
    view = message.read(data)
    assert view.get("Auto-Submitted") == "auto-generated"
    assert notice.mail_from == "" and notice.is_notice
    assert [(r.address, r.notify) for r in notice.recipients] == [(entry.notify_address, False)]
    assert dkimpy_verify(data, dns_records)


def test_a_notices_auto_submitted_is_signed(policy_file: Path, dns_records: dict[str, str]) -> None:
    """Unsigned, a hop could remove or change ``Auto-Submitted`` and the notice
    still verified, and an auto-responder would answer it."""
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    _, data = build_notice(load(policy_file), make_entry(), [failed], 1_790_000_000.0)
    signatures = [
        parse_tag_value(value)
        for name, value in dkim.DKIM(data).headers
        if name.lower() == b"dkim-signature"
    ]
    assert signatures
    for tags in signatures:
        names = [n.strip() for n in tags[b"h"].split(b":")]
        assert names.count(b"auto-submitted") == 2  # once, and once more to oversign
    assert dkimpy_verify(data, dns_records)
    field = b"\r\nAuto-Submitted: auto-generated\r\n"
    assert data.count(field) == 1
    changed = data.replace(field, b"\r\nAuto-Submitted: no\r\n")
    assert dkimpy_each(changed, dns_records) == [False] * len(signatures)
    removed = data.replace(field, b"\r\n")
    assert dkimpy_each(removed, dns_records) == [False] * len(signatures)


def test_a_notice_is_addressed_to_the_person_not_the_envelope_sender(policy_file: Path) -> None:
    """The ERP's envelope sender is a shared technical address nobody reads: the
    notice's To names the user who sent the document, as its envelope does."""
    entry = make_entry()
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(load(policy_file), entry, [failed], 1_790_000_000.0)
    assert entry.mail_from != entry.notify_address
    assert message.read(data).get("To") == "alice@acme.example"
    assert [r.address for r in notice.recipients] == ["alice@acme.example"]


def test_a_notice_goes_the_way_its_document_went(policy_file: Path) -> None:
    """A document queued before its tenant moved to the company's own account
    went through the platform's upstream, and its notice is written for that
    one (the platform's From, the null sender): sent the tenant's new way, the
    account refuses both and the user never hears of the failure."""
    policy = load(with_account(policy_file))
    entry = make_entry(tenant="sevenoff", user="per", upstream="default")
    entry.notify_address = "per@sevenoff.example"
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(policy, entry, [failed], 1_790_000_000.0)
    assert policy.tenants["sevenoff"].upstream == "company24"
    assert notice.upstream == "default"
    assert notice.mail_from == ""
    assert "noreply@platform.example" in (message.read(data).get("From") or "")
