"""``relay upstream test``: an upstream account tried the way a delivery uses it,
with nothing sent.

Hosted ERPs let a company "test the account" before saving its SMTP settings.
A sysadmin who changes a smarthost's host, port, TLS mode or password wants
the same before an invoice waits in the queue for it: the connection, the TLS
handshake, the certificate check and the login go through the code deliveries
use, so a failure reads as the queue and the ERP would see it. With a
recipient, ``MAIL`` and ``RCPT`` are tried as well and then reset: the
upstream's verdict on that envelope, and still nothing sent.
"""

from __future__ import annotations

import contextlib
import enum
import os
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiosmtplib

from relay.errors import UpstreamError
from relay.policy.model import DirectoryUpstream, Policy, SmtpUpstream, Upstream
from relay.upstream import smtp, transaction

#: A certificate this close to its end is warned of: renewals fail quietly.
EXPIRY_WARNING = timedelta(days=14)


class Level(enum.Enum):
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"


@dataclass(frozen=True)
class Step:
    what: str
    text: str
    level: Level = Level.OK


@dataclass(frozen=True)
class Outcome:
    upstream: str  # its name, and where it is
    used_by: tuple[str, ...]  # tenant IDs
    steps: tuple[Step, ...]

    @property
    def ok(self) -> bool:
        return all(step.level is not Level.FAILED for step in self.steps)


async def probe(policy: Policy, upstream: Upstream, rcpt: str | None) -> Outcome:
    used_by = tuple(sorted(t.id for t in policy.tenants.values() if t.upstream == upstream.name))
    if isinstance(upstream, DirectoryUpstream):
        return Outcome(f"{upstream.name} (directory)", used_by, (_directory(upstream),))
    steps: list[Step] = []
    where = f"{upstream.name} ({upstream.host}:{upstream.port})"
    try:
        secret = smtp.password(upstream) if upstream.username else None
        client = await smtp.connect(upstream, secret)
    except UpstreamError as exc:
        return Outcome(where, used_by, (Step("delivery", exc.line, Level.FAILED),))
    try:
        greeted = await _greeted(upstream, client)
        if greeted.level is Level.FAILED:
            return Outcome(where, used_by, (greeted,))
        steps += [greeted, *_session(policy, upstream, client)]
        if rcpt is not None:
            sender = upstream.sender or policy.platform.return_path
            steps += await _envelope(client, sender, rcpt)
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit(timeout=upstream.timeout)
        client.close()
    return Outcome(where, used_by, tuple(steps))


def _directory(upstream: DirectoryUpstream) -> Step:
    """A directory not there yet is made, with its parents, by the first delivery:
    then the nearest one that is there must take it (the policy's check has
    refused a file in the way)."""
    path = upstream.path
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return Step("writes", f"{existing}: this user may not write there", Level.FAILED)
    made = "" if existing == path else " (made by the first delivery)"
    return Step("writes", f"each message into {path}{made}, nothing is sent")


async def _greeted(upstream: SmtpUpstream, client: aiosmtplib.SMTP) -> Step:
    """The EHLO (or HELO) a delivery's first MAIL would send, if the login or
    STARTTLS has not left one in force: a server that refuses it refuses every
    message, and only its answer says what it offers."""
    if client.is_ehlo_or_helo_needed:
        failed = await _command("EHLO", transaction.greet(client, upstream.timeout))
        if failed.level is Level.FAILED:
            return failed
    reply = client.last_ehlo_response or client.last_helo_response
    assert reply is not None  # greeted
    what = "EHLO" if client.last_ehlo_response is not None else "HELO"
    return Step(what, _said(reply.code, (reply.message.splitlines() or [""])[0]))


