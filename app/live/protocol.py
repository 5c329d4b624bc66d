"""The WebSocket protocol the service runs under: `uvicorn app.main:app --ws app.ws_protocol:WebSocketProtocol`.

It is uvicorn's own (websockets-sansio, what `--ws auto` picks) with four additions.

Hostile clients bounded (docs/limits.md). A message over `MAX_MESSAGE_BYTES`
(64 KiB) is closed with 1009 as it arrives, whatever `--ws-max-size` says:
websockets counts a message's size frame by frame, fragments included, and
inflates a compressed one with that cap (zlib's max_length), so a small
message that would inflate to megabytes, or an endless stream of fragments,
costs at most 64 KiB before the close, never the message's inflated size.
And the frames the application never sees, pings, pongs and every fragment
but a message's last, take from the connection's message bucket
(app.limits.websocket), which the protocol hands the application in the
scope extension `fxrates.message_bucket` so that messages and frames share
one budget: a client that floods them is closed with 1008 as one that floods
messages is. Under uvicorn's own protocol these frames are answered (a ping's
pong) or assembled without the application hearing of them, and nothing
limits how fast they come.

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
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import State

from app.limits.websocket import (
    CLOSE_POLICY_VIOLATION,
    MAX_MESSAGE_BYTES,
    MESSAGE_BUCKET,
    MessageBucket,
    connection_bucket,
)
from app.live.frames import Deflate, deflate
from app.state import services_in

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
    _bucket: MessageBucket | None = None  # the connection's message budget, once its handshake is under way
    _flooded = False
    _half_closed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # websockets checks each frame's size against what is left of this before reading its payload, and inflates
        # no more than that (uvicorn passes it `--ws-max-size`, 16 MiB unless told).
        self.conn.max_message_size = min(self.config.ws_max_size, MAX_MESSAGE_BYTES)
        if self.config.ws_per_message_deflate:
            self.conn.available_extensions = [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    server_max_window_bits=_WINDOW_BITS,
                    client_max_window_bits=_WINDOW_BITS,
                    compress_settings=_COMPRESS_SETTINGS,
                )
            ]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.handshake_complete:
            return  # refused before the application ran
        self._bucket = connection_bucket(self.app_state)
        if self._bucket is not None:
            self.scope["extensions"][MESSAGE_BUCKET] = self._bucket  # type: ignore[assignment]  # ASGI's types say dict

    # Every frame but a complete message (which the application counts) takes from the bucket here.

    def handle_text(self, event: Frame) -> None:
        if event.fin or self._counted():
            super().handle_text(event)

    def handle_bytes(self, event: Frame) -> None:
        if event.fin or self._counted():
            super().handle_bytes(event)

    def handle_cont(self, event: Frame) -> None:
        if event.fin or self._counted():
            super().handle_cont(event)

    def handle_ping(self) -> None:
        if self._counted():
            super().handle_ping()

    def handle_pong(self, event: Frame) -> None:
        if self._counted():
            super().handle_pong(event)

    def _counted(self) -> bool:
        """Take a frame from the bucket; False, once the client has been closed with 1008 for flooding."""
        if self._flooded:
            return False  # the rest of what was read with the flood
        if self._bucket is None or self._bucket.take() or not self._bucket.exhausted:
            return True
        if self.conn.state is not State.OPEN:
            return True  # already closing: the closing handshake ends it
        self._flooded = True
        log.info("websocket client %s sent frames past its message rate: closed with 1008", self.client)
        self.conn.fail(CLOSE_POLICY_VIOLATION, "too many messages")  # as websockets fails one itself (1009)
        self.handle_parser_exception()
        return False

    def handle_parser_exception(self) -> None:
        """websockets failed the connection (1009, 1002, ...) or the protocol did (1008): close frame, then half-close.

        uvicorn closes the socket at once, and a client still sending (the rest of a too-big message, a flood) then
        gets a TCP reset, which can overtake the close frame: it never learns why. Here, as websockets' own server
        does, the server's side is shut after the close frame and what the client still sends is read and thrown
        away (websockets discards it) until the client closes, for at most the close timeout.
        """
        if self._half_closed:
            return  # uvicorn calls this again for each read that follows: websockets discarded it
        if not (self.conn.eof_sent and self.transport.can_write_eof()):
            super().handle_parser_exception()
            return
        self._half_closed = True
        assert self.conn.close_sent is not None
        close = self.conn.close_sent
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.write_eof()
        self.close_sent = True  # from here on nothing is written: no keepalive ping, no pong, no frame
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

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
        services = services_in(self.app_state)
        if services is not None:
            services.metrics.websocket_dropped.inc()
        log.info("websocket client %s took nothing after it was closed: connection reset", self.client)
