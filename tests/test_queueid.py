"""Queue IDs: in the order they were made, and read back as the time they were
made only where they are the relay's own (a bounce names IDs of other MTAs)."""

from __future__ import annotations

import pytest

from relay.queueid import new_queue_id, queue_id_time

WHEN_NS = 1_796_000_000_123_456_000


def test_an_id_reads_back_as_the_microsecond_it_was_made() -> None:
    assert queue_id_time(new_queue_id(WHEN_NS)) == WHEN_NS // 1000 / 1e6


def test_ids_sort_as_they_were_made() -> None:
    times = [WHEN_NS + step for step in (0, 1_000, 31_000, 10**9, 86_400 * 10**9)]
    ids = [new_queue_id(t) for t in reversed(times)]
    assert sorted(ids) == ids[::-1]


@pytest.mark.parametrize(
    "other",
    [
        "4Xq9fT2kL1zm",  # Postfix's long ID: another MTA's, named in a bounce
        "ABCDEFGHIJKLMNOP",  # sixteen characters, vowels among them
        "0123456789BCDFGHJ",  # one too many
        "0123456789BCDFG",  # one too few
    ],
)
def test_an_id_not_the_relays_has_no_time(other: str) -> None:
    """A bounce's ENVID or Received field is taken for one of the relay's only
    when it reads as one; a stray name in the queue is listed without an age."""
    assert queue_id_time(other) is None
