"""The wire format of a rate (the rate item of docs/websocket.md) and the events that carry it.

Decimals go out as JSON numbers. Rates carry at most 12 significant digits and
computed amounts at most 15, so a float prints them digit for digit.
"""

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, Field, PlainSerializer

from app.currencies import Pair
from app.rates.corridors import Corridor, Mark
from app.storage.rate import StoredRate


def _json_number(value: Decimal) -> int | float:
    # Whole numbers print as Flutterwave prints them (1000, not 1000.0).
    return int(value) if value == value.to_integral_value() else float(value)


Number = Annotated[Decimal, PlainSerializer(_json_number, return_type=int | float, when_used="json")]


def absent(value: object) -> bool:
    """Left out of the JSON when None: a corridor mark is absent while the pair is active (not null)."""
    return value is None


class CorridorMark(BaseModel):
    """A served rate's corridor while it is not `active` (docs/websocket.md, "Corridors")."""

    state: Literal["paused"] = Field(description="`paused`: not fetched any more; this is the last rate stored")
    reason: str
    since: datetime

    @classmethod
    def of(cls, mark: Mark | None) -> "CorridorMark | None":
        # Only a paused pair is served at all; a withheld one never reaches a rate item.
        return (
            None
            if mark is None or mark.state != "paused"
            else cls(state="paused", reason=mark.reason, since=mark.since)
        )


class RateItem(BaseModel):
    source_currency: str
    destination_currency: str
    rate: Number
    source_amount: Number
    destination_amount: Number
    destination_per_source: Number
    last_updated: datetime
    stale: bool
    provider: str
    corridor: CorridorMark | None = Field(
        default=None,
        exclude_if=absent,
        description="Present only while the pair is not `active`: `paused`, why and since when",
    )

    @classmethod
    def of(cls, rate: StoredRate, *, stale: bool, corridor: Mark | None = None) -> "RateItem":
        return cls(
            source_currency=rate.pair.source,
            destination_currency=rate.pair.destination,
            rate=rate.rate,
            source_amount=rate.source_amount,
            destination_amount=rate.destination_amount,
            destination_per_source=rate.destination_per_source,
            last_updated=rate.last_updated,
            stale=stale,
            provider=rate.provider,
            corridor=CorridorMark.of(corridor),
        )

    def stored(self, seq: int) -> StoredRate:
        """The stored rate this item announced, stored as `seq` (items go out only once their rate is stored)."""
        return StoredRate(
            pair=Pair(self.source_currency, self.destination_currency),
            rate=self.rate,
            destination_per_source=self.destination_per_source,
            source_amount=self.source_amount,
            destination_amount=self.destination_amount,
            provider=self.provider,
            last_updated=self.last_updated,
            seq=seq,
        )


class RateUpdate(BaseModel):
    """Pushed to a per-pair client each time a rate is stored; `seq` is that store's (docs/websocket.md)."""

    type: Literal["rate_update"] = "rate_update"
    rate: RateItem
    previous_rate: Number | None
    seq: int

    def stored(self) -> StoredRate:
        """The stored rate this update announced."""
        return self.rate.stored(self.seq)


class RatesUpdateItem(RateItem):
    """A rate item in a `rates_update`, with the value stored before it and the sequence number of its store."""

    previous_rate: Number | None
    seq: int

    @classmethod
    def of_update(cls, update: RateUpdate) -> "RatesUpdateItem":
        return cls(**dict(update.rate), previous_rate=update.previous_rate, seq=update.seq)


class RatesUpdate(BaseModel):
    """Pushed to a batch client: every update it is due since its last frame, the newest per pair.

    The hub writes this frame by joining items it serialised once for every
    client (see `rates_update_frame`); the model is its schema, and tests hold
    the two to the same bytes.
    """

    type: Literal["rates_update"] = "rates_update"
    rates: list[RatesUpdateItem]
    as_of: datetime
    seq: int  # the highest of its items'


class AllRatesUpdate(BaseModel):
    type: Literal["all_rates_update"] = "all_rates_update"
    as_of: datetime
    count: int
    changed: int


