"""corridors: corridor states, manual rate overrides, the actor of a manual history point

Revision ID: 0005_corridors
Revises: 0004_rate_guard
Create Date: 2026-12-04 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.storage.engine

revision: str = "0005_corridors"
down_revision: str | None = "0004_rate_guard"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "corridors",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("source_currency", sa.String(length=3), nullable=False),
        sa.Column("destination_currency", sa.String(length=3), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("since", app.storage.engine.UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corridors")),
    )
    op.create_index("ix_corridors_pair", "corridors", ["source_currency", "destination_currency"], unique=True)
    op.create_table(
        "rate_overrides",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("source_currency", sa.String(length=3), nullable=False),
        sa.Column("destination_currency", sa.String(length=3), nullable=False),
        sa.Column("destination_per_source", app.storage.engine.ExactDecimal(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("set_at", app.storage.engine.UTCDateTime(), nullable=False),
        sa.Column("expires_at", app.storage.engine.UTCDateTime(), nullable=False),
        sa.Column("fetched_destination_per_source", app.storage.engine.ExactDecimal(), nullable=True),
        sa.Column("fetched_at", app.storage.engine.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_overrides")),
    )
    op.create_index(
        "ix_rate_overrides_pair", "rate_overrides", ["source_currency", "destination_currency"], unique=True
    )
    with op.batch_alter_table("exchange_rate_history") as batch:
        batch.add_column(sa.Column("actor", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exchange_rate_history") as batch:
        batch.drop_column("actor")
    op.drop_table("rate_overrides")
    op.drop_table("corridors")
