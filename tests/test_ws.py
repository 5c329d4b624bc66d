"""WebSocket `/ws/rates` on a real uvicorn process: every message type, bad messages, filtering, slow clients."""

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from app.currencies import Pair
from app.live.protocol import UVICORN_WS
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient, is_update_for

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

CYCLES = "fxrates_poll_cycle_seconds_count"

RATE_ITEM_FIELDS = {
    "source_currency",
    "destination_currency",
    "rate",
    "source_amount",
    "destination_amount",
    "destination_per_source",
    "last_updated",
    "stale",
    "provider",
}


@pytest.fixture(scope="module", params=[UVICORN_WS, None], ids=["image-protocol", "uvicorn-default"])
def ws_protocol(request: pytest.FixtureRequest) -> str | None:
    """Each test on the image's protocol and on the one a bare `uvicorn app.main:app` (the README's) picks."""
    protocol: str | None = request.param
    return protocol


@pytest.fixture(autouse=True)
def clean_faults(ws_fake: FakeFlutterwave) -> Iterator[None]:
    ws_fake.clear_faults()
    yield
    ws_fake.clear_faults()


async def test_the_snapshot_comes_first_with_every_pair(ws_service: Replica) -> None:
    for url in (ws_service.ws_url, f"{ws_service.ws_url}/"):
        async with WsClient(url) as client:
            snapshot = await client.recv()
        assert snapshot["type"] == "all_rates" and snapshot["as_of"].endswith("Z")
        assert len(snapshot["rates"]) == 44
        assert all(set(item) == RATE_ITEM_FIELDS for item in snapshot["rates"])
        assert {item["provider"] for item in snapshot["rates"]} == {"flutterwave"}


async def test_frames_carry_the_epoch_and_the_seq_of_each_store(ws_service: Replica) -> None:
    async with WsClient(ws_service.ws_url) as client:
        snapshot = await client.recv()
        epoch, seq = snapshot["epoch"], snapshot["seq"]
        assert isinstance(epoch, str) and epoch and ":" not in epoch
        assert isinstance(seq, int) and seq >= 44, "every pair was stored at least once"
        updates = [update for _, update in await updates_over_cycles(client, cycles=1)]
        seqs = [update["seq"] for update in updates]
        # One replica stores in one order and pushes in it: each a store after the snapshot's, in order.
        assert seqs and seqs == sorted(set(seqs)) and seqs[0] > seq
        again = await client.ask({"type": "get_all_rates"}, "all_rates")
    assert again["epoch"] == epoch and again["seq"] >= seqs[-1]


async def test_ping_get_all_rates_and_get_rate(ws_service: Replica, ws_fake: FakeFlutterwave) -> None:
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}
        everything = await client.ask({"type": "get_all_rates"}, "all_rates")
        assert len(everything["rates"]) == 44
        stored = await client.ask({"type": "get_rate", "source_currency": "usd", "destination_currency": "NGN"}, "rate")
        assert set(stored["rate"]) == RATE_ITEM_FIELDS and stored["rate"]["destination_currency"] == "NGN"
        # A pair that is not stored is fetched as REST would fetch it...
        fetched = await client.ask(
            {"type": "get_rate", "source_currency": "USD", "destination_currency": "JPY"}, "rate"
        )
        assert Decimal(str(fetched["rate"]["destination_per_source"])) == ws_fake.rate(Pair("USD", "JPY"))
        # ...or, when the upstream cannot give it, answered not_found.
        ws_fake.fail("503", pairs=[Pair("USD", "CHF")])
        missing = await client.ask(
            {"type": "get_rate", "source_currency": "USD", "destination_currency": "CHF"}, ("rate", "error")
        )
        assert missing["type"] == "error" and missing["code"] == "not_found"


@pytest.mark.parametrize(
    "message",
    [
        "this is not json",
        "[1, 2, 3]",
        '{"no_type": true}',
        '{"type": "make_me_rich"}',
        '{"type": "get_rate", "source_currency": "USD"}',
        '{"type": "get_rate", "source_currency": "USD", "destination_currency": "XYZ"}',
        '{"type": "get_rate", "source_currency": "USD", "destination_currency": "USD"}',
        '{"type": "get_rate", "source_currency": 1, "destination_currency": "NGN"}',
        '{"type": "subscribe", "pairs": "USD/NGN"}',
        '{"type": "subscribe", "pairs": []}',
        '{"type": "subscribe", "pairs": ["USDNGN"]}',
        '{"type": "subscribe", "pairs": ["USD/NGN"], "min_change_bps": -1}',
        '{"type": "subscribe", "pairs": ["USD/NGN"], "min_change_bps": "lots"}',
        '{"type": "subscribe", "pairs": ["USD/NGN"], "min_change_bps": 1e999}',
        '{"type": "unsubscribe", "pairs": [42]}',
    ],
)
async def test_a_bad_message_gets_bad_request_and_the_connection_stays_open(ws_service: Replica, message: str) -> None:
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        error = await client.ask(message, "error")
        assert error["code"] == "bad_request" and error["message"]
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}
        state = await client.ask({"type": "unsubscribe", "pairs": ["*"]}, "subscribed")
        assert state["pairs"] == [], "a bad subscribe changed the subscription"


