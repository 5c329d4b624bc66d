"""The composition root: builds every long-lived resource from the settings and closes them in reverse.

Both entry points use it: the web app's lifespan (`app.main`) and the poller
command (`app.poller`).
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.admin import corridors as corridor_rows
from app.admin.keyring import KeyRing, database_reads
from app.api.history_answers import HistoryAnswers
from app.api.ops import PROBE_INTERVAL_S, Problems
from app.currencies import Pair
from app.errors import DatabaseUnavailable
from app.ingest.poller import Poller
from app.ingest.schedule import LocalSchedule, Schedule, SharedSchedule
from app.kit.metrics import Metrics
from app.kit.tasks import running
from app.kit.throttle import Throttle
from app.limits.on_demand import OnDemandBudget
from app.limits.per_client import MAX_CLIENTS, ClientLimiter
from app.limits.per_key import BadKeys, KeyGate
from app.limits.websocket import Admission
from app.limits.windows import MovingWindow
from app.live.fanout import Fanout, create_broadcast, follow_rate_updates
from app.live.gc_pacing import CollectionPacer
from app.live.hub import Hub
from app.rates.cache import MemoryCache, RedisCache, TieredCache
from app.rates.corridors import Corridor, Corridors
from app.rates.guard import RateGuard
from app.rates.lookup import RateLookup
from app.rates.store import RateStore, read_epoch, utc_now
from app.rates.wire import RateUpdate
from app.settings import Settings
from app.storage import repository
from app.storage.engine import WRITE_FACTOR, create_engine, create_sessionmaker, is_sqlite, migrate
from app.storage.health import DatabaseHealth
from app.storage.postgres_writer import PostgresWriter
from app.storage.sqlite_writer import SqliteWriter
from app.upstream.demo import DemoProvider
from app.upstream.flutterwave import FlutterwaveClient, create_http_client
from app.upstream.provider import Provider

log = logging.getLogger(__name__)

# With Redis, the in-process layer only spares Redis round trips: fan-out events keep it current,
# and this short life bounds how long it could lag if an event were lost.
SHARED_MEMORY_TTL_S = 5


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    metrics: Metrics
    engine: AsyncEngine
    database: DatabaseHealth
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis | None
    provider: Provider
    store: RateStore
    lookup: RateLookup
    hub: Hub
    poller: Poller
    client_limiter: ClientLimiter
    key_limiter: ClientLimiter
    key_gate: KeyGate
    ws_admission: Admission
    probes: Throttle[Problems]
    held_count: Throttle[int]
    """How many values the rate guard holds, read from the database at most once a second (`/metrics`)."""
    history_answers: HistoryAnswers


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
            durations=metrics.upstream_call_seconds,
        )


@asynccontextmanager
async def open_services(settings: Settings, metrics: Metrics, *, start_poller: bool) -> AsyncIterator[Services]:
    async with AsyncExitStack() as stack:
        # The URLs' passwords leave the settings here, for the connections only (never logged, docs/configuration.md).
        database_url = settings.database_url.get_secret_value()
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url is not None else None
        if settings.db_auto_migrate:
            # Unbounded: a replica may wait its turn behind another's migration, and a migration may run long.
            migration_engine = create_engine(database_url, timeout_s=None)
            try:
                await migrate(migration_engine)
            finally:
                await migration_engine.dispose()
        engine = create_engine(database_url, timeout_s=settings.db_timeout_seconds)
        stack.push_async_callback(engine.dispose)
        # A connection per probe, given a write's time to connect: see app.db_health.
        probe_engine = create_engine(database_url, timeout_s=settings.db_timeout_seconds * WRITE_FACTOR, pooled=False)
        stack.push_async_callback(probe_engine.dispose)
        database = DatabaseHealth(
            engine,
            metrics.database_errors,
            metrics.database_up,
            timeout_s=settings.db_timeout_seconds,
            probe_engine=probe_engine,
        )
        stack.push_async_callback(database.close)
        await stack.enter_async_context(running(database.run(), "database-probe"))
        sessions = create_sessionmaker(engine)

        redis: Redis | None = None
        if redis_url is not None:
            redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
            stack.push_async_callback(redis.aclose)
            cache = TieredCache(
                MemoryCache(min(SHARED_MEMORY_TTL_S, settings.cache_ttl_s)),
                RedisCache(redis, settings.cache_ttl_s, metrics.cache_errors),
            )
        else:
            log.info("REDIS_URL is unset: in-process cache and broadcast, correct for one process only")
            cache = TieredCache(MemoryCache(settings.cache_ttl_s), None)

        broadcast = await stack.enter_async_context(create_broadcast(redis_url))
        if redis is not None:

            def supersede(update: RateUpdate) -> None:
                # Kept as the last known rate too, so this replica holds every pair should the database go away.
                cache.memory.supersede(update.stored())

            follower = follow_rate_updates(broadcast, supersede, on_resync=cache.memory.clear)
            await stack.enter_async_context(running(follower, "cache-follower"))

        provider = await stack.enter_async_context(open_provider(settings, metrics))
        # This process's view of every corridor and override, shared by every fetcher and server of rates.
        corridors = Corridors()
        fanout = Fanout(broadcast, metrics.publish_errors, corridors)
        writer: SqliteWriter | PostgresWriter
        if is_sqlite(database_url):
            writer = SqliteWriter(database_url, busy_s=settings.db_timeout_seconds * WRITE_FACTOR)
        else:
            writer = PostgresWriter(database_url, timeout_s=settings.db_timeout_seconds)
        stack.push_async_callback(writer.aclose)
        # Read once: it changes only with the database (docs/design.md, "Sequence numbers"). While the database is
        # away the service starts all the same (docs/outages.md), and the store reads it with its first rates.
        try:
            epoch = await read_epoch(sessions, database)
        except DatabaseUnavailable:
            epoch = ""
        guard = RateGuard(settings.rate_guard_bps, settings.rate_guard_confirmations)
        store = RateStore(sessions, cache, fanout, database=database, writer=writer, epoch=epoch, guard=guard)
        # Closed before the broadcast and the engine: writes already handed over finish first.
        stack.push_async_callback(store.aclose)
        window = MovingWindow(redis, redis_url, errors=metrics.limit_errors)
        stack.push_async_callback(window.aclose)

        async def stored_pairs() -> list[Pair]:
            async with sessions() as session:
                return await repository.list_pairs(session)

        budget = OnDemandBudget(
            settings.pairs,
            settings.polled_currencies,
            settings.on_demand_currencies,
            calls_per_minute=settings.on_demand_calls_per_minute,
            max_pairs=settings.on_demand_max_pairs,
            window=window,
            redis=redis,
            stored_pairs=stored_pairs,
            refused=metrics.refused,
        )
        lookup = await stack.enter_async_context(
            RateLookup(
                cache,
                store,
                provider,
                metrics,
                budget,
                stale_after_s=settings.rate_stale_after_seconds,
                amount=settings.upstream_quote_amount,
                bound_s=settings.db_timeout_seconds,
                corridors=corridors,
            )
        )

        async def load_corridors() -> tuple[dict[Pair, Corridor], dict[Pair, datetime]]:
            async def read() -> tuple[dict[Pair, Corridor], dict[Pair, datetime]]:
                async with sessions() as session:
                    return await corridor_rows.load(session)

            return await database.call(read)

        pacer = await stack.enter_async_context(CollectionPacer(metrics.gc_full_collection_seconds))
        await stack.enter_async_context(running(pacer.run(), "gc-pacer"))
        hub = Hub(
            broadcast,
            store,
            stale_after_s=settings.rate_stale_after_seconds,
            metrics=metrics,
            stall_timeout_s=settings.ws_stall_timeout_seconds,
            max_pairs_per_client=settings.ws_max_pairs_per_client,
            heartbeat_s=settings.ws_heartbeat_seconds,
            on_rates=pacer.rates_moving,
            on_cycle_end=pacer.cycle_ended,
            corridors=corridors,
            load_corridors=load_corridors,
        )
        fanout.deliver_here(hub.deliver)
        # Before any rate is fetched or served: a replica that starts reads the corridors the database holds.
        await hub.load_corridors()
        await stack.enter_async_context(running(hub.run(), "websocket-hub"))
        # Read once now, while the database is known to answer: should it go away, this process already holds
        # every stored rate, for its snapshots and, as last known rates, for its lookups (docs/outages.md).
        for rate in (await hub.snapshot()).rates:
            cache.memory.supersede(rate)
        schedule: Schedule = (
            SharedSchedule(redis, settings.poll_interval_seconds, settings.poller_lock_ttl_seconds)
            if redis is not None
            else LocalSchedule(settings.poll_interval_seconds)
        )
        poller = Poller(
            provider,
            store,
            settings.pairs,
            schedule,
            amount=settings.upstream_quote_amount,
            metrics=metrics,
            corridors=corridors,
        )
        # Its own window, keyed by client address: its memory forgets the least recently seen past MAX_CLIENTS.
        client_window = MovingWindow(redis, redis_url, errors=metrics.limit_errors, max_memory_keys=MAX_CLIENTS)
        stack.push_async_callback(client_window.aclose)
        client_limiter = await stack.enter_async_context(
            ClientLimiter(settings.rate_limit_per_minute, client_window, metrics.refused).flushing()
        )
        # Keys: what this process read of each (app.admin.keyring), then their own limit, keyed by name.
        read_key, touch_key = database_reads(sessions, database)
        keyring = KeyRing(read_key, touch_key, now=utc_now)
        stack.push_async_callback(keyring.aclose)
        key_window = MovingWindow(redis, redis_url, errors=metrics.limit_errors, max_memory_keys=MAX_CLIENTS)
        stack.push_async_callback(key_window.aclose)
        key_limiter = await stack.enter_async_context(
            ClientLimiter(
                settings.rate_limit_per_key_per_minute,
                key_window,
                metrics.refused,
                name="per_key",
                whose="with this key",
            ).flushing()
        )
        bad_key_window = MovingWindow(redis, redis_url, errors=metrics.limit_errors, max_memory_keys=MAX_CLIENTS)
        stack.push_async_callback(bad_key_window.aclose)
        key_gate = KeyGate(keyring, BadKeys(bad_key_window), metrics.auth_failures)
        ws_admission = Admission(
            settings.ws_max_clients,
            settings.ws_max_clients_per_address,
            metrics.refused,
            messages_per_s=settings.ws_messages_per_second,
            message_burst=settings.ws_message_burst,
        )
        if start_poller:
            # Entered last, so it stops first: no cycle runs against a closed client or engine.
            await stack.enter_async_context(poller)
        yield Services(
            settings,
            metrics,
            engine,
            database,
            sessions,
            redis,
            provider,
            store,
            lookup,
            hub,
            poller,
            client_limiter,
            key_limiter,
            key_gate,
            ws_admission,
            Throttle(PROBE_INTERVAL_S),
            Throttle(PROBE_INTERVAL_S),
            HistoryAnswers(),
        )
