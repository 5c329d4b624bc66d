"""ISO 4217 currency codes and currency pairs, checked against pycountry's maintained list."""

from dataclasses import dataclass
from functools import cache

import pycountry


class UnknownCurrency(ValueError):
    """A code that is not an ISO 4217 currency."""


@cache
def known_currencies() -> frozenset[str]:
    """Every ISO 4217 code, upper-case."""
    return frozenset(currency.alpha_3 for currency in pycountry.currencies)


def normalise_currency(code: str) -> str:
    """Upper-case an ISO 4217 code, or raise `UnknownCurrency` naming it."""
    normalised = code.strip().upper()
    if normalised not in known_currencies():
        raise UnknownCurrency(f"{code!r} is not an ISO 4217 currency code")
    return normalised


@dataclass(frozen=True, slots=True, order=True)
class Pair:
    """A corridor: money leaves in `source` and arrives in `destination`."""

    source: str
    destination: str

    def __str__(self) -> str:
        return f"{self.source}/{self.destination}"

    @classmethod
    def parse(cls, source: str, destination: str) -> "Pair":
        """A pair of validated codes; the same currency on both sides is refused."""
        pair = cls(normalise_currency(source), normalise_currency(destination))
        if pair.source == pair.destination:
            raise ValueError(f"source and destination are both {pair.source}")
        return pair
