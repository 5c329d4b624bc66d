"""What this process knows of the recent stores, to answer a resume from memory (docs/design.md, "Resume").

Seeded from a snapshot read from the database (every store numbered up to its
`seq` is in it), then told every store event as it arrives. It keeps, per pair,
the value as of its `floor` and every store above it, so it can tell the value
of any pair as of any `seq` from the floor up, and which pairs changed after it.

Events from several processes may arrive out of their order, and one may be
lost; numbers have no gaps, so the `watermark` is the contiguous prefix seen:
every store numbered up to it is known here. A resume is answered only up to
it. A gap that stays open past a bound is closed by seeding again from a fresh
snapshot (the hub does that), which raises the floor.

Bounded: past `max_entries` stores kept, the floor rises and the oldest are
folded into the per-pair values as of the floor. A plain object: no clock, no
I/O; the hub calls it.
"""

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal

from app.currencies import Pair
from app.storage.rate import StoredRate

MAX_ENTRIES = 20_000


@dataclass(frozen=True, slots=True)
class Change:
    """A pair that changed after the resume point: its newest value, and its `rate` as of that point."""

    rate: StoredRate
    previous_rate: Decimal | None


class RecentStores:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        self._seeded = False
        self.floor = 0  # a resume from at least this is answered exactly
        self.watermark = 0  # every store numbered up to it is known here
        self._base: dict[Pair, StoredRate] = {}  # each pair's value as of the floor
        self._entries: dict[Pair, list[StoredRate]] = {}  # each pair's stores above the floor, by seq
        self._count = 0
        self._above: set[int] = set()  # seqs seen above the watermark (past a gap)
        self.gap_since: float | None = None  # when the watermark last stopped short of a seq seen (a gap)
        self.version = 0  # bumped by every change to what is held

    @property
    def seeded(self) -> bool:
        return self._seeded

    @property
    def highest(self) -> int:
        """The highest seq known here (above the watermark while a gap is open)."""
        return max(self._above, default=self.watermark)

    def seed(self, rates: Iterable[StoredRate], seq: int, now: float) -> None:
        """Start again from a snapshot read from the database: every store up to `seq` is in `rates`."""
        if self._seeded and seq <= self.watermark:
            return  # nothing new: what is known already reaches past it
        base = {rate.pair: rate for rate in rates}
        kept: dict[Pair, list[StoredRate]] = {}
        for pair, entries in self._entries.items():
            above = [rate for rate in entries if rate.seq > seq]
            if above:
                kept[pair] = above
        self._base, self._entries = base, kept
        self._count = sum(len(entries) for entries in kept.values())
        self.floor = seq
        self._above = {s for s in self._above if s > seq}
        self.watermark = seq
        self._seeded = True
        self.version += 1
        self._advance(now)

    def record(self, rates: Iterable[StoredRate], now: float) -> None:
        """Stores some process announced, in whatever order they arrive; known ones and those below the floor
        (already in the snapshot seeded from) are ignored."""
        if not self._seeded:
            return
        for rate in rates:
            seq = rate.seq
            if seq <= self.floor or seq in self._above or seq <= self.watermark:
                continue
            entries = self._entries.setdefault(rate.pair, [])
            if not entries or entries[-1].seq < seq:
                entries.append(rate)
            else:
                bisect.insort(entries, rate, key=lambda stored: stored.seq)
            self._count += 1
            self._above.add(seq)
            self.version += 1
        self._advance(now)
        if self._count > self._max_entries:
            self._raise_floor()

    def _advance(self, now: float) -> None:
        above, watermark = self._above, self.watermark
        while watermark + 1 in above:
            watermark += 1
            above.discard(watermark)
        self.watermark = watermark
        if not above:
            self.gap_since = None
        elif self.gap_since is None:
            self.gap_since = now

    def _raise_floor(self) -> None:
        """Fold the oldest half of what is kept into the values as of a higher floor."""
        floor = max(self.floor, self.watermark - self._max_entries // 2)
        if floor <= self.floor:
            return
        count = 0
        for pair, entries in list(self._entries.items()):
            cut = bisect.bisect_right(entries, floor, key=lambda stored: stored.seq)
            if cut:
                self._base[pair] = entries[cut - 1]
                del entries[:cut]
            if not entries:
                del self._entries[pair]
            count += len(entries)
        self._count, self.floor = count, floor

    def answerable(self, seq: int) -> bool:
        """True when a resume from `seq` can be answered exactly now."""
        return self._seeded and self.floor <= seq <= self.watermark

    def changes_after(self, seq: int, visible: Callable[[Pair], bool]) -> list[Change]:
        """Every pair stored after `seq` (known here, the watermark's gaps aside): its newest value, and its
        `rate` as of `seq` (None: not stored then). Pairs not `visible` (withheld) left out."""
        changes = []
        for pair, entries in self._entries.items():
            if entries[-1].seq <= seq or not visible(pair):
                continue
            cut = bisect.bisect_right(entries, seq, key=lambda stored: stored.seq)
            before = entries[cut - 1] if cut else self._base.get(pair)
            changes.append(Change(entries[-1], before.rate if before is not None else None))
        changes.sort(key=lambda change: change.rate.seq)
        return changes

    def values(self) -> dict[Pair, Decimal]:
        """Each pair's newest value known here."""
        values = {pair: rate.destination_per_source for pair, rate in self._base.items()}
        for pair, entries in self._entries.items():
            values[pair] = entries[-1].destination_per_source
        return values
