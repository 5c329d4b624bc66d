"""Writing a past into a service's database before it starts: history points the poller never saw."""

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from app.currencies import Pair
from app.storage.engine import create_engine, create_sessionmaker, migrate
from app.storage.models import ExchangeRateHistory

DESTINATION_AMOUNT = Decimal(1000)


async def record_history(database_url: str, observations: Iterable[tuple[Pair, datetime, Decimal]]) -> None:
    """Migrate the database at `database_url` and append each (pair, observed at, destination per source)."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with create_sessionmaker(engine)() as session, session.begin():
            session.add_all(
                ExchangeRateHistory(
                    source_currency=pair.source,
                    destination_currency=pair.destination,
                    rate=1 / value,
                    destination_per_source=value,
                    source_amount=DESTINATION_AMOUNT / value,
                    destination_amount=DESTINATION_AMOUNT,
                    provider="flutterwave",
                    observed_at=observed_at,
                )
                for pair, observed_at, value in observations
            )
    finally:
        await engine.dispose()
