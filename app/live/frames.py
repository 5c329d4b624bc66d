"""A frame for WebSocket clients as text, and as the bytes on the wire, framed once for every client.

A server's frames are not masked (RFC 6455 §5.1), so without compression a text
frame's bytes are the same on every connection: the hub frames each update
once, and those bytes are written to every client (by the hub itself, or by
the client's sender) through the protocol the image runs (`app.live.protocol`)
instead of having uvicorn encode and frame the same text again per client
(docs/decisions/0015-prepared-frames-protocol.md).

With permessage-deflate, that protocol negotiates no context takeover for the
server (RFC 7692 §7.1.1.1), so each message it sends is compressed on its own
and its compressed bytes are the same on every connection with the same
settings: a frame is compressed once per `Deflate`, not once per client. Under
any other server the text goes through ASGI as usual.
"""

import functools
from dataclasses import dataclass
from typing import Any

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode


@dataclass(frozen=True, slots=True, eq=False)
class Deflate:
    """How a connection's frames are compressed: permessage-deflate as it negotiated it, the server's side
    without context takeover.

    Made by `deflate()`, one per settings, so the hub's lookups per client and frame hash it by identity.
    """

    window_bits: int
    compress_settings: tuple[tuple[str, Any], ...] = ()

    def frame(self, text: str) -> bytes:
        # websockets' own encoder, fresh for this message (no context takeover), so the bytes are the ones a
        # `websocket.send` on any such connection would have made.
        encoder = PerMessageDeflate(True, True, 15, self.window_bits, dict(self.compress_settings))
        return Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[encoder])


@functools.cache
def deflate(window_bits: int, compress_settings: tuple[tuple[str, Any], ...]) -> Deflate:
    """The one `Deflate` for these settings."""
    return Deflate(window_bits, compress_settings)


class Outgoing:
    __slots__ = ("_compressed", "_wire", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._wire: bytes | None = None
        self._compressed: dict[Deflate, bytes] | None = None

    def wire(self, deflate: Deflate | None = None) -> bytes:
        """The whole frame (header and payload) as the server writes it on a connection with `deflate` (None:
        uncompressed); built on first use, then shared."""
        if deflate is None:
            if self._wire is None:
                self._wire = Frame(Opcode.TEXT, self.text.encode()).serialize(mask=False)
            return self._wire
        if self._compressed is None:
            self._compressed = {}
        wire = self._compressed.get(deflate)
        if wire is None:
            wire = self._compressed[deflate] = deflate.frame(self.text)
        return wire
