"""Background tasks that are never left behind: one `TaskSet` per owner (arq's worker keeps its tasks so).

Every task is spawned into its owner's set, which keeps a reference until the
task ends (the loop holds only a weak one), logs its crash from a
done-callback, and on `aclose` cancels and awaits whatever is still running.
`running` is a set of one task for the length of a block: the composition root
enters one per background loop on its `AsyncExitStack`, so each loop stops in
its place, before what it uses is closed.

A cancellation can be lost on Python 3.11: `asyncio.wait_for`, which redis-py
uses on every command, swallows one that arrives just as the command completes
(CPython gh-86296, fixed in 3.12), and the task carries on as if nothing had
happened. The soak met it: the poller's lease renewal outlived its cycle, and
the cycle waited on it for good while holding the lease, so no replica polled.
So a task is stopped with `cancel_and_wait`, which cancels it again until it
has ended.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """The background tasks of one owner: each kept until it ends, its crash logged, all stopped by `aclose`."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self, coroutine: Coroutine[Any, Any, T], name: str, *, quiet: tuple[type[BaseException], ...] = ()
    ) -> "asyncio.Task[T]":
        """Run `coroutine` as a task kept here; a crash is logged unless it is one of `quiet` (failures its
        awaiters answer for)."""
        task = asyncio.create_task(coroutine, name=name)
        self.adopt(task, quiet=quiet)
        return task

    def adopt(self, future: "asyncio.Future[Any]", *, quiet: tuple[type[BaseException], ...] = ()) -> None:
        """Keep a future started elsewhere (a task, or a thread's result) until it ends, like a spawned one."""
        self._tasks.add(future)
        future.add_done_callback(partial(self._ended, quiet=quiet))

    def _ended(self, future: "asyncio.Future[Any]", *, quiet: tuple[type[BaseException], ...]) -> None:
        self._tasks.discard(future)
        if future.cancelled():
            return
        error = future.exception()  # retrieved here, so a failure nobody awaited is not reported as lost
        if error is not None and not isinstance(error, quiet):
            name = future.get_name() if isinstance(future, asyncio.Task) else repr(future)
            log.error("background task %s stopped", name, exc_info=error)

    async def wait(self) -> None:
        """Wait until every task here has ended by itself, those spawned meanwhile too."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def aclose(self) -> None:
        """Cancel every task here and wait until each has ended."""
        await cancel_and_wait(*self._tasks)


@asynccontextmanager
async def running(coroutine: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run `coroutine` as a task for the duration of the block; a crash is logged, the task cancelled on exit."""
    tasks = TaskSet()
    tasks.spawn(coroutine, name)
    try:
        yield
    finally:
        await tasks.aclose()


async def cancel_and_wait(*tasks: "asyncio.Future[Any]", every_s: float = 0.1) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again any that swallowed its cancellation."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the owner stopped it and does not want its outcome
