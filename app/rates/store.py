"""The one writer of rates: database first, then the cache, then the event.

Publish after commit: a subscriber must never see a rate that rolls back, and
the cache is written only once the database holds the value. So while the
database cannot be reached nothing new is shown anywhere: whatever a client
was shown, history holds (docs/outages.md). Every database call goes through
`DatabaseHealth`, bounded, and raises `DatabaseUnavailable` when it cannot be
made.

Writes are group-committed: whatever quotes arrive while a transaction runs go
into the next one, together, followed by one cache round trip and one published
event. A quote that arrives when nothing is being written is written at once,
alone, so batching never adds a delay; under a poll cycle it saves a
transaction, a cache round trip and a publish per pair (docs/decisions/0009-writes-in-one-hand-off.md).
A batch's round trips to Redis run while the next batch is written, one batch
after another, in the order they were stored: the next transaction does not
wait for them.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Protocol, TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.currencies import Pair
from app.errors import DatabaseUnavailable
from app.kit.tasks import TaskSet
from app.rates.cache import TieredCache
from app.rates.guard import OFF, Held, RateGuard, Verdict
from app.rates.wire import AllRatesUpdate
from app.storage import repository
from app.storage.health import DatabaseHealth
from app.storage.rate import HeldQuote, StoredRate
from app.upstream.quote import Quote

log = logging.getLogger(__name__)

T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(UTC)


class Overridden(Exception):
    """A fetched value for a pair whose manual override is in force: not stored (docs/operations.md, "Corridors").

    The fetchers ask `Corridors.may_fetch` first; this is the database's word on it, for a replica that had not
    heard of the override yet.
    """

    def __init__(self, pair: Pair) -> None:
        super().__init__(f"{pair} has a manual override in force; the fetched value is not stored")
        self.pair = pair


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What became of a quote: `rate` is the pair's stored rate after it (the quote's, unless the guard held it)."""

    rate: StoredRate
    previous: StoredRate | None
    verdict: Verdict = Verdict.stored
    held: HeldQuote | None = None
    """What the guard holds for the pair after this quote, when it held the quote (docs/operations.md)."""
    move_bps: Decimal | None = None
    """From the stored value to the quote's, signed; None for a pair's first value."""

    @property
    def stored(self) -> bool:
        return self.verdict.stores

    @property
    def changed(self) -> bool:
        if not self.stored:
            return False
        return self.previous is None or self.previous.destination_per_source != self.rate.destination_per_source


class Writer(Protocol):
    """Runs a batch's transaction away from the event loop and hands back its result once.

    `app.storage.sqlite_writer.SqliteWriter` (a thread of its own) or `app.storage.postgres_writer.PostgresWriter`
    (an event loop of its own).
    """

    def submit(self, work: Callable[[Connection], T]) -> "asyncio.Future[T]":
        """`work` inside one transaction, committed."""
        ...

    def checkpoint(self) -> None:
        """A poll cycle has ended: a moment to tidy the database's log, if it needs one."""
        ...


class Publisher(Protocol):
    """Where stored rates are announced (`app.live.fanout.Fanout`); the store knows nothing of how."""

    def rates_event(self, results: Sequence[SaveResult]) -> str:
        """The event telling of a stored batch, serialised once."""
        ...

    def hand_over(self, event: str) -> None:
        """To this process's own listeners, at once."""
        ...

    async def send(self, event: str) -> None:
        """To every other process."""
        ...

    async def publish_cycle(self, update: AllRatesUpdate) -> None: ...


_Waiting = tuple[Quote, bool, "asyncio.Future[SaveResult]"]  # a quote, whether the guard sees it, its saver


class RateStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        cache: TieredCache,
        fanout: Publisher,
        *,
        database: DatabaseHealth,
        writer: Writer,
        epoch: str = "",
        guard: RateGuard = OFF,
    ) -> None:
        self._sessions = sessions
        self.guard = guard
        # The deployment's epoch (docs/design.md, "Sequence numbers"): read once, at start-up or, when the database
        # was away then, with the first rates read from it; it changes only with the database, which a running
        # process never swaps. Empty until read: nothing was read from the database either, and a client that
        # resumes meanwhile gets the snapshot.
        self.epoch = epoch
        self._writer = writer
        self.database = database
        self._cache = cache
        self._fanout = fanout
        self._waiting: list[_Waiting] = []
        self._tasks = TaskSet()
        self._draining: asyncio.Task[None] | None = None
        self._outgoing: asyncio.Task[None] | None = None  # the last batch's round trips to Redis
        self.version = 0  # bumped by every save in this process, so derived views know they are out of date

    def save(self, quote: Quote, *, guarded: bool = True) -> "asyncio.Future[SaveResult]":
        """Store `quote` as the pair's current rate, appending to history when the value changed; unless the rate
        guard holds it (`guarded`, for a fetched value: docs/operations.md, "The rate guard"). An unguarded quote
        (an operator's accept) is stored whatever it is, and drops what was held for its pair.

        Its `received_at` becomes `last_updated` (never earlier than the pair's current one). Queued at once,
        before the caller next yields to the loop (a turn of a busy loop is a millisecond or more); the future is
        done once the rate is stored and announced, and cancelling it does not take the write back.
        """
        (future,) = self._enqueue([quote], guarded=guarded)
        return asyncio.shield(future)

    async def save_many(self, quotes: Sequence[Quote]) -> list[SaveResult]:
        # Shielded: a caller that stops waiting does not take a write others share with it.
        return list(await asyncio.shield(asyncio.gather(*self._enqueue(quotes, guarded=True))))

    def _enqueue(self, quotes: Sequence[Quote], *, guarded: bool) -> "list[asyncio.Future[SaveResult]]":
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[SaveResult]] = [loop.create_future() for _ in quotes]
        self._waiting += ((quote, guarded, future) for quote, future in zip(quotes, futures, strict=True))
        if self._draining is None:
            self._draining = self._tasks.spawn(self._drain(), "rate-store-writer")
        return futures

    async def aclose(self) -> None:
        """Wait for the writes already handed over, and their round trips to Redis (before the engine goes)."""
        await self._tasks.wait()

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._write_settling(batch)
        finally:
            self._draining = None

    async def _write_settling(self, batch: list[_Waiting]) -> None:
        try:
            results, shared = await self._write([(quote, guarded) for quote, guarded, _ in batch])
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            if len(batch) == 1 or isinstance(error, DatabaseUnavailable):
                # Alone, or the database is away for all of them alike: each waiting save gets the error.
                for _, _, future in batch:
                    _settle(future, error=error)
                return
            # One bad write must not fail the others it was batched with: each goes again alone.
            log.warning("a batch of %d rates failed (%s); writing each alone", len(batch), error)
            for waiting in batch:
                await self._write_settling([waiting])
            return

        def settle(_: object) -> None:
            # Stored and announced, whatever became of the round trips to Redis (their failures are logged).
            for (_, _, future), result in zip(batch, results, strict=True):
                _settle(future, result=result)

        shared.add_done_callback(settle)

    async def _write(self, quotes: list[tuple[Quote, bool]]) -> "tuple[list[SaveResult], asyncio.Future[None]]":
        """The batch stored, and the task of its round trips to Redis."""
        results = await self.database.call(lambda: self._transaction(quotes), write=True)
        self.version += 1
        for result in results:
            if result.verdict in (Verdict.held, Verdict.replaced) and result.held is not None:
                held = result.held.quote
                log.warning(
                    "rate guard: holding %s at %s, not stored: stored %s, move %+.2f bps; the stored rate is served "
                    "until %d answers in a row confirm it or an operator accepts it",
                    held.pair,
                    held.destination_per_source,
                    result.rate.destination_per_source,
                    result.move_bps or 0,
                    self.guard.confirmations,
                )
        stored = [result for result in results if result.stored]
        if not stored:
            # Nothing new anywhere: no cache to write, nothing to tell anyone.
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return results, done
        rates, event = [result.rate for result in stored], self._fanout.rates_event(stored)
        # Publish after commit. This process first, with no round trip in between (under a cycle each one waits
        # for a turn of a loop busy sending to every client): its memory cache, then its own clients. Then Redis,
        # then the other processes, told only once Redis holds the rate: a client told of a rate finds it
        # wherever it looks. Those round trips run behind the previous batch's, while the next batch is written.
        self._cache.hold_here(rates)
        self._fanout.hand_over(event)
        self._outgoing = self._tasks.spawn(self._share(rates, event, after=self._outgoing), "rate-store-share")
        return results, self._outgoing

    async def _share(self, rates: list[StoredRate], event: str, *, after: "asyncio.Task[None] | None") -> None:
        if after is not None:
            # In the order stored: another process must never be told of an older value after a newer one.
            await asyncio.wait([after])
        try:
            await self._cache.share(rates)
            await self._fanout.send(event)
        except Exception:
            # Both carry on without Redis by themselves; anything else must not keep the batch's savers waiting.
            log.exception("could not share a stored batch")

    def _transaction(self, quotes: list[tuple[Quote, bool]]) -> Awaitable[list[SaveResult]]:
        # The batch is written in one go, as plain synchronous code, away from the event loop: one hand-off and
        # one result (awaited as it is, no task around it), however many statements and round trips it takes.
        forced = frozenset(index for index, (_, guarded) in enumerate(quotes) if not guarded)
        return self._writer.submit(
            partial(write_batch, quotes=[quote for quote, _ in quotes], guard=self.guard, forced=forced)
        )

    async def publish_cycle(self, update: AllRatesUpdate) -> None:
        """A poll cycle has ended: say so, then let the database tidy its log (SQLite) before the next one."""
        await self._fanout.publish_cycle(update)
        self._writer.checkpoint()

    async def all(self, source: str | None = None) -> list[StoredRate]:
        """Every stored rate, read in one statement: the rates stored up to the highest `seq` among them, and no
        other (batches commit in the order of their numbers)."""

        async def read() -> list[StoredRate]:
            async with self._sessions() as session:
                if not self.epoch:
                    self.epoch = await repository.read_epoch(session)
                return await repository.list_current(session, source)

        return await self.database.call(read)

    async def current(self, pair: Pair, *, within_s: float | None = None) -> StoredRate | None:
        """The pair's stored rate; `within_s`: what the caller has left of its own bound, if less than a read's."""

        async def read() -> StoredRate | None:
            async with self._sessions() as session:
                return await repository.get_current(session, pair)

        return await self.database.call(read, within_s=within_s)


