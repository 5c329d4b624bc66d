"""A WebSocket client on a bare socket, for attacks no client library would send (tests and bench/hostile.py).

Frames are built by hand (any opcode, fin and RSV1 bit, any length), masked as a client's must be; the reader
counts pongs and notes the server's close code and when the connection ended.
"""

import asyncio
import base64
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from websockets.utils import apply_mask

from tests.support.replicas import Replica

TEXT, CONT, PING = 0x1, 0x0, 0x9
# The contract: a flood is closed within 10 s of its start.
CLOSE_DEADLINE_S = 10.0


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, compressed: bool = False) -> bytes:
    """One client frame (masked), any bits set as asked."""
    head = bytes([(0x80 if fin else 0) | (0x40 if compressed else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def deflated(data: bytes) -> bytes:
    """`data` as permessage-deflate sends it (RFC 7692 §7.2.1), in a 4 KiB window as the server allows."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -12)
    body = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return body[:-4]  # the 00 00 ff ff every message ends with is left off


class RawClient:
    """A WebSocket client on a bare socket: sends whatever bytes it is told, reads the server's frames as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.pongs = 0
        self.close_code: int | None = None
        self.closed = asyncio.Event()  # the server's close frame arrived, or the connection ended
        self.closed_at = 0.0

    async def send(self, data: bytes) -> bool:
        """False once the server has closed (or reset) the connection."""
        if self.closed.is_set():
            return False
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError:
            return False
        return True

    async def read(self) -> None:
        """Until the server's close frame or the end of the connection."""
        try:
            while True:
                head = await self._reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", await self._reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", await self._reader.readexactly(8))
                payload = await self._reader.readexactly(length)
                opcode = head[0] & 0x0F
                if opcode == 0xA:
                    self.pongs += 1
                elif opcode == 0x8:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    return
        except (OSError, asyncio.IncompleteReadError):
            return
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()


@asynccontextmanager
async def raw_client(replica: Replica) -> AsyncIterator[RawClient]:
    """Connected to /ws/rates, offering permessage-deflate as browsers do; reading in the background."""
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port, limit=2**20)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws/rates HTTP/1.1\r\nHost: 127.0.0.1:{replica.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode()
    )
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b" 101 " in response.split(b"\r\n", 1)[0], response
    assert b"permessage-deflate" in response.lower(), response
    client = RawClient(reader, writer)
    reading = asyncio.create_task(client.read())
    try:
        yield client
    finally:
        reading.cancel()
        writer.close()


async def flood(attacker: RawClient, batch: bytes, deadline_s: float = CLOSE_DEADLINE_S) -> float:
    """Send `batch` as fast as the connection takes it until the server closes it; when the flood began."""
    started = time.monotonic()
    async with asyncio.timeout(deadline_s):
        while True:
            if not await attacker.send(batch):
                break
            await asyncio.sleep(0)  # the reader's turn: drain() need not yield
        await attacker.closed.wait()
    return started
