"""The hub's snapshots for new clients while rates keep changing (both databases, the service's own store)."""

import asyncio
from collections.abc import Callable
from decimal import Decimal

from broadcaster import Broadcast
from sqlalchemy.ext.asyncio import AsyncEngine

from app.live.hub import Hub
from app.metrics import Metrics
from app.rates.postgres_writer import PostgresWriter
from app.rates.rate import StoredRate
from app.rates.sqlite_writer import SqliteWriter
from tests.test_store import USD_NGN, broadcast, engine, make_store, quote, writers

__all__ = ["broadcast", "engine", "writers"]  # fixtures, shared with the store's tests


async def test_clients_asking_during_a_read_share_the_next_one_while_rates_change(
    engine: AsyncEngine, broadcast: Broadcast, writers: Callable[[], SqliteWriter | PostgresWriter]
) -> None:
    # Under load a read takes longer than the next change takes to come: were every client that waited on it to
    # read again, a reconnect storm would get its snapshots one read at a time.
    store = make_store(engine, broadcast, writers())
    hub = Hub(broadcast, store, stale_after_s=3600, metrics=Metrics())
    await store.save(quote("1530.25"))
    reads: list[Decimal] = []
    read_all = store.all

    async def read_while_a_rate_changes(source: str | None = None) -> list[StoredRate]:
        rates = await read_all(source)
        reads.append(rates[0].destination_per_source)
        await store.save(quote(f"1531.{len(reads)}"))  # stored and told before this read is over
        return rates

    store.all = read_while_a_rate_changes  # type: ignore[method-assign]
    first, *others = await asyncio.gather(*(hub.snapshot() for _ in range(50)))
    # The first asked before any read; the others asked while it ran, so they take the next one, all of them.
    assert reads == [Decimal("1530.25"), Decimal("1531.1")]
    assert first.values[USD_NGN] == Decimal("1530.25")
    # What changed before the read they took began is in it: nothing they could have missed is left out.
    assert {snapshot.values[USD_NGN] for snapshot in others} == {Decimal("1531.1")}
