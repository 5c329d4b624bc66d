"""`GET /sse/rates` (docs/sse.md): the WebSocket's stream as server-sent events, for clients that cannot hold one.

The query is checked before anything starts (a bad one is a 422 in the error
envelope); then the stream holds a place among the process's WebSocket clients
(one pool for both transports, app.limits.websocket; no room: a 503 with
`Retry-After`) and joins the hub as a WebSocket client does. The hub's client
queues, conflates and is cut off when it stops reading (app.live.client); this
module is its sender: take a frame, write it as an event (app.live.sse), mark
it sent. A client that goes away (`http.disconnect`) leaves the hub at once; a
service shutting down (app/shutdown.py) ends every stream cleanly, so clients
reconnect elsewhere.
"""

import asyncio
import logging
import time
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from app.api.deps import SettingsDep
from app.api.schemas import ErrorResponse
from app.currencies import Pair
from app.errors import InvalidRequest, ServiceError, TooManyClients, error_body
from app.limits.addresses import limit_key
from app.live.client import HubClient, TooManyPairs
from app.live.hub import ALL, Hub
from app.live.sse import EventId, event, parse_event_id, retry_field
from app.state import services_of

log = logging.getLogger(__name__)

router = APIRouter(tags=["live"])

# What a client refused for want of room (or at shutdown) is told to wait before it tries again.
REFUSED_RETRY_AFTER_S = 5.0
# How long the end of a stream may take to write before the connection is left to the server to close.
END_TIMEOUT_S = 5.0
NO_STORE = "no-store"


