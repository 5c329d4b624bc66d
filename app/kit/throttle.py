"""A probe run at most once per interval: callers in between share its last result, or the run under way.

For checks a client can ask for as often as it likes (`/readyz`, `/metrics`): a flood of them is then one
probe a second, not a flood of database pings (docs/operations.md).
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Throttle(Generic[T]):
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.runs = 0
        """How many times a probe ran: what a test of the throttle counts."""
        self._result: T | None = None
        self._at = float("-inf")
        self._running: asyncio.Future[T] | None = None

    async def __call__(self, probe: Callable[[], Awaitable[T]]) -> T:
        """`probe`'s result, from a run that started less than `interval_s` ago if there was one."""
        if self._result is not None and time.monotonic() - self._at < self.interval_s:
            return self._result
        if self._running is None:
            self._running = asyncio.ensure_future(self._run(probe))
        # Shielded: a caller that goes away (a client hanging up) does not cancel the run the others wait on.
        return await asyncio.shield(self._running)

    async def _run(self, probe: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        self.runs += 1
        try:
            result = await probe()
        finally:
            self._running = None
        self._result, self._at = result, started
        return result
