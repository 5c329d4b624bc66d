"""The tables (docs/design.md, "Data"). Created and changed by Alembic migrations only."""

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String
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
    # The sequence number of the pair's latest store (docs/design.md, "Sequence numbers").
    seq: Mapped[int] = mapped_column(BigInteger())


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
    # The sequence number of the store that recorded this value.
    seq: Mapped[int] = mapped_column(BigInteger())
    # For a manual value (provider `manual`): the name of the operator key that set it; None for fetched ones.
    actor: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RateSequence(Base):
    """One row: the deployment's epoch, and the last sequence number handed out (docs/design.md, "Sequence numbers").

    Every store batch takes its numbers by updating the row, which holds the row's lock until the batch commits:
    writers commit in the order of their numbers.
    """

    __tablename__ = "rate_sequence"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=False)
    # Random, made when the database was: it names this history, so a client never resumes across databases.
    epoch: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger())


class HeldRate(Base):
    """A fetched value the rate guard holds for confirmation, not stored (docs/operations.md, "The rate guard"): at
    most one per pair, the latest answer out of bounds. Kept in the database so every replica's poller counts the
    same confirmations, and a restart or a handover forgets none."""

    __tablename__ = "held_rates"
    __table_args__ = (Index("ix_held_rates_pair", "source_currency", "destination_currency", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    source_currency: Mapped[str] = mapped_column(String(3))
    destination_currency: Mapped[str] = mapped_column(String(3))
    rate: Mapped[Decimal] = mapped_column(ExactDecimal())
    destination_per_source: Mapped[Decimal] = mapped_column(ExactDecimal())
    source_amount: Mapped[Decimal] = mapped_column(ExactDecimal())
    destination_amount: Mapped[Decimal] = mapped_column(ExactDecimal())
    provider: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    """When the upstream gave the value held (the latest answer)."""
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    """When the first answer of this run out of bounds came."""
    confirmations: Mapped[int] = mapped_column(Integer())


class ApiKey(Base):
    """An operator's or integrator's API key: only its hash is kept (docs/operations.md, "Operators")."""

    __tablename__ = "api_keys"
    __table_args__ = (
        Index("ix_api_keys_name", "name", unique=True),
        Index("ix_api_keys_key_id", "key_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(16))
    """The key's first characters: not secret, shown by `list`, and what a presented key is looked up by."""
    key_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the whole key, hex."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditEntry(Base):
    """Append-only (the migration adds triggers refusing UPDATE and DELETE): one row per operator action."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    """The key's name, never the key."""
    action: Mapped[str] = mapped_column(String(64))
    pairs: Mapped[list[str]] = mapped_column(JSON())
    reason: Mapped[str] = mapped_column(String(500))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON(), nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON(), nullable=True)


class CorridorRow(Base):
    """A pair's corridor state, set by an operator (docs/operations.md, "Corridors"); no row: `active`."""

    __tablename__ = "corridors"
    __table_args__ = (Index("ix_corridors_pair", "source_currency", "destination_currency", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    source_currency: Mapped[str] = mapped_column(String(3))
    destination_currency: Mapped[str] = mapped_column(String(3))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(500))
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    """The key's name, never the key."""


class RateOverride(Base):
    """A manual rate's terms, one per pair, while `exchange_rates` holds that manual value.

    Written by the store in the transaction that stores the manual value, and deleted in the one that stores the
    next fetched value over it. `fetched_*` keep the last fetched value it replaced: what the rate guard compares
    with (docs/design.md, "Corridors and overrides").
    """

    __tablename__ = "rate_overrides"
    __table_args__ = (Index("ix_rate_overrides_pair", "source_currency", "destination_currency", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    source_currency: Mapped[str] = mapped_column(String(3))
    destination_currency: Mapped[str] = mapped_column(String(3))
    destination_per_source: Mapped[Decimal] = mapped_column(ExactDecimal())
    reason: Mapped[str] = mapped_column(String(500))
    actor: Mapped[str] = mapped_column(String(64))
    set_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    """Ended early (DELETE): set to the moment it was ended."""
    fetched_destination_per_source: Mapped[Decimal | None] = mapped_column(ExactDecimal(), nullable=True)
    fetched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
