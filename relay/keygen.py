"""DKIM key pairs and the DNS records that publish them.

Key files use the formats ``relay.sign`` hands to dkimpy unchanged: RSA as a
PKCS#1 PEM (which opendkim and older dkimpy read too), Ed25519 as the base64
of the 32-byte seed. The record is printed in zone-file syntax like
``opendkim-genkey`` does, so it can be pasted into a zone or a DNS web form.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.alabels import a_labels
from relay.policy.model import DkimAlgorithm, DkimKey

# RFC 8301: signers use at least 1024 bits (2048 or more: SHOULD), verifiers must
# handle up to 4096.
MIN_RSA_BITS = 1024
STRONG_RSA_BITS = 2048
MAX_RSA_BITS = 4096
DEFAULT_RSA_BITS = 2048
_TXT_STRING_MAX = 255  # one character-string in a TXT record (RFC 1035 3.3)
_PRIVATE = b"PRIVATE KEY-----"

# The names become part of a file name: this also keeps out "/" and "..".
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def generate(
    domain: str,
    selector: str,
    algorithm: DkimAlgorithm,
    directory: Path,
    bits: int | None = None,
) -> tuple[Path, str]:
    """Write a new private key to ``directory`` and return it with its DNS record.

    Raises ValueError for a bad name or key size (an Ed25519 key has none to
    choose: a size given with it would be ignored unseen) and FileExistsError
    rather than replace a key whose public half may already be in DNS.
    """
    domain = domain.lower()
    for what, name in (("domain", domain), ("selector", selector)):
        if not _NAME.fullmatch(name) or len(name) > 253:
            raise ValueError(
                f"invalid DKIM {what} {name!r}: expected a DNS name{_in_a_labels(name)}"
            )
    owner = f"{selector}._domainkey.{domain}"
    if len(owner) > 253:  # the record's own name: no zone takes a longer one
        raise ValueError(f"{owner} is {len(owner)} characters: a DNS name has at most 253")
    if algorithm is DkimAlgorithm.RSA:
        bits = DEFAULT_RSA_BITS if bits is None else bits
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise ValueError(f"RSA key size {bits} outside {MIN_RSA_BITS}..{MAX_RSA_BITS} bits")
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        data = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    elif bits is not None:
        raise ValueError(f"an {algorithm.value} key has no size to choose: --bits is for RSA keys")
    else:
        seed = ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
        data = base64.b64encode(seed) + b"\n"
    if directory.exists() and not directory.is_dir():  # not "the key exists" (exit 73)
        raise NotADirectoryError(f"{directory} is not a directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{domain}.{selector}.private"
    _write_new(path, data)
    key = DkimKey(domain, selector, algorithm, path, data)
    return path, zone_record(domain, selector, public_record_value(key))


def _in_a_labels(name: str) -> str:
    """The form to write a Unicode name in, as ``relay check`` tells it for the
    policy's: the key file and the TXT record are named with it."""
    if name.isascii():
        return ""
    try:
        return f"; write it as {a_labels(name)!r}"
    except UnicodeError:
        return ""


def existing_record(domain: str, selector: str, directory: Path) -> str | None:
    """The record of the key a second ``keygen`` refused to replace: a recipe that
    sends the record to a file (``> DOMAIN.SELECTOR.txt``) had the shell empty
    that file before the refusal, and nothing printed it again. None when the
    file is not a key the relay reads."""
    path = directory / f"{domain.lower()}.{selector}.private"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    seed = ed25519_seed(data)
    if seed is not None:
        algorithm, data = DkimAlgorithm.ED25519, seed
    elif b"-----BEGIN" in data:  # after a byte-order mark or a PKCS#12 export's lines
        algorithm = DkimAlgorithm.RSA
    else:
        algorithm = DkimAlgorithm.ED25519
    try:
        value = public_record_value(DkimKey(domain.lower(), selector, algorithm, path, data))
    except ValueError:
        return None
    return zone_record(domain.lower(), selector, value)


def ed25519_seed(data: bytes) -> bytes | None:
    """An Ed25519 key in PEM (PKCS#8, as ``openssl genpkey -algorithm ed25519``
    and OpenDKIM make it) as the base64 of its seed, the form the signer reads:
    its raw private bytes are that seed, so it signs as the seed's file would.
    None for anything else."""
    if _PRIVATE not in data:
        return None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        return None
    return base64.b64encode(private.private_bytes_raw()) + b"\n"


def public_record_value(key: DkimKey) -> str:
    """The TXT value ``v=DKIM1; k=...; p=...`` that publishes ``key``'s public half.

    Raises ValueError, naming the key, when its private key cannot be read.
    """
    try:
        if key.algorithm is DkimAlgorithm.RSA:
            private = serialization.load_pem_private_key(key.private_key, password=None)
            if not isinstance(private, rsa.RSAPrivateKey):
                raise ValueError(f"not an RSA key but {type(private).__name__}")
            public = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            seed = base64.b64decode(b"".join(key.private_key.split()), validate=True)
            if len(seed) != 32:
                raise ValueError(f"an Ed25519 seed is 32 bytes, not {len(seed)}")
            private_ed = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
            public = private_ed.public_key().public_bytes_raw()
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError(
            f"cannot read the {key.algorithm.value} private key for "
            f"d={key.domain} s={key.selector} from {key.key_file}: {exc}"
        ) from exc
    return f"v=DKIM1; k={key.algorithm.value}; p={base64.b64encode(public).decode('ascii')}"


def replaced(old: Sequence[DkimKey], new: Sequence[DkimKey]) -> list[DkimKey]:
    """The keys of ``new`` that are another key than ``old``'s of the same domain and
    selector. Mail queued signed with the old key fails DKIM once the one record
    the selector names publishes the new key: a key file removed and made again
    under its selector, as keygen's refusal once advised, broke the queue's mail."""
    before = {(key.domain, key.selector.lower()): key for key in old}
    found = []
    for key in new:
        was = before.get((key.domain, key.selector.lower()))
        if was is not None and was.private_key != key.private_key and _public(was) != _public(key):
            found.append(key)
    return found


def _public(key: DkimKey) -> str | None:
    """Its record's value; a file saved again (CR LF, another PEM form) is the same key."""
    try:
        return public_record_value(key)
    except ValueError:
        return None


def zone_record(domain: str, selector: str, value: str) -> str:
    """``value`` as a one-line zone-file TXT record, split into legal strings."""
    head, sep, key = value.partition("p=")
    strings = [head] if sep else []
    rest = sep + key if sep else value
    strings += [rest[i : i + _TXT_STRING_MAX] for i in range(0, len(rest), _TXT_STRING_MAX)]
    quoted = " ".join(f'"{s}"' for s in strings)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, from the first byte on."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; not overwriting a DKIM key: choose a new selector"
            " (mail signed with this key may still wait in the queue, and its record must"
            " stay published until it has gone)"
        ) from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # the umask may have taken the owner's bits
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
