"""The REST API through the real app: shapes, bad input, single flight, staleness, caching headers, outages."""

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from app.currencies import Pair
from app.rates.lookup import RateLookup
from app.settings import Settings
from app.state import State
from tests.conftest import running_app
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

USD_NGN = Pair("USD", "NGN")
USD_JPY = Pair("USD", "JPY")  # not among the polled 44


async def poll(state: State) -> None:
    report = await state["services"].poller.run_cycle()
    assert report.failed == 0


async def wait_until_stale(state: State, pair: Pair) -> None:
    lookup: RateLookup = state["services"].lookup
    (rate,) = [rate for rate in await state["services"].store.all() if rate.pair == pair]
    await eventually(lambda: lookup.is_stale(rate), what=f"the stored {pair} to turn stale", interval_s=0.02)


def rate_url(pair: Pair, **params: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"/api/rates?source_currency={pair.source}&destination_currency={pair.destination}&{query}"


async def test_a_rate_in_flutterwaves_shape(fake: FakeFlutterwave, make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings()) as (client, state):
        await poll(state)
        response = await client.get("/api/rates?source_currency=usd&destination_currency=ngn&amount=1000")
        body = response.json()
    assert response.status_code == 200
    assert body["status"] == "success" and body["message"] == "Transfer amount fetched"
    assert set(body["data"]) == {"rate", "source", "destination"}
    assert body["data"]["destination"] == {"currency": "NGN", "amount": 1000}
    assert Decimal(str(body["meta"]["destination_per_source"])) == fake.rate(USD_NGN) == Decimal("1530.25")
    rate = Decimal(str(body["data"]["rate"]))
    assert Decimal(str(body["data"]["source"]["amount"])) == rate * 1000
    assert body["data"]["source"]["currency"] == "USD"
    meta = body["meta"]
    assert meta["stale"] is False and meta["served_from"] == "memory" and meta["provider"] == "flutterwave"
    assert meta["last_updated"].endswith("Z") and 0 <= meta["age_seconds"] < 60


async def test_source_amount_gives_what_arrives(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings()) as (client, state):
        await poll(state)
        body = (await client.get(rate_url(USD_NGN, source_amount="100"))).json()
        default = (await client.get(rate_url(USD_NGN))).json()
    assert body["data"]["source"] == {"currency": "USD", "amount": 100}
    assert body["data"]["destination"] == {"currency": "NGN", "amount": 153025}
    assert default["data"]["destination"]["amount"] == 1
    assert default["data"]["source"]["amount"] == default["data"]["rate"]


BAD_QUERIES = [
    ("/api/rates?destination_currency=NGN", "source_currency"),
    ("/api/rates?source_currency=USD", "destination_currency"),
    ("/api/rates?source_currency=XYZ&destination_currency=NGN", "source_currency"),
    ("/api/rates?source_currency=US&destination_currency=NGN", "source_currency"),
    ("/api/rates?source_currency=USD&destination_currency=usd", "destination_currency"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=0", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=-5", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=lots", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=NaN", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=Infinity", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=1e400", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=1.000001", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&source_amount=0", "source_amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=5&source_amount=5", "source_amount"),
    ("/api/rates?source_currency=USD&destination_currency=JPY&amount=-1", "amount"),
    ("/api/rates/all?base_currency=XYZ", "base_currency"),
    ("/api/rates/all?destination_currencies=NGN,QQQ", "destination_currencies"),
    ("/api/rates/history?source_currency=USD&destination_currency=NGN&limit=0", "limit"),
    ("/api/rates/history?source_currency=USD&destination_currency=NGN&limit=5001", "limit"),
    ("/api/rates/history?source_currency=USD&destination_currency=NGN&since=yesterday", "since"),
    ("/api/rates/history?source_currency=USD&destination_currency=NGN&since=0", "since"),
    ("/api/rates/history?source_currency=USD&destination_currency=NGN&since=2026-01-02", "since"),
    (
        "/api/rates/history?source_currency=USD&destination_currency=NGN"
        "&since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
        "until",
    ),
    (
        "/api/rates/history?source_currency=USD&destination_currency=NGN&since=2026-01-01T00:00Z&at=2026-01-02T00:00Z",
        "at",
    ),
    ("/api/rates/history?source_currency=USD&destination_currency=NGN&limit=5.0", "limit"),
    ("/api/rates?source_currency=%20USD&destination_currency=NGN", "source_currency"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=1e3", "amount"),
    ("/api/rates?source_currency=USD&destination_currency=NGN&amount=%2B5", "amount"),
    ("/api/rates/all?destination_currencies=NGN,,KES", "destination_currencies"),
]


@pytest.mark.parametrize(("url", "field"), BAD_QUERIES)
async def test_bad_input_is_a_clear_422_and_changes_nothing(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings], url: str, field: str
) -> None:
    async with running_app(make_settings()) as (client, state):
        response = await client.get(url)
        stored = await state["services"].store.all()
    body = response.json()
    assert response.status_code == 422
    assert body["status"] == "error" and body["data"] is None
    assert field in body["message"]
    assert field in [error["field"] for error in body["errors"]]
    assert sum(fake.calls.values()) == 0, "bad input reached the upstream"
    assert stored == []


async def test_unknown_paths_and_methods_get_the_envelope(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings()) as (client, _):
        missing = await client.get("/api/nothing-here")
        wrong_method = await client.post(rate_url(USD_NGN))
    assert missing.status_code == 404 and missing.json() == {
        "status": "error",
        "message": "No such endpoint.",
        "data": None,
    }
    assert wrong_method.status_code == 405 and wrong_method.json()["status"] == "error"


async def test_fifty_requests_for_a_missing_pair_make_one_upstream_call(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    fake.latency_s = 0.2
    async with running_app(make_settings()) as (client, state):
        responses = await asyncio.gather(*(client.get(rate_url(USD_JPY, amount="100")) for _ in range(50)))
        stored = {rate.pair for rate in await state["services"].store.all()}
    assert [response.status_code for response in responses] == [200] * 50
    assert fake.calls[USD_JPY] == 1
    assert {response.json()["meta"]["served_from"] for response in responses} == {"upstream"}
    assert stored == {USD_JPY}, "an on-demand pair is stored like the others"


async def test_fifty_requests_for_a_stale_pair_make_one_upstream_call(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings(rate_stale_after_seconds=0.3)) as (client, state):
        await poll(state)
        await wait_until_stale(state, USD_NGN)
        fake.latency_s = 0.2
        moved = fake.bump(USD_NGN, Decimal("1.01"))
        responses = await asyncio.gather(*(client.get(rate_url(USD_NGN)) for _ in range(50)))
    assert fake.calls[USD_NGN] == 2  # the poll, then one refresh for all fifty
    for response in responses:
        meta = response.json()["meta"]
        assert meta["served_from"] == "upstream" and meta["stale"] is False
        assert Decimal(str(meta["destination_per_source"])) == moved


@pytest.mark.parametrize(
    "fault", ["500", "503", "429", "timeout", "hang", "not_json", "inconsistent_rate", "bad_gzip", "deep_json"]
)
async def test_a_stale_pair_is_served_stale_when_the_upstream_fails(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings], fault: str
) -> None:
    # One attempt: the retries' backoff (tests/test_flutterwave_client.py) would only add seconds here.
    settings = make_settings(rate_stale_after_seconds=0.3, upstream_timeout_seconds=0.3, upstream_max_attempts=1)
    async with running_app(settings) as (client, state):
        await poll(state)
        await wait_until_stale(state, USD_NGN)
        fake.fail(fault, retry_after=0)
        first = await client.get(rate_url(USD_NGN))
        second = await client.get(rate_url(USD_NGN))
    for response in (first, second):
        assert response.status_code == 200
        meta = response.json()["meta"]
        assert meta["stale"] is True
        assert Decimal(str(meta["destination_per_source"])) == Decimal("1530.25")
        assert response.headers["cache-control"] == "max-age=0"


@pytest.mark.slow  # it waits out the lookup's 5 s cool-down, as a client honouring Retry-After does
async def test_nothing_stored_and_a_failing_upstream_is_a_503_that_heals(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings(upstream_max_attempts=1)) as (client, _):
        fake.fail("503")
        failed = await client.get(rate_url(USD_JPY))
        calls_after_failure = fake.calls[USD_JPY]
        resting = await client.get(rate_url(USD_JPY))
        calls_while_resting = fake.calls[USD_JPY] - calls_after_failure
        fake.clear_faults()
        # Come back when told to, as a client honouring Retry-After does.
        await asyncio.sleep(int(failed.headers["retry-after"]))
        healed = await client.get(rate_url(USD_JPY))
    assert failed.status_code == 503
    assert failed.json()["status"] == "error" and "USD/JPY" in failed.json()["message"]
    assert 1 <= int(failed.headers["retry-after"]) <= 10
    assert resting.status_code == 503 and calls_while_resting == 0
    assert healed.status_code == 200 and healed.json()["meta"]["served_from"] == "upstream"


async def test_a_pair_the_upstream_refuses_rests_long(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    pair = Pair("USD", "CHF")
    fake.fail("400", pairs=[pair])
    async with running_app(make_settings()) as (client, _):
        refused = await client.get(rate_url(pair))
        again = await client.get(rate_url(pair))
    assert refused.status_code == again.status_code == 503
    assert fake.calls[pair] == 1, "a refused pair was asked for again at once"
    assert int(again.headers["retry-after"]) > 60


async def test_etag_and_cache_control(fake: FakeFlutterwave, make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(rate_stale_after_seconds=600)) as (client, state):
        await poll(state)
        first = await client.get(rate_url(USD_NGN, amount="1000"))
        etag = first.headers["etag"]
        again = await client.get(rate_url(USD_NGN, amount="1000"), headers={"If-None-Match": etag})
        other_amount = await client.get(rate_url(USD_NGN, amount="5"), headers={"If-None-Match": etag})
        fake.bump(USD_NGN, Decimal("1.01"))
        await poll(state)
        changed = await client.get(rate_url(USD_NGN, amount="1000"), headers={"If-None-Match": etag})
        everything = await client.get("/api/rates/all")
        everything_again = await client.get("/api/rates/all", headers={"If-None-Match": everything.headers["etag"]})
    assert etag.startswith('W/"')
    assert 590 <= int(first.headers["cache-control"].removeprefix("max-age=")) <= 600
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert other_amount.status_code == 200
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert everything_again.status_code == 304


@pytest.mark.parametrize(
    "path",
    [
        "/api/rates?source_currency=USD&destination_currency=NGN",
        "/api/rates/all",
        "/api/rates/history?source_currency=USD&destination_currency=NGN",
        "/healthz",
        "/readyz",
        "/metrics",
    ],
)
async def test_every_route_answers_with_and_without_a_trailing_slash(
    make_settings: Callable[..., Settings], path: str
) -> None:
    route, _, query = path.partition("?")
    async with running_app(make_settings()) as (client, state):
        await poll(state)
        bare = await client.get(path)
        slashed = await client.get(f"{route}/?{query}")
    assert bare.status_code == slashed.status_code == 200
    assert bare.headers["content-type"] == slashed.headers["content-type"]


async def test_all_rates_never_wait_on_the_upstream(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings()) as (client, state):
        await poll(state)
        fake.reset_counters()
        fake.fail("hang")
        everything = (await client.get("/api/rates/all?base_currency=usd")).json()
        some = (await client.get("/api/rates/all?base_currency=GBP&destination_currencies=kes,ngn,JPY")).json()
    assert sum(fake.calls.values()) == 0
    assert everything["data"]["base_currency"] == "USD" and everything["meta"]["count"] == 11
    assert set(everything["data"]["rates"]) == {
        "XOF",
        "XAF",
        "EGP",
        "ETB",
        "GHS",
        "KES",
        "MAD",
        "NGN",
        "ZAR",
        "UGX",
        "ZMW",
    }
    entry = everything["data"]["rates"]["NGN"]
    assert set(entry) == {
        "rate",
        "source",
        "destination",
        "destination_per_source",
        "last_updated",
        "stale",
        "provider",
    }
    assert some["meta"]["count"] == 2 and set(some["data"]["rates"]) == {"KES", "NGN"}


async def test_history_ranges_and_the_rate_at_a_moment(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings()) as (client, state):
        before_any = time.time()
        await poll(state)
        moments = []
        for _ in range(3):
            fake.bump(USD_NGN, Decimal("1.01"))
            await poll(state)
            moments.append(fake.rate(USD_NGN))
        base = "/api/rates/history?source_currency=USD&destination_currency=NGN"
        everything = (await client.get(base)).json()
        first_two = (await client.get(f"{base}&limit=2")).json()
        points = everything["data"]["points"]
        second_at = points[1]["at"]
        at_second = (await client.get(f"{base}&at={second_at}")).json()
        since_second = (await client.get(f"{base}&since={second_at}")).json()
        too_early = await client.get(f"{base}&at={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(before_any - 60))}")
    assert [Decimal(str(p["destination_per_source"])) for p in points] == [Decimal("1530.25"), *moments]
    assert [p["at"] for p in points] == sorted(p["at"] for p in points)
    assert first_two["meta"] == {"count": 2, "truncated": True, "at": None}
    assert at_second["data"]["points"] == [points[1]]
    assert since_second["meta"]["count"] == 3
    assert too_early.status_code == 404 and too_early.json()["status"] == "error"


async def test_answers_and_history_points_carry_the_seq_of_their_store(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings()) as (client, state):
        await poll(state)
        first = await client.get(rate_url(USD_NGN))
        await poll(state)  # the same value answered again: a store of its own, no new history point
        same = await client.get(rate_url(USD_NGN), headers={"If-None-Match": first.headers["etag"]})
        fake.bump(USD_NGN, Decimal("1.01"))
        await poll(state)
        moved = (await client.get(rate_url(USD_NGN))).json()["meta"]
        base = "/api/rates/history?source_currency=USD&destination_currency=NGN"
        points = (await client.get(base)).json()["data"]["points"]
        csv_lines = (await client.get(base, headers={"Accept": "text/csv"})).text.splitlines()
    seqs = [first.json()["meta"]["seq"], same.json()["meta"]["seq"], moved["seq"]]
    assert seqs == sorted(set(seqs)), seqs
    assert same.status_code == 200, "a new store is a new answer: its ETag changed"
    assert same.json()["meta"]["last_updated"] > first.json()["meta"]["last_updated"]
    assert [point["seq"] for point in points] == [seqs[0], seqs[2]]
    assert csv_lines[0].endswith(",seq") and [line.rsplit(",", 1)[1] for line in csv_lines[1:]] == [
        str(seqs[0]),
        str(seqs[2]),
    ]


async def test_a_redis_outage_serves_rates_and_readyz_names_redis(
    throwaway_redis: RedisServer, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(redis_url=throwaway_redis.url)
    async with running_app(settings) as (client, state):
        await poll(state)
        assert (await client.get("/readyz")).status_code == 200
        throwaway_redis.stop()
        served = [await client.get(rate_url(pair)) for pair in settings.pairs]
        everything = await client.get("/api/rates/all")
        # Probed at most once a second (docs/operations.md): the next probe names Redis.
        deadline = time.monotonic() + 10
        while (ready := await client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "/readyz still ready 10 s after Redis stopped"
            await asyncio.sleep(0.1)
        await poll(state)  # the poller keeps storing, though it cannot cache in Redis
    assert [response.status_code for response in served] == [200] * 44
    assert everything.status_code == 200 and everything.json()["meta"]["count"] == 11
    assert ready.status_code == 503
    assert "redis" in ready.json()["message"] and ready.json()["data"]["database"] == "ok"


async def test_a_restart_serves_every_stored_rate_at_once_from_the_database(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    settings = make_settings(redis_url=redis_url)
    async with running_app(settings) as (_, state):
        await poll(state)
        epoch, seq = state["services"].hub.epoch, state["services"].hub.latest_seq
    async with Redis.from_url(redis_url) as redis:
        await redis.flushdb()
    fake.fail("hang")
    fake.reset_counters()
    async with running_app(make_settings(redis_url=redis_url, poller_enabled=True)) as (client, state):
        served = await asyncio.gather(*(client.get(rate_url(pair)) for pair in settings.pairs))
        # The same history, Redis emptied or not: the same epoch, and the numbers go on from where they were.
        assert state["services"].hub.epoch == epoch and state["services"].hub.latest_seq == seq
    assert [response.status_code for response in served] == [200] * 44
    assert {response.json()["meta"]["served_from"] for response in served} == {"database"}
    assert {response.json()["meta"]["stale"] for response in served} == {False}
    # None of them went to the hanging upstream (a fresh stored rate is never refreshed): "database" and not
    # stale say so without a wall-clock bound, which a loaded machine breaks.


async def test_readyz_and_metrics(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings()) as (client, state):
        await poll(state)
        await client.get(rate_url(USD_NGN))
        await client.get(rate_url(USD_JPY))
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
    assert ready.status_code == 200 and ready.json()["data"] == {
        "database": "ok",
        "redis": "not configured",
        "poller": "disabled",
    }
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    for sample in (
        'fxrates_http_requests_total{route="/api/rates",status="200"} 2.0',
        'fxrates_upstream_calls_total{outcome="success"} 45.0',
        'fxrates_cache_lookups_total{layer="memory"} 1.0',
        'fxrates_cache_lookups_total{layer="upstream"} 1.0',
        "fxrates_poll_cycle_seconds_count 1.0",
    ):
        assert sample in text


async def test_cors_follows_the_setting(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(cors_allow_origins="https://app.example")) as (client, _):
        allowed = await client.get("/healthz", headers={"Origin": "https://app.example"})
        other = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


async def test_the_docs_document_every_endpoint_with_examples(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings()) as (client, _):
        spec = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
        redoc = await client.get("/redoc")
    assert docs.status_code == redoc.status_code == 200
    paths = spec["paths"]
    public = {"/api/rates", "/api/rates/all", "/api/rates/history", "/healthz", "/readyz", "/metrics", "/sse/rates"}
    corridor = "/api/admin/corridors/{source}/{destination}/"
    corridors = {corridor + action for action in ("pause", "withhold", "resume", "override")}
    held = {"/api/admin/held", "/api/admin/held/{source}/{destination}/accept"}
    held |= {"/api/admin/held/{source}/{destination}/reject"}
    admin = {"/api/admin/refresh", "/api/admin/audit", "/api/admin/corridors"} | corridors | held
    assert set(paths) == public | admin
    for path in ("/api/rates", "/api/rates/all", "/api/rates/history"):
        operation = paths[path]["get"]
        assert "422" in operation["responses"]
        for parameter in operation["parameters"]:
            assert parameter.get("examples") or parameter["schema"].get("default") is not None, (
                f"{path} {parameter['name']} has no example"
            )
    assert {"304", "503"} <= set(paths["/api/rates"]["get"]["responses"])
    assert "404" in paths["/api/rates/history"]["get"]["responses"]
