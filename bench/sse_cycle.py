"""Benchmark: a poll cycle to N server-sent-event clients against the same cycle to N WebSocket clients.

The workload, as bench/ws_cycle.py's: one service (`uvicorn app.main:app` with
the Dockerfile's flags, SQLite, Redis unless --redis-url ''), polling the fake
upstream every --interval seconds (10); it answers after 150 ms and drifts, so
all 44 pairs change every cycle. Two phases on the same process in one run:

- baseline: --clients (1,000) WebSocket clients on `/ws/rates` (raw sockets,
  permessage-deflate offered, as browsers do);
- SSE: as many clients of `/sse/rates` (raw HTTP/1.1, the chunked body parsed
  into `event:`/`data:` lines, docs/sse.md).

Each phase connects its clients, waits for a cycle end to reach them all, then
takes every `rate_update` of the next --cycles (3) cycles. Latency is receipt
- the rate's `last_updated` (the moment the upstream's answer reached the
service), as bench/ws_cycle.py measures it: p50, p99, max, and deliveries
against those due (44 per client per cycle).

Target (PASS/MISS; a MISS exits 1): the SSE p99 within 2x the WebSocket p99,
and every due delivery made in both phases.

Run from the repository root (full scale by default; --clients 200 to try it):

    python -m bench.sse_cycle
    python -m bench.sse_cycle --clients 200 --redis-url redis://127.0.0.1:6379/10
"""

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.live_clients import Follower, SseFollower, WsFollower, open_follower, spread
from bench.rest import LIMITS_OFF, Server, clean_environment, free_port, stop_server, wait_until
from bench.resume_storm import all_stored
from bench.ws_clients import CommandLoop, client_processes, close_all, cpu_sets, quantile
from bench.ws_cycle import DOCKER_FLAGS, PAIRS, flush_redis, ms
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave

CONNECT_IN_FLIGHT = 200  # per client process: connects are not what this measures
TARGET_RATIO = 2.0


class CycleWorker(CommandLoop):
    """One client process: its share of one transport's clients, each keeping the latency of every update."""

    def __init__(self, pipe: Connection, host: str, port: int) -> None:
        self.pipe, self.host = pipe, host
        self.clients: list[WsFollower | SseFollower] = []
        self.followers: list[Follower] = []

    async def connect(self, transport: str, count: int, port: int, timeout_s: float) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        limiter = asyncio.Semaphore(CONNECT_IN_FLIGHT)
        self.followers = [Follower(keep_latencies=True) for _ in range(count)]

        def make(follower: Follower) -> Callable[[], asyncio.Protocol]:
            def client() -> asyncio.Protocol:
                made = (
                    WsFollower(self.host, port, True, follower)
                    if transport == "ws"
                    else SseFollower(self.host, port, follower)
                )
                self.clients.append(made)
                return made

            return client

        async def one(follower: Follower) -> str:
            async with limiter:
                return await open_follower(make(follower), follower, self.host, port, deadline)

        results = await asyncio.gather(*(one(follower) for follower in self.followers))
        return {"ok": sum(result == "all_rates" for result in results), "failed": sorted(set(results) - {"all_rates"})}

    async def cycles(self, wanted: int, timeout_s: float) -> dict[str, Any]:
        """Until every client has had `wanted` cycle ends since the last reset (or the time is up)."""
        deadline = time.time() + timeout_s
        short = len(self.followers)
        while time.time() < deadline:
            short = sum(len(follower.cycle_ends) < wanted for follower in self.followers)
            if not short:
                break
            await asyncio.sleep(0.1)
        return {"short": short}

    async def reset(self) -> dict[str, Any]:
        for follower in self.followers:
            follower.latencies.clear()
            follower.cycle_ends.clear()
        return {}

    async def collect(self) -> dict[str, Any]:
        return {"latencies": [value for follower in self.followers for value in follower.latencies]}

    async def close(self) -> dict[str, Any]:
        closed = await close_all(self.clients)
        self.clients, self.followers = [], []
        return {"closed": closed}


