"""AUTH password hashes: the format the policy stores, and refusal of anything else."""

from __future__ import annotations

import base64
import hashlib

import pytest

from relay.passwd import MalformedHash, hash_password, parse_hash, verify_password

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


def _made(n: int, r: int, p: int, length: int) -> str:
    salt = b"relay-test-salt!"
    key = hashlib.scrypt(b"demo-password", salt=salt, n=n, r=r, p=p, maxmem=2**29, dklen=length)
    return "$".join(("scrypt", str(n), str(r), str(p), _b64(salt), _b64(key)))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@pytest.mark.parametrize("length", [16, 64])
def test_a_hash_of_16_to_64_bytes_verifies(length: int) -> None:
    assert verify_password("demo-password", _made(2, 1, 1, length))


@pytest.mark.parametrize("length", [15, 65])
def test_a_hash_one_byte_past_its_limits_is_refused(length: int) -> None:
    with pytest.raises(MalformedHash, match=f"the hash is {length} bytes; expected 16 to 64"):
        parse_hash(_made(2, 1, 1, length))


@pytest.mark.parametrize(
    ("n", "r", "p", "refused"),
    [
        (2, 1, 1, None),
        (1, 1, 1, "N=1 is not a power of two above 1"),
        (2, 1, 16, None),
        (2, 1, 17, r"r must be at least 1 and p 1 to 16 \(r=1, p=17\)"),
        (2**20, 2, 1, None),  # 256 MiB: the most the relay allows
        (2**20, 3, 1, "N=1048576, r=3 needs 384 MiB of memory; the relay allows 256 MiB"),
    ],
)
def test_a_hash_s_cost_is_taken_up_to_its_limits(n: int, r: int, p: int, refused: str) -> None:
    """Read only, not derived: a hash at the memory limit takes 256 MiB to verify."""
    encoded = f"scrypt${n}${r}${p}${SALT}${KEY}"
    if refused is None:
        assert parse_hash(encoded)[:3] == (n, r, p)
        return
    with pytest.raises(MalformedHash, match=refused):
        parse_hash(encoded)
