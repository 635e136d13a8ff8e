"""Header fields that are there but say nothing: an empty Reply-To the tenant
keeps, an empty To or Cc, and a line of only white space in a field (RFC
5322's obsolete folding); and a To not there at all. Through a real relay to
a sink, as an ERP sends them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dkim
import pytest

from relay import headers, message
from relay.rewrite import HeaderEdits, apply
from tests.dkimtools import assert_opendkim_ok, dkimpy_each, dkimpy_verify
from tests.relayproc import RelayProcess
from tests.sink import SinkServer
from tests.test_decide_reply_to import NO_SUBJECT, preview
from tests.test_decisions import BASE, BODY, msg, run
from tests.test_queue_e2e import relay_cli, send

QUOTE = (*NO_SUBJECT, "Subject: Quote 5")  # the tenant keeps a quote's Reply-To
REMOVED = "Reply-To not kept: the message's is empty, which RFC 5322 3.6.2 does not allow: removed"
# a line of only white space, then fields a reader that ends the header there misses
OBSOLETE_FOLD = (
    b"From: Jan <jan@acme.example>\r\n"
    b"To: one@example.org\r\n"
    b"Subject: hello\r\n \r\n"
    b"Bcc: hidden@example.org\r\n"
    b"X-Note: one\r\n\t\r\n  \r\n two\r\n"
    b"\r\n" + BODY
)
LEFT_OUT = (
    "a line of only white space in Subject, X-Note left out: obsolete folding"
    " (RFC 5322 4.2) that some readers take for the end of the header"
)


def without_the_relays_key(policy_file: Path, domain: str = "globex.example") -> None:
    """The relay has no key for ``domain``: the ERP's own signature is then the
    only one DMARC could pass on for a From the relay keeps."""
    text = policy_file.read_text()
    start = text.index(f"    - domain: {domain}\n")
    end = text.index("\n", text.index("key_file:", start)) + 1
    policy_file.write_text(text[:start] + text[end:])


def erp_signed(
    data: bytes,
    key_dir: tuple[Path, dict[str, str]],
    key: str,
    headers: list[bytes],
    canon: bytes = b"relaxed",
) -> bytes:
    """``data`` with the ERP's own signature, made with the test key ``key``
    (``domain.selector``), ``c=canon/relaxed``, over ``headers``."""
    domain, _, selector = key.rpartition(".")
    private = (key_dir[0] / f"{key}.private").read_bytes()
    signature = dkim.sign(
        data,
        selector.encode(),
        domain.encode(),
        private,
        canonicalize=(canon, b"relaxed"),
        include_headers=headers,
    )
    return signature + data


def _queued(policy: Path, queue_id: str) -> dict:
    done = relay_cli(policy, "audit", "search", "--queue-id", queue_id, "--format", "json")
    assert done.returncode == 0, done.stderr
    (record,) = [r for r in map(json.loads, done.stdout.splitlines()) if r["event"] == "received"]
    return record


def _head(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


@pytest.mark.parametrize(
    "empty", ["Reply-To:", "Reply-To: \t", "Reply-To:\r\n ", "Reply-To:\r\nReply-To: "]
)
def test_an_empty_reply_to_the_tenant_keeps_is_removed(
    relay_to_sink: tuple[RelayProcess, SinkServer],
    dns_records: dict[str, str],
    tmp_path: Path,
    empty: str,
) -> None:
    """It went upstream as it came, under the relay's signature, though RFC
    5322 wants an address in it: a client may answer it to nobody."""
    proc, sink = relay_to_sink
    queue_id = send(proc.port, msg(*QUOTE, empty), ("one@example.org",))
    (got,) = sink.sink.wait(1)
    assert message.read(got.data).get_all("Reply-To") == ()
    assert "reply-to" not in [f.name.lower() for f in headers.split(got.data)[0]]
    assert got.data.endswith(b"\r\n\r\n" + BODY)
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    record = _queued(proc.policy, queue_id)
    assert record["reply_to_after"] == ""
    assert REMOVED in record["reasons"]
    shown = relay_cli(proc.policy, "audit", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"\n    Reply-To +-> \(removed\)\n", shown.stdout), shown.stdout


def test_preview_says_an_empty_reply_to_is_removed(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "quote.eml"
    eml.write_bytes(msg(*QUOTE, "Reply-To: "))
    out = preview(policy_file, eml)
    assert f"  - {REMOVED}\n" in out
    assert "\nReply-To:      ->  -\n" in out
    assert "\nRemoved:     Reply-To\n" in out


def test_a_reply_to_with_an_address_is_still_kept(policy_file: Path) -> None:
    p = run(policy_file, msg(*QUOTE, "Reply-To: desk@acme.example"))
    assert message.read(p.message).get_all("Reply-To") == ("desk@acme.example",)
    assert "Reply-To kept as the message has it" in p.decision.reasons


def test_an_empty_reply_to_no_source_replaces_is_removed(policy_file: Path) -> None:
    """A chain of headers the message lacks left the empty one "as it was"."""
    text = policy_file.read_text().replace("quote: [keep]", 'quote: ["header:X-Partner"]')
    policy_file.write_text(text)
    p = run(policy_file, msg(*QUOTE, "Reply-To:"))
    assert message.read(p.message).get_all("Reply-To") == ()
    assert (
        "no Reply-To source gave an address, and the message's is empty, which RFC 5322"
        " 3.6.2 does not allow: removed (before it: header X-Partner is missing)"
    ) in p.decision.reasons


def test_a_line_of_only_white_space_in_the_header_is_left_out(
    relay_to_sink: tuple[RelayProcess, SinkServer], dns_records: dict[str, str], tmp_path: Path
) -> None:
    """It went upstream as it came: a reader that takes it for the end of the
    header (obsolete syntax) read the relay's Date, Message-ID and Reply-To,
    and the From, as body text."""
    proc, sink = relay_to_sink
    queue_id = send(proc.port, OBSOLETE_FOLD, ("one@example.org", "hidden@example.org"))
    (got,) = sink.sink.wait(1)
    head = _head(got.data)
    assert re.search(rb"\n[ \t]*\r\n", head) is None
    assert b"Subject: hello\r\nX-Note: one\r\n two\r\n" in head
    assert b"hidden@example.org" not in head
    assert got.data.endswith(b"\r\n\r\n" + BODY)  # the body byte for byte
    view = message.read(got.data)
    for name in ("From", "Date", "Message-ID", "Reply-To"):
        assert view.get(name), name
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    assert LEFT_OUT in _queued(proc.policy, queue_id)["reasons"]


def test_preview_says_a_line_of_only_white_space_is_left_out(
    policy_file: Path, tmp_path: Path
) -> None:
    eml = tmp_path / "odd.eml"
    eml.write_bytes(OBSOLETE_FOLD)
    out = preview(policy_file, eml)
    assert f"  - {LEFT_OUT}\n" in out
    assert "Subject: hello\nX-Note: one\n two\n" in out


@pytest.mark.parametrize(("canon", "survives"), [(b"relaxed", True), (b"simple", False)])
def test_an_erps_own_relaxed_signature_survives_the_line_left_out(
    key_dir: tuple[Path, dict[str, str]], canon: bytes, survives: bool
) -> None:
    """Why the line is left out rather than the message refused: relaxed
    canonicalisation reads the field the same either way."""
    signed = erp_signed(
        OBSOLETE_FOLD, key_dir, "platform.example.s1", [b"from", b"subject", b"x-note"], canon
    )
    fields, _ = headers.split(signed)
    assert any(headers.has_blank_line(field) for field in fields)
    sent = apply(signed, HeaderEdits(drop_blank_lines=True))
    assert sent != signed
    assert dkimpy_verify(sent, key_dir[1]) is survives


NO_TO = [f for f in BASE if not f.startswith("To")]
EMPTY_CC = "Cc is empty, which RFC 5322 3.6.3 does not allow: removed"
EMPTY_TO = "To is empty, which RFC 5322 3.6.3 does not allow: set to undisclosed-recipients:;"


@pytest.mark.parametrize(
    ("to", "cc"),
    [("To:", "Cc:"), ("To: \t", "Cc:\r\n "), ("To:\r\nTo: ", "Cc: \r\nCc:")],
)
def test_an_empty_to_or_cc_is_replaced_or_removed(
    relay_to_sink: tuple[RelayProcess, SinkServer],
    dns_records: dict[str, str],
    tmp_path: Path,
    to: str,
    cc: str,
) -> None:
    """They went upstream as they came, under the relay's signature, though
    RFC 5322 wants an address in each: an ERP sending to Bcc alone writes them."""
    proc, sink = relay_to_sink
    queue_id = send(proc.port, msg(*NO_TO, to, cc), ("hidden@example.org",))
    (got,) = sink.sink.wait(1)
    names = [f.name.lower() for f in headers.split(got.data)[0]]
    assert "cc" not in names and names.count("to") == 1
    assert message.read(got.data).get_all("To") == ("undisclosed-recipients:;",)
    assert got.data.endswith(b"\r\n\r\n" + BODY)
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    reasons = _queued(proc.policy, queue_id)["reasons"]
    assert EMPTY_TO in reasons and EMPTY_CC in reasons


def test_preview_says_an_empty_cc_is_removed(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "cc.eml"
    eml.write_bytes(msg(*BASE, "Cc: "))
    out = preview(policy_file, eml)
    assert f"  - {EMPTY_CC}\n" in out
    assert "\nRemoved:     Cc\n" in out
    assert "\nCc:" not in out.split("Headers as sent:")[1]


def test_a_to_or_cc_with_an_address_is_kept(policy_file: Path) -> None:
    p = run(policy_file, msg(*BASE, "Cc: desk@acme.example"))
    view = message.read(p.message)
    assert view.get_all("To") == ("customer@example.org",)
    assert view.get_all("Cc") == ("desk@acme.example",)
    assert not {EMPTY_CC, EMPTY_TO} & set(p.decision.reasons)


@pytest.mark.parametrize("canon", [b"simple", b"relaxed"])
def test_an_empty_to_or_cc_an_erps_signature_signs_is_kept(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]], canon: bytes
) -> None:
    """Written anew or removed, they broke the ERP's own signature, under any
    canonicalisation, where the relay keeps its From: with no key of the
    relay's for that domain, the only signature DMARC could pass on."""
    without_the_relays_key(policy_file)
    data = msg("From: Hank Scorpio <hank@globex.example>", *BASE[2:], "To:", "Cc: ")
    signed = erp_signed(
        data, key_dir, "globex.example.g1", [b"from", b"to", b"cc", b"subject"], canon
    )
    p = run(policy_file, signed, login="erp-globex")
    view = message.read(p.message)
    assert view.get_all("To") == ("",) and view.get_all("Cc") == ("",)
    assert dkimpy_each(p.message, key_dir[1])[-1]
    for name in ("To", "Cc"):
        assert (
            f"{name} is empty, which RFC 5322 3.6.3 does not allow: kept, as the message's"
            " own DKIM signature (d=globex.example) signs it"
        ) in p.decision.reasons


