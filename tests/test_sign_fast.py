"""relay.sign's fast path against dkimpy's own ``dkim.sign``, byte for byte.

dkimpy is the reference because it is what the relay signed with before the
fast path, and receivers have verified those signatures for years. Every
comparison here calls dkimpy directly with the same message, key, header
list and clock; the outputs must be equal, not merely both verify.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import dkimfast
from relay.errors import SigningError
from relay.policy.model import DkimAlgorithm, DkimKey
from relay.sign import OVERSIGNED, WHEN_PRESENT, sign
from tests.dkimtools import assert_opendkim_ok, dkimpy_each, make_key

NOW = 1_790_000_000
_ALGORITHM = {DkimAlgorithm.RSA: b"rsa-sha256", DkimAlgorithm.ED25519: b"ed25519-sha256"}

HEAD = (
    b"From: Kari Nordmann <noreply@example.com>\r\n"
    b"To: Oystein <oystein@customer.example>\r\n"
    b"Subject: Faktura 10042\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <q1x2.20261123@relay.example.com>\r\n"
)
PDF = base64.encodebytes(random.Random(7).randbytes(60_000)).replace(b"\n", b"\r\n")
BIG = base64.encodebytes(random.Random(5).randbytes(3_750_000)).replace(b"\n", b"\r\n")


def _multipart(attachment: bytes) -> bytes:
    return (
        HEAD + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="=_b1"\r\n'
        b"\r\n"
        b"--=_b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"Hei \xc3\x98ystein,  \r\n"
        b"vedlagt f\xc3\xb8lger faktura 10042 p\xc3\xa5 1 250,00 kr.\t\r\n"
        b"\r\n"
        b"--=_b1\r\n"
        b'Content-Type: application/pdf; name="faktura-10042.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + attachment + b"--=_b1--\r\n"
    )


CORPUS: dict[str, bytes] = {
    "simple": HEAD + b"\r\nHello,\r\n\r\nthe invoice is attached.\r\n",
    "auto-submitted-twice": HEAD
    + b"Auto-Submitted: auto-generated\r\nauto-submitted:  auto-replied \r\n"
    + b"\r\nOut of office.\r\n",
    "multipart-attachment": _multipart(PDF),
    "folded-headers": (
        b"from: Kari <noreply@example.com>\r\n"
        b"TO: =?UTF-8?Q?=C3=98ystein?= <o@customer.example>,\r\n"
        b"\tPer <per@customer.example>,  \r\n"
        b"    Pal <pal@customer.example>\r\n"
        b"Subject:   Faktura\r\n \r\n\t10042   \r\n"
        b"Cc: a@example.org\r\nCc: b@example.org\r\n"
        b"Reply-To:\r\n kari@acme.example\r\n"
        b"X-Unsigned: \t kept out of h=\r\n"
        b"\r\nbody\r\n"
    ),
    "trailing-whitespace-and-empty-lines": (
        HEAD + b"\r\nline one \t \r\n\tindented\t line\r\n  \r\n\r\n \t\r\n\r\n\r\n"
    ),
    "no-trailing-crlf": HEAD + b"\r\nlast line has no line end",
    "no-trailing-crlf-but-blanks": HEAD + b"\r\nlast line ends in blanks \t ",
    "body-empty": HEAD + b"\r\n",
    "body-only-empty-lines": HEAD + b"\r\n\r\n\r\n \r\n\t\r\n",
    "no-body-separator": HEAD,
    "no-line-end-at-all": b"From: a@example.com",
    "long-lines": HEAD + b"\r\n" + b"x" * 120_000 + b" \r\n" + b"y y  " * 30_000 + b"\r\n",
    "line-longer-than-a-chunk": HEAD + b"\r\n" + (b"z" * 999 + b"  ") * 2_200 + b"\r\nend\r\n",
    "8bit": (
        HEAD + b"Content-Type: text/plain; charset=latin-1\r\n\r\n"
        b"\xe6\xf8\xe5 \xc6\xd8\xc5\t\xff\xfe\x85\x0b\x0c\xa0 end\r\n"
        + bytes(range(1, 256)).replace(b"\r", b"").replace(b"\n", b"")
        + b"\r\n"
    ),
    "nul-byte": HEAD + b"\r\nbefore\x00 after \r\n",
    "bare-lf": HEAD.replace(b"\r\n", b"\n") + b"\nunix \nline\tends\n\n\n",
    "mixed-line-ends-and-bare-cr": HEAD + b"\r\na\r\nb \n c\r \r\nd\r\r\n\r\n\r",
    "blank-lines-across-chunks": HEAD + b"\r\n" + (b"a" * 70 + b"\r\n" + b"\r\n" * 9_000) * 80,
    "5MB": _multipart(BIG),
}
# dkimpy is the reference where opendkim reads the input its own way: it
# canonicalises a bare CR or LF differently, and ``opendkim -t`` ignores a last
# line without a line end (SMTP never delivers one; DATA ends in CRLF) and
# a NUL byte (RFC 5322 forbids it; 8BITMIME does not allow it either).
OPENDKIM_SKIPS = {
    "nul-byte",
    "bare-lf",
    "mixed-line-ends-and-bare-cr",
    "no-line-end-at-all",
    "no-trailing-crlf",
    "no-trailing-crlf-but-blanks",
}

KEY_SETS = {
    "rsa2048": ("rsa2048",),
    "rsa1024": ("rsa1024",),
    "ed25519": ("ed25519",),
    "rsa2048+ed25519": ("rsa2048", "ed25519"),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DkimKey, dict[str, str]]]:
    directory = tmp_path_factory.mktemp("fastkeys")
    return {
        "rsa2048": make_key(directory, selector="s2048"),
        "rsa1024": make_key(directory, selector="s1024", bits=1024),
        "ed25519": make_key(directory, selector="e1", algorithm=DkimAlgorithm.ED25519),
    }


@contextmanager
def dkimpy_clock(now: float) -> Iterator[None]:
    """dkimpy reads t= from ``time.time()`` in its own namespace."""
    with mock.patch.object(dkim, "time", types.SimpleNamespace(time=lambda: now)):
        yield


def header_names(message: bytes) -> list[bytes]:
    """The policy's h= list, restated here from dkimpy's view of the header."""
    present = [name.lower() for name, _ in dkim.DKIM(message).headers]
    names: list[bytes] = []
    for name in (n.lower().encode() for n in OVERSIGNED):
        names += [name] * (present.count(name) + 1)
    for name in (n.lower().encode() for n in WHEN_PRESENT):
        if name in present:
            names += [name] * (present.count(name) + 1)
    return names


def reference(message: bytes, chosen: list[DkimKey], now: int = NOW) -> bytes:
    """What the relay signed with before: ``dkim.sign`` per key, RSA first."""
    ordered = sorted(chosen, key=lambda k: k.algorithm is not DkimAlgorithm.RSA)
    with dkimpy_clock(now + 0.999):
        return b"".join(
            dkim.sign(
                message,
                key.selector.encode(),
                key.domain.encode(),
                key.private_key,
                signature_algorithm=_ALGORITHM[key.algorithm],
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=header_names(message),
                linesep=b"\r\n",
            )
            for key in ordered
        )


def pick(keys: dict, names: tuple[str, ...]) -> tuple[list[DkimKey], dict[str, str]]:
    records = {record: value for n in names for record, value in keys[n][1].items()}
    return [keys[n][0] for n in names], records


def dkimpy_body_hash(body: bytes) -> bytes:
    """bh= as dkimpy computes it: its parser's body, its relaxed canonicalisation."""
    parsed = dkim.DKIM(b"From: a@example.com\r\n\r\n" + body).body
    return base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(parsed)).digest())


