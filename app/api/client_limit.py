"""The per-client REST limit: `RATE_LIMIT_PER_MINUTE` requests under `/api` per client address (docs/limits.md).

An ASGI middleware outside the answer micro-cache, so a request answered from
it is counted and decorated like any other. Every answer under `/api` carries
`RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds); past
the limit the answer is a 429 in the error envelope with `Retry-After`.

The count is a moving window (`app.windows`), in Redis when it is set, so
every replica sees one count per address. A round trip to Redis per request
would cost more than the cached answer itself, so a process takes hits from
the shared window in small leases: one at a time for a quiet client (the
count is exact), up to `limit // 100` (at most `MAX_LEASE`) for a client that
uses each lease up within `LEASE_S`. A lease's unused hits lapse with it, so a
busy client may be refused up to 1 % early per replica, never late.
"""

import time
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from limits import RateLimitItemPerMinute
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body, retry_after
from app.windows import MovingWindow, whole_seconds

MAX_LEASE = 50
LEASE_S = 1.0
# Leases of addresses gone quiet are dropped once this many are held.
MAX_LEASES = 10_000


@dataclass(slots=True)
class _Lease:
    hits: int
    remaining: int
    reset_at: float
    expires_at: float
    size: int


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    remaining: int
    reset_s: float


class ClientLimiter:
    def __init__(self, limit_per_minute: int, window: MovingWindow, refused: Counter) -> None:
        self.limit = limit_per_minute
        self._item = RateLimitItemPerMinute(max(1, limit_per_minute))
        self._window = window
        self._refused = refused
        self._max_lease = max(1, min(MAX_LEASE, limit_per_minute // 100))
        self._leases: dict[str, _Lease] = {}

    async def check(self, address: str) -> Verdict:
        now = time.monotonic()
        lease = self._leases.get(address)
        if lease is not None and lease.hits > 0 and now < lease.expires_at:
            lease.hits -= 1
            return Verdict(True, lease.remaining + lease.hits, lease.reset_at - now)
        # A client that used its whole lease while it lived gets a bigger one; anyone else takes one hit at a time.
        size = min(2 * lease.size, self._max_lease) if lease is not None and now < lease.expires_at else 1
        state = await self._window.hit(self._item, address, cost=size)
        if not state.allowed and size > 1:
            size = 1
            state = await self._window.hit(self._item, address)
        if not state.allowed:
            self._leases.pop(address, None)
            self._refused.labels(limit="per_client").inc()
            return Verdict(False, 0, state.reset_s)
        if len(self._leases) >= MAX_LEASES:
            self._leases = {key: held for key, held in self._leases.items() if held.expires_at > now}
        self._leases[address] = _Lease(size - 1, state.remaining, now + state.reset_s, now + LEASE_S, size)
        return Verdict(True, state.remaining + size - 1, state.reset_s)


def client_address(scope: Scope) -> str:
    """The peer as the server reports it: behind a proxy, uvicorn's `--proxy-headers` puts the forwarded one here."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class ClientLimit:
    def __init__(self, app: ASGIApp, prefix: str = "/api") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter: ClientLimiter | None = (scope.get("state") or {}).get("client_limiter")
        if scope["type"] != "http" or limiter is None or limiter.limit == 0 or not _under(scope["path"], self.prefix):
            await self.app(scope, receive, send)
            return
        verdict = await limiter.check(client_address(scope))
        headers = [
            (b"ratelimit-limit", str(limiter.limit).encode()),
            (b"ratelimit-remaining", str(verdict.remaining).encode()),
            (b"ratelimit-reset", str(whole_seconds(verdict.reset_s)).encode()),
        ]
        if not verdict.allowed:
            message = f"Too many requests from this address (at most {limiter.limit} a minute); try again later."
            refusal = JSONResponse(
                error_body(message), status_code=429, headers={"Retry-After": retry_after(verdict.reset_s)}
            )
            refusal.raw_headers += headers
            await refusal(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Appended as raw pairs: the app below never sets these, and this runs on every answer.
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
