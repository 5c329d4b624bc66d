"""Server-sent events (docs/sse.md): a hub frame as an event, and the `Last-Event-ID` a client reconnects with.

Generic over the hub's frames: whatever a client is queued goes out as one event
named by the frame's `type`, its data the frame's JSON, with `id: <epoch>:<seq>`
when the frame carries a `seq`. No frame type has code of its own here, so a
frame the hub learns to send is an event at once.

An event is encoded once per frame text and epoch, not once per client: the
hub hands every client the same frame text (app.live.frames), and the cache
below finds it by that string, whose hash Python keeps on the string.
"""

import json
import re
from functools import lru_cache
from typing import NamedTuple

# What a browser's EventSource waits before reconnecting (milliseconds), sent once before the first event.
RETRY_MS = 3000
# Frames whose event bytes are kept: a poll cycle's updates (44 pairs, in both shapes) and a few snapshots.
CACHED_EVENTS = 512
# An epoch never contains ':' (docs/design.md, "Sequence numbers"); a seq is a non-negative integer.
# The line breaks of the event-stream format (str.splitlines knows more, which would cut JSON strings apart).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_EVENT_ID = re.compile(r"([^:\s]{1,128}):(0|[1-9][0-9]{0,18})")


class EventId(NamedTuple):
    """Where a client says it got to: the `id` of the last event it received."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"


def parse_event_id(text: str | None) -> EventId | None:
    """A `Last-Event-ID` header as an `EventId`; None when absent or not of the form `<epoch>:<seq>`."""
    if text is None:
        return None
    found = _EVENT_ID.fullmatch(text.strip())
    return None if found is None else EventId(found[1], int(found[2]))


def retry_field(ms: int = RETRY_MS) -> bytes:
    """The line before the first event: how long a client waits before reconnecting."""
    return f"retry: {ms}\n".encode()


@lru_cache(maxsize=CACHED_EVENTS)
def event(frame: str, epoch: str) -> bytes:
    """The event for a frame's JSON text: `event:` its `type`, `id:` `<epoch>:<seq>` when it carries a `seq`."""
    parsed = json.loads(frame)
    kind = parsed.get("type") if isinstance(parsed, dict) else None
    seq = parsed.get("seq") if isinstance(parsed, dict) else None
    lines = []
    if isinstance(seq, int) and not isinstance(seq, bool):
        lines.append(f"id: {epoch}:{seq}")
    if isinstance(kind, str) and kind:
        lines.append(f"event: {_one_line(kind)}")
    # JSON from the hub has no line breaks; a frame that had some still arrives whole (one data line each).
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(frame))
    return ("\n".join(lines) + "\n\n").encode()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")
