"""The database going away (docs/outages.md), on a real uvicorn, with the real PostgreSQL behind a TCP proxy.

For each fault (connections cut, refused, or held open and silent), and for SQLite with its locks held by
another process: `/api/rates` answers every pair held, `/api/rates/all` and new WebSocket clients get the last
snapshot, history is a 503 with Retry-After, `/readyz` is a 503 naming the database, nothing is a 500 or left
unanswered, the log says it once, and it all comes back by itself. Afterwards, history holds every value a
WebSocket client was shown.

Requests use a deadline of GENEROUS_S, far above the 2 s design bound: it fails only a request that hangs,
it measures nothing.
"""

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from app.currencies import Pair
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

GENEROUS_S = 15.0
INTERVAL_S = 1.0
SOURCES = ("USD", "CAD", "GBP", "EUR")
POLLED = [
    f"{source}/{destination}"
    for source in SOURCES
    for destination in ("XOF", "XAF", "EGP", "ETB", "GHS", "KES", "MAD", "NGN", "ZAR", "UGX", "ZMW")
]
HELD_UNPOLLED = "USD/JPY"  # fetched on demand before the outage, so held
NEVER_HELD = "USD/CNY"


class Recorder:
    """A WebSocket client that keeps every value it was shown, pair by pair."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown: dict[str, set[Decimal]] = defaultdict(set)
        self.latest: dict[str, Decimal] = {}
        self.snapshots = 0
        self.task: asyncio.Task[None] | None = None

    def _take(self, item: dict[str, Any]) -> None:
        pair = f"{item['source_currency']}/{item['destination_currency']}"
        value = Decimal(str(item["destination_per_source"]))
        self.shown[pair].add(value)
        self.latest[pair] = value

    async def _run(self) -> None:
        async with connect(self.url, open_timeout=GENEROUS_S, max_queue=None) as websocket:
            async for frame in websocket:
                message = json.loads(frame)
                if message["type"] == "all_rates":
                    self.snapshots += 1
                    for item in message["rates"]:
                        self._take(item)
                elif message["type"] == "rate_update":
                    self._take(message["rate"])

    async def __aenter__(self) -> "Recorder":
        self.task = asyncio.create_task(self._run())
        await eventually(lambda: self.snapshots > 0, what="the recorder's first snapshot", timeout_s=30)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.task is not None
        assert not self.task.done(), f"the recorder's connection ended: {self.task}"
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def wait_for_status(http: httpx.AsyncClient, path: str, status: int, timeout_s: float = 30) -> httpx.Response:
    async def answer() -> httpx.Response:
        return await http.get(path)

    return await eventually(
        answer,
        until=lambda response: response.status_code == status,
        what=f"{path} to answer {status}",
        timeout_s=timeout_s,
        interval_s=0.1,
    )


def rate_query(pair: str) -> dict[str, str]:
    source, destination = pair.split("/")
    return {"source_currency": source, "destination_currency": destination}


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@contextlib.contextmanager
def proxied(database_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy in front of the database of `database_url`, and the URL that goes through it."""
    parts = urlsplit(database_url)
    assert parts.hostname is not None and parts.port is not None
    with TcpProxy(parts.hostname, parts.port) as proxy:
        through = database_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}", 1)
        yield proxy, through


@contextlib.contextmanager
def started(replica: Replica) -> Iterator[Replica]:
    replica.start()
    try:
        yield replica
    finally:
        replica.stop()


def service_env(fake: FakeFlutterwave, database_url: str, redis_url: str | None) -> dict[str, str]:
    env = {
        "DATABASE_URL": database_url,
        "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
        "FLUTTERWAVE_BASE_URL": fake.url,
        "POLL_INTERVAL_SECONDS": str(INTERVAL_S),
        "UPSTREAM_TIMEOUT_SECONDS": "1",
        "UPSTREAM_MAX_ATTEMPTS": "1",
    }
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return env


