"""The hub and its clients in-process: conflation, batching, ordering, thresholds, the cut-offs, fault isolation.

The decision logic alone, with a fake writer (a connection's `write_now` that
records the frames it takes, or refuses them, or raises), a fake clock and a
small stand-in for the store's `all()`. The endpoint's sender is played by
`receive` (take a frame, send it). tests/test_ws*.py run the same logic end to
end on the real parts.
"""

import asyncio
import itertools
import json
import logging
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

import pytest
from broadcaster import Broadcast

from app.currencies import Pair, known_currencies
from app.errors import DatabaseUnavailable
from app.kit.metrics import Metrics
from app.live.client import MAX_QUEUED_REPLIES, HubClient, TooManyPairs
from app.live.fanout import CycleEnded, Resynced, Stored, read_event
from app.live.hub import Hub
from app.rates.wire import RESYNC, AllRatesUpdate, RateItem, RatesStored, RateUpdate
from app.storage.rate import StoredRate

USD_NGN, USD_KES, GBP_NGN = Pair("USD", "NGN"), Pair("USD", "KES"), Pair("GBP", "NGN")
T0 = datetime(2025, 1, 1, 12, tzinfo=UTC)
STALL_TIMEOUT_S = 30.0
TWELVE_DIGITS = Context(prec=12)  # as stored: a JSON number carries it digit for digit
EPOCH = "e0e0"
_seqs = itertools.count(1)  # every rate made here is a store of its own, numbered in the order made


def stored_rate(pair: Pair, value: str, at: datetime = T0, seq: int | None = None) -> StoredRate:
    per_source = Decimal(value)
    return StoredRate(
        pair=pair,
        rate=TWELVE_DIGITS.divide(1, per_source),
        destination_per_source=per_source,
        source_amount=Decimal(1),
        destination_amount=per_source,
        provider="test",
        last_updated=at,
        seq=next(_seqs) if seq is None else seq,
    )


def update_of(rate: StoredRate, previous_rate: Decimal | None = None) -> RateUpdate:
    return RateUpdate(rate=RateItem.of(rate, stale=False), previous_rate=previous_rate, seq=rate.seq)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """The store as far as snapshots read it: its version and every stored rate, or the database away."""

    def __init__(self, *rates: StoredRate) -> None:
        self.version = 0
        self.epoch = EPOCH
        self.rates = list(rates)
        self.down = False
        self.gate: asyncio.Event | None = None  # set: a read waits for it

    async def all(self) -> list[StoredRate]:
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise DatabaseUnavailable(retry_after_s=1)
        return list(self.rates)


class Writer:
    """A connection's `write_now`: takes whole frames, or refuses them (pushing back), or raises (gone)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.refuse = False
        self.error: Exception | None = None

    def __call__(self, data: bytes) -> bool:
        if self.error is not None:
            raise self.error
        if self.refuse:
            return False
        self.writes.append(data)
        return True

    def messages(self) -> list[dict[str, Any]]:
        """Every frame written, in order, as the client reads it."""
        return [message for data in self.writes for message in frames(data)]


def frames(data: bytes) -> list[dict[str, Any]]:
    """Unmasked, uncompressed text frames (RFC 6455 §5.2), one after another."""
    messages = []
    while data:
        assert data[0] == 0x81, "a final text frame"
        length, start = data[1], 2
        if length == 126:
            length, start = int.from_bytes(data[2:4]), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10]), 10
        messages.append(json.loads(data[start : start + length], parse_float=Decimal))
        data = data[start + length :]
    return messages


def stored(*rates: tuple[Pair, str] | tuple[Pair, str, datetime] | tuple[Pair, str, datetime, int]) -> Stored:
    """A store batch as every hub reads it off the channel."""
    updates = [update_of(stored_rate(*rate)) for rate in rates]
    event = read_event(RatesStored(updates=updates).model_dump_json())
    assert isinstance(event, Stored)
    return event


def cycle_ended(changed: int) -> CycleEnded:
    event = read_event(AllRatesUpdate(as_of=T0, count=3, changed=changed).model_dump_json())
    assert isinstance(event, CycleEnded)
    return event


async def receive(client: HubClient, clock: Clock) -> dict[str, Any]:
    """What the endpoint's sender does: take the next frame and send it."""
    frame = await client.take()
    client.sending(clock())
    client.sent()
    parsed: dict[str, Any] = json.loads(frame.text, parse_float=Decimal)
    return parsed


