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

_N, _R, _P = 16384, 8, 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAX_P = 16
_MAX_BLOCKS = 2**28  # 128*r*N bytes: 256 MiB
_MAX_MEMORY = _MAX_BLOCKS + 2**24  # what scrypt may allocate beyond the blocks


def hash_password(password: str) -> str:
    salt = os.urandom(_SALT_BYTES)
    key = _derive(password.encode("utf-8"), salt, _N, _R, _P, _KEY_BYTES)
    return "$".join(("scrypt", str(_N), str(_R), str(_P), _b64(salt), _b64(key)))


def verify_password(password: str, encoded: str) -> bool:
    """True only for the right password; any malformed input is simply False."""
    if not isinstance(password, str) or not isinstance(encoded, str):
        return False
    parsed = _parse(encoded)
    if parsed is None:
        return False
    n, r, p, salt, expected = parsed
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        return False
    try:
        key = _derive(secret, salt, n, r, p, len(expected))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(key, expected)


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    if not all(part.isascii() and part.isdigit() and len(part) < 12 for part in parts[1:4]):
        return None
    n, r, p = (int(part) for part in parts[1:4])
    if not (n > 1 and n & (n - 1) == 0 and r > 0 and 0 < p <= _MAX_P):
        return None
    if 128 * r * n > _MAX_BLOCKS:
        return None
    try:
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        return None
    if not salt or not 16 <= len(expected) <= 64:
        return None
    return n, r, p, salt, expected


def _derive(secret: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEMORY, dklen=length)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
