"""Migrations: `alembic upgrade head` from an empty database gives exactly the models, on both databases."""

import os
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import DBAPIError

from app.storage import models  # noqa: F401 - registers the tables
from app.storage.engine import PROJECT_ROOT, Base, create_engine, migrate


def alembic(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow  # alembic as a process of its own, on both databases
def test_alembic_upgrade_then_check_is_clean(database_url: str) -> None:
    upgrade = alembic(database_url, "upgrade", "head")
    assert upgrade.returncode == 0, upgrade.stderr
    check = alembic(database_url, "check")
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    downgrade = alembic(database_url, "downgrade", "base")
    assert downgrade.returncode == 0, downgrade.stderr


def _schema_diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_start_up_migration_runs_on_the_running_loop_and_is_idempotent(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)  # a second replica, or a restart: nothing left to do
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_diff) == []
            assert {
                "exchange_rates",
                "exchange_rate_history",
                "api_keys",
                "audit_log",
                "alembic_version",
            } <= await connection.run_sync(_tables)
    finally:
        await engine.dispose()


async def test_the_audit_log_refuses_update_and_delete(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO audit_log (at, actor, action, pairs, reason) "
                    "VALUES (CURRENT_TIMESTAMP, 'ops', 'refresh', '[]', 'a test')"
                )
            )
        for statement in ("UPDATE audit_log SET reason = 'rewritten'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match="append-only"):
                async with engine.begin() as connection:
                    await connection.execute(text(statement))
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT reason FROM audit_log"))).scalars().all() == ["a test"]
    finally:
        await engine.dispose()


async def test_rows_stored_before_numbering_get_numbers_and_the_counter_starts_above_them(database_url: str) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import bindparam, text

    from app.storage.engine import UTCDateTime

    assert alembic(database_url, "upgrade", "0001").returncode == 0
    columns = "source_currency, destination_currency, rate, destination_per_source, source_amount, destination_amount"
    values = "'USD', :destination, '0.001', '1000', '1', '1000', 'flutterwave'"
    at_utc = bindparam("at", type_=UTCDateTime())
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            for destination, at in (("NGN", 10), ("KES", 9)):
                moment = {"destination": destination, "at": datetime(2026, 1, 1, at, tzinfo=UTC)}
                await connection.execute(
                    text(
                        f"INSERT INTO exchange_rate_history ({columns}, provider, observed_at) VALUES ({values}, :at)"
                    ),
                    moment,
                )
                await connection.execute(
                    text(
                        f"INSERT INTO exchange_rates ({columns}, provider, last_updated, created_at) "
                        f"VALUES ({values}, :at, :at)"
                    ).bindparams(at_utc),
                    moment,
                )
        upgrade = alembic(database_url, "upgrade", "head")
        assert upgrade.returncode == 0, upgrade.stderr
        async with engine.connect() as connection:
            history = (
                await connection.execute(text("SELECT destination_currency, seq FROM exchange_rate_history"))
            ).all()
            current = (await connection.execute(text("SELECT destination_currency, seq FROM exchange_rates"))).all()
            counter = (await connection.execute(text("SELECT seq FROM rate_sequence"))).scalar_one()
    finally:
        await engine.dispose()
    # In the order stored: history first, then each pair's current row, above its own history.
    assert sorted(history, key=lambda row: row[1]) == [("KES", 1), ("NGN", 2)]
    assert sorted(current, key=lambda row: row[1]) == [("KES", 3), ("NGN", 4)]
    assert counter == 4
