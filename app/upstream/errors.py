"""What can go wrong when asking a provider for a quote.

    UpstreamError                 the provider gave no usable quote
     ├── UpstreamUnavailable      no answer now: timeout, connection error, 5xx (worth retrying)
     │    └── RateLimited         429; waits `retry_after_s` before the next try
     ├── UpstreamRejected         a 4xx other than 429: the request itself is refused (not retried)
     └── MalformedQuote           an answer that is not a consistent quote (never stored)

Messages name the pair and the reason, never the secret key.
"""

from app.currencies import Pair


class UpstreamError(Exception):
    def __init__(self, pair: Pair, reason: str) -> None:
        super().__init__(f"{pair}: {reason}")
        self.pair = pair
        self.reason = reason


class UpstreamUnavailable(UpstreamError):
    pass


class RateLimited(UpstreamUnavailable):
    def __init__(self, pair: Pair, retry_after_s: float | None) -> None:
        suffix = f", Retry-After {retry_after_s:g}s" if retry_after_s is not None else ""
        super().__init__(pair, f"rate limited (HTTP 429{suffix})")
        self.retry_after_s = retry_after_s


class UpstreamRejected(UpstreamError):
    pass


class MalformedQuote(UpstreamError):
    pass
