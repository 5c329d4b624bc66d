"""SQLite writes in one hand-off: a thread of the writer's own, holding a plain sqlite3 connection.

Through aiosqlite every step of a transaction (each statement's cursor,
execute, fetch and close, then the commit) is a hand-off between the event
loop and aiosqlite's thread: about 37 turns of the loop per stored batch,
each waiting behind whatever else the loop has to do, and under a poll cycle
that is a send to every WebSocket client. Here the whole transaction runs in
the writer's thread and the loop is handed its result once
(docs/decisions/0009-writes-in-one-hand-off.md). Readers stay on the async engine.

The transaction starts with `BEGIN IMMEDIATE`: the write lock is taken before
the current rows are read, so two processes writing one file (several
workers) take turns on whole batches, waiting up to the busy timeout.

Checkpoints (copying the write-ahead log back into the database, with a disk
flush: 10-30 ms on the development machine's disk) are not left to SQLite,
which would run one inside whichever commit crossed 1,000 pages of log, in
the middle of a cycle: the writer runs one after each poll cycle
(`checkpoint`, called by the store when a cycle ends), and by itself after
`CHECKPOINT_EVERY` commits without one (writes with no poller here).
"""

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from app.storage.engine import sqlite_pragmas

log = logging.getLogger(__name__)

T = TypeVar("T")

CHECKPOINT_EVERY = 500  # commits; a poll cycle is a few dozen


class SqliteWriter:
    def __init__(self, database_url: str, *, busy_s: float) -> None:
        url = make_url(database_url).set(drivername="sqlite")
        # One connection, only ever used from the one thread below.
        self._engine: Engine = create_engine(
            url, poolclass=StaticPool, connect_args={"timeout": busy_s, "check_same_thread": False}
        )
        event.listen(self._engine, "connect", sqlite_pragmas(busy_s))
        event.listen(self._engine, "connect", _no_implicit_transactions)
        event.listen(self._engine, "begin", _begin_immediate)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._commits = 0  # since the last checkpoint; only touched in the writer's thread

    def submit(self, work: Callable[[Connection], T]) -> "asyncio.Future[T]":
        """`work` inside one transaction, committed, in the writer's thread; its result, to await."""
        return asyncio.get_running_loop().run_in_executor(self._thread, self._transaction, work)

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        with self._engine.begin() as connection:
            result = work(connection)
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY:
            self._checkpoint()
        return result

    def checkpoint(self) -> None:
        """Copy the log back into the database, in the writer's thread, after the writes handed over before."""
        self._thread.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        if not self._commits:
            return
        self._commits = 0
        try:
            with self._engine.connect() as connection:
                # On the driver's connection, outside any transaction (SQLAlchemy would begin one first).
                # PASSIVE: never waits for readers, nor makes writers wait; what it cannot copy now, the next does.
                connection.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
        except (sqlite3.Error, DBAPIError) as error:
            # Only the log's length is at stake; the next checkpoint copies what this one could not.
            log.warning("SQLite checkpoint failed: %s", error)

    async def aclose(self) -> None:
        """After the writes handed over: they finish first, in order."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._engine.dispose)
        self._thread.shutdown(wait=False)


def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
    # sqlite3 would otherwise open a deferred transaction by itself before the first write, after the reads.
    dbapi_connection.isolation_level = None
    # Checkpoints are the writer's to run, between cycles (see above), not SQLite's inside a commit.
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
