"""A TCP proxy on 127.0.0.1 that can take a dependency away: the service talks to PostgreSQL through it.

It runs its own event loop in a thread, so tests that block (urllib, subprocesses) do not stall it.

    proxy.cut()      abort every open connection (RST) and close new ones as soon as they arrive
    proxy.refuse()   stop listening (new connections are refused) and close open ones cleanly (FIN)
    proxy.hang()     accept and hold every connection, open or new, forwarding nothing either way
    proxy.restore()  forward again; connections held by `hang` are aborted, as a network that
                     comes back after a partition has lost them

`TcpProxy(host, port, refuse_websockets=True)` answers every WebSocket upgrade with a 403 and forwards the rest,
as a corporate proxy that blocks upgrades does (a browser opens each WebSocket on a connection of its own, so the
first request of a connection is the one to look at).
"""

import asyncio
import re
import socket
import struct
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, Self

Mode = Literal["forward", "cut", "refused", "hang"]
_UPGRADE = re.compile(rb"^upgrade:\s*websocket\s*$", re.IGNORECASE | re.MULTILINE)


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends RST, as a connection killed by a middlebox or a crash.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, refuse_websockets: bool = False) -> None:
        self._target = (target_host, target_port)
        self._refuse_websockets = refuse_websockets
        self.refused_upgrades = 0
        self.mode: Mode = "forward"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-proxy")
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self.accepted = 0

    # switches (called from the test's thread)

    def cut(self) -> None:
        self._run(self._set_mode("cut"))

    def refuse(self) -> None:
        self._run(self._set_mode("refused"))

    def hang(self) -> None:
        self._run(self._set_mode("hang"))

    def restore(self) -> None:
        self._run(self._set_mode("forward"))

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # the proxy (on its own loop)

    async def _set_mode(self, mode: Mode) -> None:
        previous, self.mode = self.mode, mode
        links = list(self._links)
        if mode == "cut":
            for link in links:
                link.abort()
        elif mode == "refused":
            for link in links:
                link.close()
            await self._stop_listening()
        elif mode == "forward":
            if previous == "hang":
                for link in links:
                    link.abort()
            if self._server is None:
                await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        if self.mode == "cut":
            link.abort()
            return
        self._links.add(link)
        try:
            if self.mode == "hang":
                await self._swallow(reader)
                return
            first = b""
            if self._refuse_websockets:
                first = await reader.read(65536)
                if _UPGRADE.search(first.split(b"\r\n\r\n", 1)[0]):
                    self.refused_upgrades += 1
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    return
            try:
                upstream_reader, link.upstream = await asyncio.open_connection(*self._target)
            except OSError:
                link.abort()
                return
            link.upstream.write(first)
            link.tasks = [
                asyncio.ensure_future(self._pipe(reader, link.upstream, link)),
                asyncio.ensure_future(self._pipe(upstream_reader, writer, link)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.close()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode == "hang":
                    # An open connection goes silent too: what it is sent is swallowed, nothing comes back.
                    await self._swallow(reader)
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.close()

    def start(self) -> Self:
        self._thread.start()
        self._run(self._listen())
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._stop_listening()
            for link in list(self._links):
                link.abort()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
