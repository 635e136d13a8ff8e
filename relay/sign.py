"""DKIM signatures for outgoing messages.

``sign`` returns only the DKIM-Signature fields, not a signed copy: messages
can be tens of megabytes and the caller already holds them, so it decides how
to join the two (one concatenation, or two writes to the socket).

Signing goes through dkimpy, which parses the key on every call. That is
cheap next to hashing a large body; should it ever matter, a fast path can
cache a parsed key per ``DkimKey`` (it is frozen and hashable) and dispatch
on ``key.algorithm`` in ``_sign_one`` without changing the key format.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import dkim

from relay.errors import SigningError
from relay.policy.model import DkimAlgorithm, DkimKey

# A name listed n times is signed for each occurrence plus n - 1 more times:
# the extra entries match no field, so a verifier fails if one is added later
# (RFC 6376 8.15). From is the field a forger would add a second one of.
SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "From",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
)

_ALGORITHMS = {
    DkimAlgorithm.RSA: b"rsa-sha256",
    DkimAlgorithm.ED25519: b"ed25519-sha256",
}
# relaxed/relaxed survives the header refolding and trailing-whitespace
# changes upstream MTAs and their content scanners are known to make.
_CANONICALIZE = (b"relaxed", b"relaxed")
_LINESEP = b"\r\n"


def sign(message: bytes, keys: Sequence[DkimKey]) -> bytes:
    """The DKIM-Signature fields for ``message``, one per key, RSA first.

    RSA goes first because some receivers only look at the topmost signature
    and not all of them understand Ed25519 yet. The signatures do not cover
    each other, so each verifies on its own.
    """
    if not keys:
        return b""
    ordered = sorted(keys, key=lambda k: k.algorithm is not DkimAlgorithm.RSA)
    try:
        # One parse serves every key; dkimpy only reads it while signing.
        signer = dkim.DKIM(message, linesep=_LINESEP)
    except dkim.DKIMException as exc:
        reason = _reason(exc)
        raise SigningError(f"{_who(ordered)}: the message cannot be parsed: {reason}") from exc
    names = _header_names(signer.headers)
    if b"from" not in names:
        raise SigningError(f"{_who(ordered)}: the message has no From header field")
    return b"".join(_sign_one(signer, key, names) for key in ordered)


def _header_names(headers: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The h= list: each wanted field per occurrence, plus its oversigning.

    A field the message lacks is left out rather than signed as absent, so a
    hop that adds a missing Date or Message-ID does not break the signature.
    """
    present = Counter(field[0].lower() for field in headers)
    wanted = Counter(name.lower().encode("ascii") for name in SIGNED_HEADERS)
    names: list[bytes] = []
    for name, times in wanted.items():
        if present[name]:
            names += [name] * (present[name] + times - 1)
    return names


def _sign_one(signer: dkim.DKIM, key: DkimKey, names: list[bytes]) -> bytes:
    try:
        return signer.sign(
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            key.private_key,
            signature_algorithm=_ALGORITHMS[key.algorithm],
            canonicalize=_CANONICALIZE,
            include_headers=names,
        )
    # ValueError: dkimpy lets binascii and encoding errors through.
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
