"""initial schema: exchange_rates and exchange_rate_history

Revision ID: 0001
Revises:
Create Date: 2026-11-25 12:35:15.135209+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.storage.engine

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _rate_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("source_currency", sa.String(length=3), nullable=False),
        sa.Column("destination_currency", sa.String(length=3), nullable=False),
        sa.Column("rate", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("destination_per_source", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("source_amount", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("destination_amount", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "exchange_rates",
        *_rate_columns(),
        sa.Column("last_updated", app.storage.engine.UTCDateTime(), nullable=False),
        sa.Column("created_at", app.storage.engine.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exchange_rates")),
    )
    op.create_index(
        "ix_exchange_rates_pair", "exchange_rates", ["source_currency", "destination_currency"], unique=True
    )
    op.create_index("ix_exchange_rates_last_updated", "exchange_rates", ["last_updated"])

    op.create_table(
        "exchange_rate_history",
        *_rate_columns(),
        sa.Column("observed_at", app.storage.engine.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exchange_rate_history")),
    )
    op.create_index(
        "ix_exchange_rate_history_pair_observed_at",
        "exchange_rate_history",
        ["source_currency", "destination_currency", "observed_at"],
    )


def downgrade() -> None:
    op.drop_table("exchange_rate_history")
    op.drop_table("exchange_rates")
