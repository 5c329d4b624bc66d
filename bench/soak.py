"""Soak: two replicas on PostgreSQL and Redis under load and faults; then check that nothing was lost.

Everything runs on loopback and is stopped by its own PID: the project's fake
Flutterwave (changing rates every few seconds; 20 % 5xx, bursts of 429 with
Retry-After, timeouts and hangs), a throw-away redis-server, two uvicorn
replicas sharing a fresh PostgreSQL database behind a TCP proxy, WebSocket
clients spread over both (a few of them slow readers; the others resume with
`?epoch=E&seq=N` after a disconnection, on the reference client's board,
clients/fxrates_client.py), and steady REST load from wrk. During the run
Redis is restarted twice, the polling replica is killed with SIGKILL once and
started again, and PostgreSQL is cut off for 20 s (scaled with --duration:
connections aborted, new ones refused). Then the faults stop, the rates
settle, and it checks:

  no 5xx; every REST answer sampled carries a value the upstream really gave;
  every client holds the final value of every pair, the upstream's and
  history's latest; no client of a replica that was never killed lost its
  connection, and every client of the killed one did; history holds every
  change a poll saw (but what was fetched while the database was away, which
  is never stored nor shown), with no duplicate points, and every value any
  client was shown; no stored rate lost; slow readers closed, the others not;
  replica memory at the end within 10 % of where it was after warm-up; the
  poller handed over within one lock TTL (plus one interval); while the
  database was away, /readyz named it, history answered 503 with Retry-After
  and a new client got its snapshot; each replica said so in one line when it
  went and one when it came back.

It reports, per replica, how many clients stayed connected, how many
reconnections were answered with `resumed` and how many with the snapshot
(`resumed: false`), and every disconnection and failed attempt, grouped by how
it ended (the close code and which side sent it, or reset, EOF, silence, open
timeout, refused) and when (seconds after the last of the scenario's events:
the kill, a Redis restart, the database's cut-off or return, ...). An attempt
that never had its first frame is not a disconnection.

Run from the repository root (needs wrk: apt-get install wrk):

    python -m bench.soak                    # 5 minutes, 1,000 clients
    python -m bench.soak --duration 60      # the short mode the test suite runs
"""

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
from redis import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, WebSocketException

from app.currencies import Pair
from clients.fxrates_client import RatesClient
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, wait_for_rates
from tests.support.stalled_ws import StalledClient
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import Timeout, eventually

POSTGRES_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
POLL_INTERVAL_S = 2.0
LOCK_TTL_S = 4.0
SETTLE_S = 4 * POLL_INTERVAL_S
MEMORY_TOLERANCE = 0.10
# wrk paces each connection so the REST load is steady rather than all the CPU this 2-core machine has.
WRK_SCRIPT = "function delay() return 20 end\n"
# The PostgreSQL outage in the 5-minute run; shorter runs scale it with their duration.
DATABASE_OUTAGE_S = 20.0
FULL_DURATION_S = 300.0
# The reference client's rule (clients/fxrates_client.py): two heartbeat intervals (WS_HEARTBEAT_SECONDS, 25 s by
# default) without a frame is a dead connection.
SILENCE_S = 2 * 25.0
LEASE_KEY = "fxrates:poller:lock"  # app.ingest.schedule.SharedSchedule's default prefix


@dataclass
class Disconnection:
    """A connection that had its first frame and then ended, or an attempt that never got one."""

    replica: str
    at: float  # monotonic
    how: str  # "close 1012 (...)" from the server, "client closed 1011 (...)", "reset", "EOF", "silence", ...


@dataclass
class Client:
    replica: Replica
    name: str = ""  # the replica's name, "a" or "b"
    slow: bool = False
    # The reference client's board and resume URL (clients/fxrates_client.py); the soak runs its own loop around
    # them, to see how each connection ends.
    follower: RatesClient | None = None
    connections: int = 0  # connections that had their first frame
    snapshots: int = 0
    updates: int = 0
    resumed: int = 0  # reconnections answered with `resumed`
    not_resumed: int = 0  # reconnections answered with the snapshot (`resumed: false`)
    disconnections: list[Disconnection] = field(default_factory=list)
    failed_attempts: list[Disconnection] = field(default_factory=list)
    cut_off: bool = False
    closed_code: int | None = None
    shown: dict[str, set[Decimal]] = field(default_factory=dict)  # shared by every client: all values shown

    @property
    def state(self) -> dict[str, Decimal]:
        board = self.follower.board.rates if self.follower is not None else {}
        return {pair: Decimal(str(item["destination_per_source"])) for pair, item in board.items()}


