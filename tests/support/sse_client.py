"""A server-sent events client for tests: httpx's byte stream, parsed as the HTML standard's EventSource parses it.

No SSE client library is in the lock (httpx-sse is not), and httpx's `aiter_lines` splits lines as
`str.splitlines` does (on U+2028 and others too), where the event-stream format ends a line only at CR, LF or
CRLF. So the few rules (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation)
are here: a blank line dispatches an event, `:` starts a comment, `data` lines are joined with LF, an event with no
data is not dispatched, `id` persists from one event to the next, `retry` takes only digits.

Each `Event` also says which fields its own block carried (`id`, `retry`), so a test can tell an event that has
an id from one that inherits the last.
"""

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    type: str  # "message" when the block named none
    data: str
    id: str | None  # the `id` its own block carried, if any
    last_event_id: str  # what an EventSource's `lastEventId` would read
    retry: int | None  # the `retry` its own block (or a data-less block just before) carried, if any

    def json(self) -> Any:
        return json.loads(self.data)


class EventStream:
    """Events parsed from a byte stream, incrementally."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []
        self._type = ""
        self._id: str | None = None
        self._retry: int | None = None
        self.last_event_id = ""
        self.reconnection_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        buffer = self._pending + chunk
        # A CR at the end of a chunk may be the first half of a CRLF: its line waits for the next chunk, so
        # that chunk's LF is not read as a blank line.
        held = b"\r" if buffer.endswith(b"\r") else b""
        lines = _LINE_END.split(buffer[: len(buffer) - len(held)])
        self._pending = lines.pop() + held  # not ended yet
        for raw in lines:
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self.last_event_id = value
            self._id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.reconnection_ms = self._retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._type, self._id = "", None  # the retry seen stays with the next event
            return None
        event = Event(self._type or "message", "\n".join(self._data), self._id, self.last_event_id, self._retry)
        self._data, self._type, self._id, self._retry = [], "", None, None
        return event


class SseClient:
    """`async with SseClient(url) as stream`: the answer's status and headers at once; `next()` for each event."""

    def __init__(
        self,
        url: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        *,
        local_address: str | None = None,
    ) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=local_address)
        self._client = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10, read=None))
        self._request = self._client.build_request("GET", url, params=params, headers=headers)
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._parser = EventStream()
        self._ready: list[Event] = []
        self.ended = False  # the server ended the stream (cleanly: the last chunk arrived)

    async def __aenter__(self) -> "SseClient":
        self._response = await self._client.send(self._request, stream=True)
        self._chunks = self._response.aiter_raw()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._response is not None:
            await self._response.aclose()
        await self._client.aclose()

    @property
    def response(self) -> httpx.Response:
        assert self._response is not None
        return self._response

    async def body(self) -> Any:
        """A refusal's JSON body."""
        return json.loads(await self.response.aread())

    async def next(self) -> Event:
        """The next event; `EOFError` once the server ended the stream."""
        assert self._chunks is not None
        while not self._ready:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self.ended = True
                raise EOFError("the server ended the stream") from None
            self._ready.extend(self._parser.feed(chunk))
        return self._ready.pop(0)

    async def until(self, done: Callable[[Event], bool]) -> tuple[Event, list[Event]]:
        """Events up to the first that `done` accepts: it, and those before it."""
        before: list[Event] = []
        while True:
            event = await self.next()
            if done(event):
                return event, before
            before.append(event)
