"""``relay dkim check``: whether DNS publishes the keys the relay signs with.

A key the policy signs with but DNS does not publish, or publishes in an
older version, makes every message fail DKIM, and with it DMARC: the mail
lands in spam and nobody at the relay sees why. ``opendkim-testkey`` answers
this for OpenDKIM; this does it for the policy's keys, and then signs a test
message with each key and has dkimpy verify it against the record found, so
that "ok" means what a receiver would conclude. ``--nameserver`` asks one
server (the domain's own, before the record has spread) instead of the
system's resolver.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import dkim
import dns.exception
import dns.resolver

from relay.errors import RelayError, SigningError
from relay.keygen import public_record_value
from relay.policy.model import DkimKey
from relay.sign import sign

TIMEOUT = 5.0  # seconds for each lookup, all tries included
_TEST_MESSAGE = (
    b"From: DKIM check <check@{domain}>\r\n"
    b"To: check@{domain}\r\n"
    b"Subject: relay dkim check\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <dkim-check@{domain}>\r\n"
    b"\r\n"
    b"Signed to check the published key.\r\n"
)


class NoResolver(RelayError):
    """The system has no resolver configuration, and no ``--nameserver`` was given."""


class Level(enum.Enum):
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"


@dataclass(frozen=True)
class Finding:
    level: Level
    text: str


@dataclass(frozen=True)
class KeyCheck:
    key: DkimKey
    findings: tuple[Finding, ...]

    @property
    def name(self) -> str:
        return f"{self.key.selector}._domainkey.{self.key.domain}"

    @property
    def ok(self) -> bool:
        return all(f.level is not Level.FAILED for f in self.findings)


def resolver(nameserver: tuple[str, int] | None) -> dns.resolver.Resolver:
    """The system's resolver, or one that asks only ``nameserver``. Raises NoResolver."""
    if nameserver is None:
        try:
            found = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            raise NoResolver(f"no DNS resolver configured ({exc}): give --nameserver") from exc
    else:
        found = dns.resolver.Resolver(configure=False)
        found.nameservers = [nameserver[0]]
        found.port = nameserver[1]
    found.lifetime = TIMEOUT
    found.use_edns(0, 0, 1232)  # an RSA-2048 record barely fits the old 512 bytes
    return found


def check(key: DkimKey, answers: dns.resolver.Resolver) -> KeyCheck:
    name = f"{key.selector}._domainkey.{key.domain}"
    try:
        expected = public_record_value(key)
    except ValueError as exc:
        return KeyCheck(key, (Finding(Level.FAILED, str(exc)),))
    try:
        records = _txt(answers, name)
    except _NotPublished as exc:
        text = f"{exc}: publish the record `relay dkim keygen` printed, TXT {expected}"
        return KeyCheck(key, (Finding(Level.FAILED, text),))
    except dns.exception.DNSException as exc:
        return KeyCheck(key, (Finding(Level.FAILED, f"the lookup of {name} failed: {exc}"),))
    if len(records) > 1:
        text = f"{len(records)} TXT records at {name}: a verifier takes one, maybe the wrong one"
        return KeyCheck(key, (Finding(Level.FAILED, text),))
    record = records[0]
    findings = [Finding(Level.OK, f"TXT {_shortened(record)}")]
    findings += _tags(key, record, expected)
    if all(f.level is not Level.FAILED for f in findings):
        findings.append(_verified(key, record))
    return KeyCheck(key, tuple(findings))


class _NotPublished(Exception):
    pass


def _txt(answers: dns.resolver.Resolver, name: str) -> list[str]:
    """The TXT records at ``name``, each one's strings joined (RFC 6376 3.6.2.2)."""
    try:
        found = answers.resolve(name, "TXT", search=False)
    except dns.resolver.NXDOMAIN as exc:
        raise _NotPublished(f"{name} does not exist in DNS") from exc
    except dns.resolver.NoAnswer as exc:
        raise _NotPublished(f"{name} has no TXT record") from exc
    return [b"".join(rdata.strings).decode("ascii", "replace") for rdata in found]


def _tags(key: DkimKey, record: str, expected: str) -> list[Finding]:
    tags = _parse(record)
    if tags is None:
        return [Finding(Level.FAILED, "not a DKIM key record: tags are name=value; ...")]
    findings = []
    if tags.get("v", "DKIM1") != "DKIM1":
        findings.append(Finding(Level.FAILED, f"v={tags['v']}: a DKIM key record says v=DKIM1"))
    published_kind = tags.get("k", "rsa")
    if published_kind != key.algorithm.value:
        text = f"k={published_kind}, but the key in {key.key_file} is {key.algorithm.value}"
        findings.append(Finding(Level.FAILED, text))
    public = "".join(tags.get("p", "").split())
    if not public:
        why = "p= is empty: the key is revoked" if "p" in tags else "no p= tag"
        findings.append(Finding(Level.FAILED, why))
    elif _decoded(public) != _decoded(expected.rpartition("p=")[2]):
        text = (
            f"it publishes another public key than that of {key.key_file}: publish"
            f" TXT {expected}, or sign with the key that belongs to this record"
        )
        findings.append(Finding(Level.FAILED, text))
    hashes = [h.strip() for h in tags.get("h", "sha256").split(":")]
    if "sha256" not in hashes:
        text = f"h={tags['h']} leaves out sha256, the only hash the relay signs with"
        findings.append(Finding(Level.FAILED, text))
    services = [s.strip() for s in tags.get("s", "*").split(":")]
    if not {"*", "email"} & set(services):
        findings.append(Finding(Level.FAILED, f"s={tags['s']}: the key is not for email"))
    flags = [f.strip() for f in tags.get("t", "").split(":")]
    if "y" in flags:
        text = "t=y: testing mode, receivers may treat a failed signature as no signature"
        findings.append(Finding(Level.WARNING, text))
    return findings


def _parse(record: str) -> dict[str, str] | None:
    tags = {}
    for part in record.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            return None
        tags[name.strip()] = value.strip()
    return tags


def _decoded(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _verified(key: DkimKey, record: str) -> Finding:
    """Signed by the relay's own signer, verified by dkimpy against the record found."""
    message = _TEST_MESSAGE.replace(b"{domain}", key.domain.encode())
    try:
        signed = sign(message, [key]) + message
    except SigningError as exc:
        return Finding(Level.FAILED, f"the relay cannot sign with it: {exc}")

    def published(name: bytes, timeout: int = 5) -> bytes:
        return record.encode()

    try:
        verified = dkim.verify(signed, dnsfunc=published)
    except dkim.DKIMException as exc:
        return Finding(Level.FAILED, f"a message signed now does not verify with it: {exc}")
    if verified:
        return Finding(Level.OK, "a message signed now verifies with it (dkimpy)")
    return Finding(Level.FAILED, "a message signed now does not verify with it (dkimpy)")


def _shortened(record: str) -> str:
    return record if len(record) <= 72 else f"{record[:60]}... ({len(record)} characters)"


def render(checks: Sequence[KeyCheck]) -> str:
    lines = []
    for each in checks:
        key = each.key
        verdict = "ok" if each.ok else "FAILED"
        lines.append(f"{each.name} ({key.algorithm.value}, {key.key_file}): {verdict}")
        for finding in each.findings:
            mark = "" if finding.level is Level.OK else f"{finding.level.value}: "
            lines.append(f"  {mark}{finding.text}")
    return "\n".join(lines)