@dataclass
class Figures:
    rest_sampled: int = 0
    rest_bad_values: list[str] = field(default_factory=list)
    rest_5xx: int = 0
    handover_s: float | None = None
    handovers: int = 0
    wrk_requests: int = 0
    outage: tuple[float, float] | None = None  # monotonic start and end of the database outage
    outage_lines: dict[int, tuple[int, int]] = field(default_factory=dict)  # port: (went, returned) log lines
    events: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, what): the scenario's timeline
    killed: str | None = None  # the name of the replica killed
    problems: list[str] = field(default_factory=list)


async def read_client(client: Client) -> None:
    """Follow the client's replica until cancelled, resuming after each disconnection as the reference client does.

    Every way a connection ends is recorded (client.disconnections), and every attempt that never got its first
    frame (client.failed_attempts): a client is "reconnected" only when a connection it had really ended.
    """
    assert client.follower is not None
    while True:
        connected = False
        try:
            async with connect(client.follower.resume_url(), open_timeout=10, max_queue=None) as connection:
                while True:
                    # The reference client's rule: two heartbeat intervals without a frame is a dead connection.
                    async with asyncio.timeout(SILENCE_S):
                        text = await connection.recv()
                    frame = json.loads(text, parse_float=Decimal)
                    client.follower.board.apply(frame)
                    if not connected:
                        connected = True
                        client.connections += 1
                        if client.connections > 1:
                            if frame.get("type") == "resumed":
                                client.resumed += 1
                            else:
                                client.not_resumed += 1
                    apply(client, frame)
        except (OSError, TimeoutError, WebSocketException) as error:
            ended = Disconnection(client.name, time.monotonic(), how_it_ended(error, connected))
            (client.disconnections if connected else client.failed_attempts).append(ended)
        await asyncio.sleep(0.5 + random.random())


def apply(client: Client, frame: dict[str, Any]) -> None:
    """Count the frame and note every value it shows."""
    kind = frame.get("type")
    items: list[dict[str, Any]] = []
    if kind in ("all_rates", "resumed"):
        client.snapshots += kind == "all_rates"
        items = frame["rates"]
    elif kind == "rate_update":
        items = [frame["rate"]]
    elif kind == "rates_update":
        items = frame["rates"]
    if kind in ("rate_update", "rates_update"):
        client.updates += len(items)
    for item in items:
        pair = f"{item['source_currency']}/{item['destination_currency']}"
        client.shown.setdefault(pair, set()).add(Decimal(str(item["destination_per_source"])))


def how_it_ended(error: BaseException, connected: bool) -> str:
    """The close code when there was one (and which side sent it first), else what the socket said."""
    if isinstance(error, ConnectionClosed):
        if error.rcvd is not None and (error.sent is None or error.rcvd_then_sent):
            return f"close {error.rcvd.code} ({error.rcvd.reason or 'no reason'})"
        if error.sent is not None:
            return f"client closed {error.sent.code} ({error.sent.reason or 'no reason'})"
        cause = error.__cause__
        return "reset" if isinstance(cause, ConnectionResetError) else f"EOF{f' ({cause!r})' if cause else ''}"
    if isinstance(error, InvalidStatus):
        return f"handshake answered {error.response.status_code}"
    if isinstance(error, TimeoutError):
        return "silence" if connected else "open timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError):
        return "reset"
    return type(error).__name__


async def slow_reader(client: Client, stop: asyncio.Event) -> None:
    """Asks for everything again and again and never reads: the server must cut it off, not wait for it."""
    stalled = StalledClient("127.0.0.1", client.replica.port)
    try:
        await stalled.connect()
        # About 25 MB of answers: more than the kernel's socket buffers (about 4 MB) and the outbox bound.
        await stalled.send('{"type": "get_all_rates"}', times=2000)
    except OSError:
        client.cut_off = True  # its replica went away under it
        return
    await stop.wait()
    client.closed_code = await stalled.outcome()
    client.cut_off = client.closed_code is not None


async def rest_checker(replicas: list[Replica], fake: FakeFlutterwave, figures: Figures, stop: asyncio.Event) -> None:
    """Samples answers and checks each value is one the upstream really served for that pair."""
    pairs = [Pair(s, d) for s in ("USD", "CAD", "GBP", "EUR") for d in ("NGN", "KES", "GHS", "ZAR", "XOF")]
    async with httpx.AsyncClient(timeout=10) as http:
        for replica, pair in zip(itertools.cycle(replicas), itertools.cycle(pairs), strict=False):
            if stop.is_set():
                return
            try:
                response = await http.get(
                    f"{replica.url}/api/rates",
                    params={"source_currency": pair.source, "destination_currency": pair.destination},
                )
            except httpx.TransportError:
                await asyncio.sleep(0.1)  # a replica being killed or restarted
                continue
            figures.rest_sampled += 1
            if response.status_code >= 500:
                figures.rest_5xx += 1
            elif response.status_code == 200:
                value = Decimal(str(response.json()["meta"]["destination_per_source"]))
                served = {v for _, v in fake.served.get(pair, [])}
                if value not in served:
                    figures.rest_bad_values.append(f"{pair} {value}")
            await asyncio.sleep(0.02)


async def market(fake: FakeFlutterwave, pairs: list[Pair], stop: asyncio.Event, seed: int) -> None:
    """Rates move every few seconds; faults keep coming."""
    rng = random.Random(seed)
    fake.chaos(0.2, ["500", "503"], seed=seed)
    for tick in itertools.count():
        if stop.is_set():
            return
        for pair in rng.sample(pairs, 6):
            fake.bump(pair, Decimal(str(round(1 + rng.uniform(-0.01, 0.01), 5))))
        if tick % 4 == 0:
            fake.fail("429", times=6, retry_after=1)
        if tick % 5 == 2:
            fake.fail("timeout", times=1)
            fake.fail("hang", times=1)
        await asyncio.sleep(3)


async def database_outage(proxy: TcpProxy, replicas: list[Replica], outage_s: float, figures: Figures) -> None:
    """Cut PostgreSQL off (connections aborted, new ones refused), check the outage rules, then restore it."""
    print(f"cutting PostgreSQL off for {outage_s:.0f}s")
    started = time.monotonic()
    figures.events.append((started, "the database cut-off"))
    proxy.refuse()
    proxy.cut()
    problems = figures.problems
    async with httpx.AsyncClient(timeout=15) as http:
        for replica in replicas:
            ready = None
            while time.monotonic() - started < outage_s:
                ready = await http.get(f"{replica.url}/readyz")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.1)
            if ready is None or ready.status_code != 503 or "database" not in ready.json()["message"]:
                problems.append(f"replica {replica.port}: /readyz did not name the database while it was away")
            history = await http.get(
                f"{replica.url}/api/rates/history", params={"source_currency": "USD", "destination_currency": "NGN"}
            )
            if history.status_code != 503 or not history.headers.get("retry-after"):
                problems.append(f"replica {replica.port}: history answered {history.status_code} while away")
            try:
                async with connect(replica.ws_url, open_timeout=10) as websocket:
                    snapshot = json.loads(await asyncio.wait_for(websocket.recv(), 10))
                if snapshot["type"] != "all_rates" or len(snapshot["rates"]) < 44:
                    problems.append(f"replica {replica.port}: a new client's snapshot held {len(snapshot['rates'])}")
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as error:
                problems.append(f"replica {replica.port}: a new client got no snapshot while away: {error!r}")
    await asyncio.sleep(max(0.0, started + outage_s - time.monotonic()))
    proxy.restore()
    figures.outage = (started, time.monotonic())
    figures.events.append((figures.outage[1], "the database's return"))
    print("PostgreSQL back")


