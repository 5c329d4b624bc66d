"""Counting requests by route template and status, as a plain ASGI middleware (no per-request task)."""

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestMetrics:
    def __init__(self, app: ASGIApp, requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The template, not the raw path, so label values stay few whatever clients send.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(route=route.rstrip("/") or "/", status=str(status)).inc()
