"""`GET /sse/rates` on a real uvicorn process: the events, their ids, the query, the caps shared with WebSocket
clients, a client that stops reading, a client that leaves, and shutdown. Events are read with the event-stream
parser in tests/support/sse_client.py (no SSE client library is in the lock)."""

import asyncio
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.support.fake_flutterwave import FakeFlutterwave
from tests.support.replicas import Replica, replica_on_sqlite
from tests.support.sse_client import Event, SseClient
from tests.support.waiting import eventually
from tests.support.ws_client import WsClient

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

PER_ADDRESS = 2
MAX_PAIRS = 3
# The address the cap tests come from: the others' clients (127.0.0.1) do not count toward its cap.
CAPPED = "127.0.0.5"


@pytest.fixture(scope="module")
def service(ws_fake: FakeFlutterwave, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    with replica_on_sqlite(
        Path(tmp_path_factory.mktemp("sse")),
        ws_fake,
        POLL_INTERVAL_SECONDS="0.3",
        UPSTREAM_TIMEOUT_SECONDS="1",
        UPSTREAM_MAX_ATTEMPTS="1",
        WS_MAX_CLIENTS_PER_ADDRESS=str(PER_ADDRESS),
        WS_MAX_PAIRS_PER_CLIENT=str(MAX_PAIRS),
        # A client that stops reading is cut off after this long blocked (30 s in production).
        WS_STALL_TIMEOUT_SECONDS="2",
    ) as replica:
        yield replica


def url(replica: Replica) -> str:
    return f"{replica.url}/sse/rates"


def metric(replica: Replica, name: str) -> float:
    with urllib.request.urlopen(f"{replica.url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def pair_of(update: dict[str, Any]) -> str:
    return f"{update['source_currency']}/{update['destination_currency']}"


async def events_over_cycles(stream: SseClient, cycles: int) -> list[Event]:
    """The events received until `cycles` poll cycles have ended (the first, partial one aside)."""
    await stream.until(lambda e: e.type == "all_rates_update")
    events: list[Event] = []
    for _ in range(cycles):
        end, before = await stream.until(lambda e: e.type == "all_rates_update")
        events += [*before, end]
    return events


async def test_the_snapshot_comes_first_then_each_cycle_as_rate_updates_with_ids(service: Replica) -> None:
    async with SseClient(url(service), headers={"Accept-Encoding": "gzip"}) as stream:
        response = stream.response
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "content-encoding" not in response.headers, "an event stream is never compressed"
        first = await stream.next()
        snapshot = first.json()
        assert first.type == "all_rates" and first.retry == 3000
        assert len(snapshot["rates"]) == 44 and "resumed" not in snapshot
        epoch = snapshot["epoch"]
        assert first.id == f"{epoch}:{snapshot['seq']}"
        events = await events_over_cycles(stream, cycles=1)
    updates = [e for e in events if e.type == "rate_update"]
    assert len({pair_of(e.json()["rate"]) for e in updates}) == 44
    assert all(e.id == f"{epoch}:{e.json()['seq']}" for e in updates)
    assert all(e.json()["seq"] > snapshot["seq"] for e in updates)
    ends = [e for e in events if e.type == "all_rates_update"]
    assert ends and all(e.id is None and e.json()["count"] == 44 for e in ends)
    assert all(e.retry is None for e in events), "retry comes once, before the first event"


async def test_pairs_filters_and_min_change_bps_is_taken(service: Replica) -> None:
    params = {"pairs": "usd/ngn, GBP/KES", "min_change_bps": "0"}
    async with SseClient(url(service), params) as stream:
        assert (await stream.next()).type == "all_rates"
        events = await events_over_cycles(stream, cycles=2)
    assert {pair_of(e.json()["rate"]) for e in events if e.type == "rate_update"} == {"USD/NGN", "GBP/KES"}


async def test_batch_gives_rates_update_events_with_ids(service: Replica) -> None:
    async with SseClient(url(service), {"batch": "true", "pairs": "*"}) as stream:
        first = await stream.next()
        epoch = first.json()["epoch"]
        events = await events_over_cycles(stream, cycles=2)
    batches = [e for e in events if e.type == "rates_update"]
    assert batches and not [e for e in events if e.type == "rate_update"]
    assert all(e.id == f"{epoch}:{e.json()['seq']}" for e in batches)
    assert len({pair_of(item) for e in batches for item in e.json()["rates"]}) == 44


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"pairs": "USDNGN"}, "pairs"),
        ({"pairs": "USD/USD"}, "pairs"),
        ({"pairs": "USD/NGN,USD/KES,USD/GHS,USD/ZAR"}, "pairs"),  # past WS_MAX_PAIRS_PER_CLIENT
        ({"min_change_bps": "-1"}, "min_change_bps"),
        ({"min_change_bps": "NaN"}, "min_change_bps"),
        ({"batch": "maybe"}, "batch"),
    ],
)
async def test_a_bad_parameter_is_a_422_in_the_envelope_before_any_stream(
    service: Replica, query: dict[str, str], field: str
) -> None:
    async with SseClient(url(service), query) as stream:
        assert stream.response.status_code == 422
        assert stream.response.headers["content-type"] == "application/json"
        assert stream.response.headers["cache-control"] == "no-store"
        body = await stream.body()
    assert body["status"] == "error" and body["data"] is None
    assert [error["field"] for error in body["errors"]] == [field]


