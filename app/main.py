"""The web application: `create_app(settings)` and the lifespan that wires everything.

`uvicorn app.main:app` works: `app` is built on first access (PEP 562), so
importing this module creates nothing and reads no environment.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.api import admin, board, ops, rates, sse, ws
from app.api.docs import asyncapi_page
from app.api.docs.openapi import install_openapi, operation_id
from app.api.middleware.answer_cache import AnswerCache
from app.api.middleware.no_store import NoStore
from app.api.middleware.request_metrics import RequestMetrics
from app.api.middleware.security_headers import SecurityHeaders
from app.errors import add_error_handlers
from app.kit.logs import configure_logging
from app.kit.metrics import Metrics
from app.limits.per_client import ClientLimit
from app.live.protocol import warn_if_untested_uvicorn
from app.services import open_services
from app.settings import Settings, load_settings
from app.shutdown import GracefulShutdown
from app.state import State


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with (
            open_services(settings, metrics, start_poller=settings.poller_enabled) as services,
            GracefulShutdown(
                services.hub, services.poller, drain_s=settings.shutdown_drain_seconds
            ).on_sigterm() as shutdown,
        ):
            # Read through app.state, by the dependencies in app.api.deps and the middleware.
            yield State(services=services, shutdown=shutdown)

    app = FastAPI(
        title="fxrates",
        summary="Real-time exchange rates for remittance apps, in Flutterwave's own JSON shape.",
        description='Every error has the envelope `{"status": "error", "message": …, "data": null}`. '
        "The WebSocket `/ws/rates` is described by the AsyncAPI document at [/asyncapi.json](/asyncapi.json), "
        "rendered at [/docs/websocket](/docs/websocket); `/sse/rates` is the same stream as server-sent events. "
        "The reference is in the project's `docs/` folder.\n\n"
        "An API key is optional on the public `/api` endpoints: sent as `Authorization: Bearer <key>`, a valid one is "
        "counted against its own limit (`RATE_LIMIT_PER_KEY_PER_MINUTE`) instead of the address's; an unknown or "
        "revoked one is a 401. `/api/admin` needs an operator's key.",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
        generate_unique_id_function=operation_id,
    )
    add_error_handlers(app)
    install_openapi(app, settings)
    # Listed innermost first. The answer cache sits next to the router; the per-client limit outside it, so an
    # answer replayed from it is still counted and carries the RateLimit headers; CORS outside that, so a browser
    # can read a 429; the headers every answer carries, and the request counts, outermost. The per-client limit
    # also verifies a key a request carries (app.limits.per_key), so a bad one is refused before anything else
    # runs; admin answers, its refusals included, are marked no-store just outside it.
    app.add_middleware(AnswerCache, paths=frozenset({"/api/rates", "/api/rates/all"}))
    app.add_middleware(ClientLimit)
    app.add_middleware(NoStore, prefix="/api/admin")
    app.add_middleware(NoStore, prefix="/sse")  # a stream, and its refusals, are never kept
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origins,
        allow_methods=["GET"],
        allow_headers=["*"],
        expose_headers=[
            "Retry-After",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
            "ETag",
            "X-Request-ID",
            "WWW-Authenticate",
        ],
    )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestMetrics, requests=metrics.requests, durations=metrics.request_seconds)
    app.include_router(rates.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.include_router(ws.router)
    app.include_router(sse.router)
    app.include_router(board.router)
    app.include_router(asyncapi_page.router)
    app.mount("/static", StaticFiles(directory=board.WEB_DIR / "static"), name="static")
    return app


@cache
def _app_from_environment() -> FastAPI:
    settings = load_settings()
    configure_logging(settings.log_format)
    warn_if_untested_uvicorn()
    return create_app(settings)


def __getattr__(name: str) -> FastAPI:
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
