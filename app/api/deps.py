"""What endpoints are handed: the lifespan's resources, as `Annotated` dependency aliases.

They are `async def` on purpose: a plain `def` dependency runs in a worker thread, which costs more than
the whole rest of a cached rate lookup.
"""

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from app.kit.metrics import Metrics
from app.live.hub import Hub
from app.rates.lookup import RateLookup
from app.settings import Settings
from app.storage.health import DatabaseHealth

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


async def get_settings(request: HTTPConnection) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_lookup(request: HTTPConnection) -> RateLookup:
    lookup: RateLookup = request.state.lookup
    return lookup


async def get_hub(request: HTTPConnection) -> Hub:
    hub: Hub = request.state.hub
    return hub


async def get_database(request: HTTPConnection) -> DatabaseHealth:
    database: DatabaseHealth = request.state.database
    return database


async def get_sessions(request: HTTPConnection) -> async_sessionmaker[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.state.sessions
    return sessions


async def get_metrics(request: HTTPConnection) -> Metrics:
    metrics: Metrics = request.state.metrics
    return metrics


async def get_session(request: HTTPConnection) -> AsyncIterator[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.state.sessions
    async with sessions() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
LookupDep = Annotated[RateLookup, Depends(get_lookup)]
HubDep = Annotated[Hub, Depends(get_hub)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
DatabaseDep = Annotated[DatabaseHealth, Depends(get_database)]
SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


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
