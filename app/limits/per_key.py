"""Keys on the public API: who sent one, its own limit, and addresses that send bad ones (docs/limits.md).

A request may carry `Authorization: Bearer <key>`. `KeyGate.admit` decides,
before any limit is counted:

- the address sent `BAD_KEYS_PER_MINUTE` bad keys within a minute: 429, for
  every request with a key (valid or not) until that minute is over;
- the key is unknown, revoked or not a key at all: 401 (and one more bad key
  counted against the address);
- the key is valid: the request is counted against the key's own limit,
  `RATE_LIMIT_PER_KEY_PER_MINUTE`, instead of the address's, and the key's
  name and role are left in the scope (`key_of`) for `/api/admin`.

The bad keys are counted in a moving window (in Redis when it is set), touched
only when a bad key arrives; whether an address is blocked is decided from
this process's memory, so a valid key costs no round trip. Another replica
blocks the address at the next bad key it sees. The key itself goes nowhere:
not in a log line, a metric or an answer.
"""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from limits import RateLimitItemPerMinute
from prometheus_client import Counter
from starlette.types import Scope

from app.admin.keyring import KeyRing
from app.admin.keys import VerifiedKey
from app.limits.windows import MovingWindow

BAD_KEYS_PER_MINUTE = 10
# Blocked addresses held at most (the least recently blocked forgotten first), as many as the per-client limit's.
MAX_BLOCKED = 100_000
SCOPE_KEY = "fxrates.key"
_AUTHORIZATION = b"authorization"


def bearer_token(scope: Scope) -> str | None:
    """The credentials of the request's `Authorization` header ("" when it is not a Bearer one); None without."""
    for name, value in scope["headers"]:
        if name == _AUTHORIZATION:
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def key_of(scope: Scope) -> VerifiedKey | None:
    """The verified key the request carried, if any (set by `app.limits.per_client.ClientLimit`)."""
    key: VerifiedKey | None = scope.get(SCOPE_KEY)
    return key


class BadKeys:
    """Addresses that sent too many bad keys: blocked, in this process's memory, until their window empties."""

    def __init__(
        self,
        window: MovingWindow,
        *,
        per_minute: int = BAD_KEYS_PER_MINUTE,
        max_addresses: int = MAX_BLOCKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window
        self._item = RateLimitItemPerMinute(per_minute)
        self._max_addresses = max_addresses
        self._clock = clock
        self._blocked: OrderedDict[str, float] = OrderedDict()  # address -> until (clock)

    def blocked_for(self, address: str) -> float | None:
        """Seconds the address stays blocked; None when it is not."""
        if not self._blocked:
            return None
        until = self._blocked.get(address)
        if until is None:
            return None
        left = until - self._clock()
        if left <= 0:
            del self._blocked[address]
            return None
        return left

    async def failed(self, address: str) -> None:
        """One more bad key from `address`; the last one its minute allows blocks it."""
        state = await self._window.hit(self._item, f"bad-keys:{address}")
        if state.allowed and state.remaining > 0:
            return
        self._blocked[address] = self._clock() + max(1.0, state.reset_s)
        self._blocked.move_to_end(address)
        while len(self._blocked) > self._max_addresses:
            self._blocked.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Admission:
    outcome: Literal["valid", "unknown", "blocked"]
    key: VerifiedKey | None = None
    retry_after_s: float = 0.0


class KeyGate:
    def __init__(self, keyring: KeyRing, bad_keys: BadKeys, failures: Counter) -> None:
        self.keyring = keyring
        self.bad_keys = bad_keys
        self._failures = failures

    async def admit(self, address: str, token: str) -> Admission:
        """`DatabaseUnavailable` when a key never seen cannot be checked now."""
        blocked_s = self.bad_keys.blocked_for(address)
        if blocked_s is not None:
            self._failures.labels(reason="blocked").inc()
            return Admission("blocked", retry_after_s=blocked_s)
        key = await self.keyring.verify(token) if token else None
        if key is None:
            self._failures.labels(reason="bad_key").inc()
            await self.bad_keys.failed(address)
            return Admission("unknown")
        return Admission("valid", key)

    def limit_key(self, key: VerifiedKey) -> str:
        """What the key's limit counts under: its name, apart from any address."""
        return f"key:{key.name}"
