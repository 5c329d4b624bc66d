"""A reference client for fxrates' `/ws/rates` (docs/websocket.md, "A reference client").

It keeps a local board (pair -> rate item) equal to the service's, across
disconnections: it reconnects with exponential backoff and full jitter,
resumes with the `epoch` and `seq` it holds (so it is sent only what changed
while it was away), and treats two heartbeat intervals without a frame as a
dead connection. Independent of the service's code: it needs only the
`websockets` library.

    client = RatesClient("wss://rates.example.com/ws/rates")
    task = asyncio.create_task(client.run())
    ...
    client.board.rates["USD/NGN"]["destination_per_source"]
"""

import asyncio
import json
import logging
import random
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

log = logging.getLogger(__name__)

Frame = dict[str, Any]


def _pair(item: Frame) -> str:
    return f"{item['source_currency']}/{item['destination_currency']}"


class Board:
    """Every rate the service holds, as this client last heard: `rates` by pair ("USD/NGN")."""

    def __init__(self) -> None:
        self.rates: dict[str, Frame] = {}
        self.epoch: str | None = None
        # Every store up to `seq` is reflected here: only frames that promise as much move it (`all_rates`,
        # `resumed`, `heartbeat`); a `rate_update`'s seq says nothing of the stores before it.
        self.seq: int | None = None
        self._pair_seqs: dict[str, int] = {}  # the seq of the value held per pair (at most: a snapshot's seq)

    def apply(self, frame: Frame) -> None:
        """Bring the board up to date with one frame from the service; frames of other kinds change nothing."""
        kind = frame.get("type")
        if kind == "all_rates":
            self.rates = {_pair(item): item for item in frame["rates"]}
            self.epoch, self.seq = frame["epoch"], frame["seq"]
            seq: int = frame["seq"]
            self._pair_seqs = {pair: seq for pair in self.rates}
        elif kind == "resumed":
            for item in frame["rates"]:
                self._put(item, item["seq"])
            self.seq = frame["seq"]
        elif kind == "rate_update":
            self._put(frame["rate"], frame["seq"])
        elif kind == "rates_update":
            for item in frame["rates"]:
                self._put(item, item["seq"])
        elif kind == "heartbeat" and frame["epoch"] == self.epoch:
            self.seq = max(self.seq or 0, frame["seq"])

    def _put(self, item: Frame, seq: int) -> None:
        pair = _pair(item)
        if seq <= self._pair_seqs.get(pair, 0):
            return  # older than what is held: two replicas' events may arrive out of their order
        self._pair_seqs[pair] = seq
        self.rates[pair] = {key: value for key, value in item.items() if key not in ("previous_rate", "seq")}


class RatesClient:
    """Follows `/ws/rates` for ever (until cancelled), keeping `board` up to date.

    `on_frame` is called with every frame after it is applied.
    """

    def __init__(
        self,
        url: str,
        *,
        heartbeat_s: float = 25.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_frame: Callable[[Frame], None] = lambda frame: None,
    ) -> None:
        self.url = url
        self.board = Board()
        self.connections = 0  # connections that got their first frame
        self.resumed: bool | None = None  # how the last connection started: resumed, or with a snapshot
        self._heartbeat_s = heartbeat_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._on_frame = on_frame
        self._connected = asyncio.Event()

    def resume_url(self) -> str:
        """The URL to connect to: with the epoch and seq held, once there are any."""
        board = self.board
        if board.epoch is None or board.seq is None:
            return self.url
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(query=urlencode({"epoch": board.epoch, "seq": board.seq})))

    async def wait_connected(self) -> None:
        """Until the current connection has had its first frame."""
        await self._connected.wait()

    async def run(self) -> None:
        low, high = self._backoff
        failures = 0
        while True:
            before = self.connections
            try:
                await self._follow()
            except (OSError, TimeoutError, WebSocketException) as error:
                log.info("connection to %s lost: %s", self.url, error)
            self._connected.clear()
            failures = 1 if self.connections > before else failures + 1  # a connection that worked starts afresh
            # Full jitter: clients cut off together do not all come back at the same moment.
            await asyncio.sleep(random.uniform(low, min(high, low * 2**failures)))

    async def _follow(self) -> None:
        # Two heartbeat intervals without a frame: the connection is dead, whatever TCP says.
        silence_s = 2 * self._heartbeat_s
        async with connect(self.resume_url(), open_timeout=10, max_queue=None) as connection:
            first = True
            while True:
                async with asyncio.timeout(silence_s):
                    text = await connection.recv()
                frame: Frame = json.loads(text, parse_float=Decimal)
                self.board.apply(frame)
                if first:
                    first = False
                    self.connections += 1
                    self.resumed = frame.get("type") == "resumed"
                    self._connected.set()
                self._on_frame(frame)
