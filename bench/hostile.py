"""Benchmark: a hostile mix beside N ordinary WebSocket clients through poll cycles, one replica run as the image.

The workload (docs/performance.md, "Hostile mix"): bench/ws_cycle.py's (the fake
upstream answers after 150 ms and drifts, so all 44 polled pairs change every
cycle; a cycle every --interval s; --clients ordinary clients hold /ws/rates
open, offering permessage-deflate, a sample of them timing every delivery
against its `last_updated`), on one uvicorn process with the Dockerfile's
flags (ws_cycle's DOCKER_FLAGS) plus `--proxy-headers --forwarded-allow-ips
127.0.0.1`, with the production limits (docs/limits.md). The one departure:
every client here connects from 127.0.0.1, so WS_MAX_CLIENTS_PER_ADDRESS is
raised to hold them all. No Redis unless --redis-url: the limiter then counts
in the process's memory, the worst case for that memory.

First --cycles quiet cycles are measured; then the same number again while,
from another process, attackers run for the whole window:

- inflation bombs: --bombs connections at once, each sending one compressed
  message that inflates to --bomb-mib MiB (a few KiB on the wire), a wave
  every --interval s; each should be closed with 1009;
- ping floods and empty-fragment floods: --floods connections of each, sending
  as fast as they can, reconnecting once closed; each should be closed with
  1008 within 10 s of its first frame;
- a subscription pile-up: --pileup connections each subscribing the cap
  (WS_MAX_PAIRS_PER_CLIENT, 256 pairs) and then one pair more, which should be
  refused `too_many_pairs`; they stay connected, reading, to the end;
- a limiter flood: --addresses distinct client addresses, one cached
  `GET /api/rates` each through `X-Forwarded-For`, over --flood-connections
  raw keep-alive connections, spread over the window.

Then, alone, a second flood of as many new addresses: with the limiter's
memory bounded (it forgets the least recently seen past 100,000 addresses),
the process grows by little or nothing the second time.

Reported: the ordinary clients' p50, p99 and max with and without the
attackers (target: p99 within 1.5x), the server's peak resident memory over
the whole run (VmHWM; target: under the memory limit in
deploy/kubernetes/deployment.yaml), its memory before and after each address
flood (the limiter's key count is not exposed; its bound is MAX_CLIENTS in
app/limits/per_client.py), and what each attacker got. PASS or MISS per target.

Run from the repository root (the full case wants a quiet machine; the small one is a smoke test):

    python -m bench.hostile
    python -m bench.hostile --clients 50 --addresses 2000 --cycles 1 --interval 5

The cost of the address rules on cached /api/rates is `python -m bench.rest --address-rules`.
"""

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import websockets

from app.currencies import known_currencies
from app.limits.websocket import MAX_PAIRS_PER_CLIENT
from bench.rest import Server, clean_environment, free_port, stop_server, wait_until
from bench.ws_clients import client_processes, rss_kib
from bench.ws_cycle import DOCKER_FLAGS, Case, Result, Worker, ms, ready, summarise
from tests.support.fake_flutterwave import SECRET_KEY, FakeFlutterwave
from tests.support.raw_ws import CONT, PING, TEXT, deflated, flood, frame, raw_client
from tests.support.replicas import Replica

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "deployment.yaml"
P99_RATIO_TARGET = 1.5
CLOSE_WITHIN_S = 10.0
# What a second flood of new addresses may add: nothing once the first filled the limiter (100,000 addresses at
# most, about 600 bytes each: docs/limits.md), 2,000 x 600 bytes in the small case; the rest is room for noise.
SECOND_FLOOD_BOUND_MIB = 16
PROXY_FLAGS = ["--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"]
NO_HANDSHAKE = "no handshake: "
RATES_PATH = "/api/rates?source_currency=USD&destination_currency=NGN"


# ---------------------------------------------------------------- the attackers (in their own process)


