"""Background tasks that are never left behind: a crash is logged, and the owner cancels and awaits them.

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
from typing import Any

log = logging.getLogger(__name__)


@asynccontextmanager
async def running(coroutine: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run `coroutine` as a task for the duration of the block; a crash is logged, the task cancelled on exit."""
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(log_crash)
    try:
        yield
    finally:
        await cancel_and_wait(task)


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


def log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s stopped", task.get_name(), exc_info=task.exception())
