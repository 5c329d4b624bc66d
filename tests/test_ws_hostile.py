"""Hostile WebSocket clients against a real uvicorn (docs/limits.md): none costs the process more than a few MiB.

Each attack is made of frames built by hand on a raw socket, as an attacker would send them (a client library
would refuse to send most of them): a small compressed message that inflates to megabytes, a message sent as an
endless stream of fragments, a flood of pings, a flood of empty fragments. Each test checks the close code the
attacker gets, how far the server process's resident memory rose (its peak, reset before the attack), and that a
well-behaved client on the same process is answered and gets updates meanwhile.

Sizes hold under the image's protocol and under uvicorn's own (`--ws-max-size`); floods of frames the application
never sees are closed only under the image's protocol (app.live.protocol), uvicorn's own answers them unseen.
"""

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from app.live.protocol import UVICORN_WS
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.raw_ws import CLOSE_DEADLINE_S, CONT, PING, TEXT, RawClient, deflated, flood, frame, raw_client
from tests.support.replicas import Replica, replica_on_sqlite
from tests.support.ws_client import WsClient

pytestmark = pytest.mark.slow  # real servers

CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
# How far the process's peak resident memory may rise during one attack: the 64 KiB message it may hold, a few
# buffers and allocator noise. Without the limits these attacks raise it by 10 MiB and more.
MEMORY_BOUND_BYTES = 4 * 1024 * 1024
INFLATED_BYTES = 12 * 1024 * 1024

PROTOCOLS = {"image": UVICORN_WS, "uvicorn": "websockets-sansio"}


@pytest.fixture(scope="module", params=list(PROTOCOLS))
def hostile_service(
    request: pytest.FixtureRequest, ws_fake: FakeFlutterwave, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """The service as the image runs it, or under uvicorn's own protocol, with the production message rate."""
    with replica_on_sqlite(
        Path(tmp_path_factory.mktemp(f"hostile-{request.param}")),
        ws_fake,
        ws_protocol=PROTOCOLS[request.param],
        POLL_INTERVAL_SECONDS="0.3",
        UPSTREAM_TIMEOUT_SECONDS="1",
        UPSTREAM_MAX_ATTEMPTS="1",
        WS_MESSAGES_PER_SECOND="10",
        WS_MESSAGE_BURST="50",
    ) as replica:
        yield replica


# Floods of pings and fragments are limited under the image's protocol only: uvicorn's own answers pings and
# assembles fragments where the application never sees them (docs/limits.md).
image_only = pytest.mark.parametrize("hostile_service", ["image"], indirect=True)


def memory(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


@contextmanager
def memory_growth_bounded(replica: Replica) -> Iterator[None]:
    """Inside: an attack whose peak resident memory may rise at most MEMORY_BOUND_BYTES above the start."""
    assert replica.process is not None
    pid = replica.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident now
    before = memory(pid)["VmRSS"]
    yield
    after = memory(pid)
    growth = after["VmHWM"] - before
    assert growth <= MEMORY_BOUND_BYTES, f"peak rose {growth / 2**20:.1f} MiB (from {before / 2**20:.1f} MiB)"


@asynccontextmanager
async def attack_on(replica: Replica) -> AsyncIterator[RawClient]:
    """An attacker's connection, the server's memory growth bounded while it lasts."""
    with memory_growth_bounded(replica):
        async with raw_client(replica) as attacker:
            yield attacker


@asynccontextmanager
async def well_behaved(replica: Replica) -> AsyncIterator[WsClient]:
    """A client that keeps to the rules on the same process; answered and updated before the block and after."""
    async with WsClient(replica.ws_url) as client:
        await client.recv()  # the snapshot
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}
        yield client
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}
        pong = await client.connection.ping()
        await asyncio.wait_for(pong, 10)
        await client.recv_until(lambda message: message["type"] == "all_rates_update")


async def keep_asking(client: WsClient, attacker: RawClient) -> int:
    """Application pings while the attack lasts, within the message rate: how many were answered."""
    answered = 0
    while not attacker.closed.is_set():
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}
        answered += 1
        await asyncio.sleep(0.2)  # pacing, not waiting: 5 a second keeps it well under its own limit
    return answered


