"""The floor for bench/ws_cycle.py: a minimal ASGI app doing nothing but the fan-out, on uvicorn.

It polls the same fake upstream on the same schedule (the same concurrency, the
same 44 pairs), stamps `last_updated` when each answer arrives, and hands each
update to every client as the service's frames: `rate_update` per pair, or
`rates_update` for a client that subscribed with `"batch": true`, each client's
pending updates conflated by pair; an `all_rates_update` ends each cycle. No
database, no Redis, no validation: what is left is uvicorn's and the socket's
share of the work, the same in both runs.

Run by `uvicorn bench.ws_bare:create_bare_app --factory`, configured by
BENCH_UPSTREAM_URL, BENCH_UPSTREAM_KEY, BENCH_INTERVAL_S and BENCH_CONCURRENCY.
"""

import asyncio
import json
import os
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

SOURCES = ("USD", "CAD", "GBP", "EUR")
DESTINATIONS = ("XOF", "XAF", "EGP", "ETB", "GHS", "KES", "MAD", "NGN", "ZAR", "UGX", "ZMW")
CYCLE = "all_rates_update"


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class BareClient:
    def __init__(self) -> None:
        self.batch = False
        self.pending: dict[str, tuple[str, str, str, str] | str] = {}
        self.ready = asyncio.Event()

    def offer(self, pair: str, update: tuple[str, str, str, str]) -> None:
        self.pending.pop(pair, None)
        self.pending[pair] = update
        self.ready.set()

    def push(self, frame: str) -> None:
        self.pending.pop(CYCLE, None)
        self.pending[CYCLE] = frame
        self.ready.set()

    async def take(self) -> str:
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        key = next(iter(self.pending))
        entry = self.pending[key]
        if isinstance(entry, str):
            del self.pending[key]
            return entry
        if not self.batch:
            del self.pending[key]
            return entry[0]
        items: list[tuple[str, str, str, str]] = []
        for value in self.pending.values():
            if isinstance(value, str):
                break
            items.append(value)
        for item in items:
            pair = item[2]
            del self.pending[pair]
        as_of = max(item[3] for item in items)
        return '{"type":"rates_update","rates":[' + ",".join(item[1] for item in items) + '],"as_of":"' + as_of + '"}'


def create_bare_app() -> ASGIApp:
    upstream = os.environ["BENCH_UPSTREAM_URL"]
    key = os.environ["BENCH_UPSTREAM_KEY"]
    interval_s = float(os.environ.get("BENCH_INTERVAL_S", "10"))
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "4"))
    clients: set[BareClient] = set()
    items: dict[str, str] = {}
    tasks: list[asyncio.Task[None]] = []

    async def fetch(http: httpx.AsyncClient, limiter: asyncio.Semaphore, source: str, destination: str) -> None:
        params = {"amount": "1000", "source_currency": source, "destination_currency": destination}
        async with limiter:
            response = await http.get("/v3/transfers/rates", params=params)
        received = _iso(datetime.now(UTC))
        data = response.json()["data"]
        rate = Decimal(str(data["rate"]))
        source_amount, destination_amount = Decimal(str(data["source"]["amount"])), Decimal(1000)
        pair = f"{source}/{destination}"
        previous = json.loads(items[pair])["rate"] if pair in items else None
        item = {
            "source_currency": source,
            "destination_currency": destination,
            "rate": float(rate),
            "source_amount": float(source_amount),
            "destination_amount": 1000,
            "destination_per_source": float(destination_amount / source_amount),
            "last_updated": received,
            "stale": False,
            "provider": "flutterwave",
        }
        items[pair] = json.dumps(item, separators=(",", ":"))
        frame = json.dumps({"type": "rate_update", "rate": item, "previous_rate": previous}, separators=(",", ":"))
        batch_item = json.dumps({**item, "previous_rate": previous}, separators=(",", ":"))
        # The batch frame's as_of is the newest last_updated: carried beside the item, compared as text.
        update = (frame, batch_item, pair, received)
        for client in clients:
            client.offer(pair, update)

    async def poll() -> None:
        limiter = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=upstream, headers=headers, timeout=30) as http:
            next_at = time.monotonic()
            while True:
                await asyncio.gather(*(fetch(http, limiter, s, d) for s in SOURCES for d in DESTINATIONS))
                as_of = _iso(datetime.now(UTC))
                marker = f'{{"type":"all_rates_update","as_of":"{as_of}","count":44,"changed":44}}'
                for client in clients:
                    client.push(marker)
                next_at += interval_s
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def websocket(receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        client = BareClient()
        clients.add(client)
        snapshot = '{"type":"all_rates","rates":[' + ",".join(items.values()) + '],"as_of":"x"}'

        async def receiver() -> None:
            while True:
                message: dict[str, Any] = dict(await receive())
                if message["type"] == "websocket.disconnect":
                    return
                if '"batch": true' in (message.get("text") or "") or '"batch":true' in (message.get("text") or ""):
                    client.batch = True

        async def sender() -> None:
            await send({"type": "websocket.send", "text": snapshot})
            while True:
                await send({"type": "websocket.send", "text": await client.take()})

        try:
            jobs = [asyncio.create_task(receiver()), asyncio.create_task(sender())]
            await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            clients.discard(client)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    tasks.append(asyncio.create_task(poll()))
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "websocket":
            await websocket(receive, send)
        elif scope["type"] == "http":
            body = json.dumps({"count": len(items)}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/json")]})
            await send({"type": "http.response.body", "body": body})

    return app
