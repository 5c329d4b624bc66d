"""What endpoints are handed: the lifespan's resources, as `Annotated` dependency aliases.

Each reads the lifespan's typed state (`app.state`); no route reads `request.state` itself.

They are `async def` on purpose: a plain `def` dependency runs in a worker thread, which costs more than
the whole rest of a cached rate lookup.
"""

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from app.api.history_answers import HistoryAnswers
from app.ingest.poller import Poller
from app.kit.metrics import Metrics
from app.live.hub import Hub
from app.rates.lookup import RateLookup
from app.rates.store import RateStore
from app.settings import Settings
from app.shutdown import GracefulShutdown
from app.state import services_of, state_of
from app.storage.health import DatabaseHealth

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


async def get_settings(connection: HTTPConnection) -> Settings:
    return services_of(connection.scope).settings


async def get_lookup(connection: HTTPConnection) -> RateLookup:
    return services_of(connection.scope).lookup


async def get_hub(connection: HTTPConnection) -> Hub:
    return services_of(connection.scope).hub


async def get_store(connection: HTTPConnection) -> RateStore:
    return services_of(connection.scope).store


async def get_database(connection: HTTPConnection) -> DatabaseHealth:
    return services_of(connection.scope).database


async def get_sessions(connection: HTTPConnection) -> async_sessionmaker[AsyncSession]:
    return services_of(connection.scope).sessions


async def get_metrics(connection: HTTPConnection) -> Metrics:
    return services_of(connection.scope).metrics


async def get_redis(connection: HTTPConnection) -> Redis | None:
    return services_of(connection.scope).redis


async def get_poller(connection: HTTPConnection) -> Poller:
    return services_of(connection.scope).poller


async def get_shutdown(connection: HTTPConnection) -> GracefulShutdown:
    return state_of(connection.scope)["shutdown"]


async def get_history_answers(connection: HTTPConnection) -> HistoryAnswers:
    return services_of(connection.scope).history_answers


SettingsDep = Annotated[Settings, Depends(get_settings)]
LookupDep = Annotated[RateLookup, Depends(get_lookup)]
HubDep = Annotated[Hub, Depends(get_hub)]
StoreDep = Annotated[RateStore, Depends(get_store)]
DatabaseDep = Annotated[DatabaseHealth, Depends(get_database)]
SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RedisDep = Annotated[Redis | None, Depends(get_redis)]
PollerDep = Annotated[Poller, Depends(get_poller)]
ShutdownDep = Annotated[GracefulShutdown, Depends(get_shutdown)]
HistoryAnswersDep = Annotated[HistoryAnswers, Depends(get_history_answers)]


def get_with_and_without_slash(router: APIRouter, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """Register a GET at `path` and at `path/`, both answering directly: clients of the Django service
    call `/api/rates/`, and a redirect would cost them a round trip (or break a client that does not follow it).

    Each also answers HEAD (HTTP requires it wherever GET works; uptime checkers and caches send it), as
    routes of their own left out of the OpenAPI document, so it still lists one GET per path."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.add_api_route(path, endpoint, methods=["GET"], **options)
        hidden = {**options, "include_in_schema": False}
        router.add_api_route(f"{path}/", endpoint, methods=["GET"], **hidden)
        for head_path in (path, f"{path}/"):
            router.add_api_route(head_path, endpoint, methods=["HEAD"], **hidden)
        return endpoint

    return register