async def waiting(client: HubClient, clock: Clock) -> list[dict[str, Any]]:
    """Every frame waiting for the client's sender, sent; [] when it would wait."""
    sent = []
    while True:
        # A step of the loop is enough: `take` returns without waiting whenever anything waits.
        task = asyncio.create_task(receive(client, clock))
        await asyncio.sleep(0)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return sent
        sent.append(task.result())


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [message["type"] for message in messages]


def values(messages: list[dict[str, Any]]) -> list[tuple[str, Decimal]]:
    """(pair, value) of each rate told, in order, whatever the frame."""
    told = []
    for message in messages:
        items = message["rates"] if "rates" in message else [message["rate"]]
        told += [
            (f"{item['source_currency']}/{item['destination_currency']}", item["destination_per_source"])
            for item in items
        ]
    return told


class World:
    def __init__(self, *rates: StoredRate) -> None:
        self.clock = Clock()
        self.store = Store(*rates)
        self.metrics = Metrics()
        self.hub = Hub(
            Broadcast("memory://"),
            self.store,
            stale_after_s=3600 * 24 * 365 * 100,
            metrics=self.metrics,
            stall_timeout_s=STALL_TIMEOUT_S,
            clock=self.clock,
        )

    async def connect(self, *, attached: bool = True) -> tuple[HubClient, Writer]:
        """A client as the endpoint serves one, its first snapshot sent."""
        client, writer = self.hub.join(), Writer()
        if attached:
            client.attach(writer, None)
        client.send_snapshot(await self.hub.snapshot())
        assert kinds([await receive(client, self.clock)]) == ["all_rates"]
        return client, writer

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
def world() -> World:
    return World(stored_rate(USD_NGN, "1500"), stored_rate(USD_KES, "130"), stored_rate(GBP_NGN, "1900"))


async def test_an_idle_client_is_written_an_events_frames_at_once_in_one_write(world: World) -> None:
    client, writer = await world.connect()
    world.hub.fan_out(stored((USD_NGN, "1501"), (USD_KES, "131")))
    assert len(writer.writes) == 1
    assert values(writer.messages()) == [("USD/NGN", Decimal(1501)), ("USD/KES", Decimal(131))]
    assert await waiting(client, world.clock) == []


async def test_a_busy_client_has_frames_queued_for_its_sender_in_order(world: World) -> None:
    client, writer = await world.connect()
    client.send('{"type":"pong"}')
    await client.take()
    client.sending(world.clock())  # and the send has not returned yet
    world.hub.fan_out(stored((USD_NGN, "1501")))
    assert writer.writes == []
    client.sent()
    assert values(await waiting(client, world.clock)) == [("USD/NGN", Decimal(1501))]
    world.hub.fan_out(stored((USD_NGN, "1502")))  # idle again: written at once
    assert values(writer.messages()) == [("USD/NGN", Decimal(1502))]


async def test_a_connection_that_pushes_back_gets_updates_conflated_per_pair(world: World) -> None:
    client, writer = await world.connect()
    writer.refuse = True
    world.hub.fan_out(stored((USD_NGN, "1501"), (USD_KES, "131")))
    world.hub.fan_out(stored((USD_NGN, "1502")))
    world.hub.fan_out(stored((USD_NGN, "1503"), (GBP_NGN, "1901")))
    assert world.metric("fxrates_websocket_updates_conflated_total") == 2
    writer.refuse = False
    # At most one per pair, the newest; a pair replaced moves behind the others.
    assert values(await waiting(client, world.clock)) == [
        ("USD/KES", Decimal(131)),
        ("USD/NGN", Decimal(1503)),
        ("GBP/NGN", Decimal(1901)),
    ]
    assert writer.writes == []


