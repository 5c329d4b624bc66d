"""Several uvicorn replicas sharing PostgreSQL and Redis: fan-out across them, one poller among them."""

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from app.currencies import Pair
from clients.fxrates_client import Board
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, wait_for_rates
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient, is_update_for

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

INTERVAL_S = 0.5
LOCK_TTL_S = 2.0
HEARTBEAT_S = 1.0


class Cluster:
    def __init__(self, folder: Path, fake: FakeFlutterwave, database_url: str, redis: RedisServer) -> None:
        self.folder = folder
        self.env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis.url,
            "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
            "FLUTTERWAVE_BASE_URL": fake.url,
            "POLL_INTERVAL_SECONDS": str(INTERVAL_S),
            "POLLER_LOCK_TTL_SECONDS": str(LOCK_TTL_S),
            "UPSTREAM_TIMEOUT_SECONDS": "1",
        }
        self.replicas: list[Replica] = []

    def start(self, name: str) -> Replica:
        replica = Replica(self.folder, name, **self.env).start()
        self.replicas.append(replica)
        return replica

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


@pytest.fixture
async def cluster(
    fake: FakeFlutterwave, postgres_url: str, throwaway_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, fake, postgres_url, throwaway_redis)
    try:
        yield cluster
    finally:
        cluster.stop()


def leader_and_standby(replicas: list[Replica]) -> tuple[Replica, Replica]:
    roles = {replica: replica.poller_role() for replica in replicas}
    leading = [replica for replica, role in roles.items() if "leading" in role]
    standby = [replica for replica, role in roles.items() if "standby" in role]
    assert len(leading) == 1 and len(standby) == 1, roles
    return leading[0], standby[0]


async def test_a_change_stored_by_one_replica_reaches_clients_of_the_other(
    cluster: Cluster, fake: FakeFlutterwave
) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    wait_for_rates(b)
    async with WsClient(b.ws_url) as client:
        snapshot = await client.recv()
        assert snapshot["type"] == "all_rates" and len(snapshot["rates"]) == 44
        # An on-demand fetch on A...
        status, body = a.get("/api/rates?source_currency=USD&destination_currency=JPY")
        assert status == 200 and body["meta"]["served_from"] == "upstream"
        # ...is pushed to B's client.
        update, _ = await client.recv_until(is_update_for("USD/JPY"), timeout_s=5)
        assert Decimal(str(update["rate"]["destination_per_source"])) == fake.rate(Pair("USD", "JPY"))
        # And so is what the poller stores, whichever replica polls.
        moved = fake.bump(Pair("EUR", "ZAR"), Decimal("1.03"))
        update, _ = await client.recv_until(
            lambda m: is_update_for("EUR/ZAR")(m) and Decimal(str(m["rate"]["destination_per_source"])) == moved,
            timeout_s=5,
        )
        assert update["previous_rate"] is not None


async def test_two_polling_replicas_make_one_replicas_worth_of_calls(cluster: Cluster, fake: FakeFlutterwave) -> None:
    replicas = [cluster.start("a"), cluster.start("b")]
    wait_for_rates(replicas[0])
    leader, standby = leader_and_standby(replicas)
    fake.reset_counters()
    async with WsClient(replicas[0].ws_url) as client:
        await client.recv()
        cycles = 6
        for _ in range(cycles):
            await client.recv_until(lambda m: m["type"] == "all_rates_update", timeout_s=5)
    calls = fake.calls[Pair("USD", "NGN")]
    # One replica's worth: one call per cycle the clients saw, never one per replica...
    assert cycles - 1 <= calls <= cycles + 1, (calls, cycles)
    # ...and the same replica led throughout, so those cycles were all its own, none skipped by a handover.
    assert leader_and_standby(replicas) == (leader, standby)


