"""The Flutterwave client against the fake server: orientation, malformed answers, retries, the limit."""

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from pydantic import SecretStr

from app.currencies import Pair
from app.kit.metrics import Metrics
from app.upstream.errors import MalformedQuote, RateLimited, UpstreamRejected, UpstreamUnavailable
from app.upstream.flutterwave import FlutterwaveClient, create_http_client, parse_retry_after
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave

USD_NGN = Pair("USD", "NGN")
AMOUNT = Decimal(1000)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def client(fake: FakeFlutterwave, metrics: Metrics) -> AsyncIterator[FlutterwaveClient]:
    async with create_http_client(fake.url, SecretStr(SECRET_KEY), 0.3, max_connections=4) as http:
        yield FlutterwaveClient(
            http,
            limiter=asyncio.Semaphore(4),
            max_attempts=3,
            calls=metrics.upstream_calls,
            backoff_initial_s=0.01,
            backoff_max_s=0.05,
        )


def calls(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("fxrates_upstream_calls_total", {"outcome": outcome})
    return value or 0.0


async def test_both_orientations_give_the_same_quote(fake: FakeFlutterwave, client: FlutterwaveClient) -> None:
    fake.set_rate(USD_NGN, Decimal("1530.25"))
    fake.orientation = "source_per_destination"
    first = await client.fetch(USD_NGN, AMOUNT)
    fake.orientation = "destination_per_source"
    second = await client.fetch(USD_NGN, AMOUNT)
    assert first == second
    assert first.destination_per_source == Decimal("1530.25")
    assert first.provider == "flutterwave"


@pytest.mark.parametrize(
    "kind",
    [
        "not_json",
        "status_error",
        "wrong_schema",
        "missing_amounts",
        "zero_amount",
        "negative_amount",
        "non_numeric",
        "inconsistent_rate",
        "wrong_currency",
    ],
)
async def test_malformed_answers_are_rejected_counted_and_not_retried(
    fake: FakeFlutterwave, client: FlutterwaveClient, metrics: Metrics, kind: str
) -> None:
    fake.fail(kind)
    with pytest.raises(MalformedQuote):
        await client.fetch(USD_NGN, AMOUNT)
    assert fake.calls[USD_NGN] == 1
    assert calls(metrics, "malformed") == 1


async def test_a_429_waits_its_retry_after(fake: FakeFlutterwave, client: FlutterwaveClient) -> None:
    fake.fail("429", retry_after=1, times=1)
    quote = await client.fetch(USD_NGN, AMOUNT)
    first, second = fake.call_times[USD_NGN]
    assert second - first >= 1.0
    assert quote.pair == USD_NGN


async def test_429_on_every_attempt_gives_rate_limited(fake: FakeFlutterwave, client: FlutterwaveClient) -> None:
    fake.fail("429", retry_after=0)
    with pytest.raises(RateLimited):
        await client.fetch(USD_NGN, AMOUNT)
    assert fake.calls[USD_NGN] == 3


@pytest.mark.parametrize("kind", ["500", "503", "timeout", "bad_gzip"])
async def test_server_errors_and_timeouts_are_retried(
    fake: FakeFlutterwave, client: FlutterwaveClient, metrics: Metrics, kind: str
) -> None:
    fake.fail(kind, times=2)
    quote = await client.fetch(USD_NGN, AMOUNT)
    assert quote.pair == USD_NGN
    assert fake.calls[USD_NGN] == 3
    assert calls(metrics, "success") == 1


async def test_a_hanging_upstream_gives_up_after_max_attempts(fake: FakeFlutterwave, client: FlutterwaveClient) -> None:
    fake.fail("hang")
    with pytest.raises(UpstreamUnavailable, match="timed out"):
        await client.fetch(USD_NGN, AMOUNT)
    assert fake.calls[USD_NGN] == 3


async def test_other_4xx_are_not_retried(fake: FakeFlutterwave, client: FlutterwaveClient, metrics: Metrics) -> None:
    fake.fail("400")
    with pytest.raises(UpstreamRejected, match="Unable to fetch rates"):
        await client.fetch(USD_NGN, AMOUNT)
    assert fake.calls[USD_NGN] == 1
    assert calls(metrics, "rejected") == 1


async def test_a_wrong_key_is_rejected_without_showing_the_key(fake: FakeFlutterwave, metrics: Metrics) -> None:
    wrong = "FLWSECK_TEST-wrong-key-X"
    async with create_http_client(fake.url, SecretStr(wrong), 1.0, max_connections=1) as http:
        client = FlutterwaveClient(http, limiter=asyncio.Semaphore(1), max_attempts=3, calls=metrics.upstream_calls)
        with pytest.raises(UpstreamRejected) as raised:
            await client.fetch(USD_NGN, AMOUNT)
        assert wrong not in str(raised.value)
        assert wrong not in repr(http.headers)
    assert fake.calls[USD_NGN] == 1


async def test_connection_refused_is_unavailable(metrics: Metrics) -> None:
    # A port that was just free: nothing listens there.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with create_http_client(f"http://127.0.0.1:{port}", SecretStr(SECRET_KEY), 1.0, max_connections=1) as http:
        client = FlutterwaveClient(
            http, limiter=asyncio.Semaphore(1), max_attempts=2, calls=metrics.upstream_calls, backoff_initial_s=0.01
        )
        with pytest.raises(UpstreamUnavailable, match="request failed"):
            await client.fetch(USD_NGN, AMOUNT)
    assert calls(metrics, "connection_error") == 2


async def test_the_concurrency_limit_holds_as_the_fake_sees_it(
    fake: FakeFlutterwave, client: FlutterwaveClient
) -> None:
    fake.latency_s = 0.05
    pairs = [
        Pair(source, destination) for source in ("USD", "GBP", "EUR", "CAD") for destination in ("NGN", "KES", "GHS")
    ]
    await asyncio.gather(*(client.fetch(pair, AMOUNT) for pair in pairs * 2))
    assert fake.max_in_flight == 4
    assert sum(fake.calls.values()) == 24


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (parse_retry_after(future) or 0) <= 31
