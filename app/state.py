"""The lifespan's typed state, and the one place that reads it from a request's scope.

The lifespan (`app.main`) yields a `State`; the server hands every request and
WebSocket a shallow copy of it as `scope["state"]`. Dependencies
(`app.api.deps`) and the middleware that need a service read it through
`services_of` / `state_of`, never by a string key of their own.

The types are imported for the type checker only: the composition root
(`app.services`) imports the very modules (limits, middleware) that read the
state, so a run-time import would be circular.
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict, cast

from starlette.types import Scope

if TYPE_CHECKING:
    from app.services import Services
    from app.shutdown import GracefulShutdown


class State(TypedDict):
    services: "Services"
    shutdown: "GracefulShutdown"


def state_of(scope: Scope) -> State:
    try:
        state: State = scope["state"]
    except KeyError:
        raise RuntimeError("no lifespan state: the app was served without running its lifespan") from None
    return state


def services_of(scope: Scope) -> "Services":
    return state_of(scope)["services"]


def services_in(state: Mapping[str, Any]) -> "Services | None":
    """The services in a lifespan state the server holds (uvicorn's protocol, before any scope exists); None
    under an app without this lifespan."""
    return cast("Services | None", state.get("services"))
