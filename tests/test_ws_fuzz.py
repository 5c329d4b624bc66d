"""A hypothesis-driven fuzzer for WebSocket `/ws/rates` (docs/websocket.md) on a real uvicorn process.

Random frames (bad JSON, wrong shapes and types, huge and odd numbers, unknown pairs, binary frames, frames
near the 64 KiB limit) must each get exactly one well-formed answer, leave the connection open, and log no
exception; only a frame over 64 KiB may close the connection, and then with 1009.

`FXRATES_FUZZ_EXAMPLES` sets how many random frames the fuzzer sends (150 by default).
"""

import asyncio
import itertools
import json
import os
import re
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from tests.support.replicas import Replica
from tests.support.ws_client import WsClient

# Starts real servers (uvicorn, a browser, tools): outside the fast `-m "not slow"` loop.
pytestmark = pytest.mark.slow

MAX_FRAME_BYTES = 64 * 1024
CLOSE_TOO_BIG = 1009
REPLY_TIMEOUT_S = 10.0
FUZZ_EXAMPLES = int(os.environ.get("FXRATES_FUZZ_EXAMPLES", "150"))

# What the server pushes unasked; everything else it sends answers a client message.
PUSHED = {"rate_update", "all_rates_update"}
ANSWERS = {
    "ping": {"pong"},
    "get_all_rates": {"all_rates"},
    "get_rate": {"rate"},
    "subscribe": {"subscribed"},
    "unsubscribe": {"subscribed"},
}
RATE_ITEM_FIELDS = {
    "source_currency",
    "destination_currency",
    "rate",
    "source_amount",
    "destination_amount",
    "destination_per_source",
    "last_updated",
    "stale",
    "provider",
}
PAIR_TEXT = re.compile(r"[A-Z]{3}/[A-Z]{3}")
LOGGED_FAILURE = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b")
EXCEPTION_LINE = re.compile(r"^[\s|+]*((?:[\w.]+(?:Error|Exception|Group|Operation|Interrupt)|KeyError)\b.*)$")

Frame = str | bytes


# ---------------------------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class Raw:
    """JSON text put into a message as it is: numbers JSON can write but Python cannot hold, deep nesting."""

    text: str


def encode(value: Any, ensure_ascii: bool = True) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        fields = (
            f"{json.dumps(key, ensure_ascii=ensure_ascii)}:{encode(item, ensure_ascii)}" for key, item in value.items()
        )
        return "{" + ",".join(fields) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(item, ensure_ascii) for item in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def frame_size(frame: Frame) -> int:
    return len(frame if isinstance(frame, bytes) else frame.encode())


def describe(frame: Frame) -> str:
    kind = "binary" if isinstance(frame, bytes) else "text"
    shown = repr(frame)
    if len(shown) > 300:
        shown = f"{shown[:200]}…{shown[-80:]}"
    return f"{kind} frame of {frame_size(frame)} bytes: {shown}"


# Text without lone surrogates: a text frame is UTF-8 on the wire.
UNICODE = st.characters(codec="utf-8")
CODES = ["USD", "NGN", "GBP", "KES", "EUR", "GHS", "JPY"]
ODD_STRINGS = [
    "",
    " ",
    "null",
    "0",
    "*",
    "\u0000",
    "\u202eDSU",
    "\uff35\uff33\uff24",
    "ß",
    "ǅ",
    "\U0001d54c\U0001d54a\U0001d53b",
    "USD\n",
    "🇺🇸",
    "'; --",
]
ODD_CODES = ["XYZ", "US", "USDD", "usd ", "\tngn\n", "Usd", "XXX", "XAU", "USD/NGN", *ODD_STRINGS]
ODD_PAIRS = ["XYZ/NGN", "USD/USD", "usd/ngn", "", "*", "**", "USDNGN", "USD/", "/NGN", "/", "USD/NGN/GBP"]
ODD_PAIRS += [" USD / NGN ", "USD\\NGN", "USD-NGN", "usd/ngn\u0000", "ALL", "*/*", "USD/*"]
ODD_TYPES = ["", "PING", "Ping", "ping ", " ping", "get-rate", "getRate", "subscribe\u0000", "resync", "rate"]
ODD_TYPES += ["pong", "error", "all_rates", "rate_update", "subscribed", "__proto__", "type"]
# JSON strings that decode to what a text frame cannot carry raw: lone surrogates, NUL.
ESCAPED_STRINGS = ['"\\ud800"', '"USD\\udfff"', '"\\udc00/NGN"', '"\\u0000"', '"\\ud83d\\ude00"']
NUMBER_WORDS = ["NaN", "Infinity", "-Infinity", "1e308", "-1e308", "1e999", "-1e999", "1E-400", "-0", "-0.0"]
NUMBER_WORDS += ["1" + "0" * 400, "-" + "9" * 400, "9" * 5000, "0." + "0" * 5000 + "1", "1e1000000000000000000"]


