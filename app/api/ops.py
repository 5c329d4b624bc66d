"""Operations endpoints: liveness."""

from fastapi import APIRouter

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Alive: answers without touching the database, Redis or the upstream")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
