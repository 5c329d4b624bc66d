"""The Flutterwave v3 transfer-rates client (docs/design.md, "The upstream")."""

import asyncio
import email.utils
import logging
import time
from datetime import UTC, datetime
from decimal import Decimal

import httpx
from prometheus_client import Counter, Histogram
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from app.currencies import Pair
from app.upstream.errors import (
    MalformedQuote,
    RateLimited,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from app.upstream.quote import Quote, parse_quote

log = logging.getLogger(__name__)

RATES_PATH = "/v3/transfers/rates"


def create_http_client(
    base_url: str, secret_key: SecretStr, timeout_s: float, *, max_connections: int
) -> httpx.AsyncClient:
    """The one HTTP client of the process; the key lives only in its headers (httpx masks it in reprs)."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {secret_key.get_secret_value()}", "Accept": "application/json"},
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(response: httpx.Response) -> str:
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {response.status_code}" + (f": {message}" if isinstance(message, str) else "")


class FlutterwaveClient:
    """Asks Flutterwave for quotes, retrying what is worth retrying, within a process-wide limit.

    `limiter` bounds the requests in flight for the whole process (the poller and
    on-demand fetches share it); it is held per attempt, not across backoff sleeps.
    """

    name = "flutterwave"

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        limiter: asyncio.Semaphore,
        max_attempts: int,
        calls: Counter,
        durations: Histogram | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        retry_after_max_s: float = 60.0,
    ) -> None:
        self._http = http
        self._limiter = limiter
        self._max_attempts = max_attempts
        self._calls = calls
        self._durations = durations
        self._backoff = wait_exponential_jitter(
            multiplier=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s
        )
        self._retry_after_max_s = retry_after_max_s

    async def fetch(self, pair: Pair, amount: Decimal) -> Quote:
        """A quote for receiving `amount` of `pair.destination`; raises an `UpstreamError`."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(UpstreamUnavailable),
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                quote = await self._attempt(pair, amount)
        return quote

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RateLimited) and error.retry_after_s is not None:
            return min(error.retry_after_s, self._retry_after_max_s)
        return float(self._backoff(state))

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait_s = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "upstream %s; attempt %d of %d, next in %.2fs", error, state.attempt_number, self._max_attempts, wait_s
        )

    async def _attempt(self, pair: Pair, amount: Decimal) -> Quote:
        params = {"amount": str(amount), "source_currency": pair.source, "destination_currency": pair.destination}
        async with self._limiter:
            # Timed inside the limiter: the upstream's latency, not our own queue.
            started = time.perf_counter()
            try:
                response = await self._http.get(RATES_PATH, params=params)
                received_at = datetime.now(UTC)
            except httpx.TimeoutException:
                self._count("timeout", started)
                raise UpstreamUnavailable(pair, "timed out") from None
            except httpx.RequestError as error:  # transport failures, and bodies that do not decode
                self._count("connection_error", started)
                raise UpstreamUnavailable(pair, f"request failed ({type(error).__name__})") from None
        return self._read(pair, response, started, received_at)

    def _count(self, outcome: str, started: float) -> None:
        self._calls.labels(outcome=outcome).inc()
        if self._durations is not None:
            self._durations.labels(outcome=outcome).observe(time.perf_counter() - started)

    def _read(self, pair: Pair, response: httpx.Response, started: float, received_at: datetime) -> Quote:
        status = response.status_code
        error: UpstreamError
        if status == 429:
            outcome, error = "rate_limited", RateLimited(pair, parse_retry_after(response.headers.get("Retry-After")))
        elif status >= 500:
            outcome, error = "server_error", UpstreamUnavailable(pair, _error_message(response))
        elif status >= 400:
            outcome, error = "rejected", UpstreamRejected(pair, _error_message(response))
        else:
            try:
                quote = parse_quote(response.content, pair, self.name, received_at)
            except MalformedQuote as malformed:
                self._count("malformed", started)
                log.error("upstream answer rejected as malformed: %s", malformed)
                raise
            self._count("success", started)
            return quote
        self._count(outcome, started)
        raise error
