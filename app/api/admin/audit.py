"""`GET /api/admin/audit`: the audit trail, newest first (docs/rest.md, "The audit trail")."""

from typing import Annotated

from fastapi import APIRouter, Query

from app.admin import audit
from app.api.admin.auth import OperatorDep
from app.api.admin.schemas import AUTH_ERRORS, AuditData, AuditItem, AuditMeta, AuditQuery, AuditResponse, error
from app.api.deps import DatabaseDep, SessionsDep, get_with_and_without_slash

router = APIRouter(prefix="/api/admin", tags=["admin"])


@get_with_and_without_slash(
    router,
    "/audit",
    response_model=AuditResponse,
    summary="The audit trail, newest first",
    description="Every operator action: when, the key's name (never the key), the action, the pairs, the reason, "
    "and what changed, before and after.",
    responses={
        **AUTH_ERRORS,
        422: error(
            "`since` is not an RFC 3339 date-time, or `limit` is not 1-1000",
            "Invalid limit: Input should be less than or equal to 1000.",
        ),
    },
)
async def get_audit(
    query: Annotated[AuditQuery, Query()], operator: OperatorDep, sessions: SessionsDep, database: DatabaseDep
) -> AuditResponse:
    async def read() -> list[audit.AuditRow]:
        async with sessions() as session:
            return await audit.list_rows(session, since=query.since, limit=query.limit)

    rows = await database.call(read)
    items = [
        AuditItem(
            id=row.id,
            at=row.at,
            actor=row.actor,
            action=row.action,
            pairs=row.pairs,
            reason=row.reason,
            before=row.before,
            after=row.after,
        )
        for row in rows
    ]
    return AuditResponse(data=AuditData(rows=items), meta=AuditMeta(count=len(items)))
