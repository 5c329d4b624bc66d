"""Full garbage collections between poll cycles, not in the middle of one (docs/decisions/0011-gc-pacing.md).

A full (generation 2) collection stops the event loop for as long as it takes
to walk every tracked object: with a thousand WebSocket clients, 100-300 ms
measured. CPython starts one by itself whenever enough objects have outlived
the younger collections, so one can land in the middle of a cycle's fan-out,
and every delivery waiting behind it is late by that much. So what is alive
once the process has started is frozen (never walked again); from the first
rate of a cycle to the cycle's end (the `all_rates_update` event) CPython's
own full collections are put off; once the end has been handed to every
client, CPython's thresholds are put back and it decides by its own rule
whether one is due (enough younger collections, and new long-lived objects
numbering a quarter of those the last full collection kept), at its next
young collection, a moment later: the quietest moment there is, a whole
interval before the next cycle. Forcing one after every cycle instead cost a
second of a stalled loop per cycle at 10,000 clients, where CPython's rule
seldom calls for one. Outside cycles (clients connecting, REST traffic)
CPython collects as it always does. A cycle whose end never comes is given
up on after `max_gap_s`. Every full collection is timed. Everything is put
back as it was on exit.
"""

import asyncio
import gc
import time
from types import TracebackType
from typing import Any, Self

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
        self._full_since: float | None = None

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
        gc.callbacks.append(self._time_full_collections)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gc.callbacks.remove(self._time_full_collections)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    def _time_full_collections(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._full_since = time.perf_counter()
        elif self._full_since is not None:
            self._seconds.observe(time.perf_counter() - self._full_since)
            self._full_since = None

    async def run(self) -> None:
        """Until cancelled: from each cycle's first rate to its end, no full collection; then CPython's own rule."""
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
