"""The limits of docs/limits.md on real uvicorn processes: shared by replicas on one Redis, and on WebSockets.

Clients of a test bind their own loopback addresses (127.0.0.2, 127.0.0.3, ...)
so that each is a distinct client address to the service, as on a network.
"""

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.currencies import Pair
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient, is_update_for
from tests.test_limits import USD_NGN, metric, rate_url, unpolled_pairs

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow


def client_from(address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=address), timeout=10)


def start_pair(folder: Path, fake: FakeFlutterwave, database_url: str, redis_url: str, **env: str) -> list[Replica]:
    shared = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
        "FLUTTERWAVE_BASE_URL": fake.url,
        "UPSTREAM_MAX_ATTEMPTS": "1",
        **env,
    }
    replicas: list[Replica] = []
    try:
        for name in ("a", "b"):
            replicas.append(Replica(folder, name, **shared).start())
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


@pytest.fixture
def stop_after() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()


async def test_two_replicas_share_the_on_demand_budget_and_the_refused_pairs(
    fake: FakeFlutterwave, postgres_url: str, redis_url: str, tmp_path: Path, stop_after: list[Replica]
) -> None:
    refused, *pairs = unpolled_pairs(7)
    fake.fail("400", pairs=[refused])
    a, b = start_pair(tmp_path, fake, postgres_url, redis_url, ON_DEMAND_CALLS_PER_MINUTE="5")
    stop_after += [a, b]
    async with client_from("127.0.0.2") as client:
        # The upstream refuses the pair on A: B does not ask it again.
        refusals = [await client.get(replica.url + rate_url(refused)) for replica in (a, b)]
        # One call spent; four more are left for the whole deployment, whichever replica asks.
        answers = [await client.get((a, b)[i % 2].url + rate_url(pair)) for i, pair in enumerate(pairs)]
    assert [answer.status_code for answer in refusals] == [503, 503]
    assert fake.calls[refused] == 1
    assert [answer.status_code for answer in answers] == [200] * 4 + [429] * 2
    assert sum(fake.calls[pair] for pair in pairs) == 4
    assert all("retry-after" in answer.headers for answer in answers[4:])


async def test_two_replicas_share_the_pair_cap_and_the_per_client_limit(
    fake: FakeFlutterwave, postgres_url: str, redis_url: str, tmp_path: Path, stop_after: list[Replica]
) -> None:
    p1, p2, p3 = unpolled_pairs(3)
    a, b = start_pair(tmp_path, fake, postgres_url, redis_url, ON_DEMAND_MAX_PAIRS="2", RATE_LIMIT_PER_MINUTE="8")
    stop_after += [a, b]
    async with client_from("127.0.0.2") as client:
        stored = [await client.get(a.url + rate_url(p1)), await client.get(b.url + rate_url(p2))]
        over_cap = [await client.get(replica.url + rate_url(p3)) for replica in (a, b)]
    async with client_from("127.0.0.3") as client:
        on_a = [await client.get(a.url + "/api/rates/all") for _ in range(9)]
        await hits_in_redis(redis_url, "127.0.0.3", 8)
        # B never saw this client before: it reads the deployment's count, which A's answers filled.
        on_b = await client.get(b.url + "/api/rates/all")
        # A forwarded address from a peer the server does not trust changes nothing.
        forged = await client.get(b.url + "/api/rates/all", headers={"X-Forwarded-For": "198.51.100.9"})
    async with client_from("127.0.0.1") as proxy:
        # 127.0.0.1 is uvicorn's default FORWARDED_ALLOW_IPS: it speaks for the address it forwards.
        forwarded = await proxy.get(b.url + "/api/rates/all", headers={"X-Forwarded-For": "198.51.100.9"})
    assert [answer.status_code for answer in stored] == [200, 200]
    assert [answer.status_code for answer in over_cap] == [429, 429] and fake.calls[p3] == 0
    assert [answer.status_code for answer in on_a] == [200] * 8 + [429]
    assert [answer.headers["ratelimit-remaining"] for answer in on_a] == list("765432100")
    assert on_b.status_code == 429 and forged.status_code == 429
    assert forwarded.status_code == 200 and forwarded.headers["ratelimit-remaining"] == "7"


