"""SQL for the rate tables, and nothing else: no cache, no events, no commits."""

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Select, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.currencies import Pair
from app.rates.models import ExchangeRate, ExchangeRateHistory
from app.rates.rate import StoredRate
from app.upstream.quote import Quote


def to_stored(row: ExchangeRate) -> StoredRate:
    return StoredRate(
        pair=Pair(row.source_currency, row.destination_currency),
        rate=row.rate,
        destination_per_source=row.destination_per_source,
        source_amount=row.source_amount,
        destination_amount=row.destination_amount,
        provider=row.provider,
        last_updated=row.last_updated,
    )


def _quote_values(quote: Quote) -> dict[str, object]:
    return {
        "source_currency": quote.pair.source,
        "destination_currency": quote.pair.destination,
        "rate": quote.rate,
        "destination_per_source": quote.destination_per_source,
        "source_amount": quote.source_amount,
        "destination_amount": quote.destination_amount,
        "provider": quote.provider,
    }


async def insert_if_absent(session: AsyncSession, quote: Quote, now: datetime) -> bool:
    """Insert the pair's first row; False when a row is already there (the caller then updates it)."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(ExchangeRate)
        .values(**_quote_values(quote), last_updated=now, created_at=now)
        .on_conflict_do_nothing(index_elements=["source_currency", "destination_currency"])
        .returning(ExchangeRate.id)
    )
    return (await session.execute(statement)).first() is not None


async def lock_current(session: AsyncSession, pair: Pair) -> ExchangeRate:
    """The pair's row, locked until the transaction ends, so two writers take turns."""
    statement = (
        select(ExchangeRate)
        .where(ExchangeRate.source_currency == pair.source, ExchangeRate.destination_currency == pair.destination)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return (await session.execute(statement)).scalar_one()


async def lock_current_many(session: AsyncSession, pairs: Collection[Pair]) -> dict[Pair, ExchangeRate]:
    """The rows of those of `pairs` already stored, locked until the transaction ends, in one statement.

    Locked in pair order, so two writers of overlapping batches take turns instead of deadlocking.
    """
    statement = (
        select(ExchangeRate)
        .where(
            tuple_(ExchangeRate.source_currency, ExchangeRate.destination_currency).in_(
                [(pair.source, pair.destination) for pair in pairs]
            )
        )
        .order_by(ExchangeRate.source_currency, ExchangeRate.destination_currency)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    rows = (await session.scalars(statement)).all()
    return {Pair(row.source_currency, row.destination_currency): row for row in rows}


def update_current(row: ExchangeRate, quote: Quote, now: datetime) -> None:
    for name, value in _quote_values(quote).items():
        setattr(row, name, value)
    row.last_updated = now


def append_history(session: AsyncSession, quote: Quote, observed_at: datetime) -> None:
    session.add(ExchangeRateHistory(**_quote_values(quote), observed_at=observed_at))


async def get_current(session: AsyncSession, pair: Pair) -> StoredRate | None:
    row = await session.scalar(
        select(ExchangeRate).where(
            ExchangeRate.source_currency == pair.source, ExchangeRate.destination_currency == pair.destination
        )
    )
    return None if row is None else to_stored(row)


async def list_current(session: AsyncSession, source: str | None = None) -> list[StoredRate]:
    statement = select(ExchangeRate).order_by(ExchangeRate.source_currency, ExchangeRate.destination_currency)
    if source is not None:
        statement = statement.where(ExchangeRate.source_currency == source)
    return [to_stored(row) for row in await session.scalars(statement)]


def _history_of(pair: Pair) -> Select[ExchangeRateHistory]:
    return select(ExchangeRateHistory).where(
        ExchangeRateHistory.source_currency == pair.source,
        ExchangeRateHistory.destination_currency == pair.destination,
    )


async def list_history(
    session: AsyncSession,
    pair: Pair,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[ExchangeRateHistory]:
    """The pair's observations, oldest first, within [since, until]."""
    statement = _history_of(pair).order_by(ExchangeRateHistory.observed_at, ExchangeRateHistory.id)
    if since is not None:
        statement = statement.where(ExchangeRateHistory.observed_at >= since)
    if until is not None:
        statement = statement.where(ExchangeRateHistory.observed_at <= until)
    if limit is not None:
        statement = statement.limit(limit)
    return list(await session.scalars(statement))


async def history_at(session: AsyncSession, pair: Pair, at: datetime) -> ExchangeRateHistory | None:
    """The observation in effect at `at`: the last one at or before it."""
    statement = (
        _history_of(pair)
        .where(ExchangeRateHistory.observed_at <= at)
        .order_by(ExchangeRateHistory.observed_at.desc(), ExchangeRateHistory.id.desc())
        .limit(1)
    )
    point: ExchangeRateHistory | None = await session.scalar(statement)
    return point


async def list_pairs(session: AsyncSession) -> list[Pair]:
    """Every pair with a stored rate."""
    rows = await session.execute(select(ExchangeRate.source_currency, ExchangeRate.destination_currency))
    return [Pair(source, destination) for source, destination in rows]
