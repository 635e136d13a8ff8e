"""Builders for the relay-wide sections: platform, listeners, identify, classify, dkim.

Each builder reads its section through ``schema.Map`` (which reports
unknown, duplicate and missing keys) and returns None where a problem was
recorded; the loader only assembles a Policy when no builder found any.
"""

from __future__ import annotations

import contextlib
import enum
import os
import pwd
import re
import socket
import ssl
import string
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    collapse_addresses,
    ip_address,
    ip_network,
)
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from yaml.nodes import Node, ScalarNode, SequenceNode

from relay.hostport import host_port
from relay.policy import dkimkey, names, tlspair, values
from relay.policy.model import (
    DEFAULT_DOC_TYPE,
    AuditSettings,
    AuthMode,
    Condition,
    ConditionKind,
    DkimAlgorithm,
    DkimKey,
    DocumentRule,
    Identify,
    IdentitySource,
    Listener,
    ListenerTls,
    MetricsSettings,
    Platform,
    QueueSettings,
    SuppressionSettings,
    TlsFiles,
    TlsVersion,
    UnknownSender,
)
from relay.policy.schema import Ctx, Map, choice, hint, items, join, text
from relay.policy.yamlsource import STR_TAG
from relay.quantity import number, quantity
from relay.spool.store import WRITTEN_IN, Spool, SpoolError

_PLACEHOLDERS = ("user.name", "user.address", "tenant.name")
_SAMPLE = {
    "user": SimpleNamespace(name="Jan Janssens", address="jan@example.com"),
    "tenant": SimpleNamespace(name="Acme AS"),
}
_DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")
_DEFAULT_CONTROL = ("X-ERP-User", "X-Document-Type", "X-Responsible")


def platform(ctx: Ctx, root: Map, key_domains: Collection[str]) -> Platform | None:
    m = root.map(
        "platform",
        ("from_address", "display_name", "return_path", "hostname"),
        required=("from_address", "display_name"),
    )
    from_address = m.read("from_address", values.address)
    display_name = m.read("display_name", display_name_template)
    if display_name is not None and from_address is not None:
        node, path = m.get("display_name"), m.sub("display_name")
        names.warn_of_address_placeholder(ctx, node, path, display_name, from_address)
    return_path = m.read("return_path", values.address) if m.has("return_path") else from_address
    own_domain = from_address.rpartition("@")[2].lower() if from_address else None
    hostname = m.read("hostname", values.domain) if m.has("hostname") else own_domain
    if own_domain is not None and own_domain not in key_domains:
        ctx.problem(
            m.get("from_address"),
            m.sub("from_address"),
            f"no DKIM key for {own_domain} in dkim.keys: the relay could not sign its own From",
        )
    if from_address is None or display_name is None or return_path is None or hostname is None:
        return None
    return Platform(from_address, display_name, return_path, hostname)


