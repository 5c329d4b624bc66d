"""Resume from memory and heartbeats, in-process: the hub's decisions with a fake writer and a fake clock.

tests/test_ws_resume.py runs the same end to end on a real service.
"""

from decimal import Decimal
from typing import Any

from broadcaster import Broadcast

from app.currencies import Pair
from app.kit.metrics import Metrics
from app.live.client import HubClient
from app.live.hub import Hub, Resumption
from app.live.recent import RecentStores
from tests.test_hub import (
    EPOCH,
    GBP_NGN,
    T0,
    USD_KES,
    USD_NGN,
    Clock,
    Store,
    Writer,
    kinds,
    receive,
    stored,
    stored_rate,
    waiting,
)

HEARTBEAT_S = 25.0
GAP_TIMEOUT_S = 2.0


class World:
    """Three pairs stored as seqs 1 to 3; a hub that waits 10 ms at most for a store it has not heard of."""

    def __init__(self, visible: set[Pair] | None = None) -> None:
        self.clock = Clock()
        self.store = Store(
            stored_rate(USD_NGN, "1500", seq=1), stored_rate(USD_KES, "130", seq=2), stored_rate(GBP_NGN, "1900", seq=3)
        )
        self.hub = Hub(
            Broadcast("memory://"),
            self.store,
            stale_after_s=3600 * 24 * 365 * 100,
            metrics=Metrics(),
            clock=self.clock,
            heartbeat_s=HEARTBEAT_S,
            resume_wait_s=0.01,
            gap_timeout_s=GAP_TIMEOUT_S,
            visible=(lambda pair: True) if visible is None else (lambda pair: pair in visible),
        )

    async def connect(
        self, epoch: str | None = None, seq: str | None = None
    ) -> tuple[HubClient, Writer, dict[str, Any]]:
        """A client as the endpoint serves one, its first frame taken."""
        client, writer = self.hub.join(), Writer()
        client.attach(writer, None)
        await self.hub.resume(client, epoch, seq)
        return client, writer, await receive(client, self.clock)


def told(frame: dict[str, Any]) -> list[tuple[str, Decimal, Decimal | None, int]]:
    return [
        (
            f"{item['source_currency']}/{item['destination_currency']}",
            item["destination_per_source"],
            item["previous_rate"],
            item["seq"],
        )
        for item in frame["rates"]
    ]


def rate_of(value: str) -> Decimal:
    return stored_rate(USD_NGN, value, seq=0).rate


async def test_a_resume_tells_every_pair_changed_after_it_its_newest_value_and_its_rate_then() -> None:
    world = World()
    _, _, first = await world.connect()
    assert first["type"] == "all_rates" and "resumed" not in first
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 4), (USD_KES, "131", T0, 5)))
    world.hub.fan_out(stored((USD_NGN, "1502", T0, 6)))

    _, _, frame = await world.connect(EPOCH, "4")
    assert frame["type"] == "resumed" and frame["epoch"] == EPOCH and frame["seq"] == 6
    assert told(frame) == [("USD/KES", 131, rate_of("130"), 5), ("USD/NGN", 1502, rate_of("1501"), 6)]

    _, _, frame = await world.connect(EPOCH, "3")
    assert told(frame) == [("USD/KES", 131, rate_of("130"), 5), ("USD/NGN", 1502, rate_of("1500"), 6)]

    _, _, frame = await world.connect(EPOCH, "6")
    assert frame["type"] == "resumed" and frame["seq"] == 6 and frame["rates"] == []


async def test_a_pair_first_stored_after_the_resume_point_has_no_previous_rate() -> None:
    world = World()
    await world.connect()
    world.hub.fan_out(stored((Pair("EUR", "GHS"), "16", T0, 4)))
    _, _, frame = await world.connect(EPOCH, "3")
    assert told(frame) == [("EUR/GHS", 16, None, 4)]


async def test_anything_but_a_resumable_point_gets_the_snapshot_marked_not_resumed() -> None:
    world = World()
    await world.connect()
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 4)))
    for epoch, seq in [
        ("other", "3"),
        (EPOCH, "5"),
        (EPOCH, "x"),
        (EPOCH, "-1"),
        (EPOCH, "3.0"),
        (EPOCH, None),
        (None, "3"),
        (EPOCH, "1"),
    ]:  # seq 1: below what memory holds (seeded at 3)
        _, _, frame = await world.connect(epoch, seq)
        assert frame["type"] == "all_rates" and frame["resumed"] is False, (epoch, seq)


async def test_updates_that_reach_a_client_before_its_resume_is_answered_are_in_it_not_after_it() -> None:
    world = World()
    await world.connect()
    client, writer = world.hub.join(), Writer()
    client.attach(writer, None)
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 4)))  # queued: it has not had its first frame
    answer = await world.hub.resume(client, EPOCH, "3")
    assert isinstance(answer, Resumption)
    messages = await waiting(client, world.clock)
    assert kinds(messages) == ["resumed"] and told(messages[0]) == [("USD/NGN", 1501, rate_of("1500"), 4)]
    world.hub.fan_out(stored((USD_NGN, "1502", T0, 5)))
    assert [message["seq"] for message in writer.messages()] == [5]


async def test_a_resume_waits_briefly_for_a_store_this_process_hears_of_late() -> None:
    world = World()
    await world.connect()
    client = world.hub.join()
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 4)))
    answer = world.hub.resume(client, EPOCH, "5")
    world.hub.fan_out(stored((USD_KES, "131", T0, 5)))  # before the wait times out... at its first step
    assert isinstance(await answer, Resumption)
    (frame,) = await waiting(client, world.clock)
    assert frame["seq"] == 5 and told(frame) == []


