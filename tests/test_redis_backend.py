"""The fan-out backend on a real (throw-away) Redis: delivery across processes, outages, resync."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcaster import Broadcast

from app.live.redis_backend import ResilientRedisBackend
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

RESYNC = "resync!"


@asynccontextmanager
async def broadcast(url: str) -> AsyncIterator[tuple[Broadcast, ResilientRedisBackend]]:
    backend = ResilientRedisBackend(url, resync_message=RESYNC, backoff_initial_s=0.05, backoff_max_s=0.2)
    async with Broadcast(backend=backend) as hub:
        yield hub, backend


async def test_a_process_whose_own_subscription_is_down_still_reaches_the_others(
    throwaway_redis: RedisServer,
) -> None:
    # Regression (found by the soak): a publisher that was not (yet) subscribed delivered only to itself.
    async with broadcast(throwaway_redis.url) as (listener, listener_backend):
        async with broadcast(throwaway_redis.url) as (publisher, publisher_backend):
            async with listener.subscribe("rates") as subscriber:
                await eventually(lambda: listener_backend.connected, what="the listener to reconnect")
                assert not publisher_backend.connected  # it subscribes to nothing, so it never connects
                await publisher.publish("rates", "USD/NGN moved")
                event = await asyncio.wait_for(subscriber.get(), 5)
    assert event.message == "USD/NGN moved"


async def test_an_outage_keeps_local_delivery_and_ends_in_a_resync(throwaway_redis: RedisServer) -> None:
    async with broadcast(throwaway_redis.url) as (hub, backend), hub.subscribe("rates") as subscriber:
        await eventually(lambda: backend.connected, what="the backend to connect")
        throwaway_redis.stop()
        await eventually(lambda: not backend.connected, what="the backend to notice Redis is gone")
        await hub.publish("rates", "local change")
        assert (await asyncio.wait_for(subscriber.get(), 5)).message == "local change"
        throwaway_redis.start()
        assert (await asyncio.wait_for(subscriber.get(), 10)).message == RESYNC
        await hub.publish("rates", "after the outage")
        assert (await asyncio.wait_for(subscriber.get(), 5)).message == "after the outage"
