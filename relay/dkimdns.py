"""``relay dkim check``: whether DNS publishes the keys the relay signs with.

A key the policy signs with but DNS does not publish, or publishes in an
older version, makes every message fail DKIM, and with it DMARC: the mail
lands in spam and nobody at the relay sees why. ``opendkim-testkey`` answers
this for OpenDKIM; this does it for the policy's keys (``relay.dkimrecord``
reads each record), and then signs a test message with each key and has
dkimpy verify it against the record found, so that "ok" means what a
receiver would conclude. ``--nameserver`` asks one server (the domain's own,
before the record has spread) instead of the system's resolver; such a
server does not follow a CNAME to another zone for us, so that is done here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import dkim
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from relay import dkimrecord
from relay.errors import RelayError, SigningError
from relay.findings import Checked, Finding, Level
from relay.keygen import public_record_value
from relay.policy.model import DkimKey
from relay.sign import sign

TIMEOUT = 5.0  # seconds for each lookup, all tries included
MOST_CNAMES = 8
#: The ``what`` of a finding that DNS did not answer: no verdict on the record.
UNANSWERED = "DNS"
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


class _NotPublished(Exception):
    pass


class _Unanswered(Exception):
    pass


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
    title = f"{name} ({key.algorithm.value}, {key.key_file})"
    try:
        expected = public_record_value(key)
    except ValueError as exc:
        return Checked(title, (Finding("", str(exc), Level.FAILED),))
    try:
        records = _txt(answers, name)
    except _NotPublished as exc:
        text = f"{exc}: publish the record `relay dkim keygen` printed, TXT {expected}"
        return Checked(title, (Finding("", text, Level.FAILED),))
    except _Unanswered as exc:
        return Checked(title, (Finding(UNANSWERED, str(exc), Level.FAILED),))
    if len(records) > 1:
        text = f"{len(records)} TXT records for {name}: a verifier takes one, maybe the wrong one"
        return Checked(title, (Finding("", text, Level.FAILED),))
    raw = records[0]
    record = raw.decode("ascii", "backslashreplace")
    found = [Finding("", f"TXT {_shown(record)}"), *dkimrecord.findings(key, record, expected)]
    if not any(f.failed for f in found):
        found.append(_verified(key, raw))
    return Checked(title, tuple(found))


def unanswered(checked: Checked) -> bool:
    """Whether the check failed for want of an answer from DNS, not for the record."""
    return any(f.what == UNANSWERED for f in checked.findings)


def _txt(answers: dns.resolver.Resolver, name: str) -> list[bytes]:
    """The TXT records for ``name``, each one's strings joined (RFC 6376 3.6.2.2),
    following CNAMEs the server answered with but did not resolve."""
    asked, chain = name, ""
    for _ in range(MOST_CNAMES):
        try:
            found = answers.resolve(asked, "TXT", search=False)
        except dns.resolver.NXDOMAIN as exc:
            target = _dangling(exc, asked)
            if target is not None:  # a resolver that followed the CNAME to nothing
                chain += f"{asked} is a CNAME to {target}, and "
                asked = target
            raise _NotPublished(f"{chain}{asked} does not exist in DNS") from exc
        except dns.resolver.NoAnswer as exc:
            response = exc.response()
            target = _cname(response, asked)
            if target is None:
                _refuse_referral(answers, response, asked)
                raise _NotPublished(f"{chain}{asked} has no TXT record") from exc
            chain += f"{asked} is a CNAME to {target}, and "
            asked = target
            continue
        except dns.exception.DNSException as exc:
            raise _Unanswered(chain + _dns_trouble(answers, asked, exc)) from exc
        return [b"".join(rdata.strings) for rdata in found]
    raise _Unanswered(f"{name}: more than {MOST_CNAMES} CNAMEs in a row")


def _dangling(exc: dns.resolver.NXDOMAIN, name: str) -> str | None:
    """Where a CNAME at ``name`` points, when the name that does not exist is its
    target (a provider's record not made yet): the name itself exists, and no
    TXT record can be published beside its CNAME."""
    for response in exc.responses().values():
        target = _cname(response, name)
        if target is not None:
            return target
    return None


def _cname(response: dns.message.Message, name: str) -> str | None:
    """The end of the CNAME chain from ``name`` in the answer, when it is not ``name``."""
    owner = dns.name.from_text(name)
    for _ in range(MOST_CNAMES):
        rrset = next(
            (r for r in response.answer if r.name == owner and r.rdtype == dns.rdatatype.CNAME),
            None,
        )
        if rrset is None:
            break
        owner = rrset[0].target
    return None if owner == dns.name.from_text(name) else owner.to_text(omit_final_dot=True)


def _refuse_referral(
    answers: dns.resolver.Resolver, response: dns.message.Message, name: str
) -> None:
    """A server that hands the name to others has not said there is no record."""
    servers = sorted(
        rdata.target.to_text(omit_final_dot=True)
        for rrset in response.authority
        if rrset.rdtype == dns.rdatatype.NS
        for rdata in rrset
    )
    if servers:
        text = (
            f"{_asked(answers)} does not answer for {name} but refers to {', '.join(servers)}:"
            " give one of those as --nameserver, or leave it out"
        )
        raise _Unanswered(text)


def _dns_trouble(answers: dns.resolver.Resolver, name: str, exc: Exception) -> str:
    if isinstance(exc, dns.resolver.LifetimeTimeout):
        return f"no answer from {_asked(answers)} for {name} within {TIMEOUT:g} seconds"
    if isinstance(exc, dns.resolver.NoNameservers):
        unreached = sorted(
            {
                os.strerror(error.errno) if error.errno else str(error)
                for *_, error, _ in exc.kwargs.get("errors") or []
                if isinstance(error, OSError)
            }
        )
        if unreached:  # the host's network, not the server: say which
            return f"cannot reach {_asked(answers)} to look up {name}: {'; '.join(unreached)}"
        return f"{_asked(answers)} failed or refused to look up {name}"
    return f"the lookup of {name} failed: {exc}"


def _asked(answers: dns.resolver.Resolver) -> str:
    servers = ", ".join(str(s) for s in answers.nameservers)
    return f"the DNS server {servers} (port {answers.port})"


def _verified(key: DkimKey, record: bytes) -> Finding:
    """Signed by the relay's own signer, verified by dkimpy against the record found."""
    message = _TEST_MESSAGE.replace(b"{domain}", key.domain.encode())
    try:
        signed = sign(message, [key]) + message
    except SigningError as exc:
        return Finding("", f"the relay cannot sign with it: {exc}", Level.FAILED)

    def published(name: bytes, timeout: int = 5) -> bytes:
        return record

    try:
        verified = dkim.verify(signed, dnsfunc=published)
    except dkim.DKIMException as exc:
        return Finding("", f"a message signed now does not verify with it: {exc}", Level.FAILED)
    if verified:
        return Finding("", "a message signed now verifies with it (dkimpy)")
    return Finding("", "a message signed now does not verify with it (dkimpy)", Level.FAILED)


def _shown(record: str) -> str:
    """Printable: a record is anybody's text, and a control character in it would
    act on the terminal or break the one-line-per-finding report."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in record)
    return safe if len(safe) <= 72 else f"{safe[:60]}... ({len(record)} characters)"


def checked_all(keys: Sequence[DkimKey], answers: dns.resolver.Resolver) -> list[Checked]:
    """Every key's check, the lookups at once: a server that does not answer
    costs its timeout once, not once per key."""
    with ThreadPoolExecutor(max(1, min(len(keys), 8))) as pool:
        return list(pool.map(lambda key: check(key, answers), keys))
