"""``relay upstream test``: an upstream account tried the way a delivery uses it,
with nothing sent.

Hosted ERPs let a company "test the account" before saving its SMTP settings.
A sysadmin who changes a smarthost's host, port, TLS mode or password wants
the same before an invoice waits in the queue for it: the connection, the TLS
handshake, the certificate check and the login go through the code deliveries
use, so a failure reads as the queue and the ERP would see it. With a
recipient, ``RCPT`` is tried after ``MAIL`` as well, and then reset: the
upstream's verdict on that envelope, and still nothing sent.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Awaitable
from datetime import UTC, datetime

import aiosmtplib

from relay.errors import UpstreamError
from relay.findings import Checked, Finding, Level
from relay.policy.model import DirectoryUpstream, Policy, SmtpUpstream, Upstream
from relay.policy.tlspair import EXPIRY_WARNING
from relay.upstream import login, smtp


async def probe(policy: Policy, upstream: Upstream, rcpt: str | None) -> Checked:
    used = sorted(t.id for t in policy.tenants.values() if t.upstream == upstream.name)
    used_by = f"used by {', '.join(used) or 'no tenant'}"
    if isinstance(upstream, DirectoryUpstream):
        return Checked(f"{upstream.name} (directory)", (_directory(upstream),), used_by)
    steps: list[Finding] = []
    where = smtp.where(upstream)
    try:
        secret = smtp.password(upstream) if upstream.username else None
        client = await smtp.connect(upstream, secret)
    except UpstreamError as exc:
        return Checked(where, (Finding("delivery", exc.line, Level.FAILED),), used_by)
    try:
        steps += [_greeted(client), *_session(policy, upstream, client)]
        sender = upstream.sender or policy.platform.return_path
        steps += await _envelope(client, sender, rcpt)
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit(timeout=upstream.timeout)
        client.close()
    return Checked(where, tuple(steps), used_by)


def _directory(upstream: DirectoryUpstream) -> Finding:
    """A directory not there yet is made, with its parents, by the first delivery:
    then the nearest one that is there must take it (the policy's check has
    refused a file in the way)."""
    path = upstream.path
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return Finding("writes", f"{existing}: this user may not write there", Level.FAILED)
    made = "" if existing == path else " (made by the first delivery)"
    return Finding("writes", f"each message into {path}{made}, nothing is sent")


def _greeted(client: aiosmtplib.SMTP) -> Finding:
    """The answer to the EHLO (or HELO) that connecting sent: only it says what the
    server offers. A server that refuses it failed the connection, as a delivery's."""
    reply = client.last_ehlo_response or client.last_helo_response
    assert reply is not None  # greeted by smtp.connect
    what = "EHLO" if client.last_ehlo_response is not None else "HELO"
    return Finding(what, _said(reply.code, (reply.message.splitlines() or [""])[0]))


def _session(policy: Policy, upstream: SmtpUpstream, client: aiosmtplib.SMTP) -> list[Finding]:
    steps = [_tls(upstream, client)]
    if upstream.username:
        used = login.mechanism(client)
        assert used is not None  # logged in with it by smtp.connect
        steps.append(Finding("login", f"accepted for {upstream.username} (AUTH {used.upper()})"))
    else:
        steps.append(Finding("login", "none (the policy gives no username)"))
    steps.append(Finding("offers", _offers(client) or "no extensions"))
    steps += _size(policy, client)
    if not client.supports_extension("dsn"):
        text = (
            "not offered: a bounce that comes back is matched by its Message-ID, not the queue ID"
        )
        steps.append(Finding("DSN", text, Level.WARNING))
    return steps


def _tls(upstream: SmtpUpstream, client: aiosmtplib.SMTP) -> Finding:
    tls = client.get_transport_info("ssl_object")
    if not isinstance(tls, ssl.SSLObject | ssl.SSLSocket):
        what = "the password and mail go" if upstream.username else "mail goes"
        return Finding("TLS", f"none (tls: {upstream.tls.value}): {what} in clear")
    cipher = (tls.cipher() or ("?",))[0]
    checked = "against " + (str(upstream.ca_file) if upstream.ca_file else "the system's CAs")
    certificate = tls.getpeercert() or {}
    until = certificate.get("notAfter")
    if not isinstance(until, str):
        return Finding("TLS", f"{tls.version()} {cipher}, certificate checked {checked}")
    ends = datetime.fromtimestamp(ssl.cert_time_to_seconds(until), UTC)
    name = smtp.checked_name(upstream)
    text = (
        f"{tls.version()} {cipher}, certificate for {name} checked {checked},"
        f" valid until {ends:%Y-%m-%d}"
    )
    if ends - datetime.now(UTC) < EXPIRY_WARNING:
        return Finding("TLS", f"{text}: it ends within {EXPIRY_WARNING.days} days", Level.WARNING)
    return Finding("TLS", text)


def _offers(client: aiosmtplib.SMTP) -> str:
    names = []
    for name, value in client.esmtp_extensions.items():
        if name == "auth":  # its value is the last AUTH line's alone
            value = " ".join(login.offered(client))
        names.append(f"{name.upper()} {value}".strip())
    return ", ".join(names)


def _size(policy: Policy, client: aiosmtplib.SMTP) -> list[Finding]:
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
    return [Finding("SIZE", text, Level.WARNING)]


async def _envelope(client: aiosmtplib.SMTP, sender: str, rcpt: str | None) -> list[Finding]:
    """``MAIL`` is tried even without a recipient: a server that wants a login
    there (Microsoft 365's 530 5.7.57), or refuses the sender (Amazon SES's
    address not verified), refuses every delivery at it."""
    steps = [await _command(f"MAIL FROM:<{sender}>", client.mail(sender))]
    if rcpt is not None and not steps[0].failed:
        steps.append(await _command(f"RCPT TO:<{rcpt}>", client.rcpt(rcpt)))
    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
        await client.rset()
    return [*steps, Finding("RSET", "nothing was sent")]


async def _command(label: str, command: Awaitable[aiosmtplib.SMTPResponse]) -> Finding:
    try:
        reply = await command
    except aiosmtplib.SMTPResponseException as exc:
        return Finding(label, _said(exc.code, exc.message), Level.FAILED)
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        return Finding(label, str(exc) or type(exc).__name__, Level.FAILED)
    return Finding(label, _said(reply.code, reply.message))


def _said(code: int, message: str) -> str:
    """The reply as the upstream gave it, its lines joined: a status code it
    did not send is not made up here."""
    return f"{code} {' / '.join(message.splitlines())}".rstrip()
