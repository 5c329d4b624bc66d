"""WebSocket limits (docs/limits.md): how many clients a process holds, and how fast one may send.

- `WS_MAX_CLIENTS` per process and `WS_MAX_CLIENTS_PER_ADDRESS` per client
  address per process (an IPv6 client by its /64, `app.limits.addresses`):
  past either, the connection is accepted and closed at once with 1013 (try
  again later), so the client sees a reason, not a failed handshake.
- Each connection may send `WS_MESSAGES_PER_SECOND` messages a second (10),
  in bursts of up to `WS_MESSAGE_BURST` (50): a token bucket. A message over
  that is answered with a `rate_limited` error and not acted on, and the
  client is closed with 1008 (policy violation) if it keeps on (`MessageBucket`
  says when, and why that is within 10 s). Under the image's protocol (app.live.protocol) the connection's
  frames the application never sees, pings, pongs and every fragment but a
  message's last, take from the same bucket, and a flood of them is closed
  with 1008 there; `message_bucket` hands the application that bucket.
- A client may follow `WS_MAX_PAIRS_PER_CLIENT` pairs (`MAX_PAIRS_PER_CLIENT`,
  256, by default); app.live.client's `subscribe` holds it.
- A message may be `MAX_MESSAGE_BYTES` (64 KiB) long, counted as it arrives by
  the server (the protocol, or uvicorn's `--ws-max-size`), which closes a
  longer one with 1009.
"""

import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from enum import Enum
from typing import Any

from fastapi import WebSocket
from prometheus_client import Counter

from app.limits.addresses import limit_key
from app.state import services_in, services_of

log = logging.getLogger(__name__)

# The longest message a client may send (UTF-8 bytes of a text message, after decompression); what `--ws-max-size`
# says to uvicorn and what the protocol enforces.
MAX_MESSAGE_BYTES = 64 * 1024
# The scope extension under which the protocol offers the connection's `MessageBucket`.
MESSAGE_BUCKET = "fxrates.message_bucket"
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
MESSAGES_PER_S = 10.0
BURST = 50
MAX_STRIKES = 50
STRIKES_FADE_PER_S = 1.0
# How long a client refused may go on without slowing down before it is closed; and how far it must slow down:
# until its bucket holds this many seconds' worth of messages (at least 2) at a message's arrival.
FLOOD_GRACE_S = 4.0
SLOWED_DOWN_S = 0.5
# Pairs one client may follow at once (`WS_MAX_PAIRS_PER_CLIENT`'s default), and so the most one message may name.
MAX_PAIRS_PER_CLIENT = 256


class Refusal(Enum):
    TOO_MANY_CLIENTS = "ws_clients"
    TOO_MANY_FROM_ADDRESS = "ws_per_address"


class Admission:
    """Counts this process's WebSocket clients, in total and per address."""

    def __init__(
        self,
        max_clients: int,
        max_per_address: int,
        refused: Counter,
        *,
        messages_per_s: float = MESSAGES_PER_S,
        message_burst: int = BURST,
    ) -> None:
        self.messages_per_s = messages_per_s
        self.message_burst = message_burst
        self._max_clients = max_clients
        self._max_per_address = max_per_address
        self.refused = refused
        self._by_address: Tally[str] = Tally()
        self._total = 0
        self.warned_unguarded = False

    @contextmanager
    def admit(self, address: str) -> Iterator[Refusal | None]:
        """Hold a place for the connection while inside; yields why it was refused, or None."""
        refusal = None
        if self._total >= self._max_clients:
            refusal = Refusal.TOO_MANY_CLIENTS
        elif self._by_address[address] >= self._max_per_address:
            refusal = Refusal.TOO_MANY_FROM_ADDRESS
        if refusal is not None:
            self.refused.labels(limit=refusal.value).inc()
            yield refusal
            return
        self._total += 1
        self._by_address[address] += 1
        try:
            yield None
        finally:
            self._total -= 1
            self._by_address[address] -= 1
            if self._by_address[address] <= 0:
                del self._by_address[address]


