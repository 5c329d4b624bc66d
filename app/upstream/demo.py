"""The demo provider: simulated rates for development and tests without a Flutterwave key.

Every rate it gives is marked `provider = "demo"`. Values start near real
market levels (or, for a code not in the table, a stable made-up level) and
drift a little on every fetch, so a running demo visibly moves.
"""

import hashlib
import math
import random
from decimal import Decimal

from app.currencies import Pair
from app.upstream.quote import Quote, quote_from_amounts, significant

# Rough units per US dollar, late 2026; only their order of magnitude matters.
UNITS_PER_USD: dict[str, float] = {
    "USD": 1.0,
    "EUR": 0.92,
    "GBP": 0.79,
    "CAD": 1.38,
    "CHF": 0.88,
    "JPY": 150.0,
    "CNY": 7.2,
    "INR": 84.0,
    "AUD": 1.52,
    "XOF": 604.0,
    "XAF": 604.0,
    "EGP": 48.5,
    "ETB": 140.0,
    "GHS": 12.0,
    "KES": 129.0,
    "MAD": 9.9,
    "NGN": 1530.0,
    "ZAR": 18.2,
    "UGX": 3700.0,
    "ZMW": 26.5,
    "RWF": 1400.0,
    "TZS": 2600.0,
    "MWK": 1730.0,
    "SLE": 22.7,
    "GMD": 70.0,
}

# Each fetch moves a pair by about this fraction, and never further than MAX_DRIFT from its start.
STEP = 0.0005
MAX_DRIFT = 0.05


def _units_per_usd(code: str) -> float:
    if code in UNITS_PER_USD:
        return UNITS_PER_USD[code]
    # A code outside the table gets a level that is made up but the same on every run.
    digest = hashlib.sha256(code.encode()).digest()
    return 10 ** (int.from_bytes(digest[:4], "big") / 2**32 * 4 - 0.5)


class DemoProvider:
    name = "demo"

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)
        self._drift: dict[Pair, float] = {}

    async def fetch(self, pair: Pair, amount: Decimal) -> Quote:
        drift = self._drift.get(pair, 0.0) + self._random.gauss(0.0, STEP)
        self._drift[pair] = max(-MAX_DRIFT, min(MAX_DRIFT, drift))
        per_source = _units_per_usd(pair.destination) / _units_per_usd(pair.source) * math.exp(self._drift[pair])
        destination_per_source = significant(Decimal(repr(per_source)), 8)
        source_amount = significant(amount / destination_per_source, 10)
        return quote_from_amounts(pair, destination_per_source, source_amount, amount, self.name)
