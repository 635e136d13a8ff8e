"""Group commit: what is queued while no batch is on its way is committed by one
call in the committer's own thread, and every waiter is released with the
outcome of its own item, after its batch is done, even when cancelled."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay.groupcommit import GroupCommit


class Committer:
    """A ``commit_many`` that remembers every batch it was given; ``outcome`` decides,
    per item, what its waiter gets (None, or an exception to raise)."""

    def __init__(self, outcome: Callable[[int], BaseException | None] = lambda item: None) -> None:
        self.batches: list[list[int]] = []
        self.outcome = outcome
        self.failure: Exception | None = None  # raised by the whole call when set

    def __call__(self, items: list[int]) -> list[BaseException | None]:
        self.batches.append(list(items))
        if self.failure is not None:
            raise self.failure
        return [self.outcome(item) for item in items]


async def settled(*waiters: Awaitable[Any], exceptions: bool = False) -> list[Any]:
    """``gather`` that fails fast, instead of hanging, if a waiter is never released."""
    return await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=exceptions), 5)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler: an error in a callback such as
    ``InvalidStateError`` from setting a cancelled future would land here."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


async def test_one_pass_is_one_batch_in_order_and_a_later_pass_a_new_one(
    loop_errors: list[dict[str, Any]],
) -> None:
    committer = Committer()
    commit = GroupCommit(committer)
    results = await settled(*(commit(i) for i in range(10)))
    assert results == [None] * 10
    assert committer.batches == [list(range(10))]

    await asyncio.wait_for(commit(10), 5)
    assert committer.batches == [list(range(10)), [10]]
    assert await settled(commit(11), commit(12)) == [None, None]
    assert committer.batches == [list(range(10)), [10], [11, 12]]
    assert loop_errors == []


async def test_commit_is_not_made_before_the_loop_pass_ends() -> None:
    committer = Committer()
    commit = GroupCommit(committer)
    first = asyncio.create_task(commit(1))
    await asyncio.sleep(0)  # the task has queued its item; the batch has not run yet
    assert committer.batches == []
    assert not first.done()
    second = asyncio.create_task(commit(2))
    await settled(first, second)
    # The second item arrived a pass later, after the first batch was already due.
    assert committer.batches == [[1], [2]]


async def test_only_the_failed_items_waiter_raises(loop_errors: list[dict[str, Any]]) -> None:
    refused = OSError(28, "No space left on device")
    committer = Committer(lambda item: refused if item == 3 else None)
    commit = GroupCommit(committer)
    results = await settled(*(commit(i) for i in range(10)), exceptions=True)
    assert results[3] is refused
    assert results[:3] + results[4:] == [None] * 9
    assert committer.batches == [list(range(10))]
    assert loop_errors == []


async def test_a_raising_commit_fails_every_waiter_and_the_next_batch_works(
    loop_errors: list[dict[str, Any]],
) -> None:
    committer = Committer()
    boom = RuntimeError("disk gone")
    committer.failure = boom
    commit = GroupCommit(committer)
    results = await settled(*(commit(i) for i in range(5)), exceptions=True)
    assert len(results) == 5
    assert all(result is boom for result in results)

    committer.failure = None
    results = await settled(*(commit(i) for i in range(5, 8)), exceptions=True)
    assert results == [None, None, None]
    assert committer.batches == [[0, 1, 2, 3, 4], [5, 6, 7]]
    committer.failure = boom
    with pytest.raises(RuntimeError) as caught:  # a lone waiter hears it too
        await asyncio.wait_for(commit(8), 5)
    assert caught.value is boom
    assert loop_errors == []


@pytest.mark.parametrize("when", ["before the batch runs", "while it is committed"])
@pytest.mark.parametrize("own_outcome", ["ok", "error"])
async def test_a_cancelled_waiter_does_not_break_the_batch(
    loop_errors: list[dict[str, Any]], when: str, own_outcome: str
) -> None:
    refused = OSError(5, "Input/output error")
    tasks: list[asyncio.Task[None]] = []

    loop = asyncio.get_running_loop()

    def outcome(item: int) -> BaseException | None:
        if item == 2 and when == "while it is committed":
            loop.call_soon_threadsafe(tasks[2].cancel)
        if item in (2, 4) and own_outcome == "error":
            return refused
        return None

    committer = Committer(outcome)
    commit = GroupCommit(committer)
    tasks += [asyncio.create_task(commit(i)) for i in range(5)]
    if when == "before the batch runs":
        await asyncio.sleep(0)  # every task has queued its item
        assert committer.batches == []
        tasks[2].cancel()
    results = await settled(*tasks, exceptions=True)

    assert committer.batches == [[0, 1, 2, 3, 4]]  # the cancelled item was still committed
    if own_outcome == "error":  # it did not land: the caller hears why, not just "cancelled"
        assert results[2] is refused
    else:
        assert isinstance(results[2], asyncio.CancelledError)
    expected_4 = refused if own_outcome == "error" else None
    assert results[:2] + results[3:] == [None, None, None, expected_4]
    assert loop_errors == []

    # The committer still works afterwards.
    assert await settled(commit(5), commit(6)) == [None, None]
    assert committer.batches[1:] == [[5, 6]]


async def test_a_commit_with_the_wrong_number_of_outcomes_fails_every_waiter(
    loop_errors: list[dict[str, Any]],
) -> None:
    commit = GroupCommit(lambda items: [None])
    results = await settled(commit(1), commit(2), exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert loop_errors == []


async def test_the_loop_goes_on_while_a_batch_is_on_its_way_and_the_next_batch_waits() -> None:
    """The commit blocks its own thread, not the loop; what comes meanwhile is one batch."""
    release = threading.Event()
    committer = Committer()

    def slow(items: list[int]) -> list[BaseException | None]:
        if not release.wait(5):
            raise TimeoutError("the loop never released the commit")
        return committer(items)

    commit = GroupCommit(slow)
    first = asyncio.create_task(commit(1))
    await asyncio.sleep(0.05)  # batch [1] is in the thread, waiting for the event
    later = [asyncio.create_task(commit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.05)
    assert not first.done()
    release.set()  # set by the loop: it kept running while the commit blocked
    assert await settled(first, *later) == [None] * 4
    assert committer.batches == [[1], [2, 3, 4]]


async def test_a_cancelled_waiter_leaves_only_once_its_batch_is_done() -> None:
    """Its caller cleans up after a cancellation (e.g. lets go of a lock): the write
    must not land after that."""
    entered, release = threading.Event(), threading.Event()
    finished: list[float] = []

    def slow(items: list[int]) -> list[BaseException | None]:
        entered.set()
        release.wait(5)
        time.sleep(0.05)
        finished.append(time.monotonic())
        return [None] * len(items)

    commit = GroupCommit(slow)
    waiter = asyncio.create_task(commit(1))
    assert await asyncio.to_thread(entered.wait, 5)
    waiter.cancel()
    await asyncio.sleep(0.05)
    assert not waiter.done()  # still waiting for the batch
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)
    assert len(finished) == 1


async def test_inline_commits_at_once_on_the_loops_thread_when_nothing_is_on_its_way() -> None:
    threads: list[int] = []
    committer = Committer(lambda item: ValueError(item) if item == 2 else None)

    def record(items: list[int]) -> list[BaseException | None]:
        threads.append(threading.get_ident())
        return committer(items)

    alone = [True]
    commit = GroupCommit(record, inline=lambda: alone[0])
    await asyncio.wait_for(commit(1), 5)
    with pytest.raises(ValueError):
        await asyncio.wait_for(commit(2), 5)
    alone[0] = False
    await asyncio.wait_for(commit(3), 5)
    assert committer.batches == [[1], [2], [3]]
    assert threads[:2] == [threading.get_ident()] * 2
    assert threads[2] != threading.get_ident()


async def test_inline_waits_its_turn_behind_a_batch_on_its_way() -> None:
    """Never two commits at once, nor one ahead of a batch on its way."""
    release = threading.Event()
    committer = Committer()
    threads: list[int] = []

    def slow(items: list[int]) -> list[BaseException | None]:
        threads.append(threading.get_ident())
        if items == [1] and not release.wait(5):
            raise TimeoutError("the loop never released the commit")
        return committer(items)

    alone = [False]
    commit = GroupCommit(slow, inline=lambda: alone[0])
    on_its_way = asyncio.create_task(commit(1))
    await asyncio.sleep(0.05)  # [1] is in the thread, waiting for the event
    alone[0] = True
    behind = asyncio.create_task(commit(2))
    await asyncio.sleep(0.05)
    assert not behind.done()
    release.set()
    assert await settled(on_its_way, behind) == [None, None]
    assert committer.batches == [[1], [2]]
    assert threading.get_ident() not in threads


async def test_a_batch_no_thread_can_be_started_for_is_committed_on_the_loop_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a task limit ("can't start new thread") the batch's waiters were never
    released and every later commit waited behind them: a worker accepted mail
    it never finished delivering, and sent it again after the restart. The
    executor had queued the batch before its thread failed: committed on the
    loop, it must not be committed again once a thread starts."""
    committer = Committer(lambda item: ValueError("no") if item == 2 else None)
    commit: GroupCommit[int] = GroupCommit(committer, "finish")
    limited = True
    start = threading.Thread.start

    def refused(thread: threading.Thread) -> None:
        if limited and thread.name.startswith("finish"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refused)
    results = await settled(commit(1), commit(2), commit(3), exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "ValueError", "NoneType"]
    assert await settled(commit(4)) == [None]
    limited = False
    assert await settled(commit(5)) == [None]
    await asyncio.sleep(0.2)  # a batch queued in a failed executor would run now
    assert committer.batches == [[1, 2, 3], [4], [5]]
    assert caplog.text.count("finish: no thread (can't start new thread)") == 1