def _session(policy: Policy, upstream: SmtpUpstream, client: aiosmtplib.SMTP) -> list[Step]:
    steps = [_tls(upstream, client)]
    if upstream.username:
        steps.append(Step("login", f"accepted for {upstream.username}"))
    else:
        steps.append(Step("login", "none (the policy gives no username)"))
    steps.append(Step("offers", _offers(client) or "no extensions"))
    steps += _size(policy, client)
    if not client.supports_extension("dsn"):
        text = (
            "not offered: a bounce that comes back is matched by its Message-ID, not the queue ID"
        )
        steps.append(Step("DSN", text, Level.WARNING))
    return steps


def _tls(upstream: SmtpUpstream, client: aiosmtplib.SMTP) -> Step:
    tls = client.get_transport_info("ssl_object")
    if not isinstance(tls, ssl.SSLObject | ssl.SSLSocket):
        what = "the password and mail go" if upstream.username else "mail goes"
        return Step("TLS", f"none (tls: {upstream.tls.value}): {what} in clear")
    cipher = (tls.cipher() or ("?",))[0]
    checked = "against " + (str(upstream.ca_file) if upstream.ca_file else "the system's CAs")
    certificate = tls.getpeercert() or {}
    until = certificate.get("notAfter")
    if not isinstance(until, str):
        return Step("TLS", f"{tls.version()} {cipher}, certificate checked {checked}")
    ends = datetime.fromtimestamp(ssl.cert_time_to_seconds(until), UTC)
    text = (
        f"{tls.version()} {cipher}, certificate for {upstream.host} checked {checked},"
        f" valid until {ends:%Y-%m-%d}"
    )
    if ends - datetime.now(UTC) < EXPIRY_WARNING:
        return Step("TLS", f"{text}: it ends within {EXPIRY_WARNING.days} days", Level.WARNING)
    return Step("TLS", text)


def _offers(client: aiosmtplib.SMTP) -> str:
    names = []
    for name, value in client.esmtp_extensions.items():
        names.append(f"{name.upper()} {value}".strip())
    return ", ".join(names)


def _size(policy: Policy, client: aiosmtplib.SMTP) -> list[Step]:
    """An upstream limit below a listener's is a message the ERP got 250 for and
    whose delivery then fails for good."""
    offered = client.esmtp_extensions.get("size", "")
    if not offered.isdigit() or int(offered) == 0:
        return []
    limit = int(offered)
    larger = [lst for lst in policy.listeners if lst.max_message_size > limit]
    if not larger:
        return []
    names = ", ".join(f"{lst.name} ({lst.max_message_size})" for lst in larger)
    text = f"takes messages up to {limit} bytes; listeners accept more: {names}"
    return [Step("SIZE", text, Level.WARNING)]


async def _envelope(client: aiosmtplib.SMTP, sender: str, rcpt: str) -> list[Step]:
    steps = [await _command(f"MAIL FROM:<{sender}>", client.mail(sender))]
    if steps[0].level is Level.OK:
        steps.append(await _command(f"RCPT TO:<{rcpt}>", client.rcpt(rcpt)))
    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
        await client.rset()
    return [*steps, Step("RSET", "nothing was sent")]


async def _command(label: str, command: Awaitable[aiosmtplib.SMTPResponse]) -> Step:
    try:
        reply = await command
    except aiosmtplib.SMTPResponseException as exc:
        return Step(label, _said(exc.code, exc.message), Level.FAILED)
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        return Step(label, str(exc) or type(exc).__name__, Level.FAILED)
    return Step(label, _said(reply.code, reply.message))


def _said(code: int, message: str) -> str:
    """The reply as the upstream gave it, its lines joined: a status code it
    did not send is not made up here."""
    return f"{code} {' / '.join(message.splitlines())}".rstrip()


def render(outcomes: Sequence[Outcome]) -> str:
    lines = []
    for outcome in outcomes:
        used = ", ".join(outcome.used_by) or "no tenant"
        verdict = "ok" if outcome.ok else "FAILED"
        lines.append(f"{outcome.upstream}: {verdict} (used by {used})")
        for step in outcome.steps:
            mark = "" if step.level is Level.OK else f"{step.level.value}: "
            lines.append(f"  {step.what}: {mark}{step.text}")
    return "\n".join(lines)
