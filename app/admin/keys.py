"""API keys: their format, their hash, and the rows that hold them (docs/operations.md, "Operators").

A key is `fxr_` followed by `secrets.token_urlsafe(32)`: 256 random bits. Only
its SHA-256 is stored. A password needs a slow, salted hash because people
choose guessable ones and a stolen table can be tried against a dictionary;
a 256-bit random key cannot be guessed whatever the hash costs, so a fast
hash loses nothing and keeps each verification to a microsecond
(docs/decisions/0020-api-keys-hashed-with-sha-256.md).

The first `KEY_ID_CHARS` characters (`fxr_` and 8 random ones) are the key's
id: not secret (`list` shows it, so an operator can tell which key a client
holds), and what a presented key is looked up by. The rest of the key
(208 bits) is still unguessable; the hash of the whole key is compared in
constant time.
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.storage.models import ApiKey

PREFIX = "fxr_"
KEY_ID_CHARS = len(PREFIX) + 8
# What `secrets.token_urlsafe(32)` gives: 43 characters of the URL-safe alphabet.
_KEY = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_-]{43}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Role(StrEnum):
    operator = "operator"
    """May use `/api/admin`."""
    integrator = "integrator"
    """Counted against its own limit on the public API; refused under `/api/admin`."""


class KeyProblem(ValueError):
    """A `create` or `revoke` that cannot be done as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class VerifiedKey:
    """Who a valid key belongs to: all that anything past verification ever sees of it."""

    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key's row as `verify` needs it."""

    name: str
    role: Role
    key_hash: str
    revoked: bool
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyListing:
    name: str
    role: Role
    key_id: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def key_id_of(key: str) -> str | None:
    """The key's id, or None when the text cannot be a key at all (then no lookup is worth making)."""
    return key[:KEY_ID_CHARS] if _KEY.fullmatch(key) else None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def matches(key_hash: str, stored_hash: str) -> bool:
    return hmac.compare_digest(key_hash.encode(), stored_hash.encode())


async def create_key(session: AsyncSession, name: str, role: Role, now: datetime) -> str:
    """A new key for `name`, stored as its hash and committed; the key itself is returned once, never kept."""
    if not NAME.fullmatch(name):
        raise KeyProblem(f"{name!r} is no key name: 1-64 letters, digits, '.', '_' or '-', starting alphanumeric")
    if await session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise KeyProblem(f"a key named {name!r} exists already (names are never reused, even once revoked)")
    key = new_key()
    session.add(ApiKey(name=name, role=role.value, key_id=key_id_of(key), key_hash=digest(key), created_at=now))
    try:
        await session.commit()
    except IntegrityError:
        # The name taken meanwhile by another `create`, or (never seen in practice) a key id drawn twice.
        await session.rollback()
        raise KeyProblem(f"a key named {name!r} could not be stored; run the command again") from None
    return key


async def list_keys(session: AsyncSession) -> list[KeyListing]:
    rows = await session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
    return [
        KeyListing(row.name, Role(row.role), row.key_id, row.created_at, row.last_used_at, row.revoked_at)
        for row in rows
    ]


async def revoke_key(session: AsyncSession, name: str, now: datetime) -> None:
    """Revoke `name`'s key and commit; revoking a revoked key again changes nothing."""
    row = await session.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise KeyProblem(f"no key is named {name!r}")
    if row.revoked_at is None:
        row.revoked_at = now
        await session.commit()


async def read_key(session: AsyncSession, key_id: str) -> KeyRecord | None:
    row = await session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    if row is None:
        return None
    return KeyRecord(row.name, Role(row.role), row.key_hash, row.revoked_at is not None, row.last_used_at)


async def touch_key(session: AsyncSession, key_id: str, now: datetime) -> None:
    await session.execute(update(ApiKey).where(ApiKey.key_id == key_id).values(last_used_at=now))
    await session.commit()
