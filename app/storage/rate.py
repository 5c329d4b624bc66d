"""A stored rate as the rest of the service sees it: plain values, no ORM session attached."""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from app.currencies import Pair
from app.upstream.quote import Quote


@dataclass(frozen=True, slots=True)
class StoredRate:
    pair: Pair
    rate: Decimal
    destination_per_source: Decimal
    source_amount: Decimal
    destination_amount: Decimal
    provider: str
    last_updated: datetime
    seq: int  # of the store that set it (docs/design.md, "Sequence numbers")

    def age_s(self, now: datetime) -> float:
        return max(0.0, (now - self.last_updated).total_seconds())

    def to_cache(self) -> dict[str, Any]:
        """A JSON-safe dict that `from_cache` turns back into the same rate, digit for digit."""
        return {
            "source": self.pair.source,
            "destination": self.pair.destination,
            "rate": str(self.rate),
            "destination_per_source": str(self.destination_per_source),
            "source_amount": str(self.source_amount),
            "destination_amount": str(self.destination_amount),
            "provider": self.provider,
            "last_updated": self.last_updated.isoformat(),
            "ts": self.last_updated.timestamp(),  # for comparing ages inside Redis
            "seq": self.seq,
        }

    @classmethod
    def from_cache(cls, data: dict[str, Any]) -> "StoredRate":
        return cls(
            pair=Pair(data["source"], data["destination"]),
            rate=Decimal(data["rate"]),
            destination_per_source=Decimal(data["destination_per_source"]),
            source_amount=Decimal(data["source_amount"]),
            destination_amount=Decimal(data["destination_amount"]),
            provider=data["provider"],
            last_updated=datetime.fromisoformat(data["last_updated"]),
            seq=int(data["seq"]),
        )


@dataclass(frozen=True, slots=True)
class HeldQuote:
    """A fetched value the rate guard holds, not stored (docs/operations.md, "The rate guard"): the latest answer
    out of bounds (its `received_at` is when it came), since when a run of them came, and how many agreed."""

    quote: Quote
    first_seen: datetime
    confirmations: int
