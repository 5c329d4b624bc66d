"""PostgreSQL writes on an event loop of the writer's own, in a thread: the service's loop hands a batch over once.

A batch is about six round trips (the pool's pre-ping, `BEGIN`, the locking
read, the update, the history insert, `COMMIT`). On the service's event loop
each answer waits for a turn of a loop that, under a poll cycle, is busy
sending to every WebSocket client: at 1,000 clients a rate waited 40-50 ms at
the median for its write. Here the whole transaction runs on a loop that does
nothing else, and the service's loop gets its result once, as it does from the
SQLite writer (docs/decisions/0009-writes-in-one-hand-off.md). Readers stay on the
service's engine.

The writer's engine is made as the service's is (`app.storage.engine.create_engine`): the
same bounds on connecting, on each statement and on the pool. Work the caller
stops waiting for (`DatabaseHealth` gave up on it) is cancelled on the
writer's loop, as it would be on the service's.
"""

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection

from app.storage.engine import create_engine

T = TypeVar("T")


class PostgresWriter:
    def __init__(self, database_url: str, *, timeout_s: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="postgres-writer", daemon=True)
        self._thread.start()
        # Its connections are made, and only ever used, on the writer's loop.
        self._engine = create_engine(database_url, timeout_s=timeout_s)

    def submit(self, work: Callable[[Connection], T]) -> "asyncio.Future[T]":
        """`work` inside one transaction, committed, on the writer's loop; its result, to await on the caller's."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._transaction(work), self._loop))

    async def _transaction(self, work: Callable[[Connection], T]) -> T:
        async with self._engine.begin() as connection:
            return await connection.run_sync(work)

    def checkpoint(self) -> None:
        """Nothing to do: PostgreSQL checkpoints by itself, outside any commit."""

    async def aclose(self) -> None:
        """After the writes handed over (the store waits for them first)."""
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._wind_down(), self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._loop.close()

    async def _wind_down(self) -> None:
        # Whatever still runs here was given up on by its caller: it ends now, its caller told so, not left hanging.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._engine.dispose()