async def read_epoch(sessions: async_sessionmaker[AsyncSession], database: DatabaseHealth) -> str:
    """The deployment's epoch, as the database holds it (raises `DatabaseUnavailable`)."""

    async def read() -> str:
        async with sessions() as session:
            return await repository.read_epoch(session)

    return await database.call(read)


def write_batch(
    connection: Connection, quotes: Sequence[Quote], guard: RateGuard = OFF, forced: frozenset[int] = frozenset()
) -> list[SaveResult]:
    """Store each quote as its pair's current rate, appending to history when the value changed; no commit.

    Each quote (but those at the indexes in `forced`) first goes past the rate guard, which may hold it instead
    (docs/operations.md, "The rate guard"): the values held are read in the statement that locks the rows, and
    written only when one is held, confirmed or dropped, so a batch where nothing is out of bounds costs what it
    did without the guard. A forced quote is stored whatever it is, and drops what was held.

    Each stored quote is a store with a sequence number of its own, in the batch's order, taken first
    (docs/design.md, "Sequence numbers"); those taken for quotes then held are handed back. Worked out in memory
    over the rows read (and locked) at the start, then written in two statements: every current row updated, every
    history point appended. A pair twice in one batch is two changes in a row.
    """
    pairs = {quote.pair for quote in quotes}
    last, current, held = repository.lock_current_many(connection, pairs, taking=len(quotes))
    # Read after the rate rows are locked, in a statement of its own: an override is written only under its rate
    # row's lock, and a statement begun before that lock was granted may not see one committed meanwhile.
    overrides = repository.overrides_of(connection, pairs)
    had_held = set(held)
    decisions: list[tuple[Verdict, HeldQuote | None, Decimal | None]] = []
    # The guard's pass first, pair by pair in the batch's order, over the values as they become: how many quotes
    # are stored decides the sequence numbers. It compares with the last *fetched* value stored, never a manual
    # one: while a pair's override row stands (in force, or expired and not yet replaced), the value it replaced.
    values = {pair: rate.destination_per_source for pair, (_, rate) in current.items()}
    for pair, override in overrides.items():
        if override.fetched_destination_per_source is None:
            values.pop(pair, None)  # overridden before any value was fetched: the next fetched one is the first
        else:
            values[pair] = override.fetched_destination_per_source
    for index, quote in enumerate(quotes):
        pair, value = quote.pair, quote.destination_per_source
        before = held.get(pair)
        overridden = overrides.get(pair)
        if isinstance(quote, repository.ManualQuote):
            # An operator's decision, not a fetch: never held, not what the guard compares with, and what it
            # holds stays held (confirmed or dropped by the fetches to come).
            decisions.append((Verdict.stored, before, None))
            continue
        if overridden is not None and quote.received_at < overridden.expires_at:
            raise Overridden(pair)  # before the guard writes anything
        if index in forced:
            verdict, now_held, move = Verdict.stored, None, None
        else:
            state = (
                None
                if before is None
                else Held(before.quote.destination_per_source, before.confirmations, before.first_seen)
            )
            decision = guard.decide(values.get(pair), state, value, quote.received_at)
            verdict, move = decision.verdict, decision.move_bps
            now_held = (
                None
                if decision.held is None
                else HeldQuote(quote, decision.held.first_seen, decision.held.confirmations)
            )
        if now_held is None:
            held.pop(pair, None)
        else:
            held[pair] = now_held
        if verdict.stores:
            values[pair] = value
        decisions.append((verdict, now_held, move))
    kept = sum(not verdict.stores for verdict, _, _ in decisions)
    repository.give_back(connection, kept)
    # Rewritten only where the guard moved something: a pair that had a value held, or has one now.
    touched = had_held | set(held)
    if touched:
        repository.replace_held(
            connection, had_held - set(held), [value for pair, value in held.items() if pair in touched]
        )

    results: list[SaveResult] = []
    updates: dict[int, repository.Stamped] = {}
    history: list[repository.Stamped] = []
    seq = last - len(quotes)  # the last number before this batch's
    for quote, (verdict, now_held, move) in zip(quotes, decisions, strict=True):
        found = current.get(quote.pair)
        if not verdict.stores and found is not None:
            results.append(SaveResult(found[1], found[1], verdict, now_held, move))
            continue
        seq += 1
        now, previous = quote.received_at, None
        row_id = repository.insert_if_absent(connection, quote, now, seq) if found is None else None
        if row_id is None:
            # Stored before, by an earlier batch, earlier in this one, or another writer just now.
            row_id, previous = found or repository.lock_current(connection, quote.pair)[0]
            # Two writers of one pair take turns on the row lock; the second never goes back in time.
            now = max(now, previous.last_updated)
            updates[row_id] = (quote, now, seq)
        _override_terms(connection, quote, overrides, previous)
        rate = StoredRate(
            pair=quote.pair,
            rate=quote.rate,
            destination_per_source=quote.destination_per_source,
            source_amount=quote.source_amount,
            destination_amount=quote.destination_amount,
            provider=quote.provider,
            last_updated=now,
            seq=seq,
        )
        current[quote.pair] = (row_id, rate)
        result = SaveResult(rate=rate, previous=previous, verdict=verdict, move_bps=move)
        # A manual value is always a point, even one equal to the value before: history records who set it.
        if result.changed or isinstance(quote, repository.ManualQuote):
            history.append((quote, now, seq))
        results.append(result)
    repository.update_current_many(connection, updates)
    repository.append_history_many(connection, history)
    return results


