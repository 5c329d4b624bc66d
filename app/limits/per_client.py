"""The per-client REST limit: `RATE_LIMIT_PER_MINUTE` requests under `/api` per client address (docs/limits.md).

A client is counted by `app.limits.addresses.limit_key`: its IPv4 address, or its IPv6 /64. A request with a
valid API key is counted against the key's own limit instead (`RATE_LIMIT_PER_KEY_PER_MINUTE`, one more
`ClientLimiter` keyed by the key's name), after `app.limits.per_key.KeyGate` has admitted it.

An ASGI middleware outside the answer micro-cache, so a request answered from
it is counted and decorated like any other. Every answer under `/api` carries
`RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds); past
the limit the answer is a 429 in the error envelope with `Retry-After`.

The count is a moving window (`app.limits.windows`), in Redis when it is set, so
every replica adds to one count per address. A round trip to Redis per request
would cost more than a cached answer itself, so each process decides from what
it knows: the deployment's count for the address at its last sync, plus the
hits it served since. It syncs an address the first time it sees it, whenever
what it knows is older than `SYNC_S`, and pushes the hits it served every
`FLUSH_S` in the background. Within one process the count is exact; across
replicas a client may get a few more than the limit, up to what it can send
to the other replicas in `SYNC_S`.

What a process knows is bounded: past `MAX_CLIENTS` addresses, the least
recently seen is forgotten first, so a flood of distinct addresses costs a
bounded amount of memory and a client that keeps sending stays counted.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from fastapi.responses import JSONResponse
from limits import RateLimitItemPerMinute
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import DatabaseUnavailable, error_body, retry_after
from app.kit.tasks import running
from app.limits.addresses import limit_key
from app.limits.per_key import SCOPE_KEY, bearer_token
from app.limits.windows import MovingWindow, whole_seconds
from app.state import services_of

SYNC_S = 1.0
FLUSH_S = 0.1
NEVER = float("-inf")
# Past this many addresses known, the least recently seen is forgotten (about 300 bytes each here, as much again
# in the window's memory while Redis is away): a flood of distinct addresses costs at most some 60 MB.
MAX_CLIENTS = 100_000


@dataclass(slots=True)
class _Client:
    shared: int = 0
    """Hits in the deployment's window at the last sync, this process's pushed ones included."""
    pending: int = 0
    """Hits served here since, not yet pushed."""
    reset_at: float = 0.0
    synced_at: float = NEVER
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Verdict(NamedTuple):
    allowed: bool
    remaining: int
    reset_s: float


class ClientLimiter:
    def __init__(
        self,
        limit_per_minute: int,
        window: MovingWindow,
        refused: Counter,
        *,
        max_clients: int = MAX_CLIENTS,
        name: str = "per_client",
        whose: str = "from this address",
    ) -> None:
        """`name`: the limit's label in `fxrates_requests_refused_total`; `whose`: how its 429 names the client."""
        self.limit = limit_per_minute
        self.name = name
        self.refusal = f"Too many requests {whose} (at most {limit_per_minute} a minute); try again later."
        self.limit_header = b"%d" % limit_per_minute
        self._item = RateLimitItemPerMinute(max(1, limit_per_minute))
        self._window = window
        self._refused = refused
        self._max_clients = max_clients
        # Least recently seen first.
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._unpushed: set[str] = set()

    async def check(self, address: str) -> Verdict:
        return self.decide(address) or await self._check_after_sync(address)

    def decide(self, address: str, *, synced: bool = False) -> Verdict | None:
        """The verdict from what this process knows, or None when the address must be synced first."""
        client = self._clients.get(address)
        if client is None:
            return None
        self._clients.move_to_end(address)
        now = time.monotonic()
        # Only a client never seen waits for a sync under way; others decide from what is known meanwhile.
        stale = now - client.synced_at >= SYNC_S and (client.synced_at == NEVER or not client.lock.locked())
        if stale and not synced:
            return None
        count = client.shared + client.pending
        reset_s = client.reset_at - now if count else 60.0
        if count >= self.limit:
            self._refused.labels(limit=self.name).inc()
            return Verdict(False, 0, reset_s)
        client.pending += 1
        self._unpushed.add(address)
        return Verdict(True, self.limit - count - 1, reset_s)

    async def _check_after_sync(self, address: str) -> Verdict:
        client = self._clients.get(address)
        if client is None:
            while len(self._clients) >= self._max_clients:
                # Hits not yet pushed go with it: at most what it sent in the last `FLUSH_S`.
                self._clients.popitem(last=False)
            client = self._clients[address] = _Client()
        await self._sync(address, client)
        # Forgotten while it synced, in a flood of new addresses: it is the newest now.
        self._clients.setdefault(address, client)
        verdict = self.decide(address, synced=True)
        assert verdict is not None  # the address is known: it was just synced
        return verdict

    async def _sync(self, address: str, client: _Client, *, max_age_s: float = SYNC_S) -> None:
        async with client.lock:
            if time.monotonic() - client.synced_at < max_age_s:
                return  # synced while this one waited
            pushed = client.pending
            counted = await self._window.record(self._item, address, pushed)
            client.pending -= pushed
            client.shared = counted.hits
            now = time.monotonic()
            client.reset_at = now + counted.reset_s
            client.synced_at = now

    async def flush(self) -> None:
        """Push every address's served hits, so other replicas see them within `FLUSH_S`."""
        while True:
            await asyncio.sleep(FLUSH_S)
            addresses, self._unpushed = self._unpushed, set()
            for address in addresses:
                client = self._clients.get(address)
                if client is None or not client.pending:
                    continue
                if client.lock.locked():
                    self._unpushed.add(address)  # a sync under way; next round
                else:
                    await self._sync(address, client, max_age_s=0)

    @asynccontextmanager
    async def flushing(self) -> AsyncIterator["ClientLimiter"]:
        if self.limit == 0:
            yield self
            return
        async with running(self.flush(), "client-limit-flush"):
            yield self


