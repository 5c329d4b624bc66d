"""One connected WebSocket client, as the hub sees it: what it follows, what waits for it, what it was last sent.

What a client has not taken yet waits in its own queue, conflated per pair
(docs/websocket.md): a newer update for a pair replaces the queued one, so a
slow client costs memory bounded by the number of pairs, never by time, and a
client that catches up gets each pair's newest value. Its replies cannot be
conflated, so they are bounded by count instead: a client that keeps asking
and never reads the answers is cut off, as is one the hub finds stalled on a
send (`stalled`; the endpoint closes either with 1013).

A client with nothing waiting whose connection takes bytes has an event's
frames written at once, in one write, without waking its sender task (most of
a push's cost per client: docs/performance.md); anything else waits in the
queue for the sender, which takes it in order (`take`, then `sending` and
`sent` around the write).

Everything that changes a client is a method here: the endpoint
(app.api.ws) and the hub only call them.
"""

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from app.currencies import Pair
from app.limits.websocket import MAX_PAIRS_PER_CLIENT
from app.live.frames import Deflate, Outgoing
from app.live.snapshots import Snapshot
from app.rates.wire import RatesUpdateItem, RateUpdate, rates_update_frame

# Replies to one client's own requests that may wait unread before it is cut off.
MAX_QUEUED_REPLIES = 256
# The key under which a client's pending end-of-cycle event waits: only the newest one matters.
_CYCLE = "all_rates_update"
# Likewise its pending heartbeat.
_HEARTBEAT = "heartbeat"

# `rates_update` frames already built, shared by a hub's clients: those due the same updates share one.
Batches = dict[tuple["Update", ...], Outgoing]


class Update:
    """One stored rate, serialised once for every client in both shapes."""

    __slots__ = ("as_of", "frame", "item", "pair", "seq", "stamp", "stored", "value")

    def __init__(self, update: RateUpdate) -> None:
        rate = update.rate
        self.pair = Pair(rate.source_currency, rate.destination_currency)
        self.value = rate.destination_per_source
        self.stamp: datetime = rate.last_updated
        self.seq = update.seq
        self.frame = Outgoing(update.model_dump_json())
        self.item = RatesUpdateItem.of_update(update).model_dump_json()
        self.as_of = '"' + rate.model_dump(mode="json", include={"last_updated"})["last_updated"] + '"'
        # As a stored rate (it was published once stored): what a snapshot holds while the database is away.
        self.stored = update.stored()


class _Reply:
    """An answer to the client's own request; `pair` and `value` when it tells the client a rate."""

    __slots__ = ("frame", "pair", "value")

    def __init__(self, frame: Outgoing, pair: Pair | None, value: Decimal | None) -> None:
        self.frame, self.pair, self.value = frame, pair, value


class TooManyPairs(Exception):
    """A subscribe that would have a client follow more pairs than it may (docs/limits.md); nothing changed."""

    def __init__(self, following: int, limit: int) -> None:
        super().__init__(
            f"A client may be subscribed to at most {limit} pairs at once; this would make {following}. "
            'Unsubscribe from some first, or subscribe to "*" (every pair).'
        )
        self.following, self.limit = following, limit


