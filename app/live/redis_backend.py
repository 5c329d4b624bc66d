"""A broadcaster backend on redis.asyncio PubSub that outlives Redis going away.

broadcaster's own Redis backend stops delivering for good once its connection
drops (encode/broadcaster#144). This one keeps one pub/sub connection per
process and, when it drops, reconnects with exponential backoff and jitter and
subscribes again. Once back, it hands every listener `resync_message` on each
channel, so they can make up for what they missed. While its own subscription
is down, `publish` still offers each message to Redis (for the others) and
delivers it to this process's own listeners: local clients keep seeing local
changes.
"""

import asyncio
import logging
import random
from typing import Any

from broadcaster import BroadcastBackend, Event
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.kit.tasks import TaskSet

log = logging.getLogger(__name__)

# Publishing happens on the store's write path: a Redis that hangs must not hold up the poller.
PUBLISH_TIMEOUT_S = 2.0


class ResilientRedisBackend(BroadcastBackend):
    def __init__(
        self, url: str, *, resync_message: str, backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0
    ) -> None:
        self._redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=10)
        self._resync_message = resync_message
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._channels: set[str] = set()
        self._channels_changed = asyncio.Event()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._tasks = TaskSet()
        self.connected = False

    async def connect(self) -> None:
        if self._tasks:
            raise RuntimeError("the backend is already connected")
        self._tasks.spawn(self._listen(), "redis-fanout-listener")

    async def disconnect(self) -> None:
        await self._tasks.aclose()
        await self._redis.aclose()

    async def subscribe(self, channel: str) -> None:
        # The listener (re)subscribes to every channel in the set each time it connects.
        self._channels.add(channel)
        self._channels_changed.set()

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        self._channels_changed.set()

    async def publish(self, channel: str, message: Any) -> None:
        # Always offer it to Redis, even while our own subscription is down: the other processes may be
        # listening (the soak caught a replica whose subscription was still reconnecting, publishing to
        # itself only, while the others had already resynchronised and so missed its changes for good).
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await self._redis.publish(channel, message)
        except (RedisError, OSError) as error:  # OSError covers TimeoutError
            log.warning("publishing to redis failed, delivering in this process only: %s", error)
            self._events.put_nowait(Event(channel, message))
            return
        if not self.connected:
            # Redis will not echo it back to us, so this process's own listeners hear it here.
            self._events.put_nowait(Event(channel, message))

    async def next_published(self) -> Event:
        return await self._events.get()

    async def _listen(self) -> None:
        delay_s = self._backoff_initial_s
        lost = False
        while True:
            try:
                await self._serve(resync=lost)
            except (RedisError, OSError) as error:
                if self.connected or not lost:
                    log.warning("redis fan-out lost, delivering in this process until it is back: %s", error)
                    delay_s = self._backoff_initial_s
                lost = True
            self.connected = False
            await asyncio.sleep(delay_s * (1 + random.random()))
            delay_s = min(delay_s * 2, self._backoff_max_s)

    async def _serve(self, *, resync: bool) -> None:
        async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            subscribed: set[str] = set()
            while True:
                if subscribed != self._channels:
                    self._channels_changed.clear()
                    if gone := subscribed - self._channels:
                        await pubsub.unsubscribe(*gone)
                    if new := self._channels - subscribed:
                        await pubsub.subscribe(*new)
                    subscribed = set(self._channels)
                if not subscribed:
                    await self._channels_changed.wait()
                    continue
                if not self.connected:
                    self.connected = True
                    if resync:
                        log.info("redis fan-out is back; listeners resynchronise")
                        for channel in subscribed:
                            self._events.put_nowait(Event(channel, self._resync_message))
                        resync = False
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    self._events.put_nowait(Event(message["channel"].decode(), message["data"].decode()))
