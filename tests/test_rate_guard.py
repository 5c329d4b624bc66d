"""The rate guard's decision, in-process in milliseconds; then as the store writes it, on both databases.

docs/operations.md, "The rate guard". Values are `destination_per_source`.
"""

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from broadcaster import Broadcast
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kit.metrics import Metrics
from app.live.fanout import RATES_CHANNEL, Fanout, create_broadcast
from app.rates.cache import MemoryCache, TieredCache
from app.rates.guard import Held, RateGuard, Verdict, move_bps
from app.rates.store import Overridden, RateStore, Writer, utc_now
from app.storage import repository
from app.storage.engine import create_engine, create_sessionmaker, is_sqlite
from app.storage.health import DatabaseHealth
from app.storage.postgres_writer import PostgresWriter
from app.storage.sqlite_writer import SqliteWriter
from tests.test_store import USD_NGN, quote

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
D = Decimal
GUARD = RateGuard(bps=1000, confirmations=2)


def held(value: str, confirmations: int = 0, first_seen: datetime = T0) -> Held:
    return Held(D(value), confirmations, first_seen)


# --- the decision ---------------------------------------------------------------------------------------------


def test_a_pairs_first_value_is_not_guarded() -> None:
    decision = GUARD.decide(None, None, D("15302.5"), T0)
    assert decision.verdict is Verdict.first and decision.verdict.stores and decision.held is None


def test_within_the_guard_is_stored_and_nothing_is_held() -> None:
    decision = GUARD.decide(D("1500"), None, D("1520"), T0)
    assert decision.verdict is Verdict.stored and decision.held is None and decision.move_bps == D("133.33")


def test_exactly_at_the_bound_is_stored_and_one_past_it_is_held() -> None:
    assert GUARD.decide(D("1000"), None, D("1100"), T0).verdict is Verdict.stored  # +1000 bps exactly
    assert GUARD.decide(D("1000"), None, D("900"), T0).verdict is Verdict.stored  # -1000 bps exactly
    assert GUARD.decide(D("1000"), None, D("1100.000000001"), T0).verdict is Verdict.held
    assert GUARD.decide(D("1000"), None, D("899.999999999"), T0).verdict is Verdict.held


def test_first_sight_out_of_bounds_is_held_with_a_signed_move() -> None:
    up = GUARD.decide(D("1500"), None, D("2250"), T0)
    assert up.verdict is Verdict.held and not up.verdict.stores
    assert up.held == held("2250") and up.move_bps == D("5000.00")
    down = GUARD.decide(D("1500"), None, D("150"), T0)
    assert down.move_bps == D("-9000.00"), "negative when destination_per_source fell"


def test_answers_agreeing_with_the_held_value_confirm_it_then_store_it() -> None:
    later = T0 + timedelta(minutes=10)
    once = GUARD.decide(D("1500"), held("2250"), D("2260"), later)
    assert once.verdict is Verdict.confirmed and once.held == held("2260", 1, T0), "the latest answer, first_seen kept"
    twice = GUARD.decide(D("1500"), once.held, D("2255"), later)
    assert twice.verdict is Verdict.settled and twice.verdict.stores and twice.held is None


def test_a_different_wild_value_starts_over() -> None:
    later = T0 + timedelta(minutes=10)
    decision = GUARD.decide(D("1500"), held("2250", 1), D("15000"), later)
    assert decision.verdict is Verdict.replaced and decision.held == held("15000", 0, later)


def test_an_answer_back_near_the_stored_value_is_stored_and_drops_the_held_one() -> None:
    decision = GUARD.decide(D("1500"), held("2250", 1), D("1505"), T0)
    assert decision.verdict is Verdict.stored and decision.held is None


def test_within_both_the_stored_and_the_held_value_counts_as_back() -> None:
    decision = GUARD.decide(D("1000"), held("1100.5"), D("1050"), T0)
    assert decision.verdict is Verdict.stored and decision.held is None


def test_a_held_value_drifting_within_the_bound_of_itself_keeps_counting() -> None:
    guard = RateGuard(bps=1000, confirmations=3)
    state = guard.decide(D("1000"), None, D("1500"), T0).held
    values = ["1640", "1790", "1950"]  # each within 10 % of the last, the last 30 % from the first
    verdicts = []
    for value in values:
        decision = guard.decide(D("1000"), state, D(value), T0)
        verdicts.append(decision.verdict)
        state = decision.held
    assert verdicts == [Verdict.confirmed, Verdict.confirmed, Verdict.settled]


