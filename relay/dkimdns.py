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

import dkim
import dns.exception
import dns.resolver

from relay.errors import RelayError, SigningError
from relay.findings import Checked, Finding, Level
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


def check(key: DkimKey, answers: dns.resolver.Resolver) -> Checked:
    name = f"{key.selector}._domainkey.{key.domain}"
    try:
        expected = public_record_value(key)
    except ValueError as exc:
        return _checked(key, (Finding("", str(exc), Level.FAILED),))
    try:
        records = _txt(answers, name)
    except _NotPublished as exc:
        text = f"{exc}: publish the record `relay dkim keygen` printed, TXT {expected}"
        return _checked(key, (Finding("", text, Level.FAILED),))
    except dns.exception.DNSException as exc:
        return _checked(key, (Finding("", f"the lookup of {name} failed: {exc}", Level.FAILED),))
    if len(records) > 1:
        text = f"{len(records)} TXT records at {name}: a verifier takes one, maybe the wrong one"
        return _checked(key, (Finding("", text, Level.FAILED),))
    record = records[0]
    findings = [Finding("", f"TXT {_shortened(record)}")]
    findings += _tags(key, record, expected)
    if not any(f.failed for f in findings):
        findings.append(_verified(key, record))
    return _checked(key, tuple(findings))


def _checked(key: DkimKey, findings: tuple[Finding, ...]) -> Checked:
    name = f"{key.selector}._domainkey.{key.domain}"
    return Checked(f"{name} ({key.algorithm.value}, {key.key_file})", findings)


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
        return [Finding("", "not a DKIM key record: tags are name=value; ...", Level.FAILED)]
    findings = []
    if tags.get("v", "DKIM1") != "DKIM1":
        findings.append(Finding("", f"v={tags['v']}: a DKIM key record says v=DKIM1", Level.FAILED))
    published_kind = tags.get("k", "rsa")
    if published_kind != key.algorithm.value:
        text = f"k={published_kind}, but the key in {key.key_file} is {key.algorithm.value}"
        findings.append(Finding("", text, Level.FAILED))
    public = "".join(tags.get("p", "").split())
    if not public:
        why = "p= is empty: the key is revoked" if "p" in tags else "no p= tag"
        findings.append(Finding("", why, Level.FAILED))
    elif _decoded(public) != _decoded(expected.rpartition("p=")[2]):
        text = (
            f"it publishes another public key than that of {key.key_file}: publish"
            f" TXT {expected}, or sign with the key that belongs to this record"
        )
        findings.append(Finding("", text, Level.FAILED))
    hashes = [h.strip() for h in tags.get("h", "sha256").split(":")]
    if "sha256" not in hashes:
        text = f"h={tags['h']} leaves out sha256, the only hash the relay signs with"
        findings.append(Finding("", text, Level.FAILED))
    services = [s.strip() for s in tags.get("s", "*").split(":")]
    if not {"*", "email"} & set(services):
        findings.append(Finding("", f"s={tags['s']}: the key is not for email", Level.FAILED))
    flags = [f.strip() for f in tags.get("t", "").split(":")]
    if "y" in flags:
        text = "t=y: testing mode, receivers may treat a failed signature as no signature"
        findings.append(Finding("", text, Level.WARNING))
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
        return Finding("", f"the relay cannot sign with it: {exc}", Level.FAILED)

    def published(name: bytes, timeout: int = 5) -> bytes:
        return record.encode()

    try:
        verified = dkim.verify(signed, dnsfunc=published)
    except dkim.DKIMException as exc:
        return Finding("", f"a message signed now does not verify with it: {exc}", Level.FAILED)
    if verified:
        return Finding("", "a message signed now verifies with it (dkimpy)")
    return Finding("", "a message signed now does not verify with it (dkimpy)", Level.FAILED)


def _shortened(record: str) -> str:
    return record if len(record) <= 72 else f"{record[:60]}... ({len(record)} characters)"
