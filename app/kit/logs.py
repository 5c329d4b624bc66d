"""Log lines: plain text for a terminal, or one JSON object a line for a log collector (docs/operations.md, Logs).

`LOG_FORMAT=json` routes every logger through one JSON handler on stderr,
uvicorn's own included, so nothing writes a line that is not JSON. Each object
has `time` (ISO 8601, UTC), `level`, `logger` and `message`, then whatever the
call passed as `extra`; a line logged while a request is served also carries
that request's `request_id`. The request records themselves (method, route,
status, duration) are written by `app.api.middleware.request_metrics` on the `app.access`
logger, and replace uvicorn's access log; uvicorn's `--no-access-log` turns
them off too.
"""

import logging
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

ACCESS_LOGGER = "app.access"

# Set by the request middleware for the duration of one request; tasks it starts inherit it.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def json_formatter() -> JsonFormatter:
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        # uvicorn passes a copy of each message with terminal colour codes; a collector has no use for it.
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
    )


def configure_logging(log_format: LogFormat = "text") -> None:
    """Set up the root logger once, at start-up; a no-op where logging is already set up (under a test runner)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(json_formatter())
        handler.addFilter(_WithRequestId())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # httpx logs every request at INFO; the client logs what matters (retries, rejections) itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    uvicorn_access = logging.getLogger("uvicorn.access")
    # uvicorn configured its loggers before importing the app; without --no-access-log its access logger has a handler.
    access_wanted = bool(uvicorn_access.handlers)
    if log_format == "json":
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
        # Our request records carry the route, duration and request id; uvicorn's plain line would only repeat them.
        uvicorn_access.handlers.clear()
        uvicorn_access.propagate = False
    else:
        access_wanted = False  # uvicorn's own access line stays, as a terminal user expects
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_wanted else logging.WARNING)
