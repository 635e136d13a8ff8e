"""The workers' counts for the metrics (``relay.tally``)."""

from __future__ import annotations

from relay import tally
from relay.tally import Tally


def test_an_attempt_is_not_counted_under_way_when_its_end_could_not_be() -> None:
    """A row with one slot left gave it to the attempt's beginning and none to its
    end: each attempt then counted as under way for good."""
    counts = Tally(1)
    row = counts.row(0)
    for n in range(tally.SLOTS - 1):
        row.add(tally.UPSTREAM, f"filler{n}", "sent")
    assert not row.began("smarthost")
    assert counts.under_way("smarthost") == 0


def test_a_gone_workers_attempts_end_under_each_name_given() -> None:
    counts = Tally(1)
    row = counts.row(0)
    for name in ("smarthost", "old-name", "smarthost"):
        assert row.began(name)
    row.ended_with_worker(["smarthost", "old-name"])
    assert (counts.under_way("smarthost"), counts.under_way("old-name")) == (0, 0)
    assert row.began("smarthost") and counts.under_way("smarthost") == 1


def test_ending_a_gone_workers_attempts_takes_no_room_for_names_it_never_tried() -> None:
    """Each name any policy has had was given two slots in the row of every
    worker killed: renamed upstreams filled it, and new ones went uncounted."""
    counts = Tally(1)
    row = counts.row(0)
    for n in range(tally.SLOTS - 2):
        row.add(tally.UPSTREAM, f"filler{n}", "sent")
    row.ended_with_worker([f"renamed{n}" for n in range(10)])
    assert row.began("smarthost") and counts.under_way("smarthost") == 1
