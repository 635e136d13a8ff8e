"""The relay's login to an upstream: one mechanism a connection.

aiosmtplib's ``login`` tries each mechanism the server offers in turn when one
is refused: a wrong password cost two or three failed logins a try (PLAIN,
LOGIN, CRAM-MD5), in every worker and in ``relay upstream test``, and
smarthosts lock an account after a number of them. A refused login fails with
the server's reply, as before; the next try is the next connection's.
"""

from __future__ import annotations

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
    """The mechanism the login uses on this connection, from its last EHLO:
    none when the server offers none the relay can do."""
    offered = client.server_auth_methods
    order = _IN_CLEAR if client.get_transport_info("sslcontext") is None else _OVER_TLS
    return next((name for name in order if name in offered), None)


def offered(client: aiosmtplib.SMTP) -> list[str]:
    """Each mechanism the EHLO named, in its order, once: a server may list some
    on ``AUTH`` and others on an old-style ``AUTH=`` line, and aiosmtplib's
    extensions keep only the last line's."""
    return list(dict.fromkeys(name.upper() for name in client.server_auth_methods))


async def log_in(client: aiosmtplib.SMTP, username: str, secret: str, who: str) -> None:
    """``who`` names the upstream in a refusal (``smtp.where``). A login the
    server refuses raises aiosmtplib's ``SMTPAuthenticationError``."""
    chosen = mechanism(client)
    if chosen is None:
        raise Unreachable(451, "4.7.0", f"Upstream {who}: {_unsuitable(client)} (logging in)")
    method = getattr(client, f"auth_{chosen.replace('-', '')}")
    await method(username, secret)


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
    if client.get_transport_info("sslcontext") is None:
        return (
            "offers no AUTH without TLS: set tls: starttls or implicit if it offers it"
            " over TLS, or take out username and the password if it takes mail without a login"
        )
    return "offers no AUTH: take out username and the password if it takes mail without a login"
