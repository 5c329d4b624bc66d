"""The decisions behind keys, in process with a fake clock (docs/rest.md, "Keys"): how long a verdict is held,
one read for many requests, what happens while the database is away, and when an address is blocked."""

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, Counter

from app.admin.keyring import KEY_CACHE_TTL_S, KeyRing
from app.admin.keys import KeyRecord, Role, VerifiedKey, digest, key_id_of, new_key
from app.errors import DatabaseUnavailable
from app.limits.per_key import BadKeys, KeyGate
from app.limits.windows import MovingWindow


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Table:
    """The rows `KeyRing` reads, and what it wrote back."""

    def __init__(self) -> None:
        self.rows: dict[str, KeyRecord] = {}
        self.reads = 0
        self.touches: list[str] = []
        self.down = False
        self.gate: asyncio.Event | None = None

    def add(self, name: str, role: Role = Role.operator) -> str:
        key = new_key()
        key_id = key_id_of(key)
        assert key_id is not None
        self.rows[key_id] = KeyRecord(name, role, digest(key), revoked=False, last_used_at=None)
        return key

    def revoke(self, key: str) -> None:
        key_id = key_id_of(key)
        assert key_id is not None
        row = self.rows[key_id]
        self.rows[key_id] = KeyRecord(row.name, row.role, row.key_hash, revoked=True, last_used_at=None)

    async def read(self, key_id: str) -> KeyRecord | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise DatabaseUnavailable(retry_after_s=5)
        return self.rows.get(key_id)

    async def touch(self, key_id: str, now: datetime) -> None:
        self.touches.append(key_id)


WALL = datetime(2026, 12, 1, tzinfo=UTC)


def keyring(table: Table, clock: FakeClock, **options: float) -> KeyRing:
    return KeyRing(table.read, table.touch, clock=clock, now=lambda: WALL, **options)  # type: ignore[arg-type]


async def test_a_revoked_key_is_refused_once_its_verdict_is_ttl_old() -> None:
    table, clock = Table(), FakeClock()
    key = table.add("ops-alice")
    ring = keyring(table, clock)
    try:
        assert await ring.verify(key) == VerifiedKey("ops-alice", Role.operator)
        table.revoke(key)
        clock.now += KEY_CACHE_TTL_S - 0.01
        assert await ring.verify(key) is not None  # held: no read per request
        assert table.reads == 1
        clock.now += 0.01
        assert await ring.verify(key) is None
        assert table.reads == 2
    finally:
        await ring.aclose()
    assert KEY_CACHE_TTL_S <= 3, "revocation must reach every replica within 5 s, a read included"


async def test_a_wrong_secret_with_a_known_id_and_malformed_text_are_refused_without_a_read() -> None:
    table, clock = Table(), FakeClock()
    key = table.add("ops-alice")
    ring = keyring(table, clock)
    try:
        assert await ring.verify(key) is not None
        forged = key[:-1] + ("A" if key[-1] != "A" else "B")
        assert await ring.verify(forged) is None
        assert await ring.verify("not a key") is None
        assert await ring.verify(key + "x") is None
        assert table.reads == 1
    finally:
        await ring.aclose()


async def test_many_requests_for_a_key_not_held_make_one_read() -> None:
    table, clock = Table(), FakeClock()
    key = table.add("mobile-app", Role.integrator)
    table.gate = asyncio.Event()
    ring = keyring(table, clock)
    try:
        waiting = [asyncio.create_task(ring.verify(key)) for _ in range(50)]
        await asyncio.sleep(0)
        table.gate.set()
        verdicts = await asyncio.gather(*waiting)
    finally:
        await ring.aclose()
    assert verdicts == [VerifiedKey("mobile-app", Role.integrator)] * 50
    assert table.reads == 1


async def test_while_the_database_is_away_a_key_read_before_keeps_its_verdict_and_a_new_one_is_unavailable() -> None:
    table, clock = Table(), FakeClock()
    known, new = table.add("ops-alice"), table.add("ops-bob")
    ring = keyring(table, clock)
    try:
        assert await ring.verify(known) is not None
        table.down = True
        clock.now += 60
        assert await ring.verify(known) == VerifiedKey("ops-alice", Role.operator)
        with pytest.raises(DatabaseUnavailable):
            await ring.verify(new)
    finally:
        await ring.aclose()


async def test_what_is_held_is_bounded() -> None:
    table, clock = Table(), FakeClock()
    keys = [table.add(f"key-{index}") for index in range(5)]
    ring = keyring(table, clock, max_keys=2)
    try:
        for key in keys:
            assert await ring.verify(key) is not None
        reads = table.reads
        assert await ring.verify(keys[-1]) is not None  # among the last two: held
        assert await ring.verify(keys[0]) is not None  # forgotten: read again
        assert table.reads == reads + 1
    finally:
        await ring.aclose()


async def test_last_used_is_written_at_most_once_a_minute_per_key() -> None:
    table, clock = Table(), FakeClock()
    key = table.add("ops-alice")
    moments = iter([WALL, WALL + timedelta(seconds=30), WALL + timedelta(seconds=61)])
    ring = KeyRing(table.read, table.touch, clock=clock, now=lambda: next(moments))
    try:
        for _ in range(3):
            assert await ring.verify(key) is not None
            await asyncio.sleep(0)
    finally:
        await ring.aclose()
    assert len(table.touches) == 2


async def test_the_tenth_bad_key_blocks_the_address_for_the_rest_of_its_minute() -> None:
    clock = FakeClock()
    window = MovingWindow(None, None)
    failures = Counter("failures", "", ["reason"], registry=CollectorRegistry())
    table = Table()
    good = table.add("ops-alice")
    ring = keyring(table, clock)
    gate = KeyGate(ring, BadKeys(window, clock=clock), failures)
    try:
        for index in range(10):
            assert (await gate.admit("192.0.2.1", f"fxr_{index:043d}")).outcome == "unknown"
        blocked = await gate.admit("192.0.2.1", good)
        assert blocked.outcome == "blocked" and 59 <= blocked.retry_after_s <= 60
        assert (await gate.admit("192.0.2.2", good)).outcome == "valid"  # another address is not
        clock.now += blocked.retry_after_s
        assert (await gate.admit("192.0.2.1", good)).outcome == "valid"
    finally:
        await ring.aclose()
        await window.aclose()
    assert failures.labels(reason="bad_key")._value.get() == 10


def test_only_the_hash_is_stored_and_it_is_sha256_of_the_whole_key() -> None:
    key = new_key()
    assert key.startswith("fxr_") and len(key) == 47
    assert digest(key) == hashlib.sha256(key.encode()).hexdigest()
    assert key_id_of(key) == key[:12] and new_key() != key
