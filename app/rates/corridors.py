"""Corridor control: what operators decided about each pair, and what that means for fetching and serving.

Plain decisions over plain values, tested in-process (tests/test_corridors_rules.py); the database holds the
truth (tables `corridors` and `rate_overrides`), and every process keeps this map of it, read at start-up and on
a resync, and updated by the `corridor_changed` events on the rate channel (app.live.fanout).

A pair without an entry is `active`. `paused`: not fetched (poller, on-demand, refresh), its last rate still
served, marked. `withheld`: not fetched and not served. An active override (a manual rate until it expires) is
not replaced by fetched values: its pair is not fetched until it expires or is ended (docs/operations.md,
"Corridors").
"""

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from app.currencies import Pair
from app.errors import Withheld


class State(enum.StrEnum):
    active = "active"
    paused = "paused"
    withheld = "withheld"


@dataclass(frozen=True, slots=True)
class Corridor:
    """A pair's state, why, since when and by whose key (its name)."""

    state: State
    reason: str
    since: datetime
    by: str


@dataclass(frozen=True, slots=True)
class Mark:
    """What a served rate of a pair that is not active carries: REST `meta.corridor`, the rate item's `corridor`."""

    state: State
    reason: str
    since: datetime


class Corridors:
    """This process's view of every pair's corridor and override; only `set` and `load` change it."""

    def __init__(self) -> None:
        self._corridors: dict[Pair, Corridor] = {}
        self._overrides: dict[Pair, datetime] = {}  # pair -> when its override expires
        self.version = 0  # bumped by every change, so derived views (answers, snapshots) know they are old

    def load(self, corridors: dict[Pair, Corridor], overrides: dict[Pair, datetime]) -> None:
        """Everything, as the database holds it now (start-up, resync)."""
        self._corridors = {pair: c for pair, c in corridors.items() if c.state is not State.active}
        self._overrides = dict(overrides)
        self.version += 1

    def set(self, pair: Pair, corridor: Corridor | None, override_until: datetime | None) -> State:
        """One pair's corridor and override as now stored; returns its state before."""
        before = self.state(pair)
        if corridor is None or corridor.state is State.active:
            self._corridors.pop(pair, None)
        else:
            self._corridors[pair] = corridor
        if override_until is None:
            self._overrides.pop(pair, None)
        else:
            self._overrides[pair] = override_until
        self.version += 1
        return before

    def corridor(self, pair: Pair) -> Corridor | None:
        """None while active."""
        return self._corridors.get(pair)

    def state(self, pair: Pair) -> State:
        corridor = self._corridors.get(pair)
        return State.active if corridor is None else corridor.state

    def overridden(self, pair: Pair, now: datetime) -> bool:
        """An override of the pair is in force at `now`."""
        until = self._overrides.get(pair)
        return until is not None and now < until

    def may_fetch(self, pair: Pair, now: datetime) -> bool:
        """Whether the upstream may be asked for the pair now: active, and no override in force."""
        return pair not in self._corridors and not self.overridden(pair, now)

    def check_served(self, pair: Pair) -> None:
        """Raises `Withheld` for a pair that is not to be served."""
        corridor = self._corridors.get(pair)
        if corridor is not None and corridor.state is State.withheld:
            raise Withheld(f"{pair} is withheld by the operator and not served now: {corridor.reason}")

    def served(self, pair: Pair) -> bool:
        return self.state(pair) is not State.withheld

    def mark(self, pair: Pair) -> Mark | None:
        """What a served rate of the pair is marked with; None while active (the field is then absent)."""
        corridor = self._corridors.get(pair)
        return None if corridor is None else Mark(corridor.state, corridor.reason, corridor.since)

    def fetchable(self, pairs: Iterable[Pair], now: datetime) -> list[Pair]:
        return [pair for pair in pairs if self.may_fetch(pair, now)]

    def counts(self) -> dict[State, int]:
        """Pairs paused and withheld (active ones are every other stored pair)."""
        counts = dict.fromkeys(State, 0)
        for corridor in self._corridors.values():
            counts[corridor.state] += 1
        return counts
