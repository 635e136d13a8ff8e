"""Open the policy's listeners and close them gracefully.

One asyncio server per listener, each connection getting its own
``RelaySMTP`` around the listener's handler. AUTH is only offered over TLS,
except on listeners bound to loopback alone: there the password cannot be
sniffed off the wire, and local ERPs often cannot do STARTTLS. A listener
with implicit TLS (``implicit``) is encrypted from the first byte, and offers
AUTH wherever it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address

from relay import lowports
from relay.hostport import host_port
from relay.ingress.authcache import Verified
from relay.ingress.authlimit import AuthFailures
from relay.ingress.clientlimit import ClientRow
from relay.ingress.diskspace import DiskGuard
from relay.ingress.filelimit import FileRoom, of_this_process
from relay.ingress.handler import Process, Refused, RelayHandler
from relay.ingress.implicit import ImplicitTLS
from relay.ingress.protocol import RelaySMTP
from relay.policy.model import AuthMode, Listener, ListenerTls, Policy, TlsFiles
from relay.policy.sections import no_login_without_tls
from relay.policy.tlspair import server_context
from relay.quantity import quantity
from relay.tally import TallyRow

log = logging.getLogger("relay")

IDENT = "ESMTP ERP relay"
_MECHANISMS = ("PLAIN", "LOGIN")
_AUTH_ATTEMPTS = 10  # per connection; each costs an scrypt
_UNLIMITED = 2**31  # aiosmtpd limits every command once one is limited
_BACKLOG = 511  # connections waiting for accept: bursts of ERP batch jobs


@dataclass
class Ingress:
    """The running listeners, their connections and the messages being processed."""

    servers: list[tuple[Listener, asyncio.Server]] = field(default_factory=list)
    connections: set[RelaySMTP] = field(default_factory=set)
    in_flight: set[asyncio.Task[str]] = field(default_factory=set)
    verified: Verified = field(default_factory=Verified)  # AUTH passwords, for every listener
    failures: AuthFailures = field(default_factory=AuthFailures)  # failed logins, likewise
    disk: DiskGuard = field(default_factory=DiskGuard)  # free space of the state, likewise
    tls: dict[str, ssl.SSLContext] = field(default_factory=dict)  # per listener, for its TLS
    handshaking: set[ImplicitTLS] = field(default_factory=set)  # implicit TLS not yet done
    served: dict[str, TlsFiles] = field(default_factory=dict)  # their cert, key, min_version
    refused: Refused | None = None  # puts content the SMTP side refused on record
    files: FileRoom = field(default_factory=lambda: FileRoom(0, None))  # connections' room

    def open_here(self) -> int:
        """This worker's connections, on every listener, those in a handshake too."""
        return len(self.connections) + len(self.handshaking)

    def reload_tls(self, listeners: Sequence[Listener]) -> None:
        """Take up the listeners' certificates as the reloaded policy read them
        (a reload is how a renewal is taken up); one that does not load keeps the
        old. The log says whether the bytes changed: "read again" was said of
        bytes held since the start, which no renewal could have changed."""
        for listener in listeners:
            if listener.tls is None or listener.name not in self.tls:
                continue
            name, cert, pair = listener.name, listener.tls.cert, listener.tls
            was = self.served.get(name)
            same_pem = was is not None and _pem(was) == _pem(pair)
            if same_pem and was is not None and was.min_version is pair.min_version:
                log.info("listener %s: TLS certificate %s unchanged", name, cert)
                continue
            try:
                self.tls[listener.name] = server_context(pair)
            except (ssl.SSLError, OSError) as exc:
                log.error(
                    "listener %s: keeping the TLS certificate loaded before: %s: %s%s",
                    name,
                    cert,
                    exc.strerror or exc,
                    kept_min_version(was, pair, "a certificate that loads"),
                )
                continue
            self.served[listener.name] = pair
            if not same_pem:
                log.info("listener %s: TLS certificate %s read again: a new one served", name, cert)
            if was is None or was.min_version is not pair.min_version:
                version = pair.min_version.value
                log.info("listener %s: TLS min_version %s from now on", name, version)

    def bound(self) -> list[tuple[Listener, str, int]]:
        """Each listening socket's real address: a port 0 or a host name resolves here."""
        return [
            (listener, *sock.getsockname()[:2])
            for listener, server in self.servers
            for sock in server.sockets
        ]

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting; let transactions under way finish for up to ``grace`` seconds.

        Idle connections are told 421 at once; a connection is left alone while
        it is between MAIL and the reply to DATA, and told 421 when it is done.
        """
        for _, server in self.servers:
            server.close()
        for handshake in list(self.handshaking):
            handshake.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections or self.in_flight:
            for connection in list(self.connections):
                if not connection.in_transaction:
                    connection.shut_down()
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if self.connections or self.in_flight:
            log.warning(
                "stop grace of %gs over: %s told 421, %s still being taken in",
                round(grace, 1),  # what the stop had left of its grace: 9.999 is 10
                quantity(len(self.connections), "connection"),
                quantity(len(self.in_flight), "message"),
            )
        for connection in list(self.connections):
            connection.shut_down()
        for _, server in self.servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def kept_min_version(kept: TlsFiles | None, wanted: TlsFiles, taken: str) -> str:
    """``, and its min_version …`` where a listener keeping its old pair keeps that
    pair's ``min_version`` too, another than the policy's: a legacy client the
    policy lets in is still refused, which the certificate's words alone did not
    say. ``taken``: the certificate with which a reload takes it up."""
    if kept is None or kept.min_version is wanted.min_version:
        return ""
    return (
        f", and its min_version {kept.min_version.value} (the policy's"
        f" {wanted.min_version.value} is taken with {taken})"
    )


Sockets = Mapping[str, Sequence[socket.socket]]  # listener name -> its listening sockets


def bind(listeners: Sequence[Listener]) -> dict[str, list[socket.socket]]:
    """The listening sockets of every listener, or none: raises OSError, its
    strerror ``cannot listen on ADDRESS:PORT (listener NAME): why``; the reason
    alone does not say which of the listeners, or of a name's addresses, failed.

    Bound before any worker starts, so every worker process accepts on the
    same sockets and a port already in use fails the start, as it should.
    """
    bound: dict[str, list[socket.socket]] = {}
    try:
        for listener in listeners:
            bound[listener.name] = []
            where: tuple[str, int] = (listener.address, listener.port)
            try:
                infos = socket.getaddrinfo(
                    listener.address,
                    listener.port,
                    type=socket.SOCK_STREAM,
                    flags=socket.AI_PASSIVE,
                )
                for family, kind, proto, _, address in dict.fromkeys(infos):
                    where = address[:2]
                    sock = socket.socket(family, kind, proto)
                    bound[listener.name].append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
                    sock.listen(_BACKLOG)
                    sock.setblocking(False)
            except OSError as exc:
                host, port = where
                why = f"{exc.strerror or exc}{lowports.hint(exc.errno, port)}"
                reason = (
                    f"cannot listen on {host_port(host, port)} (listener {listener.name}): {why}"
                )
                raise OSError(exc.errno, reason) from exc
    except BaseException:
        for sock in (s for group in bound.values() for s in group):
            sock.close()
        raise
    return bound


async def start(
    listeners: Sequence[Listener],
    current_policy: Callable[[], Policy],
    process: Process,
    sockets: Sockets,
    failures: AuthFailures | None = None,
    refused: Refused | None = None,
    disk: DiskGuard | None = None,
    clients: ClientRow | None = None,
    tally: TallyRow | None = None,
) -> Ingress:
    """Serve every listener on its sockets from ``bind``; raises ssl.SSLError.
    ``clients``: the open connections counted with the other workers, for the
    listeners' ``max_connections_per_client``; ``tally``: this worker's counts
    for the metrics."""
    loop = asyncio.get_running_loop()
    ingress = Ingress(
        failures=failures or AuthFailures(),
        refused=refused,
        disk=disk or DiskGuard(),
        files=of_this_process(current_policy()),
    )
    try:
        for listener in listeners:
            factory = _factory(listener, current_policy, process, ingress, loop, clients, tally)
            for sock in sockets[listener.name]:
                # its backlog again, or the loop's default of 100 would replace bind's
                server = await loop.create_server(factory, sock=sock, backlog=_BACKLOG)
                ingress.servers.append((listener, server))
    except BaseException:
        for _, server in ingress.servers:
            server.close()
        raise
    return ingress


def _factory(
    listener: Listener,
    current_policy: Callable[[], Policy],
    process: Process,
    ingress: Ingress,
    loop: asyncio.AbstractEventLoop,
    clients: ClientRow | None,
    tally: TallyRow | None,
) -> Callable[[], RelaySMTP | ImplicitTLS]:
    handler = RelayHandler(
        listener,
        current_policy,
        process,
        ingress.in_flight,
        ingress.verified,
        ingress.failures,
        ingress.refused,
        ingress.disk,
        tally,
    )
    tls = server_context(listener.tls) if listener.tls is not None else None
    if tls is not None and listener.tls is not None:
        ingress.tls[listener.name] = tls
        ingress.served[listener.name] = listener.tls
    implicit = tls is not None and listener.tls_mode is ListenerTls.IMPLICIT
    auth_needs_tls = not implicit and not loopback_only(listener.address)
    _warn_about_auth(listener, tls is not None, auth_needs_tls)
    excluded = _MECHANISMS if listener.auth is AuthMode.OFF else ()

    def session() -> RelaySMTP:
        with warnings.catch_warnings():
            # aiosmtpd warns about AUTH without TLS; here it is loopback only, or implicit.
            warnings.simplefilter("ignore")
            return RelaySMTP(
                handler,
                listener_name=listener.name,
                allow=listener.allow,
                connections=ingress.connections,
                open_here=ingress.open_here,
                files=ingress.files,
                clients=clients,
                per_client=listener.max_connections_per_client,
                most=listener.max_connections,
                tally=tally,
                hostname=current_policy().platform.hostname,
                ident=IDENT,
                data_size_limit=listener.max_message_size,
                enable_SMTPUTF8=False,
                decode_data=False,
                tls_context=None if implicit else ingress.tls.get(listener.name),
                timeout=listener.idle_timeout,
                auth_required=listener.auth is AuthMode.REQUIRED,
                auth_require_tls=auth_needs_tls,
                auth_exclude_mechanism=excluded,
                command_call_limit={"AUTH": _AUTH_ATTEMPTS, "*": _UNLIMITED},
                loop=loop,
            )

    def handshake_first() -> ImplicitTLS:
        return ImplicitTLS(
            session(),
            ingress.tls[listener.name],  # as a reload left it
            listener.idle_timeout,
            ingress.handshaking,
            listener.name,
            tally,
        )

    return handshake_first if implicit else session


def _pem(pair: TlsFiles) -> tuple[bytes, bytes]:
    return pair.cert_pem, pair.key_pem


def loopback_only(address: str) -> bool:
    """Whether every address the listener binds is a loopback address."""
    try:
        return ip_address(address).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ip_address(info[4][0]).is_loopback for info in infos)


def _warn_about_auth(listener: Listener, has_tls: bool, auth_needs_tls: bool) -> None:
    """``relay check`` refuses ``auth: required`` without tls off loopback; a
    policy built otherwise (a name resolving differently now) is still told."""
    if listener.auth is AuthMode.OFF or has_tls or not auth_needs_tls:
        return
    if listener.auth is AuthMode.REQUIRED:
        log.error("listener %s: auth %s", listener.name, no_login_without_tls(listener.address))
    else:
        log.warning(
            "listener %s: AUTH is not offered: it needs TLS on %s", listener.name, listener.address
        )
