"""Verifying a presented key, with what this process read of it for at most `ttl_s` (docs/rest.md, "Keys").

A database read per request would cost more than a cached answer itself, so
each process keeps what it read of a key id (valid, revoked or unknown) for
`ttl_s` seconds: a key revoked anywhere is refused by every replica within
`ttl_s` plus one read (`KEY_CACHE_TTL_S`, well inside the 5 s the contract
gives). A key that is not in memory is read once, however many requests ask
for it at the same moment. What is held is bounded (`max_keys`, the least
recently used forgotten first), and holds the key's hash, never the key.

While the database cannot be reached, a key read before keeps its last
verdict (nobody can revoke one meanwhile: revoking writes to the same
database); a key never read is a 503, since it cannot be checked.

`last_used_at` is written at most once per `touch_every_s` per key, in the
background, so it is precise to that.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.admin.keys import KeyRecord, VerifiedKey, digest, key_id_of, matches, read_key, touch_key
from app.errors import DatabaseUnavailable
from app.kit.tasks import TaskSet
from app.storage.health import DatabaseHealth

KEY_CACHE_TTL_S = 2.0
MAX_KEYS = 10_000
TOUCH_EVERY_S = 60.0

Read = Callable[[str], Coroutine[Any, Any, KeyRecord | None]]
Touch = Callable[[str, datetime], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class _Held:
    record: KeyRecord | None
    read_at: float


class KeyRing:
    def __init__(
        self,
        read: Read,
        touch: Touch,
        *,
        ttl_s: float = KEY_CACHE_TTL_S,
        max_keys: int = MAX_KEYS,
        touch_every_s: float = TOUCH_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime],
    ) -> None:
        self._read = read
        self._touch = touch
        self._ttl_s = ttl_s
        self._max_keys = max_keys
        self._touch_every_s = touch_every_s
        self._clock = clock
        self._now = now
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._reading: dict[str, asyncio.Task[_Held]] = {}
        self._touched: dict[str, datetime] = {}
        self._tasks = TaskSet()

    async def verify(self, key: str) -> VerifiedKey | None:
        """Whose key this is; None when it is unknown, malformed or revoked. `DatabaseUnavailable` when it could
        not be checked."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        held = self._held.get(key_id)
        if held is None or self._clock() - held.read_at >= self._ttl_s:
            try:
                held = await self._read_once(key_id)
            except DatabaseUnavailable:
                if held is None:
                    raise
                # Its last verdict stands while nobody can revoke it (module docstring).
        else:
            self._held.move_to_end(key_id)
        record = held.record
        if record is None or record.revoked or not matches(digest(key), record.key_hash):
            return None
        self._maybe_touch(key_id, record)
        return VerifiedKey(record.name, record.role)

    async def _read_once(self, key_id: str) -> _Held:
        reading = self._reading.get(key_id)
        if reading is None:
            reading = self._reading[key_id] = self._tasks.spawn(
                self._read_and_hold(key_id), "key-read", quiet=(DatabaseUnavailable,)
            )
            reading.add_done_callback(lambda _: self._reading.pop(key_id, None))
        # Shielded: a request that gives up does not cancel the read others wait on.
        return await asyncio.shield(reading)

    async def _read_and_hold(self, key_id: str) -> _Held:
        held = _Held(await self._read(key_id), self._clock())
        self._held[key_id] = held
        self._held.move_to_end(key_id)
        while len(self._held) > self._max_keys:
            self._held.popitem(last=False)
        return held

    def _maybe_touch(self, key_id: str, record: KeyRecord) -> None:
        now = self._now()
        last = self._touched.get(key_id) or record.last_used_at
        if last is not None and (now - last).total_seconds() < self._touch_every_s:
            return
        if len(self._touched) >= self._max_keys:
            self._touched.clear()
        self._touched[key_id] = now
        self._tasks.spawn(self._touch(key_id, now), "key-touch", quiet=(DatabaseUnavailable,))

    async def aclose(self) -> None:
        await self._tasks.aclose()


def database_reads(sessions: async_sessionmaker[AsyncSession], database: DatabaseHealth) -> tuple[Read, Touch]:
    """`read` and `touch` against the database, each bounded (`DatabaseHealth.call`)."""

    async def read(key_id: str) -> KeyRecord | None:
        async def work() -> KeyRecord | None:
            async with sessions() as session:
                return await read_key(session, key_id)

        return await database.call(work)

    async def touch(key_id: str, now: datetime) -> None:
        async def work() -> None:
            async with sessions() as session:
                await touch_key(session, key_id, now)

        await database.call(work, write=True)

    return read, touch
