"""The one writer of rates: database first, then the cache, then the event.

Publish after commit: a subscriber must never see a rate that rolls back, and
the cache is written only once the database holds the value. So while the
database cannot be reached nothing new is shown anywhere: whatever a client
was shown, history holds (docs/outages.md). Every database call goes through
`DatabaseHealth`, bounded, and raises `DatabaseUnavailable` when it cannot be
made.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.currencies import Pair
from app.db_health import DatabaseHealth
from app.rates import repository
from app.rates.cache import TieredCache
from app.rates.rate import StoredRate
from app.rates.wire import AllRatesUpdate
from app.upstream.quote import Quote


def utc_now() -> datetime:
    return datetime.now(UTC)


class Publisher(Protocol):
    """Where stored rates are announced (`app.live.fanout.Fanout`); the store knows nothing of how."""

    async def publish_rate(self, rate: StoredRate, previous: StoredRate | None) -> None: ...

    async def publish_cycle(self, update: AllRatesUpdate) -> None: ...


@dataclass(frozen=True, slots=True)
class SaveResult:
    rate: StoredRate
    previous: StoredRate | None

    @property
    def changed(self) -> bool:
        return self.previous is None or self.previous.destination_per_source != self.rate.destination_per_source


class RateStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        cache: TieredCache,
        fanout: Publisher,
        clock: Callable[[], datetime] = utc_now,
        *,
        database: DatabaseHealth,
    ) -> None:
        self._sessions = sessions
        self.database = database
        self._cache = cache
        self._fanout = fanout
        self._clock = clock
        self.version = 0  # bumped by every save in this process, so derived views know they are out of date

    async def save(self, quote: Quote) -> SaveResult:
        """Store `quote` as the pair's current rate, appending to history when the value changed."""
        result = await self.database.call(lambda: self._write(quote), write=True)
        self.version += 1
        await self._cache.set(result.rate)
        await self._fanout.publish_rate(result.rate, result.previous)
        return result

    async def _write(self, quote: Quote) -> SaveResult:
        now = self._clock()
        async with self._sessions.begin() as session:
            previous: StoredRate | None = None
            if not await repository.insert_if_absent(session, quote, now):
                row = await repository.lock_current(session, quote.pair)
                previous = repository.to_stored(row)
                # Two writers of one pair take turns on the row lock; the second never goes back in time.
                now = max(now, previous.last_updated)
                repository.update_current(row, quote, now)
            result = SaveResult(
                rate=StoredRate(
                    pair=quote.pair,
                    rate=quote.rate,
                    destination_per_source=quote.destination_per_source,
                    source_amount=quote.source_amount,
                    destination_amount=quote.destination_amount,
                    provider=quote.provider,
                    last_updated=now,
                ),
                previous=previous,
            )
            if result.changed:
                repository.append_history(session, quote, now)
        return result

    async def publish_cycle(self, update: AllRatesUpdate) -> None:
        await self._fanout.publish_cycle(update)

    async def all(self, source: str | None = None) -> list[StoredRate]:
        async def read() -> list[StoredRate]:
            async with self._sessions() as session:
                return await repository.list_current(session, source)

        return await self.database.call(read)

    async def current(self, pair: Pair) -> StoredRate | None:
        async def read() -> StoredRate | None:
            async with self._sessions() as session:
                return await repository.get_current(session, pair)

        return await self.database.call(read)