class AllRates(BaseModel):
    """Every stored rate; every store numbered up to `seq` is in it, and none above (docs/websocket.md)."""

    type: Literal["all_rates"] = "all_rates"
    rates: list[RateItem]
    as_of: datetime
    epoch: str
    seq: int
    # Only in the answer to a connection that asked to resume and could not be: false (docs/websocket.md).
    resumed: Literal[False] | None = Field(default=None, exclude_if=lambda value: value is None)


class Resumed(BaseModel):
    """The answer to a connection that resumed (`?epoch=E&seq=N`): every pair stored after N, its newest value
    with its `rate` as of N; every store up to `seq` is in it, or was in what the client held (docs/websocket.md).
    """

    type: Literal["resumed"] = "resumed"
    epoch: str
    seq: int
    rates: list[RatesUpdateItem]


class Heartbeat(BaseModel):
    """Sent to a client that was sent nothing for `WS_HEARTBEAT_SECONDS`: it holds every change up to `seq` that
    it follows."""

    type: Literal["heartbeat"] = "heartbeat"
    epoch: str
    seq: int


class RateReply(BaseModel):
    type: Literal["rate"] = "rate"
    rate: RateItem


class Subscribed(BaseModel):
    type: Literal["subscribed"] = "subscribed"
    pairs: list[str]
    min_change_bps: Number


class Pong(BaseModel):
    type: Literal["pong"] = "pong"


class ErrorFrame(BaseModel):
    type: Literal["error"] = "error"
    code: Literal[
        "bad_request", "not_found", "too_large", "rate_limited", "try_again_later", "too_many_pairs", "withheld"
    ]
    message: str


class CorridorFrame(BaseModel):
    """Pushed to clients following the pair when an operator changes its corridor (docs/websocket.md)."""

    type: Literal["corridor"] = "corridor"
    pair: str
    state: Literal["active", "paused", "withheld"]
    reason: str
    since: datetime


class OverrideInForce(BaseModel):
    until: datetime


class CorridorChanged(BaseModel):
    """Published between processes, never sent to a client as is: an operator changed a pair's corridor or its
    override; `notify`: its state changed, so clients following the pair are told (a `corridor` frame)."""

    type: Literal["corridor_changed"] = "corridor_changed"
    pair: str
    state: Literal["active", "paused", "withheld"]
    reason: str
    since: datetime
    by: str
    override_until: datetime | None
    notify: bool

    @classmethod
    def of(cls, pair: Pair, corridor: Corridor, override_until: datetime | None, *, notify: bool) -> "CorridorChanged":
        return cls(
            pair=str(pair),
            state=corridor.state.value,
            reason=corridor.reason,
            since=corridor.since,
            by=corridor.by,
            override_until=override_until,
            notify=notify,
        )

    def frame(self) -> CorridorFrame:
        return CorridorFrame(pair=self.pair, state=self.state, reason=self.reason, since=self.since)


class RatesStored(BaseModel):
    """Published between processes, never sent to a client: one store batch, committed together."""

    type: Literal["rates_stored"] = "rates_stored"
    updates: list[RateUpdate]


def rates_update_frame(items: list[str], as_of: str, seq: int) -> str:
    """A `RatesUpdate` frame from items already serialised as `RatesUpdateItem` JSON, and `as_of` as JSON."""
    return '{"type":"rates_update","rates":[' + ",".join(items) + '],"as_of":' + as_of + ',"seq":' + str(seq) + "}"


# Every frame the server sends a WebSocket client (docs/websocket.md), for schema generators.
SERVER_FRAMES: tuple[type[BaseModel], ...] = (
    AllRates,
    Resumed,
    Heartbeat,
    RateUpdate,
    RatesUpdate,
    AllRatesUpdate,
    RateReply,
    Subscribed,
    Pong,
    ErrorFrame,
    CorridorFrame,
)


class Resync(BaseModel):
    """Handed to this process's listeners by its fan-out backend, never published: "Redis is back, refresh what
    you hold"."""

    type: Literal["resync"] = "resync"


RESYNC = Resync().model_dump_json()
