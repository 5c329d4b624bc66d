"""A Redis that accepts connections and never answers must cost bounded time, never stall polling or writes.

Regression: the soak saw a replica's poll cycles stop for 55 s after a Redis restart, held up by Redis calls
on the poller's path that had no deadline.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from broadcaster import Broadcast
from redis.asyncio import Redis

from app.currencies import Pair
from app.ingest.schedule import SharedSchedule
from app.kit.metrics import Metrics
from app.live.redis_backend import ResilientRedisBackend
from app.rates.cache import RedisCache
from app.storage.rate import StoredRate

# Each test waits out the real Redis timeouts it proves bounded: seconds by design.
pytestmark = pytest.mark.slow


@pytest.fixture
async def black_hole() -> AsyncIterator[str]:
    """A TCP server on loopback that takes every connection and every byte, and answers nothing."""
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_the_schedule_falls_back_to_its_own_beat(black_hole: str) -> None:
    async with Redis.from_url(black_hole) as redis:
        schedule = SharedSchedule(redis, interval_s=1, ttl_s=3)
        started = time.monotonic()
        wait_s = await schedule.next_cycle_in()
        role = schedule.role
        async with schedule.cycle():
            pass
        await schedule.succeeded()
        await schedule.close()
        elapsed_s = time.monotonic() - started
    assert role == "alone" and wait_s <= 0, "it must poll on its own rather than wait for Redis"
    assert elapsed_s < 10


async def test_the_cache_gives_up_quickly(black_hole: str) -> None:
    rate = StoredRate(
        Pair("USD", "NGN"), Decimal("0.0006"), Decimal("1530"), Decimal(1), Decimal(1530), "x", datetime.now(UTC), 1
    )
    metrics = Metrics()
    async with Redis.from_url(black_hole) as redis:
        cache = RedisCache(redis, 60, metrics.cache_errors)
        started = time.monotonic()
        await cache.set(rate)
        assert await cache.get(rate.pair) is None
        elapsed_s = time.monotonic() - started
    assert elapsed_s < 4
    assert metrics.registry.get_sample_value("fxrates_cache_errors_total") == 2


async def test_publishing_gives_up_quickly_and_still_reaches_this_process(black_hole: str) -> None:
    backend = ResilientRedisBackend(black_hole, resync_message="resync")
    async with Broadcast(backend=backend) as broadcast, broadcast.subscribe("rates") as subscriber:
        started = time.monotonic()
        await broadcast.publish("rates", "USD/NGN moved")
        event = await asyncio.wait_for(subscriber.get(), 5)
        elapsed_s = time.monotonic() - started
    assert event.message == "USD/NGN moved"
    assert elapsed_s < 5