class ClientLimit:
    def __init__(self, app: ASGIApp, prefix: str = "/api") -> None:
        self.app = app
        self.prefix = prefix
        self.under = prefix + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _under(scope["path"], self.prefix, self.under):
            await self.app(scope, receive, send)
            return
        services = services_of(scope)
        limiter, counted_as = services.client_limiter, limit_key(scope)
        token = bearer_token(scope)
        if token is not None:
            try:
                admission = await services.key_gate.admit(counted_as, token)
            except DatabaseUnavailable as error:
                await _refuse(scope, receive, send, 503, error.message, error.headers())
                return
            if admission.outcome == "blocked":
                message = "Too many bad API keys from this address; try again later."
                await _refuse(scope, receive, send, 429, message, {"Retry-After": retry_after(admission.retry_after_s)})
                return
            if admission.key is None:
                await _refuse(scope, receive, send, 401, BAD_KEY, {"WWW-Authenticate": "Bearer"})
                return
            scope[SCOPE_KEY] = admission.key
            limiter, counted_as = services.key_limiter, services.key_gate.limit_key(admission.key)
        if not limiter.limit:
            await self.app(scope, receive, send)
            return
        verdict = await limiter.check(counted_as)
        headers = [
            (b"ratelimit-limit", limiter.limit_header),
            (b"ratelimit-remaining", b"%d" % verdict.remaining),
            (b"ratelimit-reset", b"%d" % whole_seconds(verdict.reset_s)),
        ]
        if not verdict.allowed:
            await _refuse(
                scope, receive, send, 429, limiter.refusal, {"Retry-After": retry_after(verdict.reset_s)}, headers
            )
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Appended as raw pairs: the app below never sets these, and this runs on every answer.
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# Says nothing of the key, which must never be echoed (docs/rest.md, "Keys").
BAD_KEY = "The API key is unknown or revoked; send a valid one as 'Authorization: Bearer <key>', or none."


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    headers: dict[str, str],
    raw_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    refusal = JSONResponse(error_body(message), status_code=status, headers=headers)
    refusal.raw_headers += raw_headers or []
    await refusal(scope, receive, send)


def _under(path: str, prefix: str, under: str) -> bool:
    return path.startswith(under) or path == prefix
