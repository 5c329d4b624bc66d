"""What readers may make the upstream do for pairs outside the polled set (docs/limits.md).

Any valid ISO 4217 pair can be asked for, and each new one would cost the
merchant's Flutterwave key a call and ride along in every snapshot from then
on. So, for the whole deployment (through Redis when it is set, per process
while it is not or while it fails):

- a pair is fetched on demand only when each of its currencies is polled (as
  a source or a destination of the polled pairs) or listed in
  `ON_DEMAND_CURRENCIES`; otherwise it is a 404, and the upstream is not asked;
- at most `ON_DEMAND_CALLS_PER_MINUTE` on-demand fetches start in any minute;
- at most `ON_DEMAND_MAX_PAIRS` pairs outside the polled set are stored;
- a pair the upstream refused rests `REJECTED_REST_S` for every replica.

The polled pairs are none of this budget's business: the poller never asks it,
and a reader refreshing a polled pair does not either.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from limits import RateLimitItemPerMinute
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.currencies import Pair
from app.errors import NotFound, TooManyRequests
from app.limits.windows import MovingWindow
from app.settings import ANY_CURRENCY

log = logging.getLogger(__name__)

PAIRS_KEY = "fxrates:on-demand:pairs"
REFUSED_KEY = "fxrates:on-demand:refused:"
CALLS_KEY = "on-demand-calls"
# The set of stored pairs is a copy of what the database holds: it expires when unused and is then rebuilt,
# so a slot left behind by a replica that died mid-fetch does not stay taken for ever.
PAIRS_TTL_S = 24 * 3600
# Redis never holds an empty set, so one member that is no pair says "this set was built".
BUILT = "-"
REDIS_TIMEOUT_S = 0.25
# When stored pairs are at the cap a slot frees only when the configuration changes; a client should not retry soon.
FULL_RETRY_S = 3600.0

CLAIM_PAIR = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
if redis.call('sismember', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('scard', KEYS[1]) - 1 >= tonumber(ARGV[2]) then return -2 end
redis.call('sadd', KEYS[1], ARGV[1])
redis.call('expire', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class OnDemandBudget:
    def __init__(
        self,
        polled: Iterable[Pair],
        polled_currencies: Iterable[str],
        allowed_currencies: Iterable[str],
        *,
        calls_per_minute: int,
        max_pairs: int,
        window: MovingWindow,
        redis: Redis | None,
        stored_pairs: Callable[[], Awaitable[list[Pair]]],
        refused: Counter,
    ) -> None:
        self._polled = frozenset(polled)
        allowed = frozenset(allowed_currencies)
        self._any_currency = ANY_CURRENCY in allowed
        # The polled currencies are always allowed: an empty ON_DEMAND_CURRENCIES still serves NGN/GHS when NGN
        # and GHS are both polled, and only adds no other currency.
        self._allowed = allowed | frozenset(polled_currencies)
        self._calls = RateLimitItemPerMinute(calls_per_minute)
        self._calls_per_minute = calls_per_minute
        self._max_pairs = max_pairs
        self._window = window
        self._redis = redis
        self._claim_pair = redis.register_script(CLAIM_PAIR) if redis is not None else None
        self._stored_pairs = stored_pairs
        self._refused = refused
        self._pairs: set[Pair] | None = None  # this process's view, read from the database on first need

    def is_polled(self, pair: Pair) -> bool:
        return pair in self._polled

    def check_allowed(self, pair: Pair) -> None:
        """Raise `NotFound` for a pair outside the polled set that `ON_DEMAND_CURRENCIES` does not allow."""
        if pair in self._polled or self._any_currency:
            return
        refused = [code for code in (pair.source, pair.destination) if code not in self._allowed]
        if refused:
            raise NotFound(f"{pair} is not served: this service does not fetch {' or '.join(refused)} on demand.")

    async def claim_call(self, pair: Pair) -> None:
        """Count one on-demand upstream call, or raise `TooManyRequests` when the minute's budget is spent."""
        state = await self._window.hit(self._calls, CALLS_KEY)
        if state.allowed:
            return
        self._refused.labels(limit="on_demand_budget").inc()
        retry_s = state.reset_s if self._calls_per_minute else 60.0
        raise TooManyRequests(
            f"{pair} is not polled, and the service has made all the on-demand upstream calls it may this minute; "
            "try again later.",
            retry_after_s=retry_s,
        )

    async def claim_pair(self, pair: Pair) -> bool:
        """Take a slot for a pair about to be stored for the first time; True when this call took it.

        Raises `TooManyRequests` when `ON_DEMAND_MAX_PAIRS` pairs outside the polled set are stored already.
        """
        local = await self._local_pairs()
        taken = await self._claim_shared(pair) if self._claim_pair is not None else self._claim_local(pair, local)
        if taken is None:
            self._refused.labels(limit="on_demand_pairs").inc()
            raise TooManyRequests(
                f"{pair} is not polled, and the service stores as many other pairs as it may; it is not fetched.",
                retry_after_s=FULL_RETRY_S,
            )
        local.add(pair)
        return taken

    async def _claim_shared(self, pair: Pair) -> bool | None:
        """True: taken now; False: already held; None: refused. Counted in this process while Redis fails."""
        assert self._claim_pair is not None and self._redis is not None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                result = await self._claim_pair(keys=[PAIRS_KEY], args=[str(pair), self._max_pairs, PAIRS_TTL_S])
                if result == -1:
                    stored = [str(item) for item in await self._local_pairs()]
                    await self._redis.sadd(PAIRS_KEY, BUILT, *stored)
                    await self._redis.expire(PAIRS_KEY, PAIRS_TTL_S)
                    result = await self._claim_pair(keys=[PAIRS_KEY], args=[str(pair), self._max_pairs, PAIRS_TTL_S])
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("on-demand pairs: Redis failed (%s); counting stored pairs in this process", error)
            return self._claim_local(pair, await self._local_pairs())
        if result == -2:
            return None
        return bool(result == 1)

    def _claim_local(self, pair: Pair, local: set[Pair]) -> bool | None:
        if pair in local:
            return False
        return None if len(local) >= self._max_pairs else True

    async def release_pair(self, pair: Pair) -> None:
        """Give back a slot taken for a pair that was not stored after all."""
        if self._pairs is not None:
            self._pairs.discard(pair)
        if self._redis is not None:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self._redis.srem(PAIRS_KEY, str(pair))
            except (RedisError, OSError, TimeoutError) as error:
                log.warning("on-demand pairs: could not release %s (%s); it expires with the set", pair, error)

    async def _local_pairs(self) -> set[Pair]:
        if self._pairs is None:
            self._pairs = {pair for pair in await self._stored_pairs() if pair not in self._polled}
        return self._pairs

    async def refused_for(self, pair: Pair) -> float:
        """Seconds left while the upstream's refusal of `pair` is remembered by any replica; 0 when it is not."""
        if self._redis is None:
            return 0.0
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                left_ms = await self._redis.pttl(REFUSED_KEY + str(pair))
        except (RedisError, OSError, TimeoutError):
            return 0.0
        return max(0.0, left_ms / 1000)

    async def remember_refused(self, pair: Pair, rest_s: float) -> None:
        if self._redis is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self._redis.set(REFUSED_KEY + str(pair), b"1", px=max(1, round(rest_s * 1000)))
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("could not share that the upstream refused %s (%s)", pair, error)
