"""Whether the database can be reached, as one object shared by everything that uses it (docs/outages.md).

Every database call on a request's or the poller's path goes through
`DatabaseHealth.call`. It is bounded: past `timeout_s` (a write: `WRITE_FACTOR`
times that, since SQLite writers queue for the file) the caller gets
`DatabaseUnavailable` and moves on, and the abandoned call winds down in the
background under the engine's own timeouts. A failure that means the database
cannot be reached (refused, cut, not answering, locked) becomes
`DatabaseUnavailable` too, and sends the probe to look: if the probe fails as
well, the database is marked away, with one warning. While it is away, calls
fail at once without touching it, so no reader queues behind a database known
to be down; the probe, every `probe_every_s`, finds it back, and that is the
second line of the outage. Any other error (a bug, a broken constraint)
passes through unchanged: it is not an outage.
"""

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from prometheus_client import Counter, Gauge
from sqlalchemy import text
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import DatabaseUnavailable
from app.kit.tasks import TaskSet
from app.storage.engine import WRITE_FACTOR

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a client is told to wait before asking again for something only the database has.
RETRY_AFTER_S = 5.0
# An abandoned call is given this long to wind down when the service stops.
CLOSE_WAIT_S = 5.0


def is_unreachable(error: BaseException) -> bool:
    """True when `error` says the database cannot be reached now, rather than that the request was wrong."""
    if isinstance(error, IntegrityError | ProgrammingError | DataError):
        return False
    return isinstance(
        error,
        OSError  # refused, reset, timed out (TimeoutError is an OSError)
        | DBAPIError  # what the drivers raise mid-conversation, wrapped by SQLAlchemy
        | PoolTimeout
        | DisconnectionError
        | asyncpg.PostgresError  # raised while connecting, before SQLAlchemy wraps anything
        | asyncpg.InterfaceError
        | sqlite3.Error,
    )


class _Unreachable(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _describe(error: BaseException) -> str:
    detail = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {detail}"[:200] if detail else type(error).__name__


class DatabaseHealth:
    def __init__(
        self,
        engine: AsyncEngine,
        errors: Counter,
        up: Gauge,
        *,
        timeout_s: float,
        probe_engine: AsyncEngine | None = None,
        probe_every_s: float = 0.5,
    ) -> None:
        self._engine = engine
        # Unpooled, in the service: a pool busy with slow work must not make the database look away.
        self._probe_engine = probe_engine or engine
        self._errors = errors
        self._up = up
        self._timeout_s = timeout_s
        self._probe_every_s = probe_every_s
        self._down_since: float | None = None
        self._last_error = ""
        self._look = asyncio.Event()  # set by a failed call: the probe is to look now
        self._abandoned = TaskSet()
        self._up.set(1)

    @property
    def available(self) -> bool:
        return self._down_since is None

    @property
    def problem(self) -> str | None:
        """What /readyz says while the database is down."""
        if self._down_since is None:
            return None
        return f"unreachable for {time.monotonic() - self._down_since:.0f}s ({self._last_error})"

    def unavailable(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(retry_after_s=RETRY_AFTER_S)

    async def call(self, work: Callable[[], Awaitable[T]], *, write: bool = False, within_s: float | None = None) -> T:
        """Run `work` against the database, bounded; `DatabaseUnavailable` when it cannot be reached.

        `within_s` shortens the bound to what a caller has left of its own (one bound per request).
        """
        if self._down_since is not None:
            raise self.unavailable()
        timeout_s = self._timeout_s * WRITE_FACTOR if write else self._timeout_s
        if within_s is not None:
            timeout_s = max(0.0, min(timeout_s, within_s))
        try:
            return await self._bounded(work, timeout_s)
        except _Unreachable as failure:
            self._errors.inc()
            self._last_error = _describe(failure.cause)
            # One failure is not yet an outage (a busy moment can be slow): the probe looks at once, and only
            # a probe that fails too marks the database away.
            self._look.set()
            raise self.unavailable() from failure.cause

    async def ping(self) -> None:
        """A read of the rates table: on SQLite, `SELECT 1` alone would not notice a locked file."""
        await self.call(self._select)

    async def _select(self, engine: AsyncEngine | None = None) -> None:
        async with (engine or self._engine).connect() as connection:
            await connection.execute(text("SELECT 1 FROM exchange_rates LIMIT 1"))

    async def _probe(self) -> None:
        await self._select(self._probe_engine)

    async def _bounded(self, work: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        task = asyncio.ensure_future(work())
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
        except asyncio.CancelledError:
            # The caller went away (a client hung up): its database work goes with it.
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise _Unreachable(TimeoutError(f"no answer within {timeout_s:g}s"))
        try:
            return task.result()
        except Exception as error:
            if is_unreachable(error):
                raise _Unreachable(error) from error
            raise

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        # Cancelled, not awaited: the caller has its answer; the session's clean-up runs on under the
        # engine's own timeouts, and is awaited when the service stops.
        task.cancel()
        # Quiet: an abandoned call's error was already answered for.
        self._abandoned.adopt(task, quiet=(Exception,))

    async def _reachable(self, timeout_s: float) -> bool:
        try:
            await self._bounded(self._probe, timeout_s)
        except _Unreachable as failure:
            self._errors.inc()
            self._last_error = _describe(failure.cause)
            return False
        except Exception:
            return True  # it answered, if only to refuse the query: not an outage
        return True

    async def run(self) -> None:
        """Look at the database whenever a call failed, and every `probe_every_s` while it is away; until cancelled.

        Only this loop changes the state, so an outage is one line when it starts and one when it ends.
        """
        while True:
            await self._look.wait()
            self._look.clear()
            # The probe gets a write's time, to confirm an outage and to find the database back: on a busy machine
            # a fresh connection can be slow without the database being away, and calls are bounded meanwhile.
            timeout_s = self._timeout_s * WRITE_FACTOR
            while not await self._reachable(timeout_s):
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self._up.set(0)
                    log.warning(
                        "database unreachable, serving what this process holds until it returns: %s",
                        self._last_error,
                    )
                await asyncio.sleep(self._probe_every_s)
            if self._down_since is not None:
                log.warning("database reachable again after %.1fs", time.monotonic() - self._down_since)
                self._down_since = None
                self._up.set(1)

    async def close(self) -> None:
        """Let abandoned calls wind down before the engine is disposed of."""
        if not self._abandoned:
            return
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self._abandoned.aclose()
        except TimeoutError:
            log.warning("%d abandoned database calls still winding down at close", len(self._abandoned))