async def test_a_killed_poller_is_replaced_by_the_standby(cluster: Cluster, fake: FakeFlutterwave) -> None:
    replicas = [cluster.start("a"), cluster.start("b")]
    wait_for_rates(replicas[0])
    leader, standby = leader_and_standby(replicas)
    pair = Pair("GBP", "UGX")
    leader.kill()
    calls_at_kill = fake.calls[pair]
    # The dead leader never hands its lease back: the standby takes it once it runs out (how soon is
    # bench/soak.py's to measure; the deadlines here only bound a hang).
    await eventually(lambda: "leading" in standby.poller_role(), what="the standby to lead", timeout_s=30)
    await eventually(lambda: fake.calls[pair], until=lambda calls: calls > calls_at_kill + 1, what="polling to resume")
    moved = fake.bump(pair, Decimal("1.05"))
    await eventually(
        lambda: Decimal(
            str(
                standby.get("/api/rates?source_currency=GBP&destination_currency=UGX")[1]["meta"][
                    "destination_per_source"
                ]
            )
        ),
        until=lambda served: served == moved,
        what=f"the new poller's rate {moved} to be served",
    )


async def test_fan_out_resumes_after_redis_restarts_with_a_fresh_snapshot(
    cluster: Cluster, fake: FakeFlutterwave, throwaway_redis: RedisServer
) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    wait_for_rates(b)
    async with WsClient(b.ws_url) as client:
        await client.recv()
        throwaway_redis.stop()
        await eventually(lambda: b.get("/readyz")[0] == 503, what="readyz to report Redis down")
        assert "redis" in b.get("/readyz")[1]["message"]
        # Meanwhile B's own changes still reach B's clients.
        status, _ = b.get("/api/rates?source_currency=EUR&destination_currency=JPY")
        assert status == 200
        await client.recv_until(is_update_for("EUR/JPY"), timeout_s=5)
        throwaway_redis.start()
        # Once Redis is back, each client is sent a fresh snapshot, so it misses nothing...
        snapshot, _ = await client.recv_until(lambda m: m["type"] == "all_rates", timeout_s=15)
        assert len(snapshot["rates"]) >= 44
        # ...and changes made on A reach B's client again, with no restart, once A has reconnected too
        # (its backoff is at most a few seconds): each try fetches a pair nobody has stored yet.
        reached = False
        started = time.monotonic()
        for destination in ("JPY", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "HUF", "INR", "CNY", "AUD", "NZD"):
            a.get(f"/api/rates?source_currency=CAD&destination_currency={destination}")
            try:
                await client.recv_until(is_update_for(f"CAD/{destination}"), timeout_s=1.5)
            except TimeoutError:
                continue
            reached = True
            break
        assert reached, f"A's changes did not reach B's client within {time.monotonic() - started:.0f}s"
        await eventually(lambda: b.get("/readyz")[0] == 200, what="readyz to recover")


async def heartbeat(client: WsClient) -> dict[str, Any]:
    frame, _ = await client.recv_until(lambda message: message["type"] == "heartbeat", timeout_s=HEARTBEAT_S * 10)
    return frame


def served_board(replica: Replica, bases: set[str]) -> dict[str, Decimal]:
    board: dict[str, Decimal] = {}
    for base in sorted(bases):
        _, body = replica.get(f"/api/rates/all?base_currency={base}")
        for destination, item in body["data"]["rates"].items():
            board[f"{base}/{destination}"] = Decimal(str(item["destination_per_source"]))
    return board


def newest_in_history(replica: Replica, pair: str) -> dict[str, Any]:
    source, destination = pair.split("/")
    at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    status, body = replica.get(
        f"/api/rates/history?source_currency={source}&destination_currency={destination}&at={at}"
    )
    assert status == 200, body
    point: dict[str, Any] = body["data"]["points"][0]
    return point


