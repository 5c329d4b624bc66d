"""A WebSocket client that really stops reading: a raw socket with a small receive buffer that it never reads.

(A client library keeps reading into its own buffers, which hides a slow reader from the server.)
At the end, `outcome()` reads everything the server sent and says how the stream ended. `frames()` shows the
frames as sent, compressed or not (a client library would inflate them unseen).
"""

import asyncio
import base64
import errno
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, NamedTuple


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])  # FIN + text
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Frame(NamedTuple):
    opcode: int
    compressed: bool  # RSV1: permessage-deflate
    payload: bytes


class StalledClient:
    def __init__(self, host: str, port: int, path: str = "/ws/rates", *, extensions: str | None = None) -> None:
        """`extensions`: a `Sec-WebSocket-Extensions` offer; what the server accepted is in `.extensions`."""
        self._host, self._port, self._path = host, port, path
        self._offer = "" if extensions is None else f"Sec-WebSocket-Extensions: {extensions}\r\n"
        self.extensions: str | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self._host, self._port))
        self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=2**16)
        key = base64.b64encode(os.urandom(16)).decode()
        self._writer.write(
            f"GET {self._path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{self._offer}\r\n".encode()
        )
        await self._writer.drain()
        status = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), 10)
        if b" 101 " not in status.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"handshake refused: {status[:80]!r}")
        for line in status.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions":
                self.extensions = value.strip()
        # From here on nothing more is read until outcome(): the kernel buffer fills and stays full.
        self._reader._transport.pause_reading()  # type: ignore[attr-defined]

    async def send(self, text: str, times: int = 1, timeout_s: float = 10) -> None:
        """Send `text` `times` times; a server that stopped reading (it closed on us) is an error, not a hang."""
        assert self._writer is not None
        frame = _masked_text_frame(text)
        async with asyncio.timeout(timeout_s):
            for _ in range(times):
                self._writer.write(frame)
                await self._writer.drain()

    def close(self) -> None:
        assert self._writer is not None
        self._writer.close()

    def was_reset(self) -> bool:
        """Whether the server reset the connection, seen without reading anything (the error the kernel holds)."""
        assert self._writer is not None
        sock = self._writer.get_extra_info("socket")
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET)

    async def _frame(self) -> Frame:
        """The next frame the server sent (it never masks)."""
        assert self._reader is not None
        head = await self._reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self._reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self._reader.readexactly(8))[0]
        return Frame(head[0] & 0x0F, bool(head[0] & 0x40), await self._reader.readexactly(length))

    async def _close_code(self) -> int:
        """Read up to the server's close frame: its code."""
        while True:
            frame = await self._frame()
            if frame.opcode == 0x8:
                return int(struct.unpack("!H", frame.payload[:2])[0]) if len(frame.payload) >= 2 else 1005

    def _resume(self) -> None:
        assert self._reader is not None
        self._reader._transport.resume_reading()  # type: ignore[attr-defined]

    async def read_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 15
    ) -> list[dict[str, Any]]:
        """Start reading again: every text message, in order, until `done` says the list is complete."""
        self._resume()
        messages: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout_s):
            while not done(messages):
                frame = await self._frame()
                if frame.opcode == 0x1:
                    messages.append(json.loads(frame.payload))
        return messages

    async def frames(self, count: int, timeout_s: float = 15) -> list[Frame]:
        """Start reading again: the next `count` data frames, as sent."""
        self._resume()
        frames: list[Frame] = []
        async with asyncio.timeout(timeout_s):
            while len(frames) < count:
                frame = await self._frame()
                if frame.opcode in (0x0, 0x1, 0x2):
                    frames.append(frame)
        return frames

    async def ending(self, timeout_s: float = 30) -> tuple[int, str]:
        """Read everything and answer nothing: the close code the server sent, then how the connection ended
        ("closed" by the server, or "reset")."""
        assert self._reader is not None and self._writer is not None
        self._resume()
        try:
            async with asyncio.timeout(timeout_s):
                code = await self._close_code()
                try:
                    while await self._reader.read(65536):
                        pass
                except ConnectionResetError:
                    return code, "reset"
                return code, "closed"
        finally:
            self._writer.close()

    async def outcome(self, timeout_s: float = 15) -> int | None:
        """Read what is left: the close code the server sent, 1006 if it just hung up, None if it never did."""
        assert self._writer is not None
        self._resume()
        try:
            async with asyncio.timeout(timeout_s):
                return await self._close_code()
        except (asyncio.IncompleteReadError, ConnectionError):
            return 1006
        except TimeoutError:
            return None
        finally:
            self._writer.close()
