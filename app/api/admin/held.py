"""The rate guard's held values: list them, accept or reject one (docs/rest.md, "Held values").

A held value was fetched but not stored: it moved more than `RATE_GUARD_BPS` from the stored value
(docs/operations.md, "The rate guard"). Accepting stores it through the store's batch writer, as a fetched value
would be (pushed to every client, with a sequence number), so, as for a refresh, its audit row is written right
after, in a transaction of its own (docs/design.md, "The audit trail"). Rejecting deletes the held row and writes
the audit row in one transaction.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from fastapi.openapi.models import Example

from app.admin import audit
from app.api.admin.auth import OperatorDep
from app.api.admin.schemas import (
    AUTH_ERRORS,
    HeldData,
    HeldDecided,
    HeldDecision,
    HeldDecisionResponse,
    HeldItem,
    HeldMeta,
    HeldResponse,
    error,
)
from app.api.deps import DatabaseDep, MetricsDep, SessionsDep, SettingsDep, StoreDep, get_with_and_without_slash
from app.currencies import Pair
from app.errors import NotFound
from app.rates.guard import move_bps
from app.rates.store import utc_now
from app.storage import repository
from app.storage.rate import HeldQuote, StoredRate

router = APIRouter(prefix="/api/admin", tags=["admin"])

CODE = r"^[A-Za-z]{3}$"
Source = Annotated[str, Path(pattern=CODE, description="Source currency, ISO 4217", examples=["USD"])]
Destination = Annotated[str, Path(pattern=CODE, description="Destination currency, ISO 4217", examples=["NGN"])]

EXAMPLES: dict[str, Example] = {
    "accept": {
        "summary": "A devaluation confirmed elsewhere",
        "value": {"reason": "CBN devalued the naira this morning; matches the bank's rate"},
    },
    "reject": {
        "summary": "An upstream glitch",
        "value": {"reason": "Flutterwave glitch: ten times the market, support ticket 4411"},
    },
}
NOTHING_HELD = error("Nothing is held for the pair", "Nothing is held for USD/NGN.")
DECISION_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    400: error("The body cannot be read at all (not text)", "There was an error parsing the body"),
    404: NOTHING_HELD,
    422: error("The body is malformed, or the reason is missing or too long", "Invalid reason: Field required."),
}


def _pair(source: str, destination: str) -> Pair:
    try:
        return Pair.parse(source, destination)
    except ValueError:
        # Not a pair of currencies: nothing can be held for it.
        raise NotFound(f"Nothing is held for {source.upper()}/{destination.upper()}.") from None


def _item(held: HeldQuote, stored: StoredRate | None) -> HeldItem:
    value = held.quote.destination_per_source
    base = None if stored is None else stored.destination_per_source
    return HeldItem(
        pair=str(held.quote.pair),
        held=value,
        stored=base,
        move_bps=None if base is None or base <= 0 else move_bps(base, value),
        first_seen=held.first_seen,
        confirmations=held.confirmations,
    )


@get_with_and_without_slash(
    router,
    "/held",
    response_model=HeldResponse,
    summary="Values the rate guard holds",
    description="Every fetched value held for confirmation instead of stored, because it moved more than "
    "`RATE_GUARD_BPS` from the stored value: the pair, the value held, the value stored (still served), the move in "
    "basis points, when it was first seen and how many later answers agreed with it. Values are "
    "`destination_per_source`.",
    responses={
        **AUTH_ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "status": "success",
                        "message": "Held values fetched",
                        "data": {
                            "held": [
                                {
                                    "pair": "USD/NGN",
                                    "held": 15302.5,
                                    "stored": 1530.25,
                                    "move_bps": 90000,
                                    "first_seen": "2026-12-03T09:00:00Z",
                                    "confirmations": 0,
                                }
                            ]
                        },
                        "meta": {"count": 1, "guard_bps": 1000, "confirmations_needed": 2},
                    }
                }
            }
        },
    },
)
async def list_held(
    operator: OperatorDep, sessions: SessionsDep, database: DatabaseDep, settings: SettingsDep
) -> HeldResponse:
    async def read() -> list[tuple[HeldQuote, StoredRate | None]]:
        async with sessions() as session:
            return await repository.list_held(session)

    items = [_item(held, stored) for held, stored in await database.call(read)]
    meta = HeldMeta(
        count=len(items), guard_bps=settings.rate_guard_bps, confirmations_needed=settings.rate_guard_confirmations
    )
    return HeldResponse(data=HeldData(held=items), meta=meta)


@router.post(
    "/held/{source}/{destination}/accept",
    response_model=HeldDecisionResponse,
    summary="Store a held value",
    description="Stores the value held for the pair as a fetched value would be: pushed to every client, kept in "
    "history, with a sequence number; nothing is held for the pair any more. Writes one row of the audit trail.",
    responses=DECISION_ERRORS,
)
async def accept(
    source: Source,
    destination: Destination,
    body: Annotated[HeldDecision, Body(openapi_examples={"accept": EXAMPLES["accept"]})],
    operator: OperatorDep,
    store: StoreDep,
    sessions: SessionsDep,
    database: DatabaseDep,
    metrics: MetricsDep,
) -> HeldDecisionResponse:
    pair = _pair(source, destination)

    async def read() -> HeldQuote | None:
        async with sessions() as session:
            return await repository.get_held(session, pair)

    held = await database.call(read)
    if held is None:
        raise NotFound(f"Nothing is held for {pair}.")
    # Unguarded: stored whatever it is, and what is held for the pair is dropped in the same transaction.
    result = await store.save(held.quote, guarded=False)
    value = held.quote.destination_per_source
    before = {"stored": None if result.previous is None else str(result.previous.destination_per_source)}
    before["held"] = str(value)
    after = {"stored": str(result.rate.destination_per_source), "seq": result.rate.seq}
    await _audit(sessions, database, operator.name, "accept_held", pair, body.reason, before, after)
    metrics.operator_actions.labels(action="accept_held").inc()
    decided = HeldDecided(pair=str(pair), held=value, stored=result.rate.destination_per_source, seq=result.rate.seq)
    return HeldDecisionResponse(message="Held value stored", data=decided)


@router.post(
    "/held/{source}/{destination}/reject",
    response_model=HeldDecisionResponse,
    summary="Drop a held value",
    description="Drops the value held for the pair; the stored value stands, and the guard compares the next answer "
    "with it. Writes one row of the audit trail, in the same transaction.",
    responses=DECISION_ERRORS,
)
async def reject(
    source: Source,
    destination: Destination,
    body: Annotated[HeldDecision, Body(openapi_examples={"reject": EXAMPLES["reject"]})],
    operator: OperatorDep,
    sessions: SessionsDep,
    database: DatabaseDep,
    metrics: MetricsDep,
) -> HeldDecisionResponse:
    pair = _pair(source, destination)

    async def drop() -> tuple[HeldQuote, StoredRate | None] | None:
        async with sessions() as session:
            held = await repository.drop_held(session, pair)
            if held is None:
                return None
            stored = await repository.get_current(session, pair)
            audit.record(
                session,
                at=utc_now(),
                actor=operator.name,
                action="reject_held",
                pairs=[pair],
                reason=body.reason,
                before={"held": str(held.quote.destination_per_source)},
                after={"held": None},
            )
            await session.commit()
            return held, stored

    dropped = await database.call(drop, write=True)
    if dropped is None:
        raise NotFound(f"Nothing is held for {pair}.")
    metrics.operator_actions.labels(action="reject_held").inc()
    held, stored = dropped
    base = None if stored is None else stored.destination_per_source
    decided = HeldDecided(pair=str(pair), held=held.quote.destination_per_source, stored=base, seq=None)
    return HeldDecisionResponse(message="Held value dropped", data=decided)


async def _audit(
    sessions: SessionsDep,
    database: DatabaseDep,
    actor: str,
    action: str,
    pair: Pair,
    reason: str,
    before: dict[str, Any],
    after: dict[str, Any],
) -> None:
    async def write_row() -> None:
        async with sessions() as session:
            audit.record(
                session,
                at=utc_now(),
                actor=actor,
                action=action,
                pairs=[pair],
                reason=reason,
                before=before,
                after=after,
            )
            await session.commit()

    await database.call(write_row, write=True)