def test_a_guard_of_zero_stores_everything_and_drops_what_was_held() -> None:
    off = RateGuard(bps=0, confirmations=2)
    decision = off.decide(D("1500"), held("15000"), D("15000"), T0)
    assert decision.verdict is Verdict.stored and decision.held is None and decision.move_bps == D("90000.00")


def test_one_confirmation_stores_at_the_next_agreeing_answer() -> None:
    guard = RateGuard(bps=1000, confirmations=1)
    assert guard.decide(D("1500"), held("2250"), D("2250"), T0).verdict is Verdict.settled


def test_zero_confirmations_leaves_it_to_an_operator() -> None:
    guard = RateGuard(bps=1000, confirmations=0)
    state = held("2250")
    for _ in range(5):
        decision = guard.decide(D("1500"), state, D("2250"), T0)
        assert decision.verdict is Verdict.confirmed
        state = decision.held
    assert state is not None and state.confirmations == 5


def test_a_stored_value_of_zero_cannot_be_guarded_against() -> None:
    # Quotes refuse zero, so none is stored; were one there, the next answer replaces it rather than dividing by it.
    decision = GUARD.decide(D("0"), None, D("1500"), T0)
    assert decision.verdict is Verdict.first and decision.verdict.stores


def test_negative_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RateGuard(bps=-1, confirmations=2)
    assert move_bps(D("3"), D("4")) == D("3333.33")


# --- as the store writes it, on both databases -------------------------------------------------------------------


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(migrated_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def broadcast() -> AsyncIterator[Broadcast]:
    async with create_broadcast(None) as broadcast:
        yield broadcast


@pytest.fixture
async def writers(migrated_url: str) -> AsyncIterator[Callable[[], Writer]]:
    made: list[SqliteWriter | PostgresWriter] = []

    def writer() -> Writer:
        made.append(
            SqliteWriter(migrated_url, busy_s=10)
            if is_sqlite(migrated_url)
            else PostgresWriter(migrated_url, timeout_s=5)
        )
        return made[-1]

    yield writer
    for each in made:
        await each.aclose()


def guarded_store(engine: AsyncEngine, broadcast: Broadcast, writer: Writer, guard: RateGuard = GUARD) -> RateStore:
    metrics = Metrics()
    return RateStore(
        create_sessionmaker(engine),
        TieredCache(MemoryCache(60), None),
        Fanout(broadcast, metrics.publish_errors),
        database=DatabaseHealth(engine, metrics.database_errors, metrics.database_up, timeout_s=2),
        writer=writer,
        epoch="test",
        guard=guard,
    )


async def test_a_held_value_is_not_stored_published_or_numbered(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], Writer]
) -> None:
    store = guarded_store(engine, broadcast, writers())
    first = await store.save(quote("1500"))
    async with broadcast.subscribe(RATES_CHANNEL) as subscriber:
        glitch = await store.save(quote("15000"))
        assert glitch.verdict is Verdict.held and not glitch.stored and not glitch.changed
        assert glitch.rate == first.rate and glitch.held is not None and glitch.move_bps == D("90000.00")
        after = await store.save(quote("1510"))  # back near the stored value: stored, the held one dropped
        event = await subscriber.get()
    assert "15000" not in event.message and "1510" in event.message, "only the stored value is told"
    assert after.rate.seq == first.rate.seq + 1, "the number taken for the held value was handed back: no gap"
    async with create_sessionmaker(engine)() as session:
        points = await repository.list_history(session, USD_NGN)
        assert [point.destination_per_source for point in points] == [D("1500"), D("1510")]
        assert await repository.list_held(session) == []


async def test_confirmations_are_kept_in_the_database_across_processes(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], Writer]
) -> None:
    one = guarded_store(engine, broadcast, writers())
    await one.save(quote("1500"))
    assert (await one.save(quote("2250"))).verdict is Verdict.held
    # Another process (a poller handover, a restart): it counts on from what the database holds.
    other = guarded_store(engine, broadcast, writers())
    confirmed = await other.save(quote("2260"))
    assert confirmed.verdict is Verdict.confirmed and confirmed.held is not None
    assert confirmed.held.confirmations == 1
    async with create_sessionmaker(engine)() as session:
        ((listed, stored),) = await repository.list_held(session)
    assert listed.quote.destination_per_source == D("2260") and listed.confirmations == 1
    assert stored is not None and stored.destination_per_source == D("1500")
    settled = await one.save(quote("2255"))
    assert settled.verdict is Verdict.settled and settled.changed and settled.rate.destination_per_source == D("2255")
    async with create_sessionmaker(engine)() as session:
        assert await repository.list_held(session) == []


