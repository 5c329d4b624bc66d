"""Benchmark: WebSocket fan-out of one rate change to N clients on one uvicorn process.

The issue's goal, for N = 1,000 and N = 10,000 clients of /ws/rates on one
uvicorn process: connect N clients at once, change a rate, and measure from the
store's publish to each client's receipt (p50, p99, the last client), the
process's memory per connected client, and the connect rate (clients per second
that get their `all_rates` snapshot). Targets: at 1,000 clients p99 under 50 ms
and all 1,000 connecting at once get their snapshot; at 10,000 clients p99 under
500 ms and under 50 KiB per connection.

The service runs with the built-in demo provider (no FLUTTERWAVE_SECRET_KEY),
SQLite in a temporary directory, POLL_INTERVAL_SECONDS=3600 (one poll at start,
then quiet) and RATE_STALE_AFTER_SECONDS=7200; a fresh server for each N. A
change is a GET /api/rates for a pair not yet stored: the service fetches it,
stores it and publishes a `rate_update` to every client. The store stamps
`last_updated` right before it publishes, on the same clock, so receipt wall
time - last_updated is "from the store's publish"; trigger -> receipt is from
just before the harness's GET.

The clients are raw asyncio protocols (the WebSocket handshake and frame parsing
done by hand, on uvloop), spread over --client-procs processes, timestamping each
frame as its bytes arrive, so the client side costs microseconds per frame. They
offer permessage-deflate, as browsers do, unless --compression none. On a 2-core
machine the clients still share the CPUs with the server: by default the server
is pinned to CPU 0 and the clients (and this process) to the others, and for each
change the server's and the clients' time on a CPU and waiting for one (from
/proc/<pid>/schedstat) is printed. Clients a connect burst loses (timeouts after
listen-queue overflows, say) are counted as failures, then replaced a few at a
time, so the changes still reach N clients.

Run from the repository root:

    python -m bench.ws_fanout                           # N = 1,000 and 10,000, 5 changes each
    python -m bench.ws_fanout --clients 1000 --changes 10 --client-procs 2
    python -m bench.ws_fanout --compression deflate none
    python -m bench.ws_fanout --clients 10000 --profile  # py-spy on the server during the changes

It exits 1 when a target is missed: a p99 over its bound (a client that never
received a change counts as infinitely late), over 50 KiB per connection at
10,000, or any of 1,000 simultaneous connects not getting its snapshot.
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import gc
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, Protocol, cast

import httpx

from bench import pyspy
from bench.rest import LIMITS_OFF, Server, clean_environment, free_port, stop_server, wait_until

ROOT = Path(__file__).resolve().parent.parent
STORED_RATES = 44  # the 4 polled sources x 11 destinations, stored by the poll at start
BASES = ("USD", "CAD", "GBP", "EUR")
# Destinations never polled: a GET for source/one of these is a new pair, fetched, stored and published.
FRESH_DESTINATIONS = (
    "JPY CHF SEK NOK DKK PLN CZK HUF INR CNY AUD NZD SGD HKD BRL MXN TRY ILS KRW THB MYR PHP IDR RWF TZS"
).split()
TARGET_P99_MS = {1000: 50.0, 10_000: 500.0}
TARGET_KIB_PER_CLIENT = {10_000: 50.0}
TARGET_ALL_SNAPSHOTS = (1000,)
BASELINE = (
    "baseline, the earlier Django + Channels service: 580-650 ms to reach 1,000 clients, "
    "and 818 of 1,000 simultaneous connects refused with HTTP 500"
)
CLOSE_NORMAL = b"\x03\xe8"
TOP_UP_CONCURRENCY = 100  # per client process, reconnecting those a burst lost


# ---------------------------------------------------------------- client processes


class Tracker:
    """Receipt times of `rate_update` frames, by pair, for every client of one process."""

    def __init__(self) -> None:
        self.receipts: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        self.last_updated: dict[str, str] = {}
        self.waiting: str | None = None
        self.target = 0
        self.done = asyncio.Event()

    def receipt(self, pair: str, now: float, last_updated: str) -> None:
        times = self.receipts[pair]
        times.append(now)
        self.last_updated.setdefault(pair, last_updated)
        if pair == self.waiting and len(times) >= self.target:
            self.done.set()


def _masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, masked, as a client must) of at most 125 bytes."""
    key = os.urandom(4)
    body = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + body


