"""The poller: refreshes every configured pair on a fixed, drift-free schedule (docs/design.md, docs/outages.md).

While the database cannot be reached, cycles are skipped: what the upstream
said could not be stored, and a rate is shown only once it is stored. The
first cycle after the database returns, at most one interval later, brings
every pair.
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Self

from app.currencies import Pair
from app.errors import DatabaseUnavailable
from app.ingest.schedule import Schedule
from app.kit.metrics import Metrics
from app.kit.tasks import TaskSet
from app.rates.corridors import Corridors
from app.rates.store import Overridden, RateStore, SaveResult, utc_now
from app.rates.wire import AllRatesUpdate
from app.upstream.errors import UpstreamError
from app.upstream.provider import Provider

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CycleReport:
    ok: int
    failed: int
    changed: int
    duration_s: float

    @property
    def all_ok(self) -> bool:
        return self.failed == 0


class Skipped:
    """A pair an operator's corridor control keeps from being fetched now."""


SKIPPED = Skipped()


class Poller:
    """Runs cycles in a task of its own while entered as an async context manager.

    The process-wide upstream limit lives in the provider, so a cycle simply asks
    for every pair at once and the limit decides how many are in flight.
    """

    def __init__(
        self,
        provider: Provider,
        store: RateStore,
        pairs: list[Pair],
        schedule: Schedule,
        *,
        amount: Decimal,
        metrics: Metrics,
        corridors: Corridors | None = None,
    ) -> None:
        # Paused and withheld pairs, and those under an override, are not fetched (docs/operations.md, "Corridors").
        self._corridors = corridors if corridors is not None else Corridors()
        self._provider = provider
        self._store = store
        self._pairs = pairs
        self.schedule = schedule
        self._amount = amount
        self._metrics = metrics
        self._tasks = TaskSet()
        self._running = False
        self._stopping: asyncio.Task[None] | None = None
        self._saving: set[asyncio.Future[SaveResult]] = set()
        self.started_at: float | None = None  # time.time() when the loop started
        self.stopped = False

    async def run_cycle(self) -> CycleReport:
        if not self._store.database.available:
            # Nothing fetched now could be stored, so none of the upstream's quota is spent on it.
            self._metrics.poll_pairs.labels(outcome="skipped").inc(len(self._pairs))
            return CycleReport(ok=0, failed=len(self._pairs), changed=0, duration_s=0.0)
        started = time.perf_counter()
        pairs = self._corridors.fetchable(self._pairs, utc_now())
        if len(pairs) < len(self._pairs):
            self._metrics.poll_pairs.labels(outcome="skipped").inc(len(self._pairs) - len(pairs))
        outcomes = await asyncio.gather(*(self._refresh(pair) for pair in pairs))
        report = CycleReport(
            ok=sum(outcome is not None for outcome in outcomes),
            failed=sum(outcome is None for outcome in outcomes),
            changed=sum(outcome is not None and outcome.changed for outcome in outcomes),
            duration_s=time.perf_counter() - started,
        )
        self._metrics.poll_cycle_seconds.observe(report.duration_s)
        if report.ok:
            await self.schedule.succeeded()
            self._metrics.last_successful_cycle.set(time.time())
        log.info(
            "poll cycle: %d ok, %d failed, %d changed in %.2fs",
            report.ok,
            report.failed,
            report.changed,
            report.duration_s,
        )
        await self._store.publish_cycle(AllRatesUpdate(as_of=utc_now(), count=report.ok, changed=report.changed))
        return report

    async def refresh(self, pairs: Sequence[Pair]) -> list[SaveResult | Skipped | None]:
        """Fetch and store `pairs` now, outside the schedule, as a cycle would (an operator's refresh): each
        one's result, `SKIPPED` for a pair that may not be fetched now (paused, withheld or under an override),
        None where it failed. Skipped, all failed, while the database is away."""
        if not self._store.database.available:
            self._metrics.poll_pairs.labels(outcome="skipped").inc(len(pairs))
            return [None] * len(pairs)
        now = utc_now()

        async def one(pair: Pair) -> SaveResult | Skipped | None:
            if not self._corridors.may_fetch(pair, now):
                self._metrics.poll_pairs.labels(outcome="skipped").inc()
                return SKIPPED
            return await self._refresh(pair)

        return list(await asyncio.gather(*(one(pair) for pair in pairs)))

    async def _refresh(self, pair: Pair) -> SaveResult | None:
        """What was stored (`changed` says whether the value moved); None when the pair failed."""
        try:
            quote = await self._provider.fetch(pair, self._amount)
            # A write once started is finished even if the poller is stopped meanwhile: no lost write.
            saving = self._store.save(quote)
            self._saving.add(saving)
            saving.add_done_callback(self._saving.discard)
            result = await asyncio.shield(saving)
        except UpstreamError as error:
            self._metrics.poll_pairs.labels(outcome="failed").inc()
            log.warning("poll %s failed, keeping its last good rate: %s", pair, error)
            return None
        except Overridden:
            # Another replica set an override this one had not heard of yet; the database refused the value.
            self._metrics.poll_pairs.labels(outcome="skipped").inc()
            return None
        except DatabaseUnavailable:
            # Said once for the whole outage by app.storage.health; the value is not shown, since it is not stored.
            self._metrics.poll_pairs.labels(outcome="failed").inc()
            return None
        except Exception:
            # Anything else also fails only this pair; the cycle goes on.
            self._metrics.poll_pairs.labels(outcome="failed").inc()
            log.exception("poll %s failed unexpectedly, keeping its last good rate", pair)
            return None
        self._metrics.poll_pairs.labels(outcome="ok").inc()
        return result

    async def run(self) -> None:
        """Cycle until cancelled, whenever the schedule says it is this process's turn."""
        self.started_at = time.time()
        # Checked as well as cancelled: a cancellation swallowed deep in a library mid-cycle must not leave the
        # loop running after stop().
        while not self.stopped:
            wait_s = await self.schedule.next_cycle_in()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                continue
            async with self.schedule.cycle():
                await self.run_cycle()

    async def __aenter__(self) -> Self:
        if self._running:
            raise RuntimeError("Poller is already running")
        self._running = True
        self._tasks.spawn(self.run(), "fxrates-poller")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop cycling and hand the lease back; a write under way is finished. A second call waits for the first."""
        if self._stopping is None:
            if not self._running:
                return
            self._running = False
            # Kept here rather than in the task set it stops; every caller of stop() awaits its outcome.
            self._stopping = asyncio.create_task(self._stop(), name="fxrates-poller-stop")
        # Shielded: a caller that gives up waiting (the shutdown's drain) must not leave the stop half done.
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self.stopped = True
        try:
            await self._tasks.aclose()
        finally:
            await asyncio.gather(*self._saving, return_exceptions=True)
            await self.schedule.close()
