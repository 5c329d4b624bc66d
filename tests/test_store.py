"""The store on both databases: exact decimals, UTC timestamps, history only on change, publish after commit."""

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from broadcaster import Broadcast
from sqlalchemy.ext.asyncio import AsyncEngine

from app.currencies import Pair
from app.kit.metrics import Metrics
from app.live.fanout import RATES_CHANNEL, Fanout, create_broadcast
from app.rates.cache import MemoryCache, RedisCache, TieredCache
from app.rates.store import RateStore, Writer
from app.storage import repository
from app.storage.engine import create_engine, create_sessionmaker, is_sqlite
from app.storage.health import DatabaseHealth
from app.storage.postgres_writer import PostgresWriter
from app.storage.sqlite_writer import SqliteWriter
from app.upstream.quote import Quote
from tests.conftest import postgres_database

USD_NGN = Pair("USD", "NGN")


def quote(destination_per_source: str, rate: str = "0.000666667", pair: Pair = USD_NGN) -> Quote:
    return Quote(
        pair=pair,
        rate=Decimal(rate),
        destination_per_source=Decimal(destination_per_source),
        source_amount=Decimal("0.666667"),
        destination_amount=Decimal(1000),
        provider="flutterwave",
    )


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(migrated_url)
    yield engine
    await engine.dispose()


def health(engine: AsyncEngine, metrics: Metrics) -> DatabaseHealth:
    return DatabaseHealth(engine, metrics.database_errors, metrics.database_up, timeout_s=2)


@pytest.fixture
async def broadcast() -> AsyncIterator[Broadcast]:
    async with create_broadcast(None) as broadcast:
        yield broadcast


def make_store(engine: AsyncEngine, broadcast: Broadcast, writer: Writer) -> RateStore:
    metrics = Metrics()
    return RateStore(
        create_sessionmaker(engine),
        TieredCache(MemoryCache(60), None),
        Fanout(broadcast, metrics.publish_errors),
        database=health(engine, metrics),
        writer=writer,
        epoch="test",
    )


@pytest.fixture
async def writers(migrated_url: str) -> AsyncIterator[Callable[[], SqliteWriter | PostgresWriter]]:
    """Each call a writer of its own (a thread, with its connection), as each process of the service has one."""
    writers: list[SqliteWriter | PostgresWriter] = []

    def writer() -> SqliteWriter | PostgresWriter:
        if is_sqlite(migrated_url):
            writers.append(SqliteWriter(migrated_url, busy_s=10))
        else:
            writers.append(PostgresWriter(migrated_url, timeout_s=5))
        return writers[-1]

    yield writer
    for each in writers:
        await each.aclose()


@pytest.fixture
def store(engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], SqliteWriter | PostgresWriter]) -> RateStore:
    return make_store(engine, broadcast, writers())


async def test_exact_decimals_round_trip(store: RateStore, engine: AsyncEngine) -> None:
    await store.save(quote("1530.251234567891", rate="0.000666667"))
    async with create_sessionmaker(engine)() as session:
        stored = await repository.get_current(session, USD_NGN)
        (point,) = await repository.list_history(session, USD_NGN)
    assert stored is not None
    assert str(stored.rate) == "0.000666667"
    assert str(stored.destination_per_source) == "1530.251234567891"
    assert str(point.destination_per_source) == "1530.251234567891"
    assert str(stored.source_amount) == "0.666667"


async def test_timestamps_come_back_utc_aware(store: RateStore, engine: AsyncEngine) -> None:
    before = datetime.now(UTC)
    await store.save(quote("1530.25"))
    async with create_sessionmaker(engine)() as session:
        stored = await repository.get_current(session, USD_NGN)
    assert stored is not None
    assert stored.last_updated.tzinfo is not None and stored.last_updated.utcoffset().total_seconds() == 0
    assert before <= stored.last_updated <= datetime.now(UTC)


