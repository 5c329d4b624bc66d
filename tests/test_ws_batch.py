"""Batch mode, conflation and the stalled-reader cut-off of `/ws/rates`, on a real uvicorn process."""

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from app.currencies import Pair
from app.rates.wire import RatesUpdate
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite
from tests.support.stalled_ws import StalledClient
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

POLL_INTERVAL_S = 0.3
CONFLATED = "fxrates_websocket_updates_conflated_total"
CUT_OFF = "fxrates_websocket_slow_closed_total"
DROPPED = "fxrates_websocket_dropped_total"
CYCLES = "fxrates_poll_cycle_seconds_count"
CLIENTS = "fxrates_websocket_clients"
LOOKUPS = "fxrates_cache_lookups_total"
GET_ALL_RATES = '{"type": "get_all_rates"}'
GET_RATE = '{"type": "get_rate", "source_currency": "USD", "destination_currency": "NGN"}'
# The service the cut-off tests wait out: long enough for fill() to see a client's updates wait, even on a busy
# machine, short enough to wait for.
STALL_TIMEOUT_S = 20.0
# Everywhere else, long past anything a test pauses a client for: cycles slow down under load, and a paused
# client must not be cut off while it waits for them.
PAUSE_STALL_TIMEOUT_S = 120.0
ITEM_FIELDS = {
    "source_currency",
    "destination_currency",
    "rate",
    "source_amount",
    "destination_amount",
    "destination_per_source",
    "last_updated",
    "stale",
    "provider",
    "previous_rate",
    "seq",
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeFlutterwave]:
    with FakeFlutterwave(slow_s=3.0) as server:
        yield server


@contextmanager
def replica(fake: FakeFlutterwave, directory: Path, stall_timeout_s: float) -> Iterator[Replica]:
    with replica_on_sqlite(
        directory,
        fake,
        POLL_INTERVAL_SECONDS=str(POLL_INTERVAL_S),
        UPSTREAM_TIMEOUT_SECONDS="1",
        UPSTREAM_MAX_ATTEMPTS="1",
        WS_STALL_TIMEOUT_SECONDS=str(stall_timeout_s),
    ) as started:
        yield started


