"""A listener's certificate and key: read once, checked, and served as read.

Every worker builds its TLS context from the bytes the policy loader read
and checked, not from the files: a worker started later to replace a dead
one serves the pair the supervisor checked, even when the files have since
been replaced by a pair that does not match (which ``relay check`` and a
reload refuse). Before, such a worker failed at start, again and again.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.policy.model import TlsFiles, TlsVersion

_CERT = b"-----BEGIN CERTIFICATE-----"
_KEY = b"PRIVATE KEY-----"  # PKCS#8, or BEGIN RSA / EC PRIVATE KEY


class UnusablePair(OSError):
    """A file of the pair the relay cannot use, and why, naming the file: its
    text is the whole message, as OpenSSL's (``PEM lib``) names neither.
    ``which``: ``cert`` or ``key``, the policy key that names the file."""

    def __init__(self, which: str, text: str) -> None:
        super().__init__(text)
        self.which = which


class _Passphrase(Exception):
    """OpenSSL asked for the key's passphrase."""


def read_pair(cert: Path, key: Path, min_version: TlsVersion = TlsVersion.V1_2) -> TlsFiles:
    """Both files' bytes, loaded once as a server would: raises OSError or
    ssl.SSLError (a key that is not the certificate's, a half-written file)."""
    return checked_pair(cert, key, cert.read_bytes(), key.read_bytes(), min_version)


def checked_pair(
    cert: Path,
    key: Path,
    cert_pem: bytes,
    key_pem: bytes,
    min_version: TlsVersion = TlsVersion.V1_2,
) -> TlsFiles:
    """The pair as read (by the policy loader, which bounds what it reads), loaded
    once as a server would: raises ssl.SSLError or OSError."""
    pair = TlsFiles(cert, key, cert_pem, key_pem, min_version)
    server_context(pair)
    return pair


VERSIONS = {
    TlsVersion.V1_0: ssl.TLSVersion.TLSv1,
    TlsVersion.V1_1: ssl.TLSVersion.TLSv1_1,
    TlsVersion.V1_2: ssl.TLSVersion.TLSv1_2,
    TlsVersion.V1_3: ssl.TLSVersion.TLSv1_3,
}
#: Python's own cipher list at security level 0: OpenSSL 3 refuses TLS 1.0 and
#: 1.1 from level 1 up (their handshake signs with SHA-1), whatever the minimum
_LEGACY_CIPHERS = (
    "DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK:@SECLEVEL=0"
)


def server_context(pair: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if pair.min_version in (TlsVersion.V1_0, TlsVersion.V1_1):
        context.set_ciphers(_LEGACY_CIPHERS)
    with warnings.catch_warnings():  # Python deprecates the names of TLS 1.0 and 1.1
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = VERSIONS[pair.min_version]
    with _in_memory(pair.cert_pem) as cert, _in_memory(pair.key_pem) as key:
        try:
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except _Passphrase:
            raise UnusablePair("key", _encrypted(pair.key)) from None
        except ssl.SSLError as exc:
            wrong = _wrong_file(pair) or _not_its_key(pair, exc)
            if wrong is not None:
                raise wrong from exc
            raise
    return context


_MISMATCH = ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED")


def _not_its_key(pair: TlsFiles, error: ssl.SSLError) -> UnusablePair | None:
    """OpenSSL says ``no certificate assigned`` for an RSA key with an ECDSA
    certificate (or the reverse), the likeliest mismatch when a renewal
    switches algorithms: it is the key that is not the certificate's."""
    if error.reason not in _MISMATCH:
        return None
    kinds = ""
    try:
        first, *later = (c.public_key() for c in x509.load_pem_x509_certificates(pair.cert_pem))
        key = serialization.load_pem_private_key(pair.key_pem, None).public_key()
        if key in later:
            return UnusablePair("cert", _out_of_order(pair, 2 + later.index(key)))
        if _kind(key) != _kind(first):
            kinds = f" (an {_kind(key)} key; the certificate's is {_kind(first)})"
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion):
        pass
    said = f"{pair.key} is not the key of the certificate in {pair.cert}{kinds}"
    return UnusablePair("key", said)


def _out_of_order(pair: TlsFiles, place: int) -> str:
    """The key is right, the chain's order is not: saying the key is wrong sent
    the sysadmin looking for another one."""
    return (
        f"{pair.cert} has the certificate of {pair.key} in place {place}, not first:"
        " write the server's certificate first, then the intermediates"
    )


