"""The Received field as the relay writes it for what a client may send in its
greeting and whatever address it comes from; the field as sent through a real
relay is in test_e2e."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import headers, message, trace
from relay.submission import Submission
from tests.test_decisions import BASE, NOW, msg, run


def _received(helo: str = "erp.acme.example", client: str = "127.0.0.1") -> str:
    sub = Submission("local", client, None, "erp@erp.acme.example", ("a@example.org",), b"", helo)
    field = trace.received(sub, "relay.platform.example", "0123456789BCDFGH", NOW)
    return " ".join(field.decode().split())


def test_a_greeting_longer_than_a_domain_is_cut_to_a_domains_length() -> None:
    """An EHLO of 400 characters went into the field whole: RFC 5321 4.1.2
    holds a domain to 255, and receivers that parse the field stop there."""
    value = _received("a" * 400 + ".example")
    helo = value.split()[2]
    assert helo == "a" * 255


@pytest.mark.parametrize(("helo", "written"), [("", "unknown"), ("<>", "--"), ("erp x", "erp-x")])
def test_a_greeting_that_is_no_name_is_written_as_a_word(helo: str, written: str) -> None:
    assert _received(helo).startswith(f"Received: from {written} (")


@pytest.mark.parametrize(
    ("client", "literal"),
    [
        ("192.0.2.1", "[192.0.2.1]"),
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),  # a zone is no part of a literal
        ("unix-socket", "unknown"),
    ],
)
def test_the_client_address_is_an_address_literal(client: str, literal: str) -> None:
    """RFC 5321 4.1.3: an IPv4 literal bare, an IPv6 one tagged ``IPv6:``."""
    assert f" ({literal}) by relay.platform.example " in _received(client=client)


def test_the_field_takes_the_messages_own_line_ending(policy_file: Path) -> None:
    """A message written with LF alone (an .eml file a Unix ERP saved, shown by
    ``relay preview``) got a Received field ending in CR LF: two line endings
    in one header, which a reader may take for the header's end."""
    data = msg(*BASE).replace(b"\r\n", b"\n")
    p = run(policy_file, data)
    assert b"\r" not in p.trace + p.rewritten
    assert p.trace.endswith(b"; Mon, 23 Nov 2026 09:30:00 +0000\n")
    assert message.read(p.message).get("Subject") == "Hello"


def test_the_field_goes_after_the_signature_in_the_queued_copy_too(policy_file: Path) -> None:
    """The spool is written from ``chunks``, a delivery held warm from
    ``message``: with the two apart, one sent after a retry or a restart has
    the Received field above the DKIM-Signature, unlike one sent at once."""
    p = run(policy_file, msg(*BASE))
    assert b"".join(p.chunks) == p.message
    names = [f.name for f in headers.split(p.chunks[0])[0]]
    assert names[-1] == "Received" and set(names[:-1]) == {"DKIM-Signature"}
