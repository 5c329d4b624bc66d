"""What schemathesis must not send as "schema-valid", each with its reason.

Loaded by `tests/test_openapi.py` through `SCHEMATHESIS_HOOKS`. JSON Schema describes one query parameter at a
time, so rules that tie two parameters together cannot be in the OpenAPI document; each is said in the
parameters' descriptions instead, and only a request that breaks one of them is left out here. Likewise a
refresh naming a well-formed pair the service never stored: a 422 that depends on the data, not the request's
shape (a corridor action is sent for a stored pair instead: `map_path_parameters`); withholds and overrides are
left out of the run (`LEFT_OUT`). Nothing else is excluded: every check runs, on every other request.
"""

import re
from datetime import datetime
from typing import Any

import schemathesis

from app.api.admin.schemas import PAIR_PATTERN
from app.settings import Settings


def _moment(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None


def breaks_a_rule_across_parameters(query: dict[str, Any]) -> str | None:
    """The cross-parameter rule this query breaks, or None."""
    source, destination = query.get("source_currency"), query.get("destination_currency")
    if isinstance(source, str) and isinstance(destination, str) and source.upper() == destination.upper():
        return "source_currency and destination_currency name the same currency (a 422 by design)"
    if query.get("amount") is not None and query.get("source_amount") is not None:
        return "amount and source_amount exclude each other (a 422 by design)"
    if query.get("at") is not None and (query.get("since") is not None or query.get("until") is not None):
        return "at excludes since and until (a 422 by design)"
    since, until = _moment(query.get("since")), _moment(query.get("until"))
    if since is not None and until is not None:
        try:
            if until < since:
                return "until before since (a 422 by design)"
        except TypeError:  # one has a zone and the other not: the service reads the bare one as UTC
            pass
    return None


# What the live service polls (the default settings), so every one of them is stored before the first test.
STORED_PAIRS = {str(pair) for pair in Settings.model_construct().pairs}
PAIR = re.compile(PAIR_PATTERN)


def names_a_pair_never_stored(body: Any) -> str | None:
    """A refresh of a well-formed pair the service never stored: a 422 by design, on the service's state."""
    pairs = body.get("pairs") if isinstance(body, dict) else None
    if not isinstance(pairs, list) or not all(isinstance(pair, str) and PAIR.fullmatch(pair) for pair in pairs):
        return None  # malformed anyway: the schema already calls it invalid
    never = [pair for pair in pairs if pair.upper() not in STORED_PAIRS]
    return f"{', '.join(never)} never stored (a 422 by design)" if never else None


CORRIDOR = "/api/admin/corridors/{source}/{destination}/"
CODE = re.compile("^[A-Za-z]{3}$")
# Stored by the live service before the run; pausing and resuming it changes nothing any other check reads.
CORRIDOR_PAIR = {"source": "USD", "destination": "KES"}
# Left out of the run (tests/test_schemathesis.py): withholding makes the pair's reads 503s by design, which the
# server-error check counts; an override's 422s depend on the corridor's state. tests/test_corridors.py covers both.
LEFT_OUT = "^/api/admin/corridors/.*/(withhold|override)$"


@schemathesis.hook
def map_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any]) -> dict[str, Any]:
    """A corridor action on a well-formed pair the service never stored (a 422 on the data, not the request's
    shape) is sent for a stored pair instead, so every well-formed request gets through."""
    operation = context.operation
    if operation is None or not operation.path.startswith(CORRIDOR):
        return path_parameters
    source, destination = path_parameters.get("source"), path_parameters.get("destination")
    if not (isinstance(source, str) and isinstance(destination, str)):
        return path_parameters
    if CODE.fullmatch(source) and CODE.fullmatch(destination) and f"{source}/{destination}".upper() not in STORED_PAIRS:
        return {**path_parameters, **CORRIDOR_PAIR}
    return path_parameters


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    if case.query is not None and breaks_a_rule_across_parameters(case.query) is not None:
        return False
    return case.operation.path != "/api/admin/refresh" or names_a_pair_never_stored(case.body) is None