async def test_subscribe_filters_updates(ws_service: Replica, ws_fake: FakeFlutterwave) -> None:
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        subscribed = await client.ask({"type": "subscribe", "pairs": ["gbp/kes"]}, "subscribed")
        assert subscribed == {"type": "subscribed", "pairs": ["GBP/KES"], "min_change_bps": 0}
        more = await client.ask({"type": "subscribe", "pairs": ["EUR/NGN"]}, "subscribed")
        assert more["pairs"] == ["EUR/NGN", "GBP/KES"]
        updates = await updates_over_cycles(client, cycles=2)
        assert {pair for pair, _ in updates} == {"GBP/KES", "EUR/NGN"}
        fewer = await client.ask({"type": "unsubscribe", "pairs": ["EUR/NGN"]}, "subscribed")
        assert fewer["pairs"] == ["GBP/KES"]
        updates = await updates_over_cycles(client, cycles=2)
        assert {pair for pair, _ in updates} == {"GBP/KES"}
        everything = await client.ask({"type": "subscribe", "pairs": ["*"]}, "subscribed")
        assert everything["pairs"] == ["*"]
        assert len({pair for pair, _ in await updates_over_cycles(client, cycles=2)}) == 44


async def updates_over_cycles(client: WsClient, cycles: int) -> list[tuple[str, dict[str, Any]]]:
    """The rate updates received until `cycles` poll cycles have ended (the first, partial one aside)."""
    updates: list[tuple[str, dict[str, Any]]] = []
    await client.recv_until(lambda m: m["type"] == "all_rates_update")
    for _ in range(cycles):
        _, before = await client.recv_until(lambda m: m["type"] == "all_rates_update")
        updates += [
            (f"{m['rate']['source_currency']}/{m['rate']['destination_currency']}", m)
            for m in before
            if m["type"] == "rate_update"
        ]
    return updates


async def test_min_change_bps_holds_back_small_moves(ws_service: Replica, ws_fake: FakeFlutterwave) -> None:
    pair = Pair("CAD", "GHS")
    async with WsClient(ws_service.ws_url) as picky, WsClient(ws_service.ws_url) as eager:
        await picky.recv()
        await eager.recv()
        await picky.ask({"type": "subscribe", "pairs": [str(pair)], "min_change_bps": 50}, "subscribed")
        await eager.ask({"type": "subscribe", "pairs": [str(pair)]}, "subscribed")
        before = ws_fake.rate(pair)
        ws_fake.bump(pair, Decimal("1.002"))  # 20 bps: under the picky client's threshold
        assert not await updates_over_cycles(picky, cycles=2)
        seen_by_eager = await updates_over_cycles(eager, cycles=1)
        assert seen_by_eager and all(m["previous_rate"] is not None for _, m in seen_by_eager)
        moved = ws_fake.bump(pair, Decimal("1.004"))  # 60 bps from what the picky client was last sent
        update, _ = await picky.recv_until(is_update_for(str(pair)))
    assert Decimal(str(update["rate"]["destination_per_source"])) == moved
    assert abs(moved - before) / before * 10_000 >= 50


async def test_a_frame_over_64_kib_closes_with_1009(ws_service: Replica) -> None:
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        await client.send('{"type": "ping", "padding": "' + "x" * (64 * 1024) + '"}')
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv_until(lambda m: False)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_a_client_that_stops_reading_is_closed_and_nobody_else_waits(ws_service: Replica) -> None:
    # The slow client's library stops reading from the socket as soon as one frame is waiting.
    async with WsClient(ws_service.ws_url, max_queue=1) as slow, WsClient(ws_service.ws_url) as reader:
        await reader.recv()
        for _ in range(3000):
            await slow.send('{"type": "get_all_rates"}')
        # The reader keeps pace with the poller: as each cycle's end reaches it, the service has finished at most
        # one more cycle since (not a backlog held up behind the client that stopped reading).
        await reader.recv_until(lambda m: m["type"] == "all_rates_update", timeout_s=5)
        first = metric(ws_service, CYCLES)
        behind: list[float] = []
        for received in range(1, 6):
            await reader.recv_until(lambda m: m["type"] == "all_rates_update", timeout_s=5)
            behind.append(metric(ws_service, CYCLES) - first - received)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await slow.recv(timeout_s=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    # Counted before the close frame is sent. Whether the 256 unread replies or the 30 s stall cut it off
    # depends on how much the kernel's socket buffers take (up to tcp_rmem's maximum), so it is read after.
    assert metric(ws_service, "fxrates_websocket_slow_closed_total") >= 1
    assert max(behind) <= 1, f"cycles the service had ended beyond those the reader saw: {behind}"


def metric(replica: Replica, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{replica.url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def test_connected_clients_are_counted(ws_service: Replica) -> None:
    async with WsClient(ws_service.ws_url) as first, WsClient(ws_service.ws_url) as second:
        await first.recv()
        await second.recv()
        assert metric(ws_service, "fxrates_websocket_clients") >= 2
    await eventually(
        lambda: metric(ws_service, "fxrates_websocket_clients"),
        until=lambda clients: clients == 0,
        what="the closed clients to be uncounted",
    )
