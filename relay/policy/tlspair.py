"""A listener's certificate and key: read once, checked, and served as read.

Every worker builds its TLS context from the bytes the policy loader read
and checked, not from the files: a worker started later to replace a dead
one serves the pair the supervisor checked, even when the files have since
been replaced by a pair that does not match (which ``relay check`` and a
reload refuse). Before, such a worker failed at start, again and again.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

from relay.policy.model import TlsFiles


class UnusablePair(OSError):
    """A file of the pair the relay cannot use, and why, naming the file: its
    text is the whole message, as OpenSSL's (``PEM lib``) names neither.
    ``which``: ``cert`` or ``key``, the policy key that names the file."""

    def __init__(self, which: str, text: str) -> None:
        super().__init__(text)
        self.which = which


class _Passphrase(Exception):
    """OpenSSL asked for the key's passphrase."""


def read_pair(cert: Path, key: Path) -> TlsFiles:
    """Both files' bytes, loaded once as a server would: raises OSError or
    ssl.SSLError (a key that is not the certificate's, a half-written file)."""
    return checked_pair(cert, key, cert.read_bytes(), key.read_bytes())


def checked_pair(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> TlsFiles:
    """The pair as read (by the policy loader, which bounds what it reads), loaded
    once as a server would: raises ssl.SSLError or OSError."""
    pair = TlsFiles(cert, key, cert_pem, key_pem)
    server_context(pair)
    return pair


def server_context(pair: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _in_memory(pair.cert_pem) as cert, _in_memory(pair.key_pem) as key:
        try:
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except _Passphrase:
            raise UnusablePair("key", _encrypted(pair.key)) from None
    return context


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
