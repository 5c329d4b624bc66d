"""Fixtures on the real parts: PostgreSQL, Redis, SQLite files and the fake Flutterwave.

PostgreSQL: each test gets a database of its own, created empty and dropped after.
Redis: tests use DB number 9 only, flushed before and after each test that asks for it.
"""

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from app.main import create_app
from app.settings import Settings
from app.state import State
from app.storage.engine import create_engine, migrate
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.redis_server import RedisServer

pytest_plugins = ["tests.support.ws_service"]

POSTGRES_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@pytest.fixture
def fake() -> Iterator[FakeFlutterwave]:
    with FakeFlutterwave(slow_s=3.0) as server:
        yield server


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database, dropped on exit."""
    name = f"fxrates_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each kind the service runs on."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}"
    else:
        async with postgres_database() as url:
            yield url


@pytest.fixture
async def migrated_url(database_url: str) -> str:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
    return database_url


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    client = Redis.from_url(TEST_REDIS_URL)
    await client.flushdb()
    try:
        yield TEST_REDIS_URL
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
def make_settings(fake: FakeFlutterwave, sqlite_url: str) -> Callable[..., Settings]:
    """Settings for a test: the fake upstream, a fresh SQLite file, no poller, quick timeouts; then overrides."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "environment": "test",
            "database_url": sqlite_url,
            "redis_url": None,
            "flutterwave_secret_key": SECRET_KEY,
            "flutterwave_base_url": fake.url,
            "poller_enabled": False,
            "upstream_timeout_seconds": 1.0,
            "upstream_max_attempts": 3,
            # One address for every request: the limits are off or roomy unless a test sets them.
            "rate_limit_per_minute": 0,
            "ws_max_clients": 1_000_000,
            "ws_max_clients_per_address": 1_000_000,
            "ws_messages_per_second": 1_000_000,
            "ws_message_burst": 1_000_000,
            "on_demand_calls_per_minute": 100_000,
            "on_demand_max_pairs": 100_000,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, State]]:
    """The real app with its lifespan, and a client that talks to it in process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app) as yielded:
        state = cast(State, yielded)  # what app.main's lifespan yields

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            # What uvicorn does: each request sees a copy of the lifespan's state.
            scope["state"] = state.copy()
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://fxrates") as client:
            yield client, state


@pytest.fixture
def throwaway_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