async def test_a_small_compressed_message_that_inflates_past_64_kib_closes_with_1009(hostile_service: Replica) -> None:
    bomb = frame(TEXT, deflated(b"x" * INFLATED_BYTES), compressed=True)
    assert len(bomb) < 64 * 1024  # small on the wire: only inflating it makes it big
    async with well_behaved(hostile_service) as client, attack_on(hostile_service) as attacker:
        assert await attacker.send(bomb)
        answered = await asyncio.gather(keep_asking(client, attacker), asyncio.wait_for(attacker.closed.wait(), 10))
        assert attacker.close_code == CLOSE_TOO_BIG
    assert answered[0] >= 1


async def test_a_compressed_message_sent_in_fragments_closes_with_1009_once_past_64_kib(
    hostile_service: Replica,
) -> None:
    compressed = deflated(b"x" * INFLATED_BYTES)  # about 12 KiB, sent 256 bytes a fragment
    pieces = [compressed[at : at + 256] for at in range(0, len(compressed), 256)]
    fragments = [frame(TEXT, pieces[0], fin=False, compressed=True)]
    fragments += [frame(CONT, piece, fin=False) for piece in pieces[1:]]
    async with well_behaved(hostile_service), attack_on(hostile_service) as attacker:
        async with asyncio.timeout(CLOSE_DEADLINE_S):
            for fragment in fragments:
                if not await attacker.send(fragment):
                    break
            await attacker.closed.wait()
        # Past 64 KiB inflated within the first fragments, long before the message's rate would count.
        assert attacker.close_code == CLOSE_TOO_BIG


async def test_a_long_stream_of_fragments_closes_with_1009_once_past_64_kib(hostile_service: Replica) -> None:
    piece = b"y" * 8192
    async with well_behaved(hostile_service) as client, attack_on(hostile_service) as attacker:
        assert await attacker.send(frame(TEXT, piece, fin=False))
        answered = await asyncio.gather(
            keep_asking(client, attacker), flood(attacker, frame(CONT, piece, fin=False) * 16)
        )
        if hostile_service.ws_protocol == UVICORN_WS:
            assert attacker.close_code == CLOSE_TOO_BIG
        else:
            # uvicorn's own closes the socket right after its 1009 with the flood unread, which resets the
            # connection: the reset may overtake the close frame (the image's protocol reads on, docs/limits.md).
            assert attacker.close_code in (CLOSE_TOO_BIG, None)
    assert answered[0] >= 1


@image_only
async def test_a_ping_flood_is_closed_with_1008(hostile_service: Replica) -> None:
    async with well_behaved(hostile_service) as client, attack_on(hostile_service) as attacker:
        results = await asyncio.gather(keep_asking(client, attacker), flood(attacker, frame(PING, b"p" * 125) * 64))
        assert attacker.close_code == CLOSE_POLICY_VIOLATION
        assert attacker.closed_at - results[1] < CLOSE_DEADLINE_S
        assert attacker.pongs >= 50  # answered, as any ping is, until the close


@image_only
async def test_a_flood_of_empty_fragments_is_closed_with_1008(hostile_service: Replica) -> None:
    async with well_behaved(hostile_service) as client, attack_on(hostile_service) as attacker:
        assert await attacker.send(frame(TEXT, b"", fin=False))
        results = await asyncio.gather(keep_asking(client, attacker), flood(attacker, frame(CONT, fin=False) * 1000))
        assert attacker.close_code == CLOSE_POLICY_VIOLATION
        assert attacker.closed_at - results[1] < CLOSE_DEADLINE_S


@image_only
async def test_pings_at_the_message_rate_are_answered_and_the_connection_stays_open(hostile_service: Replica) -> None:
    async with raw_client(hostile_service) as attacker:
        for _ in range(60):  # the burst, then under the rate
            assert await attacker.send(frame(PING, b"hello"))
            await asyncio.sleep(0.05)  # pacing: 20 a second for 3 s takes 50 + 30 from the bucket at most
        # The server answers a close after every pong before it: a connection closed for flooding would say 1008.
        assert await attacker.send(frame(0x8, struct.pack("!H", 1000)))
        await asyncio.wait_for(attacker.closed.wait(), 10)
        assert attacker.close_code == 1000
        assert attacker.pongs == 60


def test_uvicorn_own_protocol_warns_that_floods_are_not_limited(hostile_service: Replica) -> None:
    """Last in the module: every test above has connected by now."""
    warned = "served without --ws app.ws_protocol:WebSocketProtocol" in hostile_service.log()
    assert warned == (hostile_service.ws_protocol != UVICORN_WS)
    assert "Traceback" not in hostile_service.log()
