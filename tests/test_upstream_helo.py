"""The name EHLO gives upstreams without a ``helo_name``, chosen from the candidates
a host offers, each injected here as it would come from the resolver."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from relay.upstream import helo


def never() -> Iterator[str]:
    raise AssertionError("resolved although the kernel's name is qualified")
    yield ""


@pytest.mark.parametrize(
    ("hostname", "resolved", "chosen"),
    [
        # /etc/hosts: "127.0.0.1 localhost erp01.acme.example erp01": getfqdn said localhost
        ("erp01", ["localhost", "erp01.acme.example"], "erp01.acme.example"),
        ("erp01", ["erp01.acme.example", "localhost"], "erp01.acme.example"),
        ("erp01", ["localhost.localdomain", "", "erp01.acme.example."], "erp01.acme.example"),
        # nothing qualified: the kernel's own name, never a loopback name
        ("erp01", ["localhost.localdomain", "localhost"], "erp01"),
        ("erp01", ["erp01", "ip6-localhost"], "erp01"),
        ("localhost", ["erp01"], "erp01"),
        ("LOCALHOST", ["erp01"], "erp01"),  # a loopback name in capitals is one still
        ("localhost", ["localhost.localdomain"], "localhost"),
        ("", [], "localhost"),
    ],
)
def test_the_first_qualified_name_is_chosen(
    hostname: str, resolved: list[str], chosen: str
) -> None:
    assert helo.choose(hostname, resolved) == chosen


def test_a_qualified_kernel_name_is_taken_without_resolving() -> None:
    """Postfix's myhostname: the resolver, which may wait on DNS, only when needed."""
    assert helo.choose("relay.acme.example", never()) == "relay.acme.example"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("relay.acme.example", True),
        ("erp01", False),
        ("erp01.", False),
        ("localhost", False),
        ("localhost.localdomain", False),
        ("LOCALHOST.LOCALDOMAIN", False),
    ],
)
def test_qualified(name: str, expected: bool) -> None:
    assert helo.qualified(name) is expected


def test_local_hostname_asks_the_resolver_for_the_canonical_name_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As ``hostname -f`` does; getfqdn, which took the address's first name, is
    asked only after it, and the answer is kept for the process."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list[tuple]:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "erp01.acme.example", ("127.0.1.1", 0))]

    monkeypatch.setattr(socket, "gethostname", lambda: "erp01")
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    helo.local_hostname.cache_clear()
    try:
        assert helo.local_hostname() == "erp01.acme.example"
        assert helo.local_hostname() == "erp01.acme.example"
    finally:
        helo.local_hostname.cache_clear()
    assert asked == ["erp01"]


def test_local_hostname_survives_a_name_the_resolver_does_not_know(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unknown(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "gethostname", lambda: "erp01")
    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    monkeypatch.setattr(socket, "getfqdn", lambda name="": name or "erp01")
    helo.local_hostname.cache_clear()
    try:
        assert helo.local_hostname() == "erp01"
    finally:
        helo.local_hostname.cache_clear()
