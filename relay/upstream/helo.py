"""The name EHLO gives upstream servers when the upstream sets no ``helo_name``.

As Postfix chooses ``myhostname``: the kernel's host name, or, when it has
no dot, a fully qualified name it resolves to. ``socket.getfqdn()`` alone
took the first name of the host's address in /etc/hosts, which on many
hosts is ``localhost`` (while ``hostname -f`` names the host), and many
smarthosts refuse ``EHLO localhost``.
"""

from __future__ import annotations

import functools
import itertools
import socket
from collections.abc import Iterable, Iterator

# What /etc/hosts files name the loopback addresses: never a name upstreams accept.
LOOPBACK_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
    }
)


def choose(hostname: str, resolved: Iterable[str]) -> str:
    """The first qualified name among the kernel's ``hostname`` and the names it
    ``resolved`` to (read only as far as needed: each may wait on DNS); failing
    that, the first that is at least not a loopback name; failing that, ``hostname``."""
    fallback = None
    for candidate in _names(hostname, resolved):
        if qualified(candidate):
            return candidate
        if fallback is None and candidate.lower() not in LOOPBACK_NAMES:
            fallback = candidate
    return fallback or hostname or "localhost"


def qualified(name: str) -> bool:
    """Whether ``name`` is a dotted name other than a loopback one."""
    return "." in name.strip(".") and name.lower() not in LOOPBACK_NAMES


def _names(hostname: str, resolved: Iterable[str]) -> Iterator[str]:
    """The candidates as EHLO would give them: without a root dot, empty ones left out."""
    for name in itertools.chain((hostname,), resolved):
        name = name.strip().rstrip(".")
        if name:
            yield name


def _resolved(hostname: str) -> Iterator[str]:
    """The names ``hostname`` resolves to: its canonical name, as ``hostname -f``
    finds it, then getfqdn's choice among the names of its address."""
    try:
        infos = socket.getaddrinfo(hostname, None, flags=socket.AI_CANONNAME)
    except (OSError, UnicodeError):
        infos = []
    yield from (info[3] for info in infos)
    yield socket.getfqdn(hostname)


@functools.cache
def local_hostname() -> str:
    """This host's name for EHLO; resolving it may wait on DNS for seconds, so
    once per process is enough."""
    hostname = socket.gethostname()
    return choose(hostname, _resolved(hostname))
