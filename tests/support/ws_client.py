"""A small WebSocket test client: JSON in, JSON out, every wait bounded by a deadline."""

import asyncio
import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect


class WsClient:
    def __init__(self, url: str, **options: Any) -> None:
        self._url = url
        # No bound on messages received and not yet read: with one (websockets' default is 16), a test that leaves
        # updates unread makes the library stop reading the socket, so it never sees the server's answer to its
        # close and waits out its 10 s close timeout (a quarter of closes, measured). Tests of a slow reader say so.
        self._options = {"max_queue": None, **options}
        self._connection: ClientConnection | None = None

    @property
    def connection(self) -> ClientConnection:
        assert self._connection is not None, "not connected"
        return self._connection

    async def __aenter__(self) -> Self:
        self._connection = await connect(self._url, open_timeout=10, **self._options)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.connection.close()

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.connection.send(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, timeout_s: float = 10) -> dict[str, Any]:
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that lands as a frame arrives, and a
        # task reading in a loop (cancelled at a test's end) then reads on for ever.
        async with asyncio.timeout(timeout_s):
            frame = await self.connection.recv()
        message: dict[str, Any] = json.loads(frame)
        return message

    async def recv_until(
        self, wanted: Callable[[dict[str, Any]], bool], timeout_s: float = 10
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The first message `wanted` accepts, and every message that came before it."""
        deadline = time.monotonic() + timeout_s
        skipped: list[dict[str, Any]] = []
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if wanted(message):
                return message, skipped
            skipped.append(message)

    async def ask(self, message: dict[str, Any] | str, reply_type: str | tuple[str, ...]) -> dict[str, Any]:
        """Send, then wait for the reply, skipping pushed updates that arrive meanwhile."""
        kinds = (reply_type,) if isinstance(reply_type, str) else reply_type
        await self.send(message)
        reply, _ = await self.recv_until(lambda m: m["type"] in kinds)
        return reply


def is_update_for(pair: str) -> Callable[[dict[str, Any]], bool]:
    source, destination = pair.split("/")

    def wanted(message: dict[str, Any]) -> bool:
        rate = message.get("rate") or {}
        return (
            message["type"] == "rate_update"
            and rate.get("source_currency") == source
            and rate.get("destination_currency") == destination
        )

    return wanted
