"""The workers' counts for the metrics (``relay.tally``)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

import pytest

from relay import tally
from relay.policy.model import AuthMode, DirectoryUpstream, Listener, Policy
from relay.sharedtable import key_of
from relay.tally import Tally, TallyRow, counts_named
from tests.minimal_policy import policy as minimal_policy


def test_an_attempt_the_row_has_no_room_for_is_not_counted_under_way() -> None:
    """Not counted, its end is not either: it would count as under way for good."""
    counts = Tally(1)
    row = counts.row(0)
    for n in range(tally.SLOTS):
        row.add(tally.UPSTREAM, f"filler{n}", "sent")
    assert not row.began("smarthost")
    row.ended("smarthost")
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
    for n in range(tally.SLOTS - 1):
        row.add(tally.UPSTREAM, f"filler{n}", "sent")
    row.ended_with_worker([f"renamed{n}" for n in range(10)])
    assert row.began("smarthost") and counts.under_way("smarthost") == 1


def _upstreams(names: Iterable[str]) -> Policy:
    upstreams = {name: DirectoryUpstream(name, Path("outbox")) for name in names}
    return dataclasses.replace(minimal_policy(), upstreams=MappingProxyType(upstreams))


def _tried(row: TallyRow, name: str) -> None:
    """Every count one attempt and its outcomes take, as a worker makes them."""
    assert row.began(name)
    row.ended(name)
    for result in tally.UPSTREAM_RESULTS:
        row.add(tally.UPSTREAM, name, result)
    row.suspended(name, False)
    row.reached(name, time.monotonic())


def _reach_is_seen(counts: Tally, held: TallyRow, other: TallyRow, name: str) -> None:
    """One worker holds ``name``'s mail; the other reaches it, and the first sees it."""
    held.suspended(name, True)
    assert other.began(name)
    assert counts.under_way(name) == 1
    other.reached(name, time.monotonic() + 1)
    other.ended(name)
    other.add(tally.UPSTREAM, name, "sent")
    assert held.reached_since_held(name)
    assert counts.under_way(name) == 0
    assert counts.total(tally.UPSTREAM, name, "sent") == 2


def test_a_row_has_room_for_every_upstream_the_policy_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A row of 16,384 counts filled at some 2,300 upstreams (tenants' own
    accounts): attempts at the next ones went uncounted, and a worker holding
    mail for one never saw another worker reach it."""
    policy = _upstreams(f"account{n}" for n in range(3000))
    counts = Tally(2, len(counts_named(policy)))
    held, other = counts.row(0, lambda: policy), counts.row(1, lambda: policy)
    with caplog.at_level(logging.WARNING, logger="relay"):
        for name in policy.upstreams:
            _tried(other, name)
        _reach_is_seen(counts, held, other, "account2999")
    assert caplog.records == []


def test_the_counts_of_names_the_policy_dropped_make_room_for_new_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each name any policy had had kept its slots: a platform that changed its
    tenants' accounts over time filled the row as one with that many at once."""
    policies: list[Policy] = []
    counts = Tally(2)
    held = counts.row(0, lambda: policies[-1])
    other = counts.row(1, lambda: policies[-1])
    for generation in range(3):  # 1,300 upstreams each: 23,400 counts in all
        policies.append(_upstreams(f"account{generation}-{n}" for n in range(1300)))
        for name in policies[-1].upstreams:
            _tried(other, name)
    _reach_is_seen(counts, held, other, "account2-1299")
    assert caplog.records == []


def test_a_name_dropped_and_taken_back_starts_again_from_nothing_under_way() -> None:
    """Its attempts begun and ended are given away together, or kept together."""
    policies = [_upstreams(["smarthost"])]
    counts = Tally(1)
    row = counts.row(0, lambda: policies[-1])
    assert row.began("smarthost") and row.began("smarthost")
    row.ended("smarthost")
    policies.append(_upstreams([]))
    for n in range(tally.SLOTS):  # every slot taken, smarthost's given away
        row.add(tally.UPSTREAM, f"other{n}", "sent")
    policies.append(_upstreams(["smarthost"]))
    row.ended("smarthost")  # the attempt under way when it was dropped
    assert counts.under_way("smarthost") == 0
    assert row.began("smarthost") and counts.under_way("smarthost") == 1


def test_a_reload_naming_more_than_the_row_was_made_for_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = _upstreams(f"account{n}" for n in range(1400))
    row = Tally(1).row(0, lambda: policy)
    with caplog.at_level(logging.WARNING, logger="relay"):
        row.add(tally.UPSTREAM, "account0", "sent")
    assert [r.getMessage()[:58] for r in caplog.records] == [
        "metrics counts: the policy names 8400 counts (twelve a lis"
    ]


def test_a_listeners_counts_keep_their_slots_from_new_names() -> None:
    """Each count of a listener the policy names keeps its slot: one left out of
    the names would go to the next new name placed there (a reload adding
    upstreams) and be counted from 0 again."""
    local = Listener("local", "127.0.0.1", 2525, AuthMode.OPTIONAL, None, (), 10**7, 100, 300.0)
    policy = dataclasses.replace(minimal_policy(), listeners=(local,))
    counts = Tally(1)
    row = counts.row(0, lambda: policy)
    keys = [(tally.CONNECTION, "local"), (tally.TLS_FAILED, "local"), (tally.NO_ROOM, "local")]
    keys += [(tally.REFUSED, "local", reason) for reason in tally.REFUSED_REASONS]
    keys += [(tally.DROPPED, "local", reason) for reason in tally.DROPPED_REASONS]
    keys += [(tally.AUTH, "local", result) for result in tally.AUTH_RESULTS]
    for key in keys:
        row.add(*key)
    places = {key_of("\0".join(key)) % tally.SLOTS for key in keys}
    for n in itertools.count():  # a new name placed where each of them is
        name = (tally.UPSTREAM, f"account{n}", "sent")
        place = key_of("\0".join(name)) % tally.SLOTS
        if place in places:
            places.discard(place)
            row.add(*name)
        if not places or n > 10**6:
            break
    assert not places
    assert {key: counts.total(*key) for key in keys} == dict.fromkeys(keys, 1)


def test_a_long_attempt_ending_after_a_later_one_keeps_the_later_reach() -> None:
    """Each worker's latest reach stays: a long attempt that began before a
    failure and ended after a later attempt's reach put its older begin back,
    and the worker holding the mail never saw the upstream was there."""
    counts = Tally(2)
    held, other = counts.row(0), counts.row(1)
    held.suspended("smarthost", True)
    other.reached("smarthost", time.monotonic() + 1)  # begun after the failure
    other.reached("smarthost", time.monotonic() - 10)  # begun before it, ended just now
    assert held.reached_since_held("smarthost")
    assert counts.holding("smarthost") == 0
