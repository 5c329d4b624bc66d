"""Several uvicorn replicas sharing PostgreSQL and Redis: fan-out across them, one poller among them."""

import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from app.currencies import Pair
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, wait_for_rates
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient, is_update_for

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

INTERVAL_S = 0.5
LOCK_TTL_S = 2.0


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
