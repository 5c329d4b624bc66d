"""`/metrics` as an operator reads it: durations by route, upstream latency by outcome, the age of each polled
pair, the poller's role, the dependencies' state; and Prometheus's own linter finds nothing to say."""

import asyncio
import shutil
import subprocess
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.currencies import Pair
from app.settings import Settings
from tests.conftest import running_app
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_request_durations_by_route_with_static_files_under_their_own_label(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as (client, _):
        assert (
            await client.get("/api/rates", params={"source_currency": "USD", "destination_currency": "NGN"})
        ).is_success
        assert (await client.get("/static/board.css")).status_code == 200
        assert (await client.get("/no/such/page")).status_code == 404
        found = samples(await scrape(client))
    for route in ("/api/rates", "/static", "unmatched"):
        assert value(found, "fxrates_http_request_duration_seconds_count", route=route) == 1, route
        assert value(found, "fxrates_http_request_duration_seconds_bucket", route=route, le="+Inf") == 1
    assert value(found, "fxrates_http_requests_total", route="/static", status="200") == 1
    assert not any(
        name.startswith("fxrates_http_request") and ("route", "/static/board.css") in labels for name, labels in found
    )


async def test_upstream_call_durations_by_outcome(
    make_settings: Callable[..., Settings], fake: FakeFlutterwave
) -> None:
    fake.fail("503", pairs=[Pair("USD", "KES")], times=1)
    async with running_app(make_settings(upstream_max_attempts=2)) as (client, _):
        answer = await client.get("/api/rates", params={"source_currency": "USD", "destination_currency": "KES"})
        assert answer.status_code == 200
        found = samples(await scrape(client))
    assert value(found, "fxrates_upstream_call_duration_seconds_count", outcome="server_error") == 1
    assert value(found, "fxrates_upstream_call_duration_seconds_count", outcome="success") == 1
    assert (value(found, "fxrates_upstream_call_duration_seconds_sum", outcome="success") or 0) > 0


async def test_age_of_each_polled_pair_poller_role_and_dependencies(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    settings = make_settings(
        redis_url=redis_url,
        poller_enabled=True,
        rates_source_currencies="USD",
        rates_destination_currencies="NGN,KES",
    )
    async with running_app(settings) as (client, _):
        # The first cycle starts at once; wait for it to be stored.

        async def usd_kes_age() -> float | None:
            return value(samples(await scrape(client)), "fxrates_rate_age_seconds", pair="USD/KES")

        await eventually(
            usd_kes_age,
            until=lambda age: age is not None,
            what="an age for USD/KES after the first poll cycle",
            timeout_s=20,
        )
        # A pair fetched on demand is not polled, so it has no age to watch.
        await client.get("/api/rates", params={"source_currency": "GBP", "destination_currency": "JPY"})
        text = await scrape(client)
    found = samples(text)
    await promtool_check(text)
    for pair in ("USD/NGN", "USD/KES"):
        age = value(found, "fxrates_rate_age_seconds", pair=pair)
        assert age is not None and 0 <= age < settings.rate_stale_after_seconds
    assert value(found, "fxrates_rate_age_seconds", pair="GBP/JPY") is None
    assert value(found, "fxrates_poller_role", role="leading") == 1
    assert value(found, "fxrates_poller_role", role="standby") == 0
    assert value(found, "fxrates_dependency_up", dependency="database") == 1
    assert value(found, "fxrates_dependency_up", dependency="redis") == 1


async def test_redis_down_shows_in_the_metrics(
    make_settings: Callable[..., Settings], throwaway_redis: RedisServer
) -> None:
    async with running_app(make_settings(redis_url=throwaway_redis.url)) as (client, _):
        assert value(samples(await scrape(client)), "fxrates_dependency_up", dependency="redis") == 1
        throwaway_redis.stop()
        # Dependencies are probed at most once a second (docs/operations.md): the next probe notices.
        deadline = asyncio.get_running_loop().time() + 10
        while value(found := samples(await scrape(client)), "fxrates_dependency_up", dependency="redis") != 0:
            assert asyncio.get_running_loop().time() < deadline, "Redis still reported up 10 s after it stopped"
            await asyncio.sleep(0.1)
        assert value(found, "fxrates_dependency_up", dependency="database") == 1


async def test_promtool_finds_nothing_wrong_with_a_live_scrape(
    make_settings: Callable[..., Settings], fake: FakeFlutterwave
) -> None:
    fake.fail("429", pairs=[Pair("USD", "GHS")], times=1, retry_after=0)
    async with running_app(make_settings()) as (client, _):
        await client.get("/api/rates", params={"source_currency": "USD", "destination_currency": "GHS"})
        await client.get("/static/board.js")
        text = await scrape(client)
    assert "fxrates_upstream_call_duration_seconds_bucket" in text
    await promtool_check(text)


async def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (tools/test.sh does)"
    result = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )
