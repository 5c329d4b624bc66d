"""The rates board (docs/board.md): one page for people, every asset served by the service itself."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

router = APIRouter(tags=["board"])


@router.get("/", include_in_schema=False)
async def board() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})
