"""The tables (docs/design.md, "Data"). Created and changed by Alembic migrations only."""

from datetime import datetime
from decimal import Decimal

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.storage.engine import Base, ExactDecimal, UTCDateTime

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")


class ExchangeRate(Base):
    """The current rate of each pair: one row per pair."""

    __tablename__ = "exchange_rates"
    __table_args__ = (
        Index("ix_exchange_rates_pair", "source_currency", "destination_currency", unique=True),
        Index("ix_exchange_rates_last_updated", "last_updated"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    source_currency: Mapped[str] = mapped_column(String(3))
    destination_currency: Mapped[str] = mapped_column(String(3))
    rate: Mapped[Decimal] = mapped_column(ExactDecimal())
    destination_per_source: Mapped[Decimal] = mapped_column(ExactDecimal())
    source_amount: Mapped[Decimal] = mapped_column(ExactDecimal())
    destination_amount: Mapped[Decimal] = mapped_column(ExactDecimal())
    provider: Mapped[str] = mapped_column(String(32))
    last_updated: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ExchangeRateHistory(Base):
    """Append-only: one row each time a pair's value was seen to change."""

    __tablename__ = "exchange_rate_history"
    __table_args__ = (
        Index("ix_exchange_rate_history_pair_observed_at", "source_currency", "destination_currency", "observed_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    source_currency: Mapped[str] = mapped_column(String(3))
    destination_currency: Mapped[str] = mapped_column(String(3))
    rate: Mapped[Decimal] = mapped_column(ExactDecimal())
    destination_per_source: Mapped[Decimal] = mapped_column(ExactDecimal())
    source_amount: Mapped[Decimal] = mapped_column(ExactDecimal())
    destination_amount: Mapped[Decimal] = mapped_column(ExactDecimal())
    provider: Mapped[str] = mapped_column(String(32))
    observed_at: Mapped[datetime] = mapped_column(UTCDateTime())
