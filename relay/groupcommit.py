"""Group commit: what concurrent sessions ask to make durable is written with
one set of fsyncs, in a thread of its own, while the event loop goes on.

An fsync costs the same for one record as for twenty, and it blocks: on the
event loop, every session waited for the disk. Each ``GroupCommit`` has one
thread and one batch on its way to disk at a time; whatever is asked for
meanwhile is the next batch, so batches grow with the load. Handing a whole
batch to the thread costs one switch, not one per write (per-write threads
fought the loop for the GIL and cost more than the writes).

With ``inline`` the caller may say that nobody else could use the time:
an item asked for while nothing is on its way is then committed at once,
on the event loop's own thread. For a lone session the trip to the thread
and back (two wake-ups, and the GIL handed over after each system call)
cost more than the loop could do meanwhile.

A waiter is released only with the outcome of its own item: on disk, or the
error that kept it off. It is released only once its batch is done, even
when it is cancelled meanwhile: a caller must never clean up after a write
that may still land. A cancelled waiter then gets its item's error if it
did not land, and the cancellation if it did.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("relay")

Commit = Callable[[list[T]], Sequence[BaseException | None]]


class GroupCommit(Generic[T]):
    """``await commit(item)`` returns once ``commit_many`` has made it durable, or raises
    its error. ``commit_many`` runs in this object's own thread and gets every item
    queued since the previous batch; it returns, for each, None or the exception its
    waiter should get."""

    def __init__(
        self,
        commit_many: Commit[T],
        name: str = "commit",
        inline: Callable[[], bool] | None = None,
    ) -> None:
        self._commit_many = commit_many
        self._inline = inline
        self._batch: list[tuple[T, asyncio.Future[None]]] = []
        self._busy = False
        self._name = name
        self._threadless = False  # said so in the log: no thread could be started
        self._thread = self._executor()

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self._name)

    async def __call__(self, item: T) -> None:
        loop = asyncio.get_running_loop()
        if not self._batch and not self._busy:
            if self._inline is not None and self._inline():
                self._commit_now(item)
                return
            loop.call_soon(self._start)
        done: asyncio.Future[None] = loop.create_future()
        self._batch.append((item, done))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            while not done.done():  # the batch may still land: wait for it, then give way
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait((done,))
            error = done.exception()
            if error is not None:
                raise error from None  # it did not land: the caller's usual error path
            raise

    def _commit_now(self, item: T) -> None:
        outcomes = list(self._commit_many([item]))
        if len(outcomes) != 1:
            raise RuntimeError(f"{len(outcomes)} outcomes for 1 item")
        if outcomes[0] is not None:
            raise outcomes[0]

    def _start(self) -> None:
        if self._busy or not self._batch:
            return
        batch, self._batch = self._batch, []
        self._busy = True
        loop = asyncio.get_running_loop()
        items = [i for i, _ in batch]
        try:
            work = loop.run_in_executor(self._thread, self._commit_many, items)
        except RuntimeError as exc:
            # the executor queued the batch before its thread failed to start, and
            # would commit it again once one does: it is left with no thread
            self._thread = self._executor()
            work = self._on_the_loop(items, exc)
        else:
            self._threadless = False
        work.add_done_callback(lambda finished: self._finish(batch, finished))

    def _on_the_loop(self, items: list[T], exc: RuntimeError) -> asyncio.Future:
        """The batch committed on the event loop when no thread can be started (a
        limit on tasks, systemd's TasksMax): the batch's waiters were never
        released, every later commit waited behind them, and a worker went on
        accepting mail it never finished delivering."""
        if not self._threadless:
            log.warning("%s: no thread (%s); committing on the event loop", self._name, exc)
            self._threadless = True
        work: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            work.set_result(self._commit_many(items))
        except Exception as error:  # its waiters hear it, as from the thread
            work.set_exception(error)
        return work

    def _finish(self, batch: list[tuple[T, asyncio.Future[None]]], work: asyncio.Future) -> None:
        self._busy = False
        try:
            outcomes = list(work.result())
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except Exception as exc:  # every waiter must hear
            outcomes = [exc] * len(batch)
        except BaseException:  # e.g. the thread's future cancelled as the loop closes
            outcomes = [RuntimeError("interrupted before the commit finished")] * len(batch)
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():
                continue
            if outcome is None:
                done.set_result(None)
            else:
                done.set_exception(outcome)
        if self._batch:
            asyncio.get_running_loop().call_soon(self._start)
