"""A Subject in Latin-1 bytes, as a legacy ERP on Windows writes it: written
in RFC 2047 encoded words as the policy reads it, where it went upstream as
raw 8-bit bytes that receivers read as UTF-8 and showed as ``f\ufffdr``.
Through a real relay to a sink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay import headers, message
from tests.dkimtools import assert_opendkim_ok, dkimpy_each, dkimpy_verify
from tests.relayproc import RelayProcess
from tests.sink import SinkServer
from tests.test_decide_reply_to import preview
from tests.test_decisions import BASE, BODY, run
from tests.test_odd_headers import erp_signed, without_the_relays_key
from tests.test_queue_e2e import relay_cli, send

NO_SUBJECT = [f.encode() for f in BASE if not f.startswith("Subject")]
LATIN1 = b"Subject: Faktura nr 12 f\xf8r ordre"
BODY_LATIN1 = b"Faktura f\xf8lger vedlagt.\r\n"  # the body passes byte for byte
WRITTEN = (
    "Subject is not UTF-8 on the wire: written in RFC 2047 encoded words as the"
    " policy reads it, as Windows-1252 (Faktura nr 12 f\u00f8r ordre)"
)


def _msg(*fields: bytes, body: bytes = BODY_LATIN1) -> bytes:
    head = [*fields, b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=iso-8859-1"]
    return b"".join(f + b"\r\n" for f in head) + b"\r\n" + body


def _subject_field(data: bytes) -> bytes:
    (found,) = [f.raw for f in headers.split(data)[0] if f.name.lower() == "subject"]
    return found


def test_a_latin1_subject_is_written_in_encoded_words(
    relay_to_sink: tuple[RelayProcess, SinkServer], dns_records: dict[str, str], tmp_path: Path
) -> None:
    proc, sink = relay_to_sink
    queue_id = send(proc.port, _msg(*NO_SUBJECT, LATIN1), ("one@example.org",))
    (got,) = sink.sink.wait(1)
    written = _subject_field(got.data)
    assert written.isascii() and b"=?utf-8?" in written
    assert message.read(got.data).subject == "Faktura nr 12 f\u00f8r ordre"
    assert got.data.endswith(b"\r\n\r\n" + BODY_LATIN1)
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    done = relay_cli(proc.policy, "audit", "search", "--queue-id", queue_id, "--format", "json")
    assert done.returncode == 0, done.stderr
    (record,) = [r for r in map(json.loads, done.stdout.splitlines()) if r["event"] == "received"]
    assert WRITTEN in record["reasons"]


def test_preview_says_a_latin1_subject_is_written_in_encoded_words(
    policy_file: Path, tmp_path: Path
) -> None:
    eml = tmp_path / "faktura.eml"
    eml.write_bytes(_msg(*NO_SUBJECT, LATIN1))
    out = preview(policy_file, eml)
    assert f"  - {WRITTEN}\n" in out
    assert "Subject is not UTF-8 on the wire (its 8-bit bytes" not in out
    assert "\nSubject: =?utf-8?" in out.split("Headers as sent:")[1]


@pytest.mark.parametrize(
    "subject",
    [b"Subject: Faktura nr 12 f\xc3\xb8r ordre", b"Subject: Faktura nr 12 =?iso-8859-1?q?f=F8r?="],
)
def test_a_utf8_or_ascii_subject_stays_as_it_came(policy_file: Path, subject: bytes) -> None:
    p = run(policy_file, _msg(*NO_SUBJECT, subject))
    assert _subject_field(p.message) == subject + b"\r\n"
    assert not [r for r in p.decision.reasons if r.startswith("Subject")]


def test_a_latin1_subject_an_erps_signature_signs_is_kept(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """Written anew, it broke the ERP's own signature where the relay keeps
    its From: with no key of the relay's for that domain, the only one DMARC
    could pass on."""
    without_the_relays_key(policy_file)
    data = _msg(b"From: Hank Scorpio <hank@globex.example>", *NO_SUBJECT[1:], LATIN1)
    signed = erp_signed(data, key_dir, "globex.example.g1", [b"from", b"to", b"subject"])
    p = run(policy_file, signed, login="erp-globex")
    assert _subject_field(p.message) == LATIN1 + b"\r\n"
    assert dkimpy_each(p.message, key_dir[1])[-1]
    assert (
        "Subject is not UTF-8 on the wire: kept, as the message's own DKIM signature"
        " (d=globex.example) signs it; receivers may show it garbled"
    ) in p.decision.reasons


def test_a_latin1_subject_is_encoded_where_the_erps_signature_is_broken_anyway(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """The relay writes the From anew for a user outside a verified domain."""
    data = _msg(*NO_SUBJECT, LATIN1, body=BODY)
    p = run(policy_file, erp_signed(data, key_dir, "globex.example.g1", [b"from", b"subject"]))
    assert _subject_field(p.message).isascii()
    assert WRITTEN in p.decision.reasons
