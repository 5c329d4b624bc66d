"""A fake Flutterwave: a real HTTP server on 127.0.0.1, in a thread with its own event loop.

It answers `GET /v3/transfers/rates` like Flutterwave (docs/design.md, "The upstream") and has
switches for everything the real one does on a bad day:

    fake.latency_s = 0.15                    every answer waits this long
    fake.orientation = "destination_per_source"   which way `rate` points
    fake.set_rate(pair, Decimal("1530.25"))  the market value (destination per source)
    fake.bump(pair, Decimal("1.01"))         move a pair's value
    fake.drift = Decimal("0.0005")           every answer moves its pair this much, up and down in turn
    fake.glitch(pair, Decimal("1.5"), times=1)  the next answers for a pair are off by a factor; the market is not
    fake.fail("503", pairs=[...], times=2)   inject a fault: see FAULTS
    fake.clear_faults()

and counters of what it saw: `calls[pair]`, `call_times[pair]`, `max_in_flight`.
Tests use it as a context manager; it stops its own server thread.
"""

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, localcontext
from types import TracebackType
from typing import Literal, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.currencies import Pair
from tests.support.waiting import eventually_sync

SECRET_KEY = "FLWSECK_TEST-fake-0123456789abcdef-X"

# Units per US dollar for the corridors the service polls; other codes default to 2.5.
UNITS_PER_USD: dict[str, Decimal] = {
    code: Decimal(value)
    for code, value in {
        "USD": "1",
        "EUR": "0.92",
        "GBP": "0.79",
        "CAD": "1.38",
        "XOF": "604.5",
        "XAF": "604.5",
        "EGP": "48.55",
        "ETB": "140.2",
        "GHS": "12.05",
        "KES": "129.3",
        "MAD": "9.91",
        "NGN": "1530.25",
        "ZAR": "18.21",
        "UGX": "3702.5",
        "ZMW": "26.45",
    }.items()
}

FAULTS = {
    "429": "HTTP 429 with Retry-After (fail(..., retry_after=seconds))",
    "500": "HTTP 500 with Flutterwave's error body",
    "503": "HTTP 503 with Flutterwave's error body",
    "400": "HTTP 400 with Flutterwave's error body",
    "timeout": "answer only after `slow_s` seconds",
    "hang": "never answer (until the fake stops)",
    "held": "answer with success once the test calls release_held() (or the fake stops)",
    "not_json": "200 with an HTML body",
    "status_error": "200 with status=error",
    "wrong_schema": "200 with data as a list",
    "missing_amounts": "200 without source.amount",
    "zero_amount": "200 with source.amount 0",
    "negative_amount": "200 with source.amount negative",
    "non_numeric": "200 with rate a word",
    "inconsistent_rate": "200 with a rate that fits neither orientation",
    "wrong_currency": "200 for another destination currency",
    "bad_gzip": "200 claiming gzip, with a body that is not",
    "deep_json": "200 with JSON nested deeper than any parser goes",
}


@dataclass
class _Fault:
    kind: str
    pairs: frozenset[Pair] | None
    times: int | None
    retry_after: str | None


def _number(value: Decimal) -> str:
    return format(value, "f")


class _PromptServer(uvicorn.Server):
    """uvicorn's server, stopped at once: the fake starts and stops around most tests, and uvicorn's own exit
    (a 0.1 s tick to notice, 0.1 s more before waiting for connections) cost a fifth of a second each time."""

    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):  # on_tick's cadence (its date header), unless woken to exit
                    await self._wake.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # No grace: a test double's in-flight answers (a hang, a slow answer) are abandoned, never awaited.
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        for task in self.server_state.tasks:
            task.cancel()
        for server in self.servers:
            await server.wait_closed()

    def exit_now(self) -> None:
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(wake.set)


