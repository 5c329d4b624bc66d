"""`/api/admin/corridors`: pause, withhold and resume a pair, and set or end a manual rate (docs/rest.md, "Admin").

A state change is a row of its own: it commits with its audit row, then the corridor event goes to this
process's hub (at once, before the answer) and to every other process. An override's value is stored by the
store's batch writer, in the writer's transaction (with its terms), so its audit row is written right after, as
the refresh's is (docs/design.md, "Corridors and overrides"). Resuming a pair, or ending its override, fetches
it at once.
"""

from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from fastapi.openapi.models import Example

from app.admin import audit
from app.admin import corridors as rows
from app.admin.keys import VerifiedKey
from app.api.admin.auth import OperatorDep
from app.api.admin.schemas import (
    AUTH_ERRORS,
    CorridorAnswer,
    CorridorItem,
    CorridorRequest,
    CorridorsData,
    CorridorsResponse,
    CorridorView,
    OverrideRequest,
    OverrideView,
    Reason,
    StoredView,
    error,
)
from app.api.deps import (
    DatabaseDep,
    HubDep,
    MetricsDep,
    PollerDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
    get_with_and_without_slash,
)
from app.currencies import Pair
from app.errors import InvalidRequest
from app.kit.metrics import Metrics
from app.live.hub import Hub
from app.rates.corridors import Corridor, State
from app.rates.store import RateStore, utc_now
from app.rates.wire import CorridorChanged
from app.storage import repository
from app.storage.health import DatabaseHealth
from app.storage.rate import StoredRate
from app.upstream.quote import significant

router = APIRouter(prefix="/api/admin", tags=["admin"])

SourceCode = Annotated[str, Path(pattern="^[A-Za-z]{3}$", description="ISO 4217 code, any case", examples=["USD"])]
DestinationCode = Annotated[str, Path(pattern="^[A-Za-z]{3}$", description="ISO 4217 code, any case", examples=["NGN"])]
REJECTED = error(
    "The pair is not valid or was never stored, the body is malformed, the reason is missing or too long",
    "Invalid pair: USD/JPY was never stored; only stored pairs have a corridor.",
)
UNREADABLE = error("The body cannot be read at all (not text)", "There was an error parsing the body")
REASONS: dict[str, Example] = {
    "pause": {"summary": "Paused upstream", "value": {"reason": "Flutterwave suspended USD/NGN payouts"}},
}


def _pair(source: str, destination: str) -> Pair:
    try:
        return Pair.parse(source, destination)
    except ValueError as problem:
        raise InvalidRequest(f"Invalid pair: {problem}.", [{"field": "pair", "message": str(problem)}]) from None


async def _stored(pair: Pair, store: RateStore) -> StoredRate:
    rate = await store.current(pair)
    if rate is None:
        message = f"{pair} was never stored; only stored pairs have a corridor"
        raise InvalidRequest(f"Invalid pair: {message}.", [{"field": "pair", "message": message}])
    return rate


def _view(pair: Pair, corridor: Corridor | None) -> CorridorView:
    if corridor is None:
        return CorridorView(pair=str(pair), state="active")
    return CorridorView(
        pair=str(pair), state=corridor.state.value, reason=corridor.reason, since=corridor.since, by=corridor.by
    )


async def _change_state(
    pair: Pair,
    state: State,
    reason: str,
    operator: VerifiedKey,
    *,
    sessions: Any,
    database: DatabaseHealth,
    hub: Hub,
    metrics: Metrics,
) -> CorridorAnswer:
    action = {State.paused: "pause", State.withheld: "withhold", State.active: "resume"}[state]
    corridor = Corridor(state, reason, utc_now(), operator.name)

    async def write() -> tuple[Corridor | None, Any]:
        async with sessions() as session:
            result = await rows.set_state(session, pair, corridor, action=action)
            await session.commit()
            return result

    _, override_until = await database.call(write, write=True)
    # This process first (before the answer), then every other one.
    message = CorridorChanged.of(pair, corridor, override_until, notify=True).model_dump_json()
    hub.corridor_changed(message)
    await hub.publish(message)
    metrics.operator_actions.labels(action=action).inc()
    return CorridorAnswer(data=_view(pair, corridor))


