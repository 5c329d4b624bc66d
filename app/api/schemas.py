"""Query parameters and response bodies of the REST API; the rate fields share `rates.wire`'s types.

Query values are checked against exactly what the OpenAPI document says of them (the same patterns), so a
request the document calls valid is served and one it calls invalid is refused: see docs/rest.md.
"""

import re
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from app.currencies import Pair, known_currencies, normalise_currency
from app.rates.lookup import Layer
from app.rates.wire import CorridorMark, Number, absent

_THREE_LETTERS = re.compile(r"[A-Za-z]{3}")
# Digits with at most one point: at most 11 before it and 4 after it (any ISO 4217 minor unit, 15 significant
# digits in all), and not zero. No sign, exponent, spaces or leading zeros, so the text means one number.
AMOUNT_PATTERN = (
    r"^(?:[1-9][0-9]{0,10}(?:\.[0-9]{1,4})?|0\.(?:[1-9][0-9]{0,3}|0[1-9][0-9]{0,2}|00[1-9][0-9]?|000[1-9]))$"
)
_AMOUNT = re.compile(AMOUNT_PATTERN)
# RFC 3339 (the OpenAPI `date-time`); a moment without a zone is also taken, and read as UTC.
_MOMENT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?"
)
_LIMIT = re.compile(r"[0-9]{1,9}")
UTC_MIN = datetime.min.replace(tzinfo=UTC)
UTC_MAX = datetime.max.replace(tzinfo=UTC)


@cache
def currency_pattern() -> str:
    """Every ISO 4217 code, in any case: the exact set of values a currency parameter accepts."""
    any_case = ("".join(f"[{letter}{letter.lower()}]" for letter in code) for code in sorted(known_currencies()))
    return f"^(?:{'|'.join(any_case)})$"


def _currency(value: str) -> str:
    # Checked for shape first: spaces or other padding are refused rather than trimmed, as the pattern says.
    if not _THREE_LETTERS.fullmatch(value):
        raise ValueError(f"{value!r} is not an ISO 4217 currency code")
    return normalise_currency(value)


def _currency_list(values: list[str] | None) -> list[str] | None:
    # `NGN,KES` (one comma-separated value, as documented) and `NGN&…=KES` (repeated) both name a list.
    if values is None:
        return None
    return list(dict.fromkeys(_currency(code) for value in values for code in value.split(",")))


def _amount(value: Any) -> Any:
    if isinstance(value, str) and not _AMOUNT.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a positive decimal like 1000 or 12.5 "
            "(digits and at most one point; at most 11 digits before it and 4 after it)"
        )
    return value


def _moment(value: Any) -> Any:
    if isinstance(value, str) and not _MOMENT.fullmatch(value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time like 2026-11-24T14:05:00Z")
    return value


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    # A moment without a zone is read as UTC, the zone every timestamp of this API is in.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # Before year 1 or after year 9999 once in UTC: before or after every rate, as far as this API can tell.
        return UTC_MIN if value.year == 1 else UTC_MAX


def _limit(value: Any) -> Any:
    if isinstance(value, str) and not _LIMIT.fullmatch(value):
        raise ValueError(f"{value!r} is not a whole number of points")
    return value


def _currency_schema(schema: dict[str, Any]) -> None:
    schema["pattern"] = currency_pattern()


CurrencyCode = Annotated[str, AfterValidator(_currency), Field(json_schema_extra=_currency_schema)]
CurrencyCodes = Annotated[
    list[Annotated[str, Field(json_schema_extra=_currency_schema)]],
    Field(min_length=1),
    AfterValidator(_currency_list),
]
Amount = Annotated[Decimal, BeforeValidator(_amount), WithJsonSchema({"type": "string", "pattern": AMOUNT_PATTERN})]
Moment = Annotated[
    datetime,
    BeforeValidator(_moment),
    AfterValidator(_as_utc),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Limit = Annotated[
    int,
    BeforeValidator(_limit),
    Field(ge=1, le=5000),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 5000}),
]

AuditLimit = Annotated[
    int,
    BeforeValidator(_limit),
    Field(ge=1, le=1000),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 1000}),
]


class RateQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source_currency: CurrencyCode = Field(description="ISO 4217 code (any case) of what the sender pays in.")
    destination_currency: CurrencyCode = Field(
        description="ISO 4217 code (any case) of what the recipient gets; not the same as `source_currency`."
    )
    amount: Amount | None = Field(
        default=None,
        description="What the recipient gets, in the destination currency (Flutterwave's meaning); default 1. "
        "**Not together with `source_amount`.**",
    )
    source_amount: Amount | None = Field(
        default=None,
        description="What the sender pays, in the source currency: the answer says what arrives. "
        "**Not together with `amount`.**",
    )

    @field_validator("destination_currency")
    @classmethod
    def _not_the_source(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("source_currency"):
            raise ValueError("must differ from source_currency")
        return value

    @field_validator("source_amount")
    @classmethod
    def _one_amount(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if value is not None and info.data.get("amount") is not None:
            raise ValueError("give either amount or source_amount, not both")
        return value

    @property
    def pair(self) -> Pair:
        return Pair(self.source_currency, self.destination_currency)


class AllRatesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    base_currency: CurrencyCode = Field(default="USD", description="ISO 4217 code (any case) of the source currency.")
    destination_currencies: CurrencyCodes | None = Field(
        default=None,
        description="Only these destinations: ISO 4217 codes separated by commas (`NGN,KES,GHS`); "
        "the parameter repeated is taken too.",
    )


class HistoryQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source_currency: CurrencyCode = Field(description="ISO 4217 code (any case) of what the sender pays in.")
    destination_currency: CurrencyCode = Field(
        description="ISO 4217 code (any case) of what the recipient gets; not the same as `source_currency`."
    )
    since: Moment | None = Field(
        default=None,
        description="RFC 3339 date-time: points at or after it (no zone: UTC). **Not together with `at`.**",
    )
    until: Moment | None = Field(
        default=None,
        description="RFC 3339 date-time: points at or before it, not before `since` (no zone: UTC). "
        "**Not together with `at`.**",
    )
    at: Moment | None = Field(
        default=None,
        description="RFC 3339 date-time: instead of a range, the one point in effect at that moment (no zone: UTC). "
        "**Not together with `since` or `until`.**",
    )
    limit: Limit = Field(default=500, description="Points at most, oldest first.")

    @field_validator("destination_currency")
    @classmethod
    def _not_the_source(cls, value: str, info: ValidationInfo) -> str:
        return RateQuery._not_the_source(value, info)

    @field_validator("until")
    @classmethod
    def _after_since(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        since = info.data.get("since")
        if value is not None and since is not None and value < since:
            raise ValueError("must not be before since")
        return value

    @field_validator("at")
    @classmethod
    def _moment_or_range(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is not None and (info.data.get("since") or info.data.get("until")):
            raise ValueError("give either at or a since/until range, not both")
        return value

    @property
    def pair(self) -> Pair:
        return Pair(self.source_currency, self.destination_currency)


# Documented as what the service sends; the values come from its own store, so they are not validated again.
ResponseCode = Annotated[str, Field(description="ISO 4217, upper-case", json_schema_extra={"pattern": "^[A-Z]{3}$"})]
Provider = Annotated[
    str, Field(description="Where the rate came from", json_schema_extra={"enum": ["flutterwave", "demo", "manual"]})
]


class Money(BaseModel):
    currency: ResponseCode
    amount: Number


class RateData(BaseModel):
    """Exactly Flutterwave's `data`: `rate` is source units per destination unit."""

    rate: Number
    source: Money
    destination: Money


class _CorridorAbsentWhileActive(BaseModel):
    corridor: CorridorMark | None = Field(
        default=None,
        exclude_if=absent,
        description="Present only while an operator has paused the pair: the last rate stored is served, not "
        "fetched any more (docs/operations.md, Corridors)",
    )


class RateMeta(_CorridorAbsentWhileActive):
    destination_per_source: Number
    last_updated: datetime
    age_seconds: float
    stale: bool
    served_from: Layer
    provider: Provider
    seq: int = Field(
        description="Sequence number of the store that set this rate: it grows with every store in the deployment "
        "(docs/websocket.md, Sequence numbers)"
    )


class RateResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Transfer amount fetched"
    data: RateData
    meta: RateMeta


class AllRatesEntry(_CorridorAbsentWhileActive, RateData):
    destination_per_source: Number
    last_updated: datetime
    stale: bool
    provider: Provider


class AllRatesData(BaseModel):
    base_currency: ResponseCode
    rates: dict[str, AllRatesEntry]


class AllRatesMeta(BaseModel):
    count: int
    as_of: datetime


class AllRatesResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Rates fetched"
    data: AllRatesData
    meta: AllRatesMeta


class HistoryPoint(BaseModel):
    at: datetime
    rate: Number
    destination_per_source: Number
    source_amount: Number
    destination_amount: Number
    seq: int = Field(description="Sequence number of the store that recorded this value")
    provider: Provider
    actor: str | None = Field(
        default=None, description="For a manual value (an operator's override): the name of the key that set it"
    )


class HistoryData(BaseModel):
    source_currency: ResponseCode
    destination_currency: ResponseCode
    points: list[HistoryPoint]


class HistoryMeta(BaseModel):
    count: int
    truncated: bool = Field(description="More points match; ask again with since = the last point's at")
    at: datetime | None = Field(default=None, description="The moment asked about, when `at` was given")


class HistoryResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "History fetched"
    data: HistoryData
    meta: HistoryMeta


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    message: str
    data: None = None
    errors: list[FieldError] | None = Field(default=None, description="Present on 422: each bad field")
