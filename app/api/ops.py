"""Operations: liveness, readiness and Prometheus metrics (docs/operations.md)."""

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from app.api.deps import (
    DatabaseDep,
    HubDep,
    MetricsDep,
    PollerDep,
    RedisDep,
    SettingsDep,
    ShutdownDep,
    get_with_and_without_slash,
)
from app.errors import DatabaseUnavailable, NotFound
from app.ingest.poller import Poller
from app.ingest.schedule import Role
from app.kit.metrics import Metrics
from app.kit.throttle import Throttle
from app.limits.addresses import client_ip
from app.live.hub import Hub
from app.rates.corridors import State
from app.settings import Settings
from app.state import services_of
from app.storage import repository
from app.storage.health import DatabaseHealth

router = APIRouter(tags=["operations"])

CHECK_TIMEOUT_S = 2.0
# `/readyz` and `/metrics` probe the database, Redis and the poller's beat at most this often per process.
PROBE_INTERVAL_S = 1.0

Problems = tuple[str | None, str | None, str | None]
"""What is wrong with the database, Redis and the poller; None where nothing is."""


async def get_probes(connection: HTTPConnection) -> Throttle[Problems]:
    return services_of(connection.scope).probes


ProbesDep = Annotated[Throttle[Problems], Depends(get_probes)]


@get_with_and_without_slash(
    router,
    "/healthz",
    summary="Alive: answers without touching the database, Redis or the upstream",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _database(database: DatabaseHealth) -> str | None:
    # Bounded by DB_TIMEOUT_SECONDS; while the database is known to be away, answered without touching it.
    try:
        await database.ping()
    except DatabaseUnavailable:
        return database.problem or "unreachable"
    return None


async def _redis(redis: Redis | None) -> str | None:
    if redis is None:
        return None
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await redis.ping()
    except Exception as error:
        return f"unreachable ({type(error).__name__})"
    return None


async def _poller(poller: Poller, enabled: bool, interval_s: float) -> str | None:
    if not enabled or poller.started_at is None:
        return None
    # Three missed cycles (at least a minute) before polling counts as failing, so one slow cycle is no outage.
    allowed_s = max(3 * interval_s, 60.0)
    last_success = await poller.schedule.last_success()
    since = max(last_success or 0.0, poller.started_at)
    if time.time() - since <= allowed_s:
        return None
    if last_success is None:
        return f"no successful cycle since start {time.time() - poller.started_at:.0f}s ago"
    return f"last successful cycle {time.time() - last_success:.0f}s ago"


READY_EXAMPLE = {"status": "success", "message": "Ready", "data": {"database": "ok", "redis": "ok", "poller": "ok"}}
NOT_READY_EXAMPLE = {
    "status": "error",
    "message": "Not ready: database unreachable for 12s (ConnectionRefusedError: Connect call failed).",
    "data": {
        "database": "unreachable for 12s (ConnectionRefusedError: Connect call failed)",
        "redis": "ok",
        "poller": "ok (leading)",
    },
}


@get_with_and_without_slash(
    router,
    "/readyz",
    summary="Ready: database and Redis reachable, poller cycling",
    responses={
        200: {"content": {"application/json": {"example": READY_EXAMPLE}}},
        503: {
            "description": "A part is failing; it is named",
            "content": {"application/json": {"example": NOT_READY_EXAMPLE}},
        },
    },
)
async def readyz(
    settings: SettingsDep,
    shutdown: ShutdownDep,
    database: DatabaseDep,
    redis: RedisDep,
    poller: PollerDep,
    probes: ProbesDep,
) -> JSONResponse:
    if shutdown.draining:
        # Checked first and alone: a load balancer must see this at once, whatever the parts say.
        body = {"status": "error", "message": "Not ready: shutting down.", "data": {"shutdown": "draining"}}
        return JSONResponse(body, status_code=503)
    database_problem, redis_problem, polling = await _problems(probes, settings, database, redis, poller)
    failures = {"database": database_problem, "redis": redis_problem, "poller": polling}
    data: dict[str, Any] = {part: problem or "ok" for part, problem in failures.items()}
    if settings.redis_url is None:
        data["redis"] = "not configured"
    data["poller"] = f"{polling or 'ok'} ({poller.schedule.role})" if settings.poller_enabled else "disabled"
    failing = [f"{part} {problem}" for part, problem in failures.items() if problem]
    if failing:
        body = {"status": "error", "message": f"Not ready: {'; '.join(failing)}.", "data": data}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "success", "message": "Ready", "data": data})