async def bomb_wave(port: int, count: int, inflated_mib: int) -> list[int | None]:
    """`count` connections at once, each one compressed message that inflates to `inflated_mib` MiB: close codes."""
    bomb = frame(TEXT, deflated(b"x" * (inflated_mib * 2**20)), compressed=True)

    async def one() -> int | str | None:
        try:
            async with raw_client(_at(port)) as attacker:
                await attacker.send(bomb)
                with suppress(TimeoutError):
                    await asyncio.wait_for(attacker.closed.wait(), CLOSE_WITHIN_S)
                return attacker.close_code
        except (TimeoutError, OSError, AssertionError) as error:
            return NO_HANDSHAKE + type(error).__name__

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def flood_until(port: int, kind: str, until: float) -> list[tuple[int | str | None, float]]:
    """Flood pings or empty fragments, reconnecting once closed, until `until`: (close code, seconds to close)."""
    outcomes: list[tuple[int | str | None, float]] = []
    batch = frame(PING, b"p" * 125) * 64 if kind == "ping" else frame(CONT, fin=False) * 1000
    while time.monotonic() < until:
        try:
            async with raw_client(_at(port)) as attacker:
                if kind == "fragment":
                    await attacker.send(frame(TEXT, b"", fin=False))
                try:
                    started = await flood(attacker, batch)
                except TimeoutError:
                    outcomes.append((None, math.inf))  # still open 10 s after its first frame
                    continue
                outcomes.append((attacker.close_code, attacker.closed_at - started))
        except (TimeoutError, OSError, AssertionError) as error:
            # Refused or not answered in time: no flood, and not a miss of the close rule.
            outcomes.append((NO_HANDSHAKE + type(error).__name__, 0.0))
            await asyncio.sleep(0.1)
    return outcomes


def capped_pairs(count: int) -> list[str]:
    codes = sorted(known_currencies())
    pairs = [f"{source}/{code}" for source in ("USD", "EUR", "GBP", "CAD") for code in codes if code != source]
    return pairs[:count]


async def pile_up(port: int, count: int, until: float) -> Counter[str]:
    """`count` clients each subscribing the cap, then one pair more; kept open and read until `until`."""
    pairs = capped_pairs(MAX_PAIRS_PER_CLIENT + 1)
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/rates", open_timeout=30) as client:
                await client.send(json.dumps({"type": "subscribe", "pairs": pairs[:-1]}))
                await client.send(json.dumps({"type": "subscribe", "pairs": pairs[-1:]}))
                async with asyncio.timeout(max(0.0, until - time.monotonic())):
                    async for raw in client:
                        message = json.loads(raw)
                        if message["type"] == "subscribed":
                            outcomes[f"subscribed to {len(message['pairs'])}"] += 1
                        elif message["type"] == "error":
                            outcomes[f"error {message['code']}"] += 1
        except TimeoutError:
            outcomes["held to the end"] += 1
        except (OSError, websockets.ConnectionClosed) as error:
            outcomes[f"lost: {type(error).__name__}"] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return outcomes


async def address_flood(
    port: int, first: int, count: int, connections: int, seconds: float
) -> tuple[Counter[int], float]:
    """One cached GET /api/rates from each of `count` addresses (10.x.y.z from number `first`), spread over
    `seconds` (0: as fast as it goes) on keep-alive connections: statuses, and how long it took."""
    numbers = iter(range(first, first + count))
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    interval_s = seconds / count if seconds > 0 else 0.0
    sent = 0

    async def connection() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for number in numbers:
                due = started + sent * interval_s
                sent += 1
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                address = f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"
                writer.write(
                    f"GET {RATES_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: {address}\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                statuses[int(head[9:12])] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses, time.monotonic() - started


def _at(port: int) -> Replica:
    # raw_client only reads the port.
    return cast(Replica, SimpleNamespace(port=port))


async def attack(port: int, plan: dict[str, Any]) -> dict[str, Any]:
    until = time.monotonic() + plan["seconds"]

    async def bombs() -> list[int | None]:
        codes: list[int | None] = []
        while time.monotonic() < until:
            codes += await bomb_wave(port, plan["bombs"], plan["bomb_mib"])
            await asyncio.sleep(max(0.0, min(plan["interval"], until - time.monotonic())))
        return codes

    async def floods(kind: str) -> list[tuple[int | None, float]]:
        outcomes = await asyncio.gather(*(flood_until(port, kind, until) for _ in range(plan["floods"])))
        return [outcome for each in outcomes for outcome in each]

    results = await asyncio.gather(
        bombs(),
        floods("ping"),
        floods("fragment"),
        pile_up(port, plan["pileup"], until),
        address_flood(port, 0, plan["addresses"], plan["flood_connections"], plan["seconds"] * 0.8),
        return_exceptions=True,
    )
    names = ("bombs", "ping", "fragment", "pileup", "addresses")
    return {
        name: repr(result) if isinstance(result, BaseException) else result
        for name, result in zip(names, results, strict=True)
    }


def attacker_main(pipe: Connection, port: int, plan: dict[str, Any]) -> None:
    # Below the ordinary clients on the CPU they share, so what they measure is the server, not their own wait.
    os.nice(10)
    pipe.send(asyncio.run(attack(port, plan)))
    pipe.close()


# ---------------------------------------------------------------- the run


def manifest_limit_mib(path: Path = MANIFEST) -> float:
    """The container's memory limit in the Kubernetes manifest, MiB."""
    text = path.read_text()
    match = re.search(r"limits:\s*\n\s*memory:\s*(\d+)(Mi|Gi)", text)
    if match is None:
        raise RuntimeError(f"no memory limit found in {path}")
    return float(match[1]) * (1024 if match[2] == "Gi" else 1)


def peak_kib(pid: int) -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match[1]) if match else 0


