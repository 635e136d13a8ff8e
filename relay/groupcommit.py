"""Group commit: what concurrent sessions ask to make durable in one event-loop
pass is written with one set of fsyncs.

An fsync costs the same for one record as for twenty, and the spool and the
audit log are written on the event loop itself (a worker thread fighting the
loop for the GIL cost more than the write). A waiter is released only
with the outcome of its own item: on disk, or the error that kept it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

Commit = Callable[[list[T]], Sequence[BaseException | None]]


class GroupCommit(Generic[T]):
    """``await commit(item)`` returns once ``commit_many`` has made it durable, or raises
    its error. ``commit_many`` gets every item queued in the same loop pass and
    returns, for each, None or the exception its waiter should get."""

    def __init__(self, commit_many: Commit[T]) -> None:
        self._commit_many = commit_many
        self._batch: list[tuple[T, asyncio.Future[None]]] = []

    async def __call__(self, item: T) -> None:
        loop = asyncio.get_running_loop()
        if not self._batch:
            loop.call_soon(self._run)
        done: asyncio.Future[None] = loop.create_future()
        self._batch.append((item, done))
        await done

    def _run(self) -> None:
        batch, self._batch = self._batch, []
        interrupted: BaseException | None = None
        try:
            outcomes = list(self._commit_many([item for item, _ in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except Exception as exc:  # every waiter must hear, or it waits forever
            outcomes = [exc] * len(batch)
        except BaseException as exc:  # e.g. KeyboardInterrupt: release, then let it rise
            outcomes = [RuntimeError("interrupted before the commit finished")] * len(batch)
            interrupted = exc
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():  # its session was cancelled meanwhile
                continue
            if outcome is None:
                done.set_result(None)
            else:
                done.set_exception(outcome)
        if interrupted is not None:
            raise interrupted
