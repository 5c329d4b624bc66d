"""Resume and heartbeats end to end: real clients (the test client and the reference client) on a real service.

The service polls once an hour and its rates go stale after a second, so a rate changes only when a test says:
it sets the fake's value, and a REST read of the now stale pair stores it (and pushes it).
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from app.currencies import Pair
from clients.fxrates_client import RatesClient
from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient

HEARTBEAT_S = 1.0
STALE_AFTER_S = 1.0


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeFlutterwave]:
    with FakeFlutterwave() as server:
        yield server


@pytest.fixture(scope="module")
def service(fake: FakeFlutterwave, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    with replica_on_sqlite(
        Path(tmp_path_factory.mktemp("resume")),
        fake,
        POLL_INTERVAL_SECONDS="3600",
        RATE_STALE_AFTER_SECONDS=str(STALE_AFTER_S),
        WS_HEARTBEAT_SECONDS=str(HEARTBEAT_S),
        # The tests move rates by hand, far past the rate guard's bound: stored at once, not held.
        RATE_GUARD_BPS="0",
    ) as replica:
        yield replica


async def change(service: Replica, fake: FakeFlutterwave, pair: str, value: str) -> None:
    """Store a new value for `pair`: the fake answers it, and a read of the stale pair fetches and stores it."""
    source, destination = pair.split("/")
    fake.set_rate(Pair(source, destination), Decimal(value))

    def stored() -> bool:
        status, body = service.get(f"/api/rates?source_currency={source}&destination_currency={destination}")
        return status == 200 and Decimal(str(body["meta"]["destination_per_source"])) == Decimal(value)

    await eventually(lambda: asyncio.to_thread(stored), what=f"{pair} stored as {value}", timeout_s=15)


def resume_url(service: Replica, epoch: str, seq: int | str) -> str:
    return f"{service.ws_url}?{urlencode({'epoch': epoch, 'seq': seq})}"


async def first_frame(url: str) -> dict[str, Any]:
    async with WsClient(url) as client:
        return await client.recv()


async def latest(service: Replica) -> dict[str, Any]:
    """A fresh snapshot, as a new client gets it."""
    return await first_frame(service.ws_url)


def board_of(service: Replica) -> dict[str, Decimal]:
    boards: dict[str, Decimal] = {}
    for base in ("USD", "CAD", "GBP", "EUR"):
        _, body = service.get(f"/api/rates/all?base_currency={base}")
        for destination, item in body["data"]["rates"].items():
            boards[f"{base}/{destination}"] = Decimal(str(item["destination_per_source"]))
    return boards


def rates_by_pair(frame: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{item['source_currency']}/{item['destination_currency']}": item for item in frame["rates"]}


async def test_a_resume_gets_exactly_the_pairs_changed_meanwhile_with_their_rate_before(
    service: Replica, fake: FakeFlutterwave
) -> None:
    before = await latest(service)
    held = rates_by_pair(before)
    await change(service, fake, "USD/NGN", "1601.5")
    await change(service, fake, "GBP/KES", "171.25")
    frame = await first_frame(resume_url(service, before["epoch"], before["seq"]))
    assert frame["type"] == "resumed" and frame["epoch"] == before["epoch"]
    changed = rates_by_pair(frame)
    assert set(changed) == {"USD/NGN", "GBP/KES"}
    for pair, value in (("USD/NGN", "1601.5"), ("GBP/KES", "171.25")):
        assert Decimal(str(changed[pair]["destination_per_source"])) == Decimal(value)
        assert changed[pair]["previous_rate"] == held[pair]["rate"]
        assert before["seq"] < changed[pair]["seq"] <= frame["seq"]


async def test_a_resume_from_the_current_seq_gets_nothing(service: Replica) -> None:
    now = await latest(service)
    frame = await first_frame(resume_url(service, now["epoch"], now["seq"]))
    assert frame == {"type": "resumed", "epoch": now["epoch"], "seq": now["seq"], "rates": []}


@pytest.mark.parametrize("epoch, seq", [("another", None), (None, "ahead"), (None, "soon"), (None, "-3")])
async def test_a_foreign_epoch_or_a_seq_that_is_no_resume_point_gets_the_snapshot(
    service: Replica, epoch: str | None, seq: str | None
) -> None:
    now = await latest(service)
    seq_sent = {"ahead": now["seq"] + 1000, "soon": "soon", "-3": "-3", None: now["seq"]}[seq]
    frame = await first_frame(resume_url(service, epoch or now["epoch"], seq_sent))
    assert frame["type"] == "all_rates" and frame["resumed"] is False
    assert len(frame["rates"]) == 44


async def test_a_quiet_client_gets_heartbeats_with_the_epoch_and_seq(service: Replica) -> None:
    async with WsClient(service.ws_url) as client:
        snapshot = await client.recv()
        beat, _ = await client.recv_until(lambda frame: frame["type"] == "heartbeat", timeout_s=HEARTBEAT_S * 5)
        assert beat["epoch"] == snapshot["epoch"] and beat["seq"] >= snapshot["seq"] - 44
        again = await client.recv(timeout_s=HEARTBEAT_S * 5)
        assert again["type"] == "heartbeat"


@pytest.fixture
async def proxy(service: Replica) -> AsyncIterator[TcpProxy]:
    with TcpProxy("127.0.0.1", service.port) as running:
        yield running


async def test_the_reference_client_resumes_after_its_connection_is_cut_and_holds_the_services_board(
    service: Replica, fake: FakeFlutterwave, proxy: TcpProxy
) -> None:
    client = RatesClient(
        f"ws://127.0.0.1:{proxy.port}/ws/rates", heartbeat_s=HEARTBEAT_S, backoff_min_s=0.05, backoff_max_s=0.2
    )
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.wait_connected(), 10)
        assert client.resumed is False
        proxy.hang()  # the connection goes silent: two heartbeats missed, the client gives it up
        await change(service, fake, "EUR/ZAR", "20.5")
        await change(service, fake, "CAD/XOF", "441.75")
        proxy.restore()
        await eventually(lambda: client.connections >= 2, what="the client to reconnect", timeout_s=15)
        assert client.resumed is True

        def same_board() -> bool:
            held = {pair: Decimal(str(item["destination_per_source"])) for pair, item in client.board.rates.items()}
            return held == board_of(service)

        await eventually(lambda: asyncio.to_thread(same_board), what="the client's board to be the service's")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_resume_across_a_restart_keeps_the_epoch_and_holds_what_history_holds(
    service: Replica, fake: FakeFlutterwave
) -> None:
    before = await latest(service)
    held = {pair: Decimal(str(item["destination_per_source"])) for pair, item in rates_by_pair(before).items()}
    service.stop()
    fake.set_rate(Pair("USD", "GHS"), Decimal("15.5"))  # stored by the new process's first cycle
    service.start()

    async def resumed_board() -> bool:
        # The new process's memory starts at the snapshot it read at start-up (every store up to it is in the
        # database), and a resume from at or above it is exact: the board it gives is the service's.
        service_board = await asyncio.to_thread(board_of, service)
        frame = await first_frame(resume_url(service, before["epoch"], before["seq"]))
        assert frame["type"] == "resumed" and frame["epoch"] == before["epoch"], frame
        board = {**held}
        board.update(
            {pair: Decimal(str(item["destination_per_source"])) for pair, item in rates_by_pair(frame).items()}
        )
        return board == service_board and board["USD/GHS"] == Decimal("15.5")

    await eventually(resumed_board, what="a resume to give the service's board after the restart", timeout_s=15)
