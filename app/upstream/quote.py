"""A quote: what one unit of a pair costs, parsed once at the edge into exact decimals.

Flutterwave has shown `rate` in both orientations for the same query, so its
orientation is never assumed (docs/design.md, "The upstream"). The amounts are always
consistent: `destination.amount` is what was asked, `source.amount` what is
debited. `destination.amount / source.amount` decides which way `rate` points,
and the upstream's own `rate` is kept as the precise figure.
"""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.currencies import Pair
from app.upstream.errors import MalformedQuote

# Rates are kept to this many significant digits, so the same market value reads
# the same whichever orientation the upstream chose to send it in.
SIGNIFICANT_DIGITS = 12
# How far `rate` may sit from the ratio of the (rounded) amounts and still count as consistent.
RATE_TOLERANCE = Decimal("0.01")

PositiveDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False, strict=True)]


class _Money(BaseModel):
    model_config = ConfigDict(extra="ignore")
    currency: str
    amount: PositiveDecimal


class _RateData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rate: PositiveDecimal
    source: _Money
    destination: _Money


class _RatePayload(BaseModel):
    """The body of a successful `GET /v3/transfers/rates`."""

    model_config = ConfigDict(extra="ignore")
    status: Literal["success"]
    data: _RateData


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Quote:
    """A consistent quote; `rate` is source per destination unit, as Flutterwave documents it.

    `received_at` is the moment the upstream's answer arrived: it becomes the
    rate's `last_updated`, so every delay after it (parsing, storing, fanning
    out) shows in what clients measure.
    """

    pair: Pair
    rate: Decimal
    destination_per_source: Decimal
    source_amount: Decimal
    destination_amount: Decimal
    provider: str
    received_at: datetime = field(default_factory=_now, compare=False)


def significant(value: Decimal, digits: int = SIGNIFICANT_DIGITS) -> Decimal:
    """`value` rounded to `digits` significant digits, without trailing zeros (nor a positive exponent)."""
    with localcontext() as context:
        context.prec = digits
        rounded = (+value).normalize()
    exponent = rounded.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0:
        rounded = rounded.quantize(Decimal(1))
    return rounded


def _inverse(value: Decimal) -> Decimal:
    with localcontext() as context:
        context.prec = SIGNIFICANT_DIGITS + 8
        return Decimal(1) / value


def _near(value: Decimal, expected: Decimal) -> bool:
    return abs(value - expected) <= expected * RATE_TOLERANCE


def quote_from_amounts(
    pair: Pair,
    rate: Decimal,
    source_amount: Decimal,
    destination_amount: Decimal,
    provider: str,
    received_at: datetime | None = None,
) -> Quote:
    """Work out which way `rate` points from the amounts, or raise `MalformedQuote`."""
    for name, value in (("rate", rate), ("source.amount", source_amount), ("destination.amount", destination_amount)):
        if not value.is_finite() or value <= 0:
            raise MalformedQuote(pair, f"{name} is {value}, not a positive number")
    with localcontext() as context:
        context.prec = SIGNIFICANT_DIGITS + 8
        from_amounts = destination_amount / source_amount
    as_source_per_destination = _near(rate, _inverse(from_amounts))
    as_destination_per_source = _near(rate, from_amounts)
    if as_source_per_destination and as_destination_per_source:
        # Only near parity can both fit; the closer reading wins.
        as_destination_per_source = abs(rate - from_amounts) < abs(rate - _inverse(from_amounts))
    elif not (as_source_per_destination or as_destination_per_source):
        raise MalformedQuote(
            pair,
            f"rate {rate} fits neither {significant(from_amounts)} nor its inverse "
            f"from the amounts {source_amount} {pair.source} -> {destination_amount} {pair.destination}",
        )
    if as_destination_per_source:
        destination_per_source, source_per_destination = rate, _inverse(rate)
    else:
        destination_per_source, source_per_destination = _inverse(rate), rate
    return Quote(
        pair=pair,
        rate=significant(source_per_destination),
        destination_per_source=significant(destination_per_source),
        source_amount=source_amount,
        destination_amount=destination_amount,
        provider=provider,
        received_at=received_at or _now(),
    )


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def parse_quote(body: bytes, pair: Pair, provider: str, received_at: datetime | None = None) -> Quote:
    """Parse a Flutterwave rates body for `pair`, or raise `MalformedQuote` saying what is wrong."""
    try:
        # Decimals straight from the text: a float would lose digits before we ever saw them.
        raw: Any = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    except (ValueError, ArithmeticError, RecursionError):
        raise MalformedQuote(pair, "body is not JSON (or nested or sized beyond reason)") from None
    try:
        payload = _RatePayload.model_validate(raw)
    except ValidationError as error:
        raise MalformedQuote(pair, f"unexpected body ({_describe(error)})") from None
    data = payload.data
    echoed = Pair(data.source.currency.upper(), data.destination.currency.upper())
    if echoed != pair:
        raise MalformedQuote(pair, f"answer is for {echoed}, not the pair asked for")
    try:
        return quote_from_amounts(pair, data.rate, data.source.amount, data.destination.amount, provider, received_at)
    except ArithmeticError:
        raise MalformedQuote(pair, "amounts or rate beyond what decimal arithmetic can hold") from None