NOT_ALLOWED_EXAMPLE = {"status": "error", "message": "No such endpoint.", "data": None}


@get_with_and_without_slash(
    router,
    "/metrics",
    summary="Prometheus metrics",
    description="Only for clients whose address is in `METRICS_ALLOW_IPS`; any other gets a 404.",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"example": 'fxrates_upstream_calls_total{outcome="success"} 44.0\n'}}},
        404: {
            "description": "The client's address is not in `METRICS_ALLOW_IPS`",
            "content": {"application/json": {"example": NOT_ALLOWED_EXAMPLE}},
        },
    },
)
async def metrics(
    request: Request,
    settings: SettingsDep,
    registry: MetricsDep,
    database: DatabaseDep,
    redis: RedisDep,
    hub: HubDep,
    poller: PollerDep,
    probes: ProbesDep,
) -> Response:
    ip = client_ip(request.scope)
    if ip is None or not any(ip in network for network in settings.metrics_allow_ips):
        # As if there were nothing here: a public client learns nothing, not even that it was refused.
        raise NotFound("No such endpoint.")
    (database_problem, redis_problem, _), _, _ = await asyncio.gather(
        _problems(probes, settings, database, redis, poller),
        _read_rate_times(hub, registry),
        _count_held(request),
    )
    registry.dependency_up.labels(dependency="database").set(database_problem is None)
    if settings.redis_url is not None:
        registry.dependency_up.labels(dependency="redis").set(redis_problem is None)
    now = time.time()
    for pair in settings.pairs:
        received_at = registry.rate_received_at.get(str(pair))
        if received_at is not None:
            registry.rate_age_seconds.labels(pair=str(pair)).set(max(0.0, now - received_at))
    polling = poller.started_at is not None and not poller.stopped
    roles: tuple[Role, ...] = ("leading", "standby", "alone")
    for role in roles:
        registry.poller_role.labels(role=role).set(polling and poller.schedule.role == role)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


async def _problems(
    probes: Throttle[Problems], settings: Settings, database: DatabaseHealth, redis: Redis | None, poller: Poller
) -> Problems:
    """What is wrong, from a probe at most `PROBE_INTERVAL_S` old: a flood of `/readyz` is no flood of pings."""

    async def probe() -> Problems:
        return await asyncio.gather(
            _database(database),
            _redis(redis),
            _poller(poller, settings.poller_enabled, settings.poll_interval_seconds),
        )

    return await probes(probe)


async def _count_held(request: Request) -> None:
    """Set `fxrates_rates_held` from the database (at most once a second per process), so every replica tells the
    same; on a failure the last value read stays."""
    services = services_of(request.scope)

    async def count() -> int:
        async def read() -> int:
            async with services.sessions() as session:
                return await repository.count_held(session)

        return await services.database.call(read)

    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            services.metrics.rates_held.set(await services.held_count(count))
    except Exception:  # the database check beside this one reports the failure
        return


async def _read_rate_times(hub: Hub, registry: Metrics) -> None:
    """Note when each stored rate was received, from the hub's snapshot (read at most once a second, and kept
    while the database is away); on a failure the last values read stay."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            snapshot = await hub.snapshot()
    except Exception:  # the database check beside this one reports the failure
        return
    for rate in snapshot.rates:
        registry.rate_received_at[str(rate.pair)] = rate.last_updated.timestamp()
    # The snapshot leaves withheld pairs out; paused ones are in it.
    counts = hub.corridors.counts()
    registry.corridors.labels(state="active").set(len(snapshot.rates) - counts[State.paused])
    for state, count in counts.items():
        if state is not State.active:
            registry.corridors.labels(state=state.value).set(count)
