"""A company's own SMTP account as its upstream: servers such as Microsoft 365
refuse every message that is not From, and enveloped as, the account's own
address (``550 5.7.60 Client does not have permissions to send as this sender``)."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from email.utils import parseaddr
from pathlib import Path

import pytest

from relay import message
from relay.errors import PolicyError
from relay.notice import build_notice
from relay.policy.load import load
from relay.spool import FAILED, RecipientState
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.spoolkit import make_entry
from tests.test_decisions import BASE, header, msg, run

ROOT = Path(__file__).parent.parent
DIRECTORY = "  default:\n    type: directory\n    path: outbox\n"
ACCOUNT = (
    "  company24:\n    type: smtp\n    host: {host}\n    port: {port}\n    tls: none\n"
    "    helo_name: relay.platform.example\n    timeout: 5\n"
    "    sender: post@sevenoff.example\n"
)
TENANT = """\
  sevenoff:
    name: Seven Office AS
    address: post@sevenoff.example
    upstream: company24
    reply_to:
      default: [sender, company]
    bcc_sender: [invoice]
    users:
      per:
        name: Per Persen
        address: per@sevenoff.example
"""


def with_account(
    policy_file: Path, extra: str = "", host: str = "127.0.0.1", port: int = 2526
) -> Path:
    """The test policy with tenant ``sevenoff`` sending through its own account."""
    text = policy_file.read_text()
    account = ACCOUNT.format(host=host, port=port) + extra
    text = text.replace(DIRECTORY, DIRECTORY + account) + TENANT
    policy_file.write_text(text)
    return policy_file


PER = ("From: Per <per@sevenoff.example>", *BASE[1:])


def test_an_account_in_a_domain_the_policy_has_a_key_for_is_signed_for_it(
    policy_file: Path,
) -> None:
    """Signed for the platform's domain only, the account's From never aligned
    with the signature for DMARC, though the policy held a key for its domain."""
    path = with_account(policy_file)
    path.write_text(path.read_text().replace("sender: post@sevenoff", "sender: post@globex"))
    p = run(path, msg(*PER), mail_from="per@sevenoff.example")
    assert header(p, "From") == "Per Persen via Seven Office AS <post@globex.example>"
    assert p.decision.signing_domain == "globex.example"
    assert [key.selector for key in p.decision.signing] == ["g1"]


def test_mail_through_an_account_is_from_and_enveloped_as_its_address(policy_file: Path) -> None:
    """It went out From the platform's noreply and MAIL FROM its bounce address,
    which the account's server refused for every message."""
    p = run(with_account(policy_file), msg(*PER), mail_from="per@sevenoff.example")
    d = p.decision
    assert d.upstream.name == "company24"
    assert header(p, "From") == "Per Persen via Seven Office AS <post@sevenoff.example>"
    assert d.mail_from == "post@sevenoff.example"
    assert header(p, "Reply-To") == "Per Persen <per@sevenoff.example>"  # as without it
    assert d.signing_domain == "platform.example"  # as without it
    assert any(
        r.startswith("From is post@sevenoff.example, the address upstream 'company24' sends as,")
        and "not noreply@platform.example" in r
        for r in d.reasons
    )
    assert "envelope sender is post@sevenoff.example, the address 'company24' sends as" in (
        d.reasons
    )


def test_the_account_wins_over_a_verified_domain_users_own_from(policy_file: Path) -> None:
    """The account can only send as itself; DKIM signs as before, for the user's domain."""
    policy = with_account(policy_file, extra='    sender_name: "{user.name} ({tenant.name})"\n')
    text = policy.read_text().replace(
        "upstream: default\n    verified_domains", "upstream: company24\n    verified_domains"
    )
    policy.write_text(text)
    data = msg("From: Hank <hank@globex.example>", *BASE[1:])
    p = run(policy, data, login="erp-globex", mail_from="hank@globex.example")
    assert header(p, "From") == '"Hank Scorpio (Globex GmbH)" <post@sevenoff.example>'
    assert p.decision.mail_from == "post@sevenoff.example"
    assert p.decision.signing_domain == "globex.example"
    assert [k.domain for k in p.decision.signing] == ["globex.example"]
    assert header(p, "Reply-To") == "Globex GmbH <info@globex.example>"


