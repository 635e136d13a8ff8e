"""A DKIM key is checked by signing with it, as the relay will, when the policy loads.

Reading the file is not enough: a file that is no key, or a key of the
other algorithm, passed ``relay check`` and a reload, and then every
message was refused with ``451 DKIM signing failed``. One signature of a
small message through ``relay.sign`` takes the same path as a real one
(and leaves the parsed key in its cache for the first message), so what
passes here signs there. When it fails, the file is looked at to say what
it holds instead, and what the relay expects.
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x448, x25519
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from relay.errors import SigningError
from relay.keygen import MAX_RSA_BITS, MIN_RSA_BITS, STRONG_RSA_BITS, ed25519_seed
from relay.policy.model import DkimAlgorithm, DkimKey
from relay.sign import sign

_SAMPLE = b"From: <postmaster@example.invalid>\r\nSubject: key check\r\n\r\nkey check\r\n"
_NAMES = {DkimAlgorithm.RSA: "RSA", DkimAlgorithm.ED25519: "Ed25519"}
_EXPECTED = {
    DkimAlgorithm.RSA: "an RSA private key in PEM form",
    DkimAlgorithm.ED25519: "an Ed25519 private key: the base64 of its 32-byte seed, or PEM",
}
_PRIVATE = b"PRIVATE KEY-----"
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PUBLIC = b"PUBLIC KEY-----"
_BLOCK = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----\n.*?^-----END \1-----$", re.M | re.S)
_INDENTED = re.compile(rb"^[ \t]+-----BEGIN ", re.M)
_SEED = re.compile(rb"[A-Za-z0-9+/]{43}=")  # 32 bytes in base64
_SEEDS_LINE = re.compile(rb"^[ \t]*(?:[A-Za-z0-9+/]{43}=[ \t]*)+\r?$", re.M)  # seeds alone


def as_signed(algorithm: DkimAlgorithm, data: bytes) -> bytes:
    """An Ed25519 key in PEM as the base64 of its seed, which the signer reads
    (``keygen.ed25519_seed``): such a key was refused, with no way given to
    convert it. An RSA key saved after its certificate as the key alone
    (``_key_alone``). Anything else as read: the test signature says what is
    wrong with it."""
    if algorithm is not DkimAlgorithm.ED25519:
        return _key_alone(data)
    if _key_count(data, algorithm) > 1:
        return data  # for ``problem`` to refuse: as a seed, the first key's passed
    return ed25519_seed(data) or data


def _key_alone(data: bytes) -> bytes:
    """The private key of a file that holds it with certificates (a TLS bundle,
    ``cat cert.pem key.pem``), else ``data``: the signer's parser reads the
    first PEM block as the key, and with the certificate first refused the
    file as a key not "encoded in PKCS#1". One key only: of two, which is
    the DKIM key is not known."""
    blocks = _blocks(data)
    keys = [block for label, block in blocks if _private(label)]
    others = {label for label, _ in blocks if not _private(label)}
    if len(keys) != 1 or not others <= {b"CERTIFICATE", b"TRUSTED CERTIFICATE"}:
        return data
    return keys[0] + b"\n"


def _blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Each PEM block whose lines begin at their start, with its label."""
    return [(found[1], found[0]) for found in _BLOCK.finditer(data)]


def _private(label: bytes) -> bool:
    return label.endswith(b"PRIVATE KEY")


def problem(key: DkimKey) -> str | None:
    """None when the relay can sign with ``key``, else what is wrong, for the sysadmin."""
    refused = _size(key) or _several_keys(key)
    if refused is not None:
        return refused
    try:
        sign(_SAMPLE, [key], now=0)
    except SigningError as exc:
        cause = exc.__cause__ or exc
        return _explain(key, " ".join(str(cause).split()) or type(cause).__name__)
    return None


def _size(key: DkimKey) -> str | None:
    """A key made elsewhere (``relay dkim keygen`` makes none of these) signs, and
    receivers fail the signature: every one under 1024 bits, and those that
    verify only what they must over 4096, which also took every worker 3.5 s
    to load at a reload (8192 bits), mail waiting meanwhile. Looked at before
    the test signature, which is that load."""
    bits = _rsa_bits(key)
    if bits is None or MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        return None
    return (
        f"an RSA key of {bits} bits, which receivers refuse (RFC 8301: verifiers take"
        f" {MIN_RSA_BITS} to {MAX_RSA_BITS}); make a new one with relay dkim keygen"
    )


def weak(key: DkimKey) -> str | None:
    """Why a key the relay signs with is shorter than it should be, else None.
    Receivers still take 1024 bits, so a warning, not a refusal: RFC 8301
    has signers use 2048 bits or more, and a 1024-bit key passed unsaid."""
    bits = _rsa_bits(key)
    if bits is None or bits >= STRONG_RSA_BITS:
        return None
    return (
        f"{key.key_file} is an RSA key of {bits} bits: RFC 8301 has signers use"
        f" {STRONG_RSA_BITS} bits or more; make one with relay dkim keygen under a new"
        ' selector (README, "Rotating a DKIM key")'
    )


