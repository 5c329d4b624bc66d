"""Orientation of `rate` and the checks that reject a bad quote, on the parser alone."""

from decimal import Decimal

import pytest

from app.currencies import Pair
from app.upstream.errors import MalformedQuote
from app.upstream.quote import parse_quote, quote_from_amounts, significant

USD_NGN = Pair("USD", "NGN")


def body(rate: str, source_amount: str = "0.653488", source: str = "USD", destination: str = "NGN") -> bytes:
    return (
        f'{{"status": "success", "message": "Transfer amount fetched", "data": {{"rate": {rate}, '
        f'"source": {{"currency": "{source}", "amount": {source_amount}}}, '
        f'"destination": {{"currency": "{destination}", "amount": 1000}}}}}}'
    ).encode()


def test_contract_example_is_source_per_destination() -> None:
    quote = parse_quote(
        b'{"status": "success", "message": "Transfer amount fetched", "data": {"rate": 114.9885,'
        b' "source": {"currency": "KES", "amount": 114988.5}, "destination": {"currency": "USD", "amount": 1000}}}',
        Pair("KES", "USD"),
        "flutterwave",
    )
    assert quote.rate == Decimal("114.9885")
    assert quote.destination_per_source == significant(Decimal(1) / Decimal("114.9885"))
    assert quote.source_amount == Decimal("114988.5")
    assert quote.destination_amount == Decimal(1000)


def test_both_orientations_give_the_same_quote() -> None:
    as_destination_per_source = parse_quote(body("1530.25"), USD_NGN, "flutterwave")
    as_source_per_destination = parse_quote(body("0.00065348799215814409"), USD_NGN, "flutterwave")
    assert as_destination_per_source == as_source_per_destination
    assert as_destination_per_source.destination_per_source == Decimal("1530.25")
    assert as_destination_per_source.rate == Decimal("0.000653487992158")


def test_near_parity_the_closer_orientation_wins() -> None:
    # EUR/USD-like: both readings are within tolerance of the amounts, the closer one decides.
    quote = quote_from_amounts(Pair("EUR", "USD"), Decimal("1.004"), Decimal("996.02"), Decimal(1000), "x")
    assert quote.destination_per_source == Decimal("1.004")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"<html>Bad gateway</html>", "not JSON"),
        (b'{"status": "error", "message": "Unable to fetch rates at the moment", "data": null}', "status"),
        (b'{"status": "success", "data": [1, 2]}', "data"),
        (body("1530.25", source_amount="0"), "source.amount"),
        (body("1530.25", source_amount="-0.65"), "source.amount"),
        (body('"1530.25"'), "rate"),
        (body("true"), "rate"),
        (body("NaN"), "rate"),
        (body("0"), "rate"),
        (body("42.42"), "fits neither"),
        (body("1530.25", destination="GHS"), "USD/GHS"),
        (body("1530.25").replace(b'"amount": 0.653488', b'"amoun": 0.653488'), "amount"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (body("1e999999999999999999999"), "not JSON"),
        (body("1530.25", source_amount="1e-999999999"), "fits neither|beyond"),
    ],
)
def test_malformed_answers_are_rejected(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedQuote, match=reason):
        parse_quote(payload, USD_NGN, "flutterwave")


def test_significant_writes_plain_digits() -> None:
    assert str(significant(Decimal("1500.000"))) == "1500"
    assert str(significant(Decimal("0.000653487992158144"))) == "0.000653487992158"
    assert str(significant(Decimal("123456789012345"))) == "123456789012000"
