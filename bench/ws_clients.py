"""The client side of the WebSocket benchmarks: raw-socket clients in their own processes, and /proc readings.

A WebSocket client by hand (handshake, frames, inflate) on uvloop, timestamping each frame as its bytes arrive,
so the client side costs microseconds per frame; a command loop that runs a benchmark's `Worker` in each of
--client-procs spawned processes, driven over a pipe; and the readings both modes of bench/ws_cycle.py take:
CPU time and run-queue waits (/proc/<pid>/schedstat), RSS, the kernel's listen-queue counters, py-spy.
"""

import asyncio
import base64
import collections
import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

CLOSE_NORMAL = b"\x03\xe8"
TOP_UP_CONCURRENCY = 100  # per client process, reconnecting those a burst lost


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


def masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, masked, as a client must) of at most 125 bytes."""
    key = os.urandom(4)
    body = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + body


class RawClient(asyncio.Protocol):
    """A WebSocket client by hand: handshake, frames, inflate; timestamps each frame as its bytes arrive."""

    def __init__(self, host: str, port: int, deflate: bool, tracker: Tracker) -> None:
        self.host, self.port = host, port
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
            self.transport.write(masked(0xA, payload))
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
            self.transport.write(masked(0x8, CLOSE_NORMAL))
            self.transport.close()


Connected = TypeVar("Connected", bound="RawClient")


async def connect(client: Connected, deadline: float) -> tuple[Connected, Any] | str:
    """`client` connected and its snapshot's result, or why not (its connection then aborted)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            await loop.create_connection(lambda: client, client.host, client.port)
            result = await client.snapshot
    except TimeoutError:
        result = "timeout"
    except OSError as error:
        result = f"connect: {error.strerror or type(error).__name__}"
    if isinstance(result, str):
        if client.transport is not None:
            client.transport.abort()
        return result
    return client, result


async def close_all(clients: "list[Any]") -> int:
    """Close every client (a close frame each), then abort what is still open half a second later; how many."""
    for client in clients:
        client.close()
    await asyncio.sleep(0.5)
    for client in clients:
        if client.transport is not None:
            client.transport.abort()
    return len(clients)


async def open_client(
    host: str, port: int, deflate: bool, tracker: Tracker, deadline: float
) -> tuple[RawClient, float, int] | str:
    """A client that got its snapshot (with when, and how many rates it held), or why it did not."""
    opened = await connect(RawClient(host, port, deflate, tracker), deadline)
    if isinstance(opened, str):
        return opened
    client, result = opened
    return client, *result


class CommandLoop:
    """A client process's loop: a command from the pipe, the matching coroutine method, its reply back."""

    pipe: Connection

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
            # The event loop made the pipe non-blocking; a reply of many latencies needs a blocking write.
            os.set_blocking(self.pipe.fileno(), True)
            self.pipe.send(reply)


class WorkerProcess(Protocol):
    """What runs in a client process: commands from the pipe, replies to it (a benchmark mode's Worker)."""

    def __init__(self, pipe: Connection, host: str, port: int) -> None: ...

    async def run(self) -> None: ...


def run_worker(pipe: Connection, host: str, port: int, cpus: set[int] | None, worker: type[WorkerProcess]) -> None:
    """A client process's entry point (multiprocessing target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    if cpus:
        os.sched_setaffinity(0, cpus)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(worker(pipe, host, port).run())


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
def client_processes(count: int, port: int, cpus: set[int] | None, worker: type[WorkerProcess]) -> Iterator[Workers]:
    """`count` client processes, each running `worker`."""
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


# ---------------------------------------------------------------- readings


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


def quantile(ordered: list[float], fraction: float) -> float:
    """Nearest rank."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def cpu_sets(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """The server's CPU and the clients' (None: not pinned); read before this process pins itself."""
    available = sorted(os.sched_getaffinity(0))
    if not pin or len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


@contextlib.contextmanager
def py_spy(pid: int, path: Path) -> Iterator[None]:
    executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [executable, "record", "--pid", str(pid), "--gil", "--format", "raw", "--output", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1)  # py-spy attached before the measured part begins
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
