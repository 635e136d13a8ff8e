"""``relay preview`` and non-ASCII envelope addresses: the SMTP side offers no
SMTPUTF8 and refuses them with 501 5.6.7, so preview must too, whether the
address was given or taken from the message's From, To or Cc."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.ingress_harness import Raw, Relay
from tests.minimal_policy import listener
from tests.test_cli import relay

HEAD = "Subject: Faktura 4711\nX-ERP-User: kari\n"
KARI = "From: Kari <kari@acme.example>\n"
CUSTOMER = "To: customer@example.org\n"
SHOP = r"501 5.6.7 Non-ASCII address <shop@b\xc3\xbccher.example>: SMTPUTF8 is not offered"
KUNDE = r"501 5.6.7 Non-ASCII address <kunde@b\xc3\xbccher.example>: SMTPUTF8 is not offered"
JORN = r"501 5.6.7 Non-ASCII address <j\xc3\xb8rn@acme.example>: SMTPUTF8 is not offered"


def preview(
    policy_file: Path, tmp_path: Path, header: str, *options: str
) -> subprocess.CompletedProcess[str]:
    eml = tmp_path / "message.eml"
    eml.write_bytes((header + HEAD + "\nHei!\n").encode())
    return relay("preview", "-c", str(policy_file), str(eml), *options)


def refused(done: subprocess.CompletedProcess[str], reply: str) -> None:
    assert done.returncode == 65, done.stdout
    assert done.stderr == f"relay preview: the relay would refuse this message: {reply}\n"
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("header", "reply"),
    [
        ("From: Shop <shop@bücher.example>\n" + CUSTOMER, SHOP),
        ("From: Jørn <jørn@acme.example>\n" + CUSTOMER, JORN),
        (KARI + "To: Kunde <kunde@bücher.example>, plain@example.org\n", KUNDE),
        (KARI + CUSTOMER + "Cc: kunde@bücher.example\n", KUNDE),
        # MAIL is refused before any RCPT is sent
        ("From: shop@bücher.example\nTo: kunde@bücher.example\n", SHOP),
    ],
    ids=["from-domain", "from-local-part", "to", "cc", "sender-first"],
)
def test_an_address_taken_from_the_message_is_refused_as_over_smtp(
    policy_file: Path, tmp_path: Path, header: str, reply: str
) -> None:
    """The From went in as ``MAIL FROM <>`` and a To as no recipient at all, and
    the preview passed a message whose transaction the relay would refuse."""
    refused(preview(policy_file, tmp_path, header), reply)


@pytest.mark.parametrize(
    ("option", "reply"),
    [
        (["--rcpt", "kunde@bücher.example"], KUNDE),
        (["--rcpt", "customer@example.org", "--rcpt", "jørn@acme.example"], JORN),
        (["--mail-from", "shop@bücher.example"], SHOP),
        (["--mail-from", "jørn@acme.example"], JORN),
    ],
    ids=["rcpt-domain", "rcpt-local-part", "sender-domain", "sender-local-part"],
)
def test_a_given_address_is_refused_with_the_smtp_sides_reply(
    policy_file: Path, tmp_path: Path, option: list[str], reply: str
) -> None:
    """It was refused, but as ``553 5.1.3 Bad address syntax``: not what the
    ERP's developer would see in the relay's log or the ERP's."""
    refused(preview(policy_file, tmp_path, KARI + CUSTOMER, *option), reply)


def test_the_reply_is_the_one_the_smtp_side_gives(policy_file: Path, tmp_path: Path) -> None:
    """The two replies are made by one piece of code; this holds them together
    should either side change."""
    sender, recipient = "ålesund@bücher.example", "o'brien@bø.example"
    with Relay([listener()]) as running, Raw(running.port) as raw:
        raw.ehlo()
        to_mail = raw.cmd(f"MAIL FROM:<{sender}>".encode())
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        to_rcpt = raw.cmd(f"RCPT TO:<{recipient}>".encode())
    assert to_mail.startswith("501 ") and to_rcpt.startswith("501 ")
    refused(preview(policy_file, tmp_path, f"From: {sender}\n" + CUSTOMER), to_mail)
    refused(preview(policy_file, tmp_path, KARI + f"To: {recipient}\n"), to_rcpt)
    refused(preview(policy_file, tmp_path, KARI + CUSTOMER, "--rcpt", recipient), to_rcpt)


