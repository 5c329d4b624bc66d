"""The rate guard: whether a fetched value is stored, or held for confirmation (docs/operations.md, "The rate guard").

A plain decision over plain values, no I/O: the store's batch writer (app.rates.store.write_batch) asks it for each
fetched quote, with what the transaction read of the pair (its stored value and the value held, if any), and writes
what it answers. Values are `destination_per_source`; the stored one is the last *fetched* value stored.

Bounds are compared exactly, in decimals: a move of exactly `bps` basis points is within the guard.
"""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

BPS = Decimal(10_000)
MOVE_PLACES = Decimal("0.01")


class Verdict(StrEnum):
    """What became of a fetched value."""

    first = "first"
    """The pair's first value: stored, not guarded."""
    stored = "stored"
    """Within the guard of the stored value (or the guard is off): stored; a value held before is dropped."""
    held = "held"
    """Out of bounds, first sight: held, not stored."""
    replaced = "replaced"
    """Out of bounds of the stored value and of the one held: held in its place, counting from nothing again."""
    confirmed = "confirmed"
    """Within the guard of the value held: one more confirmation, still held."""
    settled = "settled"
    """Within the guard of the value held, and the confirmations reached: stored, nothing held any more."""

    @property
    def stores(self) -> bool:
        return self in (Verdict.first, Verdict.stored, Verdict.settled)


@dataclass(frozen=True, slots=True)
class Held:
    """A value held for confirmation: the latest answer out of bounds, since when, and how many agreed in a row."""

    value: Decimal
    confirmations: int
    first_seen: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    held: Held | None
    """What is held after this answer (None: nothing)."""
    move_bps: Decimal | None
    """From the stored value to the fetched one, signed (positive: `destination_per_source` rose); None for a first
    value."""


def move_bps(stored: Decimal, value: Decimal) -> Decimal:
    """Signed basis points from `stored` to `value`, to two places (`stored` > 0)."""
    return ((value - stored) * BPS / stored).quantize(MOVE_PLACES)


class RateGuard:
    """`bps`: how far (in basis points of the value compared with) a value may move and be stored; 0 turns the guard
    off. `confirmations`: later answers in a row within `bps` of the held value that store it; 0: only an
    operator's accept stores a held value."""

    def __init__(self, bps: int, confirmations: int) -> None:
        if bps < 0 or confirmations < 0:
            raise ValueError("the guard's bound and confirmations are never negative")
        self.bps = bps
        self.confirmations = confirmations

    @property
    def on(self) -> bool:
        return self.bps > 0

    def within(self, reference: Decimal, value: Decimal) -> bool:
        """`value` at most `bps` basis points from `reference` (> 0), either way: exact, no rounding."""
        return abs(value - reference) * BPS <= self.bps * reference

    def decide(self, stored: Decimal | None, held: Held | None, fetched: Decimal, at: datetime) -> Decision:
        """What to do with `fetched` (received at `at`), given the pair's stored value and the value held."""
        if stored is None or stored <= 0:
            # Nothing to compare with (a value of 0 cannot be stored: quotes refuse it; were one there, a guard
            # against it would hold every answer for ever, so it is replaced like a first value).
            return Decision(Verdict.first, None, None)
        move = move_bps(stored, fetched)
        if not self.on or self.within(stored, fetched):
            return Decision(Verdict.stored, None, move)
        if held is None:
            return Decision(Verdict.held, Held(fetched, 0, at), move)
        if not self.within(held.value, fetched):
            return Decision(Verdict.replaced, Held(fetched, 0, at), move)
        confirmations = held.confirmations + 1
        if self.confirmations and confirmations >= self.confirmations:
            return Decision(Verdict.settled, None, move)
        # The latest answer is what is held (and what an accept stores); the next is compared with it, so a value
        # moving in steps each within the bound of the last keeps counting.
        return Decision(Verdict.confirmed, Held(fetched, confirmations, held.first_seen), move)


OFF = RateGuard(0, 0)