async def hits_in_redis(redis_url: str, address: str, hits: int, timeout_s: float = 10) -> None:
    """Until the per-client window for `address` holds `hits` in Redis (replicas push theirs in the background)."""
    redis = Redis.from_url(redis_url)

    async def held() -> int:
        keys = [key async for key in redis.scan_iter(match=f"*{address}*")]
        return int(await redis.llen(keys[0])) if keys else 0

    try:
        await eventually(
            held,
            until=lambda count: count >= hits,
            what=f"Redis to hold {hits} hits for {address}",
            timeout_s=timeout_s,
        )
    finally:
        await redis.aclose()


# WebSocket


@pytest.fixture
def ws_capped(fake: FakeFlutterwave, tmp_path: Path) -> Iterator[Replica]:
    with replica_on_sqlite(
        tmp_path,
        fake,
        POLL_INTERVAL_SECONDS="0.3",
        WS_MAX_CLIENTS="3",
        WS_MAX_CLIENTS_PER_ADDRESS="2",
        # The production defaults, which the other tests' one-address settings turn up.
        WS_MESSAGES_PER_SECOND="10",
        WS_MESSAGE_BURST="50",
        ON_DEMAND_CURRENCIES="JPY",
        ON_DEMAND_CALLS_PER_MINUTE="1",
    ) as replica:
        yield replica


async def refused_with(client: WsClient) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def drain(client: WsClient) -> tuple[list[dict[str, Any]], int]:
    """Every message until the server closes, and its close code."""
    messages: list[dict[str, Any]] = []
    while True:
        try:
            messages.append(await client.recv())
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return messages, closed.rcvd.code


async def test_websocket_caps_and_the_message_limit_leave_a_good_client_served(
    ws_capped: Replica, fake: FakeFlutterwave
) -> None:
    url = ws_capped.ws_url
    kinds = ("rate", "error")
    async with (
        WsClient(url, local_addr=("127.0.0.2", 0)) as good,
        WsClient(url, local_addr=("127.0.0.2", 0)) as second,
        WsClient(url, local_addr=("127.0.0.2", 0)) as third_from_address,
        WsClient(url, local_addr=("127.0.0.3", 0)) as flooder,
        WsClient(url, local_addr=("127.0.0.4", 0)) as fifth_in_all,
    ):
        assert (await good.recv())["type"] == "all_rates"
        assert (await second.recv())["type"] == "all_rates"
        assert await refused_with(third_from_address) == 1013
        assert (await flooder.recv())["type"] == "all_rates"
        assert await refused_with(fifth_in_all) == 1013

        for _ in range(300):
            await flooder.send({"type": "ping"})
        messages, code = await drain(flooder)

        # The well-behaved client on the same process keeps its pongs and its updates.
        assert (await good.ask({"type": "ping"}, "pong"))["type"] == "pong"
        fake.bump(Pair("USD", "NGN"), Decimal("1.01"))
        await good.recv_until(is_update_for("USD/NGN"))

        # get_rate for pairs outside the polled set obeys the same rules as REST.
        on_demand = [
            await good.ask({"type": "get_rate", "source_currency": source, "destination_currency": "JPY"}, kinds)
            for source in ("USD", "EUR")
        ]
        not_allowed = await good.ask(
            {"type": "get_rate", "source_currency": "USD", "destination_currency": "CHF"}, kinds
        )

    assert on_demand[0]["type"] == "rate" and on_demand[0]["rate"]["destination_currency"] == "JPY"
    assert on_demand[1]["type"] == "error" and on_demand[1]["code"] == "try_again_later"
    assert not_allowed["type"] == "error" and not_allowed["code"] == "not_found"
    assert fake.calls[Pair("USD", "JPY")] == 1 and fake.calls[Pair("EUR", "JPY")] == 0
    assert fake.calls[Pair("USD", "CHF")] == 0
    # Frames still queued when the server closes are not sent, so only the close is certain, and the counts.
    assert code == 1008
    pongs = [message for message in messages if message["type"] == "pong"]
    errors = [message for message in messages if message["type"] == "error"]
    assert pongs and len(pongs) + len(errors) < 300
    assert {error["code"] for error in errors} <= {"rate_limited"}
    async with client_from("127.0.0.1") as client:
        metrics = (await client.get(ws_capped.url + "/metrics")).text
    assert metric(metrics, "ws_per_address") == 1 and metric(metrics, "ws_clients") == 1
    assert metric(metrics, "ws_messages") > 50


