"""AUTH password hashes: the format the policy stores, and refusal of anything else."""

from __future__ import annotations

import base64

import pytest

from relay.passwd import hash_password, verify_password

SALT = "cmVsYXktZGVtby1zYWx0IQ=="
KEY = "x0qG+cibjmfhHeWXcJAwGW27gNPyIus2vhexTU+5xXk="
DEMO_HASH = f"scrypt$16384$8$1${SALT}${KEY}"


def test_example_policy_hash_verifies() -> None:
    assert verify_password("demo-password", DEMO_HASH)
    assert not verify_password("demo-passwor", DEMO_HASH)
    assert not verify_password("demo-password ", DEMO_HASH)


def test_hash_format_and_roundtrip() -> None:
    encoded = hash_password("s3cret ÆØÅ")
    scheme, n, r, p, salt, key = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt, validate=True)) == 16
    assert len(base64.b64decode(key, validate=True)) == 32
    assert verify_password("s3cret ÆØÅ", encoded)
    assert not verify_password("s3cret ÆØA", encoded)


def test_salt_is_random() -> None:
    assert hash_password("same") != hash_password("same")


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "scrypt",
        "plain$demo-password",
        f"bcrypt$16384$8$1${SALT}${KEY}",
        f"scrypt$16384$8$1${SALT}",
        f"scrypt$16384$8$1${SALT}${KEY}$x",
        f"scrypt$16383$8$1${SALT}${KEY}",  # N not a power of two
        f"scrypt$0$8$1${SALT}${KEY}",
        f"scrypt$-16384$8$1${SALT}${KEY}",
        f"scrypt$16384$0$1${SALT}${KEY}",
        f"scrypt$16384$8$0${SALT}${KEY}",
        f"scrypt$1e4$8$1${SALT}${KEY}",
        f"scrypt$\uff11\uff16\uff13\uff18\uff14$8$1${SALT}${KEY}",  # fullwidth digits
        f"scrypt$16384$8$1$not base64!${KEY}",
        f"scrypt$16384$8$1$${KEY}",
        f"scrypt$16384$8$1${SALT}$",
        f"scrypt$16384$8$1${SALT}${KEY[:-1]}",
        # memory or CPU far beyond any sane hash: refused without trying
        f"scrypt$1073741824$8$1${SALT}${KEY}",
        f"scrypt$16384$999999$1${SALT}${KEY}",
        f"scrypt$16384$8$999${SALT}${KEY}",
        f"scrypt${'9' * 5000}$8$1${SALT}${KEY}",
    ],
)
def test_malformed_hash_is_false_not_an_exception(encoded: str) -> None:
    assert verify_password("demo-password", encoded) is False


@pytest.mark.parametrize("password", ["\udcff", "a\x00b", ""])
def test_odd_passwords_are_false(password: str) -> None:
    assert verify_password(password, DEMO_HASH) is False


def test_non_strings_are_false() -> None:
    assert verify_password(b"demo-password", DEMO_HASH) is False  # type: ignore[arg-type]
    assert verify_password("demo-password", None) is False  # type: ignore[arg-type]