def _override_terms(
    connection: Connection,
    quote: Quote,
    overrides: dict[Pair, repository.OverrideRow],
    previous: StoredRate | None,
) -> None:
    """An override's terms go with its manual value; a fetched value is refused while one is in force, and once
    stored over an expired (or ended) one, its terms go (the row exists exactly while the manual value is stored).
    """
    pair, override = quote.pair, overrides.get(quote.pair)
    if isinstance(quote, repository.ManualQuote):
        if override is not None:
            fetched = (override.fetched_destination_per_source, override.fetched_at)
        elif previous is not None and previous.provider != repository.MANUAL:
            fetched = (previous.destination_per_source, previous.last_updated)
        else:
            fetched = (None, None)
        overrides[pair] = terms = repository.OverrideRow(
            pair=pair,
            destination_per_source=quote.destination_per_source,
            reason=quote.reason,
            actor=quote.actor,
            set_at=quote.received_at,
            expires_at=quote.expires_at,
            fetched_destination_per_source=fetched[0],
            fetched_at=fetched[1],
        )
        repository.put_override(connection, terms)
    elif override is not None:
        if quote.received_at < override.expires_at:
            raise Overridden(pair)
        del overrides[pair]
        repository.delete_overrides(connection, [pair])


def _settle(
    future: "asyncio.Future[SaveResult]", *, result: SaveResult | None = None, error: Exception | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif result is not None:
        future.set_result(result)
