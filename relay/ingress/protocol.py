"""aiosmtpd's SMTP protocol with what a relay in front of ERPs needs on top.

- the client allow-list, checked before the greeting;
- an idle timeout that means idle: aiosmtpd only re-arms its timer on a
  command, so a long DATA upload or a slow upstream behind ``handle_DATA``
  would be cut off mid-transaction; and the client is told ``421`` before
  the connection is closed, where aiosmtpd closes it without a word (but
  for one in its handshake after STARTTLS: a failed handshake, as on
  implicit TLS);
- enhanced status codes on the replies aiosmtpd words itself (an ERP log
  with ``552 5.3.4`` is easier to act on than ``552 Error: Too much mail data``),
  every one of them, so that EHLO offers ENHANCEDSTATUSCODES (RFC 2034);
- knowing whether a transaction is under way, for a graceful shutdown;
- AUTH lines as long as RFC 4954 allows (12288 octets; aiosmtpd allows 512,
  too short for a long password with smtplib's AUTH PLAIN), and an AUTH
  response longer than that refused with ``500 5.5.6``, read to its end so
  that the rest of it is not taken for a command;
- a log line for each message refused here, as for those refused later: a
  refused MAIL (a SIZE declared too big, AUTH missing) and DATA over the size
  limit; and one for each refused RCPT (a bad address, too many recipients),
  a transaction's first ``RCPT_REFUSALS_LOGGED`` of them, the rest counted
  in one line at its end;
- Postfix's hard error and junk command limits: a client looping on a
  refused command (or on NOOP) is told ``421`` and closed, not answered for ever;
- RFC 3461's DSN parameters taken and not acted on, though DSN is not offered
  (``dsn``): an ERP that asked Postfix for delivery receipts sends them anyway;
- a log line for each connection ended with a ``421`` (idle, too many errors,
  unknown commands or AUTHs), saying how far the session had come.

- DATA read in large pieces rather than line by line (``data``), and the
  usual ``<local@domain>`` path parsed without the header parser, a display
  name before it dropped (``address``).

It leans on aiosmtpd 1.4's internals (``_handle_client``, ``_reset_timeout``,
``_timeout_handle``, ``_timeout_cb``, ``_reader``, ``_set_post_data_state``,
``_getaddr``, ``_call_handler_hook``, ``command_size_limits``,
``line_length_limit``, the local ``line`` of ``_handle_client``); the tests
exercise each of them over real sockets.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import functools
import logging
import re
import ssl
import sys
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException, _Missing, syntax

from relay import tally
from relay.ingress import content, data, dsn
from relay.ingress.address import (
    DISPLAY_NAME,
    PARAMETER_WORD,
    PATH_TEXT,
    SENDER,
    path_end,
    plain_path,
    without_display_name,
)
from relay.ingress.auth import AUTH_ABORTED, BAD_BASE64, Authenticated, Mechanisms
from relay.ingress.clientlimit import ALL_BUSY, EVERYONE, TOO_MANY, ClientRow, counted_as
from relay.ingress.filelimit import OUT_OF_FILES, FileRoom
from relay.policy.tlspair import VERSIONS
from relay.quantity import quantity
from relay.submission import Submission
from relay.submission import log_refused as log_message_refused
from relay.tally import TallyRow
from relay.visible import escaped_match

log = logging.getLogger("relay")
LINGER = 5.0  # seconds a closing connection may take to write out its last replies

Network = IPv4Network | IPv6Network

NOT_ALLOWED = "554 5.7.1 Client {client} is not allowed to use this relay"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"
AUTH_LINE = 12288  # octets in an AUTH command or response line, RFC 4954 4
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"
# Refused RCPTs of one transaction logged one by one, as many as Postfix's
# smtpd_soft_error_limit: enough for an ERP's list of bad addresses, while a
# client sending RCPTs in a loop adds one line more, not one per command.
RCPT_REFUSALS_LOGGED = 10
# Postfix's smtpd_hard_error_limit: error replies (4xx, 5xx) a connection may
# get before a message is accepted; then it is told 421 and closed. Without
# it a client looping on a refused command was answered, and logged, forever.
HARD_ERROR_LIMIT = 20
# Postfix's smtpd_junk_command_limit: NOOP, RSET and VRFY commands a connection
# may send before a message is accepted; past it each counts as an error.
JUNK_COMMAND_LIMIT = 100
# Refused MAILs logged one by one while a connection has had fewer errors
# than this; the rest are counted in one line at its end.
REFUSALS_LOGGED = 10
# Characters of a MAIL or RCPT command quoted in its refusal's log line, when
# no path could be found in it: enough for a display name and an address.
SENT_LOGGED = 200
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing the connection"
READ_FAILED = "421 4.3.0 Local error reading the message, try again later"
# As Postfix answers a command it does not offer: aiosmtpd's 454 is a temporary
# failure (RFC 3207 4), which a client set to require STARTTLS retries for ever.
NO_STARTTLS = "502 5.5.1 Error: this listener does not offer STARTTLS"
# Sendmail's answer (RFC 5321 4.1.1.8 leaves it open); a 501 is a syntax error
HELP_UNKNOWN = "504 5.5.4 HELP topic unknown; HELP alone lists the commands"
# aiosmtpd's answer to a connection's fifth unknown command (its BOGUS_LIMIT,
# never reset), before it closes the connection
_TOO_MANY_UNKNOWN = "502 5.5.1 Too many unrecognized commands, goodbye."
# Postfix's smtpd_recipient_overshoot_limit: a transaction's RCPTs refused for
# being past the recipient limit that count as no error (RFC 5321 4.5.3.1.10
# has the client send them again in another transaction).
RCPT_OVERSHOOT = 1000
_TOO_MANY_RECIPIENTS = "452 4.5.3 "
# aiosmtpd's refusal of a path its parser cannot read (or ``_getaddr`` one never
# closed), with a recipient's status also at MAIL: there it is a sender's
_MALFORMED = "553 5.1.3 Error: malformed address"
_MALFORMED_SENDER = f"553 {SENDER} Error: malformed address"

NON_ASCII = "501 5.6.7 Non-ASCII characters are not allowed: SMTPUTF8 is not offered"
_NON_ASCII_PATH = re.compile(
    rb"(MAIL FROM|RCPT TO):\s*([^<]*)<(" + PATH_TEXT.encode() + rb")>", re.IGNORECASE
)
# in what comes before the <: a parameter (``jan@x ENVID=<…>``), so no name
_PARAMETER_BEFORE = re.compile(rf"(?:^|[ \t]){PARAMETER_WORD}".encode())
_GIVEN_SENDER = re.compile(rf"FROM:\s*(?:{DISPLAY_NAME})?<({PATH_TEXT})>", re.IGNORECASE)
_GIVEN_RECIPIENT = re.compile(rf"TO:\s*(?:{DISPLAY_NAME})?<({PATH_TEXT})>", re.IGNORECASE)
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_AUTH_PARAMETER = re.compile(r"[ \t]+AUTH=\S*", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TLS_HANDSHAKE = b"\x16\x03"  # the start of a TLS handshake record, a ClientHello's
# A client that checks the certificate once the handshake is done (GnuTLS's,
# PHP's, Java's, Node's) closes then, and says so only to its own user; so
# does a monitoring check of the certificate, which is no failure.
CLOSED_AFTER_HANDSHAKE = (
    "client=%s closed the connection right after the TLS handshake, before its first"
    " command: a check of the certificate, or a client that does not trust it (its CA,"
    " the host name it connects to)"
)
# the listener named: an old client refused on one of two, 587 and 465, said not which
HANDSHAKE_FAILED = "TLS handshake failed client=%s: %s"
_VERSION_NAMES = {ssl_version: version.value for version, ssl_version in VERSIONS.items()}
# The handshake is given the idle timeout, after STARTTLS as on implicit TLS.
HANDSHAKE_TIMED_OUT = "client=%s did not finish the TLS handshake in %gs"
# Postfix's name for the moment after the dot; the handler's line saying what
# the reply would have been follows.
LOST_BEFORE_THE_REPLY = (
    "client=%s lost connection after END-OF-MESSAGE, before its reply: %s"
    " (the message was received whole and is handled all the same)"
)
_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_BEFORE_STARTTLS = "refused client=%s login=%s: AUTH before STARTTLS: " + _ENCRYPTION_REQUIRED
# no STARTTLS to tell the ERP to use: it is the listener that must change
AUTH_WITHOUT_TLS = (
    "refused client=%s login=%s: AUTH on listener %s, which has no tls:"
    " a login needs TLS off loopback: " + _ENCRYPTION_REQUIRED
)
IMPLICIT_TLS_CLIENT = (
    "client=%s sent a TLS handshake where an SMTP command was expected:"
    " is it set for implicit TLS (port 465)? this listener offers %s"
)


_HANDLE_CLIENT = SMTP._handle_client.__code__
# aiosmtpd's refusals of a line that is no command it knows, beside the 500
# naming the command
_UNKNOWN = frozenset({"500 Error: bad syntax", _TOO_MANY_UNKNOWN})
# aiosmtpd's refusals of a command it has read but not handed to its method
_BEFORE_DISPATCH = frozenset(
    {
        "500 Error: strict ASCII mode",
        "554 Command refused due to lack of security",
        "530 Must issue a STARTTLS command first",
    }
)

# aiosmtpd's replies without an RFC 3463 code, with one (RFC 2034: every reply
# but the greeting, HELO's and EHLO's once ENHANCEDSTATUSCODES is offered).
# Those aiosmtpd words with a variable part get one from ``_with_code``.
_CODED_REPLIES = {
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
    ),
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO first",
    "503 Error: send EHLO first": "503 5.5.1 Error: send EHLO first",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH <mechanism> [initial-response]",
    "501 Too many values": "501 5.5.4 Syntax: AUTH <mechanism> [initial-response]",
    "501 Syntax: HELO hostname": "501 5.5.4 Syntax: HELO hostname",
    "501 Syntax: EHLO hostname": "501 5.5.4 Syntax: EHLO hostname",
    "501 Syntax: QUIT": "501 5.5.4 Syntax: QUIT",
    "501 Syntax: RSET": "501 5.5.4 Syntax: RSET",
    "501 Syntax: STARTTLS": "501 5.5.4 Syntax: STARTTLS",
    "501 Syntax: VRFY <address>": "501 5.5.4 Syntax: VRFY <address>",
    "501 Syntax: MAIL FROM: <address>": "501 5.5.4 Syntax: MAIL FROM:<address>",
    "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]": (
        "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
    ),
    "501 Syntax: RCPT TO: <address>": "501 5.5.4 Syntax: RCPT TO:<address>",
    "501 Syntax: RCPT TO: <address> [SP <mail-parameters>]": (
        "501 5.5.4 Syntax: RCPT TO:<address> [SP <mail-parameters>]"
    ),
    "501 Error: BODY can only be one of 7BIT, 8BITMIME": (
        "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"
    ),
    "501 Error: SMTPUTF8 takes no arguments": "501 5.5.4 Error: SMTPUTF8 takes no arguments",
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "554 Command refused due to lack of security": (
        "554 5.7.0 Command refused due to lack of security"
    ),
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
}
_CODED = re.compile(r"[245][0-9][0-9][ -][245]\.[0-9]{1,3}\.[0-9]{1,3}(?:[ \r]|\Z)")
# The code for an error reply aiosmtpd words with a variable part (an unknown
# command's name, VRFY's argument), by its reply code.
_ERROR_CODES = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4"}


def non_ascii_reply(line: bytes) -> str:
    """The refusal of a command line with non-ASCII in it, naming the address
    when that is where it is; ``relay preview`` gives the same."""
    match = _non_ascii_path(line)
    if match is None:
        return NON_ASCII  # in a parameter (ENVID=, ORCPT=), not in the address
    if not match[3].isascii():
        return f"501 5.6.7 Non-ASCII address <{_escaped(match[3])}>: SMTPUTF8 is not offered"
    if not match[2].isascii():  # a display name ("Jørgen" <…>), which the relay drops
        return (
            f"501 5.6.7 Non-ASCII name before <{_escaped(match[3])}>: SMTPUTF8 is not"
            " offered; leave the name out of the envelope"
        )
    return NON_ASCII


def _non_ascii_path(line: bytes) -> re.Match[bytes] | None:
    match = _NON_ASCII_PATH.match(line)
    if match is None or _PARAMETER_BEFORE.search(match[2]):
        return None
    return match


def _escaped(path: bytes) -> str:
    return repr(path)[2:-1]  # as bytes: \xc3\xb8


def _noted(
    smtp: RelaySMTP, verb: str, method: Callable[[str], Awaitable[None]]
) -> Callable[[str], Awaitable[None]]:
    """``method``, the client's command noted first for the log's ``after``."""

    @functools.wraps(method)
    async def noted(arg: str) -> None:
        smtp._after = verb
        await method(arg)

    return noted


def handshake_failure(error: BaseException, context: ssl.SSLContext | None, listener: str) -> str:
    """Why a handshake failed, for ``HANDSHAKE_FAILED``. A client too old for the
    listener's ``min_version`` is told apart, with a lower one to set (OpenSSL
    does not say which version the client offered: "1.2" below 1.3, else "1.0"):
    its ``unsupported protocol`` said neither, and a legacy ERP looked broken."""
    version = None if context is None else _VERSION_NAMES.get(context.minimum_version)
    too_old = isinstance(error, ssl.SSLError) and error.reason == "UNSUPPORTED_PROTOCOL"
    if not too_old or version is None:
        return f"{str(error) or repr(error)} (listener {listener})"
    said = f"the client offered an older TLS version than this listener's min_version {version}"
    if version == "1.0":
        return f"{said} (SSL 3.0 or older, which the relay does not take; listener {listener})"
    if version == "1.3":  # "1.0" would also drop the listener to OpenSSL's security level 0
        hint = f'set tls: min_version: "1.2" on listener {listener} for a client without TLS 1.3'
    else:
        hint = f'set tls: min_version: "1.0" on listener {listener} for a legacy client'
    return f"{said} ({hint})"


class RelaySMTP(SMTP):
    # What the stream reader takes as one line: an AUTH line. Every other
    # command is still held to its own limit (``command_size_limits``), DATA
    # lines to theirs (``content``).
    line_length_limit = AUTH_LINE + 2

    def __init__(
        self,
        handler: Any,
        *,
        listener_name: str,
        allow: tuple[Network, ...],
        connections: set[RelaySMTP],
        open_here: Callable[[], int] | None = None,
        files: FileRoom | None = None,
        clients: ClientRow | None = None,
        per_client: int | None = None,
        most: int | None = None,
        tally: TallyRow | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._smtp_methods = {
            verb: _noted(self, verb, method) for verb, method in self._smtp_methods.items()
        }
        # aiosmtpd's is one dict for all connections, which each new one clears
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, AUTH=AUTH_LINE
        )
        self._listener_name = listener_name
        self._allow = allow
        self._connections = connections
        self._open_here = open_here or (lambda: len(connections))
        self._files = files
        self._clients = clients
        self._per_client = per_client
        self._most = most
        self._tally = tally
        self._counted: list[str] = []  # counted open (``clientlimit``), until lost
        self._admitted = False  # allowed and within the limits: counted open
        self._holding = False
        self._lost = False  # connection_lost was called (see smtp_STARTTLS)
        self._shut_down = False  # told 421 by a stop
        self._ended = False  # the client has closed (at least) its sending side
        # that, or the connection is gone, or it sent QUIT behind its data unasked
        self.hung_up = asyncio.Event()
        self._deadline = 0.0  # loop time: idle until then is allowed
        self._mail_arg: str | None = None  # while a MAIL command is handled
        self._rcpt_arg: str | None = None  # while a RCPT command is handled
        self._parameter_refusal: str | None = None  # see _getparams
        self._refused_recipients = RefusedRecipients()
        self._errors = 0  # error replies since the start or the last message accepted
        self._overshoot = 0  # RCPTs of this transaction past the recipient limit
        self._junk = 0  # NOOP, RSET and VRFY commands, counted like the errors
        self._in_data = False  # reading a DATA section
        self._answering = False  # a message read whole, its reply being made
        # the client's last command, for ``_stage``, as Postfix names it: refused
        # or not, UNKNOWN for one not recognized, END-OF-MESSAGE once a message
        # is answered; None before the first
        self._after: str | None = None
        self._timed_out = False  # told 421 for being idle
        self._handshake_logged = False  # see _log_if_handshake
        self._quiet_in_tls = False  # TLS is on, and the client has sent nothing since
        self._auth_before_starttls_logged = False  # see _log_auth_before_starttls
        self._said_bye = False  # the 221 for QUIT was sent
        # refused MAILs not logged one by one: the login, how many, the last
        self._unlogged: tuple[str | None, int, str, str] | None = None
        self._better = {
            "552 Error: Too much mail data": self._too_big(),
            "552 Error: message size exceeds fixed maximum message size": self._too_big(),
            "500 Line too long (see RFC5321 4.5.3.1.6)": content.LINE_TOO_LONG.line,
            "500 Command line too long": "500 5.5.2 Command line too long",
            "500 Error: strict ASCII mode": NON_ASCII,
            "501 Error: SMTPUTF8 disabled": "555 5.5.4 SMTPUTF8 is not offered",
            "555 MAIL FROM parameters not recognized or not implemented": (
                "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
            ),
            "555 RCPT TO parameters not recognized or not implemented": (
                "555 5.5.4 RCPT TO parameters not recognized or not implemented"
            ),
            # RFC 5321 3.8: a server closes the connection only after a 221 or 421
            _TOO_MANY_UNKNOWN: "421 4.7.0 Too many unrecognized commands, closing the connection",
            "454 TLS not available": NO_STARTTLS,  # said only without a tls_context
            **_CODED_REPLIES,
        }

    def __dir__(self) -> list[str]:
        """aiosmtpd builds its command and AUTH tables from ``dir()`` and
        ``inspect.getmembers`` of the protocol and its handler on every
        connection, a getattr of each of ~200 names (0.2 ms a connection, for
        ERPs that connect per message); only the names it looks for are listed."""
        return hook_names(self, ("auth_", "smtp_"))

    def _too_big(self) -> str:
        return f"552 5.3.4 Message size exceeds the maximum of {self.data_size_limit} bytes"

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to DATA (or RSET): closing now would lose work."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.add(self)
        super().connection_made(transport)
        assert self.session is not None
        if self._tls_protocol is None and transport.get_extra_info("ssl_object") is not None:
            self.session.ssl = _implicit_tls(transport)
        self._quiet_in_tls = self.session.ssl is not None  # again at the end of STARTTLS

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.hung_up.set()
        self._log_if_quiet_in_tls()
        self._log_lost(error)
        self._refused_recipients.end()
        self._log_unlogged()
        self._connections.discard(self)
        self._leave_counted()
        super().connection_lost(error)

    def _log_if_quiet_in_tls(self) -> None:
        """A client gone before its first command over TLS, its handshake done,
        may not have trusted the certificate, and the relay said nothing. Not
        a warning nor a failed handshake: a certificate check by monitoring
        (blackbox, check_ssl_cert) closes there too, at every probe."""
        if not self._quiet_in_tls or self._shut_down or self._timed_out:
            return
        assert self.session is not None
        log.info(CLOSED_AFTER_HANDSHAKE, client_address(self.session.peer))

    def _log_lost(self, error: Exception | None) -> None:
        """A client that greeted and then reset the connection, as Postfix's ``lost
        connection after MAIL from ...``: a client that sent a whole transaction
        and closed at once, before the replies, lost its message with no line in
        the log. Not before the greeting: TCP health checks reset there. Once
        its message is read whole, its handling goes on (``handle_DATA``): "lost
        connection after DATA", which in Postfix means a message not taken, was
        logged before the line saying it was queued."""
        session = self.session
        if not isinstance(error, OSError) or session is None or session.host_name is None:
            return
        if self._said_bye:
            return  # a client may reset the connection once it has read the 221
        if self._in_data:
            return  # said by the DATA reader: "connection lost during DATA"
        peer, reason = client_address(session.peer), error.strerror or error
        if self._answering:
            log.info(LOST_BEFORE_THE_REPLY, peer, reason)
            return
        log.info("client=%s lost connection after %s: %s", peer, self._stage(), reason)

    def eof_received(self) -> bool | None:
        """A client may close its side once it has sent everything, QUIT
        included, and read the replies still to come (Postfix answers them):
        aiosmtpd cancelled the session at once, so the 250 for a message the
        relay went on to accept was never sent, and a second pipelined
        transaction was dropped. The reader is told of the end instead, and
        the session answers what came before it. TLS has no half-close."""
        assert self.session is not None
        self._ended = True
        self.hung_up.set()
        if self.session.ssl is not None:
            return super().eof_received()
        return asyncio.StreamReaderProtocol.eof_received(self)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError):  # everything before the end answered
            assert self.session is not None
            self._log_if_handshake(error.partial)
            log.info("client=%s closed the connection", client_address(self.session.peer))
            self._close_now()
            return ""
        if isinstance(error, TLSSetupException):  # the handler is the listener's: no session
            assert self.session is not None
            peer = client_address(self.session.peer)
            cause = error.__cause__ or error  # a reset mid-handshake has no text of its own
            said = handshake_failure(cause, self.tls_context, self._listener_name)
            log.warning(HANDSHAKE_FAILED, peer, said)
            self._count(tally.TLS_FAILED)
            return ""  # aiosmtpd closes the connection without a reply
        return await super().handle_exception(error)

    def _close_now(self) -> None:
        """End the session at once: what is still buffered is never read as SMTP."""
        if self.transport is not None:
            self.transport.close()  # after what is still to be written
            self._abort_unless_closed()
        self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        self._quiet_in_tls = False
        if not self._holding:
            self._reset_timeout()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline; the timer is re-armed only when it would fire
        too early or is gone. aiosmtpd re-arms it on every command and this class
        on every packet too: a cancel and a new timer each time added up."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        """An ERP's log then says why the connection ended (RFC 5321 3.8, as Postfix does)."""
        if self._in_starttls_handshake():
            self._handshake_timed_out()
        else:
            reply = f"421 4.4.2 {self.hostname} Error: timeout exceeded"
            self._timed_out = True
            self._log_disconnect(reply)
            self._say(reply.encode() + b"\r\n")
        super()._timeout_cb()
        self._abort_unless_closed()

    def _in_starttls_handshake(self) -> bool:
        """Between the 220 to STARTTLS and the handshake's end, the session
        being made anew (with its TLS) only once the handshake is done."""
        return self._tls_protocol is not None and bool(self.session and self.session.ssl is None)

    def _handshake_timed_out(self) -> None:
        """As a stall on a listener of implicit TLS: a failed handshake, not a
        session ended with a 421, which a client mid-handshake could not read
        and which was never sent, the TLS layer holding it until the end of a
        handshake that never came."""
        assert self.session is not None
        peer = client_address(self.session.peer)
        log.warning(HANDSHAKE_TIMED_OUT, peer, self._timeout_duration)
        self._count(tally.TLS_FAILED)

    def _abort_unless_closed(self) -> None:
        """A closing transport first writes out what it holds, which a client that
        reads nothing never lets it do: the connection was kept for good, past
        the idle timeout and a shutdown, holding its buffers."""
        if self.transport is not None:
            self.loop.call_later(LINGER, self.transport.abort)  # no-op once closed

    async def _handle_client(self) -> None:
        assert self.session is not None and self.transport is not None
        if not self._admitted:  # an implicit TLS connection was as it was made
            refusal = self.admit(self.session.peer)
            if refusal is not None:
                if refusal:
                    self._say(refusal.encode() + b"\r\n")  # logged by admit
                self.transport.close()
                return
        await super()._handle_client()

    def admit(self, peer: Any, before_tls: bool = False) -> str | None:
        """None when the client may be served: in the allow list, and within the
        limits (``_within_limits``); else the reply refusing it, "" for none.
        Counted for the metrics either way. ``before_tls``: an implicit TLS
        connection, taken or refused before its handshake, as a plain one
        before its greeting; it is closed without the reply, which a client
        expecting TLS could not read, and the log says so."""
        self._count(tally.CONNECTION)
        if peer is None:  # reset before it was served: nobody to refuse
            return ""
        address = client_address(peer)
        said = " (closed before the TLS handshake, without a reply)" if before_tls else ""
        if address is None or not allowed(address, self._allow):
            log.warning(
                "refused client=%s on listener %s: not in its allow list%s",
                address or peer,
                self._listener_name,
                said,
            )
            self._count(tally.REFUSED, "not_allowed")
            return NOT_ALLOWED.format(client=address)
        if self._out_of_files(str(address), before_tls, said):
            return OUT_OF_FILES
        refusal = self._within_limits(str(address), said)
        self._admitted = refusal is None
        return refusal

    def release(self) -> None:
        """Its places in the limits given up: an implicit TLS connection whose
        handshake failed never becomes a session, whose end would do it."""
        self._leave_counted()

    def _out_of_files(self, address: str, before_tls: bool, said: str) -> bool:
        """Whether this worker has as many connections open as its open-files limit
        leaves room for (``filelimit``): refused then, before the listener's limits,
        so that the sessions open can still write the spool and the audit log. A
        plain connection is among those open already, one before TLS not yet."""
        others = self._open_here() - (0 if before_tls else 1)
        if self._files is None or not self._files.full(others):
            return False
        self._files.refused(address, self._listener_name, said)
        self._count(tally.REFUSED, "out_of_files")
        return True

    def _within_limits(self, address: str, said: str) -> str | None:
        """Counted open for the client (an IPv6 one by its /64, ``counted_as``) and
        on the listener, unless the client has its ``max_connections_per_client``
        open already or the listener its ``max_connections``: then the reply
        refusing it. The client's limit first: a client refused for its own is
        never counted on the listener, where it would have the others refused
        as the listener's limit came near. The log line names the address, and
        the /64 when it was what was counted, as the reply does."""
        if self._clients is None:
            return None
        own = counted_as(address)
        from_own = "from it" if own == address else f"from {own}"
        for client, setting, limit, where, reply, reason in (
            (own, "max_connections_per_client", self._per_client, from_own,
             TOO_MANY, "too_many_from_client"),
            (EVERYONE, "max_connections", self._most, "on it", ALL_BUSY, "too_many"),
        ):  # fmt: skip
            if limit is None or self._enter(client, limit):
                continue
            log.warning(
                "refused client=%s on listener %s: %s open %s already, its %s%s",
                address,
                self._listener_name,
                quantity(limit, "connection"),
                where,
                setting,
                said,
            )
            self._count(tally.REFUSED, reason)
            self._leave_counted()  # now: a burst of refusals would hold the places
            return reply.format(client=client)
        return None

    def _enter(self, client: str, limit: int) -> bool:
        """Counted for ``client``, unless it has ``limit`` open already.

        Counted first, then the total read: two workers taking a burst of one
        client's connections at the same moment each see the other's count,
        so at the limit both may refuse one, but neither lets one past it (read
        first, each took up to the limit from a total the other had not
        added to yet)."""
        assert self._clients is not None
        counted = self._clients.enter(self._listener_name, client)
        if self._clients.open(self._listener_name, client) - int(counted) >= limit:
            if counted:
                self._clients.leave(self._listener_name, client)
            return False
        if counted:
            self._counted.append(client)
        return True

    def _leave_counted(self) -> None:
        if self._clients is not None:
            for client in self._counted:
                self._clients.leave(self._listener_name, client)
        self._counted.clear()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's, but a path opened with ``<`` must be closed: its parser
        took ``<one@example.org`` as the address, and the message went there.
        A ``>`` in a quoted local part closes nothing."""
        arg = without_display_name(arg)
        plain = plain_path(arg)
        if plain is None:
            if arg.startswith("<") and path_end(arg) is None:
                return None, None
            return super()._getaddr(arg)
        localpart = plain[0].rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return plain

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> bytes | _Missing:
        """aiosmtpd's, with the response read by ``read_line``: aiosmtpd's readline
        raised on a long one (a 451 and a traceback) and left the rest of it to be
        read as a command. A response is never logged: it holds a password."""
        challenge = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(challenge) if encode_to_b64 else challenge))
        line = await read_line(self._reader)
        if line is not None and not line.endswith(b"\n"):  # the client's end, not an answer
            self._close_now()
            return MISSING
        if line is None:
            await self.push(AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push(AUTH_ABORTED)
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(BAD_BASE64)
            return MISSING

    @syntax("MAIL FROM:<address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL; a refusal ends the message here, so ``push`` logs it.
        An ``AUTH=`` parameter (RFC 4954 5, sent by relays that log in) is taken
        and ignored, as ``AUTH=<>``: the relay trusts no one's word for the sender."""
        self._mail_arg = arg or ""
        if arg:
            arg = _without_auth_parameter(arg)
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._mail_arg = self._parameter_refusal = None

    @syntax("RCPT TO:<address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT; a refusal within a transaction is logged by ``push``."""
        self._rcpt_arg = arg or ""
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._rcpt_arg = self._parameter_refusal = None

    def _set_post_data_state(self) -> None:
        """The end of a transaction however it ends (DATA, RSET, EHLO, STARTTLS)."""
        self._refused_recipients.end()
        self._overshoot = 0
        super()._set_post_data_state()

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """aiosmtpd's, with RFC 5321's keyword syntax (4.1.2: letters, digits and
        hyphens): it took ``X-FOO=1`` for a syntax error (501), where a
        parameter the relay does not know is 555 (RFC 5321 4.1.1.11). The
        command's DSN parameters are left out of what aiosmtpd checks, so that
        it takes them; one malformed or given twice has ``push`` answer the 501
        naming it (``_parameter_refusal``), where aiosmtpd's quotes only the
        command's syntax. Another parameter given twice is taken, as before:
        Python's smtplib and aiosmtplib add SIZE and BODY of their own to those
        their caller gave; of two SIZEs the larger counts, so that
        ``SIZE=99999 SIZE=1`` does not pass the check at MAIL."""
        found: dict[str, str | bool] = {}
        taken: list[dsn.Given] = []
        for param in params:
            name, eq, value = param.partition("=")
            if not _ESMTP_KEYWORD.fullmatch(name) or (eq and not value):
                return None
            if name.upper() in self._dsn_parameters():
                taken.append((name.upper(), value if eq else True))
            else:
                given = value if eq else True
                twice = name == "SIZE" and name in found
                found[name] = _larger(found[name], given) if twice else given
        refused = dsn.refusal(taken)
        if refused is not None:
            self._parameter_refusal = refused.line
            return None
        return found

    def _dsn_parameters(self) -> frozenset[str]:
        """RFC 3461 puts RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT: on the
        other command they are unknown, 555 as before."""
        if self._mail_arg is not None:
            return dsn.MAIL
        return dsn.RCPT if self._rcpt_arg is not None else frozenset()

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        """aiosmtpd's HELP, with RFC 5321's 214 and an enhanced status code, and
        a 504 for a topic it has no help on, where aiosmtpd's 501 listed them."""
        if await self.check_auth_needed("HELP"):
            return
        assert self.session is not None
        method = self._smtp_methods.get(arg.upper()) if arg else None
        if method is not None and self._syntax_available(method):
            syntax_of: str = method.__smtp_syntax__
            if self.session.extended_smtp and method.__smtp_syntax_extended__:
                syntax_of += method.__smtp_syntax_extended__
            await self.push(f"214 2.0.0 Syntax: {syntax_of}")
            return
        if arg:
            await self.push(HELP_UNKNOWN)
            return
        names = sorted(n for n, m in self._smtp_methods.items() if self._syntax_available(m))
        await self.push(f"214 2.0.0 Supported commands: {' '.join(names)}")

    @property
    def starttls_offered(self) -> bool:
        """Whether HELP lists STARTTLS: as EHLO offers it, until TLS is on."""
        return bool(self.tls_context) and not self._tls_active()

    def _tls_active(self) -> bool:
        return self._tls_protocol is not None or bool(self.session and self.session.ssl is not None)

    @syntax("STARTTLS", when="starttls_offered")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, refused once TLS is on (it would start TLS within
        TLS), and with the end of a connection cut off during the handshake
        seen to: asyncio tells the protocol nothing then, and the session
        waited for ever, holding its memory (about 320 KB each)."""
        if self._tls_active():
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        assert self.session is not None
        handshake_cut = self._tls_protocol is not None and self.session.ssl is None
        if handshake_cut and not self._lost:
            self.connection_lost(None)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        """aiosmtpd's AUTH, after HELO too, as Postfix takes it: a scanner that
        only says HELO, on an ``auth: required`` listener, was refused MAIL for
        want of a login and AUTH for want of EHLO, and could never send. Before
        any greeting it asks for HELO, as MAIL does: "send EHLO first" sent the
        administrator of such a device after something it cannot say."""
        if await self.check_helo_needed():
            return
        if self.in_transaction:  # RFC 4954 4
            await self.push("503 5.5.1 Error: AUTH not permitted during a mail transaction")
            return
        handler, session = self.event_handler, self.session
        assert session is not None
        if self._auth_require_tls and not self._tls_protocol:
            self._log_auth_before_starttls()
        if isinstance(handler, Mechanisms) and handler.login_outdated(session):
            # told "log in again", it was answered "503 Already authenticated"
            session.authenticated = False
            session.auth_data = None
        mechanism, space, rest = (arg or "").partition(" ")
        greeted_with_ehlo = session.extended_smtp
        session.extended_smtp = True  # aiosmtpd's own check of it refuses AUTH after HELO
        try:
            await super().smtp_AUTH(mechanism.upper() + space + rest)  # names are case-blind
        finally:
            session.extended_smtp = greeted_with_ehlo

    def _log_auth_before_starttls(self) -> None:
        """An ERP that skips STARTTLS is refused its AUTH (``538``), then MAIL: the
        log said only that it had not logged in, where it had tried. Once a
        session: an ERP retrying AUTH would fill the log. A listener with no
        ``tls`` offers no STARTTLS to use: the line names the listener to change."""
        if self._auth_before_starttls_logged:
            return
        self._auth_before_starttls_logged = True
        assert self.session is not None
        peer, login = client_address(self.session.peer), _login(self.session) or "-"
        if self.tls_context is None:
            log.info(AUTH_WITHOUT_TLS, peer, login, self._listener_name)
        else:
            log.info(AUTH_BEFORE_STARTTLS, peer, login)

    async def check_auth_needed(self, caller_method: str) -> bool:
        """aiosmtpd's, with Postfix's reply where the login is refused for want of
        TLS: ``Authentication required`` sent the sysadmin after a password the
        ERP had sent, where it is STARTTLS that it skips. aiosmtpd says this only
        with ``require_starttls``, which refuses mail without a login too."""
        assert self.session is not None
        no_tls = self._auth_require_tls and self.tls_context and not self._tls_protocol
        if self._auth_required and not self.session.authenticated and no_tls:
            await self.push("530 Must issue a STARTTLS command first")
            return True
        return await super().check_auth_needed(caller_method)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the section read in large pieces (see ``data``)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:  # as aiosmtpd and Postfix say it
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.envelope.rcpt_tos and self._refused_recipients.any:
            await self.push("554 5.5.1 Error: no valid recipients")  # as Postfix says it
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        try:
            section = await data.read(self._reader, self.data_size_limit)
        except (asyncio.CancelledError, asyncio.IncompleteReadError) as exc:
            assert self.session is not None
            peer = client_address(self.session.peer)
            if self._shut_down:
                log.info("client=%s: DATA cut short by the stop, told 421", peer)
            elif not self._timed_out:  # which ``_timeout_cb`` logged
                log.info("connection lost during DATA client=%s", peer)
            if isinstance(exc, asyncio.IncompleteReadError):
                self._close_now()
                return
            self._writer.close()
            raise
        except Exception:  # MemoryError among them: where the message ends is unknown
            # left to aiosmtpd, the 451 was followed by the rest of the message
            # read as commands, and a MAIL, RCPT and DATA in its text were sent
            assert self.session is not None
            log.exception(
                "client=%s: reading DATA failed; the connection is closed",
                client_address(self.session.peer),
            )
            self._log_refused_message(READ_FAILED)
            self._say(READ_FAILED.encode() + b"\r\n")
            self._close_now()
            return
        finally:
            self._in_data = False
        if section.bare_end:
            assert self.session is not None
            self._log_refused_message(content.BARE_NEWLINE.line)
            self._say(content.BARE_NEWLINE.line.encode() + b"\r\n")
            if self.transport is not None:
                self.transport.close()  # out of step: whatever follows is not read
            return
        if section.overflow is not data.Overflow.NONE:
            assert self.session is not None
            reply = self._too_big()
            self._log_refused_message(reply)
            await self.push(reply)
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = section.content
        sender = self.envelope.mail_from
        if bytes(self._reader._buffer[:4]).upper() == b"QUIT":  # private to asyncio, read only
            # sent behind the data, unasked: such a client is on its way out and
            # may close before the reply (over TLS its close comes ~40 ms later)
            self.hung_up.set()
        self._answering = True
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self._answering = False
        self._set_post_data_state()
        self._after = "END-OF-MESSAGE"  # Postfix's word: "timeout after END-OF-MESSAGE"
        status = "250 OK" if status is MISSING else status
        if status.startswith("2"):
            self._errors = self._junk = 0  # as Postfix: the limits are on a session without mail
        if self._ended:
            log.warning(
                "client=%s from=<%s> closed its side before the reply, which it may not read: %s",
                client_address(self.session.peer),
                sender,
                status,
            )
        await self.push(status)

    async def push(self, status: str | bytes) -> None:
        if self.transport is None:
            return  # the connection has ended: nothing to answer
        if isinstance(status, str):
            self._note_refused_command(status)
            if self._parameter_refusal is not None and status.startswith("501 Syntax: "):
                status, self._parameter_refusal = self._parameter_refusal, None
            better = self._better.get(status, status)
            if better == _MALFORMED and self._mail_arg is not None:
                better = _MALFORMED_SENDER
            if better is NON_ASCII:
                better = self._refuse_non_ascii()
            status = _fit(better)
            if status and status[0] in "45":
                if not _CODED.match(status):
                    status = _with_code(status)
                if self._mail_arg is not None or self._rcpt_arg is not None:
                    self._log_if_refused(status)
                await super().push(status)
                self._count_error(status)
                return
            self._said_bye = status.startswith("221")  # the reply to QUIT alone
        await super().push(status)

    def _count_error(self, status: str) -> None:
        """Close the connection at ``HARD_ERROR_LIMIT`` errors (see there)."""
        if status.startswith("421"):  # aiosmtpd's (AUTH or unknown commands sent too often)
            self._log_disconnect(status)
            return
        if self.transport is None:
            return
        if status.startswith(_TOO_MANY_RECIPIENTS) and self._overshoot < RCPT_OVERSHOOT:
            self._overshoot += 1
            return
        self._add_error()

    def _add_error(self) -> None:
        self._errors += 1
        if self._errors < HARD_ERROR_LIMIT or self.transport is None:
            return
        junk = self._junk - JUNK_COMMAND_LIMIT
        why = f"{self._errors} without a message accepted"
        if junk > 0:
            why += f", {junk} of them NOOP, RSET or VRFY past the first {JUNK_COMMAND_LIMIT}"
        self._log_disconnect(f"{TOO_MANY_ERRORS} ({why})")
        self._say(TOO_MANY_ERRORS.encode() + b"\r\n")
        self._close_now()

    def _log_disconnect(self, reason: str) -> None:
        """The one line of a connection the relay ends with a 421, as Postfix's
        ``timeout after RCPT from ...``: aiosmtpd logged none, or only to a logger
        that is kept quiet. A timeout is INFO, as Postfix logs it: an ERP that
        keeps idle connections in a pool times out routinely."""
        assert self.session is not None
        peer = client_address(self.session.peer)
        level = logging.INFO if self._timed_out else logging.WARNING
        log.log(level, "client=%s disconnected after %s: %s", peer, self._stage(), reason)
        self._count(tally.DROPPED, "timeout" if self._timed_out else "errors")

    def _count(self, name: str, *labels: str) -> None:
        if self._tally is not None:
            self._tally.add(name, self._listener_name, *labels)

    def _stage(self) -> str:
        """The client's last command, as Postfix's ``timeout after RCPT`` names it."""
        if self._in_data:
            return "DATA"
        return self._after or "CONNECT"

    def _log_if_refused(self, status: str) -> None:
        """A refused MAIL ends its message; a refused RCPT, within a transaction,
        one recipient of it (``RefusedRecipients`` bounds how many lines). A 503
        is a command out of sequence, no message refused: a nested MAIL leaves
        the transaction under way to be delivered."""
        assert self.session is not None
        if self._mail_arg is not None and status.startswith("5") and status[1:3] != "03":
            sender = given_sender(self._mail_arg)
            self._log_refused_sender(sender, _with_sent(status, sender, "MAIL", self._mail_arg))
        elif self._rcpt_arg is not None and status.startswith(("4", "5")):
            to = given_path(_GIVEN_RECIPIENT, self._rcpt_arg)
            self._log_refused_recipient(to, _with_sent(status, to, "RCPT", self._rcpt_arg))

    def path_as_given(self) -> str | None:
        """The path of the MAIL or RCPT being handled as the client wrote it (controls
        blanked), for a refusal that quotes it: the parser's form may differ."""
        if self._mail_arg is not None:
            given = given_sender(self._mail_arg)
        elif self._rcpt_arg is not None:
            given = given_path(_GIVEN_RECIPIENT, self._rcpt_arg)
        else:
            return None
        return None if given == "?" else given

    def _log_refused_message(self, reply: str) -> None:
        assert self.session is not None
        refused = submission_of(self._listener_name, self.session, self.envelope, b"")
        log_message_refused(refused, reply)

    def _log_refused_sender(self, sender: str, status: str) -> None:
        assert self.session is not None
        login = _login(self.session)
        if self._errors < REFUSALS_LOGGED:
            log_refused(self.session.peer, login, sender, status)
            return
        if self._unlogged is not None and self._unlogged[0] != login:
            self._log_unlogged()  # counted under another login, or none: said apart
        count = self._unlogged[1] if self._unlogged else 0
        self._unlogged = (login, count + 1, sender, status)

    def _log_refused_recipient(self, to: str, status: str) -> None:
        assert self.session is not None
        if self.in_transaction:
            assert self.envelope is not None
            self._refused_recipients.add(
                self.session.peer, _login(self.session), self.envelope.mail_from, to, status
            )

    def _refuse_non_ascii(self) -> str:
        """aiosmtpd's refusal of a command with non-ASCII in it, made to name the
        address and logged like any other refused MAIL or RCPT: aiosmtpd refuses
        it before ``smtp_MAIL`` or ``smtp_RCPT`` is called, so neither did."""
        line = self._command_line()
        reply = non_ascii_reply(line)
        match = _non_ascii_path(line)
        if match is not None:
            path, logged = _escaped(match[3]), reply
        else:  # none found: the command as sent, escaped
            path = "?"
            verb, _, arg = line.decode("ascii", "backslashreplace").rstrip("\r\n").partition(" ")
            logged = _with_sent(reply, path, verb, arg)
        if line[:4].upper() == b"MAIL":
            self._log_refused_sender(path, logged)
        elif line[:4].upper() == b"RCPT":
            self._log_refused_recipient(path, logged)
        return reply

    def _note_refused_command(self, status: str) -> None:
        """A command aiosmtpd refuses before it calls its method is noted here, for
        the log's ``after``: a MAIL with a non-ASCII address, a command over its
        call limit or before STARTTLS, one not recognized. A line too long is
        not read whole, and leaves the last command as it was. A TLS handshake
        is refused as any of these, by where its random bytes put the first
        line feed (OpenSSL's mostly as non-ASCII)."""
        self._log_if_handshake(self._command_line())
        if status.startswith('500 Error: command "') or status in _UNKNOWN:
            self._after = "UNKNOWN"
        elif status in _BEFORE_DISPATCH or status.endswith(" sent too many times"):
            verb = self._command_line().partition(b" ")[0].decode("ascii", "replace").upper()
            self._after = verb if verb in self._smtp_methods else "UNKNOWN"

    def _log_if_handshake(self, line: bytes) -> None:
        """A client set for implicit TLS (port 465, "SSL/TLS" in an ERP) opens with
        a ClientHello, which the plain greeting answers with 500: the client only
        says it could not connect, and the log only that it closed the connection.
        Once a connection: the rest of the handshake is refused line by line."""
        if self._handshake_logged or not line.startswith(_TLS_HANDSHAKE):
            return
        self._handshake_logged = True
        assert self.session is not None
        offers = "STARTTLS" if self.tls_context is not None else "no TLS"
        log.warning(IMPLICIT_TLS_CLIENT, client_address(self.session.peer), offers)

    def _command_line(self) -> bytes:
        """The command line aiosmtpd's ``_handle_client`` is handling, up the call
        stack: its local ``line``, read only for a refusal that does not say it,
        where keeping every line would cost every command."""
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not _HANDLE_CLIENT:
            frame = frame.f_back
        line = frame.f_locals.get("line") if frame is not None else None
        return line if isinstance(line, bytes) else b""

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        """aiosmtpd's, counted (see ``JUNK_COMMAND_LIMIT``): a loop of them is answered
        without an error, and so was never ended."""
        await super().smtp_NOOP(arg)
        self._count_junk()

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        """aiosmtpd's, counted as NOOP is."""
        await super().smtp_RSET(arg)
        self._count_junk()

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        """aiosmtpd's, counted as NOOP is."""
        await super().smtp_VRFY(arg)
        self._count_junk()

    def _count_junk(self) -> None:
        self._junk += 1
        if self._junk > JUNK_COMMAND_LIMIT:
            self._add_error()

    def _log_unlogged(self) -> None:
        """One line for the refused MAILs not logged one by one, at the connection's
        end, or before such a MAIL of another login (the session's login is
        what it was when they were refused)."""
        if self._unlogged is not None and self.session is not None:
            login, count, sender, status = self._unlogged
            log_refused(
                self.session.peer,
                login,
                sender,
                f"{quantity(count, 'more message')} refused, not logged one by one;"
                f" the last: {status}",
            )
            self._unlogged = None

    @contextlib.contextmanager
    def processing(self) -> Iterator[None]:
        """No idle timeout while the relay itself is busy with the message."""
        self._holding = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            yield
        finally:
            self._holding = False
            if self.transport is not None:
                self._reset_timeout()

    def shut_down(self) -> None:
        """Tell the client why the connection ends (RFC 5321 3.8), then end it."""
        if self.transport is not None:
            self._shut_down = True
            self._say(SHUTTING_DOWN)
            self.transport.close()
            self._abort_unless_closed()

    def _say(self, reply: bytes) -> None:
        """Write a last reply unless the connection is already going."""
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write(reply)


def _implicit_tls(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """What aiosmtpd keeps of a session's TLS after STARTTLS, for one that began
    with it (``implicit``): the session is over TLS as much, in the Received
    field (ESMTPS) and at a half-close."""
    names = ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
    return {name: transport.get_extra_info(name) for name in names}


def _with_code(reply: str) -> str:
    """An error reply given an RFC 3463 code by its reply code (see ``_ERROR_CODES``)."""
    code = reply[:3]
    enhanced = _ERROR_CODES.get(code, f"{code[0]}.0.0")
    return f"{code} {enhanced} {reply[4:]}"


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One line, or None for one longer than the reader's limit, which is then
    read to its end and dropped; at the end of the stream, what there was."""
    try:
        return await reader.readuntil()
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except asyncio.LimitOverrunError as exc:
        consumed = exc.consumed
    while True:
        try:
            await reader.readexactly(consumed)
            await reader.readuntil()
            return None
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        except asyncio.IncompleteReadError:
            return None


def hook_names(obj: object, prefixes: tuple[str, ...]) -> list[str]:
    """The attributes of ``obj`` whose names start with one of ``prefixes``, for
    ``__dir__``: its class's (looked up once) and its own."""
    own = [name for name in vars(obj) if name.startswith(prefixes)]
    return sorted({*_class_names(type(obj), prefixes), *own})


@functools.cache
def _class_names(cls: type, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in dir(cls) if name.startswith(prefixes))


def _larger(earlier: str | bool, given: str | bool) -> str | bool:
    """Of two sizes the larger, which the limit is checked against; one that is
    no number, refused as alone it is (it was dropped for the other)."""
    for value in (earlier, given):
        if not (isinstance(value, str) and value.isdigit()):
            return value
    return max(earlier, given, key=int)  # type: ignore[arg-type]


def log_refused(
    peer: Any, login: str | None, mail_from: str | None, reply: str, to: str | None = None
) -> None:
    """The log line of a message refused on the SMTP side, one per message;
    with ``to``, of one recipient refused. It names the login the session had
    then, as the line of a message refused after its DATA does: a grep for a
    login finds them all."""
    sender = "" if mail_from in (None, "<>") else mail_from
    client = client_address(peer)
    if to is None:
        log.info("refused client=%s login=%s from=<%s>: %s", client, login or "-", sender, reply)
    else:
        log.info(
            "refused client=%s login=%s from=<%s> to=<%s>: %s",
            client, login or "-", sender, to, reply,
        )  # fmt: skip


class RefusedRecipients:
    """The log lines of one transaction's refused RCPTs: the first
    ``RCPT_REFUSALS_LOGGED`` each have one, and the rest, which aiosmtpd does
    not limit, share one at the end of the transaction, naming the last."""

    def __init__(self) -> None:
        self._count = 0
        self._last: tuple[Any, str | None, str | None, str, str] | None = None

    def add(self, peer: Any, login: str | None, mail_from: str | None, to: str, reply: str) -> None:
        """``login``: no AUTH is taken in a transaction, so it is one for all."""
        self._count += 1
        if self._count <= RCPT_REFUSALS_LOGGED:
            log_refused(peer, login, mail_from, reply, to)
        else:
            self._last = (peer, login, mail_from, to, reply)

    @property
    def any(self) -> bool:
        """Whether the transaction had a recipient refused."""
        return self._count > 0

    def end(self) -> None:
        """Log what was not logged one by one; the next transaction starts afresh."""
        if self._last is not None:
            peer, login, mail_from, to, reply = self._last
            more = self._count - RCPT_REFUSALS_LOGGED
            log_refused(
                peer,
                login,
                mail_from,
                f"{quantity(more, 'more recipient')} refused, not logged one by one;"
                f" the last to=<{to}>: {reply}",
            )
        self._count = 0
        self._last = None


def _without_auth_parameter(arg: str) -> str:
    """MAIL's ``FROM:…`` without its ``AUTH=`` parameter: after a path in angle
    brackets, from the parameters after it only; else from anywhere, as
    always. ``AUTH=<kari@…>`` is never the path, nor part of a name before it
    (``x AUTH=<kari@…> <jan@…>`` is jan's, the one path given)."""
    keyword, colon, rest = arg.partition(":")
    if not colon:
        return arg
    rest = without_display_name(rest.lstrip(" \t"))
    end = path_end(rest)
    if end is not None:
        return keyword + colon + rest[:end] + _AUTH_PARAMETER.sub("", rest[end:])
    return keyword + colon + _AUTH_PARAMETER.sub("", rest)


def _with_sent(status: str, path: str, verb: str, arg: str) -> str:
    """``status`` for the log line of a refused MAIL or RCPT whose path was not
    found (``?``), with the command as sent: ``from=<?>`` alone left the
    sysadmin to guess what the client wrote."""
    if path != "?":
        return status
    sent = _CONTROL.sub(escaped_match, f"{verb} {arg}".rstrip())
    if len(sent) > SENT_LOGGED:
        sent = f"{sent[:SENT_LOGGED]} [{len(sent) - SENT_LOGGED} more characters not logged]"
    return f"{status} (the client sent: {sent})"


def given_sender(arg: str | None) -> str:
    """The path a MAIL command names, as given (controls blanked), for a log
    line: a MAIL refused before its path is parsed still names its sender."""
    return given_path(_GIVEN_SENDER, arg)


def given_path(command: re.Pattern[str], arg: str | None) -> str:
    """The path ``arg`` names as ``command`` finds it, controls blanked; ``?`` if none."""
    match = command.match(arg or "")
    return _CONTROL.sub(" ", match.group(1)) if match else "?"


def submission_of(
    listener: str,
    session: Session,
    envelope: Envelope,
    raw: bytes,
    hung_up: asyncio.Event | None = None,
) -> Submission:
    """The transaction as the pipeline takes it, and as a refusal's log line names it."""
    auth = _authenticated(session)
    return Submission(
        listener=listener,
        client_address=client_text(session.peer),
        auth_login=None if auth is None else auth.login,
        auth_hash=None if auth is None else auth.password_hash,
        auth_tenant=None if auth is None else auth.tenant,
        mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
        rcpt_tos=tuple(envelope.rcpt_tos),
        data=raw,
        helo=session.host_name or "",
        tls=session.ssl is not None,
        esmtp=session.extended_smtp,
        hung_up=hung_up,
    )


def _authenticated(session: Session) -> Authenticated | None:
    auth = session.auth_data if session.authenticated else None
    return auth if isinstance(auth, Authenticated) else None


def _login(session: Session) -> str | None:
    auth = _authenticated(session)
    return None if auth is None else auth.login


def client_address(peer: Any) -> IPv4Address | IPv6Address | None:
    """The client's IP; an IPv4-mapped one as the IPv4 address it names, as the
    allow lists hold it (a guard: the relay's IPv6 sockets are IPv6 only, and
    take no IPv4 client)."""
    if not isinstance(peer, tuple) or not peer:
        return None
    return _host_address(peer[0])


def client_text(peer: Any) -> str:
    """``client_address`` as the log and the audit records write it."""
    if not isinstance(peer, tuple) or not peer:
        return str(None)
    return _host_text(peer[0])


@functools.lru_cache(maxsize=4096)
def _host_text(host: Any) -> str:
    return str(_host_address(host))


@functools.lru_cache(maxsize=4096)
def _host_address(host: Any) -> IPv4Address | IPv6Address | None:
    """Parsed once per client, not once per message: ``ipaddress`` is slow enough
    to show in a lone session's profile."""
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def allowed(address: IPv4Address | IPv6Address, networks: tuple[Network, ...]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


_REPLY_OCTETS = 510  # RFC 5321 4.5.3.1.5: 512 with the CRLF
_REPLY_END = 100
_ELIDED = " ... "


def _fit(reply: str) -> str:
    """A reply line any client can read: in ASCII, since SMTPUTF8 is not offered
    (other characters, and controls such as a CR or NUL echoed from a command,
    as ``\\xe4`` escapes), and within RFC 5321's 512 octets, its middle left out
    so that the reason at the start and an upstream's reply quoted at the end
    both stay; the audit log keeps the whole text. smtplib
    gave up on a longer line ("Line too long") instead of reading the refusal;
    a non-ASCII one could not be sent at all and became a 451, retried for ever.
    aiosmtpd writes EHLO's lines in one piece, so each line is fitted alone."""
    if reply.isascii() and len(reply) <= _REPLY_OCTETS and not _CONTROL.search(reply):
        return reply  # nearly every reply, at a third of the cost
    return "\r\n".join(map(_fit_line, reply.split("\r\n")))


def _fit_line(line: str) -> str:
    line = _CONTROL.sub(escaped_match, line.encode("ascii", "backslashreplace").decode("ascii"))
    if len(line) <= _REPLY_OCTETS:
        return line
    head = _REPLY_OCTETS - len(_ELIDED) - _REPLY_END
    return line[:head] + _ELIDED + line[-_REPLY_END:]
