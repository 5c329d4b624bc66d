"""Publishing rate events to every process: broadcaster on `redis://` when Redis is set, `memory://` otherwise.

Each event is serialised once, here, whatever the number of listeners, and
each listener parses it once (`read_event`) into a typed event.

The channel (`RATES_CHANNEL`) is internal to the service: every process runs
the same version. A message is one JSON object whose `"type"` names its kind,
read as the discriminator of a union of models (never by the first bytes of
the text):

- `rates_stored` (`RatesStored`): one store batch, committed together: its
  rates' updates in the order stored. Read as `Stored`.
- `all_rates_update` (`AllRatesUpdate`): a poll cycle has ended. Read as
  `CycleEnded`, whose frame is the message's own text, sent to WebSocket
  clients as it is (it is the client frame of docs/websocket.md).
- `corridor_changed` (`CorridorChanged`): an operator changed a pair's
  corridor state or its override (docs/design.md, "Corridors and overrides").
  Read as `CorridorEvent`: every process updates its corridor map, and, when
  the state changed, tells its clients following the pair.
- `resync` (`Resync`): never published. Once Redis is back after an outage,
  this process's backend hands it to its own listeners (`Resynced`): whatever
  they derived from the channel may have missed changes.

A message of any other kind, or malformed, is logged and skipped.
"""

import collections
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from broadcaster import Broadcast
from prometheus_client import Counter
from pydantic import Field, TypeAdapter, ValidationError
from redis.exceptions import RedisError

from app.live.redis_backend import ResilientRedisBackend
from app.rates.corridors import Corridors
from app.rates.store import SaveResult
from app.rates.wire import RESYNC, AllRatesUpdate, CorridorChanged, RateItem, RatesStored, RateUpdate, Resync

log = logging.getLogger(__name__)

RATES_CHANNEL = "fxrates.rates"


@asynccontextmanager
async def create_broadcast(redis_url: str | None) -> AsyncIterator[Broadcast]:
    """`memory://` for one process; with Redis, a backend that reconnects and resynchronises (see redis_backend)."""
    if redis_url is None:
        broadcast = Broadcast("memory://")
    else:
        broadcast = Broadcast(backend=ResilientRedisBackend(redis_url, resync_message=RESYNC))
    async with broadcast:
        yield broadcast


class Fanout:
    """Publishes each event to every process; this process's own listeners are handed it first, directly.

    Handing it over in-process spares this process's clients the round trip
    through Redis and back (each a turn of an event loop that may be busy
    sending to thousands of clients); the copy that comes back from the channel
    is the same text, and listeners skip it (see `Delivered`).
    """

    def __init__(self, broadcast: Broadcast, errors: Counter, corridors: Corridors | None = None) -> None:
        self._broadcast = broadcast
        self._errors = errors
        self._local: list[Callable[[str], None]] = []
        # Each rate item carries its pair's corridor mark, built here once (a paused pair's override).
        self._corridors = corridors if corridors is not None else Corridors()

    def deliver_here(self, listener: Callable[[str], None]) -> None:
        """Hand every event this process publishes to `listener` as well, before it goes out."""
        self._local.append(listener)

    def rates_event(self, results: Sequence[SaveResult]) -> str:
        """One event for a store batch, however many rates it holds, serialised once."""
        # A rate is published the moment it is stored, so it is fresh by definition.
        updates = [
            RateUpdate(
                rate=RateItem.of(result.rate, stale=False, corridor=self._corridors.mark(result.rate.pair)),
                previous_rate=result.previous.rate if result.previous else None,
                seq=result.rate.seq,
            )
            for result in results
        ]
        return RatesStored(updates=updates).model_dump_json()

    def hand_over(self, event: str) -> None:
        """To this process's own listeners, now."""
        for listener in self._local:
            listener(event)

    async def send(self, event: str) -> None:
        """To every other process (and back to this one's channel listeners, who skip it: see `Delivered`)."""
        try:
            await self._broadcast.publish(RATES_CHANNEL, event)
        except (RedisError, OSError) as error:
            # The rate is already stored and cached; only the push is lost, and the next cycle repairs it.
            self._errors.inc()
            log.warning("could not publish an event: %s", error)

    async def publish_cycle(self, update: AllRatesUpdate) -> None:
        event = update.model_dump_json()
        self.hand_over(event)
        await self.send(event)


class Delivered:
    """The events a listener was already handed in-process, so it skips their copies from the channel.

    Bounded: a copy that never comes back (Redis lost it) is forgotten after `size` later events.
    """

    def __init__(self, size: int = 256) -> None:
        self._order: collections.deque[str] = collections.deque()
        self._texts: set[str] = set()
        self._size = size

    def add(self, message: str) -> None:
        self._order.append(message)
        self._texts.add(message)
        if len(self._order) > self._size:
            self._texts.discard(self._order.popleft())

    def take(self, message: str) -> bool:
        """True (once) when `message` was handed over in-process already."""
        if message not in self._texts:
            return False
        self._texts.discard(message)
        return True


@dataclass(frozen=True, slots=True)
class Stored:
    """A store batch: the updates of its rates, in the order stored."""

    updates: list[RateUpdate]


@dataclass(frozen=True, slots=True)
class CycleEnded:
    """A poll cycle has ended; `frame` is its `all_rates_update` frame, as clients get it."""

    frame: str


@dataclass(frozen=True, slots=True)
class CorridorEvent:
    """An operator changed a pair's corridor or override."""

    change: CorridorChanged


@dataclass(frozen=True, slots=True)
class Resynced:
    """The channel is back after an outage: whatever was derived from it may have missed changes."""


Event = Stored | CycleEnded | CorridorEvent | Resynced

_MESSAGE: TypeAdapter[RatesStored | AllRatesUpdate | CorridorChanged | Resync] = TypeAdapter(
    Annotated[RatesStored | AllRatesUpdate | CorridorChanged | Resync, Field(discriminator="type")]
)
_RESYNCED = Resynced()


def read_event(message: str) -> Event | None:
    """The event a channel message carries, by its kind, parsed once; None (logged) for any other message."""
    try:
        parsed = _MESSAGE.validate_json(message)
    except ValidationError as error:
        log.warning("ignoring a message on %s: %s", RATES_CHANNEL, error.errors()[0]["msg"])
        return None
    if isinstance(parsed, RatesStored):
        return Stored(parsed.updates)
    if isinstance(parsed, AllRatesUpdate):
        return CycleEnded(message)
    if isinstance(parsed, CorridorChanged):
        return CorridorEvent(parsed)
    return _RESYNCED


async def follow_rate_updates(
    broadcast: Broadcast, on_update: Callable[[RateUpdate], None], on_resync: Callable[[], None]
) -> None:
    """Hand every rate update any process publishes to `on_update`, and a fan-out comeback to `on_resync`."""
    async with broadcast.subscribe(RATES_CHANNEL) as subscriber:
        while True:
            event = read_event((await subscriber.get()).message)
            if isinstance(event, Resynced):
                on_resync()
            elif isinstance(event, Stored):
                for update in event.updates:
                    on_update(update)
