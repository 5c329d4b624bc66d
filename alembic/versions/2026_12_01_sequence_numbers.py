"""sequence numbers: a seq on every stored rate and history point, the rate_sequence row with the epoch

Rows stored before numbering get numbers in the order they were stored: history
points by (observed_at, id) first, then the current rows by (last_updated, id),
so a pair's current row is never numbered below its own history. No client
holds a number from before, so any order consistent within each pair would do.
The counter starts above them all. The epoch is made by the database itself,
at random, so a SQL script rendered offline still gives each database its own.

Revision ID: 0002_sequence_numbers
Revises: 0001
Create Date: 2026-12-01 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_sequence_numbers"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Both dialects run these as written (SQLite has had UPDATE ... FROM since 3.33 and window functions since 3.25).
NUMBER_HISTORY = """
UPDATE exchange_rate_history SET seq = numbered.n
FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY observed_at, id) AS n FROM exchange_rate_history) AS numbered
WHERE exchange_rate_history.id = numbered.id
"""
NUMBER_CURRENT = """
UPDATE exchange_rates SET seq = numbered.n + (SELECT count(*) FROM exchange_rate_history)
FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY last_updated, id) AS n FROM exchange_rates) AS numbered
WHERE exchange_rates.id = numbered.id
"""
# 128 random bits as 32 hex digits: no `:` (docs/websocket.md).
RANDOM_EPOCH = {
    "postgresql": "replace(gen_random_uuid()::text, '-', '')",
    "sqlite": "lower(hex(randomblob(16)))",
}
START_SEQUENCE = """
INSERT INTO rate_sequence (id, epoch, seq)
SELECT 1, {epoch}, (SELECT count(*) FROM exchange_rate_history) + (SELECT count(*) FROM exchange_rates)
"""


def upgrade() -> None:
    op.create_table(
        "rate_sequence",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("epoch", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_sequence")),
    )
    for table in ("exchange_rates", "exchange_rate_history"):
        op.add_column(table, sa.Column("seq", sa.BigInteger(), nullable=True))
    op.execute(NUMBER_HISTORY)
    op.execute(NUMBER_CURRENT)
    op.execute(START_SEQUENCE.format(epoch=RANDOM_EPOCH[op.get_context().dialect.name]))
    for table in ("exchange_rates", "exchange_rate_history"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)


def downgrade() -> None:
    for table in ("exchange_rate_history", "exchange_rates"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("seq")
    op.drop_table("rate_sequence")
