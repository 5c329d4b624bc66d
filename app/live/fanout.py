"""Publishing rate events to every process: broadcaster on `redis://` when Redis is set, `memory://` otherwise.

Each event is serialised once, here, whatever the number of listeners.
"""

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from broadcaster import Broadcast
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from app.currencies import Pair
from app.live.redis_backend import ResilientRedisBackend
from app.rates.rate import StoredRate
from app.rates.wire import RESYNC, AllRatesUpdate, RateItem, RateUpdate

log = logging.getLogger(__name__)

RATES_CHANNEL = "fxrates.rates"


@asynccontextmanager
async def create_broadcast(redis_url: str | None) -> AsyncIterator[Broadcast]:
    """`memory://` for one process; with Redis, a backend that reconnects and resynchronises (see redis_backend)."""
    if redis_url is None:
        broadcast = Broadcast("memory://")
    else:
        broadcast = Broadcast(backend=ResilientRedisBackend(redis_url, resync_message=RESYNC))
    async with broadcast:
        yield broadcast


class Fanout:
    def __init__(self, broadcast: Broadcast, errors: Counter) -> None:
        self._broadcast = broadcast
        self._errors = errors

    async def publish_rate(self, rate: StoredRate, previous: StoredRate | None) -> None:
        # A rate is published the moment it is stored, so it is fresh by definition.
        item = RateItem.of(rate, stale=False)
        await self._publish(RateUpdate(rate=item, previous_rate=previous.rate if previous else None))

    async def publish_cycle(self, update: AllRatesUpdate) -> None:
        await self._publish(update)

    async def _publish(self, event: BaseModel) -> None:
        try:
            await self._broadcast.publish(RATES_CHANNEL, event.model_dump_json())
        except (RedisError, OSError) as error:
            # The rate is already stored and cached; only the push is lost, and the next cycle repairs it.
            self._errors.inc()
            log.warning("could not publish %s: %s", type(event).__name__, error)


async def follow_rate_updates(
    broadcast: Broadcast, on_update: Callable[[RateUpdate], None], on_resync: Callable[[], None]
) -> None:
    """Hand every `rate_update` any process publishes to `on_update`, and a fan-out comeback to `on_resync`."""
    async with broadcast.subscribe(RATES_CHANNEL) as subscriber:
        while True:
            event = await subscriber.get()
            if event.message == RESYNC:
                on_resync()
            elif '"rate_update"' in event.message:
                try:
                    on_update(RateUpdate.model_validate_json(event.message))
                except ValidationError:
                    log.warning("ignoring a malformed rate_update on %s", RATES_CHANNEL)


def rate_pair(update: RateUpdate) -> Pair:
    return Pair(update.rate.source_currency, update.rate.destination_currency)
