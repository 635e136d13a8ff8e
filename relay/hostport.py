"""An address and port as logs, replies and ``relay check`` write them."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets: ``::1:25`` reads as the
    address ``::1:25`` (RFC 3986 3.2.2), not ``::1`` port 25."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