def _state_endpoint(state: State, path: str, summary: str, description: str) -> None:
    async def endpoint(
        source: SourceCode,
        destination: DestinationCode,
        body: Annotated[CorridorRequest, Body(openapi_examples=REASONS)],
        operator: OperatorDep,
        store: StoreDep,
        sessions: SessionsDep,
        database: DatabaseDep,
        hub: HubDep,
        metrics: MetricsDep,
        poller: PollerDep,
    ) -> CorridorAnswer:
        pair = _pair(source, destination)
        await _stored(pair, store)
        answer = await _change_state(
            pair, state, body.reason, operator, sessions=sessions, database=database, hub=hub, metrics=metrics
        )
        if state is State.active:
            await poller.refresh([pair])  # fetched at once (unless an override is in force)
        return answer

    endpoint.__name__ = path
    router.post(
        f"/corridors/{{source}}/{{destination}}/{path}",
        response_model=CorridorAnswer,
        summary=summary,
        description=description + " Writes one row of the audit trail.",
        responses={**AUTH_ERRORS, 400: UNREADABLE, 422: REJECTED},
    )(endpoint)


_state_endpoint(
    State.paused,
    "pause",
    "Stop fetching a pair; keep serving its last rate, marked",
    "Not fetched any more (poller, on-demand, refresh); the last rate stored is still served, with "
    '`meta.corridor` and the rate item\'s `corridor` field `{"state": "paused", …}`. Clients following the pair '
    "get a `corridor` frame.",
)
_state_endpoint(
    State.withheld,
    "withhold",
    "Stop fetching and serving a pair",
    "Not fetched and not served: `/api/rates` for the pair answers 503, `/api/rates/all` and WebSocket snapshots "
    "leave it out, `get_rate` answers an error; history still answers. Clients following the pair get a "
    "`corridor` frame.",
)
_state_endpoint(
    State.active,
    "resume",
    "Fetch and serve a pair again",
    "`active` again, and fetched at once (unless a manual override is in force). Clients following the pair get "
    "a `corridor` frame.",
)

OVERRIDE_EXAMPLES: dict[str, Example] = {
    "hour": {
        "summary": "A manual rate for an hour",
        "value": {
            "destination_per_source": "1530.25",
            "expires_in_seconds": 3600,
            "reason": "Upstream down; rate agreed with treasury",
        },
    }
}


def _manual_quote(pair: Pair, body: OverrideRequest, amount: Decimal, operator: VerifiedKey) -> repository.ManualQuote:
    value = body.destination_per_source
    now = utc_now()
    return repository.ManualQuote(
        pair=pair,
        rate=significant(1 / value),
        destination_per_source=value,
        source_amount=significant(amount / value),
        destination_amount=amount,
        provider=repository.MANUAL,
        received_at=now,
        actor=operator.name,
        reason=body.reason,
        expires_at=now + timedelta(seconds=body.expires_in_seconds),
    )


