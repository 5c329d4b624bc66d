"""Benchmark: what heartbeats cost a process holding many idle WebSocket clients.

The workload: one service (`uvicorn app.main:app` with the Dockerfile's
flags, the demo provider, SQLite, no Redis) polls once at start and then
stores nothing, so its --clients clients (10,000) are sent nothing but
heartbeats (docs/websocket.md, "Resume and heartbeats"). Two runs in one
invocation, each a fresh process with the same clients connected and settled:

- baseline: `WS_HEARTBEAT_SECONDS=3600`, heartbeats effectively off;
- heartbeats: `WS_HEARTBEAT_SECONDS=--heartbeat` (2), several rounds per window.

Measured over a quiet --window (30 s) in each: the process's CPU time, utime +
stime from /proc/<pid>/stat (every thread), as a share of one core; the
heartbeats' cost is the difference. Also the heartbeats each client got in the
window, and the gaps between them (p50, p99, max) against the interval.

Target (PASS/MISS; a MISS exits 1): heartbeats cost under 5 % of one core.

Run from the repository root (full scale by default; --clients 200 to try it):

    python -m bench.idle_heartbeats
    python -m bench.idle_heartbeats --clients 200 --window 10
"""

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.live_clients import Follower, WsFollower, open_follower, proc_cpu_s, spread
from bench.rest import LIMITS_OFF, Server, clean_environment, free_port, stop_server, wait_until
from bench.ws_clients import CommandLoop, client_processes, close_all, cpu_sets, quantile
from bench.ws_cycle import DOCKER_FLAGS, change_ready

CONNECT_IN_FLIGHT = 200  # per client process: connects are not what this measures
GAPS_PER_PROCESS = 1000  # clients per process whose heartbeat gaps are sent back
TARGET_CORE_SHARE = 0.05
OFF_S = 3600


class IdleWorker(CommandLoop):
    """One client process: connects its share, then only listens."""

    def __init__(self, pipe: Connection, host: str, port: int) -> None:
        self.pipe, self.host = pipe, host
        self.clients: list[WsFollower] = []
        self.followers: list[Follower] = []

    async def connect(self, count: int, port: int, timeout_s: float) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        limiter = asyncio.Semaphore(CONNECT_IN_FLIGHT)
        self.followers = [Follower() for _ in range(count)]

        async def one(follower: Follower) -> str:
            async with limiter:
                return await open_follower(lambda: self._client(follower, port), follower, self.host, port, deadline)

        results = await asyncio.gather(*(one(follower) for follower in self.followers))
        return {"ok": sum(result == "all_rates" for result in results), "failed": sorted(set(results) - {"all_rates"})}

    def _client(self, follower: Follower, port: int) -> WsFollower:
        client = WsFollower(self.host, port, True, follower)
        self.clients.append(client)
        return client

    async def beats(self, since: float, until: float) -> dict[str, Any]:
        """Heartbeats per client in the window, and the gaps between them for a sample of clients."""
        counts, gaps = [], []
        for index, follower in enumerate(self.followers):
            times = [t for t in follower.heartbeats if since <= t <= until]
            counts.append(len(times))
            if index < GAPS_PER_PROCESS:
                gaps += [later - earlier for earlier, later in itertools.pairwise(times)]
        alive = sum(client.alive for client in self.clients)
        return {"counts": counts, "gaps": gaps, "alive": alive}

    async def close(self) -> dict[str, Any]:
        closed = await close_all(self.clients)
        self.clients, self.followers = [], []
        return {"closed": closed}


def start_service(directory: Path, heartbeat_s: float, cpus: set[int] | None, args: argparse.Namespace) -> Server:
    """The service on the demo provider and SQLite, polling once at start, then quiet."""
    env = clean_environment(
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": f"sqlite+aiosqlite:///{directory / f'rates-{heartbeat_s:g}.db'}",
            "POLL_INTERVAL_SECONDS": "3600",
            "RATE_STALE_AFTER_SECONDS": "7200",
            "WS_HEARTBEAT_SECONDS": f"{heartbeat_s:g}",
            **LIMITS_OFF,
        }
    )
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning", *DOCKER_FLAGS]

    def pin() -> None:  # in the child, before exec: every thread the server starts inherits it
        if cpus:
            os.sched_setaffinity(0, cpus)

    log_path = directory / f"server-{heartbeat_s:g}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=args.service_dir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
    server = Server(f"heartbeats every {heartbeat_s:g} s", f"http://127.0.0.1:{port}", process)
    wait_until(server, log_path, args.ready_timeout, change_ready)
    return server


