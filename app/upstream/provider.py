"""What the rest of the service asks of a rate source: Flutterwave or the demo."""

from decimal import Decimal
from typing import Protocol

from app.currencies import Pair
from app.upstream.quote import Quote


class Provider(Protocol):
    name: str

    async def fetch(self, pair: Pair, amount: Decimal) -> Quote:
        """A quote for receiving `amount` of `pair.destination`; raises `UpstreamError`."""
        ...