def start_service(fake: FakeFlutterwave, directory: Path, cpus: set[int] | None, args: argparse.Namespace) -> Server:
    env = clean_environment(
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'rates.db'}",
            **({"REDIS_URL": args.redis_url} if args.redis_url else {}),
            "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
            "FLUTTERWAVE_BASE_URL": fake.url,
            "POLL_INTERVAL_SECONDS": str(args.interval),
            "RATE_STALE_AFTER_SECONDS": "3600",
            **LIMITS_OFF,
        }
    )
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning", *DOCKER_FLAGS]

    def pin() -> None:  # in the child, before exec: every thread the server starts inherits it
        if cpus:
            os.sched_setaffinity(0, cpus)

    log_path = directory / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=args.service_dir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
    server = Server("service", f"http://127.0.0.1:{port}", process)
    wait_until(server, log_path, args.ready_timeout, all_stored)
    return server


def phase(transport: str, port: int, args: argparse.Namespace, client_cpus: set[int] | None) -> dict[str, Any]:
    """One transport's clients through --cycles poll cycles: their latencies and deliveries."""
    procs = 1 if args.clients < 100 else args.client_procs
    cycle_timeout = args.interval * 2 + args.timeout
    with client_processes(procs, port, client_cpus, CycleWorker) as workers:
        shares = spread(args.clients, procs)
        replies = workers.ask(*(("connect", transport, share, port, args.timeout) for share in shares))
        connected = sum(reply["ok"] for reply in replies)
        failed = sorted({reason for reply in replies for reason in reply["failed"]})
        # Measured from the first whole cycle every client is in: after a cycle end has reached them all.
        workers.ask(("reset",))
        short = sum(reply["short"] for reply in workers.ask(("cycles", 1, cycle_timeout)))
        workers.ask(("reset",))
        short += sum(reply["short"] for reply in workers.ask(("cycles", args.cycles, cycle_timeout * args.cycles)))
        latencies = sorted(value for reply in workers.ask(("collect",)) for value in reply["latencies"])
        workers.ask(("close",))
    due = args.clients * PAIRS * args.cycles
    p99 = quantile(latencies, 0.99)
    print(
        f"  {transport}: {connected:,}/{args.clients:,} connected"
        f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; {len(latencies):,} updates received over "
        f"{args.cycles} cycles ({due:,} due; {short} client-cycles short); receipt - last_updated "
        f"p50 {ms(quantile(latencies, 0.5))}, p99 {ms(p99)}, max {ms(latencies[-1] if latencies else math.nan)}"
    )
    return {"p99": p99, "received": len(latencies), "due": due, "connected": connected, "short": short}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_cycle", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="N per transport (default 1,000; e.g. 200)")
    parser.add_argument("--cycles", type=int, default=3, help="measured cycles per transport (default 3)")
    parser.add_argument("--interval", type=float, default=10, help="poll interval, s (default 10)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to connect them all (default 60)")
    parser.add_argument("--ready-timeout", type=float, default=90)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="flushed first; '' for none")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="server on CPU 0")
    parser.add_argument("--service-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--log-dir", type=Path, help="keep the server's log here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_cpus, client_cpus = cpu_sets(args.pin)
    if args.redis_url:
        flush_redis(args.redis_url)
    with FakeFlutterwave() as fake, tempfile.TemporaryDirectory(prefix="bench-sse-cycle-") as tmp:
        fake.latency_s, fake.drift = 0.15, Decimal("0.0005")
        directory = Path(tmp)
        server = start_service(fake, directory, server_cpus, args)
        try:
            port = int(server.url.rsplit(":", 1)[1])
            print(f"N = {args.clients:,} per transport: server pid {server.process.pid} at {server.url}")
            ws = phase("ws", port, args, client_cpus)
            sse = phase("sse", port, args, client_cpus)
        finally:
            stop_server(server)
            if args.log_dir is not None:
                args.log_dir.mkdir(parents=True, exist_ok=True)
                (args.log_dir / "sse-cycle-server.log").write_bytes((directory / "server.log").read_bytes())
    ratio = sse["p99"] / ws["p99"] if ws["p99"] > 0 else math.inf
    print(f"  p99 SSE / p99 WebSocket = {ratio:.2f}")
    verdicts = [
        (
            all(result["connected"] == args.clients and result["short"] == 0 for result in (ws, sse)),
            f"all {args.clients:,} connected and through every cycle, both transports",
        ),
        (
            all(result["received"] >= result["due"] for result in (ws, sse)),
            "every due update delivered, both transports",
        ),
        (ratio <= TARGET_RATIO, f"SSE p99 within {TARGET_RATIO:g}x the WebSocket's ({ratio:.2f}x)"),
    ]
    for met, text in verdicts:
        print(f"  {'PASS' if met else 'MISS'}: {text}")
    return 0 if all(met for met, _ in verdicts) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