async def test_a_batch_mixing_held_and_stored_values_numbers_the_stored_ones_without_gaps(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], Writer]
) -> None:
    store = guarded_store(engine, broadcast, writers())
    usd_kes, usd_ghs = (
        quote("130", pair=USD_NGN.__class__("USD", "KES")),
        quote("12", pair=USD_NGN.__class__("USD", "GHS")),
    )
    start = await store.save_many([quote("1500"), usd_kes, usd_ghs])
    results = await store.save_many(
        [quote("15000"), quote("131", pair=usd_kes.pair), quote("1.2", pair=usd_ghs.pair), quote("1502")]
    )
    assert [result.verdict for result in results] == [Verdict.held, Verdict.stored, Verdict.held, Verdict.stored]
    last = max(result.rate.seq for result in start)
    assert [results[1].rate.seq, results[3].rate.seq] == [last + 1, last + 2]
    # The USD/NGN value held first is dropped by the answer back near the stored value later in the same batch.
    async with create_sessionmaker(engine)() as session:
        assert [held.quote.pair for held, _ in await repository.list_held(session)] == [usd_ghs.pair]
    again = await store.save(quote("1503"))
    assert again.rate.seq == last + 3


async def test_an_unguarded_save_stores_the_held_value_and_drops_it(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], Writer]
) -> None:
    store = guarded_store(engine, broadcast, writers(), RateGuard(bps=1000, confirmations=0))
    await store.save(quote("1500"))
    held_result = await store.save(quote("2250"))
    assert held_result.held is not None
    accepted = await store.save(held_result.held.quote, guarded=False)
    assert accepted.stored and accepted.changed and accepted.rate.destination_per_source == D("2250")
    async with create_sessionmaker(engine)() as session:
        assert await repository.list_held(session) == []
        assert await repository.count_held(session) == 0


def manual(value: str, expires_in: timedelta) -> repository.ManualQuote:
    now = utc_now()
    return repository.ManualQuote(
        pair=USD_NGN,
        rate=D(1) / D(value),
        destination_per_source=D(value),
        source_amount=D(1000) / D(value),
        destination_amount=D(1000),
        provider=repository.MANUAL,
        received_at=now,
        actor="ops-alice",
        reason="Upstream down; rate agreed with treasury",
        expires_at=now + expires_in,
    )


async def test_fetched_values_are_guarded_against_the_last_fetched_value_never_an_overrides(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], Writer]
) -> None:
    store = guarded_store(engine, broadcast, writers())
    await store.save(quote("1500"))
    assert (await store.save(quote("2250"))).verdict is Verdict.held
    # An operator's value far from the fetched one: stored (not a fetch, never held), and what is held stays held.
    override = await store.save(manual("15000", timedelta(hours=1)))
    assert override.stored and override.rate.provider == repository.MANUAL
    with pytest.raises(Overridden):
        await store.save(quote("15010"))  # while it is in force, nothing fetched is stored (nor guarded)
    async with create_sessionmaker(engine)() as session:
        ((listed, stored),) = await repository.list_held(session)
    assert listed.quote.destination_per_source == D("2250") and listed.confirmations == 0
    assert stored is not None and stored.destination_per_source == D("15000")
    # It expires (set again, already over): the next fetches are compared with 1500, the last fetched value.
    await store.save(manual("15000", timedelta(seconds=-1)))
    near_the_override = await store.save(quote("15010"))
    assert near_the_override.verdict is Verdict.replaced and not near_the_override.stored
    assert near_the_override.move_bps == D("90066.67"), "from the last fetched value, 1500, not the override's"
    assert near_the_override.rate.destination_per_source == D("15000"), "the manual value is still served"
    back = await store.save(quote("1510"))  # within the guard of 1500: stored over the override, the held dropped
    assert back.verdict is Verdict.stored and back.changed and back.move_bps == D("66.67")
    async with create_sessionmaker(engine)() as session:
        assert await repository.list_held(session) == []
        assert await repository.list_overrides(session) == []
    # And from then on, the value just fetched is the one compared with.
    assert (await store.save(quote("1520"))).verdict is Verdict.stored