class RawClient(asyncio.Protocol):
    """A WebSocket client by hand: handshake, frames, inflate; timestamps each frame as its bytes arrive."""

    def __init__(self, host: str, port: int, deflate: bool, tracker: Tracker) -> None:
        self._request = (
            f"GET /ws/rates HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            + ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if deflate else "")
            + "\r\n"
        ).encode()
        self._tracker = tracker
        self._buffer = bytearray()
        self._upgraded = False
        self._inflater: Any = None
        self._parts: list[bytes] = []
        self._compressed = False
        self.transport: asyncio.Transport | None = None
        self.deflate = False
        self.alive = False
        # (receipt time, rates in it) once the snapshot is in, or why it never will be.
        self.snapshot: asyncio.Future[tuple[float, int] | str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        self.alive = True
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._resolve("closed before the snapshot")

    def _resolve(self, result: tuple[float, int] | str) -> None:
        if not self.snapshot.done():
            self.snapshot.set_result(result)

    def _fail(self, reason: str) -> None:
        self._resolve(reason)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self._buffer += data
        if not self._upgraded:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line, *headers = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            del self._buffer[: end + 4]
            status = status_line.split(" ", 2)[1] if " " in status_line else "?"
            if status != "101":
                self._fail(f"HTTP {status}")
                return
            for header in headers:
                name, _, value = header.partition(":")
                if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                    self.deflate = True
                    self._inflater = zlib.decompressobj(-15)  # inflates any window up to 15 bits
            self._upgraded = True
        self._frames(now)

    def _frames(self, now: float) -> None:
        buffer, position, size = self._buffer, 0, len(self._buffer)
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if size - position < 4:
                    break
                length, head = int.from_bytes(buffer[position + 2 : position + 4], "big"), 4
            elif length == 127:
                if size - position < 10:
                    break
                length, head = int.from_bytes(buffer[position + 2 : position + 10], "big"), 10
            if second & 0x80:
                self._fail("a masked frame from the server")
                return
            if size - position < head + length:
                break
            payload = bytes(buffer[position + head : position + head + length])
            position += head + length
            self._frame(first, payload, now)
        del buffer[:position]

    def _frame(self, first: int, payload: bytes, now: float) -> None:
        opcode = first & 0x0F
        if opcode == 0x9 and self.transport is not None:  # ping: the server closes a client that never pongs
            self.transport.write(_masked(0xA, payload))
            return
        if opcode == 0x8:
            self._fail("closed by the server")
            return
        if opcode >= 0x8:
            return
        if opcode != 0x0:
            self._parts, self._compressed = [], bool(first & 0x40)
        self._parts.append(payload)
        if not first & 0x80:
            return
        message = b"".join(self._parts)
        self._parts = []
        if self._compressed:
            message = self._inflater.decompress(message + b"\x00\x00\xff\xff")
        self._message(message, now)

    def _message(self, message: bytes, now: float) -> None:
        if not self.snapshot.done():
            if b'"type":"all_rates"' in message[:40]:
                self._resolve((now, message.count(b'"source_currency"')))
            else:
                self._fail("the first frame is not all_rates")
            return
        if b'"type":"rate_update"' in message[:40]:
            rate = json.loads(message)["rate"]
            pair = f"{rate['source_currency']}/{rate['destination_currency']}"
            self._tracker.receipt(pair, now, rate["last_updated"])

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked(0x8, CLOSE_NORMAL))
            self.transport.close()


async def open_client(
    host: str, port: int, deflate: bool, tracker: Tracker, deadline: float
) -> tuple[RawClient, float, int] | str:
    """A client that got its snapshot (with when, and how many rates it held), or why it did not."""
    loop = asyncio.get_running_loop()
    client = RawClient(host, port, deflate, tracker)
    try:
        async with asyncio.timeout_at(deadline):
            await loop.create_connection(lambda: client, host, port)
            result = await client.snapshot
    except TimeoutError:
        result = "timeout"
    except OSError as error:
        result = f"connect: {error.strerror or type(error).__name__}"
    if isinstance(result, str):
        if client.transport is not None:
            client.transport.abort()
        return result
    return client, *result


