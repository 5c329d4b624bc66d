"""Benchmark: one poll cycle against its floor, both measured in the same run.

The issue's goal: one poll cycle of the 44 pairs against the fake Flutterwave with
150 ms latency and UPSTREAM_CONCURRENCY=4 takes at most 1.3x the floor
(44 / 4 x 150 ms = 1.65 s). The floor is measured here, run by run, as 44 bare GETs
through one httpx client under a semaphore of 4: the best the network can do, with
no parsing or storage. Floor and cycle runs alternate so both see the same machine.
The first cycle inserts the rows, later cycles update them.

Run from the repository root:

    python -m bench.poll_cycle                       # SQLite in a temporary directory
    python -m bench.poll_cycle --cycles 5 --database-url postgresql+asyncpg://user@host/db

It exits 1 when the median ratio cycle / measured floor exceeds 1.3, a cycle
had failed pairs, or the fake saw a peak in flight other than the concurrency.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
from pydantic import SecretStr

from app.currencies import Pair
from app.kit.metrics import Metrics
from app.services import open_services
from app.settings import Settings
from app.upstream.flutterwave import RATES_PATH, create_http_client
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave

MAX_RATIO = 1.3


@dataclass(frozen=True, slots=True)
class Run:
    floor_s: float
    floor_in_flight: int
    cycle_s: float
    cycle_in_flight: int
    ok: int
    failed: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.poll_cycle", description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3, help="floor/cycle runs (default 3)")
    parser.add_argument("--latency", type=float, default=0.15, help="fake upstream latency in seconds (default 0.15)")
    parser.add_argument("--concurrency", type=int, default=4, help="UPSTREAM_CONCURRENCY (default 4)")
    parser.add_argument("--database-url", help="postgresql+asyncpg://... (default: SQLite in a temporary directory)")
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    return args


async def measure_floor(http: httpx.AsyncClient, pairs: list[Pair], amount: Decimal, concurrency: int) -> float:
    """Seconds for bare GETs of every pair, `concurrency` at a time: no parsing, no storage."""
    limiter = asyncio.Semaphore(concurrency)

    async def get(pair: Pair) -> None:
        params = {"amount": str(amount), "source_currency": pair.source, "destination_currency": pair.destination}
        async with limiter:
            response = await http.get(RATES_PATH, params=params)
        response.raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(get(pair) for pair in pairs))
    return time.perf_counter() - started


async def bench(settings: Settings, fake: FakeFlutterwave, cycles: int) -> list[Run]:
    runs: list[Run] = []
    concurrency = settings.upstream_concurrency
    floor_http = create_http_client(fake.url, SecretStr(SECRET_KEY), 30.0, max_connections=concurrency)
    async with floor_http, open_services(settings, Metrics(), start_poller=False) as services:
        for _ in range(cycles):
            fake.reset_counters()
            floor_s = await measure_floor(floor_http, settings.pairs, settings.upstream_quote_amount, concurrency)
            floor_in_flight = fake.max_in_flight

            fake.reset_counters()
            started = time.perf_counter()
            report = await services.poller.run_cycle()
            cycle_s = time.perf_counter() - started
            runs.append(Run(floor_s, floor_in_flight, cycle_s, fake.max_in_flight, report.ok, report.failed))
    return runs


def report(runs: list[Run], pairs: int, concurrency: int, latency_s: float) -> bool:
    """Print per-run and median figures; True when the goal is met."""
    theory_s = -(-pairs // concurrency) * latency_s
    for number, run in enumerate(runs, 1):
        print(
            f"run {number}: floor {run.floor_s:.3f} s (in flight {run.floor_in_flight}), "
            f"cycle {run.cycle_s:.3f} s (in flight {run.cycle_in_flight}, {run.ok} ok, {run.failed} failed), "
            f"cycle/floor {run.cycle_s / run.floor_s:.3f}, cycle/theoretical {run.cycle_s / theory_s:.3f}"
        )
    ratio = statistics.median(run.cycle_s / run.floor_s for run in runs)
    in_flight = {run.cycle_in_flight for run in runs}
    failed = sum(run.failed for run in runs)
    print(f"theoretical floor: ceil({pairs} / {concurrency}) x {latency_s * 1000:.0f} ms = {theory_s:.3f} s")
    print(f"median floor (measured): {statistics.median(run.floor_s for run in runs):.3f} s")
    print(f"median cycle: {statistics.median(run.cycle_s for run in runs):.3f} s")
    print(f"median ratio cycle/measured floor: {ratio:.3f} (at most {MAX_RATIO})")
    print(f"median ratio cycle/theoretical floor: {statistics.median(run.cycle_s / theory_s for run in runs):.3f}")
    print(f"fake max in flight during cycles: {', '.join(map(str, sorted(in_flight)))} (expected {concurrency})")
    print(f"pairs: {sum(run.ok for run in runs)} ok, {failed} failed over {len(runs)} cycles")
    met = ratio <= MAX_RATIO and in_flight == {min(concurrency, pairs)} and failed == 0
    print("PASS" if met else "FAIL")
    return met


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with FakeFlutterwave() as fake, tempfile.TemporaryDirectory(prefix="bench-poll-") as tmp:
        fake.latency_s = args.latency
        settings = Settings(
            _env_file=None,
            environment="test",
            database_url=args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'rates.db'}",
            flutterwave_secret_key=SECRET_KEY,
            flutterwave_base_url=fake.url,
            poller_enabled=False,
            upstream_concurrency=args.concurrency,
            redis_url=None,
        )
        database = (
            "PostgreSQL" if settings.database_url.get_secret_value().startswith("postgresql") else "SQLite (temporary)"
        )
        print(f"{len(settings.pairs)} pairs, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}")
        print(f"database: {database}")
        runs = asyncio.run(bench(settings, fake, args.cycles))
    return 0 if report(runs, len(settings.pairs), args.concurrency, args.latency) else 1


if __name__ == "__main__":
    sys.exit(main())
