"""Who a client is (docs/limits.md): its address behind a trusted proxy, its IPv6 /64, the limiter's bounded
memory, `/metrics` only for `METRICS_ALLOW_IPS`, and `/readyz` probing at most once a second.

The proxy tests run a real uvicorn with `--proxy-headers --forwarded-allow-ips 127.0.0.1`: the test client
connects from 127.0.0.1, the trusted proxy, and sends the `X-Forwarded-For` chains a proxy would pass on.
"""

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from app.limits.addresses import address_key, limit_key
from app.limits.per_client import ClientLimiter
from app.limits.websocket import Admission, Refusal
from app.limits.windows import MovingWindow
from app.settings import Settings, describe_error
from tests.conftest import running_app
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.replicas import Replica
from tests.support.ws_client import WsClient

PROXY = ("--no-access-log", "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1")
ONE_64 = [f"2001:db8:1:2:{n:x}::{n}" for n in range(1, 7)]
ANOTHER_64 = "2001:db8:1:3::1"


# In process: the one function that decides the key.


def test_ipv4_counts_by_address_and_ipv6_by_its_64() -> None:
    assert address_key("203.0.113.5") == "203.0.113.5"
    assert address_key("::ffff:203.0.113.5") == "203.0.113.5"
    assert {address_key(address) for address in ONE_64} == {"2001:db8:1:2::/64"}
    assert address_key(f"[{ONE_64[0]}]") == "2001:db8:1:2::/64"
    assert address_key(ANOTHER_64) == "2001:db8:1:3::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert limit_key({"client": ("2001:db8:1:2::99", 5000)}) == "2001:db8:1:2::/64"
    assert limit_key({}) == "unknown"
    # A peer that is no IP address is counted by its text, cut short.
    assert address_key("x" * 10_000) == "x" * 100


def test_the_websocket_cap_counts_an_ipv6_64_as_one_address() -> None:
    refused = Counter("refused", "", ["limit"], registry=CollectorRegistry())
    admission = Admission(max_clients=100, max_per_address=2, refused=refused)
    with admission.admit(address_key(ONE_64[0])) as first, admission.admit(address_key(ONE_64[1])) as second:
        with admission.admit(address_key(ONE_64[2])) as third, admission.admit(address_key(ANOTHER_64)) as other:
            assert (first, second, third, other) == (None, None, Refusal.TOO_MANY_FROM_ADDRESS, None)


@pytest.mark.slow
async def test_a_flood_of_distinct_addresses_leaves_the_limiter_bounded_and_a_heavy_client_limited() -> None:
    refused = Counter("refused", "", ["limit"], registry=CollectorRegistry())
    bound = 100_000
    window = MovingWindow(None, None, max_memory_keys=bound)
    limiter = ClientLimiter(5, window, refused, max_clients=bound)
    heavy = "198.51.100.1"
    try:
        async with limiter.flushing():
            for _ in range(5):
                assert (await limiter.check(heavy)).allowed
            assert not (await limiter.check(heavy)).allowed
            flood = [f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}" for n in range(200_000)]
            for n, address in enumerate(flood):
                await limiter.check(address)
                if n % 1000 == 0:
                    # The heavy client keeps on asking through the flood, and is refused each time.
                    assert not (await limiter.check(heavy)).allowed
                    await asyncio.sleep(0)  # the flush task pushes the flood's hits into the window
            await asyncio.sleep(0.3)
            assert len(limiter._clients) <= bound
            assert window.memory_keys <= bound
            newest = flood[-bound // 2 :]
            assert all(address in limiter._clients for address in newest)
            assert flood[0] not in limiter._clients
            verdict = await limiter.check(heavy)
            assert not verdict.allowed and verdict.remaining == 0
            # A newcomer after the flood is served as any new client is.
            assert (await limiter.check("198.51.100.2")).allowed
    finally:
        await window.aclose()


# The setting.


def test_metrics_allow_ips_takes_addresses_and_networks() -> None:
    settings = Settings(_env_file=None, metrics_allow_ips=" 192.0.2.7 , 2001:db8::/32,10.0.0.0/8")  # type: ignore[call-arg]
    assert [str(network) for network in settings.metrics_allow_ips] == ["192.0.2.7/32", "2001:db8::/32", "10.0.0.0/8"]
    assert Settings(_env_file=None, metrics_allow_ips="").metrics_allow_ips == ()  # type: ignore[call-arg]
    default = Settings(_env_file=None)  # type: ignore[call-arg]
    assert [str(network) for network in default.metrics_allow_ips] == [
        "127.0.0.1/32",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ]


@pytest.mark.parametrize(
    ("value", "reason"),
    [("10.0.0.1/8", "has host bits set"), ("localhost", "does not appear"), ("10.0.0.0/33", "")],
)
def test_a_bad_metrics_allow_ips_entry_is_named(value: str, reason: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, metrics_allow_ips=f"127.0.0.1,{value}")  # type: ignore[call-arg]
    message = describe_error(raised.value)
    assert message.startswith(f"invalid configuration: METRICS_ALLOW_IPS has '{value}', which is no IP address")
    assert reason in message


# End to end, through a real uvicorn behind a "proxy" on 127.0.0.1.


def get(url: str, forwarded_for: str | None = None) -> tuple[int, Any]:
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            return response.status, body.decode() if b"# HELP" in body else json.loads(body)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, module_fake: FakeFlutterwave) -> Iterator[Replica]:
    folder: Path = tmp_path_factory.mktemp("proxied")
    replica = Replica(
        folder,
        uvicorn_args=PROXY,
        DATABASE_URL=f"sqlite+aiosqlite:///{folder / 'rates.db'}",
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=module_fake.url,
        POLLER_ENABLED="false",
        RATE_LIMIT_PER_MINUTE="3",
        WS_MAX_CLIENTS_PER_ADDRESS="2",
        METRICS_ALLOW_IPS="127.0.0.1,10.0.0.0/8",
    ).start()
    try:
        yield replica
    finally:
        replica.stop()


