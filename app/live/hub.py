"""The process's one listener to the rate channel, fanning every event out to its connected clients.

Each event arrives once and is parsed once (app.live.fanout), and each rate
update is serialised once in both shapes a client may take it in (a
`rate_update` frame, and an item of a `rates_update` frame); every client is
handed the same frame, framed for the wire once (app.live.frames), and so is
every `rates_update` frame that several clients are due alike. What each
client does with it (write it at once, or queue it conflated per pair) is the
client's (app.live.client); the snapshots it is sent are app.live.snapshots'.

A client that fails while being handed an event (a write to a connection that
is gone can raise) is ended and logged, and the event still reaches every
client after it (docs/websocket.md). A client that takes nothing for
`stall_timeout_s` while a frame waits is cut off (`check_stalled`; the
endpoint closes it with 1013).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import datetime

from broadcaster import Broadcast

from app.currencies import Pair
from app.kit.metrics import Metrics
from app.limits.websocket import MAX_PAIRS_PER_CLIENT
from app.live.client import Batches, HubClient, Update
from app.live.fanout import RATES_CHANNEL, CorridorEvent, CycleEnded, Delivered, Resynced, Stored, read_event
from app.live.frames import Outgoing
from app.live.snapshots import Snapshot, Snapshots, StoredRates
from app.rates.corridors import Corridor, Corridors, State
from app.rates.wire import CorridorChanged

# What the database holds of every corridor and override (a replica that starts or resyncs reads them).
CorridorLoader = Callable[[], Awaitable[tuple[dict[Pair, Corridor], dict[Pair, datetime]]]]

log = logging.getLogger(__name__)

ALL = "*"


class Hub:
    def __init__(
        self,
        broadcast: Broadcast,
        store: StoredRates,
        *,
        stale_after_s: float,
        metrics: Metrics,
        stall_timeout_s: float = 30.0,
        max_pairs_per_client: int = MAX_PAIRS_PER_CLIENT,
        clock: Callable[[], float] = time.monotonic,
        on_rates: Callable[[], None] = lambda: None,
        on_cycle_end: Callable[[], None] = lambda: None,
        corridors: Corridors | None = None,
        load_corridors: CorridorLoader | None = None,
    ) -> None:
        self._broadcast = broadcast
        self._metrics = metrics
        self._stall_timeout_s = stall_timeout_s
        self._max_pairs_per_client = max_pairs_per_client
        self._clients: set[HubClient] = set()
        self._clock = clock
        # Told when rates are handed to clients, and once a poll cycle's end has been (app.live.gc_pacing).
        self._on_rates, self._on_cycle_end = on_rates, on_cycle_end
        self._store = store
        self.corridors = corridors if corridors is not None else Corridors()
        self._load_corridors = load_corridors
        self._snapshots = Snapshots(store, stale_after_s=stale_after_s, clock=clock, corridors=self.corridors)
        self._latest_seq = 0
        # The highest seq of each pair seen (in an event or a snapshot): an update below it is old news.
        self._pair_seqs: dict[Pair, int] = {}
        self._seen_snapshot: Snapshot | None = None
        self._delivered = Delivered()
        self._closing_code: int | None = None  # once shutting down, the code every connection is closed with
        # Shared by every client; emptied at each stored event, after which few clients are due the same as before.
        self._batches: Batches = {}

    @property
    def version(self) -> int:
        """Bumped by every change any process announces (with the store's, what derived views depend on)."""
        return self._snapshots.version

    @property
    def epoch(self) -> str:
        """The deployment's epoch (docs/design.md, "Sequence numbers")."""
        return self._store.epoch

    @property
    def latest_seq(self) -> int:
        """The highest sequence number this process has seen stored, in an event or a snapshot read.

        Not a promise that every lower one has reached its clients: events from two processes may arrive out of
        their order (docs/design.md, "Sequence numbers").
        """
        return self._latest_seq

    def count_slow_closed(self) -> None:
        self._metrics.websocket_slow_closed.inc()

    def join(self) -> HubClient:
        """A new client; whatever arrives before its first snapshot waits behind that snapshot."""
        client = HubClient(self._batches, max_pairs=self._max_pairs_per_client)
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

    async def snapshot(self) -> Snapshot:
        """Every stored rate, read from the database at most once a second while nothing changes."""
        snapshot = await self._snapshots.get()
        if snapshot is not self._seen_snapshot:
            self._seen_snapshot = snapshot
            self._latest_seq = max(self._latest_seq, snapshot.seq)
            seqs = self._pair_seqs
            for rate in snapshot.rates:
                if rate.seq > seqs.get(rate.pair, 0):
                    seqs[rate.pair] = rate.seq
        return snapshot

    async def load_corridors(self) -> None:
        """Every corridor and override, as the database holds them (start-up, and after a resync)."""
        if self._load_corridors is not None:
            corridors, overrides = await self._load_corridors()
            self.corridors.load(corridors, overrides)
            self._snapshots.invalidate()

    def corridor_changed(self, message: str) -> None:
        """A corridor event this process published: applied now, before the operator's answer goes out, so no
        answer of this process shows the state before it (its copy from the channel is skipped)."""
        self._delivered.add(message)
        event = read_event(message)
        if isinstance(event, CorridorEvent):
            self._apply_corridor(event.change)

    async def publish(self, message: str) -> None:
        """A corridor event, to every other process (this one applied it already: `corridor_changed`)."""
        try:
            await self._broadcast.publish(RATES_CHANNEL, message)
        except Exception as error:
            # Stored already: the others read it from the database when they next start or resync.
            self._metrics.publish_errors.inc()
            log.warning("could not publish a corridor event: %s", error)

    def _apply_corridor(self, change: CorridorChanged) -> None:
        source, _, destination = change.pair.partition("/")
        pair = Pair(source, destination)
        corridor = Corridor(State(change.state), change.reason, change.since, change.by)
        self.corridors.set(pair, corridor, change.override_until)
        # Every answer and snapshot derived before is out of date (the answer cache reads `version`).
        self._snapshots.invalidate()
        if not change.notify:
            return
        frame = Outgoing(change.frame().model_dump_json())
        failed: list[tuple[HubClient, Exception]] = []
        for client in list(self._clients):
            try:
                client.tell(pair, frame)
            except Exception as error:
                failed.append((client, error))
        if failed:
            self._drop(failed)

    async def stored_pairs(self) -> Collection[Pair]:
        """Every pair stored now, as the snapshot tells."""
        return (await self._snapshots.get()).values.keys()

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
        asyncio.get_running_loop().call_soon(self._deliver_now, message)

    def _deliver_now(self, message: str) -> None:
        try:
            event = read_event(message)
            if isinstance(event, Stored | CycleEnded):
                self.fan_out(event)
        except Exception:
            log.exception("could not fan out an event")

    async def _listen(self) -> None:
        async with self._broadcast.subscribe(RATES_CHANNEL) as subscriber:
            while True:
                message = (await subscriber.get()).message
                if self._delivered.take(message):
                    continue
                try:
                    event = read_event(message)
                    if isinstance(event, Resynced):
                        await self.resync()
                    elif isinstance(event, CorridorEvent):
                        self._apply_corridor(event.change)
                    elif event is not None:
                        self.fan_out(event)
                except Exception:
                    log.exception("could not fan out an event")

    async def _watch(self) -> None:
        """Once a second (or sooner for a short timeout): cut off stalled clients, count the frames sent."""
        period_s = min(1.0, self._stall_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            self.check_stalled()
            self._count_frames(self._clients)

    def check_stalled(self) -> None:
        """Cut off every client whose send has been blocked for the stall timeout."""
        now, timeout_s = self._clock(), self._stall_timeout_s
        for client in self._clients:
            if client.stalled(now, timeout_s):
                client.cut_off()

    def _count_frames(self, clients: Iterable[HubClient]) -> None:
        sent = 0
        for client in clients:
            sent += client.count_sent()
        if sent:
            self._metrics.websocket_frames_sent.inc(sent)

    async def resync(self) -> None:
        """The channel was away: whatever changed meanwhile reaches every client as a fresh snapshot."""
        try:
            await self.load_corridors()
        except Exception:
            # The database is away too: the corridors stay as this process last knew them.
            log.warning("could not read the corridors again after a resync", exc_info=True)
        self._snapshots.resync()
        snapshot = await self.snapshot()
        for client in list(self._clients):
            client.send_snapshot(snapshot)

    def fan_out(self, event: Stored | CycleEnded) -> None:
        """Hand an event to every client, each failing client apart (see `_drop`)."""
        if isinstance(event, Stored):
            self._on_rates()  # first: the collector is paced before the fan-out allocates (app.live.gc_pacing)
            self._fan_out_updates([Update(update) for update in event.updates])
        else:
            self._fan_out_cycle_end(Outgoing(event.frame))

    def _fan_out_updates(self, updates: list[Update]) -> None:
        self._snapshots.announce(update.stored for update in updates)
        updates = self._newer(updates)
        if not updates:
            return
        self._batches.clear()
        conflated = 0
        failed: list[tuple[HubClient, Exception]] = []
        for client in list(self._clients):
            try:
                conflated += client.offer(updates)
            except Exception as error:
                failed.append((client, error))
        if conflated:
            self._metrics.websocket_updates_conflated.inc(conflated)
        if failed:
            self._drop(failed)

    def _newer(self, updates: list[Update]) -> list[Update]:
        """Those of `updates` newer than anything seen of their pair. Two replicas' events may arrive out of the
        order stored (docs/design.md, "Sequence numbers"): a client never goes back to an older value."""
        seqs, newer = self._pair_seqs, []
        for update in updates:
            if update.seq > seqs.get(update.pair, 0):
                seqs[update.pair] = update.seq
                newer.append(update)
        if newer:
            self._latest_seq = max(self._latest_seq, max(update.seq for update in newer))
        return newer

    def _fan_out_cycle_end(self, frame: Outgoing) -> None:
        failed: list[tuple[HubClient, Exception]] = []
        for client in list(self._clients):
            try:
                client.push(frame)
            except Exception as error:
                failed.append((client, error))
        if failed:
            self._drop(failed)
        self._on_cycle_end()

    def _drop(self, failed: list[tuple[HubClient, Exception]]) -> None:
        """End clients that failed while being handed an event: such a client is gone (a write to a connection
        closing under uvloop raises), and must not keep the event from the clients after it. Out of the hub at
        once, so each is logged once."""
        for client, _ in failed:
            self.leave(client)
            client.drop()
        log.warning(
            "%d websocket client(s) failed while being handed an event; ended", len(failed), exc_info=failed[0][1]
        )
