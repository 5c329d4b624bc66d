"""WebSocket `/ws/rates` (docs/websocket.md): a snapshot on connect, then every change, pushed.

Each socket is served by a receiver, a sender and a watcher in one task group,
so when one ends (the client leaves, or is cut off for not reading) the others
are cancelled with it. The client messages below, with the server frames in
`app.rates.wire.SERVER_FRAMES`, are the whole protocol.
"""

import asyncio
import json
import logging
import time
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocketState

from app.api.deps import HubDep, LookupDep
from app.currencies import Pair
from app.errors import NotFound, RateUnavailable, TooManyRequests, Withheld, retry_after
from app.limits.addresses import limit_key
from app.limits.per_client import ClientLimiter
from app.limits.websocket import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    MAX_MESSAGE_BYTES,
    MAX_PAIRS_PER_CLIENT,
    admitted,
    message_bucket,
)
from app.live.client import HubClient, TooManyPairs
from app.live.hub import ALL, Hub
from app.live.protocol import PreparedFrames, prepared_frames
from app.rates.lookup import RateLookup
from app.rates.wire import ErrorFrame, Pong, RateItem, RateReply, Subscribed
from app.state import services_of

log = logging.getLogger(__name__)

router = APIRouter()

MAX_FRAME_BYTES = MAX_MESSAGE_BYTES  # the server closes a longer one first (app.live.protocol, --ws-max-size)
CLOSE_TOO_BIG = 1009
# The most pairs one message may name: what a client may follow by default (WS_MAX_PAIRS_PER_CLIENT). Where the
# cap is raised, a client subscribes in several messages; where it is lowered, the cap answers `too_many_pairs`.
MAX_PAIRS_PER_MESSAGE = MAX_PAIRS_PER_CLIENT
# Parsed pairs shared by every client that names them (a client following 256 pairs then holds 256 references,
# not 256 pairs of its own); at most this many kept, least recently named forgotten.
INTERNED_PAIRS = 4096


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class GetAllRates(_Message):
    type: Literal["get_all_rates"]


class GetRate(_Message):
    type: Literal["get_rate"]
    source_currency: str
    destination_currency: str


class Subscribe(_Message):
    type: Literal["subscribe"]
    pairs: list[str] = Field(min_length=1, max_length=MAX_PAIRS_PER_MESSAGE)
    min_change_bps: Annotated[Decimal, Field(ge=0, le=1_000_000, allow_inf_nan=False, strict=False)] | None = None
    # true: `rates_update` frames (every update due since the last frame) instead of one `rate_update` each.
    batch: bool | None = None


class Unsubscribe(_Message):
    type: Literal["unsubscribe"]
    pairs: list[str] = Field(min_length=1, max_length=MAX_PAIRS_PER_MESSAGE)


class Ping(_Message):
    type: Literal["ping"]


# Every message a client may send (docs/websocket.md), for schema generators.
CLIENT_MESSAGES: tuple[type[_Message], ...] = (GetAllRates, GetRate, Subscribe, Unsubscribe, Ping)

ClientMessage = TypeAdapter(
    Annotated[GetAllRates | GetRate | Subscribe | Unsubscribe | Ping, Field(discriminator="type")]
)


class BadRequest(Exception):
    pass


