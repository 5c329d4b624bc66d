"""The database: metadata with a naming convention, lossless column types, engine, sessions, migrations.

SQLite has no decimal type, and SQLAlchemy's Numeric on SQLite goes through a
float and silently loses digits; `ExactDecimal` stores text there and NUMERIC
on PostgreSQL, so a rate comes back digit for digit on both. `UTCDateTime`
hands back aware UTC datetimes on both, though SQLite keeps no zone.

The service's engine is bounded: connecting, waiting for a pooled connection
and each statement give up (see `create_engine`), so a database that refuses,
cuts or stops answering costs a caller a bounded time (docs/outages.md).
Migrations take turns across processes: a PostgreSQL advisory lock, or on
SQLite a lock file beside the database, so several workers or replicas
starting together do not migrate at once.
"""

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from filelock import AsyncFileLock
from sqlalchemy import URL, Connection, DateTime, Dialect, MetaData, Numeric, String, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator, TypeEngine

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Any fixed number: replicas starting together take turns at migrating.
MIGRATION_LOCK_ID = 0x66787261746573
# What a caller may wait on the database (DB_TIMEOUT_SECONDS): connect, pool checkout, one statement.
DEFAULT_TIMEOUT_S = 2.0
# How many times DB_TIMEOUT_SECONDS a write may take (SQLite writers queue for the file).
WRITE_FACTOR = 5
# Unbounded engines (migrations, the alembic command) still give up on a lock held this long.
UNBOUNDED_BUSY_S = 60.0

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def is_sqlite(database_url: str | URL) -> bool:
    """Whether the URL names SQLite rather than PostgreSQL: asked here alone, of the URL, by everything that
    builds something different for each (engines, the writer, the migration lock). Code holding a connection
    or a dialect asks that instead (`dialect.name`): it is what SQLAlchemy is compiling for at that moment."""
    return make_url(database_url).get_backend_name() == "sqlite"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ExactDecimal(TypeDecorator[Decimal]):
    """A decimal kept exactly: NUMERIC on PostgreSQL, text on SQLite."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(64))
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ValueError(f"ExactDecimal takes a finite Decimal, not {value!r}")
        return format(value, "f") if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC timestamp on every database; a naive datetime is refused rather than guessed at."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs an aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def create_engine(
    database_url: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S, pooled: bool = True
) -> AsyncEngine:
    """An engine whose waits are bounded (docs/outages.md); `timeout_s=None` for migrations, which may wait their turn.

    Connecting gives up after `timeout_s`. Waiting for a pooled connection, a statement (on the client and on
    the server) and, on SQLite, the busy timeout give up after a write's bound, `WRITE_FACTOR` times that: a
    write may queue behind another's lock on a busy machine. Readers are held to `timeout_s` by
    `app.storage.health.DatabaseHealth.call`; these inner bounds are what winds down work it abandoned.
    `pooled=False` opens a connection per use: the health probe's, so a busy pool is never taken for an outage.
    """
    options: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if is_sqlite(database_url):
        # Readers never wait on the busy timeout in WAL mode; writers queue on it.
        busy_s = timeout_s * WRITE_FACTOR if timeout_s is not None else UNBOUNDED_BUSY_S
        if pooled:
            options["pool_timeout"] = busy_s
        engine = create_async_engine(database_url, connect_args={"timeout": busy_s}, **options)
        event.listen(engine.sync_engine, "connect", sqlite_pragmas(busy_s))
        return engine
    if pooled:
        options.update(pool_pre_ping=True, pool_size=10, max_overflow=10)
    if timeout_s is None:
        return create_async_engine(database_url, **options)
    write_s = timeout_s * WRITE_FACTOR
    if pooled:
        options["pool_timeout"] = write_s
    return create_async_engine(
        database_url,
        connect_args={
            "timeout": timeout_s,  # connecting
            "command_timeout": write_s,  # each statement, on the client
            # ...and on the server, so a query the client gave up on does not run on.
            "server_settings": {"statement_timeout": str(int(write_s * 1000))},
        },
        **options,
    )


def sqlite_pragmas(busy_s: float) -> Callable[[Any, Any], None]:
    """What every SQLite connection of the service sets first (a "connect" event listener)."""

    def set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # Set first: switching to WAL takes a lock, and another worker may be doing the same.
        cursor.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
        # WAL lets readers read while a writer writes; concurrent writers wait up to the busy timeout.
        cursor.execute("PRAGMA journal_mode=WAL")
        # synchronous=NORMAL: in WAL mode the log is synced at checkpoints rather than at every commit.
        # A crash of the process loses nothing, an OS crash or power cut may lose the last commits; a
        # commit then costs microseconds, not a disk flush inside every rate's latency
        # (docs/decisions/0008-sqlite-wal-and-checkpoints.md).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return set_pragmas


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    config = alembic_config()
    # env.py runs on this connection instead of opening its own event loop.
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _lock_file(engine: AsyncEngine) -> Path | None:
    """The lock file beside an SQLite database file (None for PostgreSQL or an in-memory database)."""
    url = engine.url
    if not is_sqlite(url) or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).with_name(Path(url.database).name + ".lock")


async def migrate(engine: AsyncEngine) -> None:
    """Apply pending Alembic migrations on the running event loop, one process at a time."""
    lock_file = _lock_file(engine)
    if lock_file is None:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade)
        return
    # SQLite has no advisory lock: `uvicorn --workers N` starts N processes migrating one file at once.
    async with AsyncFileLock(lock_file, timeout=UNBOUNDED_BUSY_S), engine.begin() as connection:
        await connection.run_sync(_upgrade)