async def test_a_batch_client_gets_one_rates_update_of_the_newest_per_pair(world: World) -> None:
    client, writer = await world.connect()
    client.subscribe(None, None, batch=True)
    writer.refuse = True
    later = T0 + timedelta(seconds=5)
    world.hub.fan_out(stored((USD_NGN, "1501"), (USD_KES, "131")))
    world.hub.fan_out(stored((USD_NGN, "1502", later)))
    (batch,) = await waiting(client, world.clock)
    assert batch["type"] == "rates_update"
    assert values([batch]) == [("USD/KES", Decimal(131)), ("USD/NGN", Decimal(1502))]
    assert datetime.fromisoformat(batch["as_of"]) == later
    writer.refuse = False
    world.hub.fan_out(stored((USD_NGN, "1503"), (USD_NGN, "1504")))  # a pair twice in one event: its newer value
    assert kinds(writer.messages()) == ["rates_update"]
    assert values(writer.messages()) == [("USD/NGN", Decimal(1504))]


async def test_clients_due_the_same_updates_share_one_batch_frame(world: World) -> None:
    (a, writer_a), (b, writer_b), (c, writer_c) = [await world.connect() for _ in range(3)]
    a.subscribe(None, None, batch=True)
    b.subscribe(None, None, batch=True)
    c.subscribe({USD_NGN}, None, batch=True)
    for writer in (writer_a, writer_b, writer_c):
        writer.refuse = True
    world.hub.fan_out(stored((USD_NGN, "1501"), (USD_KES, "131")))
    frame_a, frame_b, frame_c = [await client.take() for client in (a, b, c)]
    assert frame_a is frame_b  # built once for both
    assert frame_c is not frame_a and values([json.loads(frame_c.text)]) == [("USD/NGN", 1501)]


async def test_the_first_snapshot_goes_before_updates_that_arrived_while_it_was_read(world: World) -> None:
    world.store.gate = asyncio.Event()
    client, writer = world.hub.join(), Writer()
    client.attach(writer, None)
    reading = asyncio.create_task(world.hub.snapshot())
    await asyncio.sleep(0)
    world.hub.fan_out(stored((USD_NGN, "1501")))  # arrives during the read, before anything was sent
    assert writer.writes == []
    world.store.gate.set()
    client.send_snapshot(await reading)
    assert kinds(await waiting(client, world.clock)) == ["all_rates", "rate_update"]


async def test_replies_are_sent_in_turn_before_updates_that_come_after_them(world: World) -> None:
    client, writer = await world.connect()
    client.send('{"type":"pong"}')
    world.hub.fan_out(stored((USD_NGN, "1501")))
    client.send('{"type":"subscribed","pairs":["*"],"min_change_bps":0}')
    world.hub.fan_out(stored((USD_KES, "131")))
    assert writer.writes == []  # a reply waits: written at once, an update would overtake it
    assert kinds(await waiting(client, world.clock)) == ["pong", "rate_update", "subscribed", "rate_update"]


async def test_the_end_of_a_cycle_follows_its_updates_and_replaces_an_older_one_waiting(world: World) -> None:
    client, writer = await world.connect()
    writer.refuse = True
    world.hub.fan_out(stored((USD_NGN, "1501")))
    world.hub.fan_out(cycle_ended(changed=1))
    world.hub.fan_out(stored((USD_KES, "131")))
    world.hub.fan_out(cycle_ended(changed=2))
    sent = await waiting(client, world.clock)
    assert kinds(sent) == ["rate_update", "rate_update", "all_rates_update"]
    assert sent[-1]["changed"] == 2
    # An update of a pair waiting from the last cycle is news of the next: it moves behind that cycle's end.
    world.hub.fan_out(stored((USD_NGN, "1502")))
    world.hub.fan_out(cycle_ended(changed=3))
    world.hub.fan_out(stored((USD_NGN, "1503")))
    sent = await waiting(client, world.clock)
    assert kinds(sent) == ["all_rates_update", "rate_update"]
    assert values(sent[1:]) == [("USD/NGN", Decimal(1503))]


