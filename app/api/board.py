"""The rates board (docs/board.md): one page for people, every asset served by the service itself.

Served with a Content-Security-Policy that lets the page load only the
service's own scripts and styles (no inline script or style), talk only to the
service itself (its REST API and its WebSocket), and never be framed
(docs/limits.md, "Headers").
"""

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

router = APIRouter(tags=["board"])

# A Host header fit to name in the policy; anything else leaves the WebSocket to 'self' alone.
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def content_security_policy(host: str | None) -> str:
    # 'self' covers ws: and wss: of the page's own host in current browsers; older ones need them named.
    sockets = f" ws://{host} wss://{host}" if host is not None and _HOST.match(host) else ""
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self'{sockets}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


# HEAD as well as GET: HTTP requires it, and uptime checkers probe the page with it.
@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def board(request: Request) -> FileResponse:
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": content_security_policy(request.headers.get("host")),
        # For browsers that predate frame-ancestors.
        "X-Frame-Options": "DENY",
    }
    return FileResponse(WEB_DIR / "index.html", headers=headers)
