"""SQL for the rate tables, and nothing else: no cache, no events, no commits.

The writes take a plain (synchronous) `Connection`: the store runs them in
one go, on SQLite in a thread of its own, on PostgreSQL through `run_sync`
(app.rates.store). A batch takes its sequence numbers first, in the statement
that locks its rows (docs/design.md, "Sequence numbers").
"""

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Connection, Row, Select, Table, bindparam, delete, insert, select, true, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.currencies import Pair
from app.storage.models import CorridorRow, ExchangeRate, ExchangeRateHistory, RateOverride, RateSequence
from app.storage.rate import StoredRate
from app.upstream.quote import Quote

MANUAL = "manual"  # the provider of an operator's override


@dataclass(frozen=True, slots=True, kw_only=True)
class ManualQuote(Quote):
    """An operator's override: stored like a quote (provider `manual`), with its terms written beside it."""

    actor: str
    reason: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class OverrideRow:
    """A stored override's terms, and the last fetched value it replaced (None: the pair's first value)."""

    pair: Pair
    destination_per_source: Decimal
    reason: str
    actor: str
    set_at: datetime
    expires_at: datetime
    fetched_destination_per_source: Decimal | None
    fetched_at: datetime | None


def to_stored(row: ExchangeRate | Row[Any]) -> StoredRate:
    return StoredRate(
        pair=Pair(row.source_currency, row.destination_currency),
        rate=row.rate,
        destination_per_source=row.destination_per_source,
        source_amount=row.source_amount,
        destination_amount=row.destination_amount,
        provider=row.provider,
        last_updated=row.last_updated,
        seq=row.seq,
    )


def _quote_values(quote: Quote) -> dict[str, object]:
    return {
        "source_currency": quote.pair.source,
        "destination_currency": quote.pair.destination,
        "rate": quote.rate,
        "destination_per_source": quote.destination_per_source,
        "source_amount": quote.source_amount,
        "destination_amount": quote.destination_amount,
        "provider": quote.provider,
    }


# Core statements on the tables, built once, not ORM objects: a batch is written inside every rate's latency,
# and building statements and the unit of work cost several times the SQL itself
# (docs/decisions/0009-writes-in-one-hand-off.md).
_CURRENT = cast(Table, ExchangeRate.__table__)
_HISTORY = cast(Table, ExchangeRateHistory.__table__)
_BY_PAIR = tuple_(_CURRENT.c.source_currency, _CURRENT.c.destination_currency)
# Locked in pair order, so two writers of overlapping batches take turns instead of deadlocking.
_LOCK_MANY = (
    select(_CURRENT)
    .where(_BY_PAIR.in_(bindparam("pairs", expanding=True)))
    .order_by(_CURRENT.c.source_currency, _CURRENT.c.destination_currency)
    .with_for_update()
)
_LOCK_ONE = (
    select(_CURRENT)
    .where(
        _CURRENT.c.source_currency == bindparam("source"), _CURRENT.c.destination_currency == bindparam("destination")
    )
    .with_for_update()
)
_UPDATE = update(_CURRENT).where(_CURRENT.c.id == bindparam("row_id"))
_APPEND = insert(_HISTORY)

# The sequence's one row (made by the migration). Taking numbers updates it: its lock is held until the batch
# commits, so batches commit in the order of their numbers, whichever process wrote them.
SEQUENCE_ROW = 1
_SEQUENCE = cast(Table, RateSequence.__table__)
_TAKE = (
    update(_SEQUENCE)
    .where(_SEQUENCE.c.id == SEQUENCE_ROW)
    .values(seq=_SEQUENCE.c.seq + bindparam("count"))
    .returning(_SEQUENCE.c.seq)
)
_LAST_TAKEN = select(_SEQUENCE.c.seq).where(_SEQUENCE.c.id == SEQUENCE_ROW)
# PostgreSQL: the numbers taken in the locking read itself, no round trip of their own. A row is locked only once
# it is joined with the counter's updated row, so the counter is locked first, before any rate row: every writer
# takes the counter before anything else, and two writers never hold one each of what the other waits for.
_TAKEN = _TAKE.cte("taken")
_LOCK_MANY_TAKING = (
    select(_CURRENT, _TAKEN.c.seq.label("taken"))
    .select_from(_CURRENT.join(_TAKEN, true()))
    .where(_BY_PAIR.in_(bindparam("pairs", expanding=True)))
    .order_by(_CURRENT.c.source_currency, _CURRENT.c.destination_currency)
    .with_for_update(of=_CURRENT)
)