class Worker:
    """One client process: connects, collects receipts and closes on the parent's commands."""

    def __init__(self, pipe: Connection, host: str, port: int) -> None:
        self.pipe, self.host, self.port = pipe, host, port
        self.tracker = Tracker()
        self.clients: list[RawClient] = []

    async def connect(self, count: int, start_at: float, timeout_s: float, deflate: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = loop.time() + timeout_s
        results = await asyncio.gather(
            *(open_client(self.host, self.port, deflate, self.tracker, deadline) for _ in range(count))
        )
        opened = [result for result in results if not isinstance(result, str)]
        failures = collections.Counter(result for result in results if isinstance(result, str))
        # Those the burst lost are replaced, a few at a time, so the changes reach `count` clients all the same.
        limiter = asyncio.Semaphore(TOP_UP_CONCURRENCY)
        deadline = loop.time() + timeout_s

        async def again() -> tuple[RawClient, float, int] | str:
            async with limiter:
                return await open_client(self.host, self.port, deflate, self.tracker, deadline)

        retried = await asyncio.gather(*(again() for _ in range(count - len(opened))))
        topped_up = [result for result in retried if not isinstance(result, str)]
        self.clients += [client for client, _, _ in opened + topped_up]
        gc.collect()
        gc.freeze()  # the clients live on: no collection walks them again during the changes
        return {
            "times": [when for _, when, _ in opened],
            "topped_up": len(topped_up),
            "rates": sorted({rates for _, _, rates in opened + topped_up}),
            "deflate": sum(client.deflate for client, _, _ in opened + topped_up),
            "failures": dict(failures),
        }

    async def cpu(self) -> dict[str, Any]:
        return {}

    async def collect(self, pair: str, timeout_s: float) -> dict[str, Any]:
        tracker = self.tracker
        tracker.waiting, tracker.target = pair, sum(client.alive for client in self.clients)
        tracker.done.clear()
        if len(tracker.receipts[pair]) >= tracker.target:
            tracker.done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tracker.done.wait(), timeout_s)
        tracker.waiting = None
        return {"times": tracker.receipts.pop(pair, []), "last_updated": tracker.last_updated.get(pair)}

    async def close(self) -> dict[str, Any]:
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.5)
        for client in self.clients:
            if client.transport is not None:
                client.transport.abort()
        closed, self.clients = len(self.clients), []
        gc.unfreeze()
        gc.collect()
        return {"closed": closed}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        loop.add_reader(self.pipe.fileno(), lambda: commands.put_nowait(self.pipe.recv()))
        while True:
            command, *arguments = await commands.get()
            if command == "quit":
                return
            handler: Callable[..., Any] = getattr(self, command)
            try:
                reply: dict[str, Any] = await handler(*arguments)
            except Exception as error:
                reply = {"error": f"client process {os.getpid()}, {command}: {error!r}"}
            reply["sched"] = schedstat(Path("/proc/self/schedstat"))
            self.pipe.send(reply)


class WorkerProcess(Protocol):
    """What runs in a client process: commands from the pipe, replies to it (this module's Worker, or another
    benchmark's)."""

    def __init__(self, pipe: Connection, host: str, port: int) -> None: ...

    async def run(self) -> None: ...


def run_worker(
    pipe: Connection, host: str, port: int, cpus: set[int] | None, worker: type[WorkerProcess] | None = None
) -> None:
    """A client process's entry point (multiprocessing target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    if cpus:
        os.sched_setaffinity(0, cpus)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run((worker or Worker)(pipe, host, port).run())


@dataclass(slots=True)
class Workers:
    processes: list[SpawnProcess] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)
    sched: list[tuple[float, float]] = field(default_factory=list)

    def ask(self, *commands: tuple[Any, ...]) -> list[dict[str, Any]]:
        """Send one command to each worker (or the same one to all), then gather the replies in order."""
        for index, pipe in enumerate(self.pipes):
            pipe.send(commands[index] if len(commands) > 1 else commands[0])
        replies = [pipe.recv() for pipe in self.pipes]
        for reply in replies:
            if "error" in reply:
                raise RuntimeError(reply["error"])
        return replies

    def sched_since_last(self, replies: list[dict[str, Any]]) -> tuple[float, float]:
        """Seconds on a CPU and waiting for one, summed over the workers, since their previous replies."""
        now: list[tuple[float, float]] = [tuple(reply["sched"]) for reply in replies]
        ran = sum(after[0] - before[0] for before, after in zip(self.sched, now, strict=True))
        waited = sum(after[1] - before[1] for before, after in zip(self.sched, now, strict=True))
        self.sched = now
        return ran, waited


@contextlib.contextmanager
def client_processes(
    count: int, port: int, cpus: set[int] | None, worker: type[WorkerProcess] | None = None
) -> Iterator[Workers]:
    """`count` client processes, each running `worker` (this module's Worker by default)."""
    context = multiprocessing.get_context("spawn")
    workers = Workers()
    try:
        for _ in range(count):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=run_worker, args=(child_end, "127.0.0.1", port, cpus, worker), daemon=True)
            process.start()
            child_end.close()
            workers.processes.append(process)
            workers.pipes.append(parent_end)
        workers.sched = [(0.0, 0.0)] * count
        yield workers
    finally:
        for pipe in workers.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("quit",))
        for process in workers.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for pipe in workers.pipes:
            pipe.close()