async def test_a_client_of_a_killed_replica_resumes_on_the_other_and_holds_what_the_database_holds(
    cluster: Cluster, fake: FakeFlutterwave
) -> None:
    # No polling after the first cycle (each cycle sends every client a frame, so no heartbeat would be due):
    # a rate changes when the test reads a stale pair, and the replica it reads from fetches and stores it.
    cluster.env.update(
        POLL_INTERVAL_SECONDS="3600", RATE_STALE_AFTER_SECONDS="1", WS_HEARTBEAT_SECONDS=str(HEARTBEAT_S)
    )
    a = cluster.start("a")
    wait_for_rates(a)
    b = cluster.start("b")
    wait_for_rates(b)
    board = Board()
    async with WsClient(a.ws_url) as on_a, WsClient(b.ws_url) as watching_b:
        board.apply(await on_a.recv())
        assert board.epoch is not None and len(board.rates) == 44
        b_snapshot = await watching_b.recv()
        # One deployment, one epoch: both replicas' heartbeats carry the one the database holds.
        assert b_snapshot["epoch"] == board.epoch
        beat_b = await heartbeat(watching_b)
        assert beat_b["epoch"] == board.epoch
        # The client holds a promise at least as recent as B's start (B's memory begins there), as any client
        # connected a heartbeat's while does.
        async with asyncio.timeout(15):
            while board.seq is None or board.seq < b_snapshot["seq"]:
                board.apply(await heartbeat(on_a))
        assert board.seq is not None
        beat_a = await heartbeat(on_a)
        assert beat_a["epoch"] == beat_b["epoch"] == board.epoch
        board.apply(beat_a)
        epoch, seq = board.epoch, board.seq
        held_before = dict(board.rates)

    a.kill()
    # Meanwhile B stores a moved rate (a read of the stale pair fetches it) and a pair nobody had.
    moved = Decimal("21.125")
    fake.set_rate(Pair("EUR", "ZAR"), moved)
    await eventually(
        lambda: asyncio.to_thread(b.get, "/api/rates?source_currency=EUR&destination_currency=ZAR"),
        until=lambda answer: answer[0] == 200 and Decimal(str(answer[1]["meta"]["destination_per_source"])) == moved,
        what=f"EUR/ZAR stored as {moved}",
    )
    status, body = b.get("/api/rates?source_currency=USD&destination_currency=JPY")
    assert status == 200 and body["meta"]["served_from"] == "upstream"
    stored_up_to = max(newest_in_history(b, pair)["seq"] for pair in ("EUR/ZAR", "USD/JPY"))
    # B has heard of every store up to then (its heartbeats promise it): a resume now is answered in one frame.
    async with WsClient(b.ws_url) as watching_b_again, asyncio.timeout(15):
        while (await heartbeat(watching_b_again))["seq"] < stored_up_to:
            pass

    async with WsClient(f"{b.ws_url}?{urlencode({'epoch': epoch, 'seq': seq})}") as on_b:
        frame = await on_b.recv()
    assert frame["type"] == "resumed" and frame["epoch"] == epoch, frame
    changed = {f"{item['source_currency']}/{item['destination_currency']}": item for item in frame["rates"]}
    assert {"EUR/ZAR", "USD/JPY"} <= set(changed)
    assert changed["EUR/ZAR"]["previous_rate"] == held_before["EUR/ZAR"]["rate"]
    assert changed["USD/JPY"]["previous_rate"] is None
    board.apply(frame)
    assert board.seq is not None and board.seq >= stored_up_to

    held = {pair: Decimal(str(item["destination_per_source"])) for pair, item in board.rates.items()}
    # Exactly what B serves from the database, and each pair's newest point in history.
    assert held == served_board(b, {pair.split("/")[0] for pair in held})
    assert held["EUR/ZAR"] == moved
    for pair in ("EUR/ZAR", "USD/JPY"):
        point = newest_in_history(b, pair)
        assert held[pair] == Decimal(str(point["destination_per_source"]))
        assert point["seq"] <= frame["seq"]
