"""`uvicorn app.main:app --workers 2` on the embedded SQLite default (docs/outages.md, several workers).

Both workers start (migrations take turns under a lock file), both serve, and with Redis the poller's lease
makes them poll once per cycle between them. Without Redis each worker polls, caches and fans out on its own.
"""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from app.currencies import Pair
from app.storage.engine import PROJECT_ROOT
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, wait_for_rates
from tests.support.waiting import eventually

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

INTERVAL_S = 0.5
GENEROUS_S = 15.0  # fails only what hangs; measures nothing


def two_workers(tmp_path: Path, fake: FakeFlutterwave, **env: str) -> Replica:
    return Replica(
        tmp_path,
        "workers",
        workers=2,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}",
        FLUTTERWAVE_SECRET_KEY=SECRET_KEY,
        FLUTTERWAVE_BASE_URL=fake.url,
        POLL_INTERVAL_SECONDS=str(INTERVAL_S),
        UPSTREAM_TIMEOUT_SECONDS="1",
        **env,
    )


def workers_started(replica: Replica) -> int:
    return replica.log().count("Application startup complete")


async def serves(replica: Replica) -> None:
    """Both workers up, and whichever worker answers: every request answered, none an error."""
    await eventually(
        lambda: workers_started(replica),
        until=lambda started: started >= 2,
        what="both workers to start",
        timeout_s=GENEROUS_S,
        detail=replica.log,
    )
    wait_for_rates(replica)
    async with httpx.AsyncClient(base_url=replica.url, timeout=GENEROUS_S) as http:
        # New connections each time, so the kernel spreads them over both workers.
        for _ in range(20):
            async with httpx.AsyncClient(base_url=replica.url, timeout=GENEROUS_S) as fresh:
                response = await fresh.get(
                    "/api/rates", params={"source_currency": "USD", "destination_currency": "NGN"}
                )
                assert response.status_code == 200, response.text
        assert (await http.get("/readyz")).status_code == 200
    log = replica.log()
    for sign in ("Traceback", " ERROR ", "database is locked", "already exists", "Child process"):
        assert sign not in log, log


async def test_two_workers_on_sqlite_without_redis(fake: FakeFlutterwave, tmp_path: Path) -> None:
    replica = two_workers(tmp_path, fake).start()
    try:
        await serves(replica)
        async with connect(replica.ws_url, open_timeout=GENEROUS_S) as websocket:
            snapshot = json.loads(await asyncio.wait_for(websocket.recv(), GENEROUS_S))
            assert snapshot["type"] == "all_rates" and len(snapshot["rates"]) == 44
    finally:
        replica.stop()


async def test_two_workers_on_sqlite_with_redis_poll_once_per_cycle(
    fake: FakeFlutterwave, throwaway_redis: RedisServer, tmp_path: Path
) -> None:
    # A Redis of its own: pub/sub channels span every database number, so a shared server carries others' events.
    replica = two_workers(tmp_path, fake, REDIS_URL=throwaway_redis.url, POLLER_LOCK_TTL_SECONDS="2").start()
    try:
        await serves(replica)
        fake.reset_counters()
        async with connect(replica.ws_url, open_timeout=GENEROUS_S) as websocket:
            cycles = 0
            deadline = time.monotonic() + GENEROUS_S * 2
            while cycles < 6:
                assert time.monotonic() < deadline, "poll cycles stopped"
                message = json.loads(await asyncio.wait_for(websocket.recv(), GENEROUS_S))
                cycles += message["type"] == "all_rates_update"
        calls = fake.calls[Pair("USD", "NGN")]
        # One worker's worth: one call per cycle, never one per worker (that would be about twice as many).
        assert cycles - 1 <= calls <= cycles + 1, (calls, cycles)
    finally:
        replica.stop()


MIGRATOR = """
import asyncio, sys
from app.storage.engine import create_engine, migrate

async def main() -> None:
    engine = create_engine(sys.argv[1], timeout_s=None)
    await asyncio.to_thread(sys.stdin.readline)  # the starting gun: every process migrates at once
    try:
        await migrate(engine)
    finally:
        await engine.dispose()

print("ready", flush=True)
asyncio.run(main())
"""


@pytest.mark.parametrize("attempt", range(3))
def test_processes_migrating_one_sqlite_file_at_once_take_turns(tmp_path: Path, attempt: int) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'rates.db'}"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR, url],
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, (_, stderr) in zip(processes, outcomes, strict=True):
        assert process.returncode == 0, stderr
