"""Mail accepted while a backlog goes out: started before it, taking turns with it
for the upstream's slots, and neither kind of mail left without a turn."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from relay import engine as engine_module
from relay.engine import Attempt, Engine
from relay.policy.model import Policy
from relay.record import Recorder
from relay.spool import PENDING, RecipientState, Spool
from tests.spoolkit import make_entry
from tests.test_engine_settle import until
from tests.test_engine_warm import message, running

FILES = 20  # the attempts a worker may have under way, small to be filled


class SlowUpstream:
    """Takes each message in ``pause`` seconds; who was tried, in order."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.tried: list[str] = []

    async def __call__(
        self, _: object, __: str, rcpts: list[str], *___: object, **____: object
    ) -> Attempt:
        self.tried.append(rcpts[0])
        await asyncio.sleep(self.pause)
        return Attempt(dict.fromkeys(rcpts, (250, "250 2.0.0 ok")))


def _entry(spool: Spool, recipient: str) -> str:
    entry = make_entry(
        recipients=[RecipientState(recipient, PENDING, notify=True)], size=len(message(0))
    )
    spool.put(entry, message(0))
    return entry.queue_id


async def test_new_mail_and_a_backlog_larger_than_the_attempts_take_turns(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage the backlog took every place: new mail waited for all of
    it. Then new mail faster than the upstream took every place, and the
    backlog got no turn until it stopped; and the engine, holding places back
    while it said something was due, woke 155,000 times a second."""
    monkeypatch.setattr(engine_module, "file_budget", lambda: FILES)
    starts = 0
    start_due = Engine._start_due

    def counted(self: Engine) -> None:
        nonlocal starts
        starts += 1
        start_due(self)

    monkeypatch.setattr(Engine, "_start_due", counted)
    queue = dataclasses.replace(policy.queue, concurrency=2)
    upstream = SlowUpstream(0.02)  # 100 a second over two slots
    for n in range(200):
        _entry(spool, f"backlog{n}@example.net")
    slow = dataclasses.replace(policy, queue=queue)
    engine = Engine(spool, lambda: slow, upstream, Recorder(None))
    async with running(engine):
        await until(lambda: len(upstream.tried) >= 10, "the backlog under way")
        began, first = time.monotonic(), len(upstream.tried)
        for n in range(150):  # 300 a second: more than the upstream takes
            engine.submit(_entry(spool, f"new{n}@example.net"))
            await asyncio.sleep(1 / 300)
        during = upstream.tried[first:]
        elapsed = time.monotonic() - began
    new_first = next(i for i, r in enumerate(during) if r.startswith("new"))
    assert new_first <= 3, during[:10]
    backlog_during = sum(r.startswith("backlog") for r in during)
    assert backlog_during >= len(during) // 4, (backlog_during, len(during))
    assert starts < 2000 * elapsed, starts  # woken per event, not spinning


async def test_one_tenants_loop_does_not_hold_the_others_mail_behind_it(
    spool: Spool, policy: Policy
) -> None:
    """A company's ERP sending thousands of documents in a loop, within its
    hourly limit, held every other company's mail on the shared smarthost
    behind all of them: 18 s at a sink taking five a second."""
    queue = dataclasses.replace(policy.queue, concurrency=2)
    upstream = SlowUpstream(0.02)
    slow = dataclasses.replace(policy, queue=queue)
    engine = Engine(spool, lambda: slow, upstream, Recorder(None))

    def queued(tenant: str, recipient: str) -> str:
        entry = make_entry(
            tenant=tenant,
            recipients=[RecipientState(recipient, PENDING, notify=True)],
            size=len(message(0)),
        )
        spool.put(entry, message(0))
        return entry.queue_id

    async with running(engine):
        for n in range(100):
            engine.submit(queued("acme", f"loop{n}@example.net"))
        await until(lambda: len(upstream.tried) >= 4, "the loop under way")
        engine.submit(queued("globex", "customer@example.net"))
        await until(lambda: "customer@example.net" in upstream.tried, "the other tenant's")
        waited = upstream.tried.index("customer@example.net") - 4
    assert waited <= 4, upstream.tried[:12]


async def test_a_stalled_upstreams_backlog_waits_as_queue_ids_alone(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each message waiting for a stalled upstream's slot was a task with its
    record, and counted as an attempt under way: a month-end run against a
    stalled account filled a worker's attempts, and nothing else started."""
    monkeypatch.setattr(engine_module, "file_budget", lambda: FILES)
    stalled = SlowUpstream(3600)
    for n in range(10 * FILES):
        _entry(spool, f"backlog{n}@example.net")
    queue = dataclasses.replace(policy.queue, concurrency=2)
    slow = dataclasses.replace(policy, queue=queue)
    engine = Engine(spool, lambda: slow, stalled, Recorder(None))
    async with running(engine):
        await until(lambda: len(engine._parked) == 10 * FILES - 2, "the backlog parked")
        assert len(engine._busy) == 2  # the two with a slot, stalled
        assert not engine._held_back(fresh=False) and not engine._held_back(fresh=True)
    assert len(stalled.tried) == 2