def measure(heartbeat_s: float, args: argparse.Namespace, directory: Path, cpus: Any) -> dict[str, Any]:
    """One process with the clients connected: its CPU over a quiet window, and the heartbeats they got."""
    server_cpus, client_cpus = cpus
    server = start_service(directory, heartbeat_s, server_cpus, args)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        procs = 1 if args.clients < 100 else args.client_procs
        with client_processes(procs, port, client_cpus, IdleWorker) as workers:
            replies = workers.ask(*(("connect", share, port, args.timeout) for share in spread(args.clients, procs)))
            connected = sum(reply["ok"] for reply in replies)
            failed = sorted({reason for reply in replies for reason in reply["failed"]})
            time.sleep(args.settle)
            pid = server.process.pid
            since, before = time.time(), proc_cpu_s(pid)
            time.sleep(args.window)
            until, after = time.time(), proc_cpu_s(pid)
            replies = workers.ask(("beats", since, until))
            workers.ask(("close",))
    finally:
        stop_server(server)
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            for log in directory.glob(f"server-{heartbeat_s:g}.log"):
                (args.log_dir / f"idle-heartbeats-{log.name}").write_bytes(log.read_bytes())
    counts = sorted(count for reply in replies for count in reply["counts"])
    gaps = sorted(gap for reply in replies for gap in reply["gaps"])
    share = (after - before) / (until - since)
    print(
        f"  WS_HEARTBEAT_SECONDS={heartbeat_s:g}: {connected:,}/{args.clients:,} connected"
        f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}, "
        f"{sum(reply['alive'] for reply in replies):,} still open after the window; "
        f"server CPU {after - before:.2f} s in {until - since:.1f} s = {share * 100:.2f} % of one core; "
        f"heartbeats per client min {counts[0] if counts else 0}, max {counts[-1] if counts else 0}; "
        f"gaps p50 {sec(quantile(gaps, 0.5))}, p99 {sec(quantile(gaps, 0.99))}, "
        f"max {sec(gaps[-1] if gaps else math.nan)}"
    )
    return {"share": share, "connected": connected, "counts": counts}


def sec(value: float) -> str:
    return f"{value:.2f} s" if math.isfinite(value) else "n/a"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_heartbeats", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000, help="N (default 10,000; e.g. 200 to try it)")
    parser.add_argument("--heartbeat", type=float, default=2, help="WS_HEARTBEAT_SECONDS measured (default 2)")
    parser.add_argument("--window", type=float, default=30, help="quiet window measured, s (default 30)")
    parser.add_argument("--settle", type=float, default=5, help="pause after connecting, s (default 5)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to connect them all (default 120)")
    parser.add_argument("--ready-timeout", type=float, default=90)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="server on CPU 0")
    parser.add_argument("--service-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--log-dir", type=Path, help="keep the servers' logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = cpu_sets(args.pin)
    print(f"N = {args.clients:,} idle clients, a {args.window:g} s window each")
    with tempfile.TemporaryDirectory(prefix="bench-idle-heartbeats-") as tmp:
        off = measure(OFF_S, args, Path(tmp), cpus)
        on = measure(args.heartbeat, args, Path(tmp), cpus)
    cost = on["share"] - off["share"]
    ratio = on["share"] / off["share"] if off["share"] else math.inf
    # The hub looks for clients due a heartbeat every quarter interval, so one may come up to 1.25 intervals apart.
    rounds = math.floor(args.window / (args.heartbeat * 1.25)) - 1
    every_client_beat = bool(on["counts"]) and on["counts"][0] >= max(1, rounds)
    print(
        f"  heartbeats cost {cost * 100:.2f} % of one core for {on['connected']:,} clients "
        f"({ratio:.2f}x the baseline's CPU)"
    )
    verdicts = [
        (on["connected"] == off["connected"] == args.clients, f"all {args.clients:,} connected in both runs"),
        (every_client_beat, f"every client had at least {max(1, rounds)} heartbeats in the window"),
        (cost < TARGET_CORE_SHARE, f"heartbeats under {TARGET_CORE_SHARE:.0%} of one core ({cost * 100:.2f} %)"),
    ]
    for met, text in verdicts:
        print(f"  {'PASS' if met else 'MISS'}: {text}")
    return 0 if all(met for met, _ in verdicts) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