class EventStream(Response):
    """The stream itself: a small ASGI app of its own, so it can hold its place and watch for the client's going."""

    media_type = "text/event-stream"

    def __init__(
        self, pairs: frozenset[Pair] | None, min_change_bps: Decimal, batch: bool, resume: "ResumeRequest"
    ) -> None:
        super().__init__(media_type=self.media_type)
        self._pairs, self._min_change_bps, self._batch, self._resume = pairs, min_change_bps, batch, resume

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = services_of(scope)
        hub = services.hub
        with services.ws_admission.admit(limit_key(scope)) as refusal:
            if refusal is not None:
                message = "Too many live clients on this server, in all or from this address; try again later."
                await _refuse(TooManyClients(message, REFUSED_RETRY_AFTER_S), scope, receive, send)
                return
            client = hub.join()
            try:
                await self._serve(client, hub, scope, receive, send)
            finally:
                hub.leave(client)

    async def _serve(self, client: HubClient, hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
        if client.close_code is not None:  # the hub is closing every client: the service is shutting down
            refusal = TooManyClients("This server is shutting down; connect again.", REFUSED_RETRY_AFTER_S)
            await _refuse(refusal, scope, receive, send)
            return
        client.subscribe(self._pairs, self._min_change_bps, self._batch)  # within the cap: checked by the endpoint
        try:
            # `Last-Event-ID` resumes as `?epoch=E&seq=N` does on the WebSocket (docs/sse.md): a malformed one is
            # a resume asked that cannot be answered, so the snapshot with `"resumed": false`.
            await hub.resume(client, *self._resume.as_query())
        except ServiceError as error:  # no snapshot to give (the database away since start-up)
            await _refuse(error, scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", NO_STORE.encode()),
                    # A proxy that buffers answers (nginx) would hold events back.
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        ending = await _stream(client, hub.epoch, receive, send)
        if ending == "slow":
            hub.count_slow_closed()
            # Nothing more is written to a client that takes nothing: the server closes the connection as the
            # answer was left unfinished (and its place is given back now).
            return
        if ending == "ended":
            try:
                async with asyncio.timeout(END_TIMEOUT_S):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except TimeoutError:
                log.info("an event-stream client took nothing while its stream ended; left to the server to close")


async def _refuse(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    headers = {**error.headers(), "Cache-Control": NO_STORE}
    await JSONResponse(error_body(error.message), status_code=error.status_code, headers=headers)(scope, receive, send)


async def _stream(client: HubClient, epoch: str, receive: Receive, send: Send) -> str:
    """Events until the stream ends: "gone" (the client left), "slow" (cut off for not reading) or "ended"."""
    async with asyncio.TaskGroup() as group:
        sender = group.create_task(_send_events(client, epoch, send))
        gone = group.create_task(_disconnected(receive))
        # Watched apart from the sender, which may sit blocked on a client that stopped reading.
        ended = group.create_task(client.ended())
        await asyncio.wait((sender, gone, ended), return_when=asyncio.FIRST_COMPLETED)
        for task in (sender, gone, ended):
            task.cancel()
    if gone.done() and not gone.cancelled():
        return "gone"
    return "slow" if client.slow else "ended"


async def _send_events(client: HubClient, epoch: str, send: Send) -> None:
    clock = time.monotonic
    first = retry_field()  # before the first event only
    while True:
        frame = await client.take()
        client.sending(clock())  # the hub cuts off a client whose send stays blocked too long
        await send({"type": "http.response.body", "body": first + event(frame.text, epoch), "more_body": True})
        first = b""
        client.sent()


async def _disconnected(receive: Receive) -> None:
    message: Message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()  # the rest of a request body, if one was sent: ignored


class ResumeRequest:
    """What a client reconnecting with `Last-Event-ID` asked for: `asked` whether it sent one at all, `since` the
    event id it named, when that was of the form `<epoch>:<seq>`."""

    __slots__ = ("asked", "since")

    def __init__(self, header: str | None) -> None:
        self.asked = header is not None
        self.since: EventId | None = parse_event_id(header)

    def as_query(self) -> tuple[str | None, str | None]:
        """As the WebSocket's `epoch` and `seq` query parameters: none when not asked, an unanswerable pair when
        the header was malformed."""
        if self.since is not None:
            return self.since.epoch, str(self.since.seq)
        return (None, "") if self.asked else (None, None)


def _parse_pairs(text: str | None, max_pairs: int) -> frozenset[Pair] | None:
    """The pairs a query names (None: every pair); `InvalidRequest` naming the field for anything else."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if ALL in names:
        return None
    pairs: set[Pair] = set()
    for name in names:
        source, slash, destination = name.partition("/")
        try:
            if not slash:
                raise ValueError(f"{name!r} is not a pair like 'USD/NGN'")
            pairs.add(Pair.parse(source, destination))
        except ValueError as error:
            message = str(error) if not slash else f"{name!r}: {error}"
            raise InvalidRequest(f"Invalid pairs: {message}.", [{"field": "pairs", "message": message}]) from None
    if len(pairs) > max_pairs:
        message = str(TooManyPairs(len(pairs), max_pairs)).split(";")[0]
        raise InvalidRequest(f"Invalid pairs: {message}.", [{"field": "pairs", "message": message}])
    return frozenset(pairs)


_EXAMPLE = (
    "retry: 3000\n"
    "id: 3f9c2b7e51d04a6c8e2f1a9b7c5d3e10:4181\n"
    "event: all_rates\n"
    'data: {"type":"all_rates","rates":[…],"as_of":"2026-11-24T10:00:01Z","epoch":"3f9c2b7e51d04a6c8e2f1a9b7c5d3e10",'
    '"seq":4181}\n\n'
    "id: 3f9c2b7e51d04a6c8e2f1a9b7c5d3e10:4182\n"
    "event: rate_update\n"
    'data: {"type":"rate_update","rate":{…},"previous_rate":0.00065412,"seq":4182}\n\n'
)


def _error(description: str, message: str, *, retry: bool = False) -> dict[str, Any]:
    # The schema named here, not as `model`: FastAPI would file a model under the route's own media type.
    schema = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema, "example": error_body(message)}},
    }
    if retry:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "integer"}}
        }
    return response


@router.get(
    "/sse/rates",
    response_class=EventStream,
    status_code=200,
    summary="Every change, as server-sent events",
    description=(
        "The WebSocket's stream (`/ws/rates`, described at [/asyncapi.json](/asyncapi.json)) for clients that "
        "cannot hold a WebSocket: one event per frame, named by the frame's `type`, its data the frame's JSON. "
        "First `all_rates` (preceded by `retry: 3000`), then `rate_update`s (or `rates_update`s with `batch=true`) "
        "and `all_rates_update`s. An event whose frame carries a `seq` has `id: <epoch>:<seq>`. The stream never "
        "ends while the service runs; it counts toward the WebSocket client limits. Never cached."
    ),
    responses={
        200: {
            "description": "A `text/event-stream` that goes on until the client leaves or the service restarts",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": _EXAMPLE}},
        },
        422: _error("A bad parameter", "Invalid pairs: 'USDNGN' is not a pair like 'USD/NGN'."),
        503: _error(
            "No room for another client (`WS_MAX_CLIENTS`, `WS_MAX_CLIENTS_PER_ADDRESS`), the service shutting "
            "down, or no rate readable yet",
            "Too many live clients on this server, in all or from this address; try again later.",
            retry=True,
        ),
    },
)
async def stream_rates(
    settings: SettingsDep,
    pairs: Annotated[
        str | None,
        Query(
            description='Comma-separated pairs like "USD/NGN,GBP/KES" (any case), or "*": the pairs whose '
            "updates are sent. Default: every pair. At most WS_MAX_PAIRS_PER_CLIENT pairs.",
            max_length=16_384,
        ),
    ] = None,
    min_change_bps: Annotated[
        Decimal,
        Query(
            ge=0,
            le=1_000_000,
            allow_inf_nan=False,
            description="Send a pair's update only when destination_per_source moved at least this many basis "
            "points from the last value this client was sent for it",
        ),
    ] = Decimal(0),
    batch: Annotated[
        bool,
        Query(description="true: `rates_update` events (all that is due since the last) instead of `rate_update`s"),
    ] = False,
    last_event_id: Annotated[
        str | None,
        Header(
            description="The `id` of the last event received (`<epoch>:<seq>`), sent by a reconnecting client",
            max_length=256,
        ),
    ] = None,
) -> EventStream:
    chosen = _parse_pairs(pairs, settings.ws_max_pairs_per_client)
    return EventStream(chosen, min_change_bps, batch, ResumeRequest(last_event_id))


@router.head("/sse/rates", include_in_schema=False)
async def stream_rates_head() -> Response:
    """HTTP asks HEAD wherever GET works (uptime checks send it): the stream's headers, and no stream held open."""
    return Response(status_code=200, media_type="text/event-stream", headers={"Cache-Control": NO_STORE})