def number_literals() -> st.SearchStrategy[Raw]:
    """Numbers as JSON text: huge, tiny, exponents past what Decimal allows, more digits than int() takes."""
    whole = st.integers().map(str)
    fraction = st.builds(lambda a, b: f"{a}.{b}", st.integers(), st.integers(min_value=0))
    exponent = st.builds(
        lambda mantissa, power: f"{mantissa}e{power}", whole | fraction, st.integers(-(10**20), 10**20)
    )
    return st.one_of(st.sampled_from(NUMBER_WORDS), whole, fraction, exponent).map(Raw)


def long_strings() -> st.SearchStrategy[str]:
    """Strings of a few hundred to 60,000 bytes as JSON, under the frame limit on their own."""

    def build(chunk: str, target_bytes: int) -> str:
        return chunk * max(1, target_bytes // len(json.dumps(chunk).encode()))

    chunks = st.sampled_from(["x", "é", "\U0001d54f", "\u202e", "\u0000", '"', "\\", "USD/", "{", "\U0010ffff"])
    return st.builds(build, chunks, st.integers(300, 60_000))


def deep_nesting() -> st.SearchStrategy[Raw]:
    """Arrays or objects nested up to many thousands deep, still under 64 KiB."""

    def build(kind: str, depth: int) -> Raw:
        if kind == "array":
            return Raw("[" * depth + "]" * depth)
        return Raw('{"a":' * depth + "1" + "}" * depth)

    return st.one_of(
        st.builds(build, st.just("array"), st.integers(1, 30_000)),
        st.builds(build, st.just("object"), st.integers(1, 10_000)),
    )


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**300, max_value=10**400),
        st.floats(),  # NaN and the infinities too, written NaN / Infinity
        number_literals(),
        st.text(UNICODE, max_size=40),
        st.sampled_from(ODD_STRINGS),
        st.sampled_from(ESCAPED_STRINGS).map(Raw),
    )


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, nested a little."""
    return st.recursive(
        scalars(),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(UNICODE, max_size=10), inner, max_size=5),
        max_leaves=12,
    )


def currencies() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(CODES),
        st.sampled_from(CODES).map(str.lower),
        st.sampled_from(ODD_CODES),
        st.text(UNICODE, max_size=6),
        scalars(),
    )


def pair_texts() -> st.SearchStrategy[str]:
    good = st.builds(lambda a, b: f"{a}/{b}", st.sampled_from(CODES), st.sampled_from(CODES))
    odd = st.builds(lambda a, b: f"{a}/{b}", st.sampled_from(ODD_CODES), st.sampled_from(CODES + ODD_CODES))
    return st.one_of(good, st.just("*"), st.sampled_from(ODD_PAIRS), odd, st.text(UNICODE, max_size=12))


def pair_lists() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(pair_texts(), max_size=8),
        st.integers(995, 1005).map(lambda n: ["USD/NGN"] * n),  # around the 1000-pair limit
        st.lists(st.one_of(pair_texts(), scalars()), min_size=1, max_size=5),
        pair_texts(),
        json_values(),
    )


def change_thresholds() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(-10, 100),
        st.integers(999_990, 1_000_010),
        st.integers(),
        st.floats(),
        number_literals(),
        st.sampled_from(["25", "lots", "1e3", "NaN", "", "-1"]),
        json_values(),
    )


def valid_messages() -> st.SearchStrategy[dict[str, Any]]:
    pairs = st.lists(
        st.builds(lambda a, b: f"{a}/{b}", st.sampled_from(CODES), st.sampled_from(CODES)).filter(
            lambda pair: pair[:3] != pair[4:]
        )
        | st.just("*"),
        min_size=1,
        max_size=5,
    )
    return st.one_of(
        st.just({"type": "ping"}),
        st.just({"type": "get_all_rates"}),
        st.builds(
            lambda source, destination: {
                "type": "get_rate",
                "source_currency": source,
                "destination_currency": destination,
            },
            st.sampled_from(CODES),
            st.sampled_from(CODES),
        ),
        st.builds(lambda chosen: {"type": "subscribe", "pairs": chosen}, pairs),
        st.builds(
            lambda chosen, bps: {"type": "subscribe", "pairs": chosen, "min_change_bps": bps},
            pairs,
            st.integers(0, 100),
        ),
        st.builds(lambda chosen: {"type": "unsubscribe", "pairs": chosen}, pairs),
    )


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "type": st.one_of(st.sampled_from(sorted(ANSWERS)), st.sampled_from(ODD_TYPES), scalars()),
    "source_currency": currencies(),
    "destination_currency": currencies(),
    "pairs": pair_lists(),
    "min_change_bps": change_thresholds(),
}


@st.composite
def broken_messages(draw: st.DrawFn) -> str:
    """A valid-looking message with (mostly) one thing wrong: a field replaced, dropped or added."""
    message = draw(valid_messages())
    field = draw(st.sampled_from([*message, "min_change_bps", "pairs", "source_currency"]))
    how = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add", "as_is"]))
    if how == "replace":
        message[field] = draw(FIELD_VALUES[field])
    elif how == "drop":
        message.pop(field, None)
    elif how == "add":
        extra = draw(st.one_of(st.text(UNICODE, max_size=10), st.sampled_from(["type", "pairs", "id", ""])))
        message[extra] = draw(st.one_of(json_values(), deep_nesting(), long_strings()))
    return encode(message, ensure_ascii=draw(st.booleans()))


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each picked in proportion to its weight (st.one_of would flatten and pick uniformly)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


def text_frames() -> st.SearchStrategy[str]:
    other = st.one_of(
        json_values().map(encode),  # wrong shapes: lists, numbers, null, objects without a type
        number_literals().map(encode),
        deep_nesting().map(encode),
        long_strings().map(encode),
        long_strings(),
        st.text(UNICODE, max_size=200),
        st.binary(max_size=200).map(lambda data: data.decode("utf-8", errors="replace")),
        st.binary(max_size=200).map(lambda data: data.decode("latin-1")),
    )
    # Mostly valid-looking messages with one thing wrong: those reach furthest into the server.
    return weighted((3, broken_messages()), (1, other))


def frames() -> st.SearchStrategy[Frame]:
    binary = st.one_of(st.binary(max_size=300), text_frames().map(str.encode))
    return weighted((5, text_frames()), (1, binary)).filter(lambda frame: frame_size(frame) <= MAX_FRAME_BYTES)


# ---------------------------------------------------------------------------------------------------------------
# One exchange: the frame, a ping, then a marker whose answer ends the wait


class LogWatch:
    """What the replica has logged since the last look."""

    def __init__(self, replica: Replica) -> None:
        self._path = replica.log_path
        self._offset = self._path.stat().st_size if self._path.exists() else 0

    def new(self) -> str:
        if not self._path.exists():
            return ""
        with self._path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        return data.decode(errors="replace")


def failures_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if LOGGED_FAILURE.search(line)]


def summary(log: str) -> str:
    """The failures in a log in short: how many lines, and each distinct exception named."""
    lines = log.splitlines()
    exceptions = sorted({match.group(1)[:300] for line in lines if (match := EXCEPTION_LINE.match(line))})
    return f"the service logged {len(failures_in(log))} failure lines; exceptions:\n" + "\n".join(
        exceptions or failures_in(log)[:20]
    )


def logged_since(log: LogWatch) -> str:
    new = log.new()
    return f"{summary(new)}\nthe log's last lines:\n{new[-2500:]}"


def expected_answers(frame: Frame) -> tuple[set[str], set[str]]:
    """The answer types and error codes the contract allows for `frame`."""
    if isinstance(frame, bytes):
        return set(), {"bad_request"}
    try:
        raw = json.loads(frame)
    except (ValueError, RecursionError):
        return set(), {"bad_request"}
    kind = raw.get("type") if isinstance(raw, dict) else None
    if not isinstance(kind, str) or kind not in ANSWERS:
        return set(), {"bad_request"}
    return ANSWERS[kind], {"bad_request", "not_found"} if kind == "get_rate" else {"bad_request"}


def check_answer(frame: Frame, answer: Any) -> None:
    kinds, codes = expected_answers(frame)
    assert isinstance(answer, dict) and isinstance(answer.get("type"), str), f"not a message: {answer!r}"
    if answer["type"] == "error":
        assert answer.get("code") in codes, f"error code {answer.get('code')!r}, expected one of {sorted(codes)}"
        assert isinstance(answer.get("message"), str) and answer["message"].strip(), f"no message: {answer!r}"
        return
    assert answer["type"] in kinds, f"answered {answer['type']!r}; expected an error or one of {sorted(kinds)}"
    if answer["type"] == "pong":
        assert answer == {"type": "pong"}
    elif answer["type"] == "rate":
        assert isinstance(answer["rate"], dict) and set(answer["rate"]) == RATE_ITEM_FIELDS
    elif answer["type"] == "all_rates":
        assert isinstance(answer["rates"], list) and all(set(item) == RATE_ITEM_FIELDS for item in answer["rates"])
    elif answer["type"] == "subscribed":
        assert isinstance(answer["pairs"], list)
        assert all(pair == "*" or PAIR_TEXT.fullmatch(pair) for pair in answer["pairs"]), answer["pairs"]
        bps = answer["min_change_bps"]
        assert isinstance(bps, int | float) and not isinstance(bps, bool) and 0 <= bps <= 1_000_000, answer


async def exchange(client: WsClient, frame: Frame, marker: str, log: LogWatch) -> None:
    """Send `frame`, a ping and a marker; the frame gets one well-formed answer, the ping its pong, nothing dies."""
    what = describe(frame)
    try:
        await client.connection.send(frame)
        await client.send({"type": "ping"})
        # Answered with an error naming the marker: the last answer of this exchange, whatever the frame was.
        await client.send({"type": "get_rate", "source_currency": marker, "destination_currency": "NGN"})
        _, before = await client.recv_until(
            lambda m: m.get("type") == "error" and marker in str(m.get("message")), timeout_s=REPLY_TIMEOUT_S
        )
    except ConnectionClosed as closed:
        raise AssertionError(
            f"the server dropped the connection after a {what}\n"
            f"close received: {closed.rcvd}, close sent: {closed.sent}\n{logged_since(log)}"
        ) from None
    except TimeoutError:
        raise AssertionError(f"no answer within {REPLY_TIMEOUT_S}s after a {what}\n{logged_since(log)}") from None
    answers = [message for message in before if message.get("type") not in PUSHED]
    assert answers and answers[-1] == {"type": "pong"}, f"the ping was not answered last after a {what}: {answers}"
    assert len(answers) == 2, f"a {what}\ngot {len(answers) - 1} answers, not one: {answers[:-1]}"
    check_answer(frame, answers[0])
    logged = log.new()
    assert not failures_in(logged), f"after a {what}\n{summary(logged)}"


class FuzzSession:
    """One connection kept across hypothesis examples on one event loop; reopened only after an example broke it."""

    def __init__(self, runner: asyncio.Runner, replica: Replica) -> None:
        self._runner = runner
        self._url = replica.ws_url
        self._log = LogWatch(replica)
        self._client: WsClient | None = None
        self._markers = itertools.count()
        self.connections = 0

    def exchange(self, frame: Frame) -> None:
        self._runner.run(self._exchange(frame))

    def close(self) -> None:
        if self._client is not None:
            self._runner.run(self._client.connection.close())
            self._client = None

    async def _exchange(self, frame: Frame) -> None:
        client = await self._open()
        await exchange(client, frame, f"fuzz-{next(self._markers)}-check", self._log)

    async def _open(self) -> WsClient:
        if self._client is not None and self._client.connection.state is State.OPEN:
            return self._client
        if self._client is not None:
            await self._client.connection.close()
        client = WsClient(self._url)
        self._client = await client.__aenter__()
        self.connections += 1
        snapshot = await client.recv()
        assert snapshot["type"] == "all_rates"
        return client


FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_fuzzed_frames_are_answered_and_the_connection_stays_open(ws_service: Replica) -> None:
    with asyncio.Runner() as runner:
        session = FuzzSession(runner, ws_service)

        @FUZZ_SETTINGS
        @given(frame=frames())
        def one_frame(frame: Frame) -> None:
            session.exchange(frame)

        try:
            one_frame()
        finally:
            session.close()
    assert session.connections == 1, "some frame closed the connection"


HOSTILE_FRAMES: list[tuple[str, Frame]] = [
    ("binary JSON ping", b'{"type": "ping"}'),
    ("empty binary frame", b""),
    ("binary garbage", bytes(range(256))),
    ("empty text frame", ""),
    ("array nested 30,000 deep", "[" * 30_000 + "]" * 30_000),
    ("object nested 10,000 deep", '{"a":' * 10_000 + "1" + "}" * 10_000),
    ("deep nesting in an ignored field", '{"type": "ping", "extra": ' + "[" * 5_000 + "]" * 5_000 + "}"),
    ("exponent past Decimal's limit", '{"type": "subscribe", "pairs": ["*"], "min_change_bps": 1e1000000000000000000}'),
    ("negative exponent past Decimal's limit", '{"type": "ping", "x": -1.5e-10000000000000000000}'),
    ("huge float alone", "1e1000000000000000000"),
    ("NaN threshold", '{"type": "subscribe", "pairs": ["USD/NGN"], "min_change_bps": NaN}'),
    ("-Infinity threshold", '{"type": "subscribe", "pairs": ["USD/NGN"], "min_change_bps": -Infinity}'),
    ("10**400 threshold", '{"type": "subscribe", "pairs": ["USD/NGN"], "min_change_bps": 1' + "0" * 400 + "}"),
    ("5,000-digit integer", '{"type": "subscribe", "pairs": ["USD/NGN"], "min_change_bps": ' + "9" * 5000 + "}"),
    ("257 pairs", json.dumps({"type": "subscribe", "pairs": ["USD/NGN"] * 257})),
    ("257 pairs gone", json.dumps({"type": "unsubscribe", "pairs": ["USD/NGN"] * 257})),
    ("unknown pairs", json.dumps({"type": "unsubscribe", "pairs": ["XYZ/NGN", "usd/ngn"]})),
    ("same currency twice", json.dumps({"type": "get_rate", "source_currency": "usd", "destination_currency": "USD"})),
    (
        "unicode currency",
        json.dumps({"type": "get_rate", "source_currency": "\uff35\uff33\uff24", "destination_currency": "ß"}),
    ),
    ("NUL in the type", '{"type": "ping\\u0000"}'),
    ("lone surrogate escape", '{"type": "ping", "x": "\\ud800"}'),
    ("lone surrogate type", '{"type": "\\ud800"}'),
    ("lone surrogate pair", '{"type": "subscribe", "pairs": ["\\ud800/NGN"]}'),
    ("string of 60,000 bytes", json.dumps({"type": "get_rate", "source_currency": "é" * 30_000}, ensure_ascii=False)),
]


@pytest.mark.parametrize("frame", [frame for _, frame in HOSTILE_FRAMES], ids=[name for name, _ in HOSTILE_FRAMES])
async def test_hostile_frames_are_answered_and_the_connection_stays_open(ws_service: Replica, frame: Frame) -> None:
    assert frame_size(frame) <= MAX_FRAME_BYTES
    log = LogWatch(ws_service)
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        await exchange(client, frame, "hostile-check", log)
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}


OVERSIZE_FRAMES: list[tuple[str, Frame]] = [
    ("text 1 byte over", '"' + "x" * (MAX_FRAME_BYTES - 1) + '"'),
    ("text in 2-byte characters", json.dumps({"type": "ping", "padding": "é" * 40_000}, ensure_ascii=False)),
    ("text of 1 MiB", "x" * 1024 * 1024),
    ("binary 1 byte over", b"x" * (MAX_FRAME_BYTES + 1)),
    ("binary of 1 MiB", b"\x00" * 1024 * 1024),
]


@pytest.mark.parametrize("frame", [frame for _, frame in OVERSIZE_FRAMES], ids=[name for name, _ in OVERSIZE_FRAMES])
async def test_a_frame_over_64_kib_closes_with_1009_and_the_service_goes_on(ws_service: Replica, frame: Frame) -> None:
    assert frame_size(frame) > MAX_FRAME_BYTES
    log = LogWatch(ws_service)
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        await client.connection.send(frame)
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv_until(lambda m: False, timeout_s=REPLY_TIMEOUT_S)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_TOO_BIG, closed.value
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        assert await client.ask({"type": "ping"}, "pong") == {"type": "pong"}
    logged = log.new()
    assert not failures_in(logged), summary(logged)


@pytest.mark.parametrize("frame", ["x" * MAX_FRAME_BYTES, b"x" * MAX_FRAME_BYTES], ids=["text", "binary"])
async def test_a_frame_of_exactly_64_kib_is_not_too_big(ws_service: Replica, frame: Frame) -> None:
    log = LogWatch(ws_service)
    async with WsClient(ws_service.ws_url) as client:
        await client.recv()
        await exchange(client, frame, "limit-check", log)


def test_nothing_was_logged_as_an_error_and_nothing_answered_5xx(ws_service: Replica) -> None:
    """Last in the module: the whole log of the replica the fuzzer hammered, and its HTTP status counts."""
    logged = ws_service.log()
    assert not failures_in(logged), summary(logged)
    with urllib.request.urlopen(f"{ws_service.url}/metrics", timeout=10) as response:
        assert response.status == 200
        samples = response.read().decode().splitlines()
    server_errors = [
        line for line in samples if line.startswith("fxrates_http_requests_total{") and 'status="5' in line
    ]
    assert not server_errors, server_errors
