"""Finding a pair's rate for a reader: memory, then Redis, then the database, then the upstream.

A stored rate older than `stale_after_s` is refreshed from the upstream. The
refresh is shared: however many requests want the same pair at once, the
process makes one upstream call (single flight), and it is shielded, so one
client hanging up does not cancel it for the others. A refresh that fails
leaves the stored rate to be served marked stale, and the pair rests for a
cool-down before the upstream is asked again, so a failing upstream does not
make every reader wait through its retries.

A pair outside the polled set is fetched only within the deployment's
on-demand budget (`OnDemandBudget`, docs/limits.md): past it, a stored rate is
served even when stale, and with none stored the reader is told to come back
later (`TooManyRequests`).

While the database cannot be reached, what the process holds stands in for
it: Redis, then the last rate this process held in memory, however old
(served `stale` once it is); nothing is fetched from the upstream then, since
a rate is shown only once stored (docs/outages.md).

A value the rate guard holds (docs/operations.md, "The rate guard") is not
stored, so it is never served: the reader gets the stored rate, marked stale
if it is, as after a failed refresh, and the pair rests for the cool-down.

A request waits one bound at most, whatever it does: the database read and,
with a rate in hand, the wait for a refresh share one deadline, and a read
that failed is not followed by a refresh that would meet the same database
again to store what it fetched (docs/outages.md).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Literal, Self

from app.currencies import Pair
from app.errors import DatabaseUnavailable, RateUnavailable, TooManyRequests
from app.kit.metrics import Metrics
from app.kit.tasks import TaskSet
from app.limits.on_demand import OnDemandBudget
from app.rates.cache import TieredCache
from app.rates.corridors import Corridors
from app.rates.store import RateStore, utc_now
from app.storage.rate import StoredRate
from app.upstream.errors import RateLimited, UpstreamError, UpstreamRejected
from app.upstream.provider import Provider

log = logging.getLogger(__name__)

Layer = Literal["memory", "redis", "database", "upstream"]

# How long a pair the upstream refused (a 4xx other than 429) rests before readers may ask for it again.
REJECTED_REST_S = 300.0


class RateHeld(Exception):
    """The upstream answered a value the rate guard held: nothing new was stored."""


@dataclass(frozen=True, slots=True)
class Found:
    rate: StoredRate
    served_from: Layer
    stale: bool


class RateLookup:
    def __init__(
        self,
        cache: TieredCache,
        store: RateStore,
        provider: Provider,
        metrics: Metrics,
        budget: OnDemandBudget,
        *,
        stale_after_s: float,
        amount: Decimal,
        bound_s: float = 2.0,
        cooldown_s: float = 5.0,
        on_demand_concurrency: int = 2,
        clock: Callable[[], datetime] = utc_now,
        corridors: Corridors | None = None,
    ) -> None:
        self._corridors = corridors if corridors is not None else Corridors()
        self._cache = cache
        self._store = store
        self._provider = provider
        self._metrics = metrics
        self._budget = budget
        self._stale_after_s = stale_after_s
        self._amount = amount
        self._bound_s = bound_s
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._refreshing: dict[Pair, asyncio.Task[StoredRate]] = {}  # one refresh of a pair at a time
        self._tasks = TaskSet()
        self._on_demand = asyncio.Semaphore(on_demand_concurrency)
        self._resting_until: dict[Pair, float] = {}

    @property
    def corridors(self) -> Corridors:
        return self._corridors

    @property
    def stale_after_s(self) -> float:
        return self._stale_after_s

    def is_stale(self, rate: StoredRate) -> bool:
        return rate.age_s(self._clock()) > self._stale_after_s

    async def get(self, pair: Pair) -> Found:
        """The pair's current rate.

        Raises `NotFound` for a pair this deployment does not serve, `Withheld` for one an operator withheld,
        `TooManyRequests` when none is stored and fetching it is beyond the on-demand budget, and `RateUnavailable`
        when none is stored and the upstream fails. A pair that is paused, or under an override, is never fetched:
        its stored rate is served, stale once it is old (docs/operations.md, "Corridors").
        """
        self._corridors.check_served(pair)
        self._budget.check_allowed(pair)
        # One deadline for the whole request: what the read took comes off the wait for a refresh.
        deadline = asyncio.get_running_loop().time() + self._bound_s
        stored, reached = await self._stored(pair, deadline)
        if stored is not None and not self.is_stale(stored[0]):
            self._metrics.cache_lookups.labels(layer=stored[1]).inc()
            return Found(stored[0], stored[1], stale=False)
        if not reached:
            # The database did not answer the read: a refresh would wait on it again to store what it fetched.
            if stored is None:
                raise self._store.database.unavailable()
            self._metrics.cache_lookups.labels(layer=stored[1]).inc()
            return Found(stored[0], stored[1], stale=True)

        if stored is not None and not self._corridors.may_fetch(pair, self._clock()):
            self._metrics.cache_lookups.labels(layer=stored[1]).inc()
            return Found(stored[0], stored[1], stale=self.is_stale(stored[0]))
        resting_s = self._resting_until.get(pair, 0.0) - time.monotonic()
        if resting_s <= 0:
            refresh = self._refresh(pair, new=stored is None)
            try:
                if stored is None:
                    fresh = await asyncio.shield(refresh)
                else:
                    # A reader with a stale rate in hand waits a little for a fresh one, not for every retry.
                    # (asyncio.timeout, as Python 3.11's wait_for may swallow a cancellation of the request.)
                    async with asyncio.timeout_at(deadline):
                        fresh = await asyncio.shield(refresh)
            except TooManyRequests:
                if stored is None:
                    raise
            except Exception:
                # Whatever kept the refresh from storing a rate (the upstream, or the database while saving it):
                # the stored rate is served as stale, and with none stored the answer is "try again later".
                resting_s = max(0.0, self._resting_until.get(pair, 0.0) - time.monotonic())
            else:
                self._metrics.cache_lookups.labels(layer="upstream").inc()
                return Found(fresh, "upstream", stale=False)

        if stored is None:
            if not self._store.database.available:
                raise self._store.database.unavailable()
            raise RateUnavailable(
                f"No rate for {pair} is stored yet and the upstream cannot give one now; try again shortly.",
                retry_after_s=resting_s or self._cooldown_s,
            )
        self._metrics.cache_lookups.labels(layer=stored[1]).inc()
        return Found(stored[0], stored[1], stale=True)

    async def _stored(self, pair: Pair, deadline: float) -> tuple[tuple[StoredRate, Layer] | None, bool]:
        """The freshest stored rate, going deeper only while what was found is stale; and False when the database
        was to be read and could not be (what is returned is then what this process held)."""
        layers: list[tuple[Layer, Callable[[Pair], Awaitable[StoredRate | None]]]] = [
            ("memory", self._cache.memory.get)
        ]
        if self._cache.shared is not None:
            layers.append(("redis", self._cache.shared.get))
        best: tuple[StoredRate, Layer] | None = None
        for layer, read in layers:
            rate = await read(pair)
            if rate is not None and (best is None or rate.seq > best[0].seq):
                best = (rate, layer)
            if best is not None and not self.is_stale(best[0]):
                break
        if best is None or self.is_stale(best[0]):
            try:
                # Within what the request has left, should Redis have been slow to answer.
                rate = await self._store.current(pair, within_s=deadline - asyncio.get_running_loop().time())
            except DatabaseUnavailable:
                return self._held(pair, best), False
            if rate is not None and (best is None or rate.seq > best[0].seq):
                best = (rate, "database")
        if best is not None and best[1] != "memory":
            if best[1] == "database":
                await self._cache.set(best[0])
            else:
                await self._cache.memory.set(best[0])
        return best, True

    def _held(self, pair: Pair, best: tuple[StoredRate, Layer] | None) -> tuple[StoredRate, Layer] | None:
        """With the database away: the newest of what Redis gave and what this process last held."""
        held = self._cache.memory.last_known(pair)
        if held is not None and (best is None or held.seq > best[0].seq):
            best = (held, "memory")
        if best is not None:
            self._metrics.stale_answers.labels(reason="database").inc()
        return best

    def _refresh(self, pair: Pair, *, new: bool) -> asyncio.Task[StoredRate]:
        task = self._refreshing.get(pair)
        if task is None:
            fetch = self._fetch_and_store(pair) if self._budget.is_polled(pair) else self._fetch_on_demand(pair, new)
            # The upstream failing, the budget spent and the database away are answered for to the readers.
            task = self._tasks.spawn(
                fetch, f"refresh {pair}", quiet=(UpstreamError, TooManyRequests, DatabaseUnavailable, RateHeld)
            )
            self._refreshing[pair] = task
            task.add_done_callback(lambda _: self._refreshing.pop(pair, None))
        return task

    async def _fetch_on_demand(self, pair: Pair, new: bool) -> StoredRate:
        """A pair outside the polled set: fetched only within the deployment's budget."""
        refused_s = await self._budget.refused_for(pair)
        if refused_s > 0:
            # Another replica asked already, and the upstream refused: asking again soon will not change that.
            self._resting_until[pair] = time.monotonic() + refused_s
            raise UpstreamRejected(pair, "refused by the upstream recently; not asked again yet")
        claimed = await self._budget.claim_pair(pair) if new else False
        stored = False
        try:
            await self._budget.claim_call(pair)
            rate = await self._fetch_and_store(pair)
            stored = True
            return rate
        except UpstreamRejected:
            await self._budget.remember_refused(pair, REJECTED_REST_S)
            raise
        finally:
            if claimed and not stored:
                await self._budget.release_pair(pair)

    async def _fetch_and_store(self, pair: Pair) -> StoredRate:
        if not self._store.database.available:
            raise self._store.database.unavailable()  # what the upstream says now could not be stored, nor shown
        try:
            # Readers can ask for any of thousands of pairs: they get a share of the upstream, never all of it,
            # so the poller keeps its turn.
            async with self._on_demand:
                quote = await self._provider.fetch(pair, self._amount)
        except UpstreamError as error:
            rest_s = self._cooldown_s
            if isinstance(error, RateLimited) and error.retry_after_s is not None:
                rest_s = max(rest_s, error.retry_after_s)
            elif isinstance(error, UpstreamRejected):
                rest_s = REJECTED_REST_S  # the upstream refuses this pair; asking again soon will not change that
            self._resting_until[pair] = time.monotonic() + rest_s
            log.warning("on-demand refresh of %s failed, resting it %.0fs: %s", pair, rest_s, error)
            raise
        result = await self._store.save(quote)
        if not result.stored:
            # Asked again at once, every reader of the pair would confirm the held value by itself.
            self._resting_until[pair] = time.monotonic() + self._cooldown_s
            raise RateHeld(pair)
        self._resting_until.pop(pair, None)
        return result.rate

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.aclose()
