"""The rate caches: in-process memory, and Redis when `REDIS_URL` is set, tiered in that order.

A cache is never the only copy of a rate (the database is), so a Redis that
is down only costs lookups: it is logged and counted, and reads fall through.
"""

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.currencies import Pair
from app.storage.rate import StoredRate

log = logging.getLogger(__name__)

# A cache that hangs must cost a reader or the poller this much at most, never the whole request or cycle.
REDIS_OP_TIMEOUT_S = 1.0

# Newer by sequence number (docs/design.md, "Sequence numbers"); an entry without one (left by an earlier version)
# by its time.
SET_IF_NEWER = """
local current = redis.call('get', KEYS[1])
if current then
  local ok, held = pcall(cjson.decode, current)
  if ok and type(held) == 'table' then
    if tonumber(held['seq']) then
      if tonumber(held['seq']) > tonumber(ARGV[4]) then
        return 0
      end
    elseif tonumber(held['ts']) and tonumber(held['ts']) > tonumber(ARGV[2]) then
      return 0
    end
  end
end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


class MemoryCache:
    """Rates by pair, each fresh for `ttl_s`. An expired or superseded entry stays as the pair's last known
    rate: what the process serves while the database cannot be reached (docs/outages.md)."""

    layer = "memory"

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._entries: dict[Pair, tuple[float, StoredRate]] = {}

    async def get(self, pair: Pair) -> StoredRate | None:
        entry = self._entries.get(pair)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def last_known(self, pair: Pair) -> StoredRate | None:
        """The newest rate this process has held for the pair, however long ago."""
        entry = self._entries.get(pair)
        return None if entry is None else entry[1]

    async def set(self, rate: StoredRate) -> None:
        self.put(rate)

    def put(self, rate: StoredRate) -> None:
        current = self._entries.get(rate.pair)
        # Writers may finish out of order; an older rate never replaces a newer one.
        if current is None or current[1].seq <= rate.seq:
            self._entries[rate.pair] = (time.monotonic() + self._ttl_s, rate)

    def clear(self) -> None:
        """Nothing is fresh any more; every entry stays only as a last known rate."""
        self._entries = {pair: (-math.inf, rate) for pair, (_, rate) in self._entries.items()}

    def supersede(self, rate: StoredRate) -> None:
        """Another process stored `rate`: an older entry is no longer served, and `rate` becomes the last known.

        Not served fresh from here: Redis holds it, and reads go there while memory has nothing fresh.
        """
        current = self._entries.get(rate.pair)
        if current is None or current[1].seq < rate.seq:
            self._entries[rate.pair] = (-math.inf, rate)


class RedisCache:
    layer = "redis"

    def __init__(self, redis: Redis, ttl_s: int, errors: Counter, prefix: str = "fxrates:rate:") -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._errors = errors
        self._prefix = prefix

    def _key(self, pair: Pair) -> str:
        return f"{self._prefix}{pair.source}:{pair.destination}"

    async def get(self, pair: Pair) -> StoredRate | None:
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                raw = await self._redis.get(self._key(pair))
        except (RedisError, OSError) as error:  # OSError covers TimeoutError
            self._failed("read", error)
            return None
        if raw is None:
            return None
        try:
            return StoredRate.from_cache(json.loads(raw))
        except (ValueError, KeyError, TypeError, ArithmeticError):
            # Left by another version of the service, or damaged: a miss, and the database answers.
            log.warning("ignoring an unreadable cache entry for %s", pair)
            return None

    async def set(self, rate: StoredRate) -> None:
        await self.set_many([rate])

    async def set_many(self, rates: Sequence[StoredRate]) -> None:
        """Every rate in one round trip (a store batch), each set only if it is newer than what is held."""
        if not rates:
            return
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S), self._redis.pipeline(transaction=False) as pipe:
                for rate in rates:
                    # Writers (replicas, read-through fills) may land out of order: an older rate never wins.
                    pipe.eval(
                        SET_IF_NEWER,
                        1,
                        self._key(rate.pair),
                        json.dumps(rate.to_cache()),
                        repr(rate.last_updated.timestamp()),
                        self._ttl_s,
                        rate.seq,
                    )
                await pipe.execute()
        except (RedisError, OSError) as error:
            self._failed("write", error)

    def _failed(self, operation: str, error: Exception) -> None:
        self._errors.inc()
        log.warning("redis cache %s failed, carrying on without it: %s", operation, error)


class TieredCache:
    """Memory in front of Redis (when there is one). Writes go to both; a Redis hit refills memory."""

    def __init__(self, memory: MemoryCache, shared: RedisCache | None) -> None:
        self.memory = memory
        self.shared = shared

    async def set(self, rate: StoredRate) -> None:
        await self.set_many([rate])

    async def set_many(self, rates: Sequence[StoredRate]) -> None:
        self.hold_here(rates)
        await self.share(rates)

    def hold_here(self, rates: Sequence[StoredRate]) -> None:
        """This process's memory, at once."""
        for rate in rates:
            self.memory.put(rate)

    async def share(self, rates: Sequence[StoredRate]) -> None:
        """Redis, for the other processes (one round trip)."""
        if self.shared is not None:
            await self.shared.set_many(rates)
