"""Ports only root may bind, and what to tell a sysadmin whose relay may not.

Linux lets an unprivileged process bind a port from
``net.ipv4.ip_unprivileged_port_start`` up (1024 unless set otherwise); below
it a bind needs root or the CAP_NET_BIND_SERVICE capability, and fails with
EACCES, whose "Permission denied" alone sent sysadmins looking at file modes.
"""

from __future__ import annotations

import errno

UNPRIVILEGED_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
DEFAULT_START = 1024  # the kernel's, and every system's without /proc
UNIT_CAPABILITY = "AmbientCapabilities=CAP_NET_BIND_SERVICE"  # as systemd/erp-relay.service has


def unprivileged_start(path: str = UNPRIVILEGED_START) -> int:
    """The lowest port anyone may bind; the kernel's default when it cannot be read."""
    try:
        with open(path, "rb") as found:
            return int(found.read())
    except (OSError, ValueError):
        return DEFAULT_START


def hint(code: int | None, port: int, start: int | None = None) -> str:
    """What to add to a bind's EACCES on a port only root may bind; "" for
    any other failure, whose reason says enough."""
    start = unprivileged_start() if start is None else start
    if code != errno.EACCES or not 0 < port < start:
        return ""
    return (
        f": ports below {start} need root or the CAP_NET_BIND_SERVICE capability"
        f" (systemd/erp-relay.service gives it with {UNIT_CAPABILITY})"
    )
