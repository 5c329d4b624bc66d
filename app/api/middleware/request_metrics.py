"""Each request counted and timed by route template, given a request id, and logged (docs/operations.md).

A plain ASGI middleware (no per-request task). The request id is the client's
`X-Request-ID` when it sends a sensible one, otherwise a new one; either way it
is returned in `X-Request-ID` and carried by every log line of the request.
"""

import itertools
import logging
import re
import secrets
import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit.logs import ACCESS_LOGGER, REQUEST_ID

access_log = logging.getLogger(ACCESS_LOGGER)

# Anything else a client sends is replaced: the id ends up in log lines and must not be able to forge them.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
REQUEST_ID_HEADER = b"x-request-id"


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            return text if CLIENT_REQUEST_ID.fullmatch(text) else None
    return None


def route_label(scope: Scope) -> str:
    """The route template (`/api/rates`), the mount for static files (`/static`), or `unmatched`.

    Templates, not raw paths, so label values stay few whatever clients send.
    """
    route = getattr(scope.get("route"), "path", None)
    if isinstance(route, str):
        return route.rstrip("/") or "/"
    # A mount (the static files) sets no route, but moves its prefix from the path into root_path.
    if "app_root_path" in scope:
        mount = scope.get("root_path", "").removeprefix(scope["app_root_path"])
        if mount:
            return str(mount)
    return "unmatched"


class RequestMetrics:
    def __init__(self, app: ASGIApp, requests: Counter, durations: Histogram | None = None) -> None:
        self.app = app
        self.requests = requests
        self.durations = durations
        # Ids unique across processes without a random draw per request: a random prefix per process, then a count.
        self._id_prefix = secrets.token_hex(10)
        self._id_count = itertools.count()
        # Label lookups cached: prometheus_client's labels() takes a lock and validates on every call.
        self._counted: dict[tuple[str, int], Counter] = {}
        self._timed: dict[str, Histogram] = {}

    def _new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_count):012x}"

    def _observe(self, route: str, status: int, duration_s: float) -> None:
        counter = self._counted.get((route, status))
        if counter is None:
            counter = self._counted[route, status] = self.requests.labels(route=route, status=str(status))
        counter.inc()
        if self.durations is not None:
            histogram = self._timed.get(route)
            if histogram is None:
                histogram = self._timed[route] = self.durations.labels(route=route)
            histogram.observe(duration_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _client_request_id(scope) or self._new_request_id()
        request_id_header = (REQUEST_ID_HEADER, request_id.encode())
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # A new list: a cached answer's headers are shared between responses.
                message = {**message, "headers": [*message.get("headers", ()), request_id_header]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            REQUEST_ID.reset(token)
            duration_s = time.perf_counter() - started
            route = route_label(scope)
            self._observe(route, status, duration_s)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_s": round(duration_s, 6),
                        "client": client[0] if client else None,
                        "request_id": request_id,
                    },
                )
