"""A throw-away CA and a server certificate (for 127.0.0.1, ::1 and localhost by default)."""

from __future__ import annotations

import datetime
import ipaddress
import smtplib
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certs:
    ca: Path  # PEM: point SSL_CERT_FILE here to trust the server
    cert: Path
    key: Path


def make_certs(
    directory: Path,
    names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    days: int = 1,
    expired: bool = False,
    ca_expired: bool = False,
    early: bool = False,
    ca_early: bool = False,
) -> Certs:
    """A CA and a server certificate for ``names``, valid for ``days``; with
    ``expired``, a server certificate whose ``days`` ended a minute ago; with
    ``ca_expired``, a CA whose day ended a minute ago (a private CA not renewed);
    with ``early`` or ``ca_early``, the one valid from an hour on."""
    now = datetime.datetime.now(datetime.UTC)
    ahead = datetime.timedelta(hours=1, minutes=5)
    start = now - datetime.timedelta(days=days, minutes=1) if expired else now
    start += ahead if early else datetime.timedelta()
    ca_start = now - datetime.timedelta(days=1, minutes=1) if ca_expired else now
    ca_start += ahead if ca_early else datetime.timedelta()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca_start - datetime.timedelta(minutes=5))
        .not_valid_after(ca_start + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [_alt_name(name) for name in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return _written(paths, cert, key)


def self_signed(
    directory: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
) -> Certs:
    """A server certificate signed by its own key, no CA: ``ca`` is the certificate."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    return _written(
        Certs(directory / "self.pem", directory / "self.pem", directory / "self.key"), cert, key
    )


def _written(paths: Certs, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Certs:
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def server_context(certs: Certs) -> ssl.SSLContext:
    """What a test server presents: the leaf certificate and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    return context


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def served_certificate(port: int, implicit: bool = False) -> bytes:
    """The certificate (DER) a STARTTLS session is shown; with ``implicit``, one
    that begins with the handshake (a listener's ``mode: implicit``)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # which one is served is the question, not trust
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=context)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    with client:
        if not implicit:
            client.ehlo()
            client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        served = client.sock.getpeercert(binary_form=True)
    assert served is not None
    return served


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def checked_after_handshake(sock: socket.socket, ca: Path, reset: bool = False) -> bool:
    """Whether ``ca`` signed the certificate served, checked as GnuTLS (msmtp),
    PHP, Java and Node check it: once the handshake is done, after which the
    connection is closed, before any command; with ``reset``, by a reset, as
    Node closes it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # checked below, after the handshake
    with context.wrap_socket(sock) as tls:
        served = tls.getpeercert(binary_form=True)
        if reset:
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert served is not None
    issuer = x509.load_pem_x509_certificate(ca.read_bytes())
    try:
        x509.load_der_x509_certificate(served).verify_directly_issued_by(issuer)
    except (ValueError, InvalidSignature):
        return False
    return True