async def before_the_outage(http: httpx.AsyncClient, fake: FakeFlutterwave, recorder: Recorder) -> None:
    await eventually(lambda: len(recorder.latest) >= len(POLLED), what="every polled pair", timeout_s=GENEROUS_S * 2)
    response = await http.get("/api/rates", params=rate_query(HELD_UNPOLLED))
    assert response.status_code == 200, response.text
    moved = fake.bump(Pair("USD", "NGN"), Decimal("1.01"))
    await eventually(lambda: recorder.latest.get("USD/NGN") == moved, what="a move reaching the client", timeout_s=30)


async def rules_hold_while_away(
    http: httpx.AsyncClient, replica: Replica, held: list[str], redis_names: str = "database"
) -> None:
    """Every rule of docs/outages.md, checked once while the database cannot be reached."""
    ready = await http.get("/readyz")
    assert ready.status_code == 503
    for part in redis_names.split(","):
        assert part in ready.json()["message"], ready.json()

    for pair in held:
        response = await http.get("/api/rates", params=rate_query(pair))
        assert response.status_code == 200, (pair, response.text)
        meta = response.json()["meta"]
        assert meta["served_from"] in ("memory", "redis"), meta
        assert meta["stale"] is False, meta  # young rates: stale only once old

    never = await http.get("/api/rates", params=rate_query(NEVER_HELD))
    assert never.status_code == 503 and never.headers.get("retry-after"), never.text
    assert never.json() == {"status": "error", "message": never.json()["message"], "data": None}

    all_rates = await http.get("/api/rates/all", params={"base_currency": "USD"})
    assert all_rates.status_code == 200 and all_rates.json()["meta"]["count"] >= 11, all_rates.text

    history = await http.get("/api/rates/history", params=rate_query("USD/NGN"))
    assert history.status_code == 503 and history.headers.get("retry-after"), history.text
    assert history.json()["status"] == "error" and "database" in history.json()["message"]

    async with connect(replica.ws_url, open_timeout=GENEROUS_S) as websocket:
        snapshot = json.loads(await asyncio.wait_for(websocket.recv(), GENEROUS_S))
        assert snapshot["type"] == "all_rates" and len(snapshot["rates"]) >= len(POLLED), snapshot
        await websocket.send('{"type": "get_rate", "source_currency": "USD", "destination_currency": "CNY"}')
        reply = json.loads(await asyncio.wait_for(websocket.recv(), GENEROUS_S))
        while reply["type"] != "error":  # pushed frames may come first
            reply = json.loads(await asyncio.wait_for(websocket.recv(), GENEROUS_S))
        assert reply["code"] == "not_found"


async def back_by_itself(http: httpx.AsyncClient, fake: FakeFlutterwave, recorder: Recorder) -> None:
    await wait_for_status(http, "/readyz", 200)
    moved = fake.bump(Pair("EUR", "ZAR"), Decimal("1.02"))
    await eventually(
        lambda: recorder.latest.get("EUR/ZAR") == moved, what="a move stored after the return", timeout_s=30
    )
    assert (await http.get("/api/rates/history", params=rate_query("EUR/ZAR"))).status_code == 200


async def history_holds_everything_shown(http: httpx.AsyncClient, recorder: Recorder) -> None:
    for pair, shown in recorder.shown.items():
        response = await http.get("/api/rates/history", params={**rate_query(pair), "limit": "5000"})
        assert response.status_code == 200, response.text
        kept = {Decimal(str(point["destination_per_source"])) for point in response.json()["data"]["points"]}
        assert shown <= kept, f"{pair}: shown but not in history: {shown - kept}"


async def said_once_and_counted(http: httpx.AsyncClient, replica: Replica) -> None:
    log = replica.log()
    assert log.count("database unreachable") == 1, log
    assert log.count("database reachable again") == 1, log
    assert "Traceback" not in log and " ERROR " not in log, log
    text = (await http.get("/metrics")).text
    assert metric(text, "fxrates_database_errors_total") > 0
    assert metric(text, 'fxrates_stale_answers_total{reason="database"}') > 0
    assert 'status="500"' not in text


async def redis_forgets(redis_url: str, pair: str) -> None:
    """Until Redis's copy of `pair` has expired, so what is served is what the process itself held."""
    source, destination = pair.split("/")
    async with Redis.from_url(redis_url) as redis:
        await eventually(
            lambda: redis.exists(f"fxrates:rate:{source}:{destination}"),
            until=lambda held: not held,
            what=f"Redis's copy of {pair} to expire",
            timeout_s=GENEROUS_S,
            interval_s=0.1,
        )


