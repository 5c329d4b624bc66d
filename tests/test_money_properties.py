"""Property tests of the money arithmetic against exact decimal arithmetic, for any positive inputs."""

import json
from decimal import Decimal, localcontext

from hypothesis import assume, given
from hypothesis import strategies as st

from app.currencies import Pair
from app.rates.quoting import AMOUNT_DIGITS, destination_for, source_for
from app.rates.store import utc_now
from app.rates.wire import RateItem
from app.storage.rate import StoredRate
from app.upstream.errors import MalformedQuote
from app.upstream.quote import RATE_TOLERANCE, SIGNIFICANT_DIGITS, quote_from_amounts, significant

PAIR = Pair("USD", "NGN")


def exact(operation: str, left: Decimal, right: Decimal) -> Decimal:
    with localcontext() as context:
        context.prec = 80
        return left * right if operation == "*" else left / right


def decimals(low: str, high: str, places: int) -> st.SearchStrategy[Decimal]:
    return st.decimals(
        min_value=Decimal(low), max_value=Decimal(high), places=places, allow_nan=False, allow_infinity=False
    ).filter(lambda d: d > 0)


# Market values from 1e-6 to 1e7 destination units per source unit, at most 12 significant digits.
market_values = st.builds(lambda d: significant(d), decimals("0.000001", "10000000", 8)).filter(lambda d: d > 0)
amounts = decimals("0.01", "1000000000", 2)


def digits(value: Decimal) -> int:
    return len(value.normalize().as_tuple().digits)


@given(market_values, amounts)
def test_either_orientation_gives_the_same_value(value: Decimal, amount: Decimal) -> None:
    debited = significant(exact("/", amount, value), 15)
    assume(debited > 0)
    inverse = significant(exact("/", Decimal(1), value), 20)
    as_dps = quote_from_amounts(PAIR, value, debited, amount, "test")
    as_spd = quote_from_amounts(PAIR, inverse, debited, amount, "test")
    assert as_dps.destination_per_source == as_spd.destination_per_source == significant(value)
    assert as_dps.rate == as_spd.rate == significant(exact("/", Decimal(1), value))


@given(market_values, amounts, st.decimals(min_value=Decimal("1.02"), max_value=Decimal("50"), places=3))
def test_a_rate_that_fits_neither_orientation_is_refused(value: Decimal, amount: Decimal, off_by: Decimal) -> None:
    debited = significant(exact("/", amount, value), 15)
    assume(debited > 0)
    wrong = value * off_by
    # Far from both the value and its inverse (near parity the two meet, and that is a real quote).
    assume(abs(wrong - value) > value * RATE_TOLERANCE * 2)
    assume(abs(wrong - exact("/", Decimal(1), value)) > exact("/", Decimal(1), value) * RATE_TOLERANCE * 2)
    try:
        quote_from_amounts(PAIR, wrong, debited, amount, "test")
    except MalformedQuote:
        return
    raise AssertionError(f"rate {wrong} was accepted for a value of {value}")


def stored(value: Decimal) -> StoredRate:
    return StoredRate(PAIR, significant(exact("/", Decimal(1), value)), value, Decimal(1), value, "test", utc_now(), 1)


@given(market_values, decimals("0.0001", "99999999999", 4))
def test_conversions_are_exact_then_rounded_once(value: Decimal, amount: Decimal) -> None:
    rate = stored(value)
    for computed, true in (
        (source_for(rate, amount), exact("*", amount, rate.rate)),
        (destination_for(rate, amount), exact("*", amount, rate.destination_per_source)),
    ):
        assert computed == significant(true, AMOUNT_DIGITS)
        assert digits(computed) <= AMOUNT_DIGITS
        if digits(true) <= AMOUNT_DIGITS:
            assert computed == true  # nothing to round: the exact product
        assert abs(computed - true) <= abs(true) * Decimal(10) ** (1 - AMOUNT_DIGITS)


@given(market_values, decimals("0.01", "10000000", 2))
def test_send_then_receive_comes_back_to_the_same_amount(value: Decimal, amount: Decimal) -> None:
    rate = stored(value)
    back = source_for(rate, destination_for(rate, amount))
    # The rate and its inverse each carry 12 significant digits, so the round trip agrees to about 11.
    assert abs(back - amount) <= amount * Decimal("1e-11") * 2


@given(st.decimals(min_value=Decimal("1e-12"), max_value=Decimal("1e15"), allow_nan=False, allow_infinity=False))
def test_significant_rounds_to_nearest_without_a_positive_exponent(value: Decimal) -> None:
    assume(value > 0)
    rounded = significant(value)
    # 1500, never 1.5E+3: whole numbers keep their zeros (text columns, cache and logs show them plainly).
    assert int(rounded.as_tuple().exponent) <= 0
    assert digits(rounded) <= SIGNIFICANT_DIGITS
    assert abs(rounded - value) <= abs(value) * Decimal(10) ** (1 - SIGNIFICANT_DIGITS) / 2 * Decimal("1.0000001")


@given(market_values, decimals("0.0001", "99999999999", 4))
def test_json_numbers_carry_every_digit(value: Decimal, amount: Decimal) -> None:
    rate = stored(value)
    item = RateItem.of(rate, stale=False).model_copy(update={"source_amount": source_for(rate, amount)})
    parsed = json.loads(item.model_dump_json(), parse_float=Decimal, parse_int=Decimal)
    assert parsed["destination_per_source"] == rate.destination_per_source
    assert parsed["rate"] == rate.rate
    assert parsed["source_amount"] == source_for(rate, amount)
