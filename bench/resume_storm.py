"""Benchmark: a reconnect storm. The clients of a killed replica all resume on the survivor at once.

The workload: two replicas of the service (`uvicorn app.main:app` with the
Dockerfile's flags) share PostgreSQL and Redis and poll the fake upstream every
--interval seconds (10); it answers after 150 ms and drifts, so all 44 pairs
change every cycle. B, the survivor, starts first and holds the poller's lease.

1. Baseline, in the same run: --clients fresh clients connect to B at once (a
   plain-connect storm of the same size), each until its `all_rates` snapshot;
   then they leave.
2. --clients clients connect to A and follow it (every frame applied to a board,
   the epoch and last promised `seq` kept, docs/websocket.md "Resume and
   heartbeats"); after a poll cycle has reached them all, A is killed (SIGKILL
   by its PID).
3. Each client reconnects to B at once with `?epoch=E&seq=N` (one that fails
   tries again after 0.1-0.5 s, in both storms). Measured: how many got
   `resumed` (the rest `all_rates`), time from the kill to each first frame
   (p50, p99, max), resumes per second against plain connects per second.
4. The clients follow B through at least one whole cycle; then the upstream stops
   moving, and after two more cycle ends every client's board must equal B's
   `/api/rates/all` (none missing a change). The gaps between B's cycle ends
   from the kill on show whether B kept its poll interval through the storm.

Targets (PASS/MISS; a MISS exits 1): every client resumed; every board equal to
B's; every gap between cycle ends under 1.5 x --interval; resumes per second at
least plain connects per second.

Run from the repository root (full scale by default; --clients 200 to try it):

    python -m bench.resume_storm
    python -m bench.resume_storm --clients 200 --redis-url redis://127.0.0.1:6379/10
"""

import argparse
import asyncio
import collections
import contextlib
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from bench.live_clients import Follower, WsFollower, open_follower, spread
from bench.rest import LIMITS_OFF, Server, clean_environment, free_port, stop_server, wait_until
from bench.ws_clients import CommandLoop, client_processes, close_all, cpu_sets, quantile
from bench.ws_cycle import BASES, DOCKER_FLAGS, PAIRS, POSTGRES_ADMIN_URL, flush_redis, reset_postgres
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave

HOLD_IN_FLIGHT = 200  # per client process: the unmeasured connects to A, a few at a time
GAP_FACTOR = 1.5  # a gap between cycle ends past this many intervals: the interval was not kept


