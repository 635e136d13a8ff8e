"""Policies and listeners built directly, for tests of the SMTP side that need no YAML."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_network
from pathlib import Path
from types import MappingProxyType

from relay.policy.model import (
    AuditSettings,
    AuthMode,
    DirectoryUpstream,
    Identify,
    IdentitySource,
    Listener,
    ListenerTls,
    Login,
    Platform,
    Policy,
    QueueSettings,
    TlsFiles,
    UnknownSender,
)

# password: demo-password
DEMO_HASH = "scrypt$16384$8$1$cmVsYXktZGVtby1zYWx0IQ==$x0qG+cibjmfhHeWXcJAwGW27gNPyIus2vhexTU+5xXk="


def listener(
    *,
    name: str = "test",
    address: str = "127.0.0.1",
    port: int = 0,
    auth: AuthMode = AuthMode.OPTIONAL,
    tls: TlsFiles | None = None,
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
    max_message_size: int = 100_000,
    max_recipients: int = 5,
    idle_timeout: float = 30.0,
    tls_mode: ListenerTls = ListenerTls.STARTTLS,
) -> Listener:
    return Listener(
        name=name,
        address=address,
        port=port,
        auth=auth,
        tls=tls,
        allow=tuple(ip_network(a) for a in allow),
        max_message_size=max_message_size,
        max_recipients=max_recipients,
        idle_timeout=idle_timeout,
        tls_mode=tls_mode,
    )


def policy(
    listeners: tuple[Listener, ...] = (),
    logins: dict[str, str] | None = None,
    digest: str = "0" * 64,
) -> Policy:
    """``logins`` maps a login to its password hash (default: erp-acme / demo-password)."""
    logins = {"erp-acme": DEMO_HASH} if logins is None else logins
    state = Path("/nonexistent/state")
    return Policy(
        source=Path("/nonexistent/relay.yaml"),
        digest=digest,
        platform=Platform(
            from_address="noreply@platform.example",
            display_name="{user.name}",
            return_path="bounces@platform.example",
            hostname="relay.test.example",
        ),
        listeners=listeners,
        identify=Identify((IdentitySource.AUTH_LOGIN,), "X-ERP-User", UnknownSender.REJECT, None),
        classify=(),
        control_headers=(),
        dkim_keys=(),
        upstreams=MappingProxyType({}),
        logins=MappingProxyType(
            {name: Login(name, hashed, "acme", ()) for name, hashed in logins.items()}
        ),
        tenants=MappingProxyType({}),
        addresses=MappingProxyType({}),
        queue=QueueSettings(state / "queue", 60, 3600, 432000, 10),
        audit=AuditSettings(state / "audit", None, False, None, None),
    )


def replace(item: Listener, **changes: object) -> Listener:
    return dataclasses.replace(item, **changes)  # type: ignore[arg-type]


def delivering_to(outbox: Path) -> Policy:
    """``policy()`` with one upstream, ``default``, that writes into ``outbox``."""
    upstream = DirectoryUpstream("default", outbox)
    return dataclasses.replace(policy(), upstreams=MappingProxyType({"default": upstream}))
