"""The process's one listener to the rate channel, fanning every event out to its connected clients.

Each event arrives once and is parsed once, and each rate update is serialised
once in both shapes a client may take it in (a `rate_update` frame, and an item
of a `rates_update` frame); every client is handed the same frame, framed for
the wire once (app.live.frames), and so is every `rates_update` frame that
several clients are due alike. A client with nothing waiting whose connection
takes bytes has an event's frames written at once, in one write, without
waking its sender task (most of a push's cost per client: docs/performance.md).

What a client has not taken yet waits in its own queue, conflated per pair
(docs/websocket.md): a newer update for a pair replaces the queued one, so a
slow client costs memory bounded by the number of pairs, never by time, and a
client that catches up gets each pair's newest value. A client that takes
nothing for `stall_timeout_s` while a frame waits is cut off (the endpoint
closes it with 1013); so is one that keeps asking and never reads the answers
(its replies are bounded by count, as they cannot be conflated).

While the database cannot be reached, snapshots come from the last one read,
brought up to date with every stored change announced since, each item's
`stale` by its age now (docs/outages.md): new clients still get one.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal

from broadcaster import Broadcast

from app.currencies import Pair
from app.errors import DatabaseUnavailable
from app.kit.metrics import Metrics
from app.live.fanout import RATES_CHANNEL, Delivered, stored_updates
from app.live.frames import Deflate, Outgoing
from app.rates.store import RateStore, utc_now
from app.rates.wire import RESYNC, AllRates, RateItem, RatesUpdateItem, RateUpdate, rates_update_frame
from app.storage.rate import StoredRate

log = logging.getLogger(__name__)

ALL = "*"
# A snapshot is rebuilt after any change, and at least this often so its `stale` flags stay true.
SNAPSHOT_MAX_AGE_S = 1.0
# Replies to one client's own requests that may wait unread before it is cut off.
MAX_QUEUED_REPLIES = 256
# The key under which a client's pending end-of-cycle event waits: only the newest one matters.
_CYCLE = "all_rates_update"


class Update:
    """One stored rate, serialised once for every client in both shapes."""

    __slots__ = ("as_of", "frame", "item", "pair", "stamp", "stored", "value")

    def __init__(self, update: RateUpdate) -> None:
        rate = update.rate
        self.pair = Pair(rate.source_currency, rate.destination_currency)
        self.value = rate.destination_per_source
        self.stamp: datetime = rate.last_updated
        self.frame = Outgoing(update.model_dump_json())
        self.item = RatesUpdateItem.of_update(update).model_dump_json()
        self.as_of = '"' + rate.model_dump(mode="json", include={"last_updated"})["last_updated"] + '"'
        # As a stored rate (it was published once stored): what a snapshot holds while the database is away.
        self.stored = rate.stored()


class _Reply:
    """An answer to the client's own request; `pair` and `value` when it tells the client a rate."""

    __slots__ = ("frame", "pair", "value")

    def __init__(self, frame: Outgoing, pair: Pair | None, value: Decimal | None) -> None:
        self.frame, self.pair, self.value = frame, pair, value


class Snapshot:
    """Every stored rate, as read at one moment and as one `all_rates` frame, with the values it tells."""

    def __init__(
        self, rates: list[StoredRate], frame: str, built_at: float, versions: tuple[int, int], *, held: bool = False
    ) -> None:
        self.rates = rates
        self.frame = Outgoing(frame)
        self.values = {rate.pair: rate.destination_per_source for rate in rates}
        self.built_at = built_at
        self.versions = versions  # (the store's, the hub's) when the read began
        self.held = held  # True: the last snapshot read, served again because the database is away


