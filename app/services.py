"""The composition root: builds every long-lived resource from the settings and closes them in reverse.

Both entry points use it: the web app's lifespan (`app.main`) and the poller
command (`app.poller`).
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine, create_sessionmaker, migrate
from app.metrics import Metrics
from app.rates.cache import MemoryCache, RateCache, RedisCache
from app.rates.fanout import Fanout, create_broadcast
from app.rates.poller import Poller
from app.rates.store import RateStore
from app.settings import Settings
from app.upstream.demo import DemoProvider
from app.upstream.flutterwave import FlutterwaveClient, create_http_client
from app.upstream.provider import Provider

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    metrics: Metrics
    engine: AsyncEngine
    redis: Redis | None
    provider: Provider
    store: RateStore
    poller: Poller


@asynccontextmanager
async def open_provider(settings: Settings, metrics: Metrics) -> AsyncIterator[Provider]:
    if settings.flutterwave_secret_key is None:
        log.warning("FLUTTERWAVE_SECRET_KEY is unset: serving simulated demo rates, marked provider=demo")
        yield DemoProvider()
        return
    async with create_http_client(
        settings.flutterwave_base_url,
        settings.flutterwave_secret_key,
        settings.upstream_timeout_seconds,
        max_connections=settings.upstream_concurrency,
    ) as http:
        yield FlutterwaveClient(
            http,
            limiter=asyncio.Semaphore(settings.upstream_concurrency),
            max_attempts=settings.upstream_max_attempts,
            calls=metrics.upstream_calls,
        )


@asynccontextmanager
async def open_services(settings: Settings, metrics: Metrics, *, start_poller: bool) -> AsyncIterator[Services]:
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        if settings.db_auto_migrate:
            await migrate(engine)

        redis: Redis | None = None
        cache: RateCache
        if settings.redis_url:
            redis = Redis.from_url(settings.redis_url)
            stack.push_async_callback(redis.aclose)
            cache = RedisCache(redis, settings.cache_ttl_s, metrics.cache_errors)
        else:
            log.info("REDIS_URL is unset: in-process cache and broadcast, correct for one process only")
            cache = MemoryCache(settings.cache_ttl_s)

        broadcast = await stack.enter_async_context(create_broadcast(settings.redis_url))
        provider = await stack.enter_async_context(open_provider(settings, metrics))
        store = RateStore(create_sessionmaker(engine), cache, Fanout(broadcast, metrics.publish_errors))
        poller = Poller(
            provider,
            store,
            settings.pairs,
            interval_s=settings.poll_interval_seconds,
            amount=settings.upstream_quote_amount,
            metrics=metrics,
        )
        if start_poller:
            # Entered last, so it stops first: no cycle runs against a closed client or engine.
            await stack.enter_async_context(poller)
        yield Services(settings, metrics, engine, redis, provider, store, poller)


def configure_logging() -> None:
    """Plain lines on stderr for the service's own loggers; a no-op where logging is already set up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
