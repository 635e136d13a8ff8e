"""An upstream's delivery slots: a message just accepted and the mail already
waiting take a free slot in turns, and a cancelled waiter gives its turn on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from relay import slots as slots_module
from relay.slots import WIDEN_AFTER, Slots


async def _holding(
    slots: Slots, fresh: bool, order: list[str], name: str, tenant: str = ""
) -> None:
    async with slots.slot(fresh, tenant):
        order.append(name)
        await asyncio.sleep(0)


async def test_fresh_mail_and_waiting_mail_take_turns() -> None:
    """After an outage the backlog went first in line: an invoice accepted once
    the smarthost was back waited for all of it."""
    slots, order = Slots(1), []
    async with slots.slot(False):  # one attempt under way
        backlog = [asyncio.ensure_future(_holding(slots, False, order, f"b{i}")) for i in range(4)]
        await asyncio.sleep(0)
        fresh = [asyncio.ensure_future(_holding(slots, True, order, f"f{i}")) for i in range(2)]
        await asyncio.sleep(0)
        assert slots.locked() and order == []
    await asyncio.wait_for(asyncio.gather(*backlog, *fresh), 5)
    assert order == ["f0", "b0", "f1", "b1", "b2", "b3"]
    assert not slots.locked()


async def test_a_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    slots, order = Slots(1), []
    async with slots.slot(True):
        gone = asyncio.ensure_future(_holding(slots, True, order, "gone"))
        kept = asyncio.ensure_future(_holding(slots, False, order, "kept"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
    await asyncio.wait_for(kept, 5)
    assert order == ["kept"] and gone.cancelled()
    async with slots.slot(False):  # the slot came back: free again
        pass
    assert not slots.locked()


async def test_tenants_take_turns_each_in_its_own_order() -> None:
    """One company's loop of documents held every other company's mail on the
    shared smarthost behind all of it."""
    slots, order = Slots(1), []
    async with slots.slot(True, "flood"):
        flood = [
            asyncio.ensure_future(_holding(slots, True, order, f"f{i}", "flood")) for i in range(5)
        ]
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(_holding(slots, True, order, "b0", "beta"))]
        others.append(asyncio.ensure_future(_holding(slots, True, order, "g0", "gamma")))
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*flood, *others), 5)
    assert order == ["f0", "b0", "g0", "f1", "f2", "f3", "f4"]


async def test_a_cancelled_waiter_of_a_tenant_leaves_the_others_their_turns() -> None:
    slots, order = Slots(1), []
    async with slots.slot(True, "a"):
        gone = asyncio.ensure_future(_holding(slots, True, order, "gone", "a"))
        kept = asyncio.ensure_future(_holding(slots, True, order, "kept", "b"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
    await asyncio.wait_for(kept, 5)
    assert order == ["kept"] and gone.cancelled()
    assert not slots.locked()


async def test_parked_attempts_take_their_turns_with_those_waiting_as_tasks() -> None:
    """A stalled upstream's backlog waited as tasks, each with its record, and
    counted as attempts under way; parked, it is its queue IDs alone, and the
    turns between the kinds and the tenants are as for those waiting."""
    slots, order = Slots(1), []

    def parked(name: str) -> Callable[[], None]:
        def granted() -> None:
            order.append(name)
            asyncio.get_running_loop().call_soon(slots.give_back)

        return granted

    async with slots.slot(False, "flood"):
        for i in range(3):
            slots.park(False, "flood", parked(f"p{i}"))
        fresh = asyncio.ensure_future(_holding(slots, True, order, "f0", "flood"))
        slots.park(False, "beta", parked("b0"))
        await asyncio.sleep(0)
        assert (slots.waiting(True), slots.waiting(False)) == (1, 0)
    await asyncio.wait_for(fresh, 5)
    for _ in range(10):
        await asyncio.sleep(0)
    assert order == ["f0", "p0", "b0", "p1", "p2"]
    assert not slots.locked()
    assert slots.waiting(True) == 0


async def test_a_parked_attempt_is_handed_a_free_slot_at_once() -> None:
    slots, order = Slots(1), []
    slots.park(True, "a", lambda: order.append("now"))
    assert order == ["now"] and slots.locked()
    with slots.handed():
        pass
    assert not slots.locked()


async def test_upstreams_sharing_a_count_count_their_waiting_tasks_together() -> None:
    """The engine asks at every start: one count, not a sum over every upstream."""
    shared = {True: 0, False: 0}
    one, two, order = Slots(1, shared), Slots(1, shared), []
    async with one.slot(False, "a"), two.slot(False, "b"):
        waiting = [
            asyncio.ensure_future(_holding(one, True, order, "one", "a")),
            asyncio.ensure_future(_holding(two, False, order, "two", "b")),
        ]
        await asyncio.sleep(0)
        assert shared == {True: 1, False: 1}
        assert (one.waiting(True), two.waiting(False)) == (1, 1)
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert shared == {True: 0, False: 0}


async def test_a_refusal_over_the_limit_leaves_the_slots_the_others_hold() -> None:
    """Ten slots against a smarthost that takes three connections: the refused
    ones waited their backoff while the slots let seven more try and fail."""
    slots = Slots(10)
    held = [slots.slot(False) for _ in range(4)]
    for slot in held:
        await slot.__aenter__()
    slots.crowded()  # the fourth refused: three others under way
    assert slots.size == 3
    for slot in held[:2]:  # two end: one slot of theirs goes out of use
        await slot.__aexit__(None, None, None)
    assert slots.size == 3
    async with slots.slot(False):
        assert slots.locked()  # two under way and this one: three
    for slot in held[2:]:
        await slot.__aexit__(None, None, None)
    assert not slots.locked() and slots.size == 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_deliveries_widen_the_slots_again_up_to_their_number() -> None:
    """A round of deliveries and a minute since the last change: one slot more.
    Widened at every round, the smarthost refused a connection at every round."""
    clock = Clock()
    slots = Slots(4, clock=clock)
    async with slots.slot(False):
        slots.crowded()  # none other under way: one slot stays
    assert slots.size == 1
    slots.reached()  # a round at one slot, but not a minute on
    assert slots.size == 1
    clock.now += WIDEN_AFTER
    slots.reached()
    assert slots.size == 2
    clock.now += WIDEN_AFTER
    slots.reached()
    assert slots.size == 2  # a round at two is two deliveries
    slots.reached()
    assert slots.size == 3
    for _ in range(10):
        clock.now += WIDEN_AFTER
        slots.reached()
    assert slots.size == 4 == slots.full
    order: list[str] = []
    tasks = [asyncio.ensure_future(_holding(slots, False, order, str(i))) for i in range(4)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sorted(order) == ["0", "1", "2", "3"] and not slots.locked()


async def test_another_upstream_behind_the_name_has_every_slot_at_once() -> None:
    slots, order = Slots(3), []
    first = slots.slot(False)
    await first.__aenter__()
    slots.crowded()  # alone: one slot, held by it
    waiting = [asyncio.ensure_future(_holding(slots, False, order, str(i))) for i in range(2)]
    await asyncio.sleep(0)
    assert order == []
    slots.widen_fully()  # a reload pointed the name at another smarthost
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert sorted(order) == ["0", "1"] and slots.size == 3
    await first.__aexit__(None, None, None)
    assert not slots.locked()


async def test_a_slot_given_back_while_one_is_owed_comes_back_to_a_waiter() -> None:
    """Widened before the owed slot came back: the waiting attempt is not left
    without a slot the counts say is there."""
    slots, order = Slots(2), []
    first, second = slots.slot(False), slots.slot(False)
    await first.__aenter__()
    await second.__aenter__()
    slots.crowded()  # one other under way: one slot, one owed
    assert slots.size == 1
    waiter = asyncio.ensure_future(_holding(slots, False, order, "w"))
    await asyncio.sleep(0)
    slots.widen_fully()  # the owed one stays in use
    assert slots.size == 2
    await first.__aexit__(None, None, None)  # handed to the waiter
    await asyncio.wait_for(waiter, 5)
    assert order == ["w"]
    await second.__aexit__(None, None, None)
    assert not slots.locked()


async def test_a_slot_refused_alone_rests_before_the_next_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused alone, over a limit another worker's idle connections filled, each
    waiting message took the slot in turn and was refused at once: tens of
    refusals a second until those connections were closed."""
    monkeypatch.setattr(slots_module, "REST", 0.3)
    slots, order = Slots(3), []
    async with slots.slot(False):
        slots.crowded()
    began = time.monotonic()
    await asyncio.wait_for(_holding(slots, False, order, "next"), 5)
    assert time.monotonic() - began >= 0.3
    assert order == ["next"] and slots.size == 1


async def test_a_slot_refused_beside_others_does_not_rest() -> None:
    """With attempts of its own under way the limit is this worker's: the slot goes on."""
    slots, order = Slots(3), []
    other = slots.slot(False)
    await other.__aenter__()
    async with slots.slot(False):
        slots.crowded()
    waiter = asyncio.ensure_future(_holding(slots, False, order, "next"))
    await other.__aexit__(None, None, None)
    await asyncio.wait_for(waiter, 0.2)
    assert order == ["next"]
