"""Turning a stored rate into the amounts a client asked about, in exact decimal arithmetic."""

from decimal import Decimal, localcontext

from app.storage.rate import StoredRate
from app.upstream.quote import significant

# Computed amounts are rounded once, at the end, to what a JSON number carries digit for digit.
AMOUNT_DIGITS = 15


def _times(left: Decimal, right: Decimal) -> Decimal:
    with localcontext() as context:
        context.prec = 50  # wide enough that the product itself is exact
        product = left * right
    return significant(product, AMOUNT_DIGITS)


def source_for(rate: StoredRate, destination_amount: Decimal) -> Decimal:
    """What the sender pays for `destination_amount` to arrive."""
    return _times(destination_amount, rate.rate)


def destination_for(rate: StoredRate, source_amount: Decimal) -> Decimal:
    """What arrives when the sender pays `source_amount`."""
    return _times(source_amount, rate.destination_per_source)
