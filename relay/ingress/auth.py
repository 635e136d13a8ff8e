"""AUTH PLAIN and LOGIN checked against the policy's ``logins``.

The mechanisms are the handler's own ``auth_*`` methods (aiosmtpd prefers
them over its built-ins) because aiosmtpd's authenticator hook is
synchronous and scrypt takes ~50 ms: it runs in a thread so other sessions
keep moving, and a password that verified lately is remembered
(``authcache``). An unknown login is checked against a throw-away hash, so
the reply time does not reveal which logins exist. Failures are slowed down
and then refused (``authlimit``).
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import secrets
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session

from relay import tally
from relay.ingress.authcache import Verified
from relay.ingress.authlimit import TOO_MANY_AS, TOO_MANY_FROM, AuthFailures
from relay.ingress.clientlimit import counted_as
from relay.passwd import hash_password, verify_password
from relay.policy.model import Listener, Policy
from relay.quantity import number, quantity
from relay.tally import TallyRow

log = logging.getLogger("relay")

BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_ABORTED = "501 5.7.0 Auth aborted"
BAD_PLAIN = "501 5.5.2 Cannot split the PLAIN credentials"
EMPTY_LOGIN = "501 5.5.2 Empty login name in the credentials"
EMPTY_PASSWORD = "501 5.5.2 Empty password in the credentials"
USERNAME_CHALLENGE = "Username:"
PASSWORD_CHALLENGE = "Password:"


@dataclass(frozen=True)
class Authenticated:
    login: str  # becomes Submission.auth_login
    password_hash: str = field(repr=False)  # the one the password verified against
    tenant: str | None = None  # the login's then: Submission.auth_tenant


class Mechanisms:
    """Mixin for the handler: ``auth_PLAIN`` and ``auth_LOGIN`` in aiosmtpd's style."""

    _listener: Listener
    _current_policy: Callable[[], Policy]
    _verified: Verified
    _failures: AuthFailures
    _tally: TallyRow | None

    def login_outdated(self, session: Session) -> bool:
        """Whether the session logged in with a password a reload has changed
        since, or at a login a reload took out: its messages are refused
        (``identify``), and it may log in again (and hear 535 for a login gone)."""
        auth = session.auth_data if session.authenticated else None
        if not isinstance(auth, Authenticated):
            return False
        login = self._current_policy().logins.get(auth.login)
        return login is None or login.password_hash != auth.password_hash

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        locked = self._locked(server)
        if locked is not None:
            return locked
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = await _decode(server, args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\0")
        if len(parts) != 3:  # an empty response too: it is no login, not a wrong one
            await server.push(BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if not login or not password:  # RFC 4616 wants both: malformed, not a wrong guess
            await server.push(EMPTY_LOGIN if not login else EMPTY_PASSWORD)
            return AuthResult(success=False, handled=True)
        if authzid and authzid != login:  # acting for someone else is not offered
            name = login.decode("utf-8", "replace")
            log.warning("AUTH failed client=%s login=%r: for another login", _peer(server), name)
            return await self._failed(_peer(server), name)
        return await self._check(server, login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        locked = self._locked(server)
        if locked is not None:
            return locked
        if len(args) == 1:
            login = await server.challenge_auth(USERNAME_CHALLENGE)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = await _decode(server, args[1])
            if login is None:
                return AuthResult(success=False, handled=True)
        assert isinstance(login, bytes)
        if not login:  # no password is asked for a login that cannot be
            await server.push(EMPTY_LOGIN)
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(PASSWORD_CHALLENGE)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(password, bytes)
        if not password:
            await server.push(EMPTY_PASSWORD)
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    def _locked(self, server: SMTP) -> AuthResult | None:
        """A 454 for an address that failed too often lately, before any challenge."""
        peer = _peer(server)
        wait = self._failures.locked(peer)
        return self._lock_reply(peer, wait) if wait else None

    def _lock_reply(self, peer: str, wait: float) -> AuthResult:
        """The login name is not in the reply: it is the client's, any bytes. The
        reply names what is locked (an IPv6 client's /64), the log the address."""
        log.debug("AUTH refused client=%s: too many failed logins", peer)
        self._count("locked")
        text = TOO_MANY_FROM if self._failures.address_locked(peer) else TOO_MANY_AS
        reply = text.format(client=counted_as(peer), wait=quantity(max(round(wait), 1), "second"))
        return AuthResult(success=False, handled=False, message=reply)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        peer = _peer(server)
        try:
            name, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("AUTH failed client=%s: credentials are not UTF-8", peer)
            return await self._failed(peer)
        if not await self._failures.turn(peer, name):  # locked, or by the checks before its turn
            return self._lock_reply(peer, self._failures.locked(peer, name))
        try:
            entry = self._current_policy().logins.get(name)
            encoded = entry.password_hash if entry is not None else None
            ok = encoded is not None and self._verified.known(name, encoded, password)
            if not ok:
                loop = asyncio.get_running_loop()
                ok = await loop.run_in_executor(None, _verify, secret, encoded)
                if ok and encoded is not None:
                    self._verified.remember(name, encoded, password)
            if ok and entry is not None:
                log.debug("AUTH ok client=%s login=%s", peer, name)
                self._failures.succeeded(peer, name)
                self._count("ok")
                return AuthResult(
                    success=True, auth_data=Authenticated(name, entry.password_hash, entry.tenant)
                )
            log.warning("AUTH failed client=%s login=%r", peer, name)
            self._count_failure(peer, name)
        finally:
            self._failures.checked(peer)
        await asyncio.sleep(self._failures.delay)
        return AuthResult(success=False, handled=False)

    def _count(self, result: str) -> None:
        if self._tally is not None:
            self._tally.add(tally.AUTH, self._listener.name, result)

    async def _failed(self, peer: str, login: str | None = None) -> AuthResult:
        """A 535, after the delay, for credentials refused without a check; a
        454 once the address is locked, with nothing counted. Such an answer
        to a challenge left open needs no turn, and counted during a lock it
        filled the places of the guesses still being checked."""
        wait = self._failures.locked(peer, login)
        if wait:
            return self._lock_reply(peer, wait)
        self._count_failure(peer, login)
        await asyncio.sleep(self._failures.delay)
        return AuthResult(success=False, handled=False)

    def _count_failure(self, peer: str, login: str | None) -> None:
        """The lock-out is logged by the failure that makes it, once."""
        self._count("failed")
        was = self._failures.locked(peer, login) > 0
        if not self._failures.failed(peer, login) or was:
            return
        if self._failures.address_locked(peer):
            log.warning(
                "AUTH locked client=%s: %s in %s s, AUTH refused for now",
                peer,
                quantity(self._failures.per_client, "failed login"),
                number(self._failures.window),
            )
        else:
            log.warning(
                "AUTH locked client=%s login=%r: %s at it in %s s, refused for this login for now",
                peer,
                login,
                quantity(self._failures.per_login, "failed login"),
                number(self._failures.window),
            )


def _peer(server: SMTP) -> str:
    return str(server.session.peer[0]) if server.session and server.session.peer else "?"


async def _decode(server: SMTP, text: str) -> bytes | None:
    """An initial response; ``=`` is an empty one (RFC 4954 4)."""
    if text == "=":
        return b""
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        await server.push(BAD_BASE64)
        return None


def _verify(secret: str, encoded: str | None) -> bool:
    if encoded is None:
        verify_password(secret, _decoy())
        return False
    return verify_password(secret, encoded)


@functools.cache
def _decoy() -> str:
    return hash_password(secrets.token_urlsafe(16))