async def test_an_idle_client_is_written_the_end_of_a_cycle_at_once(world: World) -> None:
    cycles: list[None] = []
    world.hub = Hub(
        Broadcast("memory://"),
        world.store,
        stale_after_s=60,
        metrics=world.metrics,
        clock=world.clock,
        on_cycle_end=lambda: cycles.append(None),
    )
    _, writer = await world.connect()
    world.hub.fan_out(cycle_ended(changed=0))
    assert kinds(writer.messages()) == ["all_rates_update"]
    assert cycles == [None]


async def test_min_change_bps_is_measured_from_what_this_client_was_last_sent(world: World) -> None:
    client, writer = await world.connect()  # its snapshot told USD/NGN 1500
    client.subscribe({USD_NGN}, Decimal(10), None)
    world.hub.fan_out(stored((USD_NGN, "1501")))  # 6.7 bps from the snapshot's value
    world.hub.fan_out(stored((USD_NGN, "1501.6")))  # 10.7 bps
    assert values(writer.messages()) == [("USD/NGN", Decimal("1501.6"))]
    world.hub.fan_out(stored((USD_NGN, "1500.3")))  # 8.7 bps from the update it was last sent
    assert len(writer.writes) == 1
    # A reply that tells a rate counts as sent: 1600.5 is 3 bps from it, though 6.6 % from the last update.
    client.send('{"type":"rate"}', USD_NGN, Decimal(1600))
    assert kinds(await waiting(client, world.clock)) == ["rate"]
    world.hub.fan_out(stored((USD_NGN, "1600.5")))
    assert len(writer.writes) == 1
    world.hub.fan_out(stored((USD_NGN, "1602")))
    assert values(frames(writer.writes[-1])) == [("USD/NGN", Decimal(1602))]


async def test_a_waiting_move_that_comes_back_within_reach_is_no_longer_news(world: World) -> None:
    client, writer = await world.connect()
    client.subscribe(None, Decimal(10), None)
    writer.refuse = True
    world.hub.fan_out(stored((USD_NGN, "1510"), (USD_KES, "131")))
    world.hub.fan_out(stored((USD_NGN, "1500.5")))  # back within 10 bps of the snapshot's 1500
    assert values(await waiting(client, world.clock)) == [("USD/KES", Decimal(131))]
    assert world.metric("fxrates_websocket_updates_conflated_total") == 1


async def test_the_first_subscribe_narrows_everything_and_later_ones_add(world: World) -> None:
    client, writer = await world.connect()
    assert client.pairs is None
    client.subscribe({USD_NGN}, None, None)
    assert client.pairs == {USD_NGN}
    world.hub.fan_out(stored((USD_NGN, "1501"), (USD_KES, "131")))
    assert values(writer.messages()) == [("USD/NGN", Decimal(1501))]
    client.subscribe({USD_KES}, Decimal(5), None)
    assert client.pairs == {USD_NGN, USD_KES} and client.min_change_bps == 5
    client.subscribe({GBP_NGN}, None, None)  # settings not given stay as they were
    assert client.min_change_bps == 5
    client.subscribe(None, None, None)
    assert client.pairs is None


async def test_unsubscribing_from_everything_leaves_every_stored_pair_but_those(world: World) -> None:
    client, _ = await world.connect()
    await client.unsubscribe({USD_NGN}, world.hub.stored_pairs)
    assert client.pairs == {USD_KES, GBP_NGN}
    await client.unsubscribe(None, world.hub.stored_pairs)
    assert client.pairs == frozenset()
    client.subscribe({GBP_NGN}, None, None)  # not the first: it adds
    assert client.pairs == {GBP_NGN}


def usd_to(count: int) -> set[Pair]:
    """`count` distinct pairs from USD (each a valid ISO 4217 code: what the cap counts is pairs, not validity)."""
    codes = sorted(code for code in known_currencies() if code != "USD")
    return {Pair("USD", code) for code in codes[:count]}