Current = tuple[int, StoredRate]  # a stored row's id, and its rate
Stamped = tuple[Quote, datetime, int]  # a quote as stored: with its `last_updated` and its sequence number


def _current(row: Row[Any]) -> Current:
    return row.id, to_stored(row)


def insert_if_absent(connection: Connection, quote: Quote, now: datetime, seq: int) -> int | None:
    """Insert the pair's first row and return its id; None when a row is already there (then lock and update it)."""
    insert_ = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert_(_CURRENT)
        .values(**_quote_values(quote), last_updated=now, created_at=now, seq=seq)
        .on_conflict_do_nothing(index_elements=["source_currency", "destination_currency"])
        .returning(_CURRENT.c.id)
    )
    row_id: int | None = connection.execute(statement).scalar()
    return row_id


def lock_current(connection: Connection, pair: Pair) -> Current:
    """The pair's row, locked until the transaction ends, so two writers take turns."""
    return _current(connection.execute(_LOCK_ONE, {"source": pair.source, "destination": pair.destination}).one())


def lock_current_many(
    connection: Connection, pairs: Collection[Pair], *, taking: int
) -> tuple[int, dict[Pair, Current]]:
    """Take `taking` sequence numbers, then lock the rows of those of `pairs` already stored until the
    transaction ends; the last number taken, and the rows.

    The numbers come first: from then on no other writer can commit until this transaction has (docs/design.md,
    "Sequence numbers"). On PostgreSQL in the same statement as the rows, a second one only when none of `pairs`
    is stored yet; on SQLite (one writer at a time already, and no round trips) a statement of its own.
    """
    parameters = {"pairs": [(pair.source, pair.destination) for pair in pairs], "count": taking}
    if connection.dialect.name == "postgresql":
        rows = connection.execute(_LOCK_MANY_TAKING, parameters).all()
        # The counter row is ours until commit: read again, it holds what this transaction made it.
        last: int = rows[0].taken if rows else connection.execute(_LAST_TAKEN).scalar_one()
    else:
        last = connection.execute(_TAKE, parameters).scalar_one()
        rows = connection.execute(_LOCK_MANY, parameters).all()
    found = (_current(row) for row in rows)
    return last, {rate.pair: (row_id, rate) for row_id, rate in found}


def update_current_many(connection: Connection, updates: dict[int, Stamped]) -> None:
    """Each row (by id) takes its quote's values, `last_updated` and sequence number, in one statement."""
    if updates:
        connection.execute(
            _UPDATE,
            [
                {"row_id": row_id, **_quote_values(quote), "last_updated": now, "seq": seq}
                for row_id, (quote, now, seq) in updates.items()
            ],
        )


def append_history_many(connection: Connection, points: list[Stamped]) -> None:
    if points:
        connection.execute(
            _APPEND,
            [
                {
                    **_quote_values(quote),
                    "observed_at": observed_at,
                    "seq": seq,
                    "actor": quote.actor if isinstance(quote, ManualQuote) else None,
                }
                for quote, observed_at, seq in points
            ],
        )


_OVERRIDES = cast(Table, RateOverride.__table__)
_OVERRIDE_BY_PAIR = tuple_(_OVERRIDES.c.source_currency, _OVERRIDES.c.destination_currency)
_READ_OVERRIDES = select(_OVERRIDES).where(_OVERRIDE_BY_PAIR.in_(bindparam("pairs", expanding=True)))


def _override(row: Row[Any] | RateOverride) -> OverrideRow:
    return OverrideRow(
        pair=Pair(row.source_currency, row.destination_currency),
        destination_per_source=row.destination_per_source,
        reason=row.reason,
        actor=row.actor,
        set_at=row.set_at,
        expires_at=row.expires_at,
        fetched_destination_per_source=row.fetched_destination_per_source,
        fetched_at=row.fetched_at,
    )


def overrides_of(connection: Connection, pairs: Collection[Pair]) -> dict[Pair, OverrideRow]:
    """The stored overrides of `pairs` (in force or not: a row stays until a fetched value replaces its value)."""
    if not pairs:
        return {}
    rows = connection.execute(_READ_OVERRIDES, {"pairs": [(pair.source, pair.destination) for pair in pairs]})
    return {override.pair: override for override in map(_override, rows)}


def put_override(connection: Connection, override: OverrideRow) -> None:
    """The pair's override, replacing any before it."""
    delete_overrides(connection, [override.pair])
    connection.execute(
        insert(_OVERRIDES).values(
            source_currency=override.pair.source,
            destination_currency=override.pair.destination,
            destination_per_source=override.destination_per_source,
            reason=override.reason,
            actor=override.actor,
            set_at=override.set_at,
            expires_at=override.expires_at,
            fetched_destination_per_source=override.fetched_destination_per_source,
            fetched_at=override.fetched_at,
        )
    )