async def restart(redis: RedisServer, which: str, figures: Figures) -> None:
    print(f"restarting Redis ({which})")
    figures.events.append((time.monotonic(), f"Redis restart {which}"))
    redis.stop()
    await asyncio.sleep(2)
    redis.start()


def rss_kib(replica: Replica) -> int:
    assert replica.process is not None
    for line in Path(f"/proc/{replica.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric_sum(replica: Replica, name: str, label_filter: str = "") -> float:
    try:
        text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label_filter in line
    )


@asynccontextmanager
async def postgres_database() -> Any:
    name = f"fxrates_soak_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def start_wrk(replica: Replica, seconds: int, script: Path) -> subprocess.Popen[str]:
    url = f"{replica.url}/api/rates?source_currency=USD&destination_currency=NGN&amount=1000"
    return subprocess.Popen(
        ["wrk", "-t1", "-c8", f"-d{seconds}s", "-s", str(script), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wrk_figures(output: str) -> tuple[int, int]:
    requests = re.search(r"(\d+) requests in", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return int(requests.group(1)) if requests else 0, int(non_2xx.group(1)) if non_2xx else 0


async def seconds_until(
    condition: Callable[[], object], what: str, timeout_s: float, blocking: bool = False, every_s: float = 0.1
) -> float | None:
    """How long `condition` took to hold, or None past `timeout_s`: the soak reports a figure, it does not fail."""
    started = time.monotonic()
    probe: Callable[[], object] = (lambda: asyncio.to_thread(condition)) if blocking else condition
    try:
        await eventually(probe, what=what, timeout_s=timeout_s, interval_s=every_s)
    except Timeout:
        return None
    return time.monotonic() - started


def lease_holder(redis_url: str) -> bytes | None:
    """The token of the replica holding the poller's lease."""
    with Redis.from_url(redis_url, socket_timeout=1) as redis:
        holder: bytes | None = redis.get(LEASE_KEY)
    return holder


async def soak(duration_s: float, clients_n: int, slow_n: int, seed: int) -> bool:
    figures = Figures()
    workdir = Path(tempfile.mkdtemp(prefix="fxrates-soak-"))
    async with AsyncExitStack() as stack:
        fake = stack.enter_context(FakeFlutterwave(slow_s=3.0))
        redis = RedisServer()
        redis.start()
        stack.callback(redis.stop)
        database_dsn = await stack.enter_async_context(postgres_database())
        database_url = database_dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        parts = urlsplit(database_dsn)
        assert parts.hostname is not None and parts.port is not None
        proxy = stack.enter_context(TcpProxy(parts.hostname, parts.port))
        env = {
            "DATABASE_URL": database_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}", 1),
            "REDIS_URL": redis.url,
            "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
            "FLUTTERWAVE_BASE_URL": fake.url,
            "POLL_INTERVAL_SECONDS": str(POLL_INTERVAL_S),
            "POLLER_LOCK_TTL_SECONDS": str(LOCK_TTL_S),
            "UPSTREAM_TIMEOUT_SECONDS": "1",
            "UPSTREAM_MAX_ATTEMPTS": "3",
        }
        replicas = [Replica(workdir, "a", **env), Replica(workdir, "b", **env)]
        for replica in replicas:
            replica.start()
            stack.callback(replica.stop)
        wait_for_rates(replicas[0])
        pairs = [
            Pair(s, d)
            for s in ("USD", "CAD", "GBP", "EUR")
            for d in ("XOF", "XAF", "EGP", "ETB", "GHS", "KES", "MAD", "NGN", "ZAR", "UGX", "ZMW")
        ]

        stop_clients, stop_load, stop_market = asyncio.Event(), asyncio.Event(), asyncio.Event()
        shown: dict[str, set[Decimal]] = {}
        names = {id(replica): name for replica, name in zip(replicas, "ab", strict=True)}
        clients = [
            Client(
                replicas[i % 2], names[id(replicas[i % 2])], follower=RatesClient(replicas[i % 2].ws_url), shown=shown
            )
            for i in range(clients_n)
        ]
        slow = [Client(replicas[i % 2], names[id(replicas[i % 2])], slow=True) for i in range(slow_n)]
        figures.events.append((time.monotonic(), "the clients started"))
        readers = [asyncio.create_task(read_client(c)) for c in clients]
        tasks = [asyncio.create_task(slow_reader(c, stop_clients)) for c in slow]
        await seconds_until(
            lambda: sum(c.snapshots > 0 for c in clients) >= clients_n, "clients to connect", 60, every_s=0.2
        )
        print(f"{sum(c.snapshots > 0 for c in clients)} of {clients_n} clients connected, {slow_n} slow readers")

        script = workdir / "pace.lua"
        script.write_text(WRK_SCRIPT)
        load_s = int(duration_s)
        wrks = [start_wrk(replica, load_s, script) for replica in replicas]
        tasks.append(asyncio.create_task(rest_checker(replicas, fake, figures, stop_load)))
        tasks.append(asyncio.create_task(market(fake, pairs, stop_market, seed)))

        started = time.monotonic()
        figures.events.append((started, "the load started"))
        await asyncio.sleep(max(10.0, duration_s * 0.15))
        warm_rss = {id(r): rss_kib(r) for r in replicas}
        print(f"warm-up RSS: {', '.join(f'{rss_kib(r) / 1024:.0f} MiB' for r in replicas)}")

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, started + duration_s * fraction - time.monotonic()))

        await at(0.25)
        await restart(redis, "1 of 2", figures)

        await at(0.45)
        leader = next((r for r in replicas if "leading" in r.poller_role()), None)
        if leader is None:
            figures.problems.append("no replica was leading before the kill")
        else:
            survivor = replicas[1 - replicas.index(leader)]
            print(f"killing the polling replica (port {leader.port}) with SIGKILL")
            probe = Pair("USD", "NGN")
            calls_before = fake.calls[probe]
            holder = lease_holder(redis.url)
            leader.kill()
            figures.killed = names[id(leader)]
            figures.events.append((time.monotonic(), f"the kill of {names[id(leader)]}"))
            # The handover is the moment the lease changes hands, read from Redis itself: /readyz would add its
            # own answer time on a replica busy fanning out to hundreds of clients.
            handover = await seconds_until(
                lambda: lease_holder(redis.url) not in (None, holder),
                "the lease to change hands",
                LOCK_TTL_S * 3,
                blocking=True,
                every_s=0.02,
            )
            resumed = await seconds_until(
                lambda: fake.calls[probe] > calls_before + 1, "polling to resume", LOCK_TTL_S * 3
            )
            reported = await seconds_until(
                lambda: "leading" in survivor.poller_role(),
                "the survivor to report leading",
                LOCK_TTL_S * 3,
                blocking=True,
            )
            figures.handover_s = handover
            figures.handovers += 1
            print(f"the lease changed hands after {handover}s; polling resumed after {resumed}s")
            if handover is None or handover > LOCK_TTL_S + 0.5:
                figures.problems.append(f"handover took {handover}s, more than one lock TTL")
            if reported is None:
                figures.problems.append("the surviving replica's /readyz never said it was polling")
            await asyncio.sleep(3)
            leader.start()
            figures.events.append((time.monotonic(), f"{names[id(leader)]} started again"))
            print("killed replica started again")
            # A new process: its memory after warm-up is measured once its clients are back and it has served,
            # and never taken as lower than its predecessor's, which served the same clients the same frames. A
            # connection's memory peaks when the soak's one client process falls behind (an outbox of one frame
            # per pair plus the transport's buffer, docs/websocket.md), which this one may not have met yet.
            await asyncio.sleep(max(10.0, duration_s * 0.15))
            warm_rss[id(leader)] = max(rss_kib(leader), warm_rss[id(leader)])

        await at(0.65)
        await restart(redis, "2 of 2", figures)

        await at(0.70)
        await database_outage(proxy, replicas, DATABASE_OUTAGE_S * duration_s / FULL_DURATION_S, figures)

        await at(0.85)
        print("faults off; letting the rates settle")
        figures.events.append((time.monotonic(), "the faults stopped"))
        stop_market.set()
        fake.clear_faults()
        await asyncio.sleep(SETTLE_S)
        stop_load.set()
        wrk_outputs = [wrk.communicate(timeout=duration_s + 30)[0] for wrk in wrks]
        await asyncio.sleep(2 * POLL_INTERVAL_S)
        end_rss = {id(r): rss_kib(r) for r in replicas}
        final = {str(pair): fake.rate(pair) for pair in pairs}
        # This one process reads every client's frames and falls behind the servers under load: give it time
        # to catch up (the servers keep pushing every pair each cycle) before judging what clients hold.
        caught_up_s = await seconds_until(lambda: all(c.state == final for c in clients), "clients to catch up", 120)
        print(f"clients caught up with the final rates {caught_up_s}s after the settle")
        stop_clients.set()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, *tasks, return_exceptions=True)

        check(figures, replicas, clients, slow, final, warm_rss, end_rss)
        await check_history(figures, database_url, fake, final, shown, clients)
        for output in wrk_outputs:
            served, non_2xx = wrk_figures(output)
            figures.wrk_requests += served
            if non_2xx:
                figures.problems.append(f"wrk saw {non_2xx} answers that were not 2xx")
        report(figures, clients, slow, fake)
    return not figures.problems