def _rsa_bits(key: DkimKey) -> int | None:
    if key.algorithm is not DkimAlgorithm.RSA:
        return None
    try:  # read as the signer reads it: dkimpy takes labels and forms cryptography does not
        return int(parse_pem_private_key(key.private_key)["modulus"]).bit_length()
    except (UnparsableKeyError, ValueError, KeyError, TypeError):
        return None  # the test signature says what it is instead


def _explain(key: DkimKey, reason: str) -> str:
    layout = _layout(key.private_key)
    if layout is not None:
        return layout
    held = _held(key.private_key)
    wanted = key.algorithm
    if held is None:
        other = _other_content(key)
        return f"not {_EXPECTED[wanted]} ({reason})" if other is None else other
    if held is not wanted:
        return (
            f"an {_NAMES[held]} key, but algorithm says {wanted.value}:"
            f" set algorithm: {held.value}, or name the {_NAMES[wanted]} key"
        )
    return f"an {_NAMES[held]} key the relay cannot sign with ({reason})"


def _layout(data: bytes) -> str | None:
    """What keeps the signer's parser from the key in a PEM file, which it
    looks for as the first block whose lines begin at their start: its own
    words (``Private key not found``, ``are you sure it is encoded in
    PKCS#1``) sent the sysadmin looking at a key that was sound."""
    if _INDENTED.search(data):
        return (
            "its PEM lines are indented (white space before -----BEGIN), which the signer"
            " does not read: write the key plain, each line at its start, as openssl and"
            " relay dkim keygen write it"
        )
    labels = [label for label, _ in _blocks(data)]
    if any(_private(label) for label in labels) and not _private(labels[0]):
        return (
            f"holds a {labels[0].decode()} block before the private key, which the signer"
            " reads as the key: put the key alone in the file"
        )
    return None


def _several_keys(key: DkimKey) -> str | None:
    """Looked at before the test signature, which passes with the first key: a
    rotation's ``cat new.pem old.pem`` signed with the one first, whichever
    DNS publishes, and all mail failed DKIM. Ed25519 seeds are words of base64
    on lines of their own: text beside a key (its DNS record's ``p=``) is none."""
    keys = _key_count(key.private_key, key.algorithm)
    if keys < 2:
        return None
    return (
        f"holds {keys} private keys, and the signer reads the first only:"
        " put the DKIM key alone in the file"
    )


def _key_count(data: bytes, algorithm: DkimAlgorithm) -> int:
    keys = sum(1 for label, _ in _blocks(data) if _private(label))
    if algorithm is DkimAlgorithm.ED25519:
        lines = _SEEDS_LINE.finditer(_BLOCK.sub(b"", data))
        keys += sum(len(_SEED.findall(line[0])) for line in lines)
    return keys


def _other_content(key: DkimKey) -> str | None:
    """What a PEM file holds that is not a usable private key: the parser's own
    words (``are you sure it is encoded in PKCS#1``) sent the sysadmin looking
    at the encoding of a key that had a passphrase, or was a certificate."""
    data = key.private_key
    if _encrypted(data):
        return (
            f"encrypted with a passphrase, which the relay cannot use; write the key without"
            f" one (openssl pkey -in {key.key_file} -out NEW_FILE) in a file only the relay's"
            " user can read"
        )
    kind = _other_kind(data)
    if kind is not None:
        return (
            f"{kind} key, which DKIM does not sign with (it takes RSA and Ed25519):"
            f" name the {_NAMES[key.algorithm]} key"
        )
    if _PRIVATE not in data and _CERTIFICATE in data:
        return "holds a certificate, not a private key: name the key file of the DKIM key"
    if _PRIVATE not in data and _PUBLIC in data:
        return "holds a public key, not the private key: name the key file of the DKIM key"
    return None


#: An X25519 key, Ed25519's sibling for key exchange, was told it was not a
#: key in PEM form, which it is.
_OTHER_KINDS = (
    (x25519.X25519PrivateKey, "an X25519"),
    (x448.X448PrivateKey, "an X448"),
    (ed448.Ed448PrivateKey, "an Ed448"),
    (ec.EllipticCurvePrivateKey, "an EC"),
)


def _other_kind(data: bytes) -> str | None:
    """The kind of a private key DKIM does not sign with, with its article."""
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return next((name for kind, name in _OTHER_KINDS if isinstance(private, kind)), None)


def _encrypted(data: bytes) -> bool:
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        return True
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return False


def _held(data: bytes) -> DkimAlgorithm | None:
    """Which kind of key the file holds, if any."""
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private = None
    if isinstance(private, rsa.RSAPrivateKey):
        return DkimAlgorithm.RSA
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return DkimAlgorithm.ED25519
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return DkimAlgorithm.ED25519 if len(seed) == 32 else None