class FakeFlutterwave:
    def __init__(self, *, slow_s: float = 5.0) -> None:
        self.latency_s = 0.0
        self.drift: Decimal | None = None
        self.slow_s = slow_s
        self.orientation: Literal["source_per_destination", "destination_per_source"] = "source_per_destination"
        self.calls: Counter[Pair] = Counter()
        self.call_times: dict[Pair, list[float]] = {}
        self.max_in_flight = 0
        self._in_flight = 0
        self._rates: dict[Pair, Decimal] = {}
        self._glitches: dict[Pair, tuple[Decimal, int]] = {}
        self._faults: list[_Fault] = []
        self._chaos: tuple[float, tuple[str, ...], random.Random] | None = None
        self.served: dict[Pair, list[tuple[float, Decimal]]] = {}  # every value answered with success, and when
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._server: _PromptServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # switches

    def rate(self, pair: Pair) -> Decimal:
        """The current market value of `pair`, in destination units per source unit."""
        with self._lock:
            if pair not in self._rates:
                per_usd_dst = UNITS_PER_USD.get(pair.destination, Decimal("2.5"))
                per_usd_src = UNITS_PER_USD.get(pair.source, Decimal("2.5"))
                with localcontext() as context:
                    context.prec = 10
                    self._rates[pair] = +(per_usd_dst / per_usd_src)
            return self._rates[pair]

    def set_rate(self, pair: Pair, destination_per_source: Decimal) -> None:
        with self._lock:
            self._rates[pair] = destination_per_source

    def bump(self, pair: Pair, factor: Decimal) -> Decimal:
        value = self.rate(pair)
        with localcontext() as context:
            context.prec = 10
            self.set_rate(pair, +(value * factor))
        return self.rate(pair)

    def glitch(self, pair: Pair, factor: Decimal, *, times: int = 1) -> Decimal:
        """The next `times` successful answers for `pair` say its value times `factor`; its value stays. Returns
        the value they will say."""
        with self._lock:
            self._glitches[pair] = (factor, times)
        with localcontext() as context:
            context.prec = 10
            return +(self.rate(pair) * factor)

    def fail(
        self,
        kind: str,
        *,
        pairs: Iterable[Pair] | None = None,
        times: int | None = None,
        retry_after: float | str | None = None,
    ) -> None:
        """Answer with `kind` (see FAULTS) for `pairs` (all when None), `times` times (for ever when None)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        fault = _Fault(
            kind,
            frozenset(pairs) if pairs is not None else None,
            times,
            None if retry_after is None else str(retry_after),
        )
        with self._lock:
            self._faults.append(fault)

    def release_held(self) -> None:
        """Let every request held by the "held" fault, and any later one, answer."""
        self._released.set()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._chaos = None

    def chaos(self, probability: float, kinds: Iterable[str], seed: int = 0) -> None:
        """Besides any `fail`, answer each request with a fault drawn from `kinds` with `probability`."""
        kinds = tuple(kinds)
        for kind in kinds:
            if kind not in FAULTS:
                raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._chaos = (probability, kinds, random.Random(seed))

    def reset_counters(self) -> None:
        with self._lock:
            self.calls.clear()
            self.call_times.clear()
            self.max_in_flight = 0

    def _take_fault(self, pair: Pair) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.pairs is None or pair in fault.pairs:
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
            if self._chaos is not None:
                probability, kinds, rng = self._chaos
                if rng.random() < probability:
                    return _Fault(rng.choice(kinds), None, None, "1")
        return None

    # the server

    async def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110 - set from another thread
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def _rates_endpoint(self, request: Request) -> Response:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return await self._answer(request)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _answer(self, request: Request) -> Response:
        params = request.query_params
        try:
            pair = Pair(params["source_currency"].upper(), params["destination_currency"].upper())
            amount = Decimal(params["amount"])
        except (KeyError, ArithmeticError):
            return _error(400, "amount, source_currency and destination_currency are required")
        with self._lock:
            self.calls[pair] += 1
            self.call_times.setdefault(pair, []).append(time.monotonic())
        if request.headers.get("authorization") != f"Bearer {SECRET_KEY}":
            return _error(401, "Invalid authorization key")
        fault = self._take_fault(pair)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault is not None:
            return await self._faulty(fault, pair, amount)
        return self._success(pair, amount)

    def _success(self, pair: Pair, amount: Decimal) -> Response:
        if self.drift:
            # Up on odd calls, down on even ones: every answer is a change, and the value stays near its start.
            self.bump(pair, 1 + self.drift if self.calls[pair] % 2 else 1 / (1 + self.drift))
        with self._lock:
            factor, times = self._glitches.pop(pair, (Decimal(1), 0))
            if times > 1:
                self._glitches[pair] = (factor, times - 1)
        with localcontext() as context:
            context.prec = 10
            value = +(self.rate(pair) * factor)
        body = self._body(pair, amount, value=value)
        with self._lock:
            self.served.setdefault(pair, []).append((time.monotonic(), value))
        return Response(body, media_type="application/json")

    def _body(
        self,
        pair: Pair,
        amount: Decimal,
        *,
        rate: str | None = None,
        source_amount: str | None = None,
        destination: str | None = None,
        value: Decimal | None = None,
    ) -> str:
        value = self.rate(pair) if value is None else value
        with localcontext() as context:
            context.prec = 17
            source_per_destination = Decimal(1) / value
            debited = (amount / value).quantize(Decimal("0.000001"))
        if rate is None:
            rate = _number(+value if self.orientation == "destination_per_source" else source_per_destination)
        return (
            '{"status": "success", "message": "Transfer amount fetched", "data": {'
            f'"rate": {rate}, '
            f'"source": {{"currency": "{pair.source}", "amount": {source_amount or _number(debited)}}}, '
            f'"destination": {{"currency": "{destination or pair.destination}", "amount": {_number(amount)}}}'
            "}}"
        )

    async def _faulty(self, fault: _Fault, pair: Pair, amount: Decimal) -> Response:
        kind = fault.kind
        if kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return _error(429, "Too many requests", headers)
        if kind in ("500", "503", "400"):
            return _error(int(kind), "Unable to fetch rates at the moment")
        if kind == "hang":
            await self._wait(float("inf"))
            return _error(503, "stopping")
        if kind == "timeout":
            await self._wait(self.slow_s)
            return self._success(pair, amount)
        if kind == "held":
            while not self._released.is_set() and not self._stopping.is_set():  # noqa: ASYNC110 - set from another thread
                await asyncio.sleep(0.02)
            return self._success(pair, amount)
        if kind == "not_json":
            return Response("<html><body>Bad gateway</body></html>", media_type="text/html")
        if kind == "status_error":
            return JSONResponse({"status": "error", "message": "Unable to fetch rates at the moment", "data": None})
        if kind == "wrong_schema":
            return JSONResponse({"status": "success", "message": "Transfer amount fetched", "data": [1, 2, 3]})
        if kind == "missing_amounts":
            body = self._body(pair, amount).replace('"amount": ', '"amoun": ', 1)
            return Response(body, media_type="application/json")
        if kind == "zero_amount":
            return Response(self._body(pair, amount, source_amount="0"), media_type="application/json")
        if kind == "negative_amount":
            return Response(self._body(pair, amount, source_amount="-5.5"), media_type="application/json")
        if kind == "non_numeric":
            return Response(self._body(pair, amount, rate='"about 1500"'), media_type="application/json")
        if kind == "inconsistent_rate":
            return Response(self._body(pair, amount, rate="42.4242"), media_type="application/json")
        if kind == "bad_gzip":
            return Response(b"this is not gzip", media_type="application/json", headers={"Content-Encoding": "gzip"})
        if kind == "deep_json":
            return Response("[" * 100_000 + "]" * 100_000, media_type="application/json")
        if kind == "wrong_currency":
            other = "GHS" if pair.destination != "GHS" else "KES"
            return Response(self._body(pair, amount, destination=other), media_type="application/json")
        raise AssertionError(kind)

    def start(self) -> Self:
        app = Starlette(routes=[Route("/v3/transfers/rates", self._rates_endpoint)])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=2)
        self._server = _PromptServer(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-flutterwave"
        )
        self._thread.start()
        eventually_sync(self._started, what="the fake Flutterwave to start", interval_s=0.01)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def _started(self) -> bool:
        assert self._server is not None and self._thread is not None
        if not self._thread.is_alive():
            raise RuntimeError("the fake Flutterwave's server thread ended before it started")
        return self._server.started

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None and self._thread is not None:
            self._server.exit_now()
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError("the fake Flutterwave did not stop")
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": "error", "message": message, "data": None}, status_code=status, headers=headers)
