"""The relay's login to an upstream: one mechanism a connection.

aiosmtplib's ``login`` tries each mechanism the server offers in turn when one
is refused: a wrong password cost two or three failed logins a try (PLAIN,
LOGIN, CRAM-MD5), in every worker and in ``relay upstream test``, and
smarthosts lock an account after a number of them. A refused login fails with
the server's reply, as before; the next try is the next connection's. The
next mechanism is tried only where the refusal is of the mechanism, not the
password: a 504, 534 or 538, or CRAM-MD5 refused (535) in plain text, which
a server that keeps its passwords hashed offers and cannot check (with ``tls:
none`` such a server took PLAIN after it, and must go on doing so).
"""

from __future__ import annotations

import weakref

import aiosmtplib

from relay.upstream import Unreachable

# Best first. Over TLS, PLAIN: what every smarthost takes (RFC 4616), the
# password protected by TLS; CRAM-MD5 is offered by servers that cannot check
# it for an account whose password they keep hashed. In clear, CRAM-MD5 keeps
# the password itself off the wire, as aiosmtplib's order did.
_OVER_TLS = ("plain", "login", "cram-md5")
_IN_CLEAR = ("cram-md5", "plain", "login")

# the mechanisms the relay can log in with, as the sysadmin reads them
DONE = "PLAIN, LOGIN or CRAM-MD5"


def mechanism(client: aiosmtplib.SMTP) -> str | None:
    """The mechanism the login used on this connection, else the one it would
    try first, from its last EHLO: none when the server offers none the relay
    can do."""
    return _used.get(client) or next(iter(_candidates(client)), None)


def _candidates(client: aiosmtplib.SMTP) -> list[str]:
    offered = client.server_auth_methods
    order = _IN_CLEAR if _in_clear(client) else _OVER_TLS
    return [name for name in order if name in offered]


def _in_clear(client: aiosmtplib.SMTP) -> bool:
    return client.get_transport_info("sslcontext") is None


# the mechanism each connection logged in with, for ``relay upstream test``
_used: weakref.WeakKeyDictionary[aiosmtplib.SMTP, str] = weakref.WeakKeyDictionary()
# a refusal of the mechanism, not of the password: RFC 4954's 504, 534 and 538
_OF_THE_MECHANISM = frozenset({504, 534, 538})


def offered(client: aiosmtplib.SMTP) -> list[str]:
    """Each mechanism the EHLO named, in its order, once: a server may list some
    on ``AUTH`` and others on an old-style ``AUTH=`` line, and aiosmtplib's
    extensions keep only the last line's."""
    return list(dict.fromkeys(name.upper() for name in client.server_auth_methods))


async def log_in(client: aiosmtplib.SMTP, username: str, secret: str, who: str) -> None:
    """``who`` names the upstream in a refusal (``smtp.where``). A login the
    server refuses raises aiosmtplib's ``SMTPAuthenticationError``."""
    candidates = _candidates(client)
    if not candidates:
        raise Unreachable(451, "4.7.0", f"Upstream {who}: {_unsuitable(client)} (logging in)")
    in_clear = _in_clear(client)  # not asked once the server may have hung up
    refused: aiosmtplib.SMTPAuthenticationError | None = None
    for chosen in candidates:
        method = getattr(client, f"auth_{chosen.replace('-', '')}")
        try:
            await method(username, secret)
        except aiosmtplib.SMTPAuthenticationError as exc:
            hashed = chosen == "cram-md5" and exc.code == 535 and in_clear
            if chosen == candidates[-1] or not (exc.code in _OF_THE_MECHANISM or hashed):
                raise
            refused = exc
            continue
        except aiosmtplib.SMTPServerDisconnected as exc:
            if refused is None:
                raise
            raise refused from exc  # hung up after it: its refusal says why, not "lost"
        _used[client] = chosen
        return


def _unsuitable(client: aiosmtplib.SMTP) -> str:
    """What the server offers and what would do, instead of aiosmtplib's "No
    suitable authentication method found." that said neither."""
    names = offered(client)
    if names:
        return (
            f"offers AUTH {' '.join(names)} only; the relay logs in with {DONE}:"
            " use an account or app password the server takes with one of them"
            " (or a smarthost that does)"
        )
    if _in_clear(client):
        return (
            "offers no AUTH without TLS: set tls: starttls or implicit if it offers it"
            " over TLS, or take out username and the password if it takes mail without a login"
        )
    return "offers no AUTH: take out username and the password if it takes mail without a login"