def _parse(text: str) -> GetAllRates | GetRate | Subscribe | Unsubscribe | Ping:
    try:
        raw: Any = json.loads(text, parse_float=Decimal)
    except (ValueError, RecursionError, ArithmeticError):
        # Malformed, nested past the parser's depth, or a number no Decimal can hold: all just bad input.
        raise BadRequest("not JSON (or nested or sized beyond what is accepted)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise BadRequest('a message is a JSON object with a string "type"')
    try:
        return ClientMessage.validate_python(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "type"
        raise BadRequest(f"{where}: {first['msg']}") from None


def _pair(text: str) -> Pair:
    source, slash, destination = text.partition("/")
    if not slash:
        raise BadRequest(f"{text!r} is not a pair like 'USD/NGN'")
    try:
        return _interned(Pair.parse(source, destination))
    except ValueError as error:
        raise BadRequest(f"{text!r}: {error}") from None


@lru_cache(maxsize=INTERNED_PAIRS)
def _interned(pair: Pair) -> Pair:
    return pair


def _pairs(texts: list[str]) -> set[Pair] | None:
    """The pairs named, or None for "*" (every pair)."""
    if ALL in texts:
        return None
    return {_pair(text) for text in texts}


def _subscribed(client: HubClient) -> str:
    pairs = [ALL] if client.pairs is None else sorted(str(pair) for pair in client.pairs)
    return Subscribed(pairs=pairs, min_change_bps=client.min_change_bps).model_dump_json()


async def _answer(text: str, client: HubClient, hub: Hub, lookup: RateLookup, limit: "_RequestLimit") -> None:
    message = _parse(text)
    if isinstance(message, Ping):
        client.send(Pong().model_dump_json())
    elif isinstance(message, GetAllRates):
        client.send_snapshot(await hub.snapshot())
    elif isinstance(message, GetRate):
        refusal = await limit.refusal()
        if refusal is not None:
            client.send(refusal)
            return
        pair = _pair(f"{message.source_currency}/{message.destination_currency}")
        try:
            found = await lookup.get(pair)
        except RateUnavailable:
            client.send(ErrorFrame(code="not_found", message=f"No rate for {pair} is available.").model_dump_json())
            return
        except Withheld as error:
            client.send(ErrorFrame(code="withheld", message=error.message).model_dump_json())
            return
        except NotFound as error:
            client.send(ErrorFrame(code="not_found", message=error.message).model_dump_json())
            return
        except TooManyRequests as error:
            # Beyond the deployment's on-demand budget, as over REST (docs/limits.md).
            client.send(ErrorFrame(code="try_again_later", message=error.message).model_dump_json())
            return
        item = RateItem.of(found.rate, stale=found.stale, corridor=lookup.corridors.mark(pair))
        frame = RateReply(rate=item).model_dump_json()
        client.send(frame, pair, found.rate.destination_per_source)
    elif isinstance(message, Subscribe):
        try:
            client.subscribe(_pairs(message.pairs), message.min_change_bps, message.batch)
        except TooManyPairs as error:
            client.send(ErrorFrame(code="too_many_pairs", message=str(error)).model_dump_json())
            return
        client.send(_subscribed(client))
    elif isinstance(message, Unsubscribe):
        await client.unsubscribe(_pairs(message.pairs), hub.stored_pairs)
        client.send(_subscribed(client))


class _RequestLimit:
    """`get_rate` counts toward the client address's `RATE_LIMIT_PER_MINUTE` as a REST request does
    (docs/limits.md): the same limiter, under the same key, so REST and WebSocket spend one budget."""

    def __init__(self, limiter: ClientLimiter, key: str) -> None:
        self._limiter, self._key = limiter, key

    async def refusal(self) -> str | None:
        """The error frame for a request past the limit (the request counted if not); None: go ahead."""
        limiter = self._limiter
        if not limiter.limit:
            return None
        verdict = await limiter.check(self._key)
        if verdict.allowed:
            return None
        message = (
            f"Too many requests from this address (at most {limiter.limit} a minute, REST and get_rate together); "
            f"try again in {retry_after(verdict.reset_s)} s."
        )
        return ErrorFrame(code="rate_limited", message=message).model_dump_json()


async def _receive(websocket: WebSocket, client: HubClient, hub: Hub, lookup: RateLookup) -> None:
    bucket = message_bucket(websocket)
    limit = _RequestLimit(services_of(websocket.scope).client_limiter, limit_key(websocket.scope))
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        text: str | None = message.get("text")
        size = len(text.encode()) if text is not None else len(message.get("bytes") or b"")
        if size > MAX_FRAME_BYTES:
            client.close(CLOSE_TOO_BIG)
            return
        if not bucket.take():
            if bucket.exhausted:
                client.close(CLOSE_POLICY_VIOLATION)
                return
            client.send(ErrorFrame(code="rate_limited", message="Too many messages; slow down.").model_dump_json())
            continue
        try:
            if text is None:
                raise BadRequest("binary frames are not understood; send JSON text")
            await _answer(text, client, hub, lookup, limit)
        except BadRequest as error:
            client.send(ErrorFrame(code="bad_request", message=str(error)).model_dump_json())


async def _send(websocket: WebSocket, client: HubClient, prepared: PreparedFrames | None) -> None:
    clock = time.monotonic
    while True:
        frame = await client.take()
        client.sending(clock())  # the hub cuts off a client whose send stays blocked too long
        try:
            if prepared is not None:
                await prepared.send(frame.wire(prepared.deflate))  # framed once for every client (app.live.frames)
            else:
                await websocket.send_text(frame.text)
        except (RuntimeError, OSError) as error:
            # The client's close frame arrived first and the server already answered it: the socket is done.
            raise WebSocketDisconnect(1000) from error
        client.sent()


async def serve(websocket: WebSocket, hub: HubDep, lookup: LookupDep) -> None:
    async with admitted(websocket) as admitted_:
        if admitted_:
            await _serve(websocket, hub, lookup)


async def _serve(websocket: WebSocket, hub: Hub, lookup: RateLookup) -> None:
    await websocket.accept()
    client = hub.join()
    prepared = prepared_frames(websocket.scope)
    if prepared is not None:
        client.attach(prepared.write_now, prepared.deflate)  # written to at once while idle, its sender asleep
    try:
        # `?epoch=E&seq=N`: resume (docs/websocket.md); anything else, or nothing, gets the snapshot.
        query = websocket.query_params
        await hub.resume(client, query.get("epoch"), query.get("seq"))
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_receive(websocket, client, hub, lookup)),
                group.create_task(_send(websocket, client, prepared)),
                # Watched apart from the sender, which may sit blocked on a client that stopped reading.
                group.create_task(client.ended()),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            if client.slow:
                hub.count_slow_closed()
                client.close(CLOSE_TRY_AGAIN_LATER)
    except* (WebSocketDisconnect, OSError):
        pass
    finally:
        hub.leave(client)
    if client.close_code is not None and websocket.application_state is WebSocketState.CONNECTED:
        try:
            async with asyncio.timeout(5):
                await websocket.close(client.close_code)
        except WebSocketDisconnect:
            pass  # it went away by itself before its close frame could be sent (at shutdown, thousands at once)
        except (TimeoutError, RuntimeError, OSError):
            log.info("a websocket client could not be closed cleanly; dropped")


router.add_api_websocket_route("/ws/rates", serve)
router.add_api_websocket_route("/ws/rates/", serve)