@pytest.mark.parametrize("key_set", KEY_SETS.values(), ids=KEY_SETS.keys())
@pytest.mark.parametrize("name", CORPUS.keys())
def test_fast_path_equals_dkimpy_and_verifies(
    keys: dict, name: str, key_set: tuple[str, ...], tmp_path: Path
) -> None:
    message = CORPUS[name]
    chosen, records = pick(keys, key_set)
    fields = sign(message, list(reversed(chosen)), now=NOW)
    assert fields == reference(message, chosen)
    assert dkimpy_each(fields + message, records) == [True] * len(chosen)
    if name not in OPENDKIM_SKIPS:
        assert_opendkim_ok(fields + message, records, tmp_path)


def test_corpus_exercises_what_it_claims() -> None:
    """Guards the corpus against edits that quietly drop the hard cases."""
    assert len(CORPUS["5MB"]) > 5_000_000
    assert dkim.DKIM(CORPUS["body-empty"]).body == b""
    assert dkim.DKIM(CORPUS["no-body-separator"]).body == b""
    long_line = max(len(line) for line in CORPUS["line-longer-than-a-chunk"].split(b"\n"))
    assert long_line > 2 * dkimfast._CHUNK
    assert len(CORPUS["blank-lines-across-chunks"]) > dkimfast._CHUNK