@router.post(
    "/corridors/{source}/{destination}/override",
    response_model=CorridorAnswer,
    summary="Set a manual rate until it expires",
    description="Stores the rate as any change is stored (a `seq`, history with the key's name, pushed to every "
    'client) with `"provider": "manual"`. Fetched values do not replace it until it expires (then the next fetch '
    "does) or is ended (`DELETE`). Refused for a withheld pair. Writes one row of the audit trail, right after the "
    "value is stored.",
    responses={**AUTH_ERRORS, 400: UNREADABLE, 422: REJECTED},
)
async def override(
    source: SourceCode,
    destination: DestinationCode,
    body: Annotated[OverrideRequest, Body(openapi_examples=OVERRIDE_EXAMPLES)],
    operator: OperatorDep,
    store: StoreDep,
    sessions: SessionsDep,
    database: DatabaseDep,
    hub: HubDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> CorridorAnswer:
    pair = _pair(source, destination)
    previous = await _stored(pair, store)
    corridor = hub.corridors.corridor(pair)
    if corridor is not None and corridor.state is State.withheld:
        message = f"{pair} is withheld; resume it before setting a manual rate"
        raise InvalidRequest(f"Invalid pair: {message}.", [{"field": "pair", "message": message}])
    quote = _manual_quote(pair, body, settings.upstream_quote_amount, operator)
    result = await store.save(quote)
    message = CorridorChanged.of(
        pair,
        corridor or Corridor(State.active, body.reason, quote.received_at, operator.name),
        quote.expires_at,
        notify=False,
    ).model_dump_json()
    hub.corridor_changed(message)
    await hub.publish(message)

    async def write_row() -> None:
        async with sessions() as session:
            audit.record(
                session,
                at=quote.received_at,
                actor=operator.name,
                action="override",
                pairs=[pair],
                reason=body.reason,
                before={str(pair): {"destination_per_source": str(previous.destination_per_source)}},
                after={
                    str(pair): {
                        "destination_per_source": str(quote.destination_per_source),
                        "expires_at": quote.expires_at.isoformat(),
                        "seq": result.rate.seq,
                    }
                },
            )
            await session.commit()

    await database.call(write_row, write=True)
    metrics.operator_actions.labels(action="override").inc()
    return CorridorAnswer(data=_view(pair, corridor))


@router.delete(
    "/corridors/{source}/{destination}/override",
    response_model=CorridorAnswer,
    summary="End a manual rate now",
    description="Ends the pair's override in force and fetches the pair at once (unless it is paused or withheld), "
    "so a fetched value replaces the manual one. Writes one row of the audit trail with the end.",
    responses={
        **AUTH_ERRORS,
        422: error(
            "The pair is not valid, no override of it is in force, or the reason is missing or too long",
            "Invalid pair: USD/NGN has no override in force.",
        ),
    },
)
async def end_override(
    source: SourceCode,
    destination: DestinationCode,
    reason: Annotated[Reason, Query(examples=["Upstream back; ending the manual rate"])],
    operator: OperatorDep,
    sessions: SessionsDep,
    database: DatabaseDep,
    hub: HubDep,
    metrics: MetricsDep,
    poller: PollerDep,
) -> CorridorAnswer:
    pair = _pair(source, destination)
    now = utc_now()

    async def write() -> bool:
        async with sessions() as session:
            ended = await rows.end_override(session, pair, at=now, actor=operator.name, reason=reason)
            if ended:
                await session.commit()
            return ended

    if not await database.call(write, write=True):
        message = f"{pair} has no override in force"
        raise InvalidRequest(f"Invalid pair: {message}.", [{"field": "pair", "message": message}])
    corridor = hub.corridors.corridor(pair)
    message = CorridorChanged.of(
        pair, corridor or Corridor(State.active, reason, now, operator.name), None, notify=False
    ).model_dump_json()
    hub.corridor_changed(message)
    await hub.publish(message)
    metrics.operator_actions.labels(action="end_override").inc()
    await poller.refresh([pair])  # a fetched value replaces the manual one now (unless paused or withheld)
    return CorridorAnswer(data=_view(pair, corridor))


@get_with_and_without_slash(
    router,
    "/corridors",
    response_model=CorridorsResponse,
    summary="Every stored pair's corridor",
    description="Each stored pair: its state, reason, since and by whom, the stored rate, and the override if "
    "one is stored (with the last fetched value it replaced).",
    responses={**AUTH_ERRORS},
)
async def list_corridors(operator: OperatorDep, sessions: SessionsDep, database: DatabaseDep) -> CorridorsResponse:
    async def read() -> tuple[list[StoredRate], Any, list[repository.OverrideRow]]:
        async with sessions() as session:
            rates = await repository.list_current(session)
            corridors, _ = await rows.load(session)
            return rates, corridors, await repository.list_overrides(session)

    rates, corridors, overrides = await database.call(read)
    by_pair = {override.pair: override for override in overrides}
    now = utc_now()
    items = []
    for rate in rates:
        view = _view(rate.pair, corridors.get(rate.pair))
        found = by_pair.get(rate.pair)
        items.append(
            CorridorItem(
                **view.model_dump(),
                stored=StoredView(
                    destination_per_source=rate.destination_per_source,
                    provider=rate.provider,
                    last_updated=rate.last_updated,
                    seq=rate.seq,
                ),
                override=None
                if found is None
                else OverrideView(
                    destination_per_source=found.destination_per_source,
                    reason=found.reason,
                    by=found.actor,
                    since=found.set_at,
                    expires_at=found.expires_at,
                    in_force=now < found.expires_at,
                    fetched_destination_per_source=found.fetched_destination_per_source,
                ),
            )
        )
    return CorridorsResponse(data=CorridorsData(corridors=items))
