"""The WebSocket protocol the service runs under: `uvicorn app.main:app --ws app.ws_protocol:WebSocketProtocol`.

It is uvicorn's own (websockets-sansio, what `--ws auto` picks) with one addition:
a connection the service has finished with is dropped if it has not gone
within uvicorn's close timeout (10 s).

Why: closing a connection waits until everything queued for it has been
written. A client that stops reading is cut off and sent 1013
(docs/websocket.md), but if it never reads again its close frame never goes
out, and without this the server held the connection for as long as the client
kept its socket open, with up to megabytes queued for it in the kernel, after
its place under the connection limits had been given back (docs/limits.md).
Dropping it is an abortive close (a TCP reset) so the kernel frees what was
queued at once. Connections the service has not finished with are not
affected.
"""

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
    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            # uvicorn has closed the transport (or will, once its close timeout runs out), which waits for the
            # buffer to be written first: a client that takes nothing more would hold it for ever.
            self.loop.call_later(self.close_timeout, self._drop)

    def _drop(self) -> None:
        if self.disconnected:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self.transport.abort()
        metrics = self.app_state.get("metrics")
        if isinstance(metrics, Metrics):
            metrics.websocket_dropped.inc()
        log.info("a websocket client that took nothing after it was closed was dropped")
