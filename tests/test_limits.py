"""The limits on what one anonymous client can cause (docs/limits.md), through the real app in process.

The on-demand budget and the per-client limit, counted at the fake upstream and
in real Redis; what happens when Redis goes away; the settings that size them;
the headers every answer carries. Replicas sharing them are in
tests/test_limits_replicas.py.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser
from typing import Any

import httpx
import pycountry
import pytest
from redis.asyncio import Redis

from app.api.board import WEB_DIR
from app.api.ws import MAX_PAIRS_PER_MESSAGE
from app.currencies import Pair
from app.errors import NotFound
from app.kit.metrics import Metrics
from app.limits.on_demand import OnDemandBudget
from app.limits.windows import MovingWindow
from app.settings import Settings, load_settings
from tests.conftest import TEST_REDIS_URL, running_app
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

USD_NGN = Pair("USD", "NGN")
POLLED = {"USD", "CAD", "GBP", "EUR", "XOF", "XAF", "EGP", "ETB", "GHS", "KES", "MAD", "NGN", "ZAR", "UGX", "ZMW"}


def unpolled_pairs(count: int, source: str = "USD") -> list[Pair]:
    """`count` distinct valid pairs outside the polled 44, `source` to currencies nobody polls."""
    codes = sorted(c.alpha_3 for c in pycountry.currencies if c.alpha_3 not in POLLED and c.alpha_3 != source)
    return [Pair(source, code) for code in codes[:count]]


def rate_url(pair: Pair) -> str:
    return f"/api/rates?source_currency={pair.source}&destination_currency={pair.destination}"


def metric(text: str, limit: str) -> float:
    name = f'fxrates_requests_refused_total{{limit="{limit}"}}'
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


def assert_envelope(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "error" and body["data"] is None and body["message"].endswith(".")
    return body


@pytest.fixture(params=["no-redis", "redis"])
async def maybe_redis(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """Each limit both ways: per process, and in the test Redis (flushed before and after)."""
    if request.param == "no-redis":
        yield None
        return
    client = Redis.from_url(TEST_REDIS_URL)
    await client.flushdb()
    try:
        yield TEST_REDIS_URL
    finally:
        await client.flushdb()
        await client.aclose()


# The on-demand budget


async def test_forty_unpolled_pairs_cost_at_most_the_budget_of_upstream_calls(
    maybe_redis: str | None, fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(redis_url=maybe_redis, on_demand_calls_per_minute=10)
    pairs = unpolled_pairs(40)
    async with running_app(settings) as (client, _):
        answers = await asyncio.gather(*(client.get(rate_url(pair)) for pair in pairs))
        metrics = (await client.get("/metrics")).text
    assert sum(fake.calls[pair] for pair in pairs) == 10
    assert sorted(answer.status_code for answer in answers) == [200] * 10 + [429] * 30
    for answer in answers:
        if answer.status_code == 429:
            assert_envelope(answer, 429)
            assert 1 <= int(answer.headers["retry-after"]) <= 60
    assert metric(metrics, "on_demand_budget") == 30


async def test_over_budget_a_stored_rate_is_served_stale_and_polled_pairs_never_wait(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(on_demand_calls_per_minute=1, rate_stale_after_seconds=0.3)
    stored, other = unpolled_pairs(2)
    async with running_app(settings) as (client, _):
        first = await client.get(rate_url(stored))
        refused = await client.get(rate_url(other))
        # The budget is spent; the stored pair turns stale, and is still served, without asking the upstream.

        async def stored_answer() -> httpx.Response:
            return await client.get(rate_url(stored))

        answer = await eventually(
            stored_answer, until=lambda answer: answer.json()["meta"]["stale"], what="the stored rate to turn stale"
        )
        # A polled pair is outside the budget, even with nothing of it stored yet.
        polled = await client.get(rate_url(USD_NGN))
    assert first.status_code == 200 and answer.status_code == 200
    assert_envelope(refused, 429)
    assert fake.calls[stored] == 1 and fake.calls[other] == 0
    assert polled.status_code == 200 and polled.json()["meta"]["served_from"] == "upstream"


async def test_no_more_than_the_pair_cap_of_other_pairs_is_stored(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    kept, new = unpolled_pairs(3)[:2], unpolled_pairs(3)[2]
    async with running_app(make_settings(on_demand_max_pairs=2)) as (client, state):
        assert [(await client.get(rate_url(pair))).status_code for pair in kept] == [200, 200]
        body = assert_envelope(await client.get(rate_url(new)), 429)
        again = await client.get(rate_url(kept[0]))
        stored = {rate.pair for rate in await state["services"].store.all()}
    assert "stores as many" in body["message"]
    assert fake.calls[new] == 0 and new not in stored and again.status_code == 200


def budget_for(settings: Settings) -> OnDemandBudget:
    """The deployment's on-demand rule as the service builds it, with nothing stored yet."""

    async def nothing_stored() -> list[Pair]:
        return []

    return OnDemandBudget(
        settings.pairs,
        settings.polled_currencies,
        settings.on_demand_currencies,
        calls_per_minute=settings.on_demand_calls_per_minute,
        max_pairs=settings.on_demand_max_pairs,
        window=MovingWindow(None, None),
        redis=None,
        stored_pairs=nothing_stored,
        refused=Metrics().refused,
    )