def delete_overrides(connection: Connection, pairs: Collection[Pair]) -> None:
    if pairs:
        connection.execute(
            delete(_OVERRIDES).where(_OVERRIDE_BY_PAIR.in_([(pair.source, pair.destination) for pair in pairs]))
        )


async def list_overrides(session: AsyncSession) -> list[OverrideRow]:
    return [_override(row) for row in await session.scalars(select(RateOverride))]


async def get_override(session: AsyncSession, pair: Pair) -> RateOverride | None:
    row: RateOverride | None = await session.scalar(
        select(RateOverride).where(
            RateOverride.source_currency == pair.source, RateOverride.destination_currency == pair.destination
        )
    )
    return row


async def list_corridors(session: AsyncSession) -> list[CorridorRow]:
    return list(await session.scalars(select(CorridorRow)))


async def get_corridor(session: AsyncSession, pair: Pair) -> CorridorRow | None:
    row: CorridorRow | None = await session.scalar(
        select(CorridorRow).where(
            CorridorRow.source_currency == pair.source, CorridorRow.destination_currency == pair.destination
        )
    )
    return row


async def read_epoch(session: AsyncSession) -> str:
    """The deployment's epoch: made with the database, the same for as long as its history lasts."""
    epoch: str = (await session.execute(select(_SEQUENCE.c.epoch).where(_SEQUENCE.c.id == SEQUENCE_ROW))).scalar_one()
    return epoch


async def get_current(session: AsyncSession, pair: Pair) -> StoredRate | None:
    row = await session.scalar(
        select(ExchangeRate).where(
            ExchangeRate.source_currency == pair.source, ExchangeRate.destination_currency == pair.destination
        )
    )
    return None if row is None else to_stored(row)


async def list_current(session: AsyncSession, source: str | None = None) -> list[StoredRate]:
    statement = select(ExchangeRate).order_by(ExchangeRate.source_currency, ExchangeRate.destination_currency)
    if source is not None:
        statement = statement.where(ExchangeRate.source_currency == source)
    return [to_stored(row) for row in await session.scalars(statement)]


def _history_of(pair: Pair) -> Select[ExchangeRateHistory]:
    return select(ExchangeRateHistory).where(
        ExchangeRateHistory.source_currency == pair.source,
        ExchangeRateHistory.destination_currency == pair.destination,
    )


async def list_history(
    session: AsyncSession,
    pair: Pair,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[ExchangeRateHistory]:
    """The pair's observations, oldest first, within [since, until]."""
    statement = _history_of(pair).order_by(ExchangeRateHistory.observed_at, ExchangeRateHistory.id)
    if since is not None:
        statement = statement.where(ExchangeRateHistory.observed_at >= since)
    if until is not None:
        statement = statement.where(ExchangeRateHistory.observed_at <= until)
    if limit is not None:
        statement = statement.limit(limit)
    return list(await session.scalars(statement))


async def history_at(session: AsyncSession, pair: Pair, at: datetime) -> ExchangeRateHistory | None:
    """The observation in effect at `at`: the last one at or before it."""
    statement = (
        _history_of(pair)
        .where(ExchangeRateHistory.observed_at <= at)
        .order_by(ExchangeRateHistory.observed_at.desc(), ExchangeRateHistory.id.desc())
        .limit(1)
    )
    point: ExchangeRateHistory | None = await session.scalar(statement)
    return point


async def latest_history_id(session: AsyncSession, pair: Pair) -> int | None:
    """The id of the pair's newest observation, read from the end of the pair's index: one row.

    A version of the pair's history: rows are only appended, and in time order (a writer never goes back in
    time, app.rates.store), so any new row changes it.
    """
    statement = (
        select(ExchangeRateHistory.id)
        .where(
            ExchangeRateHistory.source_currency == pair.source,
            ExchangeRateHistory.destination_currency == pair.destination,
        )
        .order_by(ExchangeRateHistory.observed_at.desc(), ExchangeRateHistory.id.desc())
        .limit(1)
    )
    newest: int | None = await session.scalar(statement)
    return newest


async def list_pairs(session: AsyncSession) -> list[Pair]:
    """Every pair with a stored rate."""
    rows = await session.execute(select(ExchangeRate.source_currency, ExchangeRate.destination_currency))
    return [Pair(source, destination) for source, destination in rows]