# ---------------------------------------------------------------- the server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_fanout", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10_000], help="N (default 1000 10000)")
    parser.add_argument("--changes", type=int, default=5, help="measured rate changes per N (default 5)")
    parser.add_argument("--client-procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--compression",
        nargs="+",
        choices=("deflate", "none"),
        default=["deflate"],
        help="offer permessage-deflate as browsers do, or not; each given is a run (default deflate)",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="server on CPU 0, clients on the other CPUs (default: on)",
    )
    parser.add_argument("--connect-timeout", type=float, default=60, help="seconds for all to connect (default 60)")
    parser.add_argument("--receive-timeout", type=float, default=30, help="seconds to wait for a change (default 30)")
    parser.add_argument("--settle", type=float, default=2, help="pause before reading memory (default 2 s)")
    parser.add_argument("--pause", type=float, default=1, help="pause between changes (default 1 s)")
    parser.add_argument("--warmup-clients", type=int, default=100, help="clients of the unmeasured warm-up (100)")
    parser.add_argument("--ready-timeout", type=float, default=60, help="seconds to wait for the server (default 60)")
    parser.add_argument("--profile", action="store_true", help="py-spy the server (--gil) during the changes")
    parser.add_argument("--profile-dir", type=Path, help="where py-spy output goes (default: a new /tmp directory)")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.changes < 1 or args.client_procs < 1:
        parser.error("--clients, --changes and --client-procs must be at least 1")
    runs = len(args.clients) * len(args.compression)
    if runs * (args.changes + 1) > len(BASES) * len(FRESH_DESTINATIONS):
        parser.error(f"at most {len(BASES) * len(FRESH_DESTINATIONS)} fresh pairs: fewer --changes or runs")
    return args


