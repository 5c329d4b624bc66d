"""What `/ws/rates` puts on the wire, seen by a raw client: one frame's bytes for every client. With
permessage-deflate, every message the server sends is compressed on its own (server_no_context_takeover,
RFC 7692 §7.1.1.1), so those bytes too are the same for every client with the same settings (app.live.protocol,
app.live.frames)."""

import asyncio
import json
import zlib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame as WireFrame
from websockets.frames import Opcode

from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite
from tests.support.stalled_ws import Frame, StalledClient
from tests.support.ws_client import WsClient

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

POLL_INTERVAL_S = 0.3
# The snapshot, the reply to a subscribe, then updates and ends of polls: a few polls' worth.
FRAMES = 8
# What browsers offer.
BROWSER_OFFER = "permessage-deflate; client_max_window_bits"


@pytest.fixture(scope="module")
def deflating(ws_fake: FakeFlutterwave, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """permessage-deflate negotiated with a client that offers it (`--ws-per-message-deflate true`)."""
    ws_fake.drift = Decimal("0.0005")  # every poll moves every pair (this module's fake): updates every 0.3 s
    with replica_on_sqlite(
        Path(tmp_path_factory.mktemp("frames")),
        ws_fake,
        per_message_deflate=True,
        POLL_INTERVAL_SECONDS=str(POLL_INTERVAL_S),
    ) as replica:
        yield replica


async def frames_of(replica: Replica, *, extensions: str | None, batch: bool) -> tuple[str | None, list[Frame]]:
    client = StalledClient("127.0.0.1", replica.port, extensions=extensions)
    await client.connect()
    try:
        if batch:
            await client.send(json.dumps({"type": "subscribe", "pairs": ["*"], "batch": True}))
        return client.extensions, await client.frames(FRAMES)
    finally:
        client.close()


def parameters(accepted: str | None) -> dict[str, str | None]:
    assert accepted is not None
    name, *params = (part.strip() for part in accepted.split(";"))
    assert name == "permessage-deflate"
    split = (param.partition("=") for param in params)
    return {key.strip(): value.strip() or None for key, _, value in split}


def inflated_alone(frame: Frame) -> bytes:
    """A compressed message read with a decompressor of its own: what a client may do once the server said
    `server_no_context_takeover`."""
    assert frame.compressed, "a frame went out uncompressed on a compressed connection"
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(frame.payload + b"\x00\x00\xff\xff")


def as_compressed_for(text: bytes, window_bits: int) -> bytes:
    """`text` as websockets' own encoder compresses it alone, within `window_bits`, with uvicorn's settings."""
    encoder = PerMessageDeflate(True, True, 15, window_bits, {"memLevel": 5})
    return bytes(encoder.encode(WireFrame(Opcode.TEXT, text)).data)


def kinds(messages: list[dict[str, Any]]) -> set[str]:
    return {message["type"] for message in messages}


@pytest.mark.parametrize("batch", [False, True], ids=["per-pair", "batch"])
async def test_a_browser_offering_compression_gets_every_frame_compressed_on_its_own(
    deflating: Replica, batch: bool
) -> None:
    accepted, frames = await frames_of(deflating, extensions=BROWSER_OFFER, batch=batch)

    assert parameters(accepted) == {
        "server_no_context_takeover": None,
        "server_max_window_bits": "12",
        "client_max_window_bits": "12",
    }
    messages = [json.loads(inflated_alone(frame)) for frame in frames]
    assert messages[0]["type"] == "all_rates" and len(messages[0]["rates"]) == 44
    assert ("rates_update" if batch else "rate_update") in kinds(messages[1:])


async def test_every_client_gets_the_bytes_its_own_compressor_would_make_within_the_window_it_asked_for(
    deflating: Replica,
) -> None:
    # Connected together, so they are sent the same snapshot and updates: compressed once for the two with the
    # same settings, once more for the one that allows the server a 512-byte window only.
    offers = [BROWSER_OFFER, BROWSER_OFFER, "permessage-deflate; server_max_window_bits=9"]
    results = await asyncio.gather(*(frames_of(deflating, extensions=offer, batch=False) for offer in offers))

    assert [parameters(accepted)["server_max_window_bits"] for accepted, _ in results] == ["12", "12", "9"]
    sent: list[dict[bytes, bytes]] = []
    for (_, frames), window_bits in zip(results, (12, 12, 9), strict=True):
        texts = [inflated_alone(frame) for frame in frames]
        assert json.loads(texts[0])["type"] == "all_rates"
        assert [frame.payload for frame in frames] == [as_compressed_for(text, window_bits) for text in texts]
        sent.append({text: frame.payload for text, frame in zip(texts, frames, strict=True)})
    assert sent[0].keys() & sent[1].keys() & sent[2].keys(), "the clients were sent no message alike"


@pytest.mark.parametrize("batch", [False, True], ids=["per-pair", "batch"])
async def test_a_client_that_offers_nothing_gets_plain_frames_from_the_same_server(
    deflating: Replica, batch: bool
) -> None:
    accepted, frames = await frames_of(deflating, extensions=None, batch=batch)

    assert accepted is None
    assert not any(frame.compressed for frame in frames)
    messages = [json.loads(frame.payload) for frame in frames]
    assert messages[0]["type"] == "all_rates" and len(messages[0]["rates"]) == 44
    assert ("rates_update" if batch else "rate_update") in kinds(messages[1:])


async def test_a_bare_offer_is_answered_with_no_parameter_of_the_client_it_did_not_offer(deflating: Replica) -> None:
    # What OkHttp and Netty offer: OkHttp fails on a client_max_window_bits it did not offer, Netty (by default)
    # on a client_no_context_takeover; both take server_no_context_takeover.
    accepted, frames = await frames_of(deflating, extensions="permessage-deflate", batch=False)

    assert parameters(accepted) == {"server_no_context_takeover": None, "server_max_window_bits": "12"}
    assert json.loads(inflated_alone(frames[0]))["type"] == "all_rates"


async def test_a_client_library_with_compression_on_talks_both_ways(deflating: Replica) -> None:
    # websockets compresses what it sends too, each message with what the ones before it left (context takeover):
    # the server keeps the client's context, and only its own messages are compressed alone.
    async with WsClient(f"ws://127.0.0.1:{deflating.port}/ws/rates/", compression="deflate") as client:
        response = client.connection.response
        assert response is not None
        accepted = parameters(response.headers["Sec-WebSocket-Extensions"])
        assert "server_no_context_takeover" in accepted and "client_no_context_takeover" not in accepted
        snapshot = await client.recv()
        assert snapshot["type"] == "all_rates" and len(snapshot["rates"]) == 44
        for _ in range(3):
            assert (await client.ask({"type": "ping"}, "pong"))["type"] == "pong"
        subscribed = await client.ask({"type": "subscribe", "pairs": ["USD/NGN"], "batch": True}, "subscribed")
        assert subscribed["pairs"] == ["USD/NGN"]
        update, _ = await client.recv_until(lambda message: message["type"] == "rates_update")
        assert {item["source_currency"] + item["destination_currency"] for item in update["rates"]} == {"USDNGN"}
