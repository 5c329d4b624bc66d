"""Query parameters and response bodies of the REST API; the rate fields share `rates.wire`'s types."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.currencies import Pair, normalise_currency
from app.rates.lookup import Layer
from app.rates.wire import Number


def _currency_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    codes = [normalise_currency(code) for code in value.split(",") if code.strip()]
    if not codes:
        raise ValueError("must name at least one currency code")
    return list(dict.fromkeys(codes))


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    # A moment without a zone is read as UTC, the zone every timestamp of this API is in.
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of the range of dates") from None


CurrencyCode = Annotated[str, AfterValidator(normalise_currency), Field(json_schema_extra={"pattern": "^[A-Za-z]{3}$"})]
# At most 11 integer and 4 decimal digits: any ISO 4217 minor unit, and 15 significant digits in all.
Amount = Annotated[Decimal, Field(gt=0, lt=100_000_000_000, decimal_places=4, allow_inf_nan=False)]
Moment = Annotated[datetime | None, AfterValidator(_as_utc)]


class RateQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source_currency: CurrencyCode = Field(description="ISO 4217 code of what the sender pays in", examples=["USD"])
    destination_currency: CurrencyCode = Field(description="ISO 4217 code of what the recipient gets", examples=["NGN"])
    amount: Amount | None = Field(
        default=None,
        description="What the recipient gets, in the destination currency (Flutterwave's meaning); default 1",
        examples=["1000"],
    )
    source_amount: Amount | None = Field(
        default=None, description="What the sender pays, in the source currency; instead of `amount`", examples=["100"]
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

    base_currency: CurrencyCode = Field(default="USD", description="The source currency", examples=["USD"])
    destination_currencies: Annotated[str | None, AfterValidator(_currency_list)] = Field(
        default=None, description="Comma-separated filter of destination codes", examples=["NGN,KES,GHS"]
    )


class HistoryQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source_currency: CurrencyCode = Field(examples=["USD"])
    destination_currency: CurrencyCode = Field(examples=["NGN"])
    since: Moment = Field(default=None, description="ISO 8601; points at or after", examples=["2026-11-18T00:00:00Z"])
    until: Moment = Field(default=None, description="ISO 8601; points at or before", examples=["2026-11-25T00:00:00Z"])
    at: Moment = Field(
        default=None,
        description="ISO 8601; instead of a range, the one point in effect at that moment",
        examples=["2026-11-24T14:05:00Z"],
    )
    limit: int = Field(default=500, ge=1, le=5000, description="Points at most, oldest first")

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


class Money(BaseModel):
    currency: str
    amount: Number


class RateData(BaseModel):
    """Exactly Flutterwave's `data`: `rate` is source units per destination unit."""

    rate: Number
    source: Money
    destination: Money


class RateMeta(BaseModel):
    destination_per_source: Number
    last_updated: datetime
    age_seconds: float
    stale: bool
    served_from: Layer
    provider: str


class RateResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Transfer amount fetched"
    data: RateData
    meta: RateMeta


class AllRatesEntry(RateData):
    destination_per_source: Number
    last_updated: datetime
    stale: bool
    provider: str


class AllRatesData(BaseModel):
    base_currency: str
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


class HistoryData(BaseModel):
    source_currency: str
    destination_currency: str
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