class StormWorker(CommandLoop):
    """One client process: connects its share, follows, reconnects with a resume when its replica dies."""

    def __init__(self, pipe: Connection, host: str, port: int) -> None:
        self.pipe, self.host = pipe, host
        self.clients: list[WsFollower] = []
        self.reconnects: list[asyncio.Task[tuple[str, int]]] = []
        self.followers: list[Follower] = []
        self.closing = False
        self.survivor = 0
        self.timeout_s = 0.0
        self.all_lost = asyncio.Event()

    async def _until_first(self, follower: Follower, port: int, path: str, deadline: float) -> tuple[str, int]:
        """Connect until a first frame comes (a failure tries again shortly): its type, and the tries it took."""
        loop = asyncio.get_running_loop()
        tries = 0
        while True:
            tries += 1
            follower.new_connection()
            make: Callable[[], WsFollower] = lambda: self._client(follower, port, path)  # noqa: E731
            result = await open_follower(make, follower, self.host, port, deadline)
            if result in ("all_rates", "resumed") or loop.time() >= deadline or self.closing:
                return result, tries
            await asyncio.sleep(random.uniform(0.1, 0.5))

    def _client(self, follower: Follower, port: int, path: str) -> WsFollower:
        client = WsFollower(self.host, port, True, follower, path, on_lost=self._lost)
        self.clients.append(client)
        return client

    def _lost(self, client: WsFollower) -> None:
        if self.closing or client.follower.first is None:
            return  # leaving, or a connect that failed (its own loop retries)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        path = "/ws/rates" + client.follower.resume_query()
        self.reconnects.append(asyncio.create_task(self._until_first(client.follower, self.survivor, path, deadline)))
        if len(self.reconnects) >= len(self.followers):
            self.all_lost.set()

    async def storm(self, count: int, port: int, start_at: float, timeout_s: float) -> dict[str, Any]:
        """The baseline: `count` fresh clients at once; when each got its snapshot; then they leave."""
        self.closing, self.survivor, self.timeout_s = False, port, timeout_s
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = asyncio.get_running_loop().time() + timeout_s
        followers = [Follower() for _ in range(count)]
        results = await asyncio.gather(*(self._until_first(f, port, "/ws/rates", deadline) for f in followers))
        firsts = [f.first_at for f, (kind, _) in zip(followers, results, strict=True) if kind == "all_rates"]
        reply = self._outcome(results, firsts)
        await self.close()
        return reply

    def _outcome(self, results: list[tuple[str, int]], firsts: list[float]) -> dict[str, Any]:
        return {
            "kinds": dict(collections.Counter(kind for kind, _ in results)),
            "retries": sum(tries - 1 for _, tries in results),
            "firsts": firsts,
        }

    async def hold(self, count: int, port: int, survivor: int, timeout_s: float) -> dict[str, Any]:
        """`count` clients follow the replica at `port`; each resumes on `survivor` when it dies."""
        self.closing, self.survivor, self.timeout_s = False, survivor, timeout_s
        self.reconnects = []
        self.all_lost.clear()
        deadline = asyncio.get_running_loop().time() + timeout_s
        limiter = asyncio.Semaphore(HOLD_IN_FLIGHT)
        self.followers = [Follower() for _ in range(count)]

        async def one(follower: Follower) -> tuple[str, int]:
            async with limiter:
                return await self._until_first(follower, port, "/ws/rates", deadline)

        results = await asyncio.gather(*(one(follower) for follower in self.followers))
        return {"kinds": dict(collections.Counter(kind for kind, _ in results))}

    async def cycles(self, since: float, wanted: int, timeout_s: float) -> dict[str, Any]:
        """Until every client has had `wanted` cycle ends after `since` (or the time is up): how many fell short."""
        deadline = time.time() + timeout_s
        short = len(self.followers)
        while time.time() < deadline:
            short = sum(sum(t > since for t in f.cycle_ends) < wanted for f in self.followers)
            if not short:
                break
            await asyncio.sleep(0.1)
        return {"short": short}

    async def resumed(self, timeout_s: float) -> dict[str, Any]:
        """Once every client has lost its replica and reconnected: how each began again, and when."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_lost.wait(), timeout_s)
        results = await asyncio.gather(*self.reconnects)
        firsts = [f.first_at for f in self.followers if f.first in ("resumed", "all_rates")]
        reply = self._outcome(list(results), firsts)
        reply["lost"] = len(self.reconnects)
        return reply

    async def gaps(self, since: float) -> dict[str, Any]:
        """The cycle ends the first client heard after `since`."""
        return {"ends": [t for t in self.followers[0].cycle_ends if t > since] if self.followers else []}

    async def compare(self, expected: dict[str, str]) -> dict[str, Any]:
        """How many boards differ from `expected` (pair -> destination_per_source), with one example."""
        wanted = {pair: Decimal(value) for pair, value in expected.items()}
        differing, example = 0, ""
        epochs = collections.Counter(f.epoch for f in self.followers)
        for follower in self.followers:
            held = {pair: Decimal(value) for pair, (_, value) in follower.board.items()}
            if held != wanted:
                differing += 1
                if not example:
                    wrong = sorted(pair for pair in wanted.keys() | held.keys() if held.get(pair) != wanted.get(pair))
                    example = ", ".join(f"{p}: held {held.get(p)} served {wanted.get(p)}" for p in wrong[:3])
        return {"differing": differing, "example": example, "epochs": len(epochs)}

    async def close(self) -> dict[str, Any]:
        self.closing = True
        closed, self.clients = await close_all(self.clients), []
        return {"closed": closed}


def start_replica(name: str, fake: FakeFlutterwave, args: argparse.Namespace, directory: Path, cpus: Any) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning", *DOCKER_FLAGS]
    env = clean_environment(
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": args.postgres_url,
            "REDIS_URL": args.redis_url,
            "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
            "FLUTTERWAVE_BASE_URL": fake.url,
            "POLL_INTERVAL_SECONDS": str(args.interval),
            "RATE_STALE_AFTER_SECONDS": "3600",
            **LIMITS_OFF,
        }
    )

    def pin() -> None:  # in the child, before exec: every thread the server starts inherits it
        if cpus:
            os.sched_setaffinity(0, cpus)

    with (directory / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(
            command, cwd=args.service_dir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
    server = Server(name, f"http://127.0.0.1:{port}", process)
    wait_until(server, directory / f"{name}.log", args.ready_timeout, all_stored)
    return server


def all_stored(client: httpx.Client) -> bool:
    return client.get("/readyz").status_code == 200 and len(served_board(client)) >= PAIRS


def served_board(client: httpx.Client) -> dict[str, str]:
    board: dict[str, str] = {}
    for base in BASES:
        rates = client.get("/api/rates/all", params={"base_currency": base}).json()["data"]["rates"]
        board.update({f"{base}/{code}": str(item["destination_per_source"]) for code, item in rates.items()})
    return board


def leading(server: Server) -> bool:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        return "leading" in client.get("/readyz").json()["data"]["poller"]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if math.isfinite(seconds) else "n/a"


def spread_report(name: str, delays: list[float], count: int, kinds: dict[str, int], retries: int) -> float:
    """Print one storm's figures; its rate (first frames per second, over the time to the last)."""
    delays.sort()
    rate = len(delays) / delays[-1] if delays and delays[-1] > 0 else 0.0
    print(
        f"  {name}: {len(delays):,}/{count:,} got their first frame ({kinds}; {retries} retries); "
        f"time to it p50 {ms(quantile(delays, 0.5))}, p99 {ms(quantile(delays, 0.99))}, "
        f"max {ms(delays[-1] if delays else math.nan)}: {rate:,.0f} clients/s"
    )
    return rate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.resume_storm", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000, help="N (default 10,000; e.g. 200 to try it)")
    parser.add_argument("--interval", type=float, default=10, help="poll interval, s (default 10)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for each storm (default 120)")
    parser.add_argument("--ready-timeout", type=float, default=90)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="flushed first")
    parser.add_argument("--postgres-url", default="postgresql+asyncpg://127.0.0.1:5432/fxrates_bench_storm")
    parser.add_argument("--postgres-admin", default=POSTGRES_ADMIN_URL, help="psql URL that may create databases")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="servers on CPU 0")
    parser.add_argument("--service-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--log-dir", type=Path, help="keep the replicas' logs here")
    args = parser.parse_args(argv)
    args.postgres_set = []
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_cpus, client_cpus = cpu_sets(args.pin)
    verdicts: list[tuple[bool, str]] = []
    flush_redis(args.redis_url)
    reset_postgres(args)
    with (
        FakeFlutterwave() as fake,
        tempfile.TemporaryDirectory(prefix="bench-resume-storm-") as tmp,
    ):
        fake.latency_s, fake.drift = 0.15, Decimal("0.0005")
        directory = Path(tmp)
        servers: list[Server] = []
        try:
            b = start_replica("b", fake, args, directory, server_cpus)
            servers.append(b)
            a = start_replica("a", fake, args, directory, server_cpus)
            servers.append(a)
            if not leading(b):
                raise RuntimeError("B, started first, does not hold the poller's lease")
            port_a, port_b = (int(server.url.rsplit(":", 1)[1]) for server in (a, b))
            print(f"N = {args.clients:,}: A pid {a.process.pid} at {a.url}, B (polling) pid {b.process.pid} at {b.url}")
            procs = 1 if args.clients < 100 else args.client_procs
            shares = spread(args.clients, procs)
            with client_processes(procs, port_b, client_cpus, StormWorker) as workers:
                start_at = time.time() + 0.5
                replies = workers.ask(*(("storm", share, port_b, start_at, args.timeout) for share in shares))
                plain = spread_report(
                    "baseline, plain connects to B at once",
                    [first - start_at for reply in replies for first in reply["firsts"]],
                    args.clients,
                    merged(reply["kinds"] for reply in replies),
                    sum(reply["retries"] for reply in replies),
                )
                replies = workers.ask(*(("hold", share, port_a, port_b, args.timeout) for share in shares))
                print(f"  {args.clients:,} clients follow A: {merged(reply['kinds'] for reply in replies)}")
                held_since = time.time()
                workers.ask(("cycles", held_since, 1, args.interval * 3 + args.timeout))
                killed_at = time.time()
                a.process.send_signal(signal.SIGKILL)
                a.process.wait(timeout=10)
                print(f"  A killed (SIGKILL, pid {a.process.pid})")
                replies = workers.ask(("resumed", args.timeout))
                kinds = merged(reply["kinds"] for reply in replies)
                resumes = spread_report(
                    "the storm, resumes on B",
                    [first - killed_at for reply in replies for first in reply["firsts"]],
                    args.clients,
                    kinds,
                    sum(reply["retries"] for reply in replies),
                )
                resumed_at = time.time()
                short = sum(r["short"] for r in workers.ask(("cycles", resumed_at, 1, args.interval * 3)))
                fake.drift = None  # the upstream stops moving: the boards can then be compared with B's
                frozen_at = time.time()
                short += sum(r["short"] for r in workers.ask(("cycles", frozen_at, 2, args.interval * 4)))
                with httpx.Client(base_url=b.url, timeout=30) as http:
                    expected = served_board(http)
                compared = workers.ask(("compare", expected))
                ends = sorted(workers.ask(("gaps", killed_at))[0]["ends"])
                gaps = [later - earlier for earlier, later in itertools.pairwise(ends)]
                workers.ask(("close",))
            differing = sum(reply["differing"] for reply in compared)
            examples = [reply["example"] for reply in compared if reply["example"]]
            epochs = max(reply["epochs"] for reply in compared)
            print(
                f"  boards: {args.clients - differing:,}/{args.clients:,} equal B's /api/rates/all "
                f"({len(expected)} pairs){'; e.g. ' + examples[0] if examples else ''}; "
                f"{short} client-cycles short; epochs seen {epochs}"
            )
            print(
                f"  B's cycle ends after the kill: {len(ends)}, gaps "
                + (", ".join(f"{gap:.2f} s" for gap in gaps) or "none")
                + f" (interval {args.interval:g} s)"
            )
            ratio = resumes / plain if plain else math.nan
            print(f"  resumes/s / plain connects/s = {ratio:.2f}")
            verdicts += [
                (kinds.get("resumed", 0) == args.clients, f"all {args.clients:,} resumed ({kinds})"),
                (differing == 0 and short == 0, "every board equals B's /api/rates/all"),
                (
                    len(gaps) >= 2 and max(gaps) < GAP_FACTOR * args.interval,
                    f"B's poll interval kept (every gap under {GAP_FACTOR:g} x {args.interval:g} s)",
                ),
                (ratio >= 1.0, f"resumes per second at least plain connects per second ({ratio:.2f}x)"),
            ]
        finally:
            for server in servers:
                if server.process.poll() is None:
                    stop_server(server)
            if args.log_dir is not None:
                args.log_dir.mkdir(parents=True, exist_ok=True)
                for log in directory.glob("*.log"):
                    (args.log_dir / f"resume-storm-{log.name}").write_bytes(log.read_bytes())
    for met, text in verdicts:
        print(f"  {'PASS' if met else 'MISS'}: {text}")
    return 0 if all(met for met, _ in verdicts) else 1


def merged(counters: Any) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
