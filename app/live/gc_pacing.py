"""Full garbage collections between poll cycles, not in the middle of one (docs/performance.md).

A full (generation 2) collection stops the event loop for as long as it takes
to walk every tracked object: with a thousand WebSocket clients, 100-300 ms
measured. CPython starts one by itself whenever enough objects have outlived
the younger collections, so one can land in the middle of a cycle's fan-out,
and every delivery waiting behind it is late by that much. So what is alive
once the process has started is frozen (never walked again); from the first
rate of a cycle to the cycle's end (the `all_rates_update` event) CPython's
own full collections are put off, and the one that came due meanwhile runs
just after the end has been handed to every client: the quietest moment
there is, a whole interval before the next cycle. Outside cycles (clients
connecting, REST traffic) CPython collects as it always does. A cycle whose
end never comes is given up on after `max_gap_s`. Everything is put back as
it was on exit.
"""

import asyncio
import gc
import time
from types import TracebackType
from typing import Self

from prometheus_client import Histogram

# Past this many younger collections a full one would start by itself: in practice never, until put back.
_PUT_OFF = 1_000_000


class CollectionPacer:
    def __init__(self, seconds: Histogram, *, settle_s: float = 0.5, max_gap_s: float = 60.0) -> None:
        self._seconds = seconds
        self._settle_s = settle_s
        self._max_gap_s = max_gap_s
        self._moving = asyncio.Event()
        self._cycle_ended = asyncio.Event()
        self._thresholds = gc.get_threshold()

    def rates_moving(self) -> None:
        """Rates of a cycle are being handed to clients: no full collection until the cycle has ended."""
        if not self._moving.is_set():
            young, middle, _ = self._thresholds
            gc.set_threshold(young, middle, _PUT_OFF)
            self._moving.set()

    def cycle_ended(self) -> None:
        """A poll cycle's end has just been handed to every client: collect once its sends have gone out."""
        self._cycle_ended.set()

    async def __aenter__(self) -> Self:
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    async def run(self) -> None:
        """Until cancelled: after each cycle, the full collection CPython would have run during it."""
        while True:
            await self._moving.wait()
            try:
                async with asyncio.timeout(self._max_gap_s):
                    await self._cycle_ended.wait()
                await asyncio.sleep(self._settle_s)
            except TimeoutError:
                pass
            self._cycle_ended.clear()
            self._moving.clear()
            gc.set_threshold(*self._thresholds)
            # Only when CPython would have considered one: after `threshold2` younger collections.
            if gc.get_count()[2] >= self._thresholds[2]:
                self.collect()

    def collect(self) -> None:
        started = time.perf_counter()
        gc.collect()
        self._seconds.observe(time.perf_counter() - started)