def check(
    figures: Figures,
    replicas: list[Replica],
    clients: list[Client],
    slow: list[Client],
    final: dict[str, Decimal],
    warm: dict[int, int],
    end: dict[int, int],
) -> None:
    problems = figures.problems
    for replica in replicas:
        # /readyz answers 503 on purpose while Redis or the database is down, and history while the database is
        # (asked once per replica during the outage); every other 5xx is a failure.
        served_5xx = (
            metric_sum(replica, "fxrates_http_requests_total", 'status="5')
            - metric_sum(replica, 'fxrates_http_requests_total{route="/readyz",status="503"}')
            - metric_sum(replica, 'fxrates_http_requests_total{route="/api/rates/history",status="503"}')
        )
        if served_5xx:
            problems.append(f"replica {replica.port} answered {served_5xx:.0f} requests with 5xx")
        for base in ("USD", "CAD", "GBP", "EUR"):
            stored = httpx.get(f"{replica.url}/api/rates/all?base_currency={base}", timeout=10).json()["data"]["rates"]
            for destination, entry in stored.items():
                pair = f"{base}/{destination}"
                if pair in final and Decimal(str(entry["destination_per_source"])) != final[pair]:
                    problems.append(
                        f"replica {replica.port} serves {pair} {entry['destination_per_source']}, "
                        f"the upstream says {final[pair]}"
                    )
            missing = {p for p in final if p.startswith(base)} - {f"{base}/{d}" for d in stored}
            if missing:
                problems.append(f"stored rates lost: {sorted(missing)}")
    if figures.rest_5xx:
        problems.append(f"{figures.rest_5xx} sampled REST answers were 5xx")
    if figures.rest_bad_values:
        problems.append(f"REST served values the upstream never gave: {figures.rest_bad_values[:5]}")
    for client in clients:
        wrong = {p: v for p, v in final.items() if client.state.get(p) != v}
        if wrong:
            problems.append(
                f"a client of {client.replica.port} ended with {len(wrong)} wrong pairs, e.g. "
                f"{next(iter(wrong.items()))} vs {client.state.get(next(iter(wrong)))}"
            )
            break
    # A client of a replica that was never killed has no reason to lose its connection: not the Redis restarts,
    # nor the database outage, nor the load. Each one that did is named with how and when.
    unexplained = [d for c in clients if c.name != figures.killed for d in c.disconnections]
    if unexplained:
        problems.append(
            f"{len(unexplained)} connections to a replica never killed ended: "
            + "; ".join(summarise(unexplained, figures.events))
        )
    if figures.killed is not None and not all(c.disconnections for c in clients if c.name == figures.killed):
        problems.append(f"clients of {figures.killed} were not disconnected by its kill")
    # Every slow reader is cut off (by the server, or by its replica's death); every reader on the replica that
    # lived through the run stayed connected.
    if not all(c.cut_off for c in slow):
        problems.append(f"{sum(not c.cut_off for c in slow)} slow readers were never cut off")
    closed_for_lag = sum(metric_sum(r, "fxrates_websocket_slow_closed_total") for r in replicas)
    if slow and closed_for_lag < 1:
        problems.append("no replica counted a slow reader closed")
    for replica in replicas:
        log = replica.log()
        went, returned = log.count("database unreachable"), log.count("database reachable again")
        figures.outage_lines[replica.port] = (went, returned)
        if went < 1 or went != returned:
            problems.append(f"replica {replica.port} logged the database going {went} times, returning {returned}")
    for replica in replicas:
        before, after = warm[id(replica)], end[id(replica)]
        print(f"replica {replica.port} RSS after warm-up {before / 1024:.1f} MiB, at the end {after / 1024:.1f} MiB")
        if before > 0 and after > before * (1 + MEMORY_TOLERANCE):
            problems.append(f"replica {replica.port} memory grew {after / before - 1:.0%} after warm-up")