def test_an_empty_envelope_sender_stays_empty_through_an_account(policy_file: Path) -> None:
    """RFC 5321 4.5.5 as for any upstream: no notice can follow such a message."""
    p = run(with_account(policy_file), msg(*PER), mail_from="")
    assert p.decision.mail_from == ""
    assert header(p, "From") == "Per Persen via Seven Office AS <post@sevenoff.example>"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (
            "    sender: post at sevenoff\n",
            "sender: 'post at sevenoff' is not an address like name@example.com",
        ),
        (
            '    sender: post@sevenoff.example\n    sender_name: "{user.nam}"\n',
            "sender_name: unknown placeholder {user.nam} (did you mean 'user.name'?);"
            " use {user.name}, {user.address}, {tenant.name}",
        ),
    ],
)
def test_an_account_sender_is_checked(policy_file: Path, extra: str, problem: str) -> None:
    policy = with_account(policy_file)
    policy.write_text(policy.read_text().replace("    sender: post@sevenoff.example\n", extra))
    with pytest.raises(PolicyError) as caught:
        load(policy)
    assert [p.split(": ", 1)[1] for p in caught.value.problems] == [
        f"upstreams.company24.{problem}"
    ]


def test_a_sender_name_needs_a_sender(policy_file: Path) -> None:
    policy = with_account(policy_file)
    text = policy.read_text().replace(
        "    sender: post@sevenoff.example\n", '    sender_name: "{tenant.name}"\n'
    )
    policy.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load(policy)
    (problem,) = caught.value.problems
    assert problem.endswith(
        "upstreams.company24.sender_name: a sender_name needs a sender:"
        " the address the account sends as"
    )


@pytest.mark.parametrize("upstream", ["company24", "renamed-since"])
def test_a_notice_through_an_account_is_from_and_enveloped_as_its_address(
    policy_file: Path, upstream: str
) -> None:
    """It went through the account From noreply@platform.example and MAIL FROM:<>,
    both refused. An entry whose upstream is gone goes its tenant's way."""
    policy = load(with_account(policy_file))
    entry = make_entry(tenant="sevenoff", user="per", upstream=upstream)
    entry.notify_address = "per@sevenoff.example"
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(policy, entry, [failed], 1_790_000_000.0)
    assert parseaddr(message.read(data).get("From") or "") == (
        "Mail relay for Seven Office AS",
        "post@sevenoff.example",
    )
    assert notice.mail_from == "post@sevenoff.example"
    assert [r.notify for r in notice.recipients] == [False]  # its failure tells nobody


def test_a_notice_from_an_account_with_a_key_is_signed_for_its_domain(
    policy_file: Path,
) -> None:
    """The notice went out From the account but signed for the platform's domain,
    which fails DMARC alignment where the document itself passed."""
    path = with_account(policy_file)
    path.write_text(path.read_text().replace("sender: post@sevenoff", "sender: post@globex"))
    entry = make_entry(tenant="sevenoff", user="per", upstream="company24")
    entry.notify_address = "per@sevenoff.example"
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    _, data = build_notice(load(path), entry, [failed], 1_790_000_000.0)
    signature = message.read(data).get("DKIM-Signature") or ""
    assert " d=globex.example;" in signature and " s=g1;" in signature, signature


def test_a_notice_through_another_upstream_keeps_the_null_sender(policy_file: Path) -> None:
    entry = make_entry()
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    notice, data = build_notice(load(with_account(policy_file)), entry, [failed], 1_790_000_000.0)
    assert notice.mail_from == ""
    assert "noreply@platform.example" in (message.read(data).get("From") or "")


def test_an_account_end_to_end_with_its_notice(policy_file: Path, tmp_path: Path) -> None:
    """The account's server sees its own address in MAIL FROM and From, for the
    document and for the notice about its refused recipient."""
    with SinkServer(Sink(refuse={"bad@example.org": "550 5.1.1 No such user"})) as sink:
        port = free_port()
        policy = with_account(policy_file, port=sink.port)
        policy.write_text(policy.read_text().replace("port: 2525", f"port: {port}"))
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("per@sevenoff.example")
                client.rcpt("one@example.org")
                client.rcpt("bad@example.org")
                code, reply = client.data(msg(*PER))
            assert code == 250, reply
            sent, notice = sink.sink.wait(2)
            wait_for(lambda: "failure notice" in relay.log())
    assert sent.mail_from == "post@sevenoff.example"
    assert parseaddr(message.read(sent.data).get("From") or "") == (
        "Per Persen via Seven Office AS",
        "post@sevenoff.example",
    )
    assert notice.mail_from == "post@sevenoff.example"
    assert notice.rcpt_tos == ["per@sevenoff.example"]
    assert parseaddr(message.read(notice.data).get("From") or "") == (
        "Mail relay for Seven Office AS",
        "post@sevenoff.example",
    )


def test_preview_says_the_account_sets_from_and_envelope(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(msg(*PER))
    policy = with_account(policy_file)
    done = subprocess.run(
        [sys.executable, "-m", "relay", "preview", "-c", str(policy), str(eml)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Envelope:    MAIL FROM <post@sevenoff.example>" in done.stdout
    assert "  - From is post@sevenoff.example, the address upstream 'company24'" in done.stdout
