"""A micro-cache of finished answers for the hottest reads, in front of the router.

Profiling showed a cached rate lookup spends most of its time in the framework
(query validation, dependency solving, building and serialising the body), not
in finding the rate. Remote apps ask the same few questions many times a
second, so an identical GET (same path, same query string) that got a 200 is
answered again from its stored bytes, for at most `ttl_s` and only while no
rate has changed in this process's view. The first request of every
(path, query) goes through the whole app, so validation and errors are never
skipped; only successes are reused.
"""

import time
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.etags import matches
from app.state import services_of

MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class _Answer:
    version: tuple[int, int]
    expires_at: float
    route: Any
    headers: list[tuple[bytes, bytes]]
    body: bytes
    etag: str | None
    cache_control: bytes | None


class AnswerCache:
    def __init__(self, app: ASGIApp, paths: frozenset[str], ttl_s: float = 0.25) -> None:
        self.app = app
        self.paths = paths
        self.ttl_s = ttl_s
        self._answers: dict[tuple[str, bytes], _Answer] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"].rstrip("/") if scope["type"] == "http" else ""
        if path not in self.paths or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        services = services_of(scope)
        # Any save in this process, or any change another process announced, makes every stored answer old.
        version = (services.store.version, services.hub.version)
        key = (path, scope["query_string"])
        answer = self._answers.get(key)
        if answer is not None and answer.version == version and time.monotonic() < answer.expires_at:
            scope["route"] = answer.route
            await self._replay(answer, scope, send)
            return

        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def send_and_keep(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, send_and_keep)
        if status == 200:
            if len(self._answers) >= MAX_ENTRIES:
                self._answers.clear()
            found = Headers(raw=headers)
            self._answers[key] = _Answer(
                version=version,
                expires_at=time.monotonic() + self.ttl_s,
                route=scope.get("route"),
                headers=headers,
                body=b"".join(chunks),
                etag=found.get("etag"),
                cache_control=found.get("cache-control", "").encode() or None,
            )

    async def _replay(self, answer: _Answer, scope: Scope, send: Send) -> None:
        wanted = Headers(scope=scope).get("if-none-match")
        if answer.etag is not None and matches(wanted, answer.etag):
            headers = [(b"etag", answer.etag.encode())]
            if answer.cache_control is not None:
                headers.append((b"cache-control", answer.cache_control))
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})
