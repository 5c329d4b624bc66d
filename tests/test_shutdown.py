"""SIGTERM to a real uvicorn process (docs/operations.md, Shutdown): not ready at once, WebSocket clients told
1012, the poller's lease handed back, requests in flight finished before the process goes."""

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from app.currencies import Pair
from app.storage.engine import PROJECT_ROOT
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, service_env, wait_for_rates
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

LEASE_KEY = "fxrates:poller:lock"
SERVICE_RESTART = 1012


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


async def closed_with(client: WsClient) -> int:
    """The close code, once the server closes the connection (updates before it are skipped)."""
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv_until(lambda _: False, timeout_s=20)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code


@pytest.fixture
def replica(fake: FakeFlutterwave, throwaway_redis: RedisServer, tmp_path: Path) -> Replica:
    # A drain long enough that the test, not the clock, decides when the server stops: a second SIGTERM.
    return Replica(
        tmp_path,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}",
        REDIS_URL=throwaway_redis.url,
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=fake.url,
        POLL_INTERVAL_SECONDS="60",
        UPSTREAM_TIMEOUT_SECONDS="60",
        SHUTDOWN_DRAIN_SECONDS="120",
        uvicorn_args=("--no-access-log", "--timeout-graceful-shutdown", "10"),
    )


async def test_sigterm_stops_new_work_then_lets_requests_in_flight_finish(
    replica: Replica, fake: FakeFlutterwave, throwaway_redis: RedisServer
) -> None:
    on_demand = Pair("USD", "JPY")  # not polled: fetched from the upstream while the client waits
    fake.fail("held", pairs=[on_demand])
    replica.start()
    redis = Redis.from_url(throwaway_redis.url)
    try:
        wait_for_rates(replica)
        assert "leading" in replica.poller_role()
        assert await redis.get(LEASE_KEY) is not None
        async with (
            WsClient(replica.ws_url) as watcher,
            httpx.AsyncClient(base_url=replica.url, timeout=60) as http,
        ):
            assert (await watcher.recv())["type"] == "all_rates"
            in_flight = asyncio.create_task(
                http.get("/api/rates", params={"source_currency": "USD", "destination_currency": "JPY"})
            )
            await eventually(lambda: fake.calls[on_demand] >= 1, what="the on-demand request to reach the upstream")

            assert replica.process is not None
            replica.process.send_signal(signal.SIGTERM)

            assert await closed_with(watcher) == SERVICE_RESTART
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["message"] == "Not ready: shutting down."
            # Another replica may poll at once: the lease is back, not left to run out its TTL.
            await eventually(
                lambda: redis.get(LEASE_KEY), until=lambda holder: holder is None, what="the lease to be handed back"
            )
            # While draining, requests are still served, and a new WebSocket client is sent on its way.
            still = await http.get("/api/rates", params={"source_currency": "USD", "destination_currency": "NGN"})
            assert still.status_code == 200
            async with WsClient(replica.ws_url) as late:
                assert await closed_with(late) == SERVICE_RESTART

            # The end of the drain (here: a second SIGTERM): the server stops taking connections...
            replica.process.send_signal(signal.SIGTERM)
            await eventually(lambda: refuses_connections(replica.port), what="the server to stop accepting connections")
            # ...and the request in flight, still held upstream, is answered before the process exits.
            assert not in_flight.done()
            fake.release_held()
            answer = await in_flight
            assert answer.status_code == 200
            assert answer.json()["data"]["destination"]["currency"] == "JPY"
            exit_code = await asyncio.to_thread(replica.process.wait, 30)
        # uvicorn re-raises the signal it stopped for once everything is closed.
        assert exit_code in (0, -signal.SIGTERM), replica.log()
        assert "Traceback" not in replica.log(), replica.log()
    finally:
        await redis.aclose()
        replica.stop()


async def test_sigterm_to_the_poller_command_hands_its_lease_back(
    fake: FakeFlutterwave, throwaway_redis: RedisServer, tmp_path: Path
) -> None:
    env = service_env(
        ENVIRONMENT="test",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}",
        REDIS_URL=throwaway_redis.url,
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=fake.url,
    )
    log_path = tmp_path / "poller.log"
    redis = Redis.from_url(throwaway_redis.url)
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped by its PID below
            [sys.executable, "-m", "app.poller", "--interval", "60"], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log
        )
    try:

        async def leased() -> bytes | None:
            assert process.poll() is None, log_path.read_text()
            holder: bytes | None = await redis.get(LEASE_KEY)
            return holder

        await eventually(leased, what="the poller to take the lease", timeout_s=30, detail=log_path.read_text)
        process.send_signal(signal.SIGTERM)
        try:
            exit_code = await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the poller did not stop:\n{log_path.read_text()}") from None
        assert exit_code == 0, log_path.read_text()
        assert await redis.get(LEASE_KEY) is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        await redis.aclose()
