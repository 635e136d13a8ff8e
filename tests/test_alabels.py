"""Addresses with their domain in the A-label form the relay sends to and the
policy holds: IDNA2008's, and IDNA2003's only where IDNA2008 has none."""

from __future__ import annotations

import pytest

from relay.identify import a_label_address


@pytest.mark.parametrize(
    ("address", "converted"),
    [
        ("kunde@bücher.example", "kunde@xn--bcher-kva.example"),
        ("kunde@faß.example", "kunde@xn--fa-hia.example"),  # IDNA2003: fass.example
        ("kunde@plain.example", "kunde@plain.example"),
        # IDNA2008 has no form for a symbol: a policy holds IDNA2003's, by which
        # such a sender was identified before, and the 550 came with no reason
        ("snow@☃.example", "snow@xn--n3h.example"),
        # IDNA2003 drops the joiner and names another domain: no form at all
        ("kunde@a\u200cb.example", None),
        # nor where it drops one inside a label still not ASCII: bücher's, another's
        ("jan@bü\u200dcher.example", None),
        # nor where it maps a label to ASCII no domain has: the Greek question mark to ";"
        ("kunde@a\u037e.example", None),
        ("snow@SNOW☃.example", "snow@xn--snow-8g3b.example"),
        # a label is 63 octets at most (RFC 1035 2.3.4), the ASCII ones beside it too
        (f"kunde@bücher.{'a' * 63}.example", f"kunde@xn--bcher-kva.{'a' * 63}.example"),
        (f"kunde@bücher.{'a' * 64}.example", None),
        # fully qualified: the root's empty label after the last dot is no label to refuse
        ("kunde@faß.example.", "kunde@xn--fa-hia.example."),  # IDNA2003: fass.example.
    ],
)
def test_a_domain_takes_the_form_the_relay_sends_to(address: str, converted: str | None) -> None:
    assert a_label_address(address) == converted