def test_default_clock_is_now(keys: dict) -> None:
    key = keys["ed25519"][0]
    message = CORPUS["simple"]
    before = int(time.time())
    fields = sign(message, [key])
    after = int(time.time())
    stamps = [int(t) for t in range(before, after + 1)]
    assert any(fields == sign(message, [key], now=t) for t in stamps)
    assert fields in [reference(message, [key], now=t) for t in stamps]


def test_each_key_is_parsed_once(keys: dict) -> None:
    rsa_key, ed_key = keys["rsa2048"][0], keys["ed25519"][0]
    dkimfast.rsa_signer.cache_clear()
    dkimfast.ed25519_signer.cache_clear()
    with (
        mock.patch.object(
            dkimfast, "parse_pem_private_key", wraps=dkimfast.parse_pem_private_key
        ) as pem,
        mock.patch.object(
            dkimfast.nacl.signing, "SigningKey", wraps=dkimfast.nacl.signing.SigningKey
        ) as seed,
    ):
        for _ in range(3):
            sign(CORPUS["simple"], [rsa_key, ed_key], now=NOW)
    assert pem.call_count == 1
    assert seed.call_count == 1


def test_the_body_is_canonicalised_once_for_all_keys(keys: dict) -> None:
    chosen = [keys["rsa2048"][0], keys["rsa1024"][0], keys["ed25519"][0]]
    with mock.patch.object(
        dkimfast, "relaxed_body_hash", wraps=dkimfast.relaxed_body_hash
    ) as body_hash:
        fields = sign(CORPUS["multipart-attachment"], chosen, now=NOW)
    assert body_hash.call_count == 1
    assert fields == reference(CORPUS["multipart-attachment"], chosen)


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@example.com\r\nno colon here\r\n\r\nbody\r\n",
        b"From: a@example.com\r\n: empty name\r\n\r\nbody\r\n",
    ],
)
def test_a_message_dkimpy_cannot_parse_is_refused_alike(keys: dict, message: bytes) -> None:
    with pytest.raises(dkim.MessageFormatError):
        dkim.DKIM(message)
    with pytest.raises(SigningError, match="cannot be parsed"):
        sign(message, [keys["ed25519"][0]], now=NOW)


def test_an_inconsistent_rsa_key_is_refused_where_dkimpy_signed_garbage(keys: dict) -> None:
    """OpenSSL checks the numbers; dkimpy's CRT signs with a broken key anyway."""
    good, records = keys["rsa1024"]
    numbers = serialization.load_pem_private_key(good.private_key, None).private_numbers()
    bad = rsa.RSAPrivateNumbers(
        numbers.p,
        numbers.q,
        numbers.d,
        numbers.dmp1 + 2,
        numbers.dmq1,
        numbers.iqmp,
        numbers.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)
    pem = bad.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    broken = DkimKey(good.domain, good.selector, good.algorithm, Path("/keys/broken"), pem)
    message = CORPUS["simple"]
    assert dkimpy_each(reference(message, [broken]) + message, records) == [False]
    with pytest.raises(SigningError, match=r"d=example\.com s=s1024"):
        sign(message, [broken], now=NOW)


def test_a_policy_of_more_keys_than_a_cache_held_reads_each_key_once() -> None:
    """The signers were kept for 64 keys: a platform of 65 verified domains read
    a key again, 40 to 100 ms, at nearly every message."""
    pems = [
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        for _ in range(70)
    ]
    keys = [
        DkimKey(f"d{n}.example", "s1", DkimAlgorithm.RSA, Path(f"/keys/{n}"), pem)
        for n, pem in enumerate(pems)
    ]
    dkimfast.rsa_signer.cache_clear()
    with mock.patch.object(
        dkimfast, "parse_pem_private_key", wraps=dkimfast.parse_pem_private_key
    ) as pem:
        for _ in range(2):
            for key in keys:
                sign(CORPUS["simple"], [key], now=NOW)
    assert pem.call_count == len(keys)


def _numbers(**changed: int) -> rsa.RSAPrivateNumbers:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_numbers()
    fields = {name: getattr(numbers, name) for name in ("p", "q", "d", "dmp1", "dmq1", "iqmp")}
    fields.update(changed)
    return rsa.RSAPrivateNumbers(**fields, public_numbers=numbers.public_numbers)