class MessageBucket:
    """A token bucket for one connection's messages, and when a client that keeps on past it is to be closed.

    A message finding a token is acted on; one finding none is refused (`take` is False). A client is closed
    (`exhausted`) by either of two rules, both counting only refusals, so a client whose messages fit the bucket
    (never more than `burst` + `rate_s` x T in any T seconds: at or below the rate) is never closed:

    - strikes: each refusal is one, and they fade at `STRIKES_FADE_PER_S`; past `MAX_STRIKES` it is closed. This
      ends a flood far above the rate within about `MAX_STRIKES / (rate sent - rate_s)` seconds of its first
      refusal (0.05 s at 1,000 a second), and a client alternating quiet spells and bursts of refusals.
    - no slowing down: from its first refusal (the flood's start: before it the client was within its burst),
      a client has `FLOOD_GRACE_S` to let its bucket refill to `slowed_down` tokens (the worth of `SLOWED_DOWN_S`
      at the rate, at least 2, at most the burst), seen at one of its messages' arrival; otherwise its first
      message after that is refused and it is closed. A sender at any steady rate s above `rate_s`, however
      close, never gets there: after a refusal the bucket holds under 1 token, and each later message finds at
      most what the one before left (under 1) plus `rate_s / s` (under 1): under 2. So it is closed within
      `FLOOD_GRACE_S + 1/s` (4.1 s at 10 a second) of its first refusal, where strikes alone would take
      `MAX_STRIKES / (s - rate_s - STRIKES_FADE_PER_S)` (for ever for s up to 11 a second). A client that
      pauses for `SLOWED_DOWN_S`, or goes on at 8 a second for 2 s, has slowed down and is forgiven.

    From a flood's first frame, with the bucket full, the first refusal comes `burst / (s - rate_s)` seconds in:
    a flood at 20 a second (or more) is closed within 10 s of its first frame (5 s + 4.05 s at 20 a second).
    """

    def __init__(
        self,
        refused: Counter,
        rate_s: float = MESSAGES_PER_S,
        burst: int = BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refused = refused
        self._rate_s = rate_s
        self._burst = burst
        self._clock = clock
        self._slowed_down = min(float(burst), max(2.0, rate_s * SLOWED_DOWN_S))
        self._tokens = float(burst)
        self._at = clock()
        self._strikes = 0.0
        self._refused_since: float | None = None  # the first refusal not yet forgiven
        self._exhausted = False

    def take(self) -> bool:
        """Whether a message just received may be acted on."""
        if self._exhausted:
            return False
        now = self._clock()
        elapsed_s = now - self._at
        self._at = now
        self._tokens = min(self._burst, self._tokens + elapsed_s * self._rate_s)
        self._strikes = max(0.0, self._strikes - elapsed_s * STRIKES_FADE_PER_S)
        if self._refused_since is not None:
            if self._tokens >= self._slowed_down:
                self._refused_since = None
            elif now - self._refused_since >= FLOOD_GRACE_S:
                return self._refuse(now, closing=True)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self._strikes += 1
        return self._refuse(now, closing=self._strikes > MAX_STRIKES)

    def _refuse(self, now: float, *, closing: bool) -> bool:
        if self._refused_since is None:
            self._refused_since = now
        self._exhausted = closing
        self._refused.labels(limit="ws_messages").inc()
        return False

    @property
    def exhausted(self) -> bool:
        """The client kept sending past its limit: it is to be closed."""
        return self._exhausted


@asynccontextmanager
async def admitted(websocket: WebSocket) -> AsyncIterator[bool]:
    """Inside: whether the connection holds a place; a refused one has been accepted and closed with 1013."""
    admission = services_of(websocket.scope).ws_admission
    with admission.admit(limit_key(websocket.scope)) as refusal:
        if refusal is not None:
            await websocket.accept()
            await websocket.close(CLOSE_TRY_AGAIN_LATER, reason="too many clients, try again later")
        yield refusal is None


def connection_bucket(state: Mapping[str, Any]) -> MessageBucket | None:
    """A new connection's bucket, as the application's lifespan state sizes it (None: no limits in that state)."""
    services = services_in(state)
    if services is None:
        return None
    admission = services.ws_admission
    return MessageBucket(admission.refused, admission.messages_per_s, admission.message_burst)


def message_bucket(websocket: WebSocket) -> MessageBucket:
    """The connection's bucket: the one the protocol also counts the connection's other frames in, if it offers it."""
    offered = websocket.scope.get("extensions", {}).get(MESSAGE_BUCKET)
    if isinstance(offered, MessageBucket):
        return offered
    admission = services_of(websocket.scope).ws_admission
    if not admission.warned_unguarded:
        admission.warned_unguarded = True  # once a process: every connection is served the same way
        log.warning(
            "WebSocket served without --ws app.ws_protocol:WebSocketProtocol: a client's pings and fragments are "
            "not counted toward its message rate, so a flood of them is not closed (docs/deployment.md)"
        )
    return MessageBucket(admission.refused, admission.messages_per_s, admission.message_burst)
