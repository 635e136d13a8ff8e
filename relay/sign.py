"""DKIM signatures for outgoing messages.

``sign`` returns only the DKIM-Signature fields, not a signed copy: messages
can be tens of megabytes and the caller already holds them, so it decides how
to join the two (one concatenation, or two writes to the socket).

The fields are byte for byte what ``dkim.sign`` (dkimpy) makes; the work is
done by ``relay.dkimfast``, which reads each key once and hashes the body once
for all keys instead of dkimpy's pure-Python RSA and per-key body passes.

Canonicalisation is relaxed/relaxed (the only one dkimfast does): it survives
the header refolding and trailing-whitespace changes upstream MTAs and their
content scanners are known to make.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import dkim

from relay import dkimfast
from relay.errors import SigningError
from relay.policy.model import DkimAlgorithm, DkimKey

# Each is signed for every occurrence and once more (RFC 6376 8.15): the extra
# entry matches no field, so a verifier fails if one is added later. These are
# signed even when absent: a Reply-To, Subject or Cc added to an invoice on its
# way ("new bank details, reply here") would otherwise pass DKIM and DMARC.
# The relay writes From, Date and Message-ID itself, so no hop adds them.
OVERSIGNED: tuple[str, ...] = ("From", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID")
# These are signed (and oversigned) only when present: some hops add a missing
# MIME-Version, and the rest are absent from most plain messages. RFC 8058 4
# wants the one-click unsubscribe fields under a valid signature; with the From
# rewritten, the relay's is the only one that aligns. Auto-Submitted (RFC 3834,
# on every failure notice and many ERP documents) is what keeps auto-responders
# from answering: a hop could otherwise remove or change it unnoticed.
WHEN_PRESENT: tuple[str, ...] = (
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Auto-Submitted",
)

_ALGORITHMS = {
    DkimAlgorithm.RSA: b"rsa-sha256",
    DkimAlgorithm.ED25519: b"ed25519-sha256",
}
_SIGNERS = {
    DkimAlgorithm.RSA: dkimfast.rsa_signer,
    DkimAlgorithm.ED25519: dkimfast.ed25519_signer,
}


def sign(message: bytes, keys: Sequence[DkimKey], *, now: int | None = None) -> bytes:
    """The DKIM-Signature fields for ``message``, one per key, RSA first.

    RSA goes first because some receivers only look at the topmost signature
    and not all of them understand Ed25519 yet. The signatures do not cover
    each other, so each verifies on its own. ``now`` (Unix seconds, for t=)
    lets tests compare against dkimpy; all signatures of a call share it.
    """
    if not keys:
        return b""
    ordered = sorted(keys, key=lambda k: k.algorithm is not DkimAlgorithm.RSA)
    try:
        prepared = dkimfast.Message(message)
    except dkim.DKIMException as exc:
        reason = _reason(exc)
        raise SigningError(f"{_who(ordered)}: the message cannot be parsed: {reason}") from exc
    if not any(field[0].lower() == b"from" for field in prepared.headers):
        raise SigningError(f"{_who(ordered)}: the message has no From header field")
    names = _header_names(prepared.headers)
    timestamp = int(time.time()) if now is None else now
    return b"".join(_sign_one(prepared, key, names, timestamp) for key in ordered)


def _header_names(headers: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The h= list: each wanted field per occurrence, plus its oversigning.

    See OVERSIGNED and WHEN_PRESENT.
    """
    present = Counter(field[0].lower() for field in headers)
    names: list[bytes] = []
    for name in (n.lower().encode("ascii") for n in OVERSIGNED):
        names += [name] * (present[name] + 1)
    for name in (n.lower().encode("ascii") for n in WHEN_PRESENT):
        if present[name]:
            names += [name] * (present[name] + 1)
    return names


def _sign_one(
    prepared: dkimfast.Message, key: DkimKey, names: list[bytes], timestamp: int
) -> bytes:
    try:
        return prepared.sign(
            algorithm=_ALGORITHMS[key.algorithm],
            domain=key.domain.encode("ascii"),
            selector=key.selector.encode("ascii"),
            signer=_SIGNERS[key.algorithm](key.private_key),
            include_headers=names,
            timestamp=timestamp,
        )
    # ValueError: binascii, encoding and OpenSSL's key checks raise it.
    except (dkim.DKIMException, ValueError) as exc:
        raise SigningError(
            f"d={key.domain} s={key.selector} ({key.algorithm.value} key {key.key_file}): "
            f"{_reason(exc)}"
        ) from exc


def _who(keys: Sequence[DkimKey]) -> str:
    return ", ".join(f"d={k.domain} s={k.selector}" for k in keys)


def _reason(exc: Exception) -> str:
    """dkimpy's texts can span lines; the log wants one."""
    return " ".join(str(exc).split()) or type(exc).__name__
