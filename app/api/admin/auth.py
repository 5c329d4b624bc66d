"""`OperatorDep`: the operator key a request under `/api/admin` carried, or a 401 / 403.

The key was verified once, by `app.limits.per_client.ClientLimit` (an unknown
or revoked one is a 401 there); this reads who it belongs to. The `HTTPBearer`
parameter puts the bearer scheme in the OpenAPI document; it is never read.
"""

from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from app.admin.keys import Role, VerifiedKey
from app.errors import Forbidden, Unauthorized
from app.limits.per_key import key_of
from app.state import services_of

BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="operatorKey",
    description="An operator's API key (`python -m app.keys create NAME --role operator`), as "
    '`Authorization: Bearer <key>`. docs/operations.md, "Operators".',
)

NO_KEY = "An operator API key is needed here: send it as 'Authorization: Bearer <key>'."


async def get_operator(
    connection: HTTPConnection, _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
) -> VerifiedKey:
    key = key_of(connection.scope)
    failures = services_of(connection.scope).metrics.auth_failures
    if key is None:
        failures.labels(reason="missing").inc()
        raise Unauthorized(NO_KEY)
    if key.role != Role.operator:
        failures.labels(reason="forbidden").inc()
        raise Forbidden(f"The key {key.name!r} is an {key.role.value}'s; /api/admin needs an operator key.")
    return key


OperatorDep = Annotated[VerifiedKey, Depends(get_operator)]
"""The verified operator key (its name and role): what every admin endpoint takes, and the audit row names."""