@pytest.fixture(scope="module")
def module_fake() -> Iterator[FakeFlutterwave]:
    with FakeFlutterwave() as fake:
        yield fake


RATE = "/api/rates?source_currency=USD&destination_currency=NGN"


def statuses(replica: Replica, forwarded_for: Callable[[int], str], count: int) -> list[int]:
    return [get(replica.url + RATE, forwarded_for(n))[0] for n in range(count)]


@pytest.mark.slow
def test_a_client_cannot_choose_its_address_by_sending_the_header(proxied: Replica) -> None:
    # Each request's left entry is the client's own invention; the right-most untrusted one is what the proxy saw.
    assert statuses(proxied, lambda n: f"192.0.2.{n}, 203.0.113.5", 4) == [200, 200, 200, 429]
    # A right-most entry that is itself a trusted proxy is skipped.
    assert statuses(proxied, lambda n: f"192.0.2.{n}, 203.0.113.6, 127.0.0.1", 4) == [200, 200, 200, 429]
    # And the left entries really were not the address: one of them, as the proxy's peer, is a new client.
    assert statuses(proxied, lambda n: "192.0.2.1", 1) == [200]


@pytest.mark.slow
def test_six_addresses_of_one_64_are_one_client_and_two_64s_two(proxied: Replica) -> None:
    assert statuses(proxied, lambda n: ONE_64[n], 6) == [200, 200, 200, 429, 429, 429]
    assert statuses(proxied, lambda n: ANOTHER_64, 1) == [200]
    # Mapped IPv4 and plain IPv4 are one client too.
    assert statuses(proxied, lambda n: ("::ffff:203.0.113.7", "203.0.113.7")[n % 2], 4) == [200, 200, 200, 429]


@pytest.mark.slow
async def test_the_websocket_cap_counts_a_64_as_one_address_through_the_proxy(proxied: Replica) -> None:
    def client(address: str) -> WsClient:
        return WsClient(proxied.ws_url, additional_headers={"X-Forwarded-For": address})

    async with client(ONE_64[0]) as first, client(ONE_64[1]) as second, client(ONE_64[2]) as third:
        assert (await first.recv())["type"] == "all_rates"
        assert (await second.recv())["type"] == "all_rates"
        with pytest.raises(ConnectionClosed) as closed:
            await third.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        async with client(ANOTHER_64) as other:
            assert (await other.recv())["type"] == "all_rates"


@pytest.mark.slow
def test_metrics_answers_only_the_allowed_addresses(proxied: Replica) -> None:
    status, body = get(proxied.url + "/metrics", "203.0.113.9")
    assert (status, body) == (404, {"status": "error", "message": "No such endpoint.", "data": None})
    status, body = get(proxied.url + "/metrics", "192.0.2.1, 10.1.2.3")
    assert status == 200 and "fxrates_http_requests_total" in body
    status, body = get(proxied.url + "/metrics")  # the proxy's own address, 127.0.0.1, asking for itself
    assert status == 200 and "fxrates_http_requests_total" in body
    assert get(proxied.url + "/metrics", "2001:db8::1")[0] == 404


# /readyz: a flood of it is not a flood of probes.


@pytest.mark.slow
async def test_a_flood_of_readyz_probes_redis_about_once_a_second(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    redis = Redis.from_url(redis_url)

    async def pings() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    try:
        async with running_app(make_settings(redis_url=redis_url)) as (client, state):
            before = await pings()
            loop = asyncio.get_running_loop()
            started = loop.time()
            answers = await asyncio.gather(*(client.get("/readyz") for _ in range(100)))
            for _ in range(100):
                answers.append(await client.get("/readyz"))
            elapsed_s = loop.time() - started
            probed = await pings() - before
            runs = state["services"].probes.runs
    finally:
        await redis.aclose()
    assert all(answer.status_code == 200 for answer in answers)
    assert answers[-1].json()["data"]["redis"] == "ok"
    # One probe a second at most, plus the one at the start: a handful, not 200.
    assert 1 <= probed <= elapsed_s + 2
    assert runs == probed
