"""Moving-window counters (the `limits` package), shared through Redis, per process while Redis fails.

Every limit of docs/limits.md that holds "for the whole deployment" counts in
Redis when `REDIS_URL` is set, so every replica sees the same window. A limit
must never turn into an error: when Redis refuses, hangs or is gone, the count
moves to this process's memory for a while (`retry_s`), then Redis is tried
again. During that time each replica counts alone, so a client may get up to
the limit from each.

A window keyed by client address is given `max_memory_keys`: its memory then
holds at most that many keys, the least recently hit forgotten first, so a
flood of distinct addresses cannot grow it past a known size. (Redis keys
expire with their window.)
"""

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage.memory import Entry
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

KEY_PREFIX = "fxrates:limits"


@dataclass(frozen=True, slots=True)
class WindowState:
    allowed: bool
    remaining: int
    reset_s: float
    """Seconds until the oldest hit in the window leaves it, so at least one more is allowed."""


@dataclass(frozen=True, slots=True)
class WindowCount:
    hits: int
    reset_s: float
    """Seconds until the oldest hit in the window leaves it."""


Result = TypeVar("Result", WindowState, WindowCount)


class _RecentKeys(OrderedDict[str, list[Entry]]):
    """`MemoryStorage.events` that forgets the least recently used key past `max_keys`.

    The storage records every hit through `setdefault` and reads a window through `get`, so those make a key
    the newest: a client refused at its limit is read, not hit, and must stay counted.
    """

    def __init__(self, max_keys: int, forget: Callable[[str], None]) -> None:
        super().__init__()
        self._max_keys = max_keys
        self._forget = forget

    def __missing__(self, key: str) -> list[Entry]:
        # The storage's expiry pass walks a copy of the keys; one forgotten meanwhile reads as empty.
        return []

    def get(self, key: str, default: list[Entry] | None = None) -> list[Entry] | None:  # type: ignore[override]
        events = super().get(key)
        if events is None:
            return default
        self.move_to_end(key)
        return events

    def setdefault(self, key: str, default: list[Entry] | None = None) -> list[Entry]:
        events = super().setdefault(key, [] if default is None else default)
        self.move_to_end(key)
        while len(self) > self._max_keys:
            forgotten, _ = self.popitem(last=False)
            self._forget(forgotten)
        return events


def _memory_storage(max_keys: int | None) -> MemoryStorage:
    storage = MemoryStorage()
    if max_keys is not None:

        def forget(key: str) -> None:
            storage.locks.pop(key, None)

        storage.events = _RecentKeys(max(1, max_keys), forget)
    return storage


class MovingWindow:
    def __init__(
        self,
        redis: Redis | None,
        redis_url: str | None,
        *,
        errors: Counter | None = None,
        timeout_s: float = 0.25,
        retry_s: float = 5.0,
        max_memory_keys: int | None = None,
    ) -> None:
        self._memory_storage = _memory_storage(max_memory_keys)
        self._memory = MovingWindowRateLimiter(self._memory_storage)
        self._shared: MovingWindowRateLimiter | None = None
        if redis is not None and redis_url is not None:
            # The app's own connection pool: one set of sockets to Redis, closed with the app's client.
            storage = RedisStorage(
                f"async+{redis_url}",
                implementation="redispy",
                key_prefix=KEY_PREFIX,
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]  # passed on to redis-py
            )
            self._shared = MovingWindowRateLimiter(storage)
        self._errors = errors
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._shared_down_until = 0.0

    @property
    def shared(self) -> bool:
        """Whether the count is currently held in Redis."""
        return self._shared is not None and time.monotonic() >= self._shared_down_until

    async def hit(self, item: RateLimitItem, key: str, cost: int = 1) -> WindowState:
        """Count `cost` hits against `item` for `key` if they fit; say what is left either way."""
        return await self._either(self._hit, item, key, cost)

    async def record(self, item: RateLimitItem, key: str, cost: int) -> WindowCount:
        """Add `cost` hits already served (as many as fit), and read how many the window holds now."""
        return await self._either(self._record, item, key, cost)

    async def _either(
        self, operation: Callable[..., Awaitable[Result]], item: RateLimitItem, key: str, cost: int
    ) -> Result:
        if self._shared is not None and time.monotonic() >= self._shared_down_until:
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await operation(self._shared, item, key, cost)
            except (RedisError, StorageError, OSError, TimeoutError) as error:
                # Not retried per request: a Redis that hangs would cost every request its timeout.
                self._shared_down_until = time.monotonic() + self._retry_s
                if self._errors is not None:
                    self._errors.inc()
                log.warning("limits: Redis failed (%s); counting in this process for %.0fs", error, self._retry_s)
        return await operation(self._memory, item, key, cost)

    async def _hit(self, limiter: MovingWindowRateLimiter, item: RateLimitItem, key: str, cost: int) -> WindowState:
        allowed = await limiter.hit(item, key, cost=cost)
        stats = await limiter.get_window_stats(item, key)
        return WindowState(allowed, max(0, stats.remaining), max(0.0, stats.reset_time - time.time()))

    async def _record(self, limiter: MovingWindowRateLimiter, item: RateLimitItem, key: str, cost: int) -> WindowCount:
        if cost > 0 and not await limiter.hit(item, key, cost=cost):
            # Served already, so counted as far as the window has room: a full window stays full.
            stats = await limiter.get_window_stats(item, key)
            if stats.remaining > 0:
                await limiter.hit(item, key, cost=stats.remaining)
        stats = await limiter.get_window_stats(item, key)
        return WindowCount(item.amount - stats.remaining, max(0.0, stats.reset_time - time.time()))

    @property
    def memory_keys(self) -> int:
        """How many keys this process's memory holds."""
        return len(self._memory_storage.events)

    async def aclose(self) -> None:
        # The memory storage runs an expiry task of its own; it must not outlive the app's event loop.
        timer = self._memory_storage.timer
        if timer is not None and not timer.done():
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)


def whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))
