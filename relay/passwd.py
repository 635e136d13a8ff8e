"""AUTH password hashes for the policy's ``logins``: ``scrypt$N$r$p$salt$hash``.

scrypt is in the standard library and memory-hard, so a leaked policy file
does not hand out the ERPs' passwords. The parameters travel in the hash,
so they can be raised later without invalidating existing hashes; limits on
them keep a hostile or mistyped hash from tying up memory or CPU.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from relay.quantity import quantity

_N, _R, _P = 16384, 8, 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAX_P = 16
_MAX_BLOCKS = 2**28  # 128*r*N bytes: 256 MiB
_MAX_MEMORY = _MAX_BLOCKS + 2**24  # what scrypt may allocate beyond the blocks


def password_text(data: bytes) -> str:
    """A password file's password, as ``relay check`` reads it: without the line
    end an editor adds, nor the byte-order mark Notepad writes, which went to
    the upstream as part of the password, so that every login failed."""
    return data.decode("utf-8-sig").rstrip("\r\n")


def hash_password(password: str) -> str:
    salt = os.urandom(_SALT_BYTES)
    key = _derive(password.encode("utf-8"), salt, _N, _R, _P, _KEY_BYTES)
    return "$".join(("scrypt", str(_N), str(_R), str(_P), _b64(salt), _b64(key)))


def verify_password(password: str, encoded: str) -> bool:
    """True only for the right password; any malformed input is simply False."""
    if not isinstance(password, str) or not isinstance(encoded, str):
        return False
    try:
        n, r, p, salt, expected = parse_hash(encoded)
    except MalformedHash:
        return False
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        return False
    try:
        key = _derive(secret, salt, n, r, p, len(expected))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(key, expected)


class MalformedHash(ValueError):
    """A hash no password can match; its text says what is wrong with it."""


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """N, r, p, salt and hash; raises MalformedHash. The policy loader checks its
    hashes with this, the verifier's own parser, so that a hash that could never
    verify is refused by ``relay check`` instead of failing every AUTH."""
    parts = encoded.split("$")
    if parts[0] != "scrypt":
        raise MalformedHash("not an scrypt hash: it must start with scrypt$")
    if len(parts) != 6:
        raise MalformedHash(f"expected 6 fields, scrypt$N$r$p$salt$hash, not {len(parts)}")
    if not all(part.isascii() and part.isdigit() and len(part) < 12 for part in parts[1:4]):
        raise MalformedHash("N, r and p must be decimal numbers")
    n, r, p = (int(part) for part in parts[1:4])
    _check_cost(n, r, p)
    salt = _decode(parts[4], "salt")
    expected = _decode(parts[5], "hash")
    if not salt:
        raise MalformedHash("the salt is empty")
    if not 16 <= len(expected) <= 64:
        raise MalformedHash(f"the hash is {quantity(len(expected), 'byte')}; expected 16 to 64")
    return n, r, p, salt, expected


def weaker(encoded: str) -> str | None:
    """What makes a well-formed hash cheaper to guess than ``relay passwd``'s,
    if anything: a hash copied from elsewhere, or made by hand with N=2, loads
    and verifies, and protects next to nothing should the policy file leak."""
    n, r, _, salt, _ = parse_hash(encoded)
    if n * r < _N * _R:
        return f"N={n}, r={r} costs {_N * _R // (n * r):,} times less to guess than N={_N}, r={_R}"
    if len(salt) < _SALT_BYTES:
        return f"its salt is {quantity(len(salt), 'byte')}, under {_SALT_BYTES}"
    return None


def _check_cost(n: int, r: int, p: int) -> None:
    """Limits that keep a hostile or mistyped hash from tying up memory or CPU."""
    if not (n > 1 and n & (n - 1) == 0):
        raise MalformedHash(f"N={n} is not a power of two above 1")
    if not (r > 0 and 0 < p <= _MAX_P):
        raise MalformedHash(f"r must be at least 1 and p 1 to {_MAX_P} (r={r}, p={p})")
    if 128 * r * n > _MAX_BLOCKS:
        need, limit = _mebibytes(128 * r * n), _mebibytes(_MAX_BLOCKS)
        raise MalformedHash(f"N={n}, r={r} needs {need} of memory; the relay allows {limit}")


def _mebibytes(size: int) -> str:
    return f"{size // 2**20:,} MiB"


def _decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedHash(f"the {what} is not base64 ({exc})") from exc


def _derive(secret: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEMORY, dklen=length)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