class HubClient:
    """One connected client: what it subscribed to, what it was last sent, and what waits for it."""

    def __init__(
        self, batches: dict[tuple[Update, ...], Outgoing] | None = None, max_replies: int = MAX_QUEUED_REPLIES
    ) -> None:
        self.pairs: set[Pair] | None = None  # None: every pair
        self.min_change_bps = Decimal(0)
        self.subscribed_once = False
        self.batch = False
        self.close_code: int | None = None
        # Set when the connection is to end: the service closes it (see Hub.close_all), or it is cut off for not
        # reading (`slow`). One event, so the endpoint watches both with one task (each costs memory per client).
        self.ending = asyncio.Event()
        self.slow = False
        self.sending_since: float | None = None  # when the frame being sent now was handed over
        self.frames_sent = 0  # since the hub last counted them
        # The connection's "write these bytes now if you can take them" (app.live.protocol), once accepted, and how
        # its frames are compressed; None under a server without it: everything then goes through the queue and
        # the sender.
        self.write_now: Callable[[bytes], bool] | None = None
        self.deflate: Deflate | None = None
        # In send order: updates under their Pair, replies under an int, the end-of-cycle event under _CYCLE.
        self._queue: dict[object, Update | _Reply | Outgoing] = {}
        # `rates_update` frames already built, shared by the hub's clients: those due the same updates share one.
        self._batches: dict[tuple[Update, ...], Outgoing] = {} if batches is None else batches
        self._ready = asyncio.Event()
        self._reply_keys = itertools.count()
        self._replies = 0
        self._max_replies = max_replies
        self._snapshot_sent = False
        self._sent_base: dict[Pair, Decimal] = {}  # a snapshot's values, shared with other clients, never written
        self._sent: dict[Pair, Decimal] = {}

    def close(self, code: int) -> None:
        self.close_code = code
        self.ending.set()

    def cut_off(self) -> None:
        """To be closed for not reading: the endpoint closes it with 1013."""
        self.slow = True
        self.ending.set()

    def last_sent(self, pair: Pair) -> Decimal | None:
        return self._sent.get(pair, self._sent_base.get(pair))

    def send_snapshot(self, snapshot: Snapshot) -> None:
        self._sent_base, self._sent = snapshot.values, {}
        reply = _Reply(snapshot.frame, None, None)
        if self._snapshot_sent:
            self._put_reply(reply)
            return
        # The first snapshot goes before any update that arrived while it was read.
        self._snapshot_sent = True
        self._queue = {next(self._reply_keys): reply, **self._queue}
        self._replies += 1
        self._ready.set()

    def send(self, frame: str, pair: Pair | None = None, value: Decimal | None = None) -> None:
        """Queue a reply to the client's own request."""
        self._put_reply(_Reply(Outgoing(frame), pair, value))

    def _put_reply(self, reply: _Reply) -> None:
        if self._replies >= self._max_replies:
            # It keeps asking and does not read the answers: it is to be cut off.
            self.cut_off()
            return
        self._replies += 1
        self._queue[next(self._reply_keys)] = reply
        self._ready.set()

    def push(self, frame: Outgoing) -> None:
        """Queue the end of a poll cycle; an older one still waiting is replaced, and moves behind the updates."""
        if self._wrote_now(frame):
            self.frames_sent += 1
            return
        self._queue.pop(_CYCLE, None)
        self._queue[_CYCLE] = frame
        self._ready.set()

    def offer(self, updates: Iterable[Update]) -> int:
        """Send or queue the updates this client wants and whose move is big enough for it; how many replaced
        one queued."""
        queue, pairs, threshold = self._queue, self.pairs, self.min_change_bps
        conflated = 0
        wanted: list[Update] = []
        for update in updates:
            pair = update.pair
            if pairs is not None and pair not in pairs:
                continue
            if threshold:
                last = self.last_sent(pair)
                if last and abs(update.value - last) / last * 10_000 < threshold:
                    # Back within reach of what the client holds: a queued bigger move is no longer news.
                    if queue.pop(pair, None) is not None:
                        conflated += 1
                    continue
            wanted.append(update)
        if not wanted or self._sent_now(wanted):
            return conflated
        for update in wanted:
            # Moved to the back, so everything queued before an end-of-cycle event belongs to that cycle.
            if queue.pop(update.pair, None) is not None:
                conflated += 1
            queue[update.pair] = update
        self._ready.set()
        return conflated

    def _sent_now(self, updates: list[Update]) -> bool:
        """Written to the connection at once, in one write, if nothing waits before them and it takes them."""
        if self.batch:
            newest = {update.pair: update for update in updates}  # a pair twice in one event: its newer value
            frames = 1
            written = self._wrote_now(self._batch_frame(tuple(newest.values())))
        else:
            frames = len(updates)
            written = self._wrote_now(*(update.frame for update in updates))
        if not written:
            return False
        for update in updates:
            self._sent[update.pair] = update.value
        self.frames_sent += frames
        return True

    def _wrote_now(self, *frames: Outgoing) -> bool:
        # Only when the sender is idle with nothing queued (so order is kept: the snapshot first, replies in
        # turn) and the connection is not pushing back: then the write is the one a woken sender would make
        # (all the frames in one), without waking it. Otherwise the frames wait in the queue, conflated, for
        # the sender.
        if self.write_now is None or not self._snapshot_sent or self._queue or self.sending_since is not None:
            return False
        deflate = self.deflate
        wire = frames[0].wire(deflate) if len(frames) == 1 else b"".join(frame.wire(deflate) for frame in frames)
        return self.write_now(wire)

    def forget(self, pairs: set[Pair] | None) -> None:
        """Drop queued updates of pairs the client no longer wants (None: every pair)."""
        for key in [key for key, entry in self._queue.items() if type(entry) is Update]:
            if pairs is None or key in pairs:
                del self._queue[key]

    async def take(self) -> Outgoing:
        """The next frame to send: a reply or event alone, or (in batch mode) every update queued before it."""
        queue = self._queue
        while not queue:
            self._ready.clear()
            await self._ready.wait()
        key = next(iter(queue))
        entry = queue[key]
        if type(entry) is Update:
            if self.batch:
                return self._take_batch()
            del queue[key]
            self._sent[entry.pair] = entry.value
            return entry.frame
        del queue[key]
        if type(entry) is _Reply:
            self._replies -= 1
            if entry.pair is not None and entry.value is not None:
                self._sent[entry.pair] = entry.value
            return entry.frame
        assert isinstance(entry, Outgoing)
        return entry

    def _take_batch(self) -> Outgoing:
        queue, taken = self._queue, []
        for entry in queue.values():
            if type(entry) is not Update:
                break
            taken.append(entry)
        for update in taken:
            del queue[update.pair]
            self._sent[update.pair] = update.value
        return self._batch_frame(tuple(taken))

    def _batch_frame(self, updates: tuple[Update, ...]) -> Outgoing:
        frame = self._batches.get(updates)
        if frame is None:
            newest = max(updates, key=lambda update: update.stamp)
            items = [update.item for update in updates]
            frame = self._batches[updates] = Outgoing(rates_update_frame(items, newest.as_of))
        return frame