async def check_history(
    figures: Figures,
    database_url: str,
    fake: FakeFlutterwave,
    final: dict[str, Decimal],
    shown: dict[str, set[Decimal]],
    clients: list[Client],
) -> None:
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        rows = await connection.fetch(
            "SELECT source_currency, destination_currency, destination_per_source, observed_at "
            "FROM exchange_rate_history ORDER BY source_currency, destination_currency, observed_at, id"
        )
    finally:
        await connection.close()
    history: dict[str, list[Decimal]] = {}
    for row in rows:
        history.setdefault(f"{row[0]}/{row[1]}", []).append(Decimal(row[2]))
    for pair, values in history.items():
        duplicates = sum(a == b for a, b in itertools.pairwise(values))
        if duplicates:
            figures.problems.append(f"history of {pair} repeats a value {duplicates} times in a row")
        served = {v for _, v in fake.served.get(Pair(*pair.split("/")), [])}
        if not set(values) <= served:
            figures.problems.append(f"history of {pair} holds values the upstream never gave")
        if pair in final and values[-1] != final[pair]:
            figures.problems.append(f"history of {pair} ends at {values[-1]}, not the final {final[pair]}")
    # Each client, however often it reconnected and whether it resumed or took a snapshot, ends where history does.
    latest = {pair: values[-1] for pair, values in history.items()}
    off = [c for c in clients if any(c.state.get(pair) != value for pair, value in latest.items())]
    if off:
        figures.problems.append(f"{len(off)} clients do not hold history's latest value of every pair")
    # Whatever a client was shown, history can answer afterwards.
    for pair, values in shown.items():
        unrecorded = values - set(history.get(pair, []))
        if unrecorded:
            figures.problems.append(f"clients were shown {pair} values history does not hold: {sorted(unrecorded)}")
    # Every value a poll saw is a change the history must hold, unless the replica died holding it, or it was
    # fetched while the database was away (then it was neither stored nor shown).
    away_from, away_to = figures.outage or (0.0, 0.0)
    away_from, away_to = away_from - POLL_INTERVAL_S, away_to + POLL_INTERVAL_S
    for pair in final:
        served = fake.served.get(Pair(*pair.split("/")), [])
        changes = {b for (_, a), (t, b) in itertools.pairwise(served) if a != b and not away_from <= t <= away_to}
        missed = changes - set(history.get(pair, []))
        if len(missed) > 1:
            figures.problems.append(f"history of {pair} misses {len(missed)} values the upstream gave")


