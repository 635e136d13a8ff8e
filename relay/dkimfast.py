"""dkimpy's relaxed/relaxed ``DKIM.sign``, without its slow parts.

dkimpy signs RSA in pure Python (about 7 ms a signature, and the PEM is
parsed again on every call) and canonicalises the body as several copies of
the whole message, once per key. Here each key is parsed once (RSA then signs
in OpenSSL, Ed25519 in libsodium as before), and the body is hashed once, in
bounded chunks, for every signature of the message.

Everything that decides an output byte, i.e. header parsing, header
canonicalisation, tag order, folding and the b= placeholder trick, is either
dkimpy's own function or a transcription of ``DKIM.sign`` and
``DomainSigner.gen_header`` from dkimpy 1.1.8; the header and body
canonicalisations are redone with bytes methods and held to dkimpy's by
property tests. tests/test_sign_fast.py compares the output with
``dkim.sign`` byte for byte, so an upgrade that changes any of it fails
there rather than in a receiver's verifier.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
from collections.abc import Callable, Sequence

import dkim
import nacl.encoding
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

#: Signs a SHA-256 digest, as both rsa-sha256 and ed25519-sha256 do (RFC 8463).
Signer = Callable[[bytes], bytes]

_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_FIELD = b"DKIM-Signature"
_LINESEP = b"\r\n"
_PLACEHOLDER = b"0" * 60  # dkimpy's: it makes b= fold onto its own line
# Big enough that per-chunk overhead vanishes, small enough to stay in cache.
_CHUNK = 1 << 20
_TAB_TO_SPACE = bytes.maketrans(b"\t", b" ")
_EMPTY_LINE = re.compile(rb"\n\r?\n")
_LEADING_LFCR = re.compile(rb"(?:\n\r)*")


class Message:
    """One message prepared for signing: header fields parsed, body hashed once.

    The body is never copied whole: it is canonicalised from ``message`` in
    chunks when the first signature asks for its hash.
    """

    def __init__(self, message: bytes) -> None:
        self._message = message
        self._body_start = _body_start(message)
        #: ``[name, value]`` pairs exactly as ``dkim.DKIM(message).headers``.
        self.headers: list[list[bytes]] = dkim.rfc822_parse(message[: self._body_start])[0]
        self._relaxed_headers = relaxed_headers(self.headers)
        self._body_hash: bytes | None = None

    @property
    def body_hash(self) -> bytes:
        """bh=; the same for every key since all of them hash with SHA-256."""
        if self._body_hash is None:
            self._body_hash = relaxed_body_hash(self._message, self._body_start)
        return self._body_hash

    def sign(
        self,
        *,
        algorithm: bytes,
        domain: bytes,
        selector: bytes,
        signer: Signer,
        include_headers: Sequence[bytes],
        timestamp: int,
    ) -> bytes:
        """The DKIM-Signature field ``dkim.sign`` returns for these arguments.

        With relaxed/relaxed canonicalisation, no identity and no l=, which
        is all the relay uses; ``include_headers`` must be lower case.
        """
        include = tuple(include_headers)
        fields = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(timestamp).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", self.body_hash),
            (b"b", _PLACEHOLDER),
        ]
        unsigned = dkim.fold(_join(fields), namelen=len(_FIELD), linesep=_LINESEP)
        unsigned = dkim.RE_BTAG.sub(b"\\1", unsigned)
        hasher = hashlib.sha256()
        dkim.hash_headers(
            hasher,
            _RELAXED,
            self._relaxed_headers,
            include,
            (_FIELD, b" " + unsigned),
            dict(fields),
        )
        fields[-1] = (b"b", base64.b64encode(signer(hasher.digest())))
        folded = dkim.fold(_join(fields) + _LINESEP, namelen=len(_FIELD), linesep=_LINESEP)
        return _FIELD + b": " + folded


def relaxed_headers(headers: Sequence[Sequence[bytes]]) -> list[tuple[bytes, bytes]]:
    """dkimpy's relaxed header canonicalisation (``Relaxed.canonicalize_headers``)
    with bytes methods instead of two regular expressions per field, which were
    a tenth of signing's Python time: line ends dropped (a CR only with its LF),
    runs of blanks made one space, the value stripped, the name lower case."""
    out = []
    for name, value in headers:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
        if b"\t" in value:
            value = value.translate(_TAB_TO_SPACE)
        while b"  " in value:
            value = value.replace(b"  ", b" ")
        out.append((name.lower().rstrip(), value.strip() + _LINESEP))
    return out


def relaxed_body_hash(message: bytes, start: int = 0) -> bytes:
    """base64 SHA-256 of ``message[start:]`` as dkimpy canonicalises a body.

    dkimpy turns every LF into CRLF, then relaxes the whole body and strips
    its trailing empty lines. All of that is local to a line except the
    trailing empty lines, so chunks cut just after an LF are canonicalised
    on their own; CRLFs ending a chunk are held back until something other
    than an empty line follows them.
    """
    hasher = hashlib.sha256()
    held = 0
    wrote = False
    end = len(message)
    while start < end:
        stop = message.rfind(b"\n", start, start + _CHUNK) + 1
        if stop <= start:
            stop = message.find(b"\n", start + _CHUNK) + 1 or end
        chunk = _relax(message[start:stop])
        start = stop
        kept = chunk.rstrip(b"\r\n")
        # Only whole CRLFs count from the end: a bare CR before them stays.
        pairs = _LEADING_LFCR.match(chunk[len(kept) :][::-1]).end() // 2
        if pairs * 2 < len(chunk):
            hasher.update(_LINESEP * held)
            hasher.update(chunk[: len(chunk) - 2 * pairs])
            held = 0
            wrote = True
        held += pairs
    if wrote:
        hasher.update(_LINESEP)
    return base64.b64encode(hasher.digest())


def _relax(chunk: bytes) -> bytes:
    """One chunk of the body, line ends made CRLF and whitespace relaxed.

    dkimpy strips trailing whitespace and then squeezes runs to one space;
    squeezing first and then dropping the one space left before a CRLF gives
    the same bytes, and lets plain ``bytes`` methods do it. The squeeze needs
    log2(longest run) passes; base64 has no blank at all, which a memchr
    finds out before any slower pass.
    """
    if chunk.count(b"\n") != chunk.count(b"\r\n"):
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if b"\t" in chunk:
        chunk = chunk.translate(_TAB_TO_SPACE)
    if b" " in chunk:
        while b"  " in chunk:
            chunk = chunk.replace(b"  ", b" ")
        chunk = chunk.replace(b" \r\n", b"\r\n")
    return chunk


def _body_start(message: bytes) -> int:
    """Where dkimpy's ``rfc822_parse`` starts the body: after the first empty line.

    Its lines are split at CRLF or LF, so an empty line is an LF followed by
    LF or CRLF, or one at the very start. Without one, the body is empty.
    """
    if message.startswith(b"\n"):
        return 1
    if message.startswith(b"\r\n"):
        return 2
    found = _EMPTY_LINE.search(message)
    return len(message) if found is None else found.end()


def _join(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(b"=".join(field) for field in fields)


@functools.cache
def rsa_signer(pem: bytes) -> Signer:
    """An rsa-sha256 signer for a PEM key, read the way dkimpy reads it.

    dkimpy's own parser decides which files are keys, so a key is accepted
    or refused as before; OpenSSL then gets the same numbers and makes the
    same (deterministic) PKCS#1 v1.5 signature. The numbers are checked to
    form a key, where dkimpy would have signed garbage: here, rather than
    by OpenSSL, whose check tests p and q for primality, 40 to 100 ms a
    key, which every tool and every worker paid for each key at each start
    (35 s to start with 200 keys). Kept for as long as the process runs,
    one signer a key it has signed with: with a bounded cache, a policy of
    more keys than it held read a key again at every message, at that cost.
    """
    try:
        parts = parse_pem_private_key(pem)
    except UnparsableKeyError as exc:
        raise dkim.KeyFormatError(str(exc)) from exc
    numbers = rsa.RSAPrivateNumbers(
        p=parts["prime1"],
        q=parts["prime2"],
        d=parts["privateExponent"],
        dmp1=parts["exponent1"],
        dmq1=parts["exponent2"],
        iqmp=parts["coefficient"],
        public_numbers=rsa.RSAPublicNumbers(parts["publicExponent"], parts["modulus"]),
    )
    if not _numbers_agree(numbers):
        raise dkim.KeyFormatError("its numbers do not form an RSA key")
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    prehashed = utils.Prehashed(hashes.SHA256())
    pkcs1 = padding.PKCS1v15()

    def sign(digest: bytes) -> bytes:
        return key.sign(digest, pkcs1, prehashed)

    probe = hashlib.sha256(b"probe").digest()
    try:  # what receivers will do with its signatures
        key.public_key().verify(sign(probe), probe, pkcs1, prehashed)
    except InvalidSignature as exc:
        raise dkim.KeyFormatError("a signature made with it does not verify") from exc
    return sign


def _numbers_agree(key: rsa.RSAPrivateNumbers) -> bool:
    """What OpenSSL's key check asks of the numbers, but whether p and q are
    prime: where they agree OpenSSL may be given them unchecked."""
    p, q, d, n, e = key.p, key.q, key.d, key.public_numbers.n, key.public_numbers.e
    return (
        2 < p < n
        and 2 < q < n
        and p * q == n
        and 2 < e < n
        and key.dmp1 == d % (p - 1)
        and key.dmq1 == d % (q - 1)
        and key.iqmp * q % p == 1
        and e * d % math.lcm(p - 1, q - 1) == 1
    )


@functools.cache
def ed25519_signer(seed: bytes) -> Signer:
    """An ed25519-sha256 signer for a base64 seed, decoded as dkimpy does."""
    try:
        key = nacl.signing.SigningKey(seed, encoder=nacl.encoding.Base64Encoder)
    except nacl.exceptions.ValueError as exc:
        raise dkim.KeyFormatError("invalid ed25519 private key or format") from exc

    def sign(digest: bytes) -> bytes:
        return key.sign(digest).signature

    return sign
