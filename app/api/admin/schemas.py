"""Bodies and answers of `/api/admin`, and the error answers every admin endpoint documents."""

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from app.api.schemas import AuditLimit, ErrorResponse, Moment
from app.currencies import Pair
from app.errors import error_body
from app.rates.wire import Number

PAIR_PATTERN = "^[A-Za-z]{3}/[A-Za-z]{3}$"
_PAIR = re.compile(PAIR_PATTERN)
# One line of printable text: control characters have no place in a reason, and NUL is refused by PostgreSQL.
REASON_PATTERN = "^[^\\u0000-\\u001f\\u007f]+$"
MAX_PAIRS = 500

Reason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=500,
        pattern=REASON_PATTERN,
        description="Why, in 1-500 characters on one line; kept in the audit trail with the key's name.",
    ),
]


def _pair(value: Any) -> Pair:
    if not isinstance(value, str) or not _PAIR.fullmatch(value):
        raise ValueError(f"{value!r} is not a pair like USD/NGN")
    source, _, destination = value.partition("/")
    return Pair.parse(source, destination)


def _distinct(pairs: list[Pair]) -> list[Pair]:
    return list(dict.fromkeys(pairs))


PairText = Annotated[
    Pair,
    PlainValidator(_pair),
    WithJsonSchema(
        {"type": "string", "pattern": PAIR_PATTERN, "description": "`SOURCE/DESTINATION`, ISO 4217 codes, any case"}
    ),
]


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: (
        Annotated[list[PairText], Field(min_length=1, max_length=MAX_PAIRS), AfterValidator(_distinct)] | Literal["*"]
    ) = Field(description='Stored pairs to fetch now, or `"*"` for every stored pair. A pair never stored is a 422.')
    reason: Reason


Outcome = Literal["changed", "unchanged", "held", "skipped", "failed"]


class PairOutcome(BaseModel):
    pair: str = Field(description="`SOURCE/DESTINATION`", json_schema_extra={"pattern": "^[A-Z]{3}/[A-Z]{3}$"})
    outcome: Outcome = Field(
        description="`changed`: a new value was stored and pushed; `unchanged`: the upstream answered the stored "
        "value; `held`: the rate guard held the answer, out of bounds of the stored value, for confirmation (see "
        "`GET /api/admin/held`), and the stored rate stands; `skipped`: the pair is paused, withheld or under an "
        'override, and is not fetched (docs/operations.md, "Corridors"); '
        "`failed`: the upstream (or the database) did not answer, and the stored rate stands."
    )


class RefreshData(BaseModel):
    outcomes: list[PairOutcome]


class RefreshResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Refreshed"
    data: RefreshData


class CorridorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason


MAX_OVERRIDE_S = 86_400
# A positive decimal of at most 12 significant digits, as text: a manual rate is exact, never a float's reading.
DECIMAL_PATTERN = "^(?=.*[1-9])[0-9]{1,12}(\\.[0-9]{1,12})?$"


def _manual_value(value: Any) -> Decimal:
    if not isinstance(value, str) or not re.fullmatch(DECIMAL_PATTERN, value):
        raise ValueError('must be a positive decimal as a string, like "1530.25"')
    parsed = Decimal(value)
    if len(parsed.normalize().as_tuple().digits) > 12:
        raise ValueError("must have at most 12 significant digits")
    return parsed.normalize() if parsed == parsed.to_integral_value() else parsed


ManualValue = Annotated[
    Decimal,
    PlainValidator(_manual_value),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DECIMAL_PATTERN,
            "description": "Destination units per source unit, a positive decimal as a string (at most 12 "
            "significant digits)",
            "examples": ["1530.25"],
        }
    ),
]


class OverrideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destination_per_source: ManualValue
    expires_in_seconds: int = Field(
        ge=1, le=MAX_OVERRIDE_S, description="How long the manual rate stands: at most a day (86400)"
    )
    reason: Reason


CorridorStateName = Literal["active", "paused", "withheld"]


class CorridorView(BaseModel):
    pair: str = Field(description="`SOURCE/DESTINATION`", json_schema_extra={"pattern": "^[A-Z]{3}/[A-Z]{3}$"})
    state: CorridorStateName
    reason: str | None = Field(default=None, description="Why, as the operator said (none: never changed)")
    since: datetime | None = None
    by: str | None = Field(default=None, description="The name of the key that set the state (never the key)")


