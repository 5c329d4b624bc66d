"""What the image's WebSocket protocol (app.live.protocol) offers an application, per connection, under a real uvicorn
on loopback: the writers of prepared frames, with how that connection's frames are compressed.

Frames written through them are the same bytes whichever way a client negotiated (tests/test_ws_frames.py), so
only the application can see whether it was offered the shared path: this app tells the client.
"""

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect

from app.live.frames import Outgoing
from app.live.protocol import WebSocketProtocol, prepared_frames

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

Scope = dict[str, Any]
Receive = Any
Send = Any


async def tell_what_was_offered(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "websocket"
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    offered = prepared_frames(scope)
    deflate = None if offered is None else offered.deflate
    report = json.dumps(
        {
            "prepared": offered is not None,
            "window_bits": None if deflate is None else deflate.window_bits,
            "deflate_id": None if deflate is None else id(deflate),
        }
    )
    if offered is not None:
        await offered.send(Outgoing(report).wire(deflate))  # the path the hub takes
    else:
        await send({"type": "websocket.send", "text": report})
    while (await receive())["type"] != "websocket.disconnect":
        pass


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    """uvicorn with the image's protocol, compression as the test's parameter says, in this process."""
    # Listening before uvicorn starts, so clients queue in the backlog instead of racing its start-up.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        tell_what_was_offered,
        ws=WebSocketProtocol,
        ws_per_message_deflate=request.param,
        lifespan="off",
        log_level="warning",
    )
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve(sockets=[listener]))
    try:
        yield port
    finally:
        running.should_exit = True
        await task
        listener.close()


async def offered_to(port: int, compression: str | None) -> dict[str, Any]:
    async with connect(f"ws://127.0.0.1:{port}/", compression=compression, open_timeout=10) as websocket:
        async with asyncio.timeout(10):
            report: dict[str, Any] = json.loads(await websocket.recv())
        return report


@pytest.mark.parametrize("server", [True], indirect=True)
async def test_compressed_connections_get_the_shared_path_with_one_deflate_for_all(server: int) -> None:
    first, second = await asyncio.gather(offered_to(server, "deflate"), offered_to(server, "deflate"))

    assert first["prepared"] and first["window_bits"] == 12
    assert first["deflate_id"] == second["deflate_id"], "each connection got its own Deflate: no frame is shared"
    plain = await offered_to(server, None)
    assert plain == {"prepared": True, "window_bits": None, "deflate_id": None}


@pytest.mark.parametrize("server", [False], indirect=True)
async def test_without_compression_every_connection_gets_the_plain_path(server: int) -> None:
    assert await offered_to(server, "deflate") == {"prepared": True, "window_bits": None, "deflate_id": None}
