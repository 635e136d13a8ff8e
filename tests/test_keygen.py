"""Key generation: private files nobody else can read, records that match them."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.keygen import generate, public_record_value, replaced, zone_record
from relay.policy.model import DkimAlgorithm, DkimKey
from relay.sign import sign
from tests.dkimtools import assert_opendkim_ok, dkimpy_verify, txt_value

RECORD = re.compile(r'^(\S+)\. IN TXT \( ("[^"]{1,255}"(?: "[^"]{1,255}")*) \)$')
MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHei\r\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tags(value: str) -> dict[str, str]:
    return dict(part.strip().split("=", 1) for part in value.split(";") if part.strip())


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def test_rsa_key_is_private_pkcs1_and_its_record_publishes_it(tmp_path: Path) -> None:
    path, record = generate("Example.COM", "s1", DkimAlgorithm.RSA, tmp_path)
    assert path == tmp_path / "example.com.s1.private"
    assert mode(path) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")

    match = RECORD.match(record)
    assert match, record
    assert match.group(1) == "s1._domainkey.example.com"
    assert record.startswith('s1._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; " "p=MIIB')
    value = txt_value(record)
    assert tags(value)["v"] == "DKIM1"
    assert tags(value)["k"] == "rsa"
    public = serialization.load_der_public_key(base64.b64decode(tags(value)["p"]))
    private = serialization.load_pem_private_key(data, password=None)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    assert public.public_numbers() == private.public_key().public_numbers()

    key = DkimKey("example.com", "s1", DkimAlgorithm.RSA, path, data)
    assert public_record_value(key) == value


def test_ed25519_key_is_a_base64_seed_and_its_record_the_raw_public_key(tmp_path: Path) -> None:
    path, record = generate("example.com", "e1", DkimAlgorithm.ED25519, tmp_path)
    assert path == tmp_path / "example.com.e1.private"
    assert mode(path) == 0o600
    data = path.read_bytes()
    seed = base64.b64decode(data, validate=False)
    assert len(seed) == 32
    assert data == base64.b64encode(seed) + b"\n"

    assert RECORD.match(record), record
    value = txt_value(record)
    assert value.startswith("v=DKIM1; k=ed25519; p=")
    expected = nacl.signing.SigningKey(seed).verify_key.encode()
    assert base64.b64decode(tags(value)["p"]) == expected
    key = DkimKey("example.com", "e1", DkimAlgorithm.ED25519, path, data)
    assert public_record_value(key) == value


@pytest.mark.parametrize("algorithm", list(DkimAlgorithm))
def test_generated_keys_sign_messages_the_verifiers_accept(
    algorithm: DkimAlgorithm, tmp_path: Path
) -> None:
    path, record = generate("example.com", "k1", algorithm, tmp_path / "keys")
    key = DkimKey("example.com", "k1", algorithm, path, path.read_bytes())
    records = {"k1._domainkey.example.com.": txt_value(record)}
    message = sign(MESSAGE, [key]) + MESSAGE
    assert dkimpy_verify(message, records)
    assert_opendkim_ok(message, records, tmp_path)


def test_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    path, _ = generate("example.com", "s1", DkimAlgorithm.ED25519, tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists; not overwriting"):
        generate("example.com", "s1", DkimAlgorithm.RSA, tmp_path)
    assert path.read_bytes() == before


def test_refuses_to_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "example.com.s1.private").symlink_to(target)
    with pytest.raises(FileExistsError):
        generate("example.com", "s1", DkimAlgorithm.ED25519, tmp_path)
    assert not target.exists()


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_key_file_is_0600_whatever_the_umask(mask: int, tmp_path: Path) -> None:
    os.umask(mask)
    path, _ = generate("example.com", "s1", DkimAlgorithm.ED25519, tmp_path)
    assert mode(path) == 0o600


@pytest.mark.usefixtures("umask")
def test_a_missing_directory_is_created_private(tmp_path: Path) -> None:
    os.umask(0o022)
    path, _ = generate("example.com", "s1", DkimAlgorithm.ED25519, tmp_path / "dkim")
    assert path.parent == tmp_path / "dkim"
    assert mode(path.parent) == 0o700


@pytest.mark.parametrize(
    ("domain", "selector"),
    [
        ("../etc", "s1"),
        ("example.com", "../s1"),
        ("example.com", "a/b"),
        ("", "s1"),
        ("example.com", ""),
        ("example..com", "s1"),
        ("example.com.", "s1"),
        ("-example.com", "s1"),
        ("example.com", "s 1"),
        ("exämple.com", "s1"),
    ],
)
def test_refuses_names_that_are_not_dns_names(domain: str, selector: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected a DNS name"):
        generate(domain, selector, DkimAlgorithm.ED25519, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_record_name_longer_than_dns_allows(tmp_path: Path) -> None:
    """Each name fit alone; the printed record's name did not, and no zone took it."""
    domain = ".".join(["a" * 56] * 4) + ".com"
    with pytest.raises(ValueError, match=r"\._domainkey\..* is 257 characters: a DNS name has"):
        generate(domain, "selector202601", DkimAlgorithm.ED25519, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("domain", "selector", "form"),
    [("exämple.com", "s1", "xn--exmple-cua.com"), ("example.com", "sél", "xn--sl-bja")],
)
def test_a_name_in_unicode_is_told_in_its_a_label_form(
    domain: str, selector: str, form: str, tmp_path: Path
) -> None:
    """As ``relay check`` tells it, so the key file and the record are named alike."""
    with pytest.raises(ValueError, match=f"expected a DNS name; write it as '{form}'$"):
        generate(domain, selector, DkimAlgorithm.ED25519, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits", [512, 1023, 4097, 8192])
def test_refuses_rsa_sizes_verifiers_do_not_accept(bits: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"RSA key size {bits}"):
        generate("example.com", "s1", DkimAlgorithm.RSA, tmp_path, bits)
    assert list(tmp_path.iterdir()) == []


def test_the_smallest_rsa_size_verifiers_accept_is_made(tmp_path: Path) -> None:
    """1024 bits is the least a verifier must take (RFC 8301) and the lower bound
    ``--bits`` is documented with; the record publishes that key."""
    path, record = generate("example.com", "s1", DkimAlgorithm.RSA, tmp_path, 1024)
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 1024
    public = serialization.load_der_public_key(base64.b64decode(tags(txt_value(record))["p"]))
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()


def test_zone_record_splits_long_values_into_255_character_strings() -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 700
    record = zone_record("example.com", "s1", value)
    assert RECORD.match(record), record
    strings = re.findall(r'"([^"]*)"', record)
    assert [len(s) for s in strings] == [16, 255, 255, 192]
    assert "".join(strings) == value


def test_public_record_matches_opendkim_genkey(tmp_path: Path) -> None:
    """An independent tool's key: our p= must equal the one it printed."""
    subprocess.run(
        ["opendkim-genkey", "-D", str(tmp_path), "-d", "example.com", "-s", "gen", "-b", "2048"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    path = tmp_path / "gen.private"
    key = DkimKey("example.com", "gen", DkimAlgorithm.RSA, path, path.read_bytes())
    theirs = tags(txt_value((tmp_path / "gen.txt").read_text()))
    ours = tags(public_record_value(key))
    assert ours["p"] == theirs["p"]
    # opendkim-genkey writes PKCS#8 with OpenSSL 3; signing must take it as well.
    records = {"gen._domainkey.example.com": public_record_value(key)}
    message = sign(MESSAGE, [key]) + MESSAGE
    assert dkimpy_verify(message, records)
    assert_opendkim_ok(message, records, tmp_path)


@pytest.mark.parametrize(
    ("algorithm", "private"),
    [
        (DkimAlgorithm.RSA, b"garbage"),
        (DkimAlgorithm.ED25519, b"garbage!"),
        (DkimAlgorithm.ED25519, base64.b64encode(b"x" * 31)),
    ],
)
def test_public_record_value_of_a_bad_key_names_it(
    algorithm: DkimAlgorithm, private: bytes
) -> None:
    key = DkimKey("example.com", "bad", algorithm, Path("/k/bad.private"), private)
    with pytest.raises(ValueError, match=r"d=example\.com s=bad from /k/bad\.private"):
        public_record_value(key)


def test_a_key_file_saved_again_is_not_another_key(tmp_path: Path) -> None:
    """A reload warns of a new key under a selector in use (its queued mail fails
    DKIM); the same key saved with CR LF line ends, as an editor on Windows does,
    is no new key, and a warning for it would cry wolf."""
    path, _ = generate("example.com", "s1", DkimAlgorithm.RSA, tmp_path / "a")
    data = path.read_bytes()
    before = DkimKey("example.com", "s1", DkimAlgorithm.RSA, path, data)
    again = DkimKey("example.com", "s1", DkimAlgorithm.RSA, path, data.replace(b"\n", b"\r\n"))
    other_path, _ = generate("example.com", "s1", DkimAlgorithm.RSA, tmp_path / "b")
    other = DkimKey("example.com", "s1", DkimAlgorithm.RSA, other_path, other_path.read_bytes())
    assert replaced([before], [again]) == []
    assert replaced([before], [other]) == [other]
