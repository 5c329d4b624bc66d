"""The process's one listener to the rate channel, fanning every event out to its connected clients.

Each event arrives once, is parsed once, and the same frame text is queued for
every client that wants it. Each client has a bounded outbox: one that stops
reading fills it and is cut off, and nobody else waits for it.

While the database cannot be reached, snapshots come from the last one read,
brought up to date with every stored change announced since, each item's
`stale` by its age now (docs/outages.md): new clients still get one.
"""

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from broadcaster import Broadcast
from prometheus_client import Counter, Gauge

from app.currencies import Pair
from app.errors import DatabaseUnavailable
from app.live.fanout import RATES_CHANNEL
from app.rates.rate import StoredRate
from app.rates.store import RateStore, utc_now
from app.rates.wire import RESYNC, AllRates, RateItem

log = logging.getLogger(__name__)

ALL = "*"
# A snapshot is rebuilt after any change, and at least this often so its `stale` flags stay true.
SNAPSHOT_MAX_AGE_S = 1.0


class Outbox:
    """A bounded queue of frames for one client."""

    def __init__(self, max_frames: int) -> None:
        self._frames: deque[str] = deque()
        self._max_frames = max_frames
        self._ready = asyncio.Event()
        self.overflowed = asyncio.Event()

    def put(self, frame: str) -> None:
        if self.overflowed.is_set():
            return
        if len(self._frames) >= self._max_frames:
            # The client stopped reading: what it has not taken is dropped, and it is to be cut off.
            self._frames.clear()
            self.overflowed.set()
            return
        self._frames.append(frame)
        self._ready.set()

    async def get(self) -> str:
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()


class Snapshot:
    """Every stored rate, as read at one moment and as one `all_rates` frame, with the values it tells."""

    def __init__(
        self, rates: list[StoredRate], frame: str, built_at: float, versions: tuple[int, int], *, held: bool = False
    ) -> None:
        self.rates = rates
        self.frame = frame
        self.values = {rate.pair: rate.destination_per_source for rate in rates}
        self.built_at = built_at
        self.versions = versions  # (the store's, the hub's) when the read began
        self.held = held  # True: the last snapshot read, served again because the database is away


class HubClient:
    """One connected client: what it subscribed to, what it was last sent, and its outbox."""

    def __init__(self, max_frames: int) -> None:
        self.outbox = Outbox(max_frames)
        self.pairs: set[Pair] | None = None  # None: every pair
        self.min_change_bps = Decimal(0)
        self.subscribed_once = False
        self.close_code: int | None = None
        self.closing = asyncio.Event()  # set when the service asks this connection to close (see Hub.close_all)
        self._sent_base: dict[Pair, Decimal] = {}  # a snapshot's values, shared with other clients, never written
        self._sent: dict[Pair, Decimal] = {}
        # Events that arrive before the first snapshot, passed on once it is sent: it must come first.
        self._held: list[tuple[Pair | None, Decimal, str]] | None = []

    def close(self, code: int) -> None:
        self.close_code = code
        self.closing.set()

    def last_sent(self, pair: Pair) -> Decimal | None:
        return self._sent.get(pair, self._sent_base.get(pair))

    def send_snapshot(self, snapshot: Snapshot) -> None:
        self._sent_base, self._sent = snapshot.values, {}
        self.outbox.put(snapshot.frame)
        held, self._held = self._held, None
        for pair, value, frame in held or ():
            if pair is None:
                self.outbox.put(frame)
            else:
                self.offer(pair, value, frame)

    def send(self, frame: str, pair: Pair | None = None, value: Decimal | None = None) -> None:
        if pair is not None and value is not None:
            self._sent[pair] = value
        self.outbox.put(frame)

    def push(self, frame: str) -> None:
        """Queue an event every client gets (the end of a poll cycle)."""
        if self._held is not None:
            self._held.append((None, Decimal(0), frame))
        else:
            self.outbox.put(frame)

    def offer(self, pair: Pair, value: Decimal, frame: str) -> None:
        """Queue a rate update if this client wants the pair and the move is big enough for it."""
        if self._held is not None:
            self._held.append((pair, value, frame))
            return
        if self.pairs is not None and pair not in self.pairs:
            return
        last = self.last_sent(pair)
        if self.min_change_bps and last is not None and last:
            moved_bps = abs(value - last) / last * 10_000
            if moved_bps < self.min_change_bps:
                return
        self.send(frame, pair, value)


