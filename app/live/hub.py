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
from decimal import Decimal

from broadcaster import Broadcast

from app.currencies import Pair
from app.errors import DatabaseUnavailable
from app.kit.metrics import Metrics
from app.limits.websocket import MAX_PAIRS_PER_CLIENT
from app.live.client import Batches, HubClient, Update
from app.live.fanout import RATES_CHANNEL, CorridorEvent, CycleEnded, Delivered, Resynced, Stored, read_event
from app.live.frames import Outgoing
from app.live.recent import RecentStores
from app.live.snapshots import Snapshot, Snapshots, StoredRates
from app.rates.corridors import Corridor, Corridors, State
from app.rates.store import utc_now
from app.rates.wire import CorridorChanged, Heartbeat, RateItem, RatesUpdateItem, Resumed

# What the database holds of every corridor and override (a replica that starts or resyncs reads them).
CorridorLoader = Callable[[], Awaitable[tuple[dict[Pair, Corridor], dict[Pair, datetime]]]]

log = logging.getLogger(__name__)

ALL = "*"


class Resumption:
    """A `resumed` frame, shared by every client resuming from the same seq at the same moment."""

    __slots__ = ("count", "frame", "seq", "values")

    def __init__(self, frame: Outgoing, values: dict[Pair, Decimal], seq: int, count: int) -> None:
        self.frame = frame
        self.values = values  # each pair's value as the client holds it after applying the frame; never written
        self.seq = seq
        self.count = count  # the pairs it tells


