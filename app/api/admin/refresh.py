"""`POST /api/admin/refresh`: fetch stored pairs from the upstream now, as the poller would (docs/rest.md).

Outside the on-demand budget: an operator asked. The rates are stored through
the store's own batch writer (`Poller.refresh`), so the audit row cannot share
their transaction: it is written right after, once every pair's outcome is
known (docs/design.md, "The audit trail").
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.openapi.models import Example

from app.admin import audit
from app.api.admin.auth import OperatorDep
from app.api.admin.schemas import AUTH_ERRORS, Outcome, PairOutcome, RefreshData, RefreshRequest, RefreshResponse, error
from app.api.deps import DatabaseDep, MetricsDep, PollerDep, SessionsDep
from app.currencies import Pair
from app.errors import InvalidRequest
from app.ingest.poller import Skipped
from app.rates.store import SaveResult, utc_now
from app.storage import repository

router = APIRouter(prefix="/api/admin", tags=["admin"])

ACTION = "refresh"
EXAMPLES: dict[str, Example] = {
    "some": {
        "summary": "Two pairs a customer reported stale",
        "value": {"pairs": ["USD/NGN", "GBP/KES"], "reason": "Customer report: USD/NGN looked stale"},
    },
    "all": {
        "summary": 'Every stored pair (`"*"`)',
        "value": {"pairs": "*", "reason": "Upstream incident over; refreshing everything"},
    },
}


def _outcome(result: SaveResult | Skipped | None) -> Outcome:
    if result is None:
        return "failed"
    if isinstance(result, Skipped):
        return "skipped"
    if not result.stored:
        return "held"
    return "changed" if result.changed else "unchanged"


@router.post(
    "/refresh",
    response_model=RefreshResponse,
    summary="Fetch stored pairs from the upstream now",
    description="Fetches each pair now, outside the on-demand budget, and stores what the upstream answers as the "
    "poller would, the rate guard included: a changed value is stored, pushed to every client and kept in history; "
    "a value out of the guard's bounds is held, not stored. Answers each pair's outcome. "
    "Writes one row of the audit trail.",
    responses={
        **AUTH_ERRORS,
        400: error("The body cannot be read at all (not text)", "There was an error parsing the body"),
        422: error(
            "The body is malformed, a reason is missing or too long, or a pair was never stored",
            "Invalid pairs: USD/JPY was never stored; only stored pairs can be refreshed.",
        ),
    },
)
async def refresh(
    body: Annotated[RefreshRequest, Body(openapi_examples=EXAMPLES)],
    operator: OperatorDep,
    poller: PollerDep,
    sessions: SessionsDep,
    database: DatabaseDep,
    metrics: MetricsDep,
) -> RefreshResponse:
    async def stored_pairs() -> list[Pair]:
        async with sessions() as session:
            return await repository.list_pairs(session)

    stored = await database.call(stored_pairs)
    if body.pairs == "*":
        pairs = sorted(stored)
    else:
        pairs = body.pairs
        never = [pair for pair in pairs if pair not in set(stored)]
        if never:
            named = ", ".join(map(str, never))
            message = f"{named} {'was' if len(never) == 1 else 'were'} never stored; only stored pairs can be refreshed"
            raise InvalidRequest(f"Invalid pairs: {message}.", [{"field": "pairs", "message": message}])
    results = await poller.refresh(pairs)
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for pair, result in zip(pairs, results, strict=True):
        saved = result if isinstance(result, SaveResult) else None
        if saved is not None and saved.previous is not None:
            before[str(pair)] = {"destination_per_source": str(saved.previous.destination_per_source)}
        value = str(saved.rate.destination_per_source) if saved is not None else None
        after[str(pair)] = {"destination_per_source": value, "outcome": _outcome(result)}
        if saved is not None and saved.held is not None:
            after[str(pair)]["held"] = str(saved.held.quote.destination_per_source)

    async def write_row() -> None:
        async with sessions() as session:
            audit.record(
                session,
                at=utc_now(),
                actor=operator.name,
                action=ACTION,
                pairs=pairs,
                reason=body.reason,
                before=before,
                after=after,
            )
            await session.commit()

    await database.call(write_row, write=True)
    metrics.operator_actions.labels(action=ACTION).inc()
    outcomes = [
        PairOutcome(pair=str(pair), outcome=_outcome(result)) for pair, result in zip(pairs, results, strict=True)
    ]
    return RefreshResponse(data=RefreshData(outcomes=outcomes))