def report(figures: Figures, clients: list[Client], slow: list[Client], fake: FakeFlutterwave) -> None:
    probe = Pair("USD", "NGN")
    times = [t for t, _ in fake.served.get(probe, [])]
    away_from, away_to = figures.outage or (0.0, 0.0)
    # Polling pauses on purpose while the database is away; that gap is judged apart.
    spans_outage = [b - a for a, b in itertools.pairwise(times) if a <= away_to and b >= away_from]
    gaps = [b - a for a, b in itertools.pairwise(times) if not (a <= away_to and b >= away_from)]
    print("---- figures")
    print(f"REST requests served to wrk: {figures.wrk_requests}")
    print(f"REST answers sampled and checked: {figures.rest_sampled} ({figures.rest_5xx} 5xx)")
    print(f"WebSocket updates delivered: {sum(c.updates for c in clients)} to {len(clients)} clients")
    print(
        f"snapshots per client: median {statistics.median(c.snapshots for c in clients)}, "
        f"max {max(c.snapshots for c in clients)}"
    )
    for name in sorted({c.name for c in clients}):
        own = [c for c in clients if c.name == name]
        killed = " (killed)" if name == figures.killed else ""
        print(
            f"replica {name}{killed}: {len(own)} clients, {sum(not c.disconnections for c in own)} stayed connected, "
            f"{sum(bool(c.disconnections) for c in own)} reconnected; reconnections answered with resumed: "
            f"{sum(c.resumed for c in own)}, with all_rates (resumed: false): {sum(c.not_resumed for c in own)}; "
            f"failed attempts: {sum(len(c.failed_attempts) for c in own)}"
        )
        for line in summarise([d for c in own for d in c.disconnections], figures.events):
            print(f"  disconnections: {line}")
        for line in summarise([d for c in own for d in c.failed_attempts], figures.events):
            print(f"  failed attempts: {line}")
    print(
        f"slow readers cut off: {sum(c.cut_off for c in slow)} of {len(slow)}, close codes "
        f"{sorted((c.closed_code or 0) for c in slow)}"
    )
    print(f"poller handovers: {figures.handovers}, handover time {figures.handover_s}s (lock TTL {LOCK_TTL_S}s)")
    print(f"longest gap between successful polls of {probe}: {max(gaps, default=0):.1f}s (interval {POLL_INTERVAL_S}s)")
    print(f"upstream calls: {sum(fake.calls.values())}")
    if figures.outage is not None:
        outage_s = away_to - away_from
        resumed_s = max(spans_outage, default=0.0) - outage_s
        print(
            f"database outage {outage_s:.1f}s: polling of {probe} resumed {resumed_s:.1f}s after its return "
            f"(interval {POLL_INTERVAL_S}s); log lines (went, returned) per replica: {figures.outage_lines}"
        )
        if max(spans_outage, default=0.0) > outage_s + 4 * POLL_INTERVAL_S:
            figures.problems.append(f"polling did not resume within {4 * POLL_INTERVAL_S:.0f}s of the database")
    # Besides the kill (one lock TTL), a pair may miss a cycle or two to injected faults; a stall is a failure.
    allowed_gap_s = LOCK_TTL_S + 4 * POLL_INTERVAL_S
    if max(gaps, default=0) > allowed_gap_s:
        figures.problems.append(f"polling of {probe} stalled for {max(gaps):.1f}s (allowed {allowed_gap_s:.0f}s)")
    print("---- " + ("PASS" if not figures.problems else "FAIL"))
    for problem in figures.problems:
        print(f"problem: {problem}")


def summarise(ended: list[Disconnection], events: list[tuple[float, str]]) -> list[str]:
    """One line per replica, way and event: "12 x a: close 1012 (...), 0.1-0.4 s after the kill of a"."""
    groups: dict[tuple[float, str, str, str], list[float]] = {}
    for disconnection in ended:
        before = [(t, what) for t, what in events if t <= disconnection.at]
        t, what = before[-1] if before else (0.0, "nothing")
        groups.setdefault((t, what, disconnection.replica, disconnection.how), []).append(disconnection.at - t)
    return [
        f"{len(offsets)} x {replica}: {how}, {min(offsets):.1f}-{max(offsets):.1f} s after {what}"
        for (_, what, replica, how), offsets in sorted(groups.items())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds (default 300)")
    parser.add_argument("--clients", type=int, default=1000, help="WebSocket clients (default 1000)")
    parser.add_argument("--slow", type=int, default=10, help="of which slow readers (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return 0 if asyncio.run(soak(args.duration, args.clients - args.slow, args.slow, args.seed)) else 1


if __name__ == "__main__":
    sys.exit(main())
