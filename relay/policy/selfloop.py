"""An upstream that is one of the relay's own listeners.

Mail sent to it is taken in again as new mail and sent to it once more, a
loop that fills the queue and the audit log until something breaks. Only
addresses as written (IP addresses, and ``localhost`` and its like) are
compared: ``relay check`` looks nothing up for this, and a name that
resolves here may not on the host the relay runs on.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address, ip_address

from relay.upstream import helo

_IP = IPv4Address | IPv6Address
_LOOPBACK = (ip_address("127.0.0.1"), ip_address("::1"))


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
    """A wildcard socket takes loopback connections of its own family only: the
    relay's IPv6 sockets are IPv6 only."""
    if target.version != bound.version:
        return False
    return target == bound or (bound.is_unspecified and target.is_loopback)
