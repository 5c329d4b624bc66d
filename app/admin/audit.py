"""The audit trail: one append-only row per operator action (docs/rest.md, "The audit trail").

`record` adds the row to the caller's session, so it commits (or rolls back)
with the action's own effect. Rows hold the key's name, never the key.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.currencies import Pair
from app.storage.models import AuditEntry


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    pairs: list[str]
    reason: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def record(
    session: AsyncSession,
    *,
    at: datetime,
    actor: str,
    action: str,
    pairs: Iterable[Pair],
    reason: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Add the action's row to `session`; the caller commits it with the action's effect."""
    session.add(
        AuditEntry(
            at=at,
            actor=actor,
            action=action,
            pairs=[str(pair) for pair in pairs],
            reason=reason,
            before=before,
            after=after,
        )
    )


async def list_rows(session: AsyncSession, *, since: datetime | None, limit: int) -> list[AuditRow]:
    """Newest first; `since`: only rows at or after that moment."""
    query = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    return [
        AuditRow(row.id, row.at, row.actor, row.action, list(row.pairs), row.reason, row.before, row.after)
        for row in await session.scalars(query)
    ]