class CorridorAnswer(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Corridor updated"
    data: CorridorView


class StoredView(BaseModel):
    destination_per_source: Decimal
    provider: str
    last_updated: datetime
    seq: int


class OverrideView(BaseModel):
    destination_per_source: Decimal
    reason: str
    by: str
    since: datetime
    expires_at: datetime = Field(description="Ended early: when it was ended")
    in_force: bool
    fetched_destination_per_source: Decimal | None = Field(
        description="The last fetched value stored before it (what the rate guard compares with)"
    )


class CorridorItem(CorridorView):
    stored: StoredView
    override: OverrideView | None = Field(
        description="The manual value stored now, if the pair has one (in force, or expired and not replaced yet)"
    )


class CorridorsData(BaseModel):
    corridors: list[CorridorItem]


class CorridorsResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Corridors fetched"
    data: CorridorsData


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    since: Moment | None = Field(default=None, description="RFC 3339 date-time: rows at or after it (no zone: UTC).")
    limit: AuditLimit = Field(default=100, description="Rows at most, newest first.")


class AuditItem(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description="The name of the key that acted (never the key)")
    action: str
    pairs: list[str]
    reason: str
    before: dict[str, Any] | None = Field(description="What the action changed, as it was")
    after: dict[str, Any] | None = Field(description="What the action changed, as it became")


class AuditData(BaseModel):
    rows: list[AuditItem]


class AuditMeta(BaseModel):
    count: int


class AuditResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Audit trail fetched"
    data: AuditData
    meta: AuditMeta


def error(description: str, message: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "model": ErrorResponse,
        "description": description,
        "content": {"application/json": {"example": error_body(message)}},
    }
    if headers is not None:
        response["headers"] = headers
    return response


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: error(
        "No key, or an unknown or revoked one",
        "An operator API key is needed here: send it as 'Authorization: Bearer <key>'.",
        {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    ),
    403: error(
        "A valid key whose role is not `operator`",
        "The key 'app' is an integrator's; /api/admin needs an operator key.",
    ),
    429: error(
        "Over the key's limit, or 10 bad keys from this address within a minute; see `Retry-After`",
        "Too many requests with this key (at most 6000 a minute); try again later.",
        {"Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "integer"}}},
    ),
    503: error(
        "The database cannot be reached now (docs/outages.md); see `Retry-After`",
        "The database cannot be reached right now; try again shortly.",
        {"Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "integer"}}},
    ),
}


class HeldItem(BaseModel):
    pair: str = Field(description="`SOURCE/DESTINATION`", json_schema_extra={"pattern": "^[A-Z]{3}/[A-Z]{3}$"})
    held: Number = Field(description="The value held (`destination_per_source`): the latest answer out of bounds")
    stored: Number | None = Field(description="The stored value (`destination_per_source`), still served")
    move_bps: Number | None = Field(
        description="From `stored` to `held`, in basis points, signed: positive when `destination_per_source` rose"
    )
    first_seen: datetime = Field(description="When the first answer of this run out of bounds came")
    confirmations: int = Field(description="Later answers in a row that agreed with the value held", ge=0)


class HeldData(BaseModel):
    held: list[HeldItem]


class HeldMeta(BaseModel):
    count: int
    guard_bps: int = Field(description="`RATE_GUARD_BPS`: 0 when the guard is off")
    confirmations_needed: int = Field(description="`RATE_GUARD_CONFIRMATIONS`: 0 when only an operator stores one")


class HeldResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Held values fetched"
    data: HeldData
    meta: HeldMeta


class HeldDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason


class HeldDecided(BaseModel):
    pair: str = Field(description="`SOURCE/DESTINATION`", json_schema_extra={"pattern": "^[A-Z]{3}/[A-Z]{3}$"})
    held: Number = Field(description="The value that was held (`destination_per_source`)")
    stored: Number | None = Field(description="The stored value now (`destination_per_source`)")
    seq: int | None = Field(description="The sequence number of the store, when the value was accepted")


class HeldDecisionResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str
    data: HeldDecided