def display_name_template(ctx: Ctx, node: Node, path: str) -> str | None:
    """The display name template; only the documented placeholders, so a typo
    shows up here rather than as a KeyError on the first message."""
    value = text(ctx, node, path, "a display name template")
    if value is None:
        return None
    try:
        fields = [p[1:] for p in string.Formatter().parse(value) if p[1] is not None]
        for field, spec, conversion in fields:
            if field not in _PLACEHOLDERS:
                allowed = ", ".join(f"{{{p}}}" for p in _PLACEHOLDERS)
                near = hint(field, _PLACEHOLDERS)
                ctx.problem(node, path, f"unknown placeholder {{{field}}}{near}; use {allowed}")
                return None
            if spec or conversion:
                ctx.problem(node, path, _plain_only(field, spec, conversion))
                return None
        value.format_map(_SAMPLE)
        literal = "".join(part[0] for part in string.Formatter().parse(value))
    except (ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
        ctx.problem(node, path, f"invalid template: {exc}")
        return None
    problem = names.template(value, literal)
    if problem:
        ctx.problem(node, path, f"{value!r} {problem}")
        return None
    return value


def _plain_only(field: str, spec: str, conversion: str | None) -> str:
    """A format spec such as ``{user.name:>5000000000}`` made check itself run out
    of memory, and a width pads every From header; a name is put in as it is."""
    written = f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
    return (
        f"expected a plain placeholder, {{{field}}}, not {written}:"
        " names are put in as they are, with no format spec or conversion"
    )


def listeners(ctx: Ctx, root: Map) -> tuple[Listener, ...] | None:
    found: list[Listener | None] = []
    names: dict[str, str] = {}
    entries = root.items("listeners", "a list of listeners")
    if root.has("listeners") and not entries:
        ctx.problem(root.get("listeners"), "listeners", "at least one listener is needed")
    keys = ("name", "address", "port", "auth", "tls", "allow")
    keys += ("max_message_size", "max_recipients", "idle_timeout", "immediate")
    keys += ("max_connections_per_client", "max_connections")
    for node, path in entries:
        m = Map(ctx, node, path, keys, required=("name", "address", "port"))
        name = m.text("name", "a listener name")
        if name is not None and name in names:
            ctx.problem(
                m.get("name"), m.sub("name"), f"listener name already used by {names[name]}"
            )
        elif name is not None:
            names[name] = path
        address = _listen_address(ctx, m)
        port = m.integer("port", None, 1, 65535, "a port number (1..65535)")
        ips: frozenset[_IP] = frozenset()
        if address is not None and port is not None:
            ips = _addresses(ctx, m, address, port)
            mine = _Socket(address, port, path, ips)
            clash = next(filter(None, (_clash(mine, other) for other in ctx.sockets)), None)
            if clash is not None:
                ctx.problem(m.get("port"), m.sub("port"), clash)
            ctx.sockets.append(mine)
        tls_keys = ("cert", "key", "mode", "min_version")
        tls_map = m.map("tls", tls_keys, required=("cert", "key"))
        tls_mode = tls_map.choice("mode", ListenerTls, ListenerTls.STARTTLS)
        _warn_of_tls_unlike_port(ctx, m, tls_map, port, tls_mode)
        min_version = tls_map.choice("min_version", TlsVersion, TlsVersion.V1_2)
        _warn_of_legacy_tls(ctx, tls_map, min_version, ips)
        tls = _tls(ctx, m, tls_map, min_version)
        allow = _allow(ctx, m)
        if allow is not None and ips:
            allow = _reachable(ctx, m, allow, ips, address, port)
        if allow is not None and port is not None:
            ctx.allows.append((port, frozenset(ip.version for ip in ips), allow))
        size = m.integer("max_message_size", 26214400, 1, 2**40, "a positive number of bytes")
        if size is not None:
            sized = m.get("max_message_size") or m.node
            ctx.message_sizes.append((sized, m.sub("max_message_size"), name, size))
        recipients = m.integer("max_recipients", 100, 1, 100000, "a positive integer")
        per_client = m.integer(
            "max_connections_per_client", None, 1, 1_000_000, "a number of connections"
        )
        most = m.integer("max_connections", None, 1, 1_000_000, "a number of connections")
        if per_client is not None and most is not None and per_client >= most:
            message = (
                f"{per_client} is not below max_connections {most}:"
                " one client could take every place on the listener"
            )
            ctx.problems.warn(
                m.get("max_connections_per_client"), m.sub("max_connections_per_client"), message
            )
        auth = m.choice("auth", AuthMode, AuthMode.OPTIONAL)
        idle = m.number("idle_timeout", 300)
        if auth is AuthMode.REQUIRED and not m.has("tls") and _off_loopback(ips):
            ctx.problem(m.get("auth"), m.sub("auth"), no_login_without_tls(address))
            auth = None
        elif auth is AuthMode.OPTIONAL and not m.has("tls") and _off_loopback(ips):
            ctx.problems.warn(m.get("auth") or m.node, m.sub("auth"), _no_auth_offered(address))
        if auth is not None and auth is not AuthMode.REQUIRED and _off_loopback(ips) and allow:
            _note_open(ctx, m, allow, address, port, {ip.version for ip in ips})
        if auth not in (None, AuthMode.OFF) and (m.has("tls") or not _off_loopback(ips)):
            ctx.logins_taken = True
        fields = (
            name,
            address,
            port,
            auth,
            allow,
            size,
            recipients,
            idle,
            m.number("immediate", 0, off=True),
        )
        ok = None not in (*fields, tls_mode, min_version)
        ok = ok and (tls is not None or not m.has("tls"))
        ok = ok and (per_client is not None or not m.has("max_connections_per_client"))
        ok = ok and (most is not None or not m.has("max_connections"))
        listener = (
            Listener(*fields[:4], tls, *fields[4:], per_client, most, tls_mode) if ok else None
        )
        found.append(listener)
    _say_other_family(ctx)
    if not found or None in found:
        return None
    return tuple(found)


def _say_other_family(ctx: Ctx) -> None:
    """The entries of the other family that no listener on the same port takes:
    one of that family there, whose own list allows the entry's network."""
    for port, network, node, path, message in ctx.other_family:
        lists = (a for p, versions, a in ctx.allows if p == port and network.version in versions)
        if not any(_within(network, net) for allow in lists for net in allow):
            ctx.problems.warn(node, path, message)


def _within(network: IPv4Network | IPv6Network, net: IPv4Network | IPv6Network) -> bool:
    return network.version == net.version and network.subnet_of(net)  # type: ignore[arg-type]


_IP = IPv4Address | IPv6Address
# Clients set for 465 (the "SSL/TLS" of ERPs, RFC 8314) begin with a TLS
# handshake, read as a command by a listener that greets in plain text: each
# fails at once (curl: wrong version number; PHPMailer: could not connect).
_NO_IMPLICIT_TLS = (
    "465 is the port of implicit TLS, and clients set for it begin with a TLS handshake,"
    " but this listener greets in plain text (its tls has no mode: implicit):"
    " every such client fails to connect; set tls: {cert: ..., key: ..., mode: implicit},"
    " or listen on 587 (or 25) and set the ERPs to STARTTLS"
)
_IMPLICIT_ON_PLAIN_PORT = (
    "{port} is a port whose clients wait for a greeting in plain text (and then send"
    " STARTTLS), while mode: implicit waits for a TLS handshake: every such client times"
    " out; set mode: starttls, or port: 465"
)


def _warn_of_tls_unlike_port(
    ctx: Ctx, m: Map, tls: Map, port: int | None, mode: ListenerTls | None
) -> None:
    """Port 465 is TLS from the first byte (RFC 8314), 25 and 587 greet in plain
    text: a listener unlike its port passes, and every ERP set the usual way
    for that port fails to connect."""
    if port == 465 and mode is not ListenerTls.IMPLICIT:
        ctx.problems.warn(m.get("port"), m.sub("port"), _NO_IMPLICIT_TLS)
    elif port in (25, 587) and mode is ListenerTls.IMPLICIT:
        message = _IMPLICIT_ON_PLAIN_PORT.format(port=port)
        ctx.problems.warn(tls.get("mode"), tls.sub("mode"), message)


def _listen_address(ctx: Ctx, m: Map) -> str | None:
    """The ``address`` of a mapping the relay binds; an IPv4-mapped one would
    bind an IPv6-only socket that no IPv4 client reaches."""
    address = m.read("address", values.listen_address)
    if address is not None and _ipv4_mapped(address):
        ctx.problem(
            m.get("address"),
            m.sub("address"),
            "an IPv4-mapped address cannot be listened on (IPv6 sockets are IPv6 only):"
            f" write {_ipv4_mapped(address)}",
        )
        return None
    return address


class _Socket(NamedTuple):
    """What one listener binds: its address as written, and the IP addresses that is."""

    address: str
    port: int
    path: str
    ips: frozenset[_IP]


def _addresses(ctx: Ctx, m: Map, address: str, port: int) -> frozenset[_IP]:
    """The addresses relay serve binds, resolved as it resolves them. A name this
    host cannot resolve is not a mistake in the file: a warning, as serve would fail."""
    try:
        ip = ip_address(address)
    except ValueError:
        pass
    else:
        return frozenset({_bindable(ctx, m, address, ip)})
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        message = f"cannot resolve {address} ({reason}): relay serve could not listen on it"
        ctx.problems.warn(m.get("address"), m.sub("address"), message)
        return frozenset()
    return frozenset(_bound_ip(info[4]) for info in infos)


def _bindable(ctx: Ctx, m: Map, address: str, ip: _IP) -> _IP:
    """An address this host has, as serve needs it: ``::1:2525`` is an IPv6
    address (``::0.1.37.37``) and ``::1%lo`` a scope no link-local address
    has, and both passed, for serve to fail at its start. A warning, not a
    mistake in the file: the policy may be checked on another host. What it
    binds comes back with its zone as the interface's index, so that
    ``%eth0`` and ``%4`` are one address to the clash check."""
    host, _, port = address.rpartition(":")
    typed_port = port.isdigit() and values.is_ip(host) and _bind_error(host) is None
    try:
        where = _numeric(address)
    except OSError as exc:
        where, error = None, getattr(exc, "strerror", None) or str(exc)
    else:
        error = _bind_error(where)
    hint = f"; if {port} is the port, write address: {host} and port: {port}"
    message = None
    if error is not None:
        message = f"relay serve could not listen on {address} here ({error})"
    elif typed_port and "%" in host:  # glibc reads a zone eth0:2525 as an alias of eth0
        message = f"the zone of {address} ends in :{port}, which reads as an interface alias"
    if message is not None:
        message += hint if typed_port else ""
        ctx.problems.warn(m.get("address"), m.sub("address"), message)
    return ip if where is None else _bound_ip(where)


def _numeric(address: str) -> tuple[Any, ...]:
    """The socket address serve binds for an IP address (a zone kept as the scope)."""
    return socket.getaddrinfo(
        address, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
    )[0][4]


def _bind_error(where: str | tuple[Any, ...]) -> str | None:
    """Why a socket cannot be bound here to ``where`` (an IP address, or its
    socket address from ``_numeric``); None when it can."""
    try:
        if isinstance(where, str):
            where = _numeric(where)
        family = socket.AF_INET6 if len(where) == 4 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(where)
    except OSError as exc:
        return getattr(exc, "strerror", None) or str(exc)
    return None


def _bound_ip(where: tuple[Any, ...]) -> _IP:
    """The IP address of a socket address, with its scope, if any, by index."""
    if len(where) == 4 and where[3]:
        return ip_address(f"{where[0]}%{where[3]}")
    return ip_address(where[0])


def _clash(mine: _Socket, other: _Socket) -> str | None:
    """Why two listeners cannot both bind their port: one address, or a wildcard
    (0.0.0.0, ::) that takes the port on every address of its family. Each passed
    unless written alike, and relay serve then failed: Address already in use."""
    if mine.port != other.port:
        return None
    pairs = [(a, b) for a in mine.ips for b in other.ips if a.version == b.version]
    here = host_port(mine.address, mine.port)
    for a, b in pairs:
        if a == b:
            both = host_port(str(a), mine.port)
            same = "" if mine.address == other.address else f" (both are {both})"
            return f"{here} is also {other.path}{same}"
    for a, b in pairs:
        wildcard = a if a.is_unspecified else b if b.is_unspecified else None
        if wildcard is not None:
            every = f"{wildcard} takes port {mine.port} on every IPv{wildcard.version} address"
            there = host_port(other.address, other.port)
            return f"{here} overlaps {there} of {other.path}: {every}"
    return None


def _warn_of_legacy_tls(
    ctx: Ctx, tls: Map, version: TlsVersion | None, ips: Collection[_IP]
) -> None:
    """TLS 1.0 and 1.1 are for an ERP that cannot do better (RFC 8996 deprecates
    them): the sysadmin should know the listener now takes them from anyone. On
    loopback no session leaves the host, as with no ``tls`` there, which is not
    warned of either."""
    on_loopback = bool(ips) and not _off_loopback(ips)
    if version in (TlsVersion.V1_0, TlsVersion.V1_1) and not on_loopback:
        assert version is not None
        message = (
            f"TLS {version.value} is a weak protocol (RFC 8996), for a legacy client only"
            " (one that cannot do TLS 1.2); better on a listener bound to loopback or"
            " a private network, with an allow list of those clients"
        )
        ctx.problems.warn(tls.get("min_version"), tls.sub("min_version"), message)


def _tls(ctx: Ctx, listener: Map, m: Map, min_version: TlsVersion | None) -> TlsFiles | None:
    """Loaded once here, so that ``relay check`` (and so a reload) finds a key that
    is not the certificate's, or a file half-written by a renewal, before a
    worker does. ``m``: the listener's ``tls``."""
    cert = m.read("cert", values.certificate_file)
    key = m.read("key", values.key_file)
    if cert is None or key is None:
        return None
    version = min_version or TlsVersion.V1_2  # one not understood is said: the files are checked
    try:
        pair = tlspair.checked_pair(cert[0], key[0], cert[1], key[1], version)
    except tlspair.UnusablePair as exc:
        ctx.problem(m.get(exc.which), m.sub(exc.which), str(exc))
        return None
    except (ssl.SSLError, OSError) as exc:
        reason = exc.strerror or str(exc)
        message = f"cannot use {cert[0]} with {key[0]}: {reason}"
        ctx.problem(m.node, listener.sub("tls"), message)
        return None
    now = datetime.now(UTC)
    invalid = tlspair.validity_problem(pair, now) or tlspair.ends_soon(pair, now)
    if invalid is not None:  # a warning: serve starts, and a renewal then needs only a reload
        ctx.problems.warn(m.get("cert"), m.sub("cert"), invalid)
    return pair


def _off_loopback(ips: Collection[_IP]) -> bool:
    """Whether serve refuses AUTH before STARTTLS on the listener: it does unless
    every address it binds is loopback. A wildcard (0.0.0.0, ::) is no exception:
    the refusal is the listener's, not the client's, so a client on 127.0.0.1
    is refused too. An address that does not resolve was warned of already."""
    return bool(ips) and not all(ip.is_loopback for ip in ips)


def no_login_without_tls(address: str) -> str:
    """Why ``auth: required`` without ``tls`` takes no mail off loopback: an error,
    not a warning, as every client is refused, at MAIL, for want of a login."""
    return (
        f"required, but no client can log in: AUTH is refused before STARTTLS on {address}"
        " (not loopback) and this listener has no tls; configure tls or bind to loopback"
    )


def _no_auth_offered(address: str) -> str:
    """A warning, not an error: mail without a login still passes, as ERPs on a
    LAN often send it; one set up with a login fails at AUTH."""
    return (
        f"optional, but AUTH is not offered on {address} (not loopback) without tls:"
        " a client set up to log in is refused; configure tls, or say auth: off"
    )


def _note_open(
    ctx: Ctx,
    m: Map,
    allow: tuple[IPv4Network | IPv6Network, ...],
    address: str,
    port: int,
    families: set[int],
) -> None:
    """A listener off loopback that takes sessions without a login from every
    address: kept for ``identify``, which knows whether such a session can be
    taken for a user (by the addresses it gives, or as the default user). Only
    networks of the families its sockets take count (IPv6 ones are IPv6 only)."""
    node = m.get("allow")
    if not isinstance(node, SequenceNode):  # the default is loopback
        return
    everyone = next(
        (i for i, net in enumerate(allow) if net.prefixlen == 0 and net.version in families),
        None,
    )
    if everyone is not None:
        who, where = str(allow[everyone]), (node.value[everyone], join(m.sub("allow"), everyone))
    else:
        covering = [v for v in sorted(families) if _covers_all(allow, v)]
        if not covering:
            return
        listed = ", ".join(str(net) for net in allow if net.version == covering[0])
        who, where = f"together, {listed}", (node, m.sub("allow"))
    message = (
        f"{who} lets every address reach {host_port(address, port)}, which takes mail"
        " without a login: anyone who can reach the port can send mail signed as the"
        " policy's users; set auth: required, or allow only the ERP's networks"
    )
    ctx.open_listeners.append((*where, message))


def _covers_all(allow: tuple[IPv4Network | IPv6Network, ...], version: int) -> bool:
    """``0.0.0.0/1`` and ``128.0.0.0/1`` are every address as much as ``0.0.0.0/0``."""
    nets = [net for net in allow if net.version == version]
    return [str(net) for net in collapse_addresses(nets)] == [
        "0.0.0.0/0" if version == 4 else "::/0"
    ]


def _warn_open(ctx: Ctx, order: tuple[IdentitySource, ...], by_default: bool) -> None:
    """Without a login a session is taken for a user by the addresses it gives,
    or as the default user: only ``order: [auth_login]`` with no default needs one."""
    if by_default or any(source is not IdentitySource.AUTH_LOGIN for source in order):
        for node, path, message in ctx.open_listeners:
            ctx.problems.warn(node, path, message)


def _ipv4_mapped(address: str) -> str | None:
    try:
        found = ip_address(address)
    except ValueError:
        return None
    mapped = found.ipv4_mapped if isinstance(found, IPv6Address) else None
    return None if mapped is None else str(mapped)


def _reachable(
    ctx: Ctx,
    m: Map,
    allow: tuple[IPv4Network | IPv6Network, ...],
    ips: frozenset[_IP],
    address: str | None,
    port: int | None,
) -> tuple[IPv4Network | IPv6Network, ...] | None:
    """The allow list, or None when no client of the listener can match it: its
    sockets take IPv4 or IPv6 clients only (IPv6 ones are IPv6 only), and a list
    of the other family refused every client, as an empty one does. Left out,
    it is loopback only, which a listener off loopback should say."""
    if not m.has("allow"):
        if _off_loopback(ips):
            message = (
                f"no allow list: only loopback clients (127.0.0.0/8, ::1) may connect to"
                f" {address}; list the ERPs' networks, e.g. allow: [192.0.2.0/24]"
            )
            ctx.problems.warn(m.node, m.sub("allow"), message)
        return allow
    families = {ip.version for ip in ips}
    if any(network.version in families for network in allow):
        _warn_of_other_family(ctx, m, allow, families, address, port)
        return allow
    versions = " or ".join(f"IPv{v}" for v in sorted(families))
    message = f"no entry is an {versions} network, and every client of {address} is: all refused"
    ctx.problem(m.get("allow"), m.sub("allow"), message)
    return None


def _warn_of_other_family(
    ctx: Ctx,
    m: Map,
    allow: tuple[IPv4Network | IPv6Network, ...],
    families: set[int],
    address: str | None,
    port: int | None,
) -> None:
    """``::`` takes IPv6 clients only (its sockets are IPv6 only), so an IPv4
    entry in its list, mapped or not, passed and never matched: read as dual
    stack, as Linux's default is, it left the IPv4 ERPs refused. A host name
    is left alone: it may have the other family's address where serve runs.
    Said once every listener is read (``listeners``): a ``0.0.0.0`` and ``::``
    pair on one port sharing one list is what the README suggests."""
    node = m.get("allow")
    if address is None or not values.is_ip(address) or not isinstance(node, SequenceNode):
        return
    (family,) = families
    other = 6 if family == 4 else 4
    needs = "0.0.0.0 or an IPv4 address" if other == 4 else ":: or an IPv6 address"
    for i, (item, network) in enumerate(zip(node.value, allow, strict=True)):
        if network.version == family:
            continue
        message = (
            f"{item.value} names IPv{other} clients, and {address} takes IPv{family}"
            f" clients only: it never matches; IPv{other} clients need a listener of"
            f" their own, on {needs}"
        )
        ctx.other_family.append((port, network, item, join(m.sub("allow"), i), message))


def _allow(ctx: Ctx, m: Map) -> tuple[IPv4Network | IPv6Network, ...] | None:
    node = m.get("allow")
    if node is None:
        return tuple(ip_network(c) for c in _DEFAULT_ALLOW)
    if isinstance(node, ScalarNode) and node.tag == STR_TAG and node.value.strip():
        wanted = values.networks_in_text(node.value)
        ctx.problem(node, m.sub("allow"), f"expected a list of CIDRs, {wanted}")
        return None
    entries = items(ctx, node, m.sub("allow"), "a list of CIDRs")
    if isinstance(node, SequenceNode) and not entries:
        ctx.problem(node, m.sub("allow"), "an empty allow list refuses every client")
        return None
    networks = [values.cidr(ctx, item, path) for item, path in entries]
    return tuple(networks) if entries and None not in networks else None


def identify(
    ctx: Ctx,
    root: Map,
    default_users: Mapping[str, str | None],
    anonymous: bool = False,
    login_only: Collection[str] = (),
) -> tuple[Identify | None, tuple[str, ...] | None]:
    """The Identify section and the control headers, which must include its header.
    ``anonymous``: a listener takes sessions without a login; ``login_only``:
    the tenants with ``auth: required``, which such sessions never are (when
    every tenant is, a listener open to every address lets no one send as them)."""
    every_tenant_needs_a_login = bool(login_only) and set(login_only) >= set(default_users)
    m = root.map("identify", ("order", "header", "unknown_sender", "default_tenant"))
    order = _order(ctx, m)
    header = m.read("header", values.control_header) if m.has("header") else "X-ERP-User"
    unknown = m.choice("unknown_sender", UnknownSender, UnknownSender.REJECT)
    tenant = m.text("default_tenant", "a tenant id")
    ok = order is not None and header is not None and unknown is not None
    ok = ok and (tenant is not None or not m.has("default_tenant"))
    where, path = m.get("default_tenant"), m.sub("default_tenant")
    if tenant is not None and tenant not in default_users:
        ctx.problem(where, path, f"no tenant {tenant!r}" + hint(tenant, default_users))
        ok = False
    elif tenant is not None and unknown is UnknownSender.DEFAULT and not default_users[tenant]:
        message = f"tenant {tenant!r} has no default_user, so unknown senders are still refused"
        ctx.problem(where, path, message)
        ok = False
    elif tenant is not None and tenant in login_only:
        message = (
            f"tenant {tenant!r} takes mail only with one of its logins (auth: required),"
            " and default_tenant is for sessions without a login: none of them is ever"
            " one of its users"
        )
        ctx.problems.warn(where, path, message)
    elif tenant is None and unknown is UnknownSender.DEFAULT and anonymous:
        message = (
            "default takes the default_user of the login's tenant; sessions without a login"
            " have none unless default_tenant is set, and their unknown senders are refused"
        )
        ctx.problems.warn(m.get("unknown_sender"), m.sub("unknown_sender"), message)
    if order is not None and unknown is not None and not every_tenant_needs_a_login:
        by_default = unknown is UnknownSender.DEFAULT and tenant is not None
        _warn_open(ctx, order, by_default)
    controls = _control_headers(ctx, root, header)
    if controls is not None:
        _warn_of_headers_sent_on(ctx, controls)
    return (Identify(order, header, unknown, tenant) if ok else None), controls


def _order(ctx: Ctx, m: Map) -> tuple[IdentitySource, ...] | None:
    if not m.has("order"):
        return tuple(IdentitySource)
    sources = ", ".join(s.value for s in IdentitySource)
    entries = m.items("order", "a list of: " + sources)
    if not entries:
        if isinstance(m.get("order"), SequenceNode):  # else items() said what it is not
            ctx.problem(m.get("order"), m.sub("order"), f"expected at least one of: {sources}")
        return None
    order: list[IdentitySource | None] = []
    for node, path in entries:
        source = choice(ctx, node, path, IdentitySource)
        if source is not None and source in order:
            ctx.problem(node, path, f"{source.value} is listed twice")
        order.append(source)
    return tuple(order) if None not in order else None


def _warn_of_headers_sent_on(ctx: Ctx, controls: Collection[str]) -> None:
    """A header a rule or a Reply-To chain reads is most often the ERP's own
    (``X-Document-Type``, ``X-Responsible``), for the relay only; one left out
    of control_headers reaches the recipients. A warning: a header the
    recipients may see is no mistake in itself."""
    removed = {name.lower() for name in controls}
    for node, path, name in ctx.read_headers:
        if name.lower() in removed or values.is_message_header(name):
            continue
        message = (
            f"{name} is not a control header, so it is sent on to the recipients;"
            " add it to control_headers if it is meant for the relay only"
        )
        ctx.problems.warn(node, path, message)


def _control_headers(ctx: Ctx, root: Map, identify_header: str | None) -> tuple[str, ...] | None:
    if root.has("control_headers"):
        entries = root.items("control_headers", "a list of header names")
        found = [values.control_header(ctx, node, path) for node, path in entries]
        if None in found:
            return None
    else:
        found = list(_DEFAULT_CONTROL)
    if identify_header is not None:
        found.append(identify_header)
    unique: dict[str, str] = {}
    for name in found:
        unique.setdefault(name.lower(), name)
    return tuple(unique.values())


def classify(ctx: Ctx, root: Map) -> tuple[tuple[DocumentRule, ...] | None, set[str]]:
    """The rules, and every document type they name (for Reply-To and BCC references)."""
    rules: list[DocumentRule | None] = []
    types = {DEFAULT_DOC_TYPE}
    ids: dict[str, str] = {}
    keys = ("id", "type", "header", "subject", "attachment")
    for node, path in root.items("classify", "a list of rules"):
        m = Map(ctx, node, path, keys, required=("id", "type"))
        rule_id = m.text("id", "a rule id")
        if rule_id is not None and rule_id in ids:
            ctx.problem(m.get("id"), m.sub("id"), f"rule id already used by {ids[rule_id]}")
        elif rule_id is not None:
            ids[rule_id] = path
        doc_type = m.read("type", values.doc_type)
        if doc_type is not None:
            types.add(doc_type)
        conditions = _conditions(ctx, m)
        if m.ok and not (m.has("header") or m.has("subject") or m.has("attachment")):
            ctx.problem(node, path, "a rule needs at least one of: header, subject, attachment")
            conditions = None
        ok = rule_id is not None and doc_type is not None and conditions
        rules.append(DocumentRule(rule_id, doc_type, conditions) if ok else None)
    return (None if None in rules else tuple(rules)), types


def _conditions(ctx: Ctx, rule: Map) -> tuple[Condition, ...] | None:
    found: list[Condition | None] = []
    if rule.has("header"):
        m = rule.map("header", ("name", "pattern"), required=("name", "pattern"))
        name, pattern = m.read("name", values.header_name), m.read("pattern", values.regex)
        if name is not None:
            ctx.read_headers.append((m.get("name"), m.sub("name"), name))
        ok = name is not None and pattern is not None
        found.append(Condition(ConditionKind.HEADER, pattern, name) if ok else None)
    for kind in (ConditionKind.SUBJECT, ConditionKind.ATTACHMENT):
        if rule.has(kind.value):
            pattern = rule.read(kind.value, values.regex)
            found.append(Condition(kind, pattern) if pattern is not None else None)
    return None if None in found else tuple(found)


def dkim(ctx: Ctx, root: Map) -> tuple[tuple[DkimKey, ...] | None, set[str]]:
    """The signing keys, read and tried now, and every domain named (for the platform check)."""
    keys: list[DkimKey | None] = []
    domains: set[str] = set()
    seen: dict[tuple[str, str], str] = {}
    fields = ("domain", "selector", "algorithm", "key_file")
    for node, path in root.map("dkim", ("keys",)).items("keys", "a list of keys"):
        m = Map(ctx, node, path, fields, required=("domain", "selector", "key_file"))
        domain = m.read("domain", values.domain)
        selector = m.read("selector", values.selector)
        if domain is not None:
            domains.add(domain)
        if domain is not None and selector is not None:
            name = (domain, selector.lower())  # DNS names know no case: NEW is new
            if name in seen:
                message = f"{selector}._domainkey.{domain} is also {seen[name]}"
                ctx.problem(m.get("selector"), m.sub("selector"), message)
            seen[name] = path
        algorithm = m.choice("algorithm", DkimAlgorithm, DkimAlgorithm.RSA)
        key = m.read("key_file", values.read_file)
        if domain and selector and algorithm and key:
            data = dkimkey.as_signed(algorithm, _as_saved(key[1]))
            keys.append(_signing_key(ctx, m, DkimKey(domain, selector, algorithm, key[0], data)))
        else:
            keys.append(None)
    return (None if None in keys else tuple(keys)), domains


def _as_saved(pem: bytes) -> bytes:
    """A key file saved by a Windows editor, with CR LF line ends and a UTF-8
    byte order mark, reads as written with LF and without: the PEM parser the
    signer shares with dkimpy takes LF only, and an Ed25519 seed with the mark
    signed (its decoder passes over it) while `relay dkim check` and keygen,
    which decode strictly, could not read it."""
    return pem.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")


def _signing_key(ctx: Ctx, m: Map, key: DkimKey) -> DkimKey | None:
    """The key once it has signed, so that ``relay check`` and a reload refuse a
    file the relay would fail every message with."""
    wrong = dkimkey.problem(key)
    if wrong is None:
        values.warn_if_exposed(ctx, m.get("key_file"), m.sub("key_file"), key.key_file)
        short = dkimkey.weak(key)
        if short is not None:
            ctx.problems.warn(m.get("key_file"), m.sub("key_file"), short)
        return key
    ctx.problem(m.get("key_file"), m.sub("key_file"), f"cannot sign with {key.key_file}: {wrong}")
    return None


State = tuple[QueueSettings | None, AuditSettings | None, SuppressionSettings | None]


def state(ctx: Ctx, root: Map) -> State:
    """Where the spool and the audit log live, and how the queue retries.

    Both default to a ``state`` directory beside the policy file; a service
    sets ``state_directory`` to its own (e.g. /var/lib/erp-relay).
    """
    base = root.read("state_directory", values.file_path) if root.has("state_directory") else None
    base = base or ctx.base / "state"
    _writable(ctx, root, base)
    _audit_gone(ctx, root, base)
    _warn_of_sizes_never_taken(ctx, base)
    q = root.map("queue", ("first_retry", "max_retry", "lifetime", "concurrency"))
    first, ceiling = q.number("first_retry", 60), q.number("max_retry", 3600)
    lifetime = q.number("lifetime", 5 * 86400)
    concurrency = q.integer("concurrency", 10, 1, 1000, "a number of deliveries (1..1000)")
    inverted = first is not None and ceiling is not None and ceiling < first
    if inverted:
        ctx.problem(q.get("max_retry"), q.sub("max_retry"), "must not be less than first_retry")
    if first is not None and lifetime is not None and lifetime < first:
        _warn_no_retry(ctx, q, first, lifetime)
    # the audit section is read whatever the queue's state: check reports every problem
    a = root.map(
        "audit", ("hmac_key_file", "record_subject", "compress_after_days", "retention_days")
    )
    key = a.read("hmac_key_file", values.read_file)
    if key is not None:  # who reads it can forge a chain that verifies
        values.warn_if_exposed(ctx, a.get("hmac_key_file"), a.sub("hmac_key_file"), key[0])
    subject = a.choice("record_subject", _YesNo, _YesNo.NO)
    compress = a.integer("compress_after_days", None, 1, 100000, "a number of days")
    retention = a.integer("retention_days", None, 1, 36500, "a number of days")
    codes = _hard_bounce(ctx, root)
    if inverted or (a.has("hmac_key_file") and key is None):
        return None, None, None
    numbers = (first, ceiling, lifetime, concurrency, subject)
    if None in numbers or codes is None:
        return None, None, None
    queue = QueueSettings(base / "queue", first, ceiling, lifetime, concurrency)
    audit = AuditSettings(
        base / "audit", key[1].strip() if key else None, subject is _YesNo.YES, compress, retention
    )
    return queue, audit, SuppressionSettings(base / SUPPRESSION_FILE, codes)


SUPPRESSION_FILE = "suppression.jsonl"
#: RFC 3463: no such mailbox (5.1.1), no such domain's mail (5.1.10, RFC 7505's
#: null MX), a disabled mailbox (5.2.1). Not 5.7.x: a receiver that blocks the
#: platform says nothing about the address.
HARD_BOUNCE = frozenset({"5.1.1", "5.1.10", "5.2.1"})
_STATUS = re.compile(r"5\.[0-9]{1,3}\.[0-9]{1,3}")


def _hard_bounce(ctx: Ctx, root: Map) -> frozenset[str] | None:
    """The codes of an upstream's refusal that put the address on the suppression list."""
    s = root.map("suppression", ("hard_bounce",))
    if not s.has("hard_bounce"):
        return HARD_BOUNCE
    codes: set[str] = set()
    ok = True
    what = "a permanent enhanced status code such as 5.1.1 (RFC 3463)"
    for node, path in s.items("hard_bounce", "a list of status codes such as [5.1.1, 5.2.1]"):
        code = text(ctx, node, path, what)
        if code is not None and not _STATUS.fullmatch(code):
            ctx.problem(node, path, f"expected {what}, not {code!r}")
            code = None
        elif code is not None and not code.startswith(("5.1.", "5.2.")):
            message = (
                f"{code} says nothing of the address (RFC 3463: 5.1 addressing and 5.2 mailbox"
                " do): a receiver refusing the platform this way would have working"
                " addresses suppressed"
            )
            ctx.problems.warn(node, path, message)
        ok &= code is not None
        codes.add(code or "")
    return frozenset(codes) if ok else None


def _warn_no_retry(ctx: Ctx, q: Map, first: float, lifetime: float) -> None:
    """A message deferred at its first attempt expires before its first retry:
    it is tried once only. Not refused, as that may be meant, but seldom is."""
    message = (
        f"{quantity(lifetime, 'second')} is less than first_retry ({number(first)}): a message"
        " deferred at its first attempt expires before it is tried again"
    )
    ctx.problems.warn(q.get("lifetime") or q.get("first_retry"), q.sub("lifetime"), message)


def _writable(ctx: Ctx, root: Map, base: Path) -> None:
    """``relay serve`` creates the spool and the audit log under ``base``, or fails
    at its start. ``relay check`` runs as the service user (the unit's ExecStartPre),
    so it warns when that user could not: the file itself is not wrong."""
    user = _user()
    queue = base / "queue"
    for directory in (*(queue / name for name in WRITTEN_IN), base / "audit"):
        # os.path, not Path: it says False, rather than raise, behind a closed directory
        existing = next(p for p in (directory, *directory.parents) if os.path.exists(p))
        if os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK):
            continue
        if existing == directory:
            what = f"write in {directory}"
        else:
            why = f"is not writable by {user}" if os.path.isdir(existing) else "is not a directory"
            what = f"create {directory} ({existing} {why})"
        message = f"{user} cannot {what}: relay serve run as {user} would fail"
        ctx.problems.warn(root.get("state_directory"), "state_directory", message)
        return


