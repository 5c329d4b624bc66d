"""`Cache-Control: no-store` on every answer under a prefix (`/api/admin`): what operators see is never kept by a
browser or a proxy, and `app.api.middleware.answer_cache` holds only the public paths it is given."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NO_STORE = (b"cache-control", b"no-store")


class NoStore:
    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        self.under = prefix + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] == self.prefix or scope["path"].startswith(self.under)):
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", ()) if name.lower() != b"cache-control"]
                message = {**message, "headers": [*kept, NO_STORE]}
            await send(message)

        await self.app(scope, receive, send_no_store)
