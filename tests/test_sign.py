"""DKIM signing, checked by two independent verifiers: dkimpy and opendkim."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from dkim.util import parse_tag_value

from relay.errors import SigningError
from relay.policy.model import DkimAlgorithm, DkimKey
from relay.sign import sign
from tests.dkimtools import (
    assert_opendkim_ok,
    dkimpy_each,
    dkimpy_verify,
    make_key,
    opendkim_failures,
)

PDF = base64.encodebytes(hashlib.sha512(b"invoice").digest() * 40).replace(b"\n", b"\r\n")

# As aiosmtpd hands it over: CRLF, folded fields, encoded words, 8bit text.
INVOICE = (
    b"From: =?UTF-8?Q?Kari_Nordmann_via_Pl=C3=A5tform?= <noreply@example.com>\r\n"
    b"Reply-To: =?UTF-8?Q?Kari_Nordmann?= <kari@acme.example>\r\n"
    b"To: =?UTF-8?Q?=C3=98ystein_Kunde?= <oystein@customer.example>,\r\n"
    b"\tPer Kunde <per@customer.example>\r\n"
    b"Subject: =?UTF-8?Q?Faktura_10042_fra_Acme_AS_=E2=80=93_forfall?=\r\n"
    b" =?UTF-8?Q?_30=2E11=2E2026?=\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <q1x2.20261123@relay.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed;\r\n boundary="=_b1"\r\n'
    b"X-ERP-Document: invoice\r\n"
    b"\r\n"
    b"--=_b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hei \xc3\x98ystein,  \r\n"
    b"vedlagt f\xc3\xb8lger faktura 10042 p\xc3\xa5 1 250,00 kr.\t\r\n"
    b"\r\n"
    b"--=_b1\r\n"
    b'Content-Type: application/pdf; name="faktura-10042.pdf"\r\n'
    b'Content-Disposition: attachment; filename="faktura-10042.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + PDF + b"--=_b1--\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DkimKey, dict[str, str]]]:
    directory = tmp_path_factory.mktemp("keys")
    return {
        "rsa": make_key(directory, selector="s1"),
        "ed25519": make_key(directory, selector="e1", algorithm=DkimAlgorithm.ED25519),
    }


def signed(keys: dict, *names: str) -> tuple[bytes, dict[str, str]]:
    """INVOICE signed by the named keys, and the TXT records to verify it."""
    chosen = [keys[n][0] for n in names]
    records = {name: value for n in names for name, value in keys[n][1].items()}
    return sign(INVOICE, chosen) + INVOICE, records


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    return [
        parse_tag_value(value)
        for name, value in dkim.DKIM(message).headers
        if name.lower() == b"dkim-signature"
    ]


def h_list(tags: dict[bytes, bytes]) -> list[str]:
    return [n.strip().decode() for n in tags[b"h"].split(b":")]


COMBINATIONS = [("rsa",), ("ed25519",), ("rsa", "ed25519")]


@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
def test_signatures_verify_with_dkimpy_and_opendkim(
    keys: dict, names: tuple[str, ...], tmp_path: Path
) -> None:
    message, records = signed(keys, *names)
    assert len(signatures(message)) == len(names)
    assert dkimpy_verify(message, records)
    output = assert_opendkim_ok(message, records, tmp_path)
    if "rsa" in names:
        assert "verification (s=s1, d=example.com, 2048-bit key) succeeded" in output
    if "ed25519" in names:
        # Debian's opendkim 2.11 verifies Ed25519; it reports the key as 0 bits.
        assert "verification (s=e1, d=example.com, 0-bit key) succeeded" in output


def test_rsa_signs_first_whatever_the_key_order(keys: dict) -> None:
    header = sign(INVOICE, [keys["ed25519"][0], keys["rsa"][0]])
    tags = signatures(header + INVOICE)
    assert [(t[b"a"], t[b"s"]) for t in tags] == [
        (b"rsa-sha256", b"s1"),
        (b"ed25519-sha256", b"e1"),
    ]


def test_signature_fields(keys: dict) -> None:
    (tags,) = signatures(signed(keys, "rsa")[0])
    assert tags[b"v"] == b"1"
    assert tags[b"a"] == b"rsa-sha256"
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.com"
    assert tags[b"s"] == b"s1"
    assert b"l" not in tags  # a body length limit would let text be appended


def test_header_list_oversigns_what_a_forger_would_add(keys: dict) -> None:
    """Cc is absent and signed as absent; MIME headers only when present."""
    (tags,) = signatures(signed(keys, "rsa")[0])
    assert h_list(tags) == [
        "from",
        "from",
        "reply-to",
        "reply-to",
        "to",
        "to",
        "cc",
        "subject",
        "subject",
        "date",
        "date",
        "message-id",
        "message-id",
        "mime-version",
        "mime-version",
        "content-type",
        "content-type",
    ]


def test_header_list_signs_cc_when_present_and_every_occurrence(keys: dict) -> None:
    message = b"Cc: Kontor <kontor@acme.example>\r\nTo: Extra <x@customer.example>\r\n" + INVOICE
    header = sign(message, [keys["rsa"][0]])
    (tags,) = signatures(header + message)
    names = h_list(tags)
    assert names.count("cc") == 2
    assert names.count("to") == 3
    assert names.count("from") == 2
    assert dkimpy_verify(header + message, keys["rsa"][1])


UNSUBSCRIBE = (
    b"List-Unsubscribe: <https://erp.acme.example/u/4711>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
)


AUTO_SUBMITTED = b"Auto-Submitted: auto-generated\r\n"
UNSUBSCRIBE_FIELDS = ("list-unsubscribe", "list-unsubscribe-post")


@pytest.mark.parametrize(
    ("head", "names", "tamper"),
    [
        (
            UNSUBSCRIBE,
            UNSUBSCRIBE_FIELDS,
            lambda m: m.replace(b"erp.acme.example/u/4711", b"evil.example/u/4711"),
        ),
        (
            UNSUBSCRIBE,
            UNSUBSCRIBE_FIELDS,
            lambda m: m.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b""),
        ),
        (
            AUTO_SUBMITTED,
            ("auto-submitted",),
            lambda m: m.replace(b"Auto-Submitted: auto-generated", b"Auto-Submitted: no"),
        ),
        (AUTO_SUBMITTED, ("auto-submitted",), lambda m: m.replace(AUTO_SUBMITTED, b"")),
    ],
    ids=["unsubscribe url changed", "unsubscribe post removed", "auto-submitted changed",
         "auto-submitted removed"],
)  # fmt: skip
def test_fields_signed_where_the_message_has_them(
    keys: dict, head: bytes, names: tuple[str, ...], tamper: Callable[[bytes], bytes],
    tmp_path: Path,
) -> None:  # fmt: skip
    """RFC 8058 4: both one-click unsubscribe fields must be covered by a valid
    DKIM signature. RFC 3834's Auto-Submitted keeps auto-responders from
    answering a document; unsigned, a hop could remove or change it and the
    signature still verified. Each is signed and oversigned where present only."""
    message = head + INVOICE
    key, records = keys["rsa"]
    signed_message = sign(message, [key]) + message
    (tags,) = signatures(signed_message)
    assert [h_list(tags).count(name) for name in names] == [2] * len(names)
    assert dkimpy_verify(signed_message, records)
    changed = tamper(signed_message)
    assert dkimpy_each(changed, records) == [False]
    assert opendkim_failures(changed, records, tmp_path) == ["signature verification failed"]
    (without,) = signatures(signed(keys, "rsa")[0])
    assert not set(names) & set(h_list(without))


def test_header_is_crlf_folded_and_ready_to_prepend(keys: dict) -> None:
    header = sign(INVOICE, [keys["rsa"][0], keys["ed25519"][0]])
    assert header.startswith(b"DKIM-Signature: ")
    assert header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    assert b"\n" not in b"".join(lines) and b"\r" not in b"".join(lines)
    assert len(lines) > 2
    assert all(len(line) <= 80 for line in lines)
    continuation = [line for line in lines if not line.startswith(b"DKIM-Signature: ")]
    assert all(line.startswith(b" ") for line in continuation)


def test_no_keys_no_signature() -> None:
    assert sign(INVOICE, []) == b""


def test_relaxed_canonicalization_survives_whitespace_changes(keys: dict, tmp_path: Path) -> None:
    message, records = signed(keys, "rsa", "ed25519")
    rewrapped = message.replace(b"Subject: =?UTF", b"subject:   =?UTF").replace(
        b"1 250,00 kr.\t\r\n", b"1 250,00 kr.\r\n"
    )
    assert rewrapped != message
    assert dkimpy_verify(rewrapped, records)
    assert_opendkim_ok(rewrapped, records, tmp_path)


@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m: m.replace(b"Faktura_10042", b"Faktura_10043"), id="subject"),
        pytest.param(lambda m: m.replace(b"1 250,00", b"9 250,00"), id="body-byte"),
        pytest.param(lambda m: m.replace(PDF[:40], PDF[:40].swapcase()), id="attachment"),
        pytest.param(lambda m: m.replace(b"kari@acme", b"kara@acme"), id="reply-to"),
    ],
)
def test_any_change_after_signing_fails_both_verifiers(
    keys: dict, names: tuple[str, ...], tamper: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    message, records = signed(keys, *names)
    changed = tamper(message)
    assert changed != message
    assert dkimpy_each(changed, records) == [False] * len(names)
    reasons = opendkim_failures(changed, records, tmp_path)
    assert reasons == ["signature verification failed"] * len(names)


@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
@pytest.mark.parametrize(
    "forged",
    [
        b"Reply-To: Accounts <pay@evil.example>\r\n",
        b"Subject: URGENT: new bank details\r\n",
        b"To: other@example.org\r\n",
        b"Cc: other@example.org\r\n",
        b"Date: Tue, 24 Nov 2026 10:00:00 +0100\r\n",
        b"Message-ID: <other@example.org>\r\n",
    ],
    ids=lambda f: f.split(b":")[0].decode(),
)
def test_a_field_added_after_signing_fails_both_verifiers(
    keys: dict, names: tuple[str, ...], forged: bytes, tmp_path: Path
) -> None:
    """A field a forger would add, present before (Reply-To) or not (Cc), above
    the signatures as a verifier reads the last occurrence first."""
    message, records = signed(keys, *names)
    changed = forged + message
    assert dkimpy_each(changed, records) == [False] * len(names)
    reasons = opendkim_failures(changed, records, tmp_path)
    assert reasons == ["signature verification failed"] * len(names)


@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_a_second_from_added_after_signing_fails(
    keys: dict, names: tuple[str, ...], where: str, tmp_path: Path
) -> None:
    message, records = signed(keys, *names)
    assert dkimpy_verify(message, records)
    forged = b"From: CEO <ceo@acme.example>\r\n"
    if where == "top":
        changed = forged + message
    else:
        changed = message.replace(b"MIME-Version: 1.0\r\n", forged + b"MIME-Version: 1.0\r\n")
    assert dkimpy_each(changed, records) == [False] * len(names)
    reasons = opendkim_failures(changed, records, tmp_path)
    assert reasons == ["signature verification failed"] * len(names)


def test_without_oversigning_opendkim_would_accept_a_second_from(
    keys: dict, tmp_path: Path
) -> None:
    """The control for the test above: From listed once is not enough."""
    key, records = keys["rsa"]
    names = [b"from", b"reply-to", b"to", b"subject", b"date", b"message-id"]
    header = dkim.sign(
        INVOICE,
        key.selector.encode(),
        key.domain.encode(),
        key.private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=names,
    )
    changed = b"From: CEO <ceo@acme.example>\r\n" + header + INVOICE
    assert_opendkim_ok(changed, records, tmp_path)


def test_a_large_message_signs(keys: dict) -> None:
    body = base64.encodebytes(bytes(range(256)) * 40_000).replace(b"\n", b"\r\n")  # ~14 MB
    message = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: big\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body
    )
    records = {**keys["rsa"][1], **keys["ed25519"][1]}
    header = sign(message, [keys["rsa"][0], keys["ed25519"][0]])
    assert dkimpy_verify(header + message, records)


def test_a_message_without_from_is_refused(keys: dict) -> None:
    message = re.sub(rb"^From: .*\r\n", b"", INVOICE, count=1)
    with pytest.raises(SigningError, match="no From header field"):
        sign(message, [keys["rsa"][0]])


def _key(algorithm: DkimAlgorithm, private: bytes) -> DkimKey:
    return DkimKey("example.com", "bad", algorithm, Path("/keys/example.com.bad.private"), private)


@pytest.mark.parametrize(
    ("algorithm", "private"),
    [
        (DkimAlgorithm.RSA, b"garbage"),
        (DkimAlgorithm.RSA, b""),
        (
            DkimAlgorithm.RSA,
            b"-----BEGIN RSA PRIVATE KEY-----\nMIIBAAAA\n-----END RSA PRIVATE KEY-----\n",
        ),
        (DkimAlgorithm.ED25519, b"garbage!"),
        (DkimAlgorithm.ED25519, base64.b64encode(b"x" * 31)),
    ],
    ids=["rsa-text", "rsa-empty", "rsa-der", "ed25519-text", "ed25519-short"],
)
def test_a_bad_key_raises_signing_error_naming_it(algorithm: DkimAlgorithm, private: bytes) -> None:
    with pytest.raises(SigningError) as caught:
        sign(INVOICE, [_key(algorithm, private)])
    text = str(caught.value)
    assert "d=example.com s=bad" in text
    assert "/keys/example.com.bad.private" in text
    assert "\n" not in text


def test_a_key_of_the_other_algorithm_raises_signing_error(keys: dict) -> None:
    rsa_pem = keys["rsa"][0].private_key
    seed = keys["ed25519"][0].private_key
    with pytest.raises(SigningError, match=re.escape("d=example.com s=bad")):
        sign(INVOICE, [_key(DkimAlgorithm.ED25519, rsa_pem)])
    with pytest.raises(SigningError, match=re.escape("d=example.com s=bad")):
        sign(INVOICE, [_key(DkimAlgorithm.RSA, seed)])


def test_an_unparsable_message_raises_signing_error(keys: dict) -> None:
    with pytest.raises(SigningError, match="cannot be parsed"):
        sign(b"From: a@example.com\r\nno colon here\r\n\r\nbody\r\n", [keys["rsa"][0]])
