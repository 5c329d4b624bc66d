"""the rate guard: held_rates, values held for confirmation

Revision ID: 0004_rate_guard
Revises: 0003_keys_audit
Create Date: 2026-12-03 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.storage.engine

revision: str = "0004_rate_guard"
down_revision: str | None = "0003_keys_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "held_rates",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("source_currency", sa.String(length=3), nullable=False),
        sa.Column("destination_currency", sa.String(length=3), nullable=False),
        sa.Column("rate", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("destination_per_source", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("source_amount", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("destination_amount", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("received_at", app.storage.engine.UTCDateTime(), nullable=False),
        sa.Column("first_seen", app.storage.engine.UTCDateTime(), nullable=False),
        sa.Column("confirmations", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_held_rates")),
    )
    op.create_index("ix_held_rates_pair", "held_rates", ["source_currency", "destination_currency"], unique=True)


def downgrade() -> None:
    op.drop_table("held_rates")