@pytest.mark.parametrize(
    ("listed", "pair", "served"),
    [
        ("", Pair("NGN", "GHS"), True),  # both polled destinations
        ("", Pair("NGN", "USD"), True),  # a polled destination and a polled source
        ("", Pair("GBP", "EUR"), True),  # both polled sources
        ("", Pair("USD", "JPY"), False),  # JPY is neither polled nor listed
        ("", Pair("JPY", "CHF"), False),
        ("JPY", Pair("USD", "JPY"), True),
        ("JPY", Pair("JPY", "NGN"), True),
        ("JPY", Pair("JPY", "CHF"), False),
        ("JPY,CHF", Pair("JPY", "CHF"), True),
        ("*", Pair("JPY", "CHF"), True),
    ],
    ids=str,
)
def test_a_pair_is_fetched_on_demand_when_each_currency_is_polled_or_listed(
    make_settings: Callable[..., Settings], listed: str, pair: Pair, served: bool
) -> None:
    budget = budget_for(make_settings(on_demand_currencies=listed))
    if served:
        budget.check_allowed(pair)
    else:
        with pytest.raises(NotFound) as refused:
            budget.check_allowed(pair)
        assert pair.source in str(refused.value) or pair.destination in str(refused.value)


async def test_on_demand_currencies_empty_still_fetches_pairs_of_polled_currencies(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    # NGN and GHS are both polled (as destinations), the pair is not: fetched on demand, as USD/NGN's reverse is.
    crossed = [Pair("NGN", "GHS"), Pair("NGN", "USD")]
    (other,) = unpolled_pairs(1)
    async with running_app(make_settings(on_demand_currencies="")) as (client, _):
        served = [await client.get(rate_url(pair)) for pair in crossed]
        refused = await client.get(rate_url(other))
        polled = await client.get(rate_url(USD_NGN))
    for answer, pair in zip(served, crossed, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["meta"]["served_from"] == "upstream"
        assert fake.calls[pair] == 1
    assert other.destination in assert_envelope(refused, 404)["message"]
    assert fake.calls[other] == 0
    assert polled.status_code == 200


async def test_on_demand_currencies_lists_what_may_be_fetched(
    fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings(on_demand_currencies="jpy, CHF")) as (client, _):
        allowed = [await client.get(rate_url(pair)) for pair in (Pair("USD", "JPY"), Pair("JPY", "CHF"))]
        refused = await client.get(rate_url(Pair("USD", "SEK")))
    assert [answer.status_code for answer in allowed] == [200, 200]
    assert "SEK" in assert_envelope(refused, 404)["message"]
    assert fake.calls[Pair("USD", "SEK")] == 0


# The per-client limit


async def test_the_per_client_limit_counts_every_api_answer_even_cached_ones(
    maybe_redis: str | None, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings(redis_url=maybe_redis, rate_limit_per_minute=5)) as (client, _):
        # The same URL each time: after the first, answers come from the micro-cache of finished answers.
        answers = [await client.get(rate_url(USD_NGN)) for _ in range(6)]
        other_address = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=client._transport.app, client=("192.0.2.7", 1)),  # type: ignore[attr-defined]
            base_url="http://fxrates",
        )
        async with other_address:
            elsewhere = await other_address.get(rate_url(USD_NGN))
        outside = await client.get("/healthz")
        metrics = (await client.get("/metrics")).text
    assert [answer.status_code for answer in answers] == [200] * 5 + [429]
    assert [answer.headers["ratelimit-remaining"] for answer in answers] == ["4", "3", "2", "1", "0", "0"]
    assert {answer.headers["ratelimit-limit"] for answer in answers} == {"5"}
    assert all(1 <= int(answer.headers["ratelimit-reset"]) <= 60 for answer in answers)
    refused = answers[-1]
    assert_envelope(refused, 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert elsewhere.status_code == 200 and elsewhere.headers["ratelimit-remaining"] == "4"
    assert outside.status_code == 200 and "ratelimit-limit" not in outside.headers
    assert metric(metrics, "per_client") == 1


async def test_errors_count_and_carry_the_headers_too(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(rate_limit_per_minute=2)) as (client, _):
        answers = [await client.get("/api/rates?source_currency=XYZ&destination_currency=NGN") for _ in range(3)]
    assert [answer.status_code for answer in answers] == [422, 422, 429]
    assert [answer.headers["ratelimit-remaining"] for answer in answers] == ["1", "0", "0"]


async def test_zero_turns_the_per_client_limit_off(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(rate_limit_per_minute=0)) as (client, _):
        answers = [await client.get(rate_url(USD_NGN)) for _ in range(30)]
    assert {answer.status_code for answer in answers} == {200}
    assert not any("ratelimit-limit" in answer.headers for answer in answers)


async def test_a_redis_outage_leaves_the_limits_working_per_process(
    throwaway_redis: RedisServer, fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(redis_url=throwaway_redis.url, rate_limit_per_minute=6, on_demand_calls_per_minute=2)
    before, during = unpolled_pairs(1), unpolled_pairs(4)[1:]
    async with running_app(settings) as (client, _):
        shared = [await client.get(rate_url(pair)) for pair in before]
        throwaway_redis.stop()
        # Counted in this process from now on: 2 more upstream calls, and 5 or 6 more requests (6 when the
        # process has already moved to its own count, which never saw the one before the outage).
        alone = [await client.get(rate_url(pair)) for pair in during]
        for _ in range(10):
            alone.append(answer := await client.get(rate_url(USD_NGN)))
            if answer.status_code == 429:
                break
    assert [answer.status_code for answer in shared] == [200]
    assert [answer.status_code for answer in alone[:3]] == [200, 200, 429]
    assert alone[2].json()["message"].startswith(f"{during[2]} is not polled")
    assert sum(fake.calls[pair] for pair in during) == 2
    assert {answer.status_code for answer in alone[3:-1]} == {200} and len(alone) in (6, 7)
    assert "Too many requests" in assert_envelope(alone[-1], 429)["message"]
    assert all(answer.headers["ratelimit-limit"] == "6" for answer in alone)


# Settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("on_demand_currencies", "USD,XYZ"),
        ("on_demand_currencies", "*,USD"),
        ("on_demand_calls_per_minute", "-1"),
        ("on_demand_calls_per_minute", "ten"),
        ("on_demand_max_pairs", "-5"),
        ("rate_limit_per_minute", "1.5"),
        ("ws_max_clients", "0"),
        ("ws_max_clients_per_address", "lots"),
        ("ws_messages_per_second", "0"),
        ("ws_message_burst", "-1"),
        ("ws_max_pairs_per_client", "0"),
    ],
)
def test_a_bad_limit_stops_start_up_in_one_line_naming_it(
    variable: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_settings(_env_file=None, **{variable: value})
    error = capsys.readouterr().err
    assert stopped.value.code == 2
    assert error.count("\n") == 1 and variable.upper() in error


def test_the_defaults_are_production_defaults() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.on_demand_currencies == ["*"]
    assert (settings.on_demand_calls_per_minute, settings.on_demand_max_pairs) == (10, 200)
    assert settings.rate_limit_per_minute == 1200
    assert (settings.ws_max_clients, settings.ws_max_clients_per_address) == (10000, 100)
    assert (settings.ws_messages_per_second, settings.ws_message_burst) == (10, 50)
    # What one message may name is the default cap (app.api.ws): a client reaches it in one subscribe.
    assert settings.ws_max_pairs_per_client == MAX_PAIRS_PER_MESSAGE == 256


# Headers


async def test_every_answer_carries_nosniff_and_the_board_its_policy(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings()) as (client, _):
        answers = {
            path: await client.get(path)
            for path in ("/", "/static/board.js", "/static/board.css", rate_url(USD_NGN), "/healthz", "/metrics")
        }
        answers["missing"] = await client.get("/nothing-here")
        answers["bad"] = await client.get("/api/rates")
        board = answers["/"]
    for path, answer in answers.items():
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["referrer-policy"] == "no-referrer", path
    policy = dict(part.strip().split(" ", 1) for part in board.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self' ws://fxrates wss://fxrates"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in board.headers["content-security-policy"]
    assert board.headers["x-frame-options"] == "DENY"


class _InlineFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style>")
        self.found += [f"{name}= on <{tag}>" for name in names if name == "style" or name.startswith("on")]


def test_the_board_has_no_inline_script_or_style() -> None:
    finder = _InlineFinder()
    finder.feed((WEB_DIR / "index.html").read_text())
    assert finder.found == []


async def test_a_budget_of_zero_fetches_nothing_on_demand(
    maybe_redis: str | None, fake: FakeFlutterwave, make_settings: Callable[..., Settings]
) -> None:
    (pair,) = unpolled_pairs(1)
    async with running_app(make_settings(redis_url=maybe_redis, on_demand_calls_per_minute=0)) as (client, _):
        refused = await client.get(rate_url(pair))
        polled = await client.get(rate_url(USD_NGN))
    assert_envelope(refused, 429)
    assert int(refused.headers["retry-after"]) == 60
    assert fake.calls[pair] == 0 and polled.status_code == 200