async def test_a_subscribe_past_the_pair_cap_is_refused_and_changes_nothing() -> None:
    world = World(stored_rate(USD_NGN, "1500"), stored_rate(USD_KES, "130"), stored_rate(GBP_NGN, "1900"))
    world.hub = Hub(
        Broadcast("memory://"), world.store, stale_after_s=3600 * 24, metrics=world.metrics, max_pairs_per_client=3
    )
    client, writer = await world.connect()
    with pytest.raises(TooManyPairs) as refused:
        client.subscribe(usd_to(4), Decimal(5), True)  # the first subscribe, past the cap at once
    assert refused.value.following == 4 and refused.value.limit == 3
    assert client.pairs is None and client.min_change_bps == 0
    client.subscribe({USD_NGN, USD_KES}, Decimal(10), None)
    client.subscribe({USD_NGN, GBP_NGN}, None, None)  # one already followed: three in all, at the cap
    assert client.pairs == {USD_NGN, USD_KES, GBP_NGN}
    with pytest.raises(TooManyPairs):
        client.subscribe({Pair("EUR", "NGN")}, Decimal(50), True)
    assert client.pairs == {USD_NGN, USD_KES, GBP_NGN} and client.min_change_bps == 10
    world.hub.fan_out(stored((USD_NGN, "1600")))
    assert kinds(writer.messages()) == ["rate_update"]  # not batched: the refused subscribe's `batch` not taken
    client.subscribe({USD_NGN}, None, None)  # naming what it follows adds nothing: allowed
    client.subscribe(None, Decimal(0), None)  # "*" counts as one
    assert client.pairs is None
    client.subscribe(usd_to(10), None, None)  # following every pair already: naming some adds nothing
    assert client.pairs is None


async def test_a_client_left_above_the_cap_by_unsubscribing_from_everything_may_not_grow() -> None:
    world = World(*(stored_rate(pair, "2") for pair in usd_to(5)))
    world.hub = Hub(
        Broadcast("memory://"), world.store, stale_after_s=3600 * 24, metrics=world.metrics, max_pairs_per_client=3
    )
    client, _ = await world.connect()
    first, *others = sorted(usd_to(5))
    await client.unsubscribe({first}, world.hub.stored_pairs)
    assert client.pairs == set(others)  # four: every stored pair but one, above the cap of three
    client.subscribe({others[0]}, None, None)
    with pytest.raises(TooManyPairs):
        client.subscribe({first}, None, None)
    assert client.pairs == set(others)


async def test_unsubscribing_forgets_the_updates_waiting_for_those_pairs(world: World) -> None:
    client, writer = await world.connect()
    writer.refuse = True
    world.hub.fan_out(stored((USD_NGN, "1501"), (USD_KES, "131"), (GBP_NGN, "1901")))
    client.send('{"type":"pong"}')
    await client.unsubscribe({USD_NGN, GBP_NGN}, world.hub.stored_pairs)
    assert kinds(await waiting(client, world.clock)) == ["rate_update", "pong"]
    writer.refuse = False
    world.hub.fan_out(stored((USD_NGN, "1502"), (USD_KES, "132")))
    assert values(writer.messages()) == [("USD/KES", Decimal(132))]


async def test_a_client_whose_send_stays_blocked_is_cut_off_after_the_stall_timeout(world: World) -> None:
    client, _ = await world.connect()
    idle, _ = await world.connect()
    client.send('{"type":"pong"}')
    await client.take()
    client.sending(world.clock())  # and the send never returns
    world.clock.now += STALL_TIMEOUT_S - 0.1
    world.hub.check_stalled()
    assert not client.slow
    world.clock.now += 0.1
    world.hub.check_stalled()
    assert client.slow and not idle.slow  # nothing to send is not a stall
    await asyncio.wait_for(client.ended(), 1)


async def test_a_send_that_finishes_in_time_is_no_stall(world: World) -> None:
    client, _ = await world.connect()
    client.send('{"type":"pong"}')
    await client.take()
    client.sending(world.clock())
    world.clock.now += STALL_TIMEOUT_S - 1
    client.sent()
    world.clock.now += STALL_TIMEOUT_S
    world.hub.check_stalled()
    assert not client.slow


