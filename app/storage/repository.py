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

from sqlalchemy import (
    Connection,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.currencies import Pair
from app.storage.models import CorridorRow, ExchangeRate, ExchangeRateHistory, HeldRate, RateOverride, RateSequence
from app.storage.rate import HeldQuote, StoredRate
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
# The value the rate guard holds for a pair, if any (docs/operations.md, "The rate guard"), read in the same statement
# that locks the pair's row: knowing that nothing is held costs no round trip. Its row is written only under the
# pair's row lock, so that lock guards it too.
_HELD = cast(Table, HeldRate.__table__)
_HELD_BY_PAIR = tuple_(_HELD.c.source_currency, _HELD.c.destination_currency)
_HELD_ON = and_(
    _HELD.c.source_currency == _CURRENT.c.source_currency,
    _HELD.c.destination_currency == _CURRENT.c.destination_currency,
)
_HELD_COLUMNS = [
    column.label(f"held_{column.name}")
    for column in _HELD.c
    if column.name not in ("id", "source_currency", "destination_currency")
]
_WITH_HELD = _CURRENT.outerjoin(_HELD, _HELD_ON)
# Locked in pair order, so two writers of overlapping batches take turns instead of deadlocking.
_LOCK_MANY = (
    select(_CURRENT, *_HELD_COLUMNS)
    .select_from(_WITH_HELD)
    .where(_BY_PAIR.in_(bindparam("pairs", expanding=True)))
    .order_by(_CURRENT.c.source_currency, _CURRENT.c.destination_currency)
    .with_for_update(of=_CURRENT)
)
_LOCK_ONE = (
    select(_CURRENT, *_HELD_COLUMNS)
    .select_from(_WITH_HELD)
    .where(
        _CURRENT.c.source_currency == bindparam("source"), _CURRENT.c.destination_currency == bindparam("destination")
    )
    .with_for_update(of=_CURRENT)
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
# Numbers taken for quotes the guard then held: handed back under the counter's lock, so the numbers stay gapless.
_GIVE_BACK = update(_SEQUENCE).where(_SEQUENCE.c.id == SEQUENCE_ROW).values(seq=_SEQUENCE.c.seq - bindparam("count"))
# PostgreSQL: the numbers taken in the locking read itself, no round trip of their own. A row is locked only once
# it is joined with the counter's updated row, so the counter is locked first, before any rate row: every writer
# takes the counter before anything else, and two writers never hold one each of what the other waits for.
_TAKEN = _TAKE.cte("taken")
_LOCK_MANY_TAKING = (
    select(_CURRENT, _TAKEN.c.seq.label("taken"), *_HELD_COLUMNS)
    .select_from(_CURRENT.join(_TAKEN, true()).outerjoin(_HELD, _HELD_ON))
    .where(_BY_PAIR.in_(bindparam("pairs", expanding=True)))
    .order_by(_CURRENT.c.source_currency, _CURRENT.c.destination_currency)
    .with_for_update(of=_CURRENT)
)

Current = tuple[int, StoredRate]  # a stored row's id, and its rate
Stamped = tuple[Quote, datetime, int]  # a quote as stored: with its `last_updated` and its sequence number


def _current(row: Row[Any]) -> Current:
    return row.id, to_stored(row)


def _held(row: Row[Any]) -> HeldQuote | None:
    """The held value joined to a locked row, if there is one."""
    if row.held_destination_per_source is None:
        return None
    quote = Quote(
        pair=Pair(row.source_currency, row.destination_currency),
        rate=row.held_rate,
        destination_per_source=row.held_destination_per_source,
        source_amount=row.held_source_amount,
        destination_amount=row.held_destination_amount,
        provider=row.held_provider,
        received_at=row.held_received_at,
    )
    return HeldQuote(quote=quote, first_seen=row.held_first_seen, confirmations=row.held_confirmations)


def _held_of(held: HeldRate) -> HeldQuote:
    quote = Quote(
        pair=Pair(held.source_currency, held.destination_currency),
        rate=held.rate,
        destination_per_source=held.destination_per_source,
        source_amount=held.source_amount,
        destination_amount=held.destination_amount,
        provider=held.provider,
        received_at=held.received_at,
    )
    return HeldQuote(quote=quote, first_seen=held.first_seen, confirmations=held.confirmations)


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


def lock_current(connection: Connection, pair: Pair) -> tuple[Current, HeldQuote | None]:
    """The pair's row, locked until the transaction ends, so two writers take turns; and the value held for it."""
    row = connection.execute(_LOCK_ONE, {"source": pair.source, "destination": pair.destination}).one()
    return _current(row), _held(row)


def lock_current_many(
    connection: Connection, pairs: Collection[Pair], *, taking: int
) -> tuple[int, dict[Pair, Current], dict[Pair, HeldQuote]]:
    """Take `taking` sequence numbers, then lock the rows of those of `pairs` already stored until the
    transaction ends; the last number taken, the rows, and the values the guard holds for them (read alongside).

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
    found = [(_current(row), _held(row)) for row in rows]
    held = {current[1].pair: value for current, value in found if value is not None}
    return last, {rate.pair: (row_id, rate) for (row_id, rate), _ in found}, held


def give_back(connection: Connection, count: int) -> None:
    """Hand back the last `count` numbers this transaction took (it holds the counter's lock, so none was taken
    since): quotes the guard held are not stores, and the numbers stay without gaps."""
    if count:
        connection.execute(_GIVE_BACK, {"count": count})


def _held_values(held: HeldQuote) -> dict[str, object]:
    return {
        **_quote_values(held.quote),
        "received_at": held.quote.received_at,
        "first_seen": held.first_seen,
        "confirmations": held.confirmations,
    }


def replace_held(connection: Connection, dropped: Collection[Pair], held: Collection[HeldQuote]) -> None:
    """Drop what is held for `dropped` and for the pairs of `held`, then hold `held`: two statements at most, run
    only when the guard holds, confirms or drops something (the pairs' rows are locked by the caller)."""
    pairs = {*dropped, *(value.quote.pair for value in held)}
    if pairs:
        connection.execute(
            delete(_HELD).where(_HELD_BY_PAIR.in_(bindparam("pairs", expanding=True))),
            {"pairs": [(pair.source, pair.destination) for pair in pairs]},
        )
    if held:
        connection.execute(insert(_HELD), [_held_values(value) for value in held])


async def list_held(session: AsyncSession) -> list[tuple[HeldQuote, StoredRate | None]]:
    """Every value held, by pair, with the pair's stored rate."""
    statement = (
        select(HeldRate, ExchangeRate)
        .outerjoin(
            ExchangeRate,
            and_(
                ExchangeRate.source_currency == HeldRate.source_currency,
                ExchangeRate.destination_currency == HeldRate.destination_currency,
            ),
        )
        .order_by(HeldRate.source_currency, HeldRate.destination_currency)
    )
    rows = await session.execute(statement)
    return [(_held_of(held), None if stored is None else to_stored(stored)) for held, stored in rows]


async def get_held(session: AsyncSession, pair: Pair) -> HeldQuote | None:
    held = await session.scalar(
        select(HeldRate).where(
            HeldRate.source_currency == pair.source, HeldRate.destination_currency == pair.destination
        )
    )
    return None if held is None else _held_of(held)


async def drop_held(session: AsyncSession, pair: Pair) -> HeldQuote | None:
    """Delete what is held for `pair` (under the pair's row lock, so a batch writing it takes turns with this) and
    return it; None when nothing was. The caller commits."""
    await session.execute(
        select(ExchangeRate.id)
        .where(ExchangeRate.source_currency == pair.source, ExchangeRate.destination_currency == pair.destination)
        .with_for_update()
    )
    held = await get_held(session, pair)
    if held is not None:
        await session.execute(
            delete(_HELD).where(
                _HELD.c.source_currency == pair.source, _HELD.c.destination_currency == pair.destination
            )
        )
    return held


async def count_held(session: AsyncSession) -> int:
    count: int = (await session.execute(select(func.count()).select_from(_HELD))).scalar_one()
    return count


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