def _warn_of_sizes_never_taken(ctx: Ctx, base: Path) -> None:
    """A listener keeps 1.5 times its max_message_size free (``reserve_for``):
    where that is more than the state's file system can hold, every MAIL on it
    is refused with 452 4.3.1 for ever, while /readyz, judging by the smallest
    listener's reserve, may say the relay is ready. Its whole size, not what is
    free now: a filling disk is the metrics' to show, and a warning should not
    come and go with it."""
    from relay.ingress.diskspace import capacity, reserve_for  # relay.ingress imports us

    rooms: list[tuple[int, Path]] = []
    for directory in (base / "queue", base / "audit"):
        with contextlib.suppress(OSError):  # _writable says why serve would fail there
            rooms.append((capacity(directory), directory))
    if not rooms:
        return
    room, directory = min(rooms, key=lambda r: r[0])
    for node, path, name, size in ctx.message_sizes:
        reserve = reserve_for(size)
        if reserve > room:
            message = (
                f"listener {name} keeps {reserve} bytes free (1.5 times this), and the"
                f" file system of {directory} holds {room} bytes at most: every MAIL on"
                " it would be refused (452 4.3.1 Insufficient system storage)"
            )
            ctx.problems.warn(node, path, message)


def _audit_gone(ctx: Ctx, root: Map, base: Path) -> None:
    """``relay serve`` refuses to start on a queue holding mail without its audit
    log, rather than begin a new chain the mail's records would go in. Said
    here too: an upgrade, and the unit's start, run ``relay check`` first."""
    audit = base / "audit"
    if os.path.exists(audit):  # a link to a mount that did not come up is gone too
        return
    try:
        queued = len(Spool(base / "queue", create=False).complete())
    except SpoolError:
        return
    if queued:
        message = (
            f"the queue holds {quantity(queued, 'message')} but the audit log {audit} is gone:"
            " relay serve will not start (exit 73); restore it from a backup (its chain goes on),"
            " or make it empty (mkdir) for a new chain"
        )
        ctx.problems.warn(root.get("state_directory"), "state_directory", message)


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def metrics(ctx: Ctx, root: Map) -> MetricsSettings | None:
    """Where the metrics and health endpoints are served; None without the section.

    Read after the listeners, whose ports it must not take: the relay would
    fail at its start with Address already in use.
    """
    if not root.has("metrics"):
        return None
    m = root.map("metrics", ("address", "port"), required=("address", "port"))
    address = _listen_address(ctx, m)
    port = m.integer("port", None, 1, 65535, "a port number (1..65535)")
    if address is None or port is None:
        return None
    mine = _Socket(address, port, m.path, _addresses(ctx, m, address, port))
    clash = next(filter(None, (_clash(mine, other) for other in ctx.sockets)), None)
    if clash is not None:
        ctx.problem(
            m.get("port"), m.sub("port"), f"{clash}; the metrics endpoints need a port of their own"
        )
        return None
    if _off_loopback(mine.ips):
        ctx.problems.warn(m.get("address"), m.sub("address"), _metrics_exposed(address, port))
    return MetricsSettings(address, port)