@pytest.mark.parametrize("last_event_id", ["not an id", "someone-elses-epoch:5", ":", "x" * 300])
async def test_a_malformed_or_foreign_last_event_id_gets_the_snapshot(service: Replica, last_event_id: str) -> None:
    async with SseClient(url(service), headers={"Last-Event-ID": last_event_id}) as stream:
        if len(last_event_id) > 256:  # longer than any id the service gives: refused like any bad parameter
            assert stream.response.status_code == 422
            return
        first = await stream.next()
    snapshot = first.json()
    assert first.type == "all_rates" and snapshot["resumed"] is False and len(snapshot["rates"]) == 44
    assert first.id == f"{snapshot['epoch']}:{snapshot['seq']}"


async def test_last_event_id_resumes_as_the_websocket_does(service: Replica) -> None:
    async with SseClient(url(service)) as stream:
        first = await stream.next()
    assert first.type == "all_rates" and first.id is not None
    # From the id it was last given: every pair stored since (none, or the next cycle's), never the snapshot.
    async with SseClient(url(service), headers={"Last-Event-ID": first.id}) as stream:
        resumed = await stream.next()
    assert resumed.type == "resumed", resumed
    body = resumed.json()
    assert body["epoch"] == first.json()["epoch"] and body["seq"] >= first.json()["seq"]
    assert resumed.id == f"{body['epoch']}:{body['seq']}"


async def test_sse_and_websocket_clients_share_the_per_address_cap_and_leaving_frees_a_place(
    service: Replica,
) -> None:
    async with (
        WsClient(service.ws_url, local_addr=(CAPPED, 0)) as websocket,
        SseClient(url(service), local_address=CAPPED) as stream,
    ):
        await websocket.recv()
        assert (await stream.next()).type == "all_rates"
        async with SseClient(url(service), local_address=CAPPED) as refused:
            assert refused.response.status_code == 503
            assert int(refused.response.headers["retry-after"]) >= 1
            body = await refused.body()
            assert body["status"] == "error" and "try again" in body["message"]
        async with WsClient(service.ws_url, local_addr=(CAPPED, 0)) as refused_websocket:
            with pytest.raises(ConnectionClosed) as closed:
                await refused_websocket.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        async with SseClient(url(service)) as elsewhere:  # another address has its own places
            assert elsewhere.response.status_code == 200
    # Both left: the address has its places back as soon as the service noticed.
    await eventually(
        lambda: metric(service, "fxrates_websocket_clients"),
        until=lambda clients: clients == 0,
        what="the clients that left to leave the hub",
    )
    async with (
        SseClient(url(service), local_address=CAPPED) as first,
        SseClient(url(service), local_address=CAPPED) as second,
    ):
        assert (await first.next()).type == (await second.next()).type == "all_rates"


class StalledStream:
    """A raw connection with a small receive buffer that asks for the stream and then reads nothing."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self._replica.port))
        self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=2**16)
        self._writer.write(b"GET /sse/rates HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        await self._writer.drain()
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        self._reader._transport.pause_reading()  # type: ignore[attr-defined]

    async def read_to_the_end(self, timeout_s: float = 30) -> bytes:
        """Read again, until the server closes the connection: all it sent."""
        assert self._reader is not None and self._writer is not None
        self._reader._transport.resume_reading()  # type: ignore[attr-defined]
        try:
            async with asyncio.timeout(timeout_s):
                return await self._reader.read()
        finally:
            self._writer.close()


async def test_a_client_that_stops_reading_is_cut_off_and_the_others_keep_getting_events(service: Replica) -> None:
    slow_closed = metric(service, "fxrates_websocket_slow_closed_total")
    stalled = StalledStream(service)
    cycles_seen = 0

    async def read(stream: SseClient) -> None:
        nonlocal cycles_seen
        while True:
            if (await stream.next()).type == "all_rates_update":
                cycles_seen += 1

    async with SseClient(url(service)) as reader:
        reading = asyncio.create_task(read(reader))
        await stalled.open()
        await eventually(
            lambda: metric(service, "fxrates_websocket_slow_closed_total"),
            until=lambda closed: closed > slow_closed,
            what="the client that stopped reading to be cut off",
            timeout_s=120,
        )
        seen_at_cut_off = cycles_seen
        await eventually(lambda: cycles_seen > seen_at_cut_off + 2, what="the reader to get the next poll cycles")
        assert not reading.done(), "the reader's stream ended"
        reading.cancel()
    assert seen_at_cut_off > 0, "the reader got nothing while the other client was stalled"
    # Nothing more was written to the stalled client: once it reads again, it gets what was queued, then the end.
    sent = await stalled.read_to_the_end()
    assert sent.count(b"event: all_rates\n") == 1 and not sent.endswith(b"0\r\n\r\n")


async def test_shutdown_ends_every_stream_cleanly(ws_fake: FakeFlutterwave, tmp_path: Path) -> None:
    with replica_on_sqlite(tmp_path, ws_fake, POLL_INTERVAL_SECONDS="0.3") as replica:
        async with SseClient(url(replica)) as stream:
            assert (await stream.next()).type == "all_rates"
            await asyncio.to_thread(replica.stop)  # SIGTERM
            with pytest.raises(EOFError):
                while True:
                    await stream.next()
            assert stream.ended