FAULTS: dict[str, Callable[[TcpProxy], None]] = {
    "cut": TcpProxy.cut,
    "refused": TcpProxy.refuse,
    "hang": TcpProxy.hang,
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_postgresql_going_away(
    fault: str, fake: FakeFlutterwave, postgres_url: str, throwaway_redis: RedisServer, tmp_path: Path
) -> None:
    # A Redis of its own: pub/sub channels span every database number of a server, so a shared one would
    # carry other services' events.
    redis_url = throwaway_redis.url
    with (
        proxied(postgres_url) as (proxy, through),
        started(Replica(tmp_path, fault, **service_env(fake, through, redis_url))) as replica,
    ):
        async with (
            httpx.AsyncClient(base_url=replica.url, timeout=GENEROUS_S) as http,
            Recorder(replica.ws_url) as recorder,
        ):
            await before_the_outage(http, fake, recorder)
            FAULTS[fault](proxy)
            fake.bump(Pair("GBP", "KES"), Decimal("0.98"))  # moves while away: shown only once stored
            await wait_for_status(http, "/readyz", 503)
            await redis_forgets(redis_url, "USD/NGN")
            await rules_hold_while_away(http, replica, [*POLLED, HELD_UNPOLLED])
            proxy.restore()
            await back_by_itself(http, fake, recorder)
            await history_holds_everything_shown(http, recorder)
            await said_once_and_counted(http, replica)


async def test_redis_and_postgresql_away_together(
    fake: FakeFlutterwave, postgres_url: str, throwaway_redis: RedisServer, tmp_path: Path
) -> None:
    with (
        proxied(postgres_url) as (proxy, through),
        started(Replica(tmp_path, "both", **service_env(fake, through, throwaway_redis.url))) as replica,
    ):
        async with (
            httpx.AsyncClient(base_url=replica.url, timeout=GENEROUS_S) as http,
            Recorder(replica.ws_url) as recorder,
        ):
            await before_the_outage(http, fake, recorder)
            throwaway_redis.stop()
            proxy.refuse()
            proxy.cut()
            await wait_for_status(http, "/readyz", 503)
            await rules_hold_while_away(http, replica, [*POLLED, HELD_UNPOLLED], redis_names="database,redis")
            throwaway_redis.start()
            proxy.restore()
            await back_by_itself(http, fake, recorder)
            await history_holds_everything_shown(http, recorder)
            await said_once_and_counted(http, replica)


LOCKER = """
import fcntl, os, sys, time
# Every lock slot of SQLite's WAL index (bytes 120-127 of the -shm file), held as a stuck process would.
fd = os.open(sys.argv[1], os.O_RDWR)
while True:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 8, 120)
        break
    except OSError:
        time.sleep(0.005)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def locked_by_another_process(database: Path) -> Iterator[None]:
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, f"{database}-shm"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        yield
    finally:
        assert locker.stdin is not None and locker.stdout is not None
        locker.stdin.close()  # it exits, and the kernel drops its locks
        locker.wait(timeout=10)
        locker.stdout.close()


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    return tmp_path / "rates.db"


async def test_sqlite_locked_by_another_process(fake: FakeFlutterwave, sqlite_file: Path, tmp_path: Path) -> None:
    env = service_env(fake, f"sqlite+aiosqlite:///{sqlite_file}", None)
    with started(Replica(tmp_path, "sqlite", **env)) as replica:
        async with (
            httpx.AsyncClient(base_url=replica.url, timeout=GENEROUS_S) as http,
            Recorder(replica.ws_url) as recorder,
        ):
            await before_the_outage(http, fake, recorder)
            with locked_by_another_process(sqlite_file):
                fake.bump(Pair("GBP", "KES"), Decimal("0.98"))
                await wait_for_status(http, "/readyz", 503)
                await rules_hold_while_away(http, replica, [*POLLED, HELD_UNPOLLED])
            await back_by_itself(http, fake, recorder)
            await history_holds_everything_shown(http, recorder)
            await said_once_and_counted(http, replica)


# One bound per request, whatever it does (docs/outages.md): while the database hangs and before it is marked away
# (the probe takes up to a write's bound to decide), each request meets the hang once at most. Chaining two bounded
# waits (a read, then a refresh or a second read) takes twice the bound, so a margin of half a bound still tells
# one from two on a machine under load. A deadline on an event, not a benchmark.
DB_BOUND_S = 2.0  # DB_TIMEOUT_SECONDS, the default
MARGIN_S = 1.0


class Waits:
    """How long each request waited, by what it asked, while the database hung."""

    def __init__(self) -> None:
        self.waits: dict[str, list[float]] = defaultdict(list)

    async def time(self, what: str, request: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        await request()
        self.waits[what].append(time.monotonic() - started)

    def over(self, bound_s: float) -> dict[str, list[float]]:
        return {
            what: [round(s, 2) for s in waits if s > bound_s]
            for what, waits in self.waits.items()
            if max(waits) > bound_s
        }


async def ask_over_and_over(http: httpx.AsyncClient, replica: Replica, waits: Waits, until: asyncio.Event) -> None:
    """Every kind of request that meets the database, again and again, several at once, until `until` is set."""

    async def rest(what: str, path: str, params: dict[str, str]) -> None:
        async def request() -> None:
            response = await http.get(path, params=params)
            assert response.status_code in (200, 503), (what, response.status_code, response.text)

        await waits.time(what, request)

    async def snapshot() -> None:
        async def request() -> None:
            async with connect(replica.ws_url, open_timeout=GENEROUS_S) as websocket:
                message = json.loads(await asyncio.wait_for(websocket.recv(), GENEROUS_S))
                assert message["type"] == "all_rates", message

        await waits.time("websocket snapshot", request)

    async def again(request: Callable[[], Awaitable[None]]) -> None:
        while not until.is_set():
            await request()

    kinds: list[Callable[[], Awaitable[None]]] = [
        lambda: rest("/api/rates polled", "/api/rates", rate_query("USD/NGN")),
        lambda: rest("/api/rates polled", "/api/rates", rate_query("EUR/ZAR")),
        lambda: rest("/api/rates held on demand", "/api/rates", rate_query(HELD_UNPOLLED)),
        lambda: rest("/api/rates never held", "/api/rates", rate_query(NEVER_HELD)),
        lambda: rest("/api/rates/all", "/api/rates/all", {"base_currency": "USD"}),
        lambda: rest("/api/rates/all", "/api/rates/all", {"base_currency": "GBP"}),
        snapshot,
        snapshot,
    ]
    await asyncio.gather(*(again(request) for request in kinds))


@pytest.mark.slow
async def test_while_the_database_hangs_no_request_waits_more_than_one_bound(
    fake: FakeFlutterwave, postgres_url: str, throwaway_redis: RedisServer, tmp_path: Path
) -> None:
    # Rates turn stale a second after the hang begins: readers then hold a stale rate while the database hangs,
    # the case where a read and a refresh could be waited for one after the other.
    with (
        proxied(postgres_url) as (proxy, through),
        started(
            Replica(
                tmp_path,
                "one-bound",
                **service_env(fake, through, throwaway_redis.url),
                RATE_STALE_AFTER_SECONDS="1",
            )
        ) as replica,
    ):
        async with (
            httpx.AsyncClient(base_url=replica.url, timeout=GENEROUS_S) as http,
            Recorder(replica.ws_url) as recorder,
        ):
            await before_the_outage(http, fake, recorder)
            waits, done = Waits(), asyncio.Event()
            proxy.hang()
            asking = asyncio.create_task(ask_over_and_over(http, replica, waits, done))
            # The whole time the database hangs unnoticed, until the probe marks it away (each worker then ends
            # the round it is in).
            await wait_for_status(http, "/readyz", 503)
            done.set()
            await asking
            proxy.restore()
            await wait_for_status(http, "/readyz", 200)
    assert sum(len(taken) for taken in waits.waits.values()) >= 30, waits.waits
    assert not waits.over(DB_BOUND_S + MARGIN_S), waits.over(DB_BOUND_S + MARGIN_S)
