"""Hub frames as server-sent events, and `Last-Event-ID`, in process (app/live/sse.py); the live stream is
tests/test_sse.py. Each encoded event is read back by the test's own event-stream parser (tests/support)."""

import json

import pytest

from app.live.sse import EventId, event, parse_event_id, retry_field
from tests.support.sse_client import Event, EventStream

EPOCH = "3f9c2b7e51d04a6c8e2f1a9b7c5d3e10"


def read(data: bytes, chunk: int | None = None, stream: EventStream | None = None) -> list[Event]:
    """Every event in `data`, fed `chunk` bytes at a time (all at once: None)."""
    stream = EventStream() if stream is None else stream
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    return [parsed for piece in pieces for parsed in stream.feed(piece)]


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "rate_update", "rate": {"source_currency": "USD"}, "previous_rate": None, "seq": 7},
        {"type": "all_rates", "rates": [], "as_of": "2026-01-01T00:00:00Z", "epoch": EPOCH, "seq": 0},
        {"type": "heartbeat", "epoch": EPOCH, "seq": 12},  # a type the encoder has no code for
    ],
)
def test_a_frame_with_a_seq_is_an_event_named_by_its_type_with_an_id(frame: dict[str, object]) -> None:
    text = json.dumps(frame, separators=(",", ":"))
    (parsed,) = read(event(text, EPOCH))
    assert (parsed.type, parsed.id, parsed.json()) == (frame["type"], f"{EPOCH}:{frame['seq']}", frame)


def test_a_frame_without_a_seq_has_no_id_and_keeps_the_last() -> None:
    data = event('{"type":"rate_update","seq":5}', EPOCH) + event('{"type":"all_rates_update","count":44}', EPOCH)
    first, second = read(data)
    assert second.type == "all_rates_update" and second.id is None
    assert second.last_event_id == first.id == f"{EPOCH}:5"


def test_retry_comes_with_the_first_event_and_a_crlf_split_across_chunks_is_one_line_end() -> None:
    data = retry_field() + event('{"type":"all_rates","seq":1}', EPOCH)
    for chunk in (None, 1, 2, 3):
        stream = EventStream()
        (parsed,) = read(data.replace(b"\n", b"\r\n"), chunk, stream)
        assert parsed.retry == stream.reconnection_ms == 3000 and parsed.type == "all_rates"


def test_line_breaks_in_a_frame_stay_in_its_data() -> None:
    text = '{"type": "error",\n"message": "a\u2028b"}'
    (parsed,) = read(event(text, EPOCH))
    assert parsed.data == text and parsed.id is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"{EPOCH}:4181", EventId(EPOCH, 4181)),
        (f" {EPOCH}:0 ", EventId(EPOCH, 0)),
        (None, None),
        ("", None),
        ("4181", None),
        (f"{EPOCH}:", None),
        (f"{EPOCH}:-1", None),
        (f"{EPOCH}:1.5", None),
        (f"{EPOCH}:01", None),
        (f"a:b:{EPOCH}", None),
        (f"{EPOCH}:{'9' * 40}", None),
    ],
)
def test_last_event_id_is_epoch_colon_seq_or_nothing(header: str | None, expected: EventId | None) -> None:
    assert parse_event_id(header) == expected
    if expected is not None:
        assert str(expected) == header.strip()  # type: ignore[union-attr]