class Hub:
    def __init__(
        self,
        broadcast: Broadcast,
        store: RateStore,
        *,
        stale_after_s: float,
        metrics: Metrics,
        stall_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_rates: Callable[[], None] = lambda: None,
        on_cycle_end: Callable[[], None] = lambda: None,
    ) -> None:
        self._broadcast = broadcast
        self._store = store
        self._stale_after_s = stale_after_s
        self._metrics = metrics
        self._stall_timeout_s = stall_timeout_s
        self._clients: set[HubClient] = set()
        self._clock = clock
        # Told when rates are handed to clients, and once a poll cycle's end has been (app.live.gc_pacing).
        self._on_rates, self._on_cycle_end = on_rates, on_cycle_end
        self._snapshot: Snapshot | None = None
        self._last_read: tuple[list[StoredRate], datetime] | None = None  # what the database last gave, and when
        self._announced: dict[Pair, StoredRate] = {}  # the newest stored rate of each pair announced on the channel
        self._snapshot_lock = asyncio.Lock()
        self._delivered = Delivered()
        self.version = 0  # bumped by every change any process announces
        self._closing_code: int | None = None  # once shutting down, the code every connection is closed with
        # Shared by every client; emptied at each stored event, after which few clients are due the same as before.
        self._batches: dict[tuple[Update, ...], Outgoing] = {}

    def count_slow_closed(self) -> None:
        self._metrics.websocket_slow_closed.inc()

    def join(self) -> HubClient:
        """A new client; whatever arrives before its first snapshot waits behind that snapshot."""
        client = HubClient(self._batches)
        self._clients.add(client)
        self._metrics.websocket_clients.set(len(self._clients))
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
        self._count_frames((client,))
        self._metrics.websocket_clients.set(len(self._clients))

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
        arrived, built_before = (self._store.version, self.version), self._snapshot
        async with self._snapshot_lock:
            # Whoever waited on the lock takes the snapshot the holder just built, however long its read took: a
            # request waits for one database bound at most (docs/outages.md). Unless a change landed between that
            # read's start and this caller's arrival, which the read may have missed (a held snapshot has them all).
            built = self._snapshot
            if built is not None and built is not built_before and (built.held or built.versions == arrived):
                return built
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
        """Listen to the rate channel and fan each event out, and watch for stalled clients, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._listen())
            group.create_task(self._watch())

    def deliver(self, message: str) -> None:
        """An event this process published, handed over directly (`Fanout.deliver_here`): fanned out next.

        At the loop's next step, not inside the store's: the fan-out writes to every idle client, and the store
        hands its next batch to the database first (events keep their order: steps run in turn).
        """
        self._delivered.add(message)
        asyncio.get_running_loop().call_soon(self._fan_out_logged, message)

    def _fan_out_logged(self, message: str) -> None:
        try:
            self._fan_out(message)
        except Exception:
            log.exception("could not fan out an event")

    async def _listen(self) -> None:
        async with self._broadcast.subscribe(RATES_CHANNEL) as subscriber:
            while True:
                event = await subscriber.get()
                if self._delivered.take(event.message):
                    continue
                try:
                    await self._dispatch(event.message)
                except Exception:
                    log.exception("could not fan out an event")

    async def _watch(self) -> None:
        """Once a second (or sooner for a short timeout): cut off stalled clients, count the frames sent."""
        period_s = min(1.0, self._stall_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            now = self._clock()
            for client in self._clients:
                since = client.sending_since
                if since is not None and now - since >= self._stall_timeout_s:
                    client.cut_off()
            self._count_frames(self._clients)

    def _count_frames(self, clients: Iterable[HubClient]) -> None:
        sent = 0
        for client in clients:
            sent, client.frames_sent = sent + client.frames_sent, 0
        if sent:
            self._metrics.websocket_frames_sent.inc(sent)

    async def _dispatch(self, message: str) -> None:
        if message == RESYNC:
            # Redis was away: whatever changed meanwhile reaches every client as a fresh snapshot.
            self._snapshot = None
            self.version += 1
            snapshot = await self.snapshot()
            for client in list(self._clients):
                client.send_snapshot(snapshot)
        else:
            self._fan_out(message)

    def _fan_out(self, message: str) -> None:
        if (stored := stored_updates(message)) is not None:
            self._on_rates()
            self._snapshot = None
            self.version += 1
            updates = [Update(update) for update in stored]
            self._batches.clear()
            for update in updates:
                self._announced[update.pair] = update.stored
            conflated = 0
            for client in list(self._clients):
                conflated += client.offer(updates)
            if conflated:
                self._metrics.websocket_updates_conflated.inc(conflated)
        elif message.startswith('{"type":"all_rates_update"'):
            frame = Outgoing(message)
            for client in list(self._clients):
                client.push(frame)
            self._on_cycle_end()
