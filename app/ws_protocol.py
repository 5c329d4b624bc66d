"""The WebSocket protocol the service runs under: `uvicorn app.main:app --ws app.ws_protocol:WebSocketProtocol`.

It is uvicorn's own (websockets-sansio, what `--ws auto` picks) with one addition:
a connection the service has finished with is reset if, uvicorn's close
timeout (10 s) later, bytes queued for the client are still unsent.

Why: closing a connection waits until everything queued for it has been
written. A client that stops reading is cut off and sent 1013
(docs/websocket.md), but if it never reads again its close frame never goes
out, and without this the server held the connection for as long as the client
kept its socket open, with up to megabytes queued for it in the kernel, after
its place under the connection limits had been given back (docs/limits.md).
Dropping it is an abortive close (a TCP reset) so the kernel frees what was
queued at once. A client that took everything gets the usual close; connections
the service has not finished with are not affected.
"""

import asyncio
import logging
import socket
import struct

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.metrics import Metrics

log = logging.getLogger(__name__)

# What `--ws` names to run it.
UVICORN_WS = "app.ws_protocol:WebSocketProtocol"
# SO_LINGER on, for 0 s: close() resets the connection and discards what is unsent.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    _drop_timer: asyncio.TimerHandle | None = None

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            # uvicorn has closed the transport (or will, once its close timeout runs out), which waits for the
            # buffer to be written first: a client that takes nothing more would hold it for ever.
            self._drop_timer = self.loop.call_later(self.close_timeout, self._drop_if_stuck)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        super().connection_lost(exc)

    def _drop_if_stuck(self) -> None:
        # Gone, or everything written and closing as usual (uvicorn's own close timer may have just run).
        if self.disconnected or not self.transport.get_write_buffer_size():
            return
        try:
            self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        except (AttributeError, OSError):
            pass  # no socket to set it on: aborting still frees what this process holds
        self.transport.abort()
        metrics = self.app_state.get("metrics")
        if isinstance(metrics, Metrics):
            metrics.websocket_dropped.inc()
        log.info("websocket client %s took nothing after it was closed: connection reset", self.client)
