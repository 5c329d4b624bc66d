"""The snapshot of every stored rate that new WebSocket clients, `get_all_rates` and `/api/rates/all` are given.

Read from the database at most once a second while nothing changes, and again
at once after any change: a save in this process (the store's version) or a
change any process announced (`Snapshots.announce`, `Snapshots.resync`). One
read at a time: whoever waits takes the snapshot the reader just built.

While the database cannot be reached, snapshots come from the last one read,
brought up to date with every stored change announced since, each item's
`stale` by its age now (docs/outages.md): new clients still get one.

A snapshot's `seq` is the highest among the rates read: they were read in one
statement, and batches commit in the order of their numbers, so every store
numbered up to it is in them (docs/design.md, "Sequence numbers"). A held one
tells the `seq` of the last one read: announcements from several processes may
arrive out of their order, so the changes announced since may have gaps.
"""

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from app.currencies import Pair
from app.errors import DatabaseUnavailable
from app.live.frames import Outgoing
from app.rates.corridors import Corridors
from app.rates.store import utc_now
from app.rates.wire import AllRates, RateItem
from app.storage.rate import StoredRate

# A snapshot is rebuilt after any change, and at least this often so its `stale` flags stay true.
SNAPSHOT_MAX_AGE_S = 1.0


class StoredRates(Protocol):
    """Where the rates are read from (`app.rates.store.RateStore`)."""

    @property
    def version(self) -> int:
        """Bumped by every save in this process."""
        ...

    @property
    def epoch(self) -> str:
        """The deployment's epoch."""
        ...

    async def all(self) -> list[StoredRate]:
        """Every stored rate; raises `DatabaseUnavailable` while the database is away."""
        ...


class Snapshot:
    """Every stored rate, as read at one moment and as one `all_rates` frame, with the values it tells."""

    def __init__(
        self,
        rates: list[StoredRate],
        frame: str,
        built_at: float,
        versions: tuple[int, int],
        *,
        seq: int,
        held: bool = False,
    ) -> None:
        self.rates = rates
        self.seq = seq  # every store numbered up to it is in `rates`
        self.frame = Outgoing(frame)
        self.values: dict[Pair, Decimal] = {rate.pair: rate.destination_per_source for rate in rates}
        self.built_at = built_at
        self.versions = versions  # (the store's, the announced changes') when the read began
        self.held = held  # True: the last snapshot read, served again because the database is away
        self._not_resumed: Outgoing | None = None

    @property
    def not_resumed(self) -> Outgoing:
        """The same frame with `"resumed": false`: the answer to a resume that could not be answered exactly."""
        if self._not_resumed is None:
            self._not_resumed = Outgoing(self.frame.text[:-1] + ',"resumed":false}')
        return self._not_resumed


class Snapshots:
    """The current snapshot, read again once out of date."""

    def __init__(
        self,
        store: StoredRates,
        *,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        corridors: Corridors | None = None,
    ) -> None:
        self._store = store
        # Withheld pairs are left out of every snapshot, paused ones marked (docs/websocket.md, "Corridors").
        self._corridors = corridors if corridors is not None else Corridors()
        self._stale_after_s = stale_after_s
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._last_read: tuple[list[StoredRate], datetime, int] | None = None  # the database's last answer, when, seq
        self._announced: dict[Pair, StoredRate] = {}  # the newest stored rate of each pair announced on the channel
        self._lock = asyncio.Lock()
        self.version = 0  # bumped by every change any process announces

    def announce(self, rates: Iterable[StoredRate]) -> None:
        """Rates some process stored: the snapshot is out of date, and a held one will tell them."""
        self._snapshot = None
        self.version += 1
        announced = self._announced
        for rate in rates:
            announced[rate.pair] = rate

    def invalidate(self) -> None:
        """Something a snapshot shows other than a rate changed (a corridor): the next one is built afresh."""
        self._snapshot = None
        self.version += 1

    def resync(self) -> None:
        """Changes may have been missed (the channel was away): the next snapshot is read afresh."""
        self._snapshot = None
        self.version += 1

    def _current(self) -> Snapshot | None:
        # Out of date after a save in this process, a change announced by any, or a second.
        current = self._snapshot
        if (
            current is None
            or current.versions != (self._store.version, self.version)
            or self._clock() - current.built_at >= SNAPSHOT_MAX_AGE_S
        ):
            return None
        return current

    async def get(self) -> Snapshot:
        """Every stored rate, read from the database at most once a second while nothing changes."""
        if (current := self._current()) is not None:
            return current
        arrived, built_before = (self._store.version, self.version), self._snapshot
        async with self._lock:
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
                rates, read_at, seq = self._held(now)
                rates = self._served(rates)
                frame = self._frame(rates, read_at, now, seq)
                self._snapshot = Snapshot(rates, frame, built_at, versions, seq=seq, held=True)
                return self._snapshot
            seq = max((rate.seq for rate in rates), default=0)
            self._last_read = (rates, now, seq)
            rates = self._served(rates)
            self._snapshot = Snapshot(rates, self._frame(rates, now, now, seq), built_at, versions, seq=seq)
            return self._snapshot

    def _held(self, now: datetime) -> tuple[list[StoredRate], datetime, int]:
        """The last snapshot read, with every change announced since: all of it was stored."""
        last_rates, read_at, seq = self._last_read or ([], now, 0)
        held = {rate.pair: rate for rate in last_rates}
        for pair, rate in self._announced.items():
            if pair not in held or held[pair].seq < rate.seq:
                held[pair] = rate
        return sorted(held.values(), key=lambda rate: (rate.pair.source, rate.pair.destination)), read_at, seq

    def _served(self, rates: list[StoredRate]) -> list[StoredRate]:
        corridors = self._corridors
        return [rate for rate in rates if corridors.served(rate.pair)]

    def _frame(self, rates: list[StoredRate], read_at: datetime, now: datetime, seq: int) -> str:
        corridors = self._corridors
        items = [
            RateItem.of(rate, stale=rate.age_s(now) > self._stale_after_s, corridor=corridors.mark(rate.pair))
            for rate in rates
        ]
        return AllRates(rates=items, as_of=read_at, epoch=self._store.epoch, seq=seq).model_dump_json()