@pytest.fixture(scope="module")
def service(fake: FakeFlutterwave, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    with replica(fake, Path(tmp_path_factory.mktemp("ws-batch")), PAUSE_STALL_TIMEOUT_S) as started:
        yield started


@pytest.fixture(scope="module")
def cutting(fake: FakeFlutterwave, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """A service that cuts off a stalled client after STALL_TIMEOUT_S."""
    with replica(fake, Path(tmp_path_factory.mktemp("ws-cut-off")), STALL_TIMEOUT_S) as started:
        yield started


def metric(replica: Replica, name: str) -> float:
    """The metric's value, summed over its labels."""
    total = 0.0
    with urllib.request.urlopen(f"{replica.url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith((name + " ", name + "{")):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def stalled_client(replica: Replica) -> StalledClient:
    """A client connected to `/ws/rates` that will stop reading (tests.support.stalled_ws)."""
    client = StalledClient("127.0.0.1", replica.port)
    await client.connect()
    return client


async def no_clients_left(replica: Replica) -> None:
    """Wait until the clients of earlier tests are gone, so none of them is counted in this test's metrics."""
    await eventually(
        lambda: metric(replica, CLIENTS) == 0, timeout_s=30, what="the clients of earlier tests to be gone"
    )


def pair_of(item: dict[str, Any]) -> str:
    return f"{item['source_currency']}/{item['destination_currency']}"


async def batches_over_cycles(client: WsClient, cycles: int) -> list[dict[str, Any]]:
    """The `rates_update` frames received until `cycles` poll cycles have ended (the first, partial one aside)."""
    frames: list[dict[str, Any]] = []
    await client.recv_until(lambda m: m["type"] == "all_rates_update")
    for _ in range(cycles):
        _, before = await client.recv_until(lambda m: m["type"] == "all_rates_update")
        assert all(m["type"] != "rate_update" for m in before), "a batch client got a per-pair frame"
        frames += [m for m in before if m["type"] == "rates_update"]
    return frames


async def test_batch_frames_hold_the_newest_update_of_each_pair_in_the_documented_shape(service: Replica) -> None:
    async with WsClient(service.ws_url) as client:
        await client.recv()
        subscribed = await client.ask({"type": "subscribe", "pairs": ["*"], "batch": True}, "subscribed")
        assert subscribed == {"type": "subscribed", "pairs": ["*"], "min_change_bps": 0}
        await client.recv_until(lambda m: m["type"] == "all_rates_update")
        raw = await asyncio.wait_for(client.connection.recv(), 10)
        while json.loads(raw)["type"] != "rates_update":
            raw = await asyncio.wait_for(client.connection.recv(), 10)
        # The hub writes the frame by hand from items serialised once: it is exactly what the model would write.
        assert isinstance(raw, str) and RatesUpdate.model_validate_json(raw).model_dump_json() == raw
        frames = await batches_over_cycles(client, cycles=2)
    for frame in frames:
        pairs = [pair_of(item) for item in frame["rates"]]
        assert len(pairs) == len(set(pairs)), "a pair twice in one frame"
        assert all(set(item) == ITEM_FIELDS for item in frame["rates"])
        assert frame["as_of"] == max(item["last_updated"] for item in frame["rates"])
        assert frame["seq"] == max(item["seq"] for item in frame["rates"])
    assert len({pair_of(item) for frame in frames for item in frame["rates"]}) == 44
    # A poll cycle's stores reach a batch client in a few frames of many, not one frame per pair.
    assert max(len(frame["rates"]) for frame in frames) > 1


async def test_batch_mode_keeps_the_subscription_filter_and_min_change_bps(
    service: Replica, fake: FakeFlutterwave
) -> None:
    pair = Pair("CAD", "GHS")
    async with WsClient(service.ws_url) as client:
        await client.recv()
        await client.ask({"type": "subscribe", "pairs": ["gbp/kes", str(pair)], "batch": True}, "subscribed")
        frames = await batches_over_cycles(client, cycles=2)
        assert {pair_of(item) for frame in frames for item in frame["rates"]} == {"GBP/KES", str(pair)}
        await client.ask({"type": "unsubscribe", "pairs": ["GBP/KES"]}, "subscribed")
        await client.ask({"type": "subscribe", "pairs": [str(pair)], "min_change_bps": 50}, "subscribed")
        fake.bump(pair, Decimal("1.002"))  # 20 bps: under the threshold
        assert not await batches_over_cycles(client, cycles=2)
        moved = fake.bump(pair, Decimal("1.004"))  # 60 bps from what the client was last sent
        update, before = await client.recv_until(lambda m: m["type"] == "rates_update", timeout_s=10)
    (item,) = update["rates"]
    assert pair_of(item) == str(pair) and Decimal(str(item["destination_per_source"])) == moved
    assert item["previous_rate"] is not None
    assert all(m["type"] != "rate_update" for m in before)


async def test_batch_false_goes_back_to_one_rate_update_per_pair(service: Replica) -> None:
    async with WsClient(service.ws_url) as client:
        await client.recv()
        await client.ask({"type": "subscribe", "pairs": ["USD/NGN"], "batch": True}, "subscribed")
        await client.recv_until(lambda m: m["type"] == "rates_update")
        await client.ask({"type": "subscribe", "pairs": ["USD/NGN"], "batch": False}, "subscribed")
        await client.recv_until(lambda m: m["type"] == "all_rates_update")
        _, before = await client.recv_until(lambda m: m["type"] == "all_rates_update")
    assert [m["type"] for m in before] == ["rate_update"]
    assert pair_of(before[0]["rate"]) == "USD/NGN"


@pytest.mark.parametrize("batch", [False, True])
async def test_a_paused_client_gets_each_pair_in_time_order_conflated_ending_at_the_current_value(
    service: Replica, fake: FakeFlutterwave, batch: bool
) -> None:
    pairs = [Pair(item["source_currency"], item["destination_currency"]) for item in all_rates(service)]
    await no_clients_left(service)
    async with WsClient(service.ws_url) as reader:
        # A client that reads all along, for comparison: it is sent every store of every pair.
        await reader.recv()
        read: list[dict[str, Any]] = []
        reading = asyncio.create_task(read_into(reader, read))
        try:
            paused = await pause_then_read(service, fake, pairs, batch)
            final = latest_values(paused)
            await eventually(lambda: latest_values(read) == final, what="the reading client to see the last values")
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    assert final == {str(pair): fake.rate(pair) for pair in pairs}
    kinds = {m["type"] for m in paused}
    assert ("rates_update" in kinds) == batch and ("rate_update" in kinds) != batch
    everything = by_pair(read)
    for pair, history in by_pair(paused).items():
        stamps = [datetime.fromisoformat(item["last_updated"]) for item in history]
        assert stamps == sorted(stamps), "a pair's values arrived out of time order"
        # While it paused, each pair's queued update was replaced by newer ones instead of piling up.
        assert len(history) < len(everything[pair]), pair


async def read_into(client: WsClient, messages: list[dict[str, Any]]) -> None:
    while True:
        messages.append(await client.recv(timeout_s=30))


async def pause_then_read(
    service: Replica, fake: FakeFlutterwave, pairs: list[Pair], batch: bool
) -> list[dict[str, Any]]:
    """A client stops reading until updates wait for it, conflated, then reads until it holds every last value."""
    client = await stalled_client(service)
    try:
        if batch:
            await client.send('{"type": "subscribe", "pairs": ["*"], "batch": true}')
        cut_off_before = metric(service, CUT_OFF)
        conflated_before = await fill(client, service)
        probe = pairs[0]
        rounds = 0

        def stored_and_bumped() -> bool:
            # A round of bumps once the poller stored the last one, until updates were conflated for this client.
            nonlocal rounds
            assert metric(service, CUT_OFF) == cut_off_before, "the paused client was cut off before it read again"
            if Decimal(str(rate_of(service, probe)["destination_per_source"])) == fake.rate(probe):
                if metric(service, CONFLATED) >= conflated_before + 3 * len(pairs):
                    return True
                for pair in pairs:
                    fake.bump(pair, Decimal("1.0001"))
                rounds += 1
            return False

        await eventually(
            stored_and_bumped,
            timeout_s=PAUSE_STALL_TIMEOUT_S / 4,
            what=lambda: (
                f"updates to wait, conflated ({metric(service, CONFLATED) - conflated_before:.0f} "
                f"of {3 * len(pairs)} after {rounds} rounds of bumps stored)"
            ),
        )
        final = {str(pair): fake.rate(pair) for pair in pairs}
        return await client.read_until(lambda messages: latest_values(messages) == final)
    finally:
        await client.outcome(timeout_s=0.1)


def latest_values(messages: list[dict[str, Any]]) -> dict[str, Decimal]:
    return {pair: Decimal(str(history[-1]["destination_per_source"])) for pair, history in by_pair(messages).items()}


def by_pair(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every rate item pushed (in `rate_update`s or `rates_update`s), by pair, in the order received."""
    received: dict[str, list[dict[str, Any]]] = {}
    for message in messages:
        if message["type"] == "rate_update":
            items = [message["rate"]]
        elif message["type"] == "rates_update":
            items = message["rates"]
        else:
            continue
        for item in items:
            received.setdefault(pair_of(item), []).append(item)
    return received


async def test_a_client_that_takes_nothing_while_frames_wait_is_closed_with_1013(cutting: Replica) -> None:
    await no_clients_left(cutting)
    closed_before = metric(cutting, CUT_OFF)
    client = await stalled_client(cutting)
    async with WsClient(cutting.ws_url) as reader:
        await reader.recv()
        read: list[dict[str, Any]] = []
        reading = asyncio.create_task(read_into(reader, read))
        try:
            await fill(client, cutting)
            await eventually(
                lambda: metric(cutting, CUT_OFF) > closed_before,
                timeout_s=STALL_TIMEOUT_S + 15,
                what="the stalled client to be cut off",
            )
            # It reads again at once, as a client woken up would, so the 1013 queued behind the frames it left
            # unread reaches it before the server's own wait for the closing handshake runs out.
            outcome = asyncio.create_task(client.outcome())
        except BaseException:
            await client.outcome(timeout_s=0.1)  # gone, not left for the next test to count
            raise
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    assert await outcome == 1013
    # Nobody else waited for it: all along, a reading client got cycle after cycle.
    assert sum(m["type"] == "all_rates_update" for m in read) >= 3


async def test_a_client_cut_off_that_never_reads_again_is_dropped_not_held(cutting: Replica) -> None:
    await no_clients_left(cutting)
    dropped_before = metric(cutting, DROPPED)
    client = await stalled_client(cutting)
    try:
        await fill(client, cutting)
        # Its 1013 waits behind megabytes it left unread. Once cut off (STALL_TIMEOUT_S), the endpoint waits 5 s
        # for the close frame to go out, and the protocol 10 s more for the client to take it: then it is reset.
        await eventually(
            client.was_reset, timeout_s=STALL_TIMEOUT_S + 5 + 10 + 15, what="the server to reset the connection"
        )
        assert metric(cutting, DROPPED) == dropped_before + 1
    finally:
        await client.outcome(timeout_s=0.1)


async def test_a_client_that_read_everything_but_never_answered_the_close_is_closed_not_reset(
    service: Replica,
) -> None:
    await no_clients_left(service)
    dropped_before = metric(service, DROPPED)
    client = await stalled_client(service)
    await client.send("x" * (64 * 1024 + 1))  # over the frame limit: closed with 1009
    # It takes the close frame and never answers it: uvicorn closes the connection after its close timeout.
    assert await client.ending() == (1009, "closed")
    assert metric(service, DROPPED) == dropped_before


async def fill(client: StalledClient, service: Replica) -> float:
    """Ask for snapshots until the server's sends to the client block and its updates wait, conflated.

    How many snapshots the kernel's buffers take first varies with the machine (up to 4 MiB here), so it asks in
    rounds. Each ends with a `get_rate`, answered in order and counted in the rate lookups (nothing else looks
    rates up meanwhile): once that count moves, the server has taken the whole round, however busy the machine.
    Then up to three poll cycles (counted, as they slow down on a busy machine) for the conflation count to
    move: the updates of two cycles queued behind unsent replies make it move, so three without that mean the
    sends did not block and the hub's queue is empty again. So the replies waiting in the hub stay under the
    bound that would cut the client off (MAX_QUEUED_REPLIES). Returns the conflation count once it moved.
    """
    conflated_before, cut_off_before = metric(service, CONFLATED), metric(service, CUT_OFF)
    for times in (200, *[60] * 10):
        lookups = metric(service, LOOKUPS)
        await client.send(GET_ALL_RATES, times=times)
        await client.send(GET_RATE)
        await eventually(
            lambda seen=lookups: metric(service, LOOKUPS) > seen, timeout_s=60, what="the server to take the round"
        )
        cycles_ended = metric(service, CYCLES) + 3

        def waited(ended: float = cycles_ended) -> bool:
            return metric(service, CONFLATED) > conflated_before or metric(service, CYCLES) >= ended

        await eventually(waited, timeout_s=30, what="three poll cycles to end")
        assert metric(service, CUT_OFF) == cut_off_before, "the client was cut off while its buffers filled"
        if metric(service, CONFLATED) > conflated_before:
            return metric(service, CONFLATED)
    raise AssertionError("800 snapshots asked for and unread, and still no update waited for the client")


def rate_of(replica: Replica, pair: Pair) -> dict[str, Any]:
    url = f"{replica.url}/api/rates?source_currency={pair.source}&destination_currency={pair.destination}"
    with urllib.request.urlopen(url, timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())["meta"]
        return data


def all_rates(replica: Replica) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for base in ("USD", "CAD", "GBP", "EUR"):
        with urllib.request.urlopen(f"{replica.url}/api/rates/all?base_currency={base}", timeout=5) as response:
            items += [
                {"source_currency": base, "destination_currency": code, **item}
                for code, item in json.loads(response.read())["data"]["rates"].items()
            ]
    return items