def _metrics_exposed(address: str, port: int) -> str:
    """A warning, not an error: a monitoring host may have to reach it, behind a firewall."""
    return (
        f"{host_port(address, port)} is not loopback: /metrics, /healthz and /readyz take no login,"
        " and /metrics names the tenants and the queue sizes; keep it on loopback, or"
        " firewall the port"
    )


MAX_WORKERS = 64


def workers(ctx: Ctx, root: Map) -> int | None:
    """Processes that receive and deliver; ``auto`` (the default) is one per usable CPU.

    One event loop is one core: DKIM, TLS and the SMTP dialogue on both sides
    are CPU work, so a busy relay needs a process per core to keep up.
    """
    node = root.get("workers")
    if node is None or (isinstance(node, ScalarNode) and node.value == "auto"):
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
    what = f"auto or a number of processes (1..{MAX_WORKERS})"
    if isinstance(node, ScalarNode) and not node.value.lstrip("+").isdigit():
        ctx.problem(node, root.sub("workers"), f"expected {what}")
        return None
    return root.integer("workers", None, 1, MAX_WORKERS, what)


def run_as(ctx: Ctx, root: Map) -> str | None:
    """The service user a relay started as root runs as once its ports are bound.

    A user missing on this host is a warning, not a mistake in the file: the
    policy may be checked elsewhere, and ``relay serve`` says so at its start.
    """
    name = root.text("run_as", "the name of the service user the relay runs as (erp-relay)")
    if name is None:
        return None
    node, path = root.get("run_as"), root.sub("run_as")
    if not name.strip():
        ctx.problem(node, path, "expected the name of the service user the relay runs as")
        return None
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        ctx.problems.warn(node, path, f"no user {name!r} on this host: relay serve would not start")
        ctx.service_uid = None
        return name
    if uid == 0:
        ctx.problem(node, path, "expected the service user, not one with root's uid 0")
        return None
    ctx.service_uid = uid
    return name


class _YesNo(enum.Enum):
    YES = "yes"
    NO = "no"
