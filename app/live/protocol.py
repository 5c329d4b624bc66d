"""The WebSocket protocol the service runs under: `uvicorn app.main:app --ws app.ws_protocol:WebSocketProtocol`.

It is uvicorn's own (websockets-sansio, what `--ws auto` picks) with three additions.

Frames framed once. Each push is the same frame to every client, and a
server's frames are not masked, so their bytes are the same on every
connection: the application frames each one once (app.live.frames) and writes
those bytes through a scope extension, `fxrates.prepared_frames`, instead of a
`websocket.send` that uvicorn would encode and frame again per client. Its
`send` waits, as `websocket.send` does, while the transport's buffer is full;
its `write_now` never waits, so the hub can write to every idle client in one
pass without waking each one's sender task (docs/performance.md).

Compressed once. With `--ws-per-message-deflate true`, permessage-deflate is
negotiated with uvicorn's settings (12-bit windows, memLevel 5) plus
`server_no_context_takeover` (RFC 7692 §7.1.1.1, which a server may add to
any offer and clients accept): each message the server sends is compressed on
its own, so a frame's compressed bytes are the same on every connection with
the same settings and are made once for all of them, and no connection keeps a
compressor between messages (uvicorn's default keeps one, tens of KiB per
connection). Compression loses what one message could borrow from the last;
the frames here are small and alike, and the cost was measured
(docs/performance.md). The client's own context takeover is left to the
client: imposing `client_no_context_takeover` on one that did not ask makes
some libraries (Netty's default) refuse the handshake.

A connection the service has finished with is reset if, uvicorn's close
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
import importlib.metadata
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.protocol import State

from app.kit.metrics import Metrics
from app.live.frames import Deflate, deflate

log = logging.getLogger(__name__)

# What `--ws` names to run it.
UVICORN_WS = "app.ws_protocol:WebSocketProtocol"
# The uvicorn releases the subclass below was tested with: it relies on internals of a class uvicorn does not
# document as an extension point (tests/test_uvicorn_contract.py names each one), so pyproject.toml pins this range.
TESTED_UVICORN = ">=0.54,<0.55"
# The scope extension under which the protocol offers `PreparedFrames`.
PREPARED_FRAMES = "fxrates.prepared_frames"
# SO_LINGER on, for 0 s: close() resets the connection and discards what is unsent.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
# uvicorn's permessage-deflate settings (websockets' defaults).
_WINDOW_BITS = 12
_COMPRESS_SETTINGS = {"memLevel": 5}


@dataclass(frozen=True, slots=True)
class PreparedFrames:
    """What the extension offers: writes of whole frames, as `websocket.send` would make them."""

    send: Callable[[bytes], Awaitable[None]]  # waits while the connection pushes back
    write_now: Callable[[bytes], bool]  # never waits: False when the connection cannot take them now
    deflate: Deflate | None  # how this connection's frames are compressed (None: not at all)


def prepared_frames(scope: MutableMapping[str, Any]) -> PreparedFrames | None:
    """The connection's writers of framed bytes, when the server offers them (else: send text through ASGI)."""
    offered = scope.get("extensions", {}).get(PREPARED_FRAMES)
    return offered if isinstance(offered, PreparedFrames) else None


def warn_if_untested_uvicorn(installed: str | None = None) -> None:
    """One warning when uvicorn (the installed one unless `installed` is given) is outside `TESTED_UVICORN`."""
    version = importlib.metadata.version("uvicorn") if installed is None else installed
    if not SpecifierSet(TESTED_UVICORN).contains(version, prereleases=True):
        log.warning(
            "uvicorn %s is outside the range tested (%s): the WebSocket protocol %s relies on its internals "
            "(tests/test_uvicorn_contract.py checks them)",
            version,
            TESTED_UVICORN,
            UVICORN_WS,
        )


class WebSocketProtocol(WebSocketsSansIOProtocol):
    _drop_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.ws_per_message_deflate:
            self.conn.available_extensions = [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    server_max_window_bits=_WINDOW_BITS,
                    client_max_window_bits=_WINDOW_BITS,
                    compress_settings=_COMPRESS_SETTINGS,
                )
            ]

    async def run_asgi(self) -> None:
        offer = self._prepared_frames()
        if offer is not None:
            self.scope["extensions"][PREPARED_FRAMES] = offer  # type: ignore[assignment]  # ASGI's types say dict
        await super().run_asgi()
        if not self.disconnected:
            # uvicorn has closed the transport (or will, once its close timeout runs out), which waits for the
            # buffer to be written first: a client that takes nothing more would hold it for ever.
            self._drop_timer = self.loop.call_later(self.close_timeout, self._drop_if_stuck)

    def _prepared_frames(self) -> PreparedFrames | None:
        match self.conn.extensions:
            case []:
                compression = None
            case [PerMessageDeflate(local_no_context_takeover=True) as negotiated]:
                settings = tuple(sorted(negotiated.compress_settings.items()))
                compression = deflate(negotiated.local_max_window_bits, settings)
            case _:
                return None  # each frame's bytes depend on the connection: text through ASGI
        return PreparedFrames(self.send_prepared, self.write_now, compression)

    async def send_prepared(self, frame: bytes) -> None:
        """Write whole unmasked frames (compressed as negotiated) where `websocket.send` would (after the accept)."""
        await self.writable.wait()
        if not self.handshake_complete:
            raise RuntimeError("a frame sent before the connection was accepted")
        if not self._open():
            raise ClientDisconnected()
        self.transport.write(frame)

    def write_now(self, frame: bytes) -> bool:
        """Write whole unmasked frames if `send_prepared` would without waiting; False (nothing written) if not."""
        if not (self.writable.is_set() and self.handshake_complete and self._open()):
            return False
        self.transport.write(frame)
        return True

    def _open(self) -> bool:
        # What `websocket.send` checks: neither side has begun closing.
        return not (self.disconnected or self.close_sent) and self.conn.state is State.OPEN

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