MISSING_TO = "To was missing, which some receivers score as spam: added as undisclosed-recipients:;"


@pytest.mark.parametrize("cc", [(), ("Cc: desk@acme.example",)])
def test_a_missing_to_is_added_as_the_empty_group(
    relay_to_sink: tuple[RelayProcess, SinkServer],
    dns_records: dict[str, str],
    tmp_path: Path,
    cc: tuple[str, ...],
) -> None:
    """An ERP sending to Bcc alone wrote no To, and the message went out with
    none, which SpamAssassin scores (MISSING_HEADERS) whether or not a Cc is
    there; an empty To was written as the group already."""
    proc, sink = relay_to_sink
    data = msg(*NO_TO, *cc, "Bcc: customer@example.org")
    queue_id = send(proc.port, data, ("customer@example.org",))
    (got,) = sink.sink.wait(1)
    view = message.read(got.data)
    assert view.get_all("To") == ("undisclosed-recipients:;",)
    assert view.get_all("Cc") == tuple(c.removeprefix("Cc: ") for c in cc)
    assert view.get("Bcc") is None
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    assert MISSING_TO in _queued(proc.policy, queue_id)["reasons"]


def test_preview_says_a_missing_to_is_added(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "bcc.eml"
    eml.write_bytes(msg(*NO_TO, "Bcc: customer@example.org"))
    out = preview(policy_file, eml)
    assert f"  - {MISSING_TO}\n" in out
    assert "\nTo: undisclosed-recipients:;\n" in out.split("Headers as sent:")[1]


def test_a_missing_to_an_erps_signature_signs_is_not_added(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """A signature whose h= names to signs its absence: a To added breaks it
    where the relay keeps the ERP's From, and with no key of the relay's for
    that domain it is the only one DMARC could pass on."""
    without_the_relays_key(policy_file)
    data = msg("From: Hank Scorpio <hank@globex.example>", *BASE[2:])
    signed = erp_signed(data, key_dir, "globex.example.g1", [b"from", b"to", b"subject"])
    p = run(policy_file, signed, login="erp-globex")
    assert message.read(p.message).get("To") is None
    assert dkimpy_each(p.message, key_dir[1])[-1]
    assert (
        "To was missing, which some receivers score as spam: not added, as the message's"
        " own DKIM signature (d=globex.example) signs it"
    ) in p.decision.reasons


SIMPLE_BROKEN = (
    "; the message's own DKIM signature (d=platform.example) signs it with simple"
    " header canonicalisation and no longer verifies"
)


@pytest.mark.parametrize(("canon", "said"), [(b"simple", True), (b"relaxed", False)])
def test_the_reasons_say_an_erps_simple_signature_the_line_left_out_breaks(
    relay_to_sink: tuple[RelayProcess, SinkServer],
    key_dir: tuple[Path, dict[str, str]],
    canon: bytes,
    said: bool,
) -> None:
    """The ERP's signature failed at every receiver, and nothing said why."""
    proc, sink = relay_to_sink
    signed = erp_signed(OBSOLETE_FOLD, key_dir, "platform.example.s1", [b"from", b"subject"], canon)
    queue_id = send(proc.port, signed, ("one@example.org",))
    sink.sink.wait(1)
    reasons = _queued(proc.policy, queue_id)["reasons"]
    assert (LEFT_OUT + SIMPLE_BROKEN in reasons) is said
    assert (LEFT_OUT in reasons) is not said


def test_an_empty_to_is_written_where_the_erps_signature_is_broken_anyway(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """Every signature signs From, which the relay writes anew for a user
    outside a verified domain: the empty To was kept for a signature already
    broken, and said to be kept for it."""
    data = msg(*BASE[:1], *BASE[2:], "To:")
    p = run(
        policy_file,
        erp_signed(data, key_dir, "globex.example.g1", [b"from", b"to", b"subject"], b"simple"),
    )
    assert message.read(p.message).get_all("To") == ("undisclosed-recipients:;",)
    assert EMPTY_TO in p.decision.reasons
