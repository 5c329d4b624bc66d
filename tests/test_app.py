"""The whole app on its embedded defaults, and start-up refusing bad configuration in one line."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.storage.engine import PROJECT_ROOT
from tests.conftest import running_app
from tests.support.waiting import eventually


def clean_env(**values: str) -> dict[str, str]:
    """The environment without any of the service's variables, then `values`."""
    names = set(Settings.model_fields) | {"FLUTTERWAVE_SECRET_KEY"}
    env = {key: value for key, value in os.environ.items() if key.lower() not in names}
    env.update(values)
    return env


async def test_demo_rates_for_all_44_pairs_with_no_key_and_no_redis(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        environment="development",
        database_url=f"sqlite+aiosqlite:///{tmp_path}/r.db",
        redis_url=None,
        flutterwave_secret_key=None,
        poll_interval_seconds=600,
    )
    async with running_app(settings) as (client, _):

        async def every_base() -> list[dict[str, Any]]:
            return [
                (await client.get(f"/api/rates/all?base_currency={base}")).json()
                for base in ("USD", "CAD", "GBP", "EUR")
            ]

        answers = await eventually(
            every_base,
            until=lambda answers: sum(answer["meta"]["count"] for answer in answers) == 44,
            what="the demo provider to fill all 44 pairs",
        )
        quote = (await client.get("/api/rates?source_currency=USD&destination_currency=NGN")).json()
    entries = [entry for answer in answers for entry in answer["data"]["rates"].values()]
    assert {entry["provider"] for entry in entries} == {"demo"}
    assert quote["meta"]["provider"] == "demo" and 1000 < quote["meta"]["destination_per_source"] < 2500


def start_up(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=PROJECT_ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow  # starts a Python process of its own
def test_production_without_a_key_fails_start_up_in_one_line(tmp_path: Path) -> None:
    for command in (["uvicorn", "app.main:app", "--port", "0"], ["app.poller", "--once"]):
        result = start_up(command, ENVIRONMENT="production", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/r.db")
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "FLUTTERWAVE_SECRET_KEY" in lines[0]
        assert "Traceback" not in result.stderr


@pytest.mark.slow  # starts a Python process of its own
def test_an_invalid_value_names_its_variable_and_never_echoes_the_key() -> None:
    result = start_up(
        ["app.poller", "--once"],
        POLL_INTERVAL_SECONDS="-5",
        UPSTREAM_CONCURRENCY="lots",
        FLUTTERWAVE_SECRET_KEY="FLWSECK-very-secret-X",
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "POLL_INTERVAL_SECONDS" in line and "UPSTREAM_CONCURRENCY" in line
    assert "very-secret" not in result.stderr


def test_the_key_is_never_in_a_repr() -> None:
    settings = Settings(_env_file=None, flutterwave_secret_key="FLWSECK-very-secret-X")  # type: ignore[call-arg]
    assert "very-secret" not in repr(settings) and "very-secret" not in str(settings.model_dump())


@pytest.mark.slow  # starts a Python process of its own
def test_currency_lists_are_comma_separated_and_checked() -> None:
    settings = Settings(_env_file=None, rates_source_currencies="usd, gbp", rates_destination_currencies="ngn")  # type: ignore[call-arg]
    assert [str(pair) for pair in settings.pairs] == ["USD/NGN", "GBP/NGN"]
    result = start_up(["app.poller", "--once"], RATES_DESTINATION_CURRENCIES="NGN,XYZ")
    assert result.returncode != 0 and "RATES_DESTINATION_CURRENCIES" in result.stderr and "XYZ" in result.stderr


def test_cache_ttl_defaults_to_twice_the_poll_interval() -> None:
    assert Settings(_env_file=None, poll_interval_seconds=30).cache_ttl_s == 60  # type: ignore[call-arg]
    assert Settings(_env_file=None, cache_ttl_seconds=5).cache_ttl_s == 5  # type: ignore[call-arg]