def _seq_of(text: str | None) -> int | None:
    """A resume point as sent: a non-negative integer in decimal, or None."""
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    return int(text)


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
        heartbeat_s: float = 25.0,
        visible: Callable[[Pair], bool] | None = None,
        resume_wait_s: float = 1.0,
        gap_timeout_s: float = 2.0,
        recent: RecentStores | None = None,
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
        self._corridors_pending = False  # not read yet: the database was away when they were to be
        self._snapshots = Snapshots(store, stale_after_s=stale_after_s, clock=clock, corridors=self.corridors)
        self._latest_seq = 0
        # The highest seq of each pair seen in an event: an update below it is old news.
        self._pair_seqs: dict[Pair, int] = {}
        self._seen_snapshot: Snapshot | None = None
        self._delivered = Delivered()
        self._closing_code: int | None = None  # once shutting down, the code every connection is closed with
        # Shared by every client; emptied at each stored event, after which few clients are due the same as before.
        self._batches: Batches = {}
        self._heartbeat_s = heartbeat_s
        # Asked of every pair a resume would tell: a pair withheld by an operator is left out (docs/design.md).
        self._visible = visible if visible is not None else self.corridors.served
        self._resume_wait_s = resume_wait_s
        self._gap_timeout_s = gap_timeout_s
        self._recent = RecentStores() if recent is None else recent
        self._advanced = asyncio.Event()  # set, and replaced, each time the watermark rises
        self._resumes: tuple[tuple[int, int, int, int], Resumption] | None = None  # the last answered, shared

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

    @property
    def watermark(self) -> int:
        """Every store numbered up to it has reached this process's clients (the contiguous prefix seen)."""
        return self._recent.watermark

    def count_slow_closed(self) -> None:
        self._metrics.websocket_slow_closed.inc()

    def join(self) -> HubClient:
        """A new client; whatever arrives before its first snapshot waits behind that snapshot."""
        client = HubClient(self._batches, max_pairs=self._max_pairs_per_client)
        client.joined(self._clock())
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
        if self._corridors_pending and not snapshot.held:
            await self.load_corridors()  # the database answers again: the states first, then a snapshot by them
            snapshot = await self._snapshots.get()
        if snapshot is not self._seen_snapshot:
            self._seen_snapshot = snapshot
            if not snapshot.held and (not self._recent.seeded or self._gap_overdue()):
                self._recent.seed(snapshot.rates, snapshot.seq, self._clock())
                self._watermark_rose()
            self._latest_seq = max(self._latest_seq, snapshot.seq)
            # A snapshot's seqs are not taken as seen: its read may show a store before that store's event
            # arrives, and the event must still reach every client connected before the snapshot was read.
        return snapshot

    async def load_corridors(self) -> None:
        """Every corridor and override, as the database holds them (start-up, and after a resync).

        While the database is away the process starts all the same (docs/outages.md): they are read with the
        first snapshot the database answers."""
        if self._load_corridors is None:
            return
        try:
            corridors, overrides = await self._load_corridors()
        except DatabaseUnavailable:
            self._corridors_pending = True
            log.warning("corridor states not read: the database is away; read once it answers")
            return
        self._corridors_pending = False
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

    async def resume(self, client: HubClient, epoch: str | None, seq: str | None) -> "Resumption | Snapshot":
        """Hand a client that just joined its first frame, and return it: `resumed` when it asked to resume from
        `epoch` and `seq` (as sent, unparsed) and that can be answered exactly from memory, otherwise the
        snapshot (`resumed: false` in it when a resume was asked). docs/design.md, "Resume".

        No database query per resuming client: a resume from memory reads none, and one that cannot be answered
        gets the shared snapshot. Updates that reached the client before its first frame are in it (or older).
        """
        asked = epoch is not None or seq is not None
        point = _seq_of(seq) if epoch and epoch == self.epoch else None
        if point is not None and point > self._recent.watermark and self._recent.seeded:
            await self._await_watermark(point)  # a client may resume here from a store this process hears of late
        if point is not None and self._recent.answerable(point):
            # From here to handing it over, nothing awaits: no update slips between the answer and the pushes.
            resumption = self._resumption(point)
            client.send_resumed(resumption.frame, resumption.values)
            return resumption
        snapshot = await self.snapshot()
        client.send_snapshot(snapshot, resumed=False if asked else None)
        return snapshot

    async def _await_watermark(self, seq: int) -> None:
        try:
            async with asyncio.timeout(self._resume_wait_s):
                while self._recent.watermark < seq:
                    await self._advanced.wait()
        except TimeoutError:
            pass

    def _watermark_rose(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _resumption(self, seq: int) -> "Resumption":
        recent = self._recent
        # Shared while nothing changes, within a second (its items' `stale` flags, and what `visible` says, age).
        key = (seq, recent.version, self.corridors.version, int(self._clock()))
        if self._resumes is not None and self._resumes[0] == key:
            return self._resumes[1]  # a storm of clients resuming from one seq share one frame
        now = utc_now()
        corridors = self.corridors
        items = [
            RatesUpdateItem(
                **dict(
                    RateItem.of(
                        change.rate,
                        stale=change.rate.age_s(now) > self._snapshots.stale_after_s,
                        corridor=corridors.mark(change.rate.pair),
                    )
                ),
                previous_rate=change.previous_rate,
                seq=change.rate.seq,
            )
            for change in recent.changes_after(seq, self._visible)
        ]
        frame = Resumed(epoch=self.epoch, seq=recent.watermark, rates=items).model_dump_json()
        resumption = Resumption(Outgoing(frame), recent.values(), recent.watermark, len(items))
        self._resumes = (key, resumption)
        return resumption

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
        """Once a second (or sooner for a short timeout or heartbeat): cut off stalled clients, count the frames
        sent, send heartbeats, and close a gap in the stores heard of that stayed open too long."""
        period_s = min(1.0, self._stall_timeout_s / 4, self._heartbeat_s / 4)
        while True:
            await asyncio.sleep(period_s)
            self.check_stalled()
            self.tick()
            if self._gap_overdue():
                await self._close_gap()

    def tick(self) -> None:
        """Count the frames sent, and send a heartbeat to every client sent nothing for the heartbeat interval:
        one frame, built once, through each client's own path (written at once, or queued behind its frames)."""
        now, interval_s = self._clock(), self._heartbeat_s
        sent = 0
        beat: Outgoing | None = None
        for client in self._clients:
            sent += client.count_sent(now)
            if client.quiet_for(now) >= interval_s:
                if beat is None:
                    beat = Outgoing(Heartbeat(epoch=self.epoch, seq=self._recent.watermark).model_dump_json())
                try:
                    client.heartbeat(beat, now)
                except Exception:
                    log.exception("could not send a heartbeat")
        if sent:
            self._metrics.websocket_frames_sent.inc(sent)

    def _gap_overdue(self) -> bool:
        since = self._recent.gap_since
        return since is not None and self._clock() - since >= self._gap_timeout_s

    async def _close_gap(self) -> None:
        """A store heard of by number only (its event lost, or far behind): start again from the database, which
        holds it. Resumes from below the snapshot read then get a snapshot."""
        log.warning("a store event did not arrive in %.0f s; reading every rate again", self._gap_timeout_s)
        self._snapshots.resync()
        await self.snapshot()

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
        recent, watermark = self._recent, self._recent.watermark
        recent.record((update.stored for update in updates), self._clock())
        if recent.watermark != watermark:
            self._watermark_rose()
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
