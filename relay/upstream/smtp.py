"""The SMTP upstream: one message per transaction on a pooled aiosmtplib connection.

The relay is a proxy today, so an upstream refusal is answered to the ERP
with the upstream's own code and text (see ``replies``). When the upstream
cannot be reached, the TLS handshake fails or it does not answer in time,
the ERP gets ``451 4.4.1`` (``4.4.2`` for a connection lost mid-way) and a
text naming the upstream, what went wrong and at which stage, so whoever reads it in the
ERP's log knows where to look. A problem with the relay's own settings
(password file unreadable, upstream refusing our login) is ``451 4.3.5``
or ``451 4.7.x``: the message is fine and must be retried, not bounced.
Connections are kept and reused across messages (see ``pool``); the
mapping is the same whether a message travelled on a new or a reused one.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import socket
import ssl
from collections.abc import Collection, Sequence

import aiosmtplib

from relay.errors import UpstreamError, answered, interrupted
from relay.hostport import host_port
from relay.passwd import password_text
from relay.policy.model import SmtpUpstream, TlsMode
from relay.quantity import quantity
from relay.upstream import (
    Crowded,
    DeliveryResult,
    MessageRefused,
    PartlyRefused,
    RecipientsRefused,
    SenderRefused,
    Unreachable,
    helo,
    login,
    replies,
    transaction,
)
from relay.upstream.pipelining import (
    DataLost,
    DataTimeout,
    LostMidway,
    Stale,
    Unfinished,
    Unsent,
    Withheld,
)
from relay.upstream.pool import Pool, PoolKey, default_pool

log = logging.getLogger("relay")

# taken by the upstream, but the recipients the message was needed for were not:
# temporary, so that a copy whose message still goes on (see the engine) is sent later
NOT_SENT = "451 4.3.0 Not sent: the upstream refused the message's other recipients"

# a refusal of MAIL FROM about the message, not its sender (``_about_sender``)
_TOO_BIG = 552
_ABOUT_MESSAGE = frozenset({"2", "3", "4", "6"})

# what the upstream answers a transaction with, other than taking its message
_REFUSALS = (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused, Unfinished)

# aiosmtplib's None: STARTTLS when the server offers it; ``starttls`` is refused
# without it in ``_refuse_without_tls``, whose words say what to set
_START_TLS: dict[TlsMode, bool | None] = {
    TlsMode.NONE: False,
    TlsMode.STARTTLS: None,
    TlsMode.IMPLICIT: False,
    TlsMode.AUTO: None,
}


async def send(
    upstream: SmtpUpstream,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    *,
    pool: Pool | None = None,
    needed: Collection[str] = (),
    envelope_id: str | None = None,
) -> DeliveryResult:
    """With ``needed`` the message goes only if the upstream takes one of those
    recipients; if it takes none, the others it took are refused ``NOT_SENT``.
    Cancelled (the relay's stop), its cancellation says whether the upstream
    may have had the whole message (``errors.interrupted``). Cancelled once the
    upstream has answered the message, while the connection is let go (its
    QUIT), it returns or raises that answer (``errors.answered``)."""
    secret = password(upstream) if upstream.username else None
    pool = default_pool() if pool is None else pool
    opener = functools.partial(connect, upstream, secret)
    key = PoolKey.of(upstream, secret)
    answer = None  # the transaction's (refused recipients, final reply), or its refusal
    try:
        for _ in range(pool.max_idle_per_key + 1):  # each stale one is closed: a new one comes
            try:
                async with pool.lease(key, opener, upstream.timeout) as lease:
                    try:
                        answer = await transaction.send(
                            lease.client,
                            mail_from,
                            rcpt_tos,
                            data,
                            upstream.timeout,
                            lease.reset,
                            upstream.data_timeout,
                            needed,
                            envelope_id,
                            lease.reused,
                        )
                    except _REFUSALS as refusal:
                        answer = refusal
                        raise
                break
            except Stale as exc:
                log.debug("upstream %s: idle connection stale: %s", where(upstream), exc)
        else:
            raise aiosmtplib.SMTPServerDisconnected("every idle connection was stale")
    except Unreachable as exc:
        try:
            crowded = await _crowded(pool, key, exc, upstream.timeout)
        except asyncio.CancelledError as cancel:  # the handler below does not see it
            interrupted(cancel, sent=False)
            raise
        if crowded:
            raise Crowded(exc.code, exc.status, exc.text) from exc
        raise
    except Unfinished as exc:
        raise _unfinished(upstream, exc) from exc.error
    except asyncio.CancelledError as cancel:
        if answer is None:  # before the message went: once it goes, ``_end`` says
            interrupted(cancel, sent=False)
            raise
        answered()
        if isinstance(answer, Exception):
            raise _refusal(upstream, answer) from answer
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        raise _mapped(upstream, "sending", exc) from exc
    refused, reply = answer
    return DeliveryResult(
        replies.line(250, reply),
        {rcpt: _refused(r.code, r.message) for rcpt, r in refused.items()},
    )


async def _crowded(pool: Pool, key: PoolKey, exc: Unreachable, timeout: float) -> bool:
    """One over its connection limit, not an upstream down: refused as a limit
    refuses (``_like_a_limit``), which only a host that is there does, while
    a worker has other connections to it open, or one being opened alongside
    opens. Any failure with a connection open was taken for the limit: a host
    that froze mid-transaction timed every new connection out unsuspended,
    each message trying on its own. The 421s of a cold burst came while the
    connection the smarthost took was still being greeted; a host that never
    answers is not waited for, which held its verdict while mail kept coming.
    Refused over a limit the other workers' connections fill, a worker asks
    them for one of theirs (``Pool.want``): it held its mail while they
    delivered."""
    if not _like_a_limit(exc.__cause__):
        return False
    if pool.open_count(key):
        return True
    if not pool.open_anywhere(key) and not await pool.opens_alongside(key, timeout):
        return False
    pool.want(key)
    return True


def _like_a_limit(said: BaseException | None) -> bool:
    """A 421, a connection refused, or one hung up on before its greeting: what a
    smarthost or its firewall answers one connection too many. A timeout, TLS
    failing or a login refused say nothing of a limit: a host that froze times
    out, whatever connections to it are still open."""
    if isinstance(said, aiosmtplib.SMTPResponseException):
        return said.code == 421
    if isinstance(said, aiosmtplib.SMTPConnectError):
        return isinstance(said.__cause__, aiosmtplib.SMTPServerDisconnected)
    return isinstance(said, ConnectionRefusedError)


async def connect(upstream: SmtpUpstream, secret: str | None) -> aiosmtplib.SMTP:
    """A connected, greeted, logged-in client; its errors are mapped here, where the
    stage is known. EHLO is part of connecting whatever the TLS mode: with ``tls:
    none`` it went with the first MAIL, so an upstream that hung up or stalled at
    EHLO failed each message "sending", as reached, and was never suspended."""
    ca_pem = upstream.ca_pem
    pinned = None if ca_pem is None else await asyncio.to_thread(_pinned, ca_pem)
    stage = "connecting"
    local = upstream.helo_name or await asyncio.to_thread(helo.local_hostname)
    try:
        local.encode("ascii")  # EHLO takes A-labels only
        sock = await _socket(upstream)
    except (OSError, ValueError) as exc:
        raise Unreachable.of(_mapped(upstream, stage, exc)) from exc
    client = aiosmtplib.SMTP(
        hostname=checked_name(upstream),  # with ``sock``, only TLS reads it
        sock=sock,
        timeout=upstream.timeout,
        use_tls=upstream.tls is TlsMode.IMPLICIT,
        start_tls=_START_TLS[upstream.tls],
        local_hostname=local,
        tls_context=pinned,
    )
    opened = False
    try:
        await client.connect()
        _refuse_without_tls(upstream, client)
        if client.is_ehlo_or_helo_needed:  # no STARTTLS, or its EHLO is to be said again
            await transaction.greet(client, upstream.timeout)
        if secret is not None:
            stage = "logging in"
            _refuse_plain_login(upstream, client)
            await login.log_in(client, upstream.username, secret, where(upstream))
        opened = True
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        raise Unreachable.of(_mapped(upstream, stage, exc)) from exc
    finally:
        if not opened:
            client.close()
    return client


async def _socket(upstream: SmtpUpstream) -> socket.socket:
    """Connected to the first of the host's addresses that takes the connection,
    each given the upstream's ``timeout``, as Postfix tries them: aiosmtplib's one
    timeout covered them all, and a first address that drops packets used it
    up, the next never tried, and every message expired."""
    loop = asyncio.get_running_loop()
    lookup = loop.getaddrinfo(
        upstream.host, upstream.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    try:  # the resolver's own timeouts add up to many times the upstream's
        found = await asyncio.wait_for(lookup, upstream.timeout)
    except TimeoutError:
        raise OSError(f"host not found: no answer within {upstream.timeout:g}s") from None
    failures: list[str] = []
    refused = 0
    for family, kind, proto, _, address in found:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, address), upstream.timeout)
        except TimeoutError:
            sock.close()
            failures.append(f"no answer within {upstream.timeout:g}s")
        except OSError as exc:
            sock.close()
            refused += isinstance(exc, ConnectionRefusedError)
            failures.append(_reason(exc, upstream))
        except BaseException:
            sock.close()
            raise
        else:
            return sock
        if len(found) > 1:
            failures[-1] = f"{address[0]}: {failures[-1]}"
    # refused by every address, it may be one connection over a limit (``_crowded``)
    error = ConnectionRefusedError if failures and refused == len(failures) else OSError
    raise error("; ".join(failures) or "no address")


def _refuse_without_tls(upstream: SmtpUpstream, client: aiosmtplib.SMTP) -> None:
    """``starttls`` sends nothing where EHLO offers no STARTTLS. aiosmtplib's
    own refusal ("SMTP STARTTLS extension not supported by server.") said
    neither that the setting asks for it nor what else to set."""
    if upstream.tls is not TlsMode.STARTTLS or client.get_transport_info("sslcontext") is not None:
        return
    text = (
        f"Upstream {where(upstream)} offers no STARTTLS, which tls: starttls needs:"
        " nothing is sent in plain text; set tls: implicit with the upstream's"
        " implicit-TLS port (465), or tls: none to allow it (connecting)"
    )
    raise Unreachable(451, "4.7.10", text)


def _refuse_plain_login(upstream: SmtpUpstream, client: aiosmtplib.SMTP) -> None:
    """``auto`` goes plain when EHLO offers no STARTTLS, which a man in the middle
    can strip: the password is then not sent (Postfix's default
    ``smtp_sasl_security_options = noplaintext``). Temporary, the message kept:
    the upstream or the setting may change; ``tls: none`` sends it, as asked."""
    if upstream.tls is not TlsMode.AUTO or client.get_transport_info("sslcontext") is not None:
        return
    text = (
        f"Upstream {where(upstream)} offers no STARTTLS: the password is not sent in plain"
        " text; set tls: starttls or implicit, or tls: none to allow it (logging in)"
    )
    raise Unreachable(451, "4.7.10", text)


def _mapped(upstream: SmtpUpstream, stage: str, exc: Exception) -> UpstreamError:
    """Most specific first: a refused login or EHLO is also a response exception."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return _all_refused(exc)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        text = f"Upstream {where(upstream)} refused the relay's login: "
        return UpstreamError(451, "4.7.0", text + replies.line(exc.code, exc.message))
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return _failed(upstream, stage, replies.line(exc.code, exc.message))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if exc.code == aiosmtplib.SMTPStatus.invalid_response:  # no SMTP reply: no code to quote
            return _failed(upstream, stage, f"no valid reply: {exc.message}", "4.4.0")
        if stage == "connecting":  # greeting or STARTTLS refused: nothing about this message
            return _failed(upstream, stage, replies.line(exc.code, exc.message))
        return _stage_refusal(exc)
    if isinstance(exc, DataTimeout | DataLost | Unsent | LostMidway):
        return _failed(upstream, stage, str(exc), "4.4.2")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return _failed(
            upstream, stage, f"{_handshake(exc, upstream)}no answer within {upstream.timeout:g}s"
        )
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        if _handshake(exc, upstream):
            return _failed(upstream, stage, _HANDSHAKE_CLOSED)
        status = "4.4.1" if stage == "connecting" else "4.4.2"
        return _failed(upstream, stage, "connection lost", status)
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        return _failed(upstream, stage, _reason(exc, upstream))
    if stage != "sending":  # the relay's own settings (an EHLO name): nothing of the message
        return _failed(upstream, stage, f"the relay's settings refused: {exc}", "4.3.5")
    # ValueError: aiosmtplib refuses an address it cannot send safely
    return UpstreamError(550, "5.1.3", f"Address refused: {exc}")


def _stage_refusal(exc: aiosmtplib.SMTPResponseException) -> UpstreamError:
    """The refusal typed by the command it answered, which decides whom it is
    about (``relay.deliver``): a 5.1.1 to MAIL FROM named the sender, yet
    every recipient was put on the suppression list."""
    refused = replies.refusal(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPSenderRefused) and exc.code in replies.OUR_LOGIN:
        return Unreachable.of(refused)  # M365's 530 5.7.57: no login, every message alike
    if isinstance(exc, aiosmtplib.SMTPSenderRefused) and _about_sender(refused):
        return SenderRefused(refused.code, refused.status, refused.text)
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return MessageRefused(refused.code, refused.status, refused.text)
    return refused


def _about_sender(refused: UpstreamError) -> bool:
    """Whether a refusal of MAIL FROM is about the address, which fails every
    message sent with it, rather than about this message: a 552 is its size
    (RFC 1870: Postfix's ``552 5.3.4 Message size exceeds fixed limit``), as
    are the RFC 3463 subjects of a mailbox's (x.2: 5.2.3, too long), of the
    mail system's (x.3), of routing (x.4) and of the content (x.6). That was
    warned of as the return path refused, while smaller messages went. An
    address (x.1), the server's rules (x.7), the protocol (x.5, the
    address's syntax among it) or no enhanced code say the sender, as
    before; an enhanced code is read before the 552 (``552 5.7.1 Sender
    address rejected``)."""
    subject = refused.status.split(".")[1]
    if subject != "0":
        return subject not in _ABOUT_MESSAGE
    return refused.code != _TOO_BIG


def password(upstream: SmtpUpstream) -> str:
    """Read at each delivery, so a changed password needs no reload. An empty one
    is none: a login with it only fails, and counts against the account at a
    smarthost that locks one out after failed logins."""
    if upstream.password_file is not None:
        try:
            value = password_text(upstream.password_file.read_bytes())
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            text = f"Upstream {upstream.name}: cannot read {upstream.password_file}: {reason}"
            raise Unreachable(451, "4.3.5", text) from exc
        if not value.strip():
            text = f"Upstream {upstream.name}: {upstream.password_file} is empty"
            raise Unreachable(451, "4.3.5", text)
        return value
    if upstream.password_env is not None:
        value = os.environ.get(upstream.password_env)
        if value is None or not value.strip():
            state = "unset" if value is None else "empty"
            text = f"Upstream {upstream.name}: environment variable {upstream.password_env} {state}"
            raise Unreachable(451, "4.3.5", text)
        return value
    raise Unreachable(451, "4.3.5", f"Upstream {upstream.name}: username but no password")


def _all_refused(exc: aiosmtplib.SMTPRecipientsRefused) -> RecipientsRefused:
    """Each recipient's own reply, and one for the whole message: temporary if
    any refusal is, so a retry can help."""
    refusals = exc.recipients
    first = next((r for r in refusals if r.code < 500), refusals[0])
    more = (
        f" (and {quantity(len(refusals) - 1, 'more recipient')} refused)"
        if len(refusals) > 1
        else ""
    )
    each = {r.recipient: _refused(r.code, r.message) for r in refusals}
    if isinstance(exc, Withheld):
        each.update(dict.fromkeys(exc.taken, NOT_SENT))
    return RecipientsRefused(replies.refusal(first.code, first.message, more), each)


def _refusal(upstream: SmtpUpstream, exc: Exception) -> UpstreamError:
    if isinstance(exc, Unfinished):
        return _unfinished(upstream, exc)
    return _mapped(upstream, "sending", exc)


def _unfinished(upstream: SmtpUpstream, exc: Unfinished) -> PartlyRefused:
    each = {rcpt: _refused(r.code, r.message) for rcpt, r in exc.refused.items()}
    return PartlyRefused(_mapped(upstream, "sending", exc.error), each)


def _refused(code: int, message: str) -> str:
    """A recipient's refusal as the whole message's would be: a 3xx to RCPT is
    no answer a server in step gives, a reply to retry on (``451 4.4.0``)."""
    return replies.refusal(code, message).line


def _failed(
    upstream: SmtpUpstream, stage: str, reason: str, status: str = "4.4.1"
) -> UpstreamError:
    return UpstreamError(451, status, f"Upstream {where(upstream)}: {reason} ({stage})")


def _handshake(exc: Exception, upstream: SmtpUpstream) -> str:
    """aiosmtplib's words for the TLS handshake after STARTTLS, which without them
    read as a dropped connection: a server that takes no TLS version or cipher the
    relay offers closes it there. With ``implicit`` the connection is made
    (``_socket``) before aiosmtplib's connect, whose timeout is then the
    handshake's, unless it came waiting for the greeting (an SMTP error)."""
    if "upgrading transport" in str(exc):
        return "TLS handshake after STARTTLS: "
    if (
        upstream.tls is TlsMode.IMPLICIT
        and isinstance(exc, aiosmtplib.SMTPConnectTimeoutError)
        and not isinstance(exc.__cause__, aiosmtplib.SMTPException)
    ):
        return "TLS handshake: "
    return ""


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = frozenset({62, 64})
# X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT, SELF_SIGNED_CERT_IN_CHAIN,
# UNABLE_TO_GET_ISSUER_CERT_LOCALLY, UNABLE_TO_VERIFY_LEAF_SIGNATURE: no CA trusted here
_ISSUER_UNKNOWN = frozenset({2, 19, 20, 21})
_SELF_SIGNED = 18  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = 9  # X509_V_ERR_CERT_NOT_YET_VALID

_HANDSHAKE_CLOSED = (
    "TLS handshake after STARTTLS failed: the upstream closed the connection"
    " (does it take TLS 1.2 or later, with a current cipher?)"
)


def checked_name(upstream: SmtpUpstream) -> str:
    """The name the certificate must be issued for, and SNI's: ``tls_name`` lets a
    smarthost be reached at an address its certificate does not name, as with
    Postfix's ``relayhost = [192.0.2.5]``, whose ``encrypt`` checks no name at all.
    Without the dot a fully qualified name may end in: no certificate names
    ``mail.example.``, so every delivery failed, and SNI may not carry it (RFC 6066 3)."""
    return (upstream.tls_name or upstream.host).removesuffix(".")


def where(upstream: SmtpUpstream) -> str:
    """The name and address, as replies, logs and ``relay upstream test`` say it."""
    return f"{upstream.name} ({host_port(upstream.host, upstream.port)})"


def _reason(exc: BaseException, upstream: SmtpUpstream) -> str:
    """The innermost cause reads best: "Connection refused", not aiosmtplib's wrapper."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message}{_trust_hint(exc, upstream)}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}{_plain_port_hint(exc, upstream)}"
    if isinstance(exc, socket.gaierror):
        return f"host not found: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's strerror is "Connect call failed (...)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _trust_hint(exc: ssl.SSLCertVerificationError, upstream: SmtpUpstream) -> str:
    """What would let the certificate through: OpenSSL's words say only what
    failed, and every message waited until it expired."""
    if exc.verify_code in _NAME_MISMATCH:
        return _name_hint(upstream)
    if exc.verify_code in _ISSUER_UNKNOWN:
        return _ca_hint(upstream, "the CA certificate that signed it", "holds no CA that signed it")
    if exc.verify_code == _SELF_SIGNED:
        return _ca_hint(upstream, "a copy of it", "does not hold it")
    if exc.verify_code == _EXPIRED:
        return _expired_hint(upstream)
    if exc.verify_code == _NOT_YET_VALID:
        return _not_yet_valid_hint(upstream)
    return ""


def _expired_hint(upstream: SmtpUpstream) -> str:
    """Whose certificate has expired: OpenSSL names no depth in the chain, and
    Python's ssl keeps no peer certificate after a failed check. A CA of the
    relay's own ``ca_file`` is looked at here: one expired there was laid on
    the upstream, whose sysadmin had nothing to renew."""
    clock = " (or this host's clock is wrong)"
    expired, held = _cas_out_of_date(upstream, _EXPIRED)
    if not expired:  # in date: the upstream sent the one expired
        return f"; the upstream must renew it{clock}"
    if held > 1:  # which one signed it is not known: a bundle's old roots were named
        return (
            f"; the upstream must renew it, unless it is one of the expired CAs in ca_file:"
            f" ({upstream.ca_file}): {len(expired)} of {held}{clock}"
        )
    ((name, ended),) = expired
    return (
        f"; ca_file: ({upstream.ca_file}) holds the CA certificate {name!r}, which expired"
        f" on {ended:%Y-%m-%d %H:%M} UTC: put the CA's renewed one there, unless it is the"
        f" upstream's own that has expired{clock}"
    )


def _not_yet_valid_hint(upstream: SmtpUpstream) -> str:
    """A certificate dated ahead: an upstream that installed it as soon as it
    was issued, or this host's clock set back. Its start is not known (Python's
    ssl keeps no certificate it refused) unless it is a CA of ``ca_file``."""
    why = "this host's clock is wrong, or the upstream installed it too early"
    early, held = _cas_out_of_date(upstream, _NOT_YET_VALID)
    if not early:
        return f"; {why}"
    if held > 1:  # which one signed it is not known
        return (
            f"; {why}, unless it is one of the CAs in ca_file: ({upstream.ca_file}) not valid"
            f" yet: {len(early)} of {held}"
        )
    ((name, begins),) = early
    return (
        f"; ca_file: ({upstream.ca_file}) holds the CA certificate {name!r}, valid from"
        f" {begins:%Y-%m-%d %H:%M} UTC: this host's clock is wrong, or it was put there too"
        " early, unless it is the upstream's own that is not valid yet"
    )


# the date of a certificate that a verify code finds outside it: its end, or its start
_DATES = {_EXPIRED: "notAfter", _NOT_YET_VALID: "notBefore"}


def _cas_out_of_date(
    upstream: SmtpUpstream, code: int
) -> tuple[list[tuple[str, datetime.datetime]], int]:
    """The CAs of the upstream's ``ca_file`` out of date as ``code`` says (expired,
    or not valid yet), each one's name and the date it passed or waits for, and
    how many CAs it holds."""
    if upstream.ca_pem is None:
        return [], 0
    try:
        found = ssl.create_default_context(cadata=upstream.ca_pem).get_ca_certs()
    except (ssl.SSLError, ValueError):  # it was checked at load: no CA to name then
        return [], 0
    now = datetime.datetime.now(datetime.UTC)
    out = []
    for cert in found:
        date = datetime.datetime.fromtimestamp(
            ssl.cert_time_to_seconds(str(cert[_DATES[code]])), datetime.UTC
        )
        if (date > now) if code == _NOT_YET_VALID else (date < now):
            names = [value for rdn in cert["subject"] for key, value in rdn if key == "commonName"]
            out.append((names[0] if names else "(no common name)", date))
    return out, len(found)


def _ca_hint(upstream: SmtpUpstream, what: str, lacking: str) -> str:
    """``ca_file`` is the setting; ``auto`` takes none (it may go in plain text)."""
    if upstream.ca_file is not None:
        return f"; ca_file: ({upstream.ca_file}) {lacking}: add {what} there"
    if upstream.tls is TlsMode.AUTO:
        return f"; set tls: starttls and ca_file: to {what}"
    return f"; set ca_file: to {what}"


def _plain_port_hint(exc: ssl.SSLError, upstream: SmtpUpstream) -> str:
    """Plain text where the first TLS record was due: a port that greets in SMTP
    (25, 587) under ``implicit``, which begins with the handshake."""
    if upstream.tls is not TlsMode.IMPLICIT or exc.reason != "WRONG_VERSION_NUMBER":
        return ""
    return (
        "; the port speaks plain SMTP (or STARTTLS), not implicit TLS: set tls: starttls,"
        " or use the upstream's implicit-TLS port (465)"
    )


def _name_hint(upstream: SmtpUpstream) -> str:
    """A certificate for another name than ``host`` deferred every message until
    it expired, and nothing said what would let it through. ``auto`` takes no
    ``tls_name`` (it may go in plain text): told to set it, the sysadmin was
    refused."""
    if upstream.tls is TlsMode.AUTO:
        return (
            "; write the name the certificate is issued for in host:, or set tls: starttls"
            " and write it in tls_name: to keep connecting to this address"
        )
    return (
        "; write the name the certificate is issued for in host:, or in tls_name:"
        " to keep connecting to this address"
    )


def _pinned(ca_pem: str) -> ssl.SSLContext:
    """Only the ``ca_file``'s CAs, not the system's as well (aiosmtplib's
    ``cert_bundle`` adds them): a private smarthost's certificate is checked
    against its own CA, as Postfix does with ``smtp_tls_CAfile``. From the
    text the policy loaded, checked there: the file as it reads now is the
    next reload's."""
    return ssl.create_default_context(cadata=ca_pem)