async def test_history_grows_only_on_change(store: RateStore, engine: AsyncEngine) -> None:
    first = await store.save(quote("1530.25"))
    same = await store.save(quote("1530.25"))
    moved = await store.save(quote("1531.5"))
    assert (first.changed, same.changed, moved.changed) == (True, False, True)
    assert same.previous is not None and same.previous.destination_per_source == Decimal("1530.25")
    assert same.rate.last_updated > first.rate.last_updated
    async with create_sessionmaker(engine)() as session:
        points = await repository.list_history(session, USD_NGN)
        current = await repository.list_current(session)
    assert [p.destination_per_source for p in points] == [Decimal("1530.25"), Decimal("1531.5")]
    assert len(current) == 1 and current[0].destination_per_source == Decimal("1531.5")


async def test_concurrent_writers_of_one_pair_leave_one_row(store: RateStore, engine: AsyncEngine) -> None:
    await asyncio.gather(*(store.save(quote(f"1530.{n}")) for n in range(1, 9)))
    async with create_sessionmaker(engine)() as session:
        current = await repository.list_current(session)
        points = await repository.list_history(session, USD_NGN)
    assert len(current) == 1
    assert len(points) == 8


async def test_a_subscriber_sees_the_rate_only_once_it_is_committed(
    store: RateStore, engine: AsyncEngine, broadcast: Broadcast
) -> None:
    async with broadcast.subscribe(RATES_CHANNEL) as subscriber:
        await store.save(quote("1530.25"))
        event = await asyncio.wait_for(subscriber.get(), timeout=5)
        # By the time the event is out, another session already reads the value.
        async with create_sessionmaker(engine)() as session:
            stored = await repository.get_current(session, USD_NGN)
    assert stored is not None and stored.destination_per_source == Decimal("1530.25")
    assert '"type":"rate_update"' in event.message
    assert '"destination_per_source":1530.25' in event.message
    assert '"previous_rate":null' in event.message


async def test_redis_cache_holds_the_rate_with_its_ttl(
    redis_url: str, engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], SqliteWriter | PostgresWriter]
) -> None:
    from redis.asyncio import Redis

    metrics = Metrics()
    async with Redis.from_url(redis_url) as redis:
        cache = RedisCache(redis, 1200, metrics.cache_errors, prefix="fxrates-test:")
        tiers = TieredCache(MemoryCache(60), cache)
        store = RateStore(
            create_sessionmaker(engine),
            tiers,
            Fanout(broadcast, metrics.publish_errors),
            database=health(engine, metrics),
            writer=writers(),
            epoch="test",
        )
        saved = await store.save(quote("1530.251234567891"))
        assert await cache.get(USD_NGN) == saved.rate
        ttl = await redis.ttl("fxrates-test:USD:NGN")
    assert 1190 <= ttl <= 1200


async def test_redis_never_takes_an_older_rate_over_a_newer_one(redis_url: str) -> None:
    from datetime import timedelta

    from redis.asyncio import Redis

    from app.storage.rate import StoredRate

    newer = StoredRate(
        USD_NGN, Decimal("0.0006"), Decimal("1531"), Decimal(1), Decimal(1531), "x", datetime.now(UTC), seq=2
    )
    older = StoredRate(
        USD_NGN,
        Decimal("0.0007"),
        Decimal("1400"),
        Decimal(1),
        Decimal(1400),
        "x",
        newer.last_updated - timedelta(seconds=5),
        seq=1,
    )
    metrics = Metrics()
    async with Redis.from_url(redis_url) as redis:
        cache = RedisCache(redis, 60, metrics.cache_errors, prefix="fxrates-test:")
        await cache.set(newer)
        await cache.set(older)  # a read-through fill or a slower writer, landing late
        assert await cache.get(USD_NGN) == newer
        await redis.set("fxrates-test:USD:NGN", b'{"left by": "another version"}')
        assert await cache.get(USD_NGN) is None  # unreadable: a miss, not an error


async def test_last_updated_never_goes_back_in_time(store: RateStore) -> None:
    from dataclasses import replace
    from datetime import timedelta

    first = await store.save(quote("1530.25"))
    # An answer received before the stored one, but written after it (a slower writer, landing late).
    late = replace(quote("1531.5"), received_at=first.rate.last_updated - timedelta(seconds=3))
    second = await store.save(late)
    assert second.rate.last_updated >= first.rate.last_updated


