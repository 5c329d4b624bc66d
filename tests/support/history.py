"""Writing a past into a service's database before it starts: history points the poller never saw."""

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import update

from app.currencies import Pair
from app.storage.engine import create_engine, create_sessionmaker, migrate
from app.storage.models import ExchangeRateHistory, RateSequence

DESTINATION_AMOUNT = Decimal(1000)


async def record_history(database_url: str, observations: Iterable[tuple[Pair, datetime, Decimal]]) -> None:
    """Migrate the database at `database_url` and append each (pair, observed at, destination per source), oldest
    first, each numbered as a store (docs/design.md, "Sequence numbers")."""
    ordered = sorted(observations, key=lambda observation: observation[1])
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with create_sessionmaker(engine)() as session, session.begin():
            taken = update(RateSequence).values(seq=RateSequence.seq + len(ordered)).returning(RateSequence.seq)
            first = (await session.execute(taken)).scalar_one() - len(ordered) + 1
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
                    seq=seq,
                )
                for seq, (pair, observed_at, value) in enumerate(ordered, start=first)
            )
    finally:
        await engine.dispose()
