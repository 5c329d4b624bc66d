"""When the poller runs a cycle: alone on a fixed beat, or as one of several replicas sharing Redis.

With Redis, the replicas hold a lease: a key with a TTL, set by whoever gets
it first and renewed by its holder every third of the TTL. Only the holder
polls. A holder that dies stops renewing, and another replica takes the lease
within one TTL. The time of the last cycle lives in Redis too, so the new
holder keeps the old one's beat instead of polling at once. If Redis cannot be
reached, each replica polls on its own beat until it can: duplicate upstream
calls are a smaller harm than rates going stale, and the store's writes are
idempotent.
"""

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.kit.tasks import running

log = logging.getLogger(__name__)

Role = Literal["alone", "leading", "standby"]

# Renew (or extend) only while we still hold the lease.
RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# A Redis that hangs rather than refuses must not hang the poller: past this, treat it as unreachable.
REDIS_OP_TIMEOUT_S = 2.0

RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Schedule(Protocol):
    role: Role

    async def next_cycle_in(self) -> float:
        """Seconds until this process should start a cycle; 0 or less: start one now."""
        ...

    def cycle(self) -> AbstractAsyncContextManager[None]:
        """Held while a cycle runs."""
        ...

    async def last_success(self) -> float | None:
        """When any replica last finished a cycle in which the upstream answered (time.time())."""
        ...

    async def succeeded(self) -> None: ...

    async def close(self) -> None: ...


class LocalSchedule:
    """One process, one beat: each cycle starts one interval after the previous one started."""

    role: Role = "alone"

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._next_start = time.monotonic()
        self._last_success: float | None = None

    async def next_cycle_in(self) -> float:
        return self._next_start - time.monotonic()

    @asynccontextmanager
    async def cycle(self) -> AsyncIterator[None]:
        # A cycle that overran its interval starts the next one at once, without piling up.
        self._next_start = max(self._next_start + self._interval_s, time.monotonic())
        yield

    async def last_success(self) -> float | None:
        return self._last_success

    async def succeeded(self) -> None:
        self._last_success = time.time()

    async def close(self) -> None:
        pass


class SharedSchedule:
    """Replicas sharing Redis: the lease holder polls, on a beat kept in Redis."""

    def __init__(self, redis: Redis, interval_s: float, ttl_s: float, prefix: str = "fxrates:poller:") -> None:
        self._redis = redis
        self._interval_s = interval_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._renew_every_s = ttl_s / 3
        self._lock_key = f"{prefix}lock"
        self._last_cycle_key = f"{prefix}last_cycle"
        self._last_success_key = f"{prefix}last_success"
        self._token = secrets.token_hex(16)
        self._local = LocalSchedule(interval_s)
        self.role: Role = "standby"

    async def _hold(self) -> bool:
        if self.role == "leading":
            return bool(await self._redis.eval(RENEW, 1, self._lock_key, self._token, self._ttl_ms))
        return bool(await self._redis.set(self._lock_key, self._token, nx=True, px=self._ttl_ms))

    async def next_cycle_in(self) -> float:
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                return await self._shared_next_cycle_in()
        except (RedisError, OSError) as error:  # OSError covers TimeoutError
            if self.role != "alone":
                log.warning("poller lease unreachable, polling on this replica's own beat: %s", error)
            self.role = "alone"
            return await self._local.next_cycle_in()

    async def _shared_next_cycle_in(self) -> float:
        if not await self._hold():
            self._become("standby")
            # Wake the moment the holder's lease would run out, so a dead holder is replaced within one TTL.
            remaining_ms = await self._redis.pttl(self._lock_key)
            return min(self._renew_every_s, max(remaining_ms, 0) / 1000 + 0.01)
        self._become("leading")
        last = await self._redis.get(self._last_cycle_key)
        due_in = float(last) + self._interval_s - time.time() if last is not None else 0.0
        # Wake in time to renew the lease, whatever the interval.
        return min(due_in, self._renew_every_s)

    def _become(self, role: Role) -> None:
        if role != self.role:
            log.info("poller is now %s", "the one polling" if role == "leading" else "on standby")
        self.role = role

    @asynccontextmanager
    async def cycle(self) -> AsyncIterator[None]:
        if self.role == "alone":
            async with self._local.cycle():
                yield
            return
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                last = await self._redis.get(self._last_cycle_key)
                beat = float(last) + self._interval_s if last is not None else time.time()
                # Keep the beat unless a whole interval was missed (no poller for a while): then start afresh.
                await self._redis.set(self._last_cycle_key, repr(max(beat, time.time() - self._interval_s)))
        except (RedisError, OSError):
            pass
        # Cancelled until it has ended: a cancellation lost inside redis-py would leave it renewing, and this
        # cycle waiting on it, for good (app.kit.tasks).
        async with running(self._keep_renewing(), "poller-lease"):
            yield

    async def _keep_renewing(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            try:
                async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                    held = await self._hold()
                if not held:
                    # Lost mid-cycle: the cycle finishes (its writes are idempotent); the next is not ours.
                    self._become("standby")
            except (RedisError, OSError):
                pass

    async def last_success(self) -> float | None:
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                value = await self._redis.get(self._last_success_key)
        except (RedisError, OSError):
            return await self._local.last_success()
        return float(value) if value is not None else None

    async def succeeded(self) -> None:
        await self._local.succeeded()
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                await self._redis.set(self._last_success_key, repr(time.time()))
        except (RedisError, OSError):
            pass

    async def close(self) -> None:
        """Hand the lease back at once rather than making the others wait out its TTL."""
        if self.role == "leading":
            try:
                async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                    await self._redis.eval(RELEASE, 1, self._lock_key, self._token)
            except (RedisError, OSError):
                pass
        self.role = "standby"