async def test_last_updated_is_when_the_upstream_answer_arrived(store: RateStore) -> None:
    from dataclasses import replace
    from datetime import timedelta

    received_at = datetime.now(UTC) - timedelta(seconds=2)
    saved = await store.save(replace(quote("1530.25"), received_at=received_at))
    assert saved.rate.last_updated == received_at


async def test_two_processes_writing_one_pair_take_turns(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], SqliteWriter | PostgresWriter]
) -> None:
    # Two stores on one database, as two workers or replicas: on SQLite two writer threads, two connections.
    first, second = make_store(engine, broadcast, writers()), make_store(engine, broadcast, writers())
    saved = await asyncio.gather(
        *(store.save(quote(f"1530.{n}")) for n in range(1, 9) for store in (first, second) if n % 2 == (store is first))
    )
    async with create_sessionmaker(engine)() as session:
        (current,) = await repository.list_current(session)
        points = await repository.list_history(session, USD_NGN)
    assert len(points) == 8
    # Each write saw the one before it: history is one chain, in time order, ending at the current value.
    stamps = [point.observed_at for point in points]
    assert stamps == sorted(stamps)
    assert points[-1].destination_per_source == current.destination_per_source
    assert max(result.rate.last_updated for result in saved) == current.last_updated
    assert sum(result.previous is None for result in saved) == 1


async def test_rates_written_together_are_published_as_one_event_after_commit(
    store: RateStore, engine: AsyncEngine, broadcast: Broadcast
) -> None:
    from dataclasses import replace

    quotes = [quote("1530.25"), replace(quote("1531.5")), quote("1532.75")]
    async with broadcast.subscribe(RATES_CHANNEL) as subscriber:
        results = await store.save_many(quotes)
        event = await asyncio.wait_for(subscriber.get(), timeout=5)
    assert [result.changed for result in results] == [True, True, True]
    assert [r.previous.destination_per_source if r.previous else None for r in results] == [
        None,
        Decimal("1530.25"),
        Decimal("1531.5"),
    ]
    assert event.message.count('"type":"rate_update"') == 3
    async with create_sessionmaker(engine)() as session:
        points = await repository.list_history(session, USD_NGN)
    assert [p.destination_per_source for p in points] == [Decimal("1530.25"), Decimal("1531.5"), Decimal("1532.75")]


async def test_the_sqlite_writer_checkpoints_its_log_itself_between_cycles(sqlite_url: str) -> None:
    import sqlite3

    from app.rates.store import write_batch
    from app.storage import sqlite_writer
    from app.storage.engine import migrate

    engine = create_engine(sqlite_url)
    await migrate(engine)
    await engine.dispose()
    writer = SqliteWriter(sqlite_url, busy_s=10)
    path = sqlite_url.split("///", 1)[1]

    def log_frames() -> int:
        # A passive checkpoint from outside copies nothing the writer's own did not, and says how long the log is.
        with sqlite3.connect(path) as outside:
            busy, frames, _ = outside.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0
        return int(frames)

    async def write(count: int) -> None:
        for n in range(count):
            await writer.submit(lambda connection, n=n: write_batch(connection, [quote(f"1530.{n}")]))

    try:
        await write(40)
        before = log_frames()
        # The end of a cycle: the writer checkpoints, so the next write starts the log afresh.
        writer.checkpoint()
        await write(1)
        assert log_frames() < before
        # No cycles at all: it checkpoints by itself every CHECKPOINT_EVERY commits.
        await write(sqlite_writer.CHECKPOINT_EVERY - 2)
        full = log_frames()
        await write(2)
        assert log_frames() < full
    finally:
        await writer.aclose()


