"""A frame for WebSocket clients as text, and as the bytes on the wire, framed once for every client.

A server's frames are not masked (RFC 6455 §5.1), so without compression a text
frame's bytes are the same on every connection: the hub frames each update
once, and those bytes are written to every client (by the hub itself, or by
the client's sender) through the protocol the image runs (`app.ws_protocol`)
instead of having uvicorn encode and frame the same text again per client
(docs/performance.md). Under any other server,
or with permessage-deflate negotiated, the text goes through ASGI as usual.
"""

from websockets.frames import Frame, Opcode


class Outgoing:
    __slots__ = ("_wire", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        """The whole frame (header and payload) as the server writes it; built on first use, then shared."""
        if self._wire is None:
            self._wire = Frame(Opcode.TEXT, self.text.encode()).serialize(mask=False)
        return self._wire
