"""Clients that follow the stream as an application does, for bench/resume_storm.py, idle_heartbeats.py, sse_cycle.py.

`Follower` keeps what one client knows (its board, the epoch and the last promised `seq`, docs/websocket.md
"Resume and heartbeats") and the times it heard things; `WsFollower` is bench/ws_clients.py's raw WebSocket
client (any path, a query for a resume) feeding one, `SseFollower` a raw HTTP/1.1 client of `/sse/rates`
parsing `event:`/`data:` lines out of the chunked body. Both parse every frame: cheap next to the server's
work at these rates, and a board needs every value.
"""

import asyncio
import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast
from urllib.parse import urlencode

from bench.ws_clients import RawClient, Tracker

Board = dict[str, tuple[int, str]]  # pair -> (seq of the value held, destination_per_source as sent)


def pair_of(item: dict[str, Any]) -> str:
    return f"{item['source_currency']}/{item['destination_currency']}"


class Follower:
    """One client's knowledge of the stream, whatever the transport."""

    def __init__(self, keep_latencies: bool = False) -> None:
        self.board: Board = {}
        self.epoch: str | None = None
        self.promised: int | None = None  # every store up to it is reflected in the board
        self.first: str | None = None  # the first frame's type on the current connection
        self.first_at = 0.0
        self.first_frames: list[str] = []  # every connection's first frame type, in order
        self.cycle_ends: list[float] = []  # receipt of each all_rates_update
        self.heartbeats: list[float] = []
        self.latencies: list[float] = []  # receipt - last_updated, each rate_update (when kept)
        self._keep_latencies = keep_latencies
        self.first_frame: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def new_connection(self) -> None:
        self.first = None
        self.first_frame = asyncio.get_running_loop().create_future()

    def lost(self, reason: str) -> None:
        if not self.first_frame.done():
            self.first_frame.set_result(reason)

    def message(self, frame: dict[str, Any], now: float) -> None:
        kind = frame.get("type")
        if self.first is None:
            self.first, self.first_at = str(kind), now
            self.first_frames.append(str(kind))
            if not self.first_frame.done():
                self.first_frame.set_result(str(kind))
        if kind == "all_rates":
            seq = int(frame["seq"])
            self.board = {pair_of(item): (seq, str(item["destination_per_source"])) for item in frame["rates"]}
            self.epoch, self.promised = frame["epoch"], seq
        elif kind == "resumed":
            for item in frame["rates"]:
                self._put(item, int(item["seq"]))
            self.promised = int(frame["seq"])
        elif kind == "rate_update":
            self._put(frame["rate"], int(frame["seq"]))
            if self._keep_latencies:
                stamp = datetime.fromisoformat(frame["rate"]["last_updated"]).timestamp()
                self.latencies.append(now - stamp)
        elif kind == "rates_update":
            for item in frame["rates"]:
                self._put(item, int(item["seq"]))
        elif kind == "heartbeat":
            self.heartbeats.append(now)
            if frame["epoch"] == self.epoch:
                self.promised = max(self.promised or 0, int(frame["seq"]))
        elif kind == "all_rates_update":
            self.cycle_ends.append(now)

    def _put(self, item: dict[str, Any], seq: int) -> None:
        pair = pair_of(item)
        held = self.board.get(pair)
        if held is None or held[0] < seq:  # two replicas' events may arrive out of their order
            self.board[pair] = (seq, str(item["destination_per_source"]))

    def resume_query(self) -> str:
        if self.epoch is None or self.promised is None:
            return ""
        return "?" + urlencode({"epoch": self.epoch, "seq": self.promised})


class WsFollower(RawClient):
    """bench/ws_clients.py's raw client on any path, every frame parsed into a `Follower`."""

    def __init__(
        self,
        host: str,
        port: int,
        deflate: bool,
        follower: Follower,
        path: str = "/ws/rates",
        on_lost: Callable[["WsFollower"], None] | None = None,
    ) -> None:
        super().__init__(host, port, deflate, Tracker())
        self._request = self._request.replace(b"GET /ws/rates ", f"GET {path} ".encode(), 1)
        self.follower = follower
        self._on_lost = on_lost

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.follower.lost("closed before the first frame")
        if self._on_lost is not None:
            self._on_lost(self)

    def _message(self, message: bytes, now: float) -> None:
        self.follower.message(json.loads(message), now)


class SseFollower(asyncio.Protocol):
    """GET /sse/rates over HTTP/1.1 by hand: the chunked body undone, each event's data fed to a `Follower`."""

    def __init__(self, host: str, port: int, follower: Follower, path: str = "/sse/rates") -> None:
        self._request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        self.follower = follower
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._body = bytearray()
        self._headers_done = False
        self._chunked = False
        self._data: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.follower.lost("closed before the first event")

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self._buffer += data
        if not self._headers_done:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line, *headers = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            del self._buffer[: end + 4]
            if status_line.split(" ", 2)[1:2] != ["200"]:
                self.follower.lost(f"HTTP {status_line}")
                self.abort()
                return
            self._chunked = any(h.lower().replace(" ", "") == "transfer-encoding:chunked" for h in headers)
            self._headers_done = True
        if self._chunked:
            self._dechunk()
        else:
            self._body += self._buffer
            self._buffer.clear()
        self._lines(now)

    def _dechunk(self) -> None:
        buffer = self._buffer
        while True:
            end = buffer.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
            if len(buffer) < end + 2 + size + 2:
                return
            self._body += buffer[end + 2 : end + 2 + size]
            del buffer[: end + 2 + size + 2]

    def _lines(self, now: float) -> None:
        body = self._body
        start = 0
        while True:
            end = body.find(b"\n", start)
            if end < 0:
                break
            line = bytes(body[start:end]).rstrip(b"\r")
            start = end + 1
            if not line:  # an event ends at a blank line
                if self._data:
                    self.follower.message(json.loads(b"\n".join(self._data)), now)
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[5:].lstrip(b" "))
        del body[:start]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """An event stream has no close handshake: the connection is closed."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def open_follower(
    make: Callable[[], asyncio.Protocol], follower: Follower, host: str, port: int, deadline: float
) -> str:
    """Connect, and wait for the first frame: its type, or why none came."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            await loop.create_connection(make, host, port)
            return await follower.first_frame
    except TimeoutError:
        return "timeout"
    except OSError as error:
        return f"connect: {error.strerror or type(error).__name__}"


def spread(count: int, parts: int) -> list[int]:
    """`count` split over `parts` as evenly as integers allow."""
    return [count // parts + (index < count % parts) for index in range(parts)]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds: /proc/<pid>/stat fields 14 and 15."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