async def test_a_batch_waits_for_another_process_holding_the_sqlite_write_lock_then_is_written(sqlite_url: str) -> None:
    import sqlite3

    from app.rates.store import write_batch
    from app.storage.engine import migrate

    engine = create_engine(sqlite_url)
    await migrate(engine)
    writer = SqliteWriter(sqlite_url, busy_s=10)
    try:
        await writer.submit(lambda connection: write_batch(connection, [quote("1530.25")]))
        # Another process (another worker on the same file) holds the write lock.
        other = sqlite3.connect(sqlite_url.split("///", 1)[1], isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        waiting = writer.submit(lambda connection: write_batch(connection, [quote("1531.5")]))
        # It waits in the writer's thread, not on the event loop: readers are answered meanwhile.
        async with create_sessionmaker(engine)() as session:
            assert (await repository.get_current(session, USD_NGN)) is not None
        assert not waiting.done()
        other.execute("COMMIT")
        other.close()
        (result,) = await asyncio.wait_for(waiting, timeout=10)
        assert result.previous is not None and result.previous.destination_per_source == Decimal("1530.25")
        async with create_sessionmaker(engine)() as session:
            points = await repository.list_history(session, USD_NGN)
        assert [point.destination_per_source for point in points] == [Decimal("1530.25"), Decimal("1531.5")]
    finally:
        await writer.aclose()
        await engine.dispose()


async def test_a_redis_that_answers_nothing_holds_up_neither_the_next_write_nor_this_process(
    engine: AsyncEngine,
    broadcast: Broadcast,
    writers: Callable[[], SqliteWriter | PostgresWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's round trips to Redis run while the next batch is written; other processes are told in order."""
    from redis.asyncio import Redis

    from app.rates import cache as cache_module

    # Long enough that only the test's own release ends the first batch's round trip.
    monkeypatch.setattr(cache_module, "REDIS_OP_TIMEOUT_S", 60.0)
    held: list[asyncio.StreamWriter] = []
    asked = asyncio.Event()

    async def answer_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        asked.set()
        while await reader.read(65536):
            pass

    black_hole = await asyncio.start_server(answer_nothing, "127.0.0.1", 0)
    port = black_hole.sockets[0].getsockname()[1]
    metrics = Metrics()
    fanout = Fanout(broadcast, metrics.publish_errors)
    handed: list[str] = []
    second_handed = asyncio.Event()

    def here(event: str) -> None:
        handed.append(event)
        if "1531.5" in event:
            second_handed.set()

    fanout.deliver_here(here)
    async with Redis.from_url(f"redis://127.0.0.1:{port}/0") as redis, broadcast.subscribe(RATES_CHANNEL) as channel:
        store = RateStore(
            create_sessionmaker(engine),
            TieredCache(MemoryCache(60), RedisCache(redis, 60, metrics.cache_errors)),
            fanout,
            database=health(engine, metrics),
            writer=writers(),
            epoch="test",
        )
        first = store.save(quote("1530.25"))
        await asyncio.wait_for(asked.wait(), timeout=10)  # the first batch is stored and on its way to Redis
        second = store.save(quote("1531.5"))
        await asyncio.wait_for(second_handed.wait(), timeout=10)
        # Stored and shown to this process's clients while the first batch still waits on Redis.
        assert not first.done() and not second.done()
        assert [("1530.25" in event, "1531.5" in event) for event in handed] == [(True, False), (False, True)]
        # Redis goes away for good: each round trip fails at once, and every saver gets its rate.
        black_hole.close()
        for writer in held:
            writer.close()
        saved = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
        told = [(await asyncio.wait_for(channel.get(), timeout=10)).message for _ in range(2)]
        await store.aclose()
    assert [result.rate.destination_per_source for result in saved] == [Decimal("1530.25"), Decimal("1531.5")]
    assert "1530.25" in told[0] and "1531.5" in told[1], "other processes are told in the order stored"
    assert metrics.registry.get_sample_value("fxrates_cache_errors_total") == 2, "both round trips failed, counted"


async def test_every_store_takes_a_seq_above_every_store_before_it(
    store: RateStore, engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], SqliteWriter | PostgresWriter]
) -> None:
    usd_kes = Pair("USD", "KES")
    first = await store.save(quote("1530.25"))  # on demand: one alone
    cycle = await store.save_many([quote("1531.5"), quote("130.5", pair=usd_kes)])  # the poller: a batch
    again = await store.save(quote("1531.5"))  # the same value answered again
    other = make_store(engine, broadcast, writers())  # another process
    elsewhere = await other.save(quote("131", pair=usd_kes))
    seqs = [result.rate.seq for result in (first, *cycle, again, elsewhere)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert not again.changed and again.rate.seq > cycle[0].rate.seq
    async with create_sessionmaker(engine)() as session:
        points = await repository.list_history(session, USD_NGN)
        current = {rate.pair: rate for rate in await repository.list_current(session)}
    # History keeps a point only for a new value, with the seq of the store that recorded it.
    assert [(point.destination_per_source, point.seq) for point in points] == [
        (Decimal("1530.25"), first.rate.seq),
        (Decimal("1531.5"), cycle[0].rate.seq),
    ]
    assert current[USD_NGN].seq == again.rate.seq and current[usd_kes].seq == elsewhere.rate.seq


async def test_the_event_tells_each_stores_seq(store: RateStore, broadcast: Broadcast) -> None:
    async with broadcast.subscribe(RATES_CHANNEL) as subscriber:
        results = await store.save_many([quote("1530.25"), quote("1531.5")])
        event = await asyncio.wait_for(subscriber.get(), timeout=5)
    for result in results:
        assert f'"seq":{result.rate.seq}' in event.message


async def test_concurrent_writers_never_commit_out_of_seq_order(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], SqliteWriter | PostgresWriter]
) -> None:
    """Two processes storing disjoint pairs at once (nothing but the numbering makes them take turns), and a
    reader: whenever it sees seq N committed, it sees every seq below N too."""
    from sqlalchemy import func, select

    from app.storage.models import ExchangeRateHistory

    rounds = 40
    stores = [make_store(engine, broadcast, writers()) for _ in range(2)]
    pairs = [[Pair(source, destination) for destination in ("NGN", "KES", "GHS")] for source in ("USD", "GBP")]
    done = asyncio.Event()

    async def write(store: RateStore, pairs: list[Pair]) -> list[int]:
        seqs = []
        for round_ in range(rounds):
            # Every value new, so every store is a history point: history holds every seq committed.
            batch = [quote(f"{1000 + round_}.{n}", pair=pair) for n, pair in enumerate(pairs)]
            seqs += [result.rate.seq for result in await store.save_many(batch)]
        return seqs

    async def read() -> int:
        seen = 0
        statement = select(func.max(ExchangeRateHistory.seq), func.count())
        while not done.is_set():
            async with engine.connect() as connection:
                highest, count = (await connection.execute(statement)).one()
            assert count == (highest or 0), f"seq {highest} committed while only {count} stores are"
            seen += 0 < count < 2 * 3 * rounds
            await asyncio.sleep(0)
        return seen

    reader = asyncio.create_task(read())
    try:
        written = await asyncio.gather(*(write(store, mine) for store, mine in zip(stores, pairs, strict=True)))
    finally:
        done.set()
    seen_midway = await reader
    assert sorted(written[0] + written[1]) == list(range(1, 2 * 3 * rounds + 1))
    assert seen_midway > 0, "the reader must have looked while the writers wrote"


async def test_the_epoch_is_the_databases_own(migrated_url: str, tmp_path: Path) -> None:
    from app.rates.store import read_epoch
    from app.storage.engine import migrate

    async def epoch_of(url: str) -> str:
        engine = create_engine(url)
        try:
            await migrate(engine)  # a start-up: nothing to do on a database already migrated
            return await read_epoch(create_sessionmaker(engine), health(engine, Metrics()))
        finally:
            await engine.dispose()

    epoch = await epoch_of(migrated_url)
    assert epoch and ":" not in epoch
    assert await epoch_of(migrated_url) == epoch, "a restart keeps it"
    if is_sqlite(migrated_url):
        assert await epoch_of(f"sqlite+aiosqlite:///{tmp_path / 'another.db'}") != epoch
    else:
        async with postgres_database() as another:
            assert await epoch_of(another) != epoch