class Hub:
    def __init__(
        self,
        broadcast: Broadcast,
        store: RateStore,
        *,
        stale_after_s: float,
        clients_gauge: Gauge,
        slow_closed: Counter,
        max_frames: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broadcast = broadcast
        self._store = store
        self._stale_after_s = stale_after_s
        self._clients: set[HubClient] = set()
        self._clients_gauge = clients_gauge
        self.slow_closed = slow_closed
        self._max_frames = max_frames
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._last_read: tuple[list[StoredRate], datetime] | None = None  # what the database last gave, and when
        self._announced: dict[Pair, StoredRate] = {}  # the newest stored rate of each pair announced on the channel
        self._snapshot_lock = asyncio.Lock()
        self.version = 0  # bumped by every change any process announces
        self._closing_code: int | None = None

    def join(self) -> HubClient:
        """A new client; it holds updates until it is sent its first snapshot."""
        client = HubClient(self._max_frames)
        self._clients.add(client)
        self._clients_gauge.set(len(self._clients))
        if self._closing_code is not None:
            client.close(self._closing_code)
        return client

    def close_all(self, code: int) -> None:
        """Close every connection with `code`, and each new one right after its handshake (shutting down)."""
        self._closing_code = code
        for client in list(self._clients):
            client.close(code)

    def leave(self, client: HubClient) -> None:
        self._clients.discard(client)
        self._clients_gauge.set(len(self._clients))

    def _current(self) -> Snapshot | None:
        # Out of date after a save in this process, an event from another (see _dispatch), or a second.
        current = self._snapshot
        if (
            current is None
            or current.versions != (self._store.version, self.version)
            or self._clock() - current.built_at >= SNAPSHOT_MAX_AGE_S
        ):
            return None
        return current

    async def snapshot(self) -> Snapshot:
        """Every stored rate, read from the database at most once a second while nothing changes."""
        if (current := self._current()) is not None:
            return current
        async with self._snapshot_lock:
            # Whoever waited on the lock takes the snapshot the holder just built.
            if (current := self._current()) is not None:
                return current
            # Versions taken before the read: a change that lands during it makes this snapshot old at once.
            built_at, versions, now = self._clock(), (self._store.version, self.version), utc_now()
            try:
                rates = await self._store.all()
            except DatabaseUnavailable:
                # Served again for up to a second, then the database is asked again (at once, while it is down).
                rates, read_at = self._held(now)
                frame = self._frame(rates, read_at, now)
                self._snapshot = Snapshot(rates, frame, built_at, versions, held=True)
                return self._snapshot
            self._last_read = (rates, now)
            self._snapshot = Snapshot(rates, self._frame(rates, now, now), built_at, versions)
            return self._snapshot

    def _held(self, now: datetime) -> tuple[list[StoredRate], datetime]:
        """The last snapshot read, with every change announced since: all of it was stored."""
        last_rates, read_at = self._last_read or ([], now)
        held = {rate.pair: rate for rate in last_rates}
        for pair, rate in self._announced.items():
            if pair not in held or held[pair].last_updated < rate.last_updated:
                held[pair] = rate
        return sorted(held.values(), key=lambda rate: (rate.pair.source, rate.pair.destination)), read_at

    def _frame(self, rates: list[StoredRate], read_at: datetime, now: datetime) -> str:
        items = [RateItem.of(rate, stale=rate.age_s(now) > self._stale_after_s) for rate in rates]
        return AllRates(rates=items, as_of=read_at).model_dump_json()

    async def run(self) -> None:
        """Listen to the rate channel and fan each event out, until cancelled."""
        async with self._broadcast.subscribe(RATES_CHANNEL) as subscriber:
            while True:
                event = await subscriber.get()
                try:
                    await self._dispatch(event.message)
                except Exception:
                    log.exception("could not fan out an event")

    async def _dispatch(self, frame: str) -> None:
        message: dict[str, Any] = json.loads(frame)
        kind = message.get("type")
        if kind == "rate_update":
            self._snapshot = None
            self.version += 1
            item = message["rate"]
            pair = Pair(item["source_currency"], item["destination_currency"])
            value = Decimal(str(item["destination_per_source"]))
            self._announced[pair] = _stored(pair, item)
            for client in list(self._clients):
                client.offer(pair, value, frame)
        elif kind == "all_rates_update":
            for client in list(self._clients):
                client.push(frame)
        elif frame == RESYNC:
            # Redis was away: whatever changed meanwhile reaches every client as a fresh snapshot.
            self._snapshot = None
            self.version += 1
            snapshot = await self.snapshot()
            for client in list(self._clients):
                client.send_snapshot(snapshot)


def _stored(pair: Pair, item: dict[str, Any]) -> StoredRate:
    """A rate item from the channel as a stored rate (it was published once stored)."""
    return StoredRate(
        pair=pair,
        rate=Decimal(str(item["rate"])),
        destination_per_source=Decimal(str(item["destination_per_source"])),
        source_amount=Decimal(str(item["source_amount"])),
        destination_amount=Decimal(str(item["destination_amount"])),
        provider=str(item["provider"]),
        last_updated=datetime.fromisoformat(item["last_updated"]),
    )