def _kind(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC"
    return type(public_key).__name__.removesuffix("PublicKey")


def _wrong_file(pair: TlsFiles) -> UnusablePair | None:
    """Which file is wrong, and what it holds: OpenSSL says ``PEM lib`` for a DER
    certificate, swapped files, an empty or a truncated one. None when each
    file holds what it should (a key that is not the certificate's)."""
    wrong = _cert_problem(pair.cert_pem)
    if wrong is not None:
        return UnusablePair("cert", f"{pair.cert} {wrong}")
    wrong = _key_problem(pair.key_pem)
    if wrong is not None:
        return UnusablePair("key", f"{pair.key} {wrong}")
    return None


def _cert_problem(pem: bytes) -> str | None:
    if not pem.strip():
        return "is empty"
    if _CERT not in pem:
        if pem.startswith(b"\x30"):
            return "holds no PEM certificate: it looks binary (DER); convert it to PEM"
        if _KEY in pem:
            return "holds a private key, not a certificate: are cert and key swapped?"
        return "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        x509.load_pem_x509_certificates(pem)
    except (ValueError, x509.InvalidVersion):
        return "holds a damaged certificate (a file cut short, or edited?)"
    return None


def _key_problem(pem: bytes) -> str | None:
    if not pem.strip():
        return "is empty"
    if _KEY not in pem:
        if _CERT in pem:
            return "holds a certificate, not a private key: are cert and key swapped?"
        if pem.startswith(b"\x30"):
            return "holds no PEM private key: it looks binary (DER); convert it to PEM"
        return "holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
    try:
        serialization.load_pem_private_key(pem, None)
    except (ValueError, UnsupportedAlgorithm):
        return "holds a damaged private key (a file cut short, or edited?)"
    except TypeError:  # encrypted: OpenSSL would have asked, so the trouble is elsewhere
        return None
    return None


def not_after(pair: TlsFiles) -> datetime.datetime | None:
    """When the certificate stops being valid; None when only OpenSSL reads it."""
    try:
        return x509.load_pem_x509_certificates(pair.cert_pem)[0].not_valid_after_utc
    except (ValueError, x509.InvalidVersion):
        return None


#: a certificate ending this soon is warned of, here and in ``relay upstream test``:
#: renewals fail quietly
EXPIRY_WARNING = datetime.timedelta(days=14)


def ends_soon(pair: TlsFiles, now: datetime.datetime) -> str | None:
    """A warning for a certificate valid now that ends within ``EXPIRY_WARNING``:
    the metrics said so, but ``relay check``, which the sysadmin runs before a
    reload, did not, and clients refused it the day after."""
    ends = not_after(pair)
    if ends is None or not now <= ends < now + EXPIRY_WARNING:
        return None
    return (
        f"{pair.cert} ends on {ends:%Y-%m-%d %H:%M} UTC, within {EXPIRY_WARNING.days}"
        " days: renew it, then reload"
    )


def validity_problem(pair: TlsFiles, now: datetime.datetime) -> str | None:
    """Why clients would refuse the certificate at ``now`` (expired, or not yet
    valid), which OpenSSL loads without a word; None when it is valid, or when
    only OpenSSL can read it (an X.509 v2 certificate, which ``cryptography``
    refuses: OpenSSL judges its dates when it serves it)."""
    try:
        first = x509.load_pem_x509_certificates(pair.cert_pem)[0]
    except (ValueError, x509.InvalidVersion):
        return None
    if now > first.not_valid_after_utc:
        when = f"{first.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        return f"{pair.cert} expired on {when}: clients refuse it; renew it"
    if now < first.not_valid_before_utc:
        when = f"{first.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        return f"{pair.cert} is not valid before {when}: clients refuse it until then"
    return None


def _no_passphrase() -> bytes:
    """Without a callback OpenSSL prompts on the terminal for an encrypted key,
    which blocked ``relay check``, serve and a reload (SIGTERM then unheard)."""
    raise _Passphrase


def _encrypted(key: Path) -> str:
    return (
        f"{key} is encrypted (has a passphrase), which the relay cannot use;"
        f" write the key without one (openssl pkey -in {key} -out NEW_FILE)"
        " in a file only the relay's user can read"
    )


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``: it reads keys from files only."""
    fd = os.memfd_create("relay-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