class HubClient:
    """One connected client: what it subscribed to, what it was last sent, and what waits for it."""

    def __init__(
        self,
        batches: Batches | None = None,
        max_replies: int = MAX_QUEUED_REPLIES,
        max_pairs: int = MAX_PAIRS_PER_CLIENT,
    ) -> None:
        self._max_pairs = max_pairs
        self._pairs: set[Pair] | None = None  # None: every pair
        self._min_change_bps = Decimal(0)
        self._subscribed_once = False
        self._batch = False
        self._close_code: int | None = None
        # Set when the connection is to end: the service closes it (see Hub.close_all), it is cut off for not
        # reading (`slow`), or it failed under a write. One event, so the endpoint watches all with one task (each
        # costs memory per client).
        self._ending = asyncio.Event()
        self._slow = False
        self._sending_since: float | None = None  # when the frame being sent now was handed over (see `sending`)
        self._frames_sent = 0  # since the hub last counted them
        self._active_at = 0.0  # when the hub last found it had been sent a frame (see `count_sent`)
        # The connection's "write these bytes now if you can take them" (app.live.protocol), once attached, and how
        # its frames are compressed; None under a server without it: everything then goes through the queue and
        # the sender.
        self._write_now: Callable[[bytes], bool] | None = None
        self._deflate: Deflate | None = None
        # In send order: updates under their Pair, replies under an int, the end-of-cycle event under _CYCLE.
        self._queue: dict[object, Update | _Reply | Outgoing] = {}
        self._batches: Batches = {} if batches is None else batches
        self._ready = asyncio.Event()
        self._reply_keys = itertools.count()
        self._replies = 0
        self._max_replies = max_replies
        self._snapshot_sent = False
        self._sent_base: dict[Pair, Decimal] = {}  # a snapshot's values, shared with other clients, never written
        self._sent: dict[Pair, Decimal] = {}

    # What it follows.

    @property
    def pairs(self) -> frozenset[Pair] | None:
        """The pairs it follows; None: every pair."""
        return None if self._pairs is None else frozenset(self._pairs)

    @property
    def min_change_bps(self) -> Decimal:
        return self._min_change_bps

    def subscribe(self, pairs: Collection[Pair] | None, min_change_bps: Decimal | None, batch: bool | None) -> None:
        """Follow `pairs` (None: every pair), and take the settings given (None: as they were).

        The first subscribe narrows the default "everything" to `pairs`; later ones add to what it follows.
        Raises `TooManyPairs`, changing nothing, when it would then follow more than its `max_pairs` ("*" is one).
        """
        if pairs is None or (self._pairs is None and not self._subscribed_once):
            following = None if pairs is None else set(pairs)
        elif self._pairs is not None:
            following = self._pairs | set(pairs)
        else:
            following = None  # every pair already: naming some adds nothing
        # Past the cap only by growing: one left above it by unsubscribing from "*" may still name pairs it follows.
        if following is not None and len(following) > max(self._max_pairs, len(self._pairs or ())):
            raise TooManyPairs(len(following), self._max_pairs)
        self._pairs = following
        self._subscribed_once = True
        if min_change_bps is not None:
            self._min_change_bps = min_change_bps
        if batch is not None:
            self._batch = batch

    async def unsubscribe(
        self, pairs: Collection[Pair] | None, stored_pairs: Callable[[], Awaitable[Collection[Pair]]]
    ) -> None:
        """Stop following `pairs` (None: every pair), and forget their updates waiting.

        A client following every pair is left following every pair stored now (`stored_pairs`) but those.
        """
        if pairs is None:
            self._pairs = set()
        else:
            current = self._pairs if self._pairs is not None else set(await stored_pairs())
            self._pairs = current - set(pairs)
        self._forget(pairs)
        self._subscribed_once = True

    def _forget(self, pairs: Collection[Pair] | None) -> None:
        """Drop queued updates of `pairs` (None: every pair)."""
        for key in [key for key, entry in self._queue.items() if type(entry) is Update]:
            if pairs is None or key in pairs:
                del self._queue[key]

    # Its connection.

    def attach(self, write_now: Callable[[bytes], bool], deflate: Deflate | None) -> None:
        """The connection's writer of framed bytes that never waits, and how its frames are compressed: from now
        on, frames for an idle client are written at once."""
        self._write_now, self._deflate = write_now, deflate

    def sending(self, now: float) -> None:
        """The sender handed a frame to the connection at `now` (monotonic): it is stalled while that lasts."""
        self._sending_since = now

    def sent(self) -> None:
        """The frame handed over is written."""
        self._sending_since = None
        self._frames_sent += 1

    def stalled(self, now: float, timeout_s: float) -> bool:
        """True when a send has been blocked for `timeout_s` or more."""
        since = self._sending_since
        return since is not None and now - since >= timeout_s

    def count_sent(self, now: float | None = None) -> int:
        """The frames sent since it was last asked; with `now`, it was last sent one then if any."""
        sent, self._frames_sent = self._frames_sent, 0
        if sent and now is not None:
            self._active_at = now
        return sent

    def joined(self, now: float) -> None:
        """Connected at `now`: quiet from then on until it is sent something."""
        self._active_at = now

    def quiet_for(self, now: float) -> float:
        """How long it has been sent nothing, as the hub last counted (to within its watchdog's period)."""
        return now - self._active_at

    def heartbeat(self, frame: Outgoing, now: float) -> None:
        """Send a heartbeat (behind whatever waits: its `seq` promises what came before it); an older one still
        waiting is replaced. Quiet again from `now`."""
        self._active_at = now
        if self._wrote_now(frame):
            self._frames_sent += 1
            return
        self._queue.pop(_HEARTBEAT, None)
        self._queue[_HEARTBEAT] = frame
        self._ready.set()

    # Its end.

    @property
    def close_code(self) -> int | None:
        """The code to close the connection with once it ends; None: no close frame."""
        return self._close_code

    @property
    def slow(self) -> bool:
        """Cut off for not reading."""
        return self._slow

    def ended(self) -> Coroutine[Any, Any, Literal[True]]:
        """Done once the connection is to end (`close`, `cut_off`, `drop`)."""
        return self._ending.wait()

    def close(self, code: int) -> None:
        """To be closed with `code`."""
        self._close_code = code
        self._ending.set()

    def cut_off(self) -> None:
        """To be closed for not reading: the endpoint closes it with 1013."""
        self._slow = True
        self._ending.set()

    def drop(self) -> None:
        """Its connection failed under a write: ended, with nothing more written to it at once."""
        self._write_now = None
        self._ending.set()

    # What it is sent.

    def last_sent(self, pair: Pair) -> Decimal | None:
        return self._sent.get(pair, self._sent_base.get(pair))

    def send_snapshot(self, snapshot: Snapshot, *, resumed: bool | None = None) -> None:
        """Send a snapshot (the first goes before anything waiting); `resumed=False` marks the answer to a resume
        that could not be answered exactly."""
        self._sent_base, self._sent = snapshot.values, {}
        reply = _Reply(snapshot.not_resumed if resumed is False else snapshot.frame, None, None)
        if self._snapshot_sent:
            self._put_reply(reply)
            return
        # The first snapshot goes before any update that arrived while it was read.
        self._snapshot_sent = True
        self._queue = {next(self._reply_keys): reply, **self._queue}
        self._replies += 1
        self._ready.set()

    def send_resumed(self, frame: Outgoing, values: dict[Pair, Decimal]) -> None:
        """Send a `resumed` frame first, in place of the first snapshot. It holds every update that reached this
        client before it (the hub answered a resume from what it knew, those included), so those are dropped."""
        self._sent_base, self._sent = values, {}
        self._forget(None)
        self._snapshot_sent = True
        self._queue = {next(self._reply_keys): _Reply(frame, None, None), **self._queue}
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
            self._frames_sent += 1
            return
        self._queue.pop(_CYCLE, None)
        self._queue[_CYCLE] = frame
        self._ready.set()

    def tell(self, pair: Pair, frame: Outgoing) -> None:
        """A `corridor` frame about `pair`, if this client follows it; a newer one for the pair replaces one
        still queued, and goes behind the updates queued before it."""
        if self._pairs is not None and pair not in self._pairs:
            return
        if self._wrote_now(frame):
            self._frames_sent += 1
            return
        key = ("corridor", pair)
        self._queue.pop(key, None)
        self._queue[key] = frame
        self._ready.set()

    def offer(self, updates: Iterable[Update]) -> int:
        """Send or queue the updates this client wants and whose move is big enough for it; how many replaced
        one queued."""
        queue, pairs, threshold = self._queue, self._pairs, self._min_change_bps
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
        if self._batch:
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
        self._frames_sent += frames
        return True

    def _wrote_now(self, *frames: Outgoing) -> bool:
        # Only when the sender is idle with nothing queued (so order is kept: the snapshot first, replies in
        # turn) and the connection is not pushing back: then the write is the one a woken sender would make
        # (all the frames in one), without waking it. Otherwise the frames wait in the queue, conflated, for
        # the sender.
        if self._write_now is None or not self._snapshot_sent or self._queue or self._sending_since is not None:
            return False
        deflate = self._deflate
        wire = frames[0].wire(deflate) if len(frames) == 1 else b"".join(frame.wire(deflate) for frame in frames)
        return self._write_now(wire)

    async def take(self) -> Outgoing:
        """The next frame to send: a reply or event alone, or (in batch mode) every update queued before it."""
        queue = self._queue
        while not queue:
            self._ready.clear()
            await self._ready.wait()
        key = next(iter(queue))
        entry = queue[key]
        if type(entry) is Update:
            if self._batch:
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
            seq = max(update.seq for update in updates)
            frame = self._batches[updates] = Outgoing(rates_update_frame(items, newest.as_of, seq))
        return frame
