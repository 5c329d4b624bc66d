"""A WebSocket client's message rate in-process (docs/limits.md): who is refused, who is closed, and how soon.

The bucket alone, on a fake clock, so hours of sending take milliseconds. The contract: a client that floods is
closed with 1008 within 10 s of the flood's start (its first message past the allowance), whatever its rate above
10 a second; a client at or below 10 a second is never closed. tests/test_ws_hostile.py floods a real server.
"""

import pytest
from prometheus_client import CollectorRegistry, Counter

from app.limits.websocket import BURST, FLOOD_GRACE_S, MAX_STRIKES, MESSAGES_PER_S, MessageBucket

CONTRACT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sender:
    """One connection's messages, sent at the moments it is told, against a bucket sized as in production."""

    def __init__(self) -> None:
        self.clock = Clock()
        refused = Counter("refused", "", ["limit"], registry=CollectorRegistry())
        self.bucket = MessageBucket(refused, MESSAGES_PER_S, BURST, clock=self.clock)
        self.refusals: list[float] = []
        self.closed_at: float | None = None

    def send_at(self, at: float) -> bool:
        """A message at `at` (seconds from the start); False once the client is closed."""
        assert self.closed_at is None, "nothing arrives after the close"
        self.clock.now = 1000.0 + at
        if not self.bucket.take():
            self.refusals.append(at)
            if self.bucket.exhausted:
                self.closed_at = at
                return False
        return True

    def steady(self, rate_s: float, start: float, seconds: float) -> bool:
        """Evenly spaced messages at `rate_s` for `seconds`; False once closed."""
        count = round(rate_s * seconds)
        return all(self.send_at(start + n / rate_s) for n in range(count))


@pytest.mark.parametrize("rate_s", [10.001, 10.01, 10.1, 10.5, 11, 12, 15, 20, 50, 1000, 100_000])
def test_a_flood_at_any_rate_above_the_limit_is_closed_within_10_s_of_its_start(rate_s: float) -> None:
    sender = Sender()
    # Long enough for the slowest to spend its burst (50 / 0.001 s), and then some.
    assert not sender.steady(rate_s, 0.0, BURST / (rate_s - MESSAGES_PER_S) + 2 * CONTRACT_S)
    assert sender.closed_at is not None
    started = sender.refusals[0]
    assert sender.closed_at - started <= FLOOD_GRACE_S + 1 / rate_s < CONTRACT_S
    if rate_s >= 20:
        # From its very first frame, the burst spent first: 5 s at 20 a second, then the grace.
        assert sender.closed_at < CONTRACT_S


@pytest.mark.parametrize("rate_s", [1, 5, 9.99, 10])
def test_a_client_at_or_below_the_rate_is_never_refused_nor_closed(rate_s: float) -> None:
    sender = Sender()
    assert sender.steady(rate_s, 0.0, 3600)
    assert sender.refusals == []


def test_bursts_within_the_allowance_are_never_refused() -> None:
    sender = Sender()
    for cycle in range(100):
        # The whole burst at once, each time the bucket has refilled (5 s at 10 a second).
        for _ in range(BURST):
            assert sender.send_at(cycle * (BURST / MESSAGES_PER_S + 0.01))
    assert sender.refusals == []


def test_a_client_that_went_over_and_paused_is_forgiven() -> None:
    sender = Sender()
    for _ in range(BURST + 10):
        assert sender.send_at(0.0)
    assert len(sender.refusals) == 10
    # Half a second's pause, then exactly the rate for an hour: over once, never a flood.
    assert sender.steady(MESSAGES_PER_S, 0.5, 3600)
    assert len(sender.refusals) == 10


def test_a_client_that_went_over_and_slowed_down_is_forgiven() -> None:
    sender = Sender()
    for _ in range(BURST + 1):
        assert sender.send_at(0.0)
    assert sender.steady(8, 0.1, 3600)
    assert len(sender.refusals) == 1


def test_a_client_that_went_over_and_keeps_on_at_the_rate_without_slowing_is_closed() -> None:
    """It never pays back what it took beyond its burst: just above the rate is indistinguishable from it."""
    sender = Sender()
    for _ in range(BURST + 1):
        assert sender.send_at(0.0)
    assert not sender.steady(MESSAGES_PER_S, 0.1, CONTRACT_S)
    assert sender.closed_at is not None and sender.closed_at <= FLOOD_GRACE_S + 1 / MESSAGES_PER_S


def test_a_fast_flood_is_closed_on_its_strikes_at_once() -> None:
    sender = Sender()
    at = 0.0
    while sender.send_at(at):
        at += 0.0001
    assert len(sender.refusals) == MAX_STRIKES + 1
    assert sender.closed_at is not None and sender.closed_at - sender.refusals[0] < 0.01


def test_quiet_spells_between_bursts_of_refusals_add_up_to_a_close() -> None:
    """Forgiven after each pause, but the strikes remember: 20 refused every 2 s is closed."""
    sender = Sender()
    at = 0.0
    while sender.closed_at is None:
        for _ in range(BURST + 20):
            if not sender.send_at(at):
                break
        at += 2.0
    assert at < 60