async def test_a_client_that_keeps_asking_and_never_reads_is_cut_off(world: World) -> None:
    client, _ = await world.connect()
    for _ in range(MAX_QUEUED_REPLIES):
        client.send('{"type":"pong"}')
    assert not client.slow
    client.send('{"type":"pong"}')
    assert client.slow
    await asyncio.wait_for(client.ended(), 1)


async def test_replies_taken_make_room_under_the_bound(world: World) -> None:
    client, _ = await world.connect()
    for _ in range(3):
        for _ in range(MAX_QUEUED_REPLIES):
            client.send('{"type":"pong"}')
        assert len(await waiting(client, world.clock)) == MAX_QUEUED_REPLIES
    assert not client.slow


@pytest.mark.parametrize("failure", ["write_now", "offer"])
async def test_a_client_that_fails_under_an_event_never_keeps_it_from_the_others(
    world: World, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    connected = [await world.connect() for _ in range(5)]
    broken, broken_writer = connected[2]
    if failure == "write_now":
        broken_writer.error = RuntimeError("unable to perform operation on <TCPTransport closed=True>")
    else:

        def offer(*_: object) -> int:
            raise RuntimeError("broken")

        broken.offer = offer
    with caplog.at_level(logging.WARNING, logger="app.live.hub"):
        world.hub.fan_out(stored((USD_NGN, "1501")))
        world.hub.fan_out(stored((USD_NGN, "1502")))
        world.hub.fan_out(cycle_ended(changed=2))
    for client, writer in connected:
        if client is not broken:
            assert kinds(writer.messages()) == ["rate_update", "rate_update", "all_rates_update"]
    await asyncio.wait_for(broken.ended(), 1)  # ended: the endpoint lets it go
    assert broken.close_code is None and not broken.slow
    assert world.metric("fxrates_websocket_clients") == 4
    assert len([record for record in caplog.records if record.name == "app.live.hub"]) == 1


async def test_a_client_that_fails_at_the_end_of_a_cycle_never_keeps_it_from_the_others(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    (_, writer), (broken, broken_writer), (_, last_writer) = [await world.connect() for _ in range(3)]
    broken_writer.error = OSError("gone")
    with caplog.at_level(logging.WARNING, logger="app.live.hub"):
        world.hub.fan_out(cycle_ended(changed=0))
    assert kinds(writer.messages()) == kinds(last_writer.messages()) == ["all_rates_update"]
    await asyncio.wait_for(broken.ended(), 1)
    assert len(caplog.records) == 1


async def test_a_resync_sends_every_client_a_fresh_snapshot(world: World) -> None:
    client, _ = await world.connect()
    world.store.rates = [stored_rate(USD_NGN, "1600")]
    await world.hub.resync()
    (snapshot,) = await waiting(client, world.clock)
    assert kinds([snapshot]) == ["all_rates"] and values([snapshot]) == [("USD/NGN", Decimal(1600))]


async def test_while_the_database_is_away_the_snapshot_is_the_last_read_with_every_change_since(world: World) -> None:
    first = await world.hub.snapshot()
    assert not first.held
    world.store.down = True
    world.hub.fan_out(stored((USD_NGN, "1501", T0 + timedelta(seconds=1))))
    held = await world.hub.snapshot()
    assert held.held
    assert held.values == {USD_NGN: Decimal(1501), USD_KES: Decimal(130), GBP_NGN: Decimal(1900)}
    assert json.loads(held.frame.text)["as_of"] == json.loads(first.frame.text)["as_of"]


async def test_a_snapshot_is_read_again_after_a_change_or_a_second(world: World) -> None:
    reads = 0
    read = world.store.all

    async def counted() -> list[StoredRate]:
        nonlocal reads
        reads += 1
        return await read()

    world.store.all = counted
    first = await world.hub.snapshot()
    assert await world.hub.snapshot() is first and reads == 1
    world.clock.now += 1
    assert await world.hub.snapshot() is not first and reads == 2
    world.hub.fan_out(stored((USD_NGN, "1501")))
    await world.hub.snapshot()
    world.store.version += 1  # a save in this process
    await world.hub.snapshot()
    assert reads == 4


async def test_events_on_the_channel_are_read_by_their_kind() -> None:
    cycle = AllRatesUpdate(as_of=T0, count=44, changed=3).model_dump_json()
    assert read_event(cycle) == CycleEnded(cycle)  # sent to clients as it is
    assert read_event(RESYNC) == Resynced()
    update = update_of(stored_rate(USD_NGN, "1500"), Decimal("0.5"))
    event = read_event(RatesStored(updates=[update]).model_dump_json())
    assert event == Stored([update])
    assert read_event('{"type":"rate_update"}') is None
    assert read_event("not json") is None


async def test_an_event_this_process_published_is_fanned_out_at_the_next_step(world: World) -> None:
    _, writer = await world.connect()
    update = update_of(stored_rate(USD_NGN, "1501"))
    world.hub.deliver(RatesStored(updates=[update]).model_dump_json())
    assert writer.writes == []  # not inside the publisher's step
    await asyncio.sleep(0)
    assert values(writer.messages()) == [("USD/NGN", Decimal(1501))]


async def test_frames_sent_are_counted_whichever_way_they_went(world: World) -> None:
    client, _ = await world.connect()  # the snapshot, by the sender
    world.hub.fan_out(stored((USD_NGN, "1501"), (USD_KES, "131")))  # two frames in one write
    world.hub.leave(client)
    assert world.metric("fxrates_websocket_frames_sent_total") == 3
    assert world.metric("fxrates_websocket_clients") == 0


@pytest.fixture
def numbered() -> World:
    """A world whose stored rates are numbered 1 to 3, for tests that number the stores after them."""
    return World(
        stored_rate(USD_NGN, "1500", seq=1), stored_rate(USD_KES, "130", seq=2), stored_rate(GBP_NGN, "1900", seq=3)
    )


async def test_frames_carry_the_seq_of_each_store_and_the_snapshot_its_epoch_and_seq(numbered: World) -> None:
    world = numbered
    client, writer = await world.connect()
    snapshot = (await world.hub.snapshot()).frame.text
    assert json.loads(snapshot)["epoch"] == EPOCH == world.hub.epoch
    assert json.loads(snapshot)["seq"] == max(rate.seq for rate in world.store.rates) == world.hub.latest_seq
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 101), (USD_KES, "131", T0, 102)))
    assert [message["seq"] for message in writer.messages()] == [101, 102]
    assert world.hub.latest_seq == 102
    client.subscribe(None, None, batch=True)
    world.hub.fan_out(stored((USD_NGN, "1502", T0, 103), (GBP_NGN, "1901", T0, 104)))
    (frame,) = writer.messages()[2:]
    assert frame["seq"] == 104 and [item["seq"] for item in frame["rates"]] == [103, 104]


async def test_an_update_older_than_what_was_seen_of_its_pair_is_not_sent(numbered: World) -> None:
    world = numbered
    # Two replicas' events may arrive out of the order stored: B's seq 11 before A's seq 10, for the same pair.
    _, writer = await world.connect()
    world.hub.fan_out(stored((USD_NGN, "1502", T0, 11)))
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 10), (USD_KES, "131", T0, 12)))
    assert values(writer.messages()) == [("USD/NGN", Decimal(1502)), ("USD/KES", Decimal(131))]
    assert world.hub.latest_seq == 12


async def test_a_store_a_snapshot_showed_before_its_event_still_reaches_earlier_clients(numbered: World) -> None:
    world = numbered
    _, writer = await world.connect()
    # A newcomer's snapshot read sees GBP/NGN's store (seq 50) before that store's event arrives over Redis.
    world.store.rates = [stored_rate(GBP_NGN, "1950", seq=50)]
    world.store.version += 1
    await world.hub.snapshot()
    world.hub.fan_out(stored((GBP_NGN, "1950", T0, 50)))
    assert values(writer.messages()) == [("GBP/NGN", Decimal(1950))]
    assert world.hub.latest_seq == 50
