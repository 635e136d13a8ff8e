"""Which From a message keeps: a user with a sender address per brand, each in
a verified domain with its own DKIM key (as Planfix sends per brand)."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import dkim
import pytest

from relay.keygen import generate
from relay.policy.model import DkimAlgorithm
from tests.dkimtools import dkimpy_each, make_key
from tests.test_decisions import BASE, header, msg, run

KEYS = """\
    - domain: {domain}
      selector: b1
      algorithm: ed25519
      key_file: keys/{domain}.b1.private
"""
TENANT = """\
  planfix:
    name: Planfix Ltd
    address: office@planfix.example
    upstream: default
    verified_domains: [planfix.example, brandb.example]
    users:
      anna:
        name: Anna Sales
        address: anna@planfix.example
        aliases: [sales@planfix.example, anna@brandb.example, sales@brandb.example]
"""
DOMAINS = ("planfix.example", "brandb.example")


def brands(policy_file: Path) -> Path:
    for domain in DOMAINS:
        generate(domain, "b1", DkimAlgorithm.ED25519, policy_file.parent / "keys")
    keys = "".join(KEYS.format(domain=domain) for domain in DOMAINS)
    text = policy_file.read_text().replace("dkim:\n  keys:\n", "dkim:\n  keys:\n" + keys)
    policy_file.write_text(text + TENANT)
    return policy_file


def test_a_brand_address_of_the_user_stays_the_from(policy_file: Path) -> None:
    """It went out From anna@planfix.example, Reply-To that too, signed for planfix."""
    data = msg("From: Sales Brand B <sales@brandb.example>", *BASE[1:])
    p = run(brands(policy_file), data, mail_from="sales@brandb.example")
    assert header(p, "From") == "Sales Brand B <sales@brandb.example>"
    assert header(p, "Reply-To") == "Sales Brand B <sales@brandb.example>"
    assert p.decision.signing_domain == "brandb.example"
    assert [k.domain for k in p.decision.signing] == ["brandb.example"]
    assert (
        "From is the user's address sales@brandb.example as the message has it:"
        " brandb.example is a verified domain of 'planfix'"
    ) in p.decision.reasons


def test_a_brand_name_written_with_an_unquoted_comma_is_kept_whole(policy_file: Path) -> None:
    """``Lastname, Firstname`` as ERPs write it: the From went out with the name
    after the comma alone, and the Reply-To taken from it too."""
    data = msg("From: Sales, Brand B <sales@brandb.example>", *BASE[1:])
    p = run(brands(policy_file), data, mail_from="sales@brandb.example")
    assert header(p, "From") == '"Sales, Brand B" <sales@brandb.example>'
    assert header(p, "Reply-To") == '"Sales, Brand B" <sales@brandb.example>'


def test_a_brand_address_without_a_name_gets_the_users(policy_file: Path) -> None:
    data = msg("From: SALES@brandb.example", *BASE[1:])
    p = run(brands(policy_file), data, mail_from="anna@planfix.example")
    assert header(p, "From") == "Anna Sales <SALES@brandb.example>"
    assert p.decision.signing_domain == "brandb.example"


def test_the_main_address_keeps_the_users_name(policy_file: Path) -> None:
    data = msg("From: Planfix <anna@planfix.example>", *BASE[1:])
    p = run(brands(policy_file), data)
    assert header(p, "From") == "Anna Sales <anna@planfix.example>"
    assert header(p, "Reply-To") == "Anna Sales <anna@planfix.example>"


def test_another_users_address_in_from_is_not_kept(policy_file: Path) -> None:
    """The user is found by the envelope; a From that is not theirs gives way to theirs."""
    text = TENANT + (
        "      bob:\n        name: Bob\n        address: bob@planfix.example\n"
        "        aliases: [info@brandb.example]\n"
    )
    policy = brands(policy_file)
    policy.write_text(policy.read_text().replace(TENANT, text))
    data = msg("From: Info <info@brandb.example>", *BASE[1:])
    p = run(policy, data, mail_from="anna@planfix.example")
    assert header(p, "From") == "Anna Sales <anna@planfix.example>"
    assert p.decision.signing_domain == "planfix.example"


def test_a_brand_address_with_its_domain_in_unicode_stays_the_from(policy_file: Path) -> None:
    """Identified as the user's, it was still replaced by the user's main address:
    the verified domain and the alias are held as A-labels, the From had the
    Unicode spelling. It stays, in the A-label form SMTP carries."""
    path = brands(policy_file)
    text = path.read_text().replace(
        "[planfix.example, brandb.example]",
        "[planfix.example, brandb.example, xn--bcher-kva.example]",
    )
    path.write_text(
        text.replace("sales@brandb.example]", "sales@brandb.example, shop@xn--bcher-kva.example]")
    )
    p = run(
        path, msg("From: Shop <shop@bücher.example>", *BASE[1:]), mail_from="anna@planfix.example"
    )
    assert header(p, "From") == "Shop <shop@xn--bcher-kva.example>"
    assert p.decision.signing_domain == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "written",
    [
        "=?utf-8?q?Anna_S=C3=B8rensen?= <anna@planfix.example>",
        '"Anna Sørensen" <anna@planfix.example>',
        "Anna Sørensen <anna@planfix.example>",
    ],
    ids=["encoded-word", "quoted", "raw-utf-8"],
)
def test_a_from_that_already_says_the_users_name_and_address_is_kept_byte_for_byte(
    policy_file: Path, tmp_path: Path, written: str
) -> None:
    """Written again (re-encoded, unquoted), it broke the signature of an ERP
    that signs its own mail, for a From that meant the same: with no key of the
    relay's for the domain, the message then failed DMARC."""
    policy = brands(policy_file)
    policy.write_text(policy.read_text().replace("name: Anna Sales", "name: Anna Sørensen"))
    key, records = make_key(tmp_path / "erp", "planfix.example", "erp")
    data = msg(f"From: {written}", *BASE[1:])
    signed = dkim.sign(data, b"erp", b"planfix.example", key.private_key, include_headers=[b"from"])
    p = run(policy, signed + data, mail_from="anna@planfix.example")
    assert f"\r\nFrom: {written}\r\n".encode() in p.message
    assert dkimpy_each(p.message, records)[-1], "the ERP's own signature"
    assert "From kept as the message wrote it" in " ".join(p.decision.reasons)