def test_the_numbers_of_a_key_are_checked_without_openssls_primality_tests() -> None:
    """OpenSSL is given them unchecked, as its own check cost 40 to 100 ms a key
    at every start: what it would have refused, but composite primes, is refused here."""
    good = _numbers()
    assert dkimfast._numbers_agree(good)
    for name, delta in (("p", 2), ("q", 2), ("d", 2), ("dmp1", 2), ("dmq1", 2), ("iqmp", 1)):
        bad = _numbers(**{name: getattr(good, name) + delta})
        assert not dkimfast._numbers_agree(bad), name
    swapped = rsa.RSAPrivateNumbers(
        good.q, good.p, good.d, good.dmq1, good.dmp1, good.iqmp, good.public_numbers
    )
    assert not dkimfast._numbers_agree(swapped)  # iqmp is q's inverse mod p
    public = good.public_numbers
    # the private numbers agree among themselves, the public ones are another key's
    for e, n in ((public.e + 2, public.n), (public.e, public.n + 2)):
        other = rsa.RSAPrivateNumbers(
            good.p, good.q, good.d, good.dmp1, good.dmq1, good.iqmp, rsa.RSAPublicNumbers(e, n)
        )
        assert not dkimfast._numbers_agree(other), (e, n)


# --- properties -------------------------------------------------------------

# Weighted towards what canonicalisation cares about: blanks, line ends, CR.
_BODY_BYTES = st.lists(
    st.sampled_from([b" ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"Z", b"\xc3\xb8", b"\x00", b"  "]),
    max_size=200,
).map(b"".join)
_BODIES = st.one_of(_BODY_BYTES, st.binary(max_size=300))


@settings(max_examples=400, deadline=None)
@given(body=_BODIES, chunk=st.integers(min_value=1, max_value=64))
def test_body_hash_equals_dkimpy_for_any_body_and_chunk_size(body: bytes, chunk: int) -> None:
    """A tiny chunk puts a chunk edge inside every run of blanks and line ends."""
    with mock.patch.object(dkimfast, "_CHUNK", chunk):
        assert dkimfast.relaxed_body_hash(body) == dkimpy_body_hash(body)


_HEADER_BYTES = st.lists(
    st.sampled_from([b" ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"Z", b"\xc3\xb8", b"\x0b", b"  "]),
    max_size=40,
).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(
    fields=st.lists(
        st.tuples(st.one_of(_HEADER_BYTES, st.binary(max_size=12)), _HEADER_BYTES), max_size=6
    )
)
def test_header_canonicalisation_equals_dkimpy(fields: list[tuple[bytes, bytes]]) -> None:
    assert dkimfast.relaxed_headers(fields) == Relaxed.canonicalize_headers(fields)


_NAMES = st.sampled_from(
    ["From", "from", "To", "Cc", "Subject", "SUBJECT", "Date", "Reply-To", "X-Other", "Received"]
)
_VALUE_TEXT = st.lists(
    st.sampled_from(
        [b" ", b"\t", b"a", b"b@example.com", b"=?UTF-8?Q?=C3=98?=", b"\xc3\xa5", b";"]
    ),
    max_size=12,
).map(b"".join)
_FOLDS = st.sampled_from([b"\r\n ", b"\r\n\t", b"\r\n  \t"])


@st.composite
def _header_field(draw: st.DrawFn) -> bytes:
    segments = draw(st.lists(_VALUE_TEXT, min_size=1, max_size=3))
    folds = [draw(_FOLDS) for _ in segments[1:]]
    value = segments[0] + b"".join(f + s for f, s in zip(folds, segments[1:], strict=True))
    return draw(_NAMES).encode() + b":" + value + b"\r\n"


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(_header_field(), max_size=8))
    fields.insert(draw(st.integers(0, len(fields))), b"From: a@example.com\r\n")
    head = b"".join(fields) + b"\r\n"
    if draw(st.booleans()):
        head = head.replace(b"\r\n", b"\n")
    return head + draw(_BODIES)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    message=_message(),
    key_set=st.sampled_from(list(KEY_SETS.values())),
    now=st.integers(min_value=0, max_value=4_000_000_000),
)
def test_signature_equals_dkimpy_for_any_message(
    keys: dict, message: bytes, key_set: tuple[str, ...], now: int
) -> None:
    chosen, _ = pick(keys, key_set)
    assert sign(message, chosen, now=now) == reference(message, chosen, now=now)


def test_large_random_body_hash_equals_dkimpy() -> None:
    """Several chunks of mixed text, blanks and line ends at the real chunk size."""
    rnd = random.Random(11)
    pieces = [b" ", b"\t", b"\r\n", b"\n", b"\r", b"word", b"  \t ", b"\r\n\r\n"]
    body = b"".join(rnd.choices(pieces, k=1_200_000)) + os.urandom(100)
    assert len(body) > 2 * dkimfast._CHUNK
    assert dkimfast.relaxed_body_hash(body) == dkimpy_body_hash(body)
