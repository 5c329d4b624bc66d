"""Secrets never shown (docs/configuration.md): the Flutterwave key and the passwords inside `DATABASE_URL` and
`REDIS_URL` appear in no repr of the settings, no error about them, no answer and no log line, on a real uvicorn
whose database cannot be reached and whose Redis asks for a password."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.settings import Settings, describe_error
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, free_port
from tests.support.waiting import eventually_sync

pytestmark = pytest.mark.slow  # real servers

DATABASE_PASSWORD = "db-pass-5f3a9c"
REDIS_PASSWORD = "redis-pass-8e21d7"
SECRET_KEY = "FLWSECK_TEST-key-0b94e6"
SECRETS = (DATABASE_PASSWORD, REDIS_PASSWORD, SECRET_KEY)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret is shown: {text}"


def database_url(port: int) -> str:
    return f"postgresql+asyncpg://fxrates:{DATABASE_PASSWORD}@127.0.0.1:{port}/fxrates"


def test_the_settings_show_no_secret_in_repr_str_or_a_dump() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url(5432),
        redis_url=f"redis://:{REDIS_PASSWORD}@redis:6379/0",
        flutterwave_secret_key=SECRET_KEY,
    )
    for shown in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump())):
        assert_no_secret(shown)
    # Still there for the connections made with them.
    assert DATABASE_PASSWORD in settings.database_url.get_secret_value()
    assert settings.redis_url is not None and REDIS_PASSWORD in settings.redis_url.get_secret_value()


def test_a_bad_database_url_is_named_without_its_password() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, database_url=f"mysql://fxrates:{DATABASE_PASSWORD}@db/fxrates")  # type: ignore[call-arg]
    line = describe_error(refused.value)
    assert "DATABASE_URL" in line
    assert_no_secret(line)


@pytest.fixture
def redis_with_password() -> Iterator[RedisServer]:
    server = RedisServer(password=REDIS_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def readyz_once_settled(replica: Replica) -> httpx.Response:
    """/readyz once the database has been found away (the probe's first look takes a moment)."""
    return eventually_sync(
        lambda: httpx.get(f"{replica.url}/readyz", timeout=10),
        what="/readyz to find the database away",
        timeout_s=30,
        until=lambda response: "unreachable" in response.json()["data"].get("database", ""),
    )


@pytest.mark.parametrize("redis_password", [REDIS_PASSWORD, "wrong-" + REDIS_PASSWORD], ids=["right", "wrong"])
def test_a_start_with_the_database_away_shows_no_password(
    redis_password: str, redis_with_password: RedisServer, fake: FakeFlutterwave, tmp_path: Path
) -> None:
    # Nothing listens on the database's port; Redis answers, and asks for its password.
    replica = Replica(
        tmp_path,
        DATABASE_URL=database_url(free_port()),
        REDIS_URL=f"redis://:{redis_password}@127.0.0.1:{redis_with_password.port}/0",
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=fake.url,
        DB_AUTO_MIGRATE="false",
        POLL_INTERVAL_SECONDS="1",
    )
    replica.start()
    try:
        ready = readyz_once_settled(replica)
        rate = httpx.get(f"{replica.url}/api/rates?source_currency=USD&destination_currency=NGN", timeout=10)
        history = httpx.get(f"{replica.url}/api/rates/history?source_currency=USD&destination_currency=NGN")
    finally:
        replica.stop()
    assert ready.status_code == 503
    redis_state = ready.json()["data"]["redis"]
    if redis_password == REDIS_PASSWORD:
        assert redis_state == "ok", ready.text  # the password in REDIS_URL is the one Redis asks for
    else:
        assert redis_state != "ok", ready.text
    assert rate.status_code == 503 and history.status_code == 503
    log = replica.log()
    assert "database unreachable" in log, log
    for shown in (ready.text, rate.text, history.text, log):
        assert_no_secret(shown)
    assert redis_password not in log and redis_password not in ready.text