@contextmanager
def sampling_rss(pid: int, samples: list[int]) -> Iterator[None]:
    """Resident memory every 0.2 s while inside."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            with suppress(OSError, RuntimeError):
                samples.append(rss_kib(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def start_service(
    args: argparse.Namespace, fake: FakeFlutterwave, directory: Path, total: int, server_cpus: set[int] | None
) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning", *DOCKER_FLAGS, *PROXY_FLAGS, "app.main:app"]
    env = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'rates.db'}",
        "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
        "FLUTTERWAVE_BASE_URL": fake.url,
        "POLL_INTERVAL_SECONDS": str(args.interval),
        "RATE_STALE_AFTER_SECONDS": "3600",
        # Every client here is on 127.0.0.1: the only limits raised from production's (docs/limits.md), so that
        # what stops each attacker is the rule meant for it, not the cap on connections from one address (flood
        # connections closed with 1008 linger, read and discarded, up to 10 s each).
        "WS_MAX_CLIENTS_PER_ADDRESS": str(total),
        "WS_MAX_CLIENTS": str(total),
    }
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url

    def pin() -> None:
        if server_cpus:
            os.sched_setaffinity(0, server_cpus)

    with (directory / "server.log").open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=clean_environment(env), stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
    return Server("service", f"http://127.0.0.1:{port}", process)


def measure(workers: Any, seconds: float, result: Result, args: argparse.Namespace) -> None:
    workers.ask(("reset",))
    time.sleep(seconds)
    summarise(result, workers.ask(("collect",)), args)


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def run(args: argparse.Namespace) -> list[bool]:
    # As bench/ws_cycle.py: the server alone on the first CPU, everything else on the others.
    available = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({available[0]}, set(available[1:])) if args.pin and len(available) > 1 else (None, None)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    window_s = (args.cycles + 1) * args.interval + args.interval / 2
    total = 100_000
    limit_mib = manifest_limit_mib()
    case = Case("service", args.clients, "sqlite", "docker", "pair")
    quiet, attacked = Result(case), Result(case)
    samples: list[int] = []
    with FakeFlutterwave() as fake, tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        fake.latency_s = args.upstream_latency
        fake.orientation = "destination_per_source"
        fake.drift = Decimal("0.0005")
        directory = Path(tmp)
        server = start_service(args, fake, directory, total, server_cpus)
        try:
            wait_until(server, directory / "server.log", args.ready_timeout, ready(case))
            pid = server.process.pid
            port = int(server.url.rsplit(":", 1)[1])
            procs = 1 if args.clients < 100 else args.client_procs
            with client_processes(procs, port, client_cpus, Worker) as workers, sampling_rss(pid, samples):
                shares = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
                start_at = time.time() + 0.5
                replies = workers.ask(
                    *(
                        ("connect", share, math.ceil(args.sample / procs), start_at, 60.0, True, False, 0)
                        for share in shares
                    )
                )
                quiet.connected = sum(reply["ok"] + reply["topped_up"] for reply in replies)
                attacked.connected = quiet.connected
                time.sleep(2)
                print(f"{quiet.connected:,} ordinary clients connected; RSS {rss_kib(pid) / 1024:.0f} MiB")
                measure(workers, window_s, quiet, args)
                rss_before_attack = rss_kib(pid)
                plan = {
                    "seconds": window_s + 2 * args.interval,
                    "interval": args.interval,
                    "bombs": args.bombs,
                    "bomb_mib": args.bomb_mib,
                    "floods": args.floods,
                    "pileup": args.pileup,
                    "addresses": args.addresses,
                    "flood_connections": args.flood_connections,
                }
                context = multiprocessing.get_context("spawn")
                parent_end, child_end = context.Pipe()
                attacker = context.Process(target=attacker_main, args=(child_end, port, plan), daemon=True)
                attacker.start()
                child_end.close()
                # Longer than the quiet window: a poller slowed by the attack still completes the measured cycles.
                measure(workers, window_s + 2 * args.interval, attacked, args)
                attacks = parent_end.recv()  # once every attacker is done (the address flood may outlast the window)
                attacker.join(timeout=30)
                time.sleep(2)
                rss_after_attack = rss_kib(pid)
                # A second flood of as many new addresses, alone: a bounded limiter hardly grows.
                statuses, took = asyncio.run(
                    address_flood(port, args.addresses, args.addresses, args.flood_connections, 0)
                )
                time.sleep(2)
                rss_after_second = rss_kib(pid)
                peak = peak_kib(pid)
        finally:
            stop_server(server)
            if args.log_dir is not None:
                args.log_dir.mkdir(parents=True, exist_ok=True)
                (args.log_dir / "hostile-server.log").write_bytes((directory / "server.log").read_bytes())
    return report(
        args,
        quiet,
        attacked,
        attacks,
        (statuses, took),
        (rss_before_attack, rss_after_attack, rss_after_second, peak, max(samples, default=0)),
        limit_mib,
    )


def report(
    args: argparse.Namespace,
    quiet: Result,
    attacked: Result,
    attacks: dict[str, Any],
    second_flood: tuple[Counter[int], float],
    memory: tuple[int, int, int, int, int],
    limit_mib: float,
) -> list[bool]:
    before, after, after_second, peak, sampled_max = (kib / 1024 for kib in memory)
    print(f"\nload average {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    for label, result in (("without attackers", quiet), ("with attackers", attacked)):
        print(
            f"ordinary clients {label}: {len(result.latencies):,} sampled deliveries (made {result.made:,} of "
            f"{result.due:,} due), p50 {ms(result.p(0.5))}, p99 {ms(result.p(0.99))}, "
            f"max {ms(result.latencies[-1] if result.latencies else math.nan)}"
        )
    bombs = attacks["bombs"]
    print(f"inflation bombs ({args.bomb_mib} MiB each): {describe(bombs)}")
    for kind in ("ping", "fragment"):
        outcomes = attacks[kind]
        if isinstance(outcomes, str):
            print(f"{kind} floods: failed: {outcomes}")
            continue
        slowest = max((seconds for code, seconds in outcomes if code == 1008), default=math.nan)
        print(
            f"{kind} floods: {describe([code for code, _ in outcomes])}; "
            f"slowest close {slowest:.2f} s after its first frame"
        )
    print(f"subscription pile-up ({args.pileup} x {MAX_PAIRS_PER_CLIENT} pairs): {describe(attacks['pileup'])}")
    first = attacks["addresses"]
    if isinstance(first, str):
        print(f"address flood: failed: {first}")
    else:
        print(f"address flood ({args.addresses:,} addresses, beside the others): {dict(first[0])} in {first[1]:.1f} s")
    print(
        f"second address flood ({args.addresses:,} new addresses, alone): {dict(second_flood[0])} "
        f"in {second_flood[1]:.1f} s"
    )
    print(
        f"server RSS: {before:.0f} MiB before the attackers, {after:.0f} MiB after, {after_second:.0f} MiB after the "
        f"second address flood (+{after_second - after:.1f} MiB); peak {peak:.0f} MiB (sampled max {sampled_max:.0f})"
    )
    print("limiter keys: not exposed; bounded by MAX_CLIENTS (100,000) in app/limits/per_client.py")

    ratio = attacked.p(0.99) / quiet.p(0.99) if quiet.latencies and attacked.latencies else math.inf
    stopped = stopped_as_meant(attacks)
    targets = [
        (f"ordinary p99 with attackers / without <= {P99_RATIO_TARGET}x: {ratio:.2f}x", ratio <= P99_RATIO_TARGET),
        (f"server peak RSS under the manifest's limit ({limit_mib:.0f} MiB): {peak:.0f} MiB", peak < limit_mib),
        (
            f"limiter memory bounded: a second flood of {args.addresses:,} new addresses added "
            f"{after_second - after:.1f} MiB (<= {SECOND_FLOOD_BOUND_MIB} MiB; the attack with the first "
            f"{after - before:.1f} MiB)",
            after_second - after <= SECOND_FLOOD_BOUND_MIB,
        ),
        ("every attacker stopped as documented (1009, 1008 within 10 s, too_many_pairs)", stopped),
    ]
    print()
    for text, met in targets:
        print(f"{verdict(met)}: {text}")
    return [met for _, met in targets]


def describe(outcomes: Any) -> str:
    if isinstance(outcomes, str):
        return f"failed: {outcomes}"
    counted = outcomes if isinstance(outcomes, Counter) else Counter(str(outcome) for outcome in outcomes)
    return ", ".join(f"{count} x {what}" for what, count in sorted(counted.items())) or "none"


def stopped_as_meant(attacks: dict[str, Any]) -> bool:
    if any(isinstance(outcome, str) for outcome in attacks.values()):
        return False
    # A connection the server did not take in time (on a loaded machine) is no attack on it, and no miss.
    bombs = [code for code in attacks["bombs"] if not str(code).startswith(NO_HANDSHAKE)]
    bombs_ok = bool(bombs) and all(code == 1009 for code in bombs)
    floods_ok = all(
        any(code == 1008 for code, _ in outcomes)
        and all(
            code == 1008 and seconds < CLOSE_WITHIN_S
            for code, seconds in outcomes
            if not str(code).startswith(NO_HANDSHAKE)
        )
        for outcomes in (attacks["ping"], attacks["fragment"])
    )
    pileup: Counter[str] = attacks["pileup"]
    held = pileup["held to the end"]
    pileup_ok = held > 0 and pileup[f"subscribed to {MAX_PAIRS_PER_CLIENT}"] == pileup["error too_many_pairs"] == held
    return bombs_ok and floods_ok and pileup_ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="ordinary WebSocket clients (default 1000)")
    parser.add_argument("--addresses", type=int, default=200_000, help="distinct addresses per flood (200,000)")
    parser.add_argument("--flood-connections", type=int, default=16, help="keep-alive connections of a flood (16)")
    parser.add_argument("--bombs", type=int, default=20, help="inflation bombs per wave (default 20)")
    parser.add_argument("--bomb-mib", type=int, default=15, help="what each bomb inflates to, MiB (default 15)")
    parser.add_argument("--floods", type=int, default=4, help="ping floods, and as many fragment floods (default 4)")
    parser.add_argument("--pileup", type=int, default=200, help="clients subscribing the pairs cap (default 200)")
    parser.add_argument("--cycles", type=int, default=3, help="measured cycles, quiet and attacked (default 3)")
    parser.add_argument("--interval", type=float, default=10, help="poll interval, s (default 10)")
    parser.add_argument("--upstream-latency", type=float, default=0.15, help="the fake's answer delay (0.15 s)")
    parser.add_argument("--sample", type=int, default=1000, help="ordinary clients that time every delivery")
    parser.add_argument("--client-procs", type=int, default=2, help="ordinary client processes (default 2)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="server on CPU 0")
    parser.add_argument("--redis-url", help="run with Redis (flush it yourself); default: none, limiter in memory")
    parser.add_argument("--ready-timeout", type=float, default=90)
    parser.add_argument("--log-dir", type=Path, help="keep the server's log here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"{args.clients:,} ordinary clients, poll every {args.interval:g} s, {args.cycles} measured cycles each way"
    )
    results = run(args)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
