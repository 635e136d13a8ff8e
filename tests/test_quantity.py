"""Counts in words: a number said as it is, in the singular at one."""

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
        (0.9999999, "0.9999999 seconds"),  # not rounded to a 1 with a plural
        (1.0000001, "1.0000001 seconds"),
        (59.9999999, "59.9999999 seconds"),
    ],
)
def test_a_count_is_said_whole_and_in_the_singular_at_one(n: float, said: str) -> None:
    assert quantity(n, "second") == said


def test_a_plural_not_made_with_an_s_is_given() -> None:
    assert quantity(1, "entry", "entries") == "1 entry"
    assert quantity(3, "entry", "entries") == "3 entries"