@pytest.fixture
def ws_budgeted(fake: FakeFlutterwave, tmp_path: Path) -> Iterator[Replica]:
    replica = Replica(
        tmp_path,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}",
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=fake.url,
        POLL_INTERVAL_SECONDS="0.3",
        WS_MAX_PAIRS_PER_CLIENT="3",
        RATE_LIMIT_PER_MINUTE="6",
    ).start()
    try:
        # Waited for over the WebSocket: REST requests would spend the budget the tests measure.
        deadline = time.monotonic() + 20
        while True:
            with connect(replica.ws_url) as snapshot:
                if len(json.loads(snapshot.recv(10))["rates"]) >= 44:
                    break
            assert time.monotonic() < deadline, replica.log()
            time.sleep(0.05)
        yield replica
    finally:
        replica.stop()


async def test_a_subscribe_past_the_pair_cap_is_refused_and_changes_nothing(
    ws_budgeted: Replica, fake: FakeFlutterwave
) -> None:
    async with WsClient(ws_budgeted.ws_url, local_addr=("127.0.0.2", 0)) as client:
        await client.recv()  # the snapshot
        subscribed = await client.ask(
            {"type": "subscribe", "pairs": ["USD/NGN", "GBP/KES"], "min_change_bps": 0}, "subscribed"
        )
        assert subscribed["pairs"] == ["GBP/KES", "USD/NGN"]
        refused = await client.ask(
            {"type": "subscribe", "pairs": ["EUR/GHS", "CAD/ZAR"], "min_change_bps": 99, "batch": True},
            ("subscribed", "error"),
        )
        assert refused["type"] == "error" and refused["code"] == "too_many_pairs"
        assert "at most 3 pairs" in refused["message"]
        # Too many in one message, whatever the cap: a bad request.
        many = await client.ask({"type": "subscribe", "pairs": ["USD/NGN"] * 257}, ("subscribed", "error"))
        assert many["code"] == "bad_request" and many["message"].startswith("pairs:")
        # Its pairs, its threshold and its frames are as they were: single updates of what it followed.
        fake.bump(Pair("USD", "NGN"), Decimal("1.01"))
        update = await client.recv_until(lambda message: message["type"] in ("rate_update", "rates_update"))
        assert update[0]["type"] == "rate_update"
        same = await client.ask({"type": "subscribe", "pairs": ["USD/NGN", "EUR/GHS"]}, "subscribed")
        assert same == {"type": "subscribed", "pairs": ["EUR/GHS", "GBP/KES", "USD/NGN"], "min_change_bps": 0}
        everything = await client.ask({"type": "subscribe", "pairs": ["*"]}, "subscribed")
        assert everything["pairs"] == ["*"]


async def test_get_rate_and_rest_requests_spend_one_budget_per_address(ws_budgeted: Replica) -> None:
    get_rate = {"type": "get_rate", "source_currency": "USD", "destination_currency": "NGN"}
    async with (
        client_from("127.0.0.3") as rest,
        WsClient(ws_budgeted.ws_url, local_addr=("127.0.0.3", 0)) as client,
        WsClient(ws_budgeted.ws_url, local_addr=("127.0.0.4", 0)) as other,
    ):
        await client.recv()
        await other.recv()
        assert [(await rest.get(ws_budgeted.url + rate_url(USD_NGN))).status_code for _ in range(3)] == [200] * 3
        answers = [await client.ask(get_rate, ("rate", "error")) for _ in range(4)]
        assert [answer["type"] for answer in answers] == ["rate", "rate", "rate", "error"]
        assert answers[3]["code"] == "rate_limited" and "a minute" in answers[3]["message"]
        # Spent for REST too; the connection stays open; another address has its own budget.
        refused = await rest.get(ws_budgeted.url + rate_url(USD_NGN))
        assert refused.status_code == 429 and refused.headers["ratelimit-remaining"] == "0"
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}
        assert (await other.ask(get_rate, ("rate", "error")))["type"] == "rate"
    async with client_from("127.0.0.1") as local:
        metrics = (await local.get(ws_budgeted.url + "/metrics")).text
    assert metric(metrics, "per_client") == 2