async def test_a_resume_answers_up_to_the_contiguous_prefix_and_the_gap_arrives_after_it() -> None:
    world = World()
    await world.connect()
    # Another replica's seq 5 arrives before this one's 4.
    world.hub.fan_out(stored((USD_KES, "131", T0, 5)))
    assert world.hub.watermark == 3 and world.hub.latest_seq == 5
    _, writer, frame = await world.connect(EPOCH, "3")
    # Everything known is told (a never-disconnected client was pushed 5 already); `seq` promises only 3.
    assert frame["seq"] == 3 and told(frame) == [("USD/KES", 131, rate_of("130"), 5)]
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 4)))
    assert world.hub.watermark == 5
    assert [(message["type"], message["seq"]) for message in writer.messages()] == [("rate_update", 4)]


async def test_withheld_pairs_are_left_out_of_a_resume() -> None:
    world = World(visible={USD_KES})
    await world.connect()
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 4), (USD_KES, "131", T0, 5)))
    _, _, frame = await world.connect(EPOCH, "3")
    assert told(frame) == [("USD/KES", 131, rate_of("130"), 5)]


async def test_a_gap_left_open_is_closed_from_the_database_and_memory_starts_again_there() -> None:
    world = World()
    await world.connect()
    world.hub.fan_out(stored((USD_KES, "131", T0, 5)))  # 4's event is lost
    world.store.rates = [
        stored_rate(USD_NGN, "1501", seq=4),
        stored_rate(USD_KES, "131", seq=5),
        stored_rate(GBP_NGN, "1900", seq=3),
    ]
    world.clock.now += GAP_TIMEOUT_S
    await world.hub._close_gap()
    assert world.hub.watermark == 5
    _, _, frame = await world.connect(EPOCH, "3")  # below what memory now holds exactly
    assert frame["type"] == "all_rates" and frame["resumed"] is False
    _, _, frame = await world.connect(EPOCH, "5")
    assert frame["type"] == "resumed" and frame["rates"] == []


async def test_resuming_clients_share_one_frame_and_read_no_database() -> None:
    world = World()
    await world.connect()
    world.hub.fan_out(stored((USD_NGN, "1501", T0, 4)))
    world.store.down = True  # a read would fail; a resume reads nothing
    answers = [await world.hub.resume(world.hub.join(), EPOCH, "3") for _ in range(3)]
    assert all(isinstance(answer, Resumption) for answer in answers)
    assert len({id(answer) for answer in answers}) == 1


async def test_a_quiet_client_gets_a_heartbeat_with_the_contiguous_seq_built_once_for_all() -> None:
    world = World()
    await world.connect()
    world.hub.fan_out(stored((USD_KES, "131", T0, 5)))  # past a gap: not promised
    _, quiet, _ = await world.connect()
    _, other, _ = await world.connect()
    world.hub.tick()  # the watchdog's tick after they connected: their first frames counted
    world.clock.now += HEARTBEAT_S - 1
    world.hub.tick()
    assert quiet.writes == [] and other.writes == []
    world.clock.now += 1
    world.hub.tick()
    (beat,) = [message for message in quiet.messages() if message["type"] == "heartbeat"]
    assert beat == {"type": "heartbeat", "epoch": EPOCH, "seq": 3}
    assert quiet.writes[-1] is other.writes[-1]  # one frame for every client
    world.clock.now += 1
    world.hub.tick()
    assert [message["type"] for message in quiet.messages()].count("heartbeat") == 1


async def test_a_client_sent_something_lately_gets_no_heartbeat() -> None:
    world = World()
    _, writer, _ = await world.connect()
    world.hub.tick()
    world.clock.now += HEARTBEAT_S - 1
    world.hub.fan_out(stored((USD_KES, "131", T0, 4)))
    world.hub.tick()
    world.clock.now += 2
    world.hub.tick()
    assert kinds(writer.messages()) == ["rate_update"]
    world.clock.now += HEARTBEAT_S
    world.hub.tick()
    assert kinds(writer.messages()) == ["rate_update", "heartbeat"]
    assert writer.messages()[-1]["seq"] == 4


def test_memory_is_bounded_and_answers_exactly_from_its_floor() -> None:
    recent = RecentStores(max_entries=10)
    recent.seed([stored_rate(USD_NGN, "1000", seq=1)], 1, now=0)
    for seq in range(2, 40):
        pair = USD_NGN if seq % 2 else USD_KES
        recent.record([stored_rate(pair, str(1000 + seq), seq=seq)], now=0)
    assert recent.watermark == 39 and recent.floor > 1
    assert not recent.answerable(recent.floor - 1) and recent.answerable(recent.floor)
    floor = recent.floor
    changes = {change.rate.pair: change for change in recent.changes_after(floor, lambda pair: True)}
    # As of the floor, each pair held its newest value stored at or below it.
    newest_below = {
        pair: max(s for s in range(2, floor + 1) if (USD_NGN if s % 2 else USD_KES) == pair)
        for pair in (USD_NGN, USD_KES)
    }
    for pair, change in changes.items():
        assert change.previous_rate == stored_rate(pair, str(1000 + newest_below[pair]), seq=0).rate
    assert changes[USD_NGN].rate.seq == 39 and changes[USD_KES].rate.seq == 38
