"""Alembic's environment: the URL comes from the service's settings, never from alembic.ini.

Run from the command line (`alembic upgrade head`) it opens its own async engine.
At start-up the service hands it a connection instead (`app.storage.engine.migrate`), so it
runs on the service's event loop rather than starting a second one.
"""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from app.settings import load_settings
from app.storage import models  # noqa: F401 - registers the tables on Base.metadata
from app.storage.engine import Base, create_engine

config = context.config
target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_engine(load_settings().database_url.get_secret_value(), timeout_s=None)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=load_settings().database_url.get_secret_value(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


shared_connection = config.attributes.get("connection")
if shared_connection is not None:
    run_migrations(shared_connection)
elif context.is_offline_mode():
    run_migrations_offline()
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(run_migrations_online())
