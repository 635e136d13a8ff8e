"""An address and port as logs, replies and ``relay check`` write them."""

from __future__ import annotations

import pytest

from relay.hostport import host_port


@pytest.mark.parametrize(
    ("host", "written"),
    [
        ("smtp.example.org", "smtp.example.org:587"),
        ("192.0.2.1", "192.0.2.1:587"),
        ("::1", "[::1]:587"),
        # an IPv6 address written out in full has no "::" and needs the brackets all the same
        ("2001:db8:0:1:2:3:4:5", "[2001:db8:0:1:2:3:4:5]:587"),
    ],
)
def test_an_ipv6_address_is_bracketed(host: str, written: str) -> None:
    assert host_port(host, 587) == written
