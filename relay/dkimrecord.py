"""A published DKIM key record read against the key the relay signs with (RFC 6376 3.6.1).

Pure: the record's text in, findings out; the lookup is ``relay.dkimdns``.
Each finding says what a receiver would make of the record and what to
publish instead, since the usual fault is a record pasted wrong, not a
wrong key.
"""

from __future__ import annotations

import base64
import binascii
import re

from relay.findings import Finding, Level
from relay.policy.model import DkimKey

# what keygen prints, or a part of it: ``NAME IN TXT ( "v=DKIM1; ..." "p=..." )``,
# also with only the outer quotes left out: ``v=DKIM1; k=rsa; " "p=...``
_ZONE_SYNTAX = re.compile(r'\s*(?:\S*\._domainkey\S*\s+)?(?:IN\s+)?(?:TXT\s*)?[("]', re.IGNORECASE)


def findings(key: DkimKey, record: str, expected: str) -> list[Finding]:
    """What is wrong with ``record`` as the publication of ``key``, whose own
    record is ``expected`` (``keygen.public_record_value``)."""
    if _ZONE_SYNTAX.match(record) or _quoted_outside_notes(record):
        text = (
            "the record holds a zone file's syntax (quotes, parentheses, the name or TXT): it"
            " was pasted as keygen prints it; publish only what is between the quotes, joined,"
        )
        return [_failed(f"{text} TXT {expected}")]
    tags, twice = _parse(record)
    if tags is None:
        return [_failed("not a DKIM key record: tags are name=value; ...")]
    found = [_failed(f"{name}= appears twice: receivers refuse the record") for name in twice]
    found += _version_and_kind(key, tags)
    found += _public_key(key, tags, expected)
    # a hash's name is an ABNF string, which matches in any case (RFC 5234 2.3):
    # h=SHA256 verifies at dkimpy and OpenDKIM alike
    hashes = [h.strip().lower() for h in tags.get("h", "sha256").split(":")]
    if "sha256" not in hashes:
        found.append(
            _failed(f"h={tags['h']} leaves out sha256, the only hash the relay signs with")
        )
    services = [s.strip() for s in tags.get("s", "*").split(":")]
    if not {"*", "email"} & set(services):
        found.append(_failed(f"s={tags['s']}: the key is not for email"))
    if "y" in [f.strip() for f in tags.get("t", "").split(":")]:
        text = "t=y: testing mode, receivers may treat a failed signature as no signature"
        found.append(Finding("", text, Level.WARNING))
    return found


def _quoted_outside_notes(record: str) -> bool:
    """A quote in a tag other than n=: no other tag's value holds one, where n=,
    notes for people, may (verifiers take ``n=say "hi"``)."""
    tags = record.split(";")
    return any('"' in tag for tag in tags if tag.partition("=")[0].strip() != "n")


def _version_and_kind(key: DkimKey, tags: dict[str, str]) -> list[Finding]:
    found = []
    version = tags.get("v", "DKIM1")
    if version != "DKIM1":
        found.append(
            _failed(f"v={version}: a DKIM key record says v=DKIM1{_case(version, 'DKIM1')}")
        )
    kind = tags.get("k", "rsa")
    if kind != key.algorithm.value:
        text = f"k={kind}, but the key in {key.key_file} is {key.algorithm.value}"
        found.append(_failed(text + _case(kind, key.algorithm.value)))
    return found


def _case(given: str, meant: str) -> str:
    return ": tag values are case-sensitive" if given.lower() == meant.lower() else ""


def _public_key(key: DkimKey, tags: dict[str, str], expected: str) -> list[Finding]:
    if "p" not in tags:
        return [_failed("no p= tag")]
    public = "".join(tags["p"].split())
    if not public:
        return [_failed("p= is empty: the key is revoked")]
    decoded = _decoded(public)
    if decoded is None:
        return [
            _failed(f"p= is not base64 (cut short, or other text in it): publish TXT {expected}")
        ]
    meant = _decoded(expected.rpartition("p=")[2])
    if meant is not None and decoded != meant and meant.startswith(decoded):
        # cut at a multiple of 4 characters, what is left still decodes
        return [_failed(f"p= is this key's beginning only (cut short): publish TXT {expected}")]
    if decoded != meant:
        text = (
            f"p= is not the public key of {key.key_file} as keygen prints it: publish"
            f" TXT {expected}, or sign with the key that belongs to this record"
        )
        return [_failed(text)]
    return []


def _parse(record: str) -> tuple[dict[str, str] | None, list[str]]:
    """The tags, and the names given more than once (RFC 6376 3.2: the record is then
    invalid); None for text that is not a tag list."""
    tags: dict[str, str] = {}
    twice = []
    for part in record.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            return None, []
        name = name.strip()
        if name in tags:
            twice.append(name)
        tags[name] = value.strip()
    return tags, twice


def _decoded(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _failed(text: str) -> Finding:
    return Finding("", text, Level.FAILED)
