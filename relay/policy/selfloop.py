"""An upstream that is one of the relay's own listeners.

Mail sent to it is taken in again as new mail and sent to it once more, a
loop that fills the queue and the audit log until something breaks. Only
addresses as written (IP addresses, and ``localhost`` and its like) are
compared: ``relay check`` looks nothing up for this, and a name that
resolves here may not on the host the relay runs on. An address is this
host's when a socket can be bound to it here.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address, ip_address

from relay.upstream import helo

_IP = IPv4Address | IPv6Address
_LOOPBACK = (ip_address("127.0.0.1"), ip_address("::1"))
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_PASSIVE


def own_listener(
    host: str, port: int, listeners: Iterable[tuple[str, int, str, object]]
) -> tuple[str, str] | None:
    """The path and address of the first listener (as ``ctx.sockets`` holds them)
    a connection to ``host:port`` reaches, or None."""
    targets = _ips(host, connecting=True)
    for address, listen_port, path, _ in listeners:
        if listen_port == port and any(_reaches(t, b) for t in targets for b in _ips(address)):
            return path, address
    return None


def _ips(host: str, connecting: bool = False) -> tuple[_IP, ...]:
    """A connection to 0.0.0.0 (or ::) goes to this host's loopback, and one to
    ``localhost`` to 127.0.0.1 or ::1, whichever listens."""
    if host.lower() in helo.LOOPBACK_NAMES:
        return _LOOPBACK
    try:
        ip = unmapped(ip_address(host))
    except ValueError:
        return ()
    if connecting and ip.is_unspecified:
        return tuple(loopback for loopback in _LOOPBACK if loopback.version == ip.version)
    return (ip,)


def unmapped(ip: _IP) -> _IP:
    """``::ffff:127.0.0.1`` as the IPv4 address a connection to it reaches, which
    Python 3.11 does not take for loopback, or for 127.0.0.1."""
    mapped = ip.ipv4_mapped if isinstance(ip, IPv6Address) else None
    return ip if mapped is None else mapped


def _reaches(target: _IP, bound: _IP) -> bool:
    """A wildcard socket takes connections to every address of this host of its
    own family only: the relay's IPv6 sockets are IPv6 only. Loopback alone
    was counted, and an upstream on the host's eth0 address passed."""
    if target.version != bound.version:
        return False
    if target == bound:
        return True
    return bound.is_unspecified and (target.is_loopback or is_this_host(target))


def is_this_host(ip: _IP) -> bool:
    """Whether ``ip`` is an address of the host this runs on: the kernel routes
    a datagram socket "connected" to one of its own addresses from that same
    address. Nothing is sent, listened on or looked up. A bind test said yes
    to any address where ``ip_nonlocal_bind`` is on (hosts that take over a
    VIP), and to broadcast addresses; a multicast address is no listener's."""
    if ip.is_multicast:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        where = socket.getaddrinfo(str(ip), 9, family, socket.SOCK_DGRAM, 0, _NUMERIC)[0][4]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(where)
            source = probe.getsockname()[0]
    except OSError:
        return False
    return ip_address(source.partition("%")[0]) == ip_address(str(ip).partition("%")[0])