@pytest.mark.parametrize(
    ("written", "address", "name"),
    [
        (b"Anna S\xf8rensen <anna@planfix.example>", "anna@planfix.example", "Anna Sørensen"),
        (b"Verkauf B\xfccher <sales@brandb.example>", "sales@brandb.example", "Verkauf Bücher"),
    ],
    ids=["users-own", "brand-alias"],
)
def test_a_from_in_latin1_bytes_is_written_again_encoded(
    policy_file: Path, written: bytes, address: str, name: str
) -> None:
    """Read as Windows-1252, the name was the user's, and the From went out
    byte for byte: receivers read the bytes as UTF-8 and showed mojibake."""
    policy = brands(policy_file)
    policy.write_text(policy.read_text().replace("name: Anna Sales", "name: Anna Sørensen"))
    p = run(
        policy, b"From: " + written + b"\r\n" + msg(*BASE[1:]), mail_from="anna@planfix.example"
    )
    head = p.message.split(b"\r\n\r\n", 1)[0]
    assert written not in head and head.isascii()
    parsed = email.message_from_bytes(p.message, policy=email.policy.default)
    assert str(parsed["From"]) == f"{name} <{address}>"
    assert not parsed["From"].defects
    assert "From kept as the message wrote it" not in " ".join(p.decision.reasons)


def test_a_from_with_another_name_is_written_as_the_policy_has_it(policy_file: Path) -> None:
    data = msg("From: A. Sales <anna@planfix.example>", *BASE[1:])
    p = run(brands(policy_file), data, mail_from="anna@planfix.example")
    assert header(p, "From") == "Anna Sales <anna@planfix.example>"


@pytest.mark.parametrize(
    "written",
    [
        "Anna Sales <anna@planfix.example> <ceo@evil.example>",
        "Anna Sales <anna@planfix.example> ceo@evil.example",
        "Anna Sales <anna@planfix.example",
        "Team: Anna Sales <anna@planfix.example>;",
        "Team: Anna Sales <anna@planfix.example>",
        "Anna Sales <anna@planfix.example (x>",
        "Anna Sales <ceo@evil.example:anna@planfix.example>",
        "Anna Sales <@evil.example:anna@planfix.example>",
        "Anna Sales (CEO) <anna@planfix.example>",
        "=?utf-8*<ceo@evil.example>,?q??=Anna Sales <anna@planfix.example>",
        "Anna Sales <anna@planfix.example> =?us-ascii?q??=",
        "Anna Sales <anna@planfix.example>\u00a0",
        "Anna Sales <anna@planfix.example>\x1f",
        "Anna\x1fSales <anna@planfix.example>",
        "Anna Sales\u3000<anna@planfix.example>",
    ],
)
def test_a_from_with_more_than_the_users_mailbox_is_written_again(
    policy_file: Path, written: str
) -> None:
    """Read as the user's name and address (a reader takes the first <...>),
    such a From went out byte for byte, signed, naming another address or
    malformed for receivers that refuse it."""
    data = msg(f"From: {written}", *BASE[1:])
    p = run(brands(policy_file), data, mail_from="anna@planfix.example")
    assert header(p, "From") == "Anna Sales <anna@planfix.example>"
