"""What `/ws/rates` puts on the wire, seen by a raw client: one frame's bytes for every client, unless a client
negotiated permessage-deflate, whose frames are then compressed for it alone (app.ws_protocol, app.live.frames)."""

import json
import zlib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.fake_flutterwave import FakeFlutterwave
from tests.replicas import Replica, replica_on_sqlite
from tests.stalled_ws import Frame, StalledClient

POLL_INTERVAL_S = 0.3
# The snapshot, the reply to a subscribe, then updates and ends of polls: a few polls' worth.
FRAMES = 8


@pytest.fixture(scope="module")
def deflating(ws_fake: FakeFlutterwave, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """uvicorn's default: permessage-deflate negotiated with a client that offers it."""
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


def kinds(messages: list[dict[str, Any]]) -> set[str]:
    return {message["type"] for message in messages}


@pytest.mark.parametrize("batch", [False, True], ids=["per-pair", "batch"])
async def test_a_client_that_offers_compression_gets_every_frame_compressed(deflating: Replica, batch: bool) -> None:
    accepted, frames = await frames_of(deflating, extensions="permessage-deflate", batch=batch)

    assert accepted is not None and accepted.startswith("permessage-deflate")
    assert all(frame.compressed for frame in frames), "a frame went out uncompressed on a compressed connection"
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # one context for the connection (context takeover)
    messages = [json.loads(inflate.decompress(frame.payload + b"\x00\x00\xff\xff")) for frame in frames]
    assert messages[0]["type"] == "all_rates" and len(messages[0]["rates"]) == 44
    assert ("rates_update" if batch else "rate_update") in kinds(messages[1:])


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
