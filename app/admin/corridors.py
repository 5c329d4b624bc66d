"""Corridor states and overrides as the database holds them (docs/operations.md, "Corridors").

A state change is a row of its own: `set_state` writes it with its audit row in the caller's session, committed
together. An override's value goes through the store (`app.rates.store`, which writes its terms in the same
transaction as the value); ending one early is a row change of its own (`end_override`), audited with it.
"""

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.admin import audit
from app.currencies import Pair
from app.rates.corridors import Corridor, State
from app.storage import repository
from app.storage.models import CorridorRow


def _corridor(row: CorridorRow) -> Corridor:
    return Corridor(State(row.state), row.reason, row.since, row.actor)


async def load(session: AsyncSession) -> tuple[dict[Pair, Corridor], dict[Pair, datetime]]:
    """Every pair's corridor (active ones included) and the expiry of every stored override."""
    corridors = {
        Pair(row.source_currency, row.destination_currency): _corridor(row)
        for row in await repository.list_corridors(session)
    }
    overrides = {override.pair: override.expires_at for override in await repository.list_overrides(session)}
    return corridors, overrides


def describe(corridor: Corridor | None) -> dict[str, Any]:
    """As the audit trail and the admin API tell it."""
    if corridor is None:
        return {"state": State.active.value}
    return {
        "state": corridor.state.value,
        "reason": corridor.reason,
        "since": corridor.since.isoformat(),
        "by": corridor.by,
    }


async def set_state(
    session: AsyncSession, pair: Pair, corridor: Corridor, *, action: str
) -> tuple[Corridor | None, datetime | None]:
    """Store the pair's new corridor and its audit row, in the caller's session (the caller commits); the
    corridor before, and the expiry of the pair's stored override (for the event)."""
    row = await repository.get_corridor(session, pair)
    before = None if row is None else _corridor(row)
    if row is None:
        row = CorridorRow(source_currency=pair.source, destination_currency=pair.destination)
        session.add(row)
    row.state, row.reason, row.since, row.actor = corridor.state.value, corridor.reason, corridor.since, corridor.by
    audit.record(
        session,
        at=corridor.since,
        actor=corridor.by,
        action=action,
        pairs=[pair],
        reason=corridor.reason,
        before={str(pair): describe(before)},
        after={str(pair): describe(corridor)},
    )
    override = await repository.get_override(session, pair)
    return before, None if override is None else override.expires_at


async def current(session: AsyncSession, pair: Pair) -> Corridor | None:
    row = await repository.get_corridor(session, pair)
    return None if row is None else _corridor(row)


async def end_override(session: AsyncSession, pair: Pair, *, at: datetime, actor: str, reason: str) -> bool:
    """End the pair's override in force now, with its audit row, in the caller's session; False (nothing
    written) when none is in force. Its value stays stored until the next fetched value replaces it."""
    override = await repository.get_override(session, pair)
    if override is None or override.expires_at <= at:
        return False
    before = {
        "destination_per_source": str(override.destination_per_source),
        "expires_at": override.expires_at.isoformat(),
    }
    override.expires_at = at
    audit.record(
        session,
        at=at,
        actor=actor,
        action="end_override",
        pairs=[pair],
        reason=reason,
        before={str(pair): before},
        after={str(pair): {"destination_per_source": None}},
    )
    return True