def start_service(directory: Path, cpus: set[int] | None) -> Server:
    env = clean_environment(
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'rates.db'}",
            "POLL_INTERVAL_SECONDS": "3600",
            "RATE_STALE_AFTER_SECONDS": "7200",
            **LIMITS_OFF,
        }
    )
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning"]

    def pin() -> None:  # in the child, before exec: every thread the server starts inherits it
        if cpus:
            os.sched_setaffinity(0, cpus)

    with (directory / "service.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
    return Server("service", f"http://127.0.0.1:{port}", process)


def service_ready(client: httpx.Client) -> bool:
    if client.get("/readyz").status_code != 200:
        return False
    counts: list[int] = [
        client.get("/api/rates/all", params={"base_currency": base}).json()["meta"]["count"] for base in BASES
    ]
    return sum(counts) == STORED_RATES


def rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(match[1])


def schedstat(path: Path) -> tuple[float, float]:
    """Seconds a thread has run on a CPU, and waited on a run queue for one (ready, but a CPU was busy)."""
    fields = path.read_text().split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def server_sched(pid: int) -> tuple[float, float]:
    """Seconds on a CPU, all the server's threads; seconds its event loop (main thread) waited for a CPU."""
    ran = sum(schedstat(task / "schedstat")[0] for task in Path(f"/proc/{pid}/task").iterdir())
    return ran, schedstat(Path(f"/proc/{pid}/task/{pid}/schedstat"))[1]


def listen_counters() -> dict[str, int]:
    """The kernel's TCP listen-queue counters, for the whole machine (TcpExt in /proc/net/netstat)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")]
    values = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return {name: values.get(name, 0) for name in ("ListenOverflows", "ListenDrops", "SyncookiesSent")}


def fresh_pairs() -> Iterator[tuple[str, str]]:
    for source in BASES:
        for destination in FRESH_DESTINATIONS:
            yield source, destination


# ---------------------------------------------------------------- measuring


def quantile(ordered: list[float], fraction: float) -> float:
    """Nearest rank."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "never" if math.isinf(seconds) else f"{seconds * 1000:.1f} ms"


@dataclass(slots=True)
class Change:
    pair: str
    expected: int
    store_s: list[float]  # receipt - last_updated, one per client; inf for a client that never got it
    trigger_s: list[float]  # receipt - the harness's trigger
    store_after_trigger_s: float
    server_cpu_s: float
    server_wait_s: float
    client_cpu_s: float
    client_wait_s: float


@dataclass(slots=True)
class Run:
    clients: int
    compression: str
    burst_ok: int = 0  # got their snapshot in the burst
    connected: int = 0  # and after those the burst lost were replaced
    failures: dict[str, int] = field(default_factory=dict)
    connect_s: float = math.nan
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    changes: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def kib_per_client(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.connected if self.connected else math.nan


def trigger(http: httpx.Client, pair: tuple[str, str]) -> float:
    """GET a pair not yet stored, so the service fetches, stores and publishes it; when the GET began."""
    started = time.time()
    response = http.get("/api/rates", params={"source_currency": pair[0], "destination_currency": pair[1]})
    if response.status_code != 200:
        raise RuntimeError(f"GET /api/rates {pair}: HTTP {response.status_code}: {response.text[:300]}")
    return started


def change(
    http: httpx.Client, workers: Workers, pair: tuple[str, str], expected: int, args: argparse.Namespace, pid: int
) -> Change:
    name = "/".join(pair)
    server_before = server_sched(pid)
    workers.sched_since_last(workers.ask(("cpu",)))  # the clients' count starts here
    triggered = trigger(http, pair)
    replies = workers.ask(("collect", name, args.receive_timeout))
    server_after = server_sched(pid)
    client_cpu, client_wait = workers.sched_since_last(replies)
    stamps = {reply["last_updated"] for reply in replies} - {None}
    if len(stamps) > 1:
        raise RuntimeError(f"{name}: the clients saw different last_updated: {sorted(stamps)}")
    published = datetime.fromisoformat(stamps.pop()).timestamp() if stamps else math.nan
    times = sorted(when for reply in replies for when in reply["times"])
    missing = [math.inf] * max(0, expected - len(times))
    return Change(
        pair=name,
        expected=expected,
        store_s=[when - published for when in times] + missing,
        trigger_s=[when - triggered for when in times] + missing,
        store_after_trigger_s=published - triggered,
        server_cpu_s=server_after[0] - server_before[0],
        server_wait_s=server_after[1] - server_before[1],
        client_cpu_s=client_cpu,
        client_wait_s=client_wait,
    )


def connect(workers: Workers, count: int, args: argparse.Namespace, compression: str) -> dict[str, Any]:
    """All `count` clients launched at once over the workers; when they began, and what came of them."""
    shares = [count // len(workers.pipes) + (index < count % len(workers.pipes)) for index in range(len(workers.pipes))]
    start_at = time.time() + 0.5
    counters = listen_counters()
    replies = workers.ask(
        *(("connect", share, start_at, args.connect_timeout, compression == "deflate") for share in shares)
    )
    counters = {name: value - counters[name] for name, value in listen_counters().items()}
    workers.sched_since_last(replies)
    failures: collections.Counter[str] = collections.Counter()
    for reply in replies:
        failures.update(reply["failures"])
    return {
        "start_at": start_at,
        "times": sorted(when for reply in replies for when in reply["times"]),
        "rates": sorted({rates for reply in replies for rates in reply["rates"]}),
        "deflate": sum(reply["deflate"] for reply in replies),
        "failures": dict(failures),
        "topped_up": sum(reply["topped_up"] for reply in replies),
        "kernel": counters,
    }


@contextlib.contextmanager
def py_spy(pid: int, path: Path) -> Iterator[None]:
    executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [executable, "record", "--pid", str(pid), "--gil", "--format", "raw", "--output", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.returncode not in (0, -signal.SIGINT, None) and not path.exists():
            print(f"  py-spy failed: {process.stderr.read().decode(errors='replace')[-500:] if process.stderr else ''}")


def bench(
    clients: int,
    compression: str,
    pairs: Iterator[tuple[str, str]],
    args: argparse.Namespace,
    cpus: tuple[set[int] | None, set[int] | None],
) -> Run:
    run = Run(clients, compression)
    server_cpus, client_cpus = cpus
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as tmp:
        directory = Path(tmp)
        server = start_service(directory, server_cpus)
        try:
            wait_until(server, directory / "service.log", args.ready_timeout, service_ready)
            pid = server.process.pid
            offered = "permessage-deflate offered" if compression == "deflate" else "no compression offered"
            print(f"N = {clients:,} ({offered}): server pid {pid} at {server.url}, {STORED_RATES} rates stored")
            port = int(server.url.rsplit(":", 1)[1])
            with (
                client_processes(args.client_procs, port, client_cpus) as workers,
                httpx.Client(base_url=server.url, timeout=30) as http,
            ):
                # Warm-up, unmeasured: the code paths of connecting, fanning out and leaving run once.
                warm = connect(workers, min(args.warmup_clients, clients), args, compression)
                change(http, workers, next(pairs), len(warm["times"]), args, pid)
                workers.ask(("close",))
                time.sleep(args.settle)
                run.rss_before_kib = rss_kib(pid)

                connected = connect(workers, clients, args, compression)
                run.burst_ok, run.failures = len(connected["times"]), connected["failures"]
                run.connected = run.burst_ok + connected["topped_up"]
                run.connect_s = (connected["times"][-1] - connected["start_at"]) if connected["times"] else math.nan
                report_connect(run, connected, args.client_procs)
                time.sleep(args.settle)
                run.rss_after_kib = rss_kib(pid)
                print(
                    f"  memory: server RSS {run.rss_before_kib / 1024:.1f} MiB with 0 clients (after a warm-up), "
                    f"{run.rss_after_kib / 1024:.1f} MiB with {run.connected:,}: "
                    f"{run.kib_per_client:.1f} KiB per client"
                )
                profile = None
                if args.profile:
                    profile_dir = args.profile_dir or Path(tempfile.mkdtemp(prefix="bench-ws-profile-"))
                    profile_dir.mkdir(parents=True, exist_ok=True)
                    profile = profile_dir / f"server-{clients}-{compression}.txt"
                with py_spy(pid, profile) if profile else contextlib.nullcontext():
                    for number in range(1, args.changes + 1):
                        time.sleep(args.pause)
                        measured = change(http, workers, next(pairs), run.connected, args, pid)
                        run.changes.append(measured)
                        report_change(number, measured, clients)
                workers.ask(("close",))
                if profile is not None and profile.exists():
                    pyspy.summarise(profile)
        finally:
            stop_server(server)
    report_run(run)
    return run


def cpu_sets(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """The server's CPU and the clients' (None: not pinned); read before this process pins itself."""
    available = sorted(os.sched_getaffinity(0))
    if not pin or len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


# ---------------------------------------------------------------- reporting


def report_connect(run: Run, connected: dict[str, Any], procs: int) -> None:
    times = [when - connected["start_at"] for when in connected["times"]]
    failed = sum(run.failures.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(run.failures.items())) or "none"
    rate = run.burst_ok / run.connect_s if run.burst_ok else 0.0
    print(
        f"  connect: {run.clients:,} launched at once from {procs} processes; {run.burst_ok:,} got their snapshot, "
        f"{failed:,} failed ({reasons})"
    )
    if times:
        print(
            f"  connect: the last snapshot {run.connect_s * 1000:.0f} ms after the start ({rate:,.0f} clients/s); "
            f"time to snapshot p50 {ms(quantile(times, 0.5))}, p99 {ms(quantile(times, 0.99))}"
        )
    if failed:
        print(
            f"  connect: {connected['topped_up']:,} of the {failed:,} failed replaced afterwards, at most "
            f"{TOP_UP_CONCURRENCY} at a time per process, for {run.connected:,} clients during the changes"
        )
    kernel = ", ".join(f"{name} {value:,}" for name, value in connected["kernel"].items())
    print(f"  connect: kernel listen-queue counters during it (whole machine): {kernel}")
    print(
        f"  connect: rates per snapshot {connected['rates']} ({STORED_RATES} polled + the warm-up's pair); "
        f"{connected['deflate']:,} clients negotiated permessage-deflate"
    )


def report_change(number: int, measured: Change, clients: int) -> None:
    store, trig = sorted(measured.store_s), sorted(measured.trigger_s)
    received = sum(not math.isinf(value) for value in store)
    print(
        f"  change {number} {measured.pair}: {received:,}/{measured.expected:,} received; "
        f"store->receipt first {ms(store[0])}, p50 {ms(quantile(store, 0.5))}, last client {ms(store[-1])}; "
        f"trigger->receipt last {ms(trig[-1])} (stored {ms(measured.store_after_trigger_s)} after the trigger); "
        f"server on CPU {measured.server_cpu_s * 1000:.0f} ms "
        f"({measured.server_cpu_s / max(1, clients) * 1e6:.0f} us per client), waiting for a CPU "
        f"{measured.server_wait_s * 1000:.0f} ms; clients on CPU {measured.client_cpu_s * 1000:.0f} ms, "
        f"waiting {measured.client_wait_s * 1000:.0f} ms"
    )


def report_run(run: Run) -> None:
    store = sorted(value for measured in run.changes for value in measured.store_s)
    trig = sorted(value for measured in run.changes for value in measured.trigger_s)
    print(
        f"  latency over {len(store):,} receipts ({len(run.changes)} changes x {run.connected:,} clients): "
        f"store->receipt p50 {ms(quantile(store, 0.5))}, p99 {ms(quantile(store, 0.99))}, max {ms(store[-1])}; "
        f"trigger->receipt p50 {ms(quantile(trig, 0.5))}, p99 {ms(quantile(trig, 0.99))}, max {ms(trig[-1])}"
    )
    lasts = ", ".join(ms(max(measured.store_s)) for measured in run.changes)
    print(f"  last client per change, store->receipt: {lasts}")
    server = sum(measured.server_cpu_s for measured in run.changes)
    server_wait = sum(measured.server_wait_s for measured in run.changes)
    client = sum(measured.client_cpu_s for measured in run.changes)
    client_wait = sum(measured.client_wait_s for measured in run.changes)
    print(
        f"  CPU over the changes: server {server:.2f} s on a CPU, its event loop {server_wait:.2f} s ready but "
        f"waiting for one; client processes {client:.2f} s on a CPU, {client_wait:.2f} s waiting"
    )
    p99 = quantile(store, 0.99)
    if run.clients in TARGET_ALL_SNAPSHOTS:
        met = run.burst_ok == run.clients and not run.failures
        verdict(run, met, f"all {run.clients:,} connecting at once get their snapshot ({run.burst_ok:,} did)")
    if run.clients in TARGET_P99_MS:
        bound = TARGET_P99_MS[run.clients]
        verdict(run, p99 * 1000 < bound, f"p99 store->receipt under {bound:.0f} ms ({ms(p99)})")
    if run.clients in TARGET_KIB_PER_CLIENT:
        bound = TARGET_KIB_PER_CLIENT[run.clients]
        verdict(run, run.kib_per_client < bound, f"under {bound:.0f} KiB per connection ({run.kib_per_client:.1f} KiB)")


def verdict(run: Run, met: bool, text: str) -> None:
    print(f"  target at {run.clients:,} clients, {text}: {'met' if met else 'NOT MET'}")
    if not met:
        run.problems.append(f"N = {run.clients:,} ({run.compression}): {text}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_cpus, client_cpus = cpu_sets(args.pin)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    placement = (
        f"server pinned to CPU {sorted(server_cpus or ())}, {args.client_procs} client processes and this one to "
        f"CPUs {sorted(client_cpus or ())}"
        if server_cpus
        else f"not pinned: the server, {args.client_procs} client processes and this one share the CPUs"
    )
    print(f"{os.cpu_count()} CPUs, load average {load}; {placement}")
    print(BASELINE)
    pairs = fresh_pairs()
    problems: list[str] = []
    for clients in args.clients:
        for compression in args.compression:
            problems += bench(clients, compression, pairs, args, (server_cpus, client_cpus)).problems
    for problem in problems:
        print(f"target not met: {problem}")
    print("FAIL" if problems else "PASS")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