def test_ascii_and_a_label_addresses_still_pass(policy_file: Path, tmp_path: Path) -> None:
    header = KARI + "To: Kunde <kunde@xn--bcher-kva.example>, plain@example.org\n"
    done = preview(policy_file, tmp_path, header, "--json")
    assert done.returncode == 0, done.stderr
    envelope = json.loads(done.stdout)["envelope"]
    assert envelope["recipients"][:2] == ["kunde@xn--bcher-kva.example", "plain@example.org"]
    done = preview(policy_file, tmp_path, KARI, "--rcpt", "kunde@xn--bcher-kva.example")
    assert done.returncode == 0, done.stderr


def test_what_names_no_mailbox_is_still_left_out(policy_file: Path, tmp_path: Path) -> None:
    """Only an address an ERP could send to becomes a recipient: a non-ASCII one
    with no host after the ``@`` is no more one than an ASCII one."""
    header = KARI + CUSTOMER + "Cc: Jørn <jørn@>, undisclosed-recipients:;\n"
    done = preview(policy_file, tmp_path, header, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["envelope"]["recipients"][0] == "customer@example.org"


def test_the_from_line_shows_a_non_ascii_name_as_it_reads(
    policy_file: Path, tmp_path: Path
) -> None:
    """Its Why lines gave "Kåre Ødegård via Acme AS"; the From line gave the
    encoded words the header carries. The JSON keeps the header as sent."""
    done = preview(policy_file, tmp_path, KARI + CUSTOMER)
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("From:        ")]
    assert line == (
        "From:        Kari <kari@acme.example>  ->"
        "  Kåre Ødegård via Acme AS <noreply@platform.example>"
    )
    done = preview(policy_file, tmp_path, KARI + CUSTOMER, "--json")
    after = json.loads(done.stdout)["from"]["after"]
    assert after.startswith("=?utf-8?") and after.endswith(" <noreply@platform.example>")


def test_the_reply_to_reason_shows_a_non_ascii_name_as_it_reads(
    policy_file: Path, tmp_path: Path
) -> None:
    """The From's reason named "Kåre Ødegård", the Reply-To's the encoded words
    the header carries, in the preview and in the audit log's reasons alike."""
    done = preview(policy_file, tmp_path, KARI + CUSTOMER, "--json")
    reasons = json.loads(done.stdout)["reasons"]
    assert (
        "Reply-To from sender: Kåre Ødegård <kari@acme.example>"
        " (before it: header X-Responsible is missing)"
    ) in reasons
    assert not [r for r in reasons if "=?utf-8?" in r]


def test_the_reply_to_reason_escapes_what_a_reader_cannot_see(
    policy_file: Path, tmp_path: Path
) -> None:
    """Decoded, a name's controls and invisible marks went into the reasons as
    they were: the preview showed them raw, the audit log stored them so."""
    name = "=?utf-8?q?Eva=1B[31m=C2=85=E2=80=A8=E2=80=8E=E2=81=A0=09=C2=AD=F3=A0=81=81Ek?="
    header = KARI + CUSTOMER + f"X-Responsible: {name} <eva@acme.example>\n"
    done = preview(policy_file, tmp_path, header, "--json")
    (reason,) = [r for r in json.loads(done.stdout)["reasons"] if r.startswith("Reply-To")]
    assert reason == (
        r"Reply-To from header X-Responsible: Eva\x1b[31m\x85\u2028\u200e\u2060\x09\xad"
        r"\U000e0041Ek"
        " <eva@acme.example>"
    )


def test_a_name_holding_a_line_end_or_a_bidi_override_stays_on_its_line(
    policy_file: Path, tmp_path: Path
) -> None:
    """Decoded, ``=0A`` in a name began a line of its own in the preview (a
    made-up ``Upstream:`` line), and U+202E turned the line round."""
    name = "=?utf-8?q?Kari=0AUpstream:_fake=E2=80=AE?="
    done = preview(policy_file, tmp_path, f"From: {name} <kari@acme.example>\n" + CUSTOMER)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    (line,) = [x for x in lines if x.startswith("From:        ")]
    # quoted for its colon, as one mailbox
    assert line.startswith(r'From:        "Kari\x0aUpstream: fake\u202e" <kari@acme.example>  ->')
    (upstream,) = [x for x in lines if x.startswith("Upstream:")]
    assert upstream.startswith("Upstream:    default (directory ")
