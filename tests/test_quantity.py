"""Counts in words: the singular is chosen by the number as it is printed."""

from __future__ import annotations

import pytest

from relay.quantity import quantity


@pytest.mark.parametrize(
    ("n", "said"),
    [
        (0, "0 seconds"),
        (1, "1 second"),
        (2, "2 seconds"),
        (0.5, "0.5 seconds"),
        (1.0, "1 second"),
        (1.5, "1.5 seconds"),
        (0.9999999, "1 second"),  # printed as 1: "1 seconds" read as a slip
        (1.0000001, "1 second"),
    ],
)
def test_a_count_is_said_in_the_singular_when_it_prints_as_one(n: float, said: str) -> None:
    assert quantity(n, "second") == said


def test_a_plural_not_made_with_an_s_is_given() -> None:
    assert quantity(1, "entry", "entries") == "1 entry"
    assert quantity(3, "entry", "entries") == "3 entries"
