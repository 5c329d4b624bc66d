"""One way to wait for a condition that has no event to wait on: poll it, with a deadline, and say what was awaited.

`await eventually(probe, what="...")` calls `probe` (plain or async) every `interval_s` until it returns a truthy
value, or one `until` accepts (`until=lambda n: n >= 44` keeps the count as the last value seen), and returns it.
Past `timeout_s` it fails with `what`, the last value seen (or the last error the probe raised) and `detail()` if
given, so a timeout reads as a diagnosis, not "assert False". Exceptions propagate at once (a probe that finds its
process dead raises), except those named in `ignoring`, which count as "not yet" (a server not listening yet
refuses the connection).

`eventually_sync` is the same for the harness's blocking code (starting a replica, the fake, a Redis), which runs
where no event loop is. Where a real event exists (an `asyncio.Event`, a `Future`, a message a client awaits),
await that instead: it is exact, a poll is only near.
"""

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL_S = 0.05


class Timeout(AssertionError):
    """The condition did not hold in time."""


def _message(what: str | Callable[[], str], timeout_s: float, last: object, error: BaseException | None) -> str:
    described = what() if callable(what) else what
    seen = f"last error: {error!r}" if error is not None else f"last value: {last!r}"
    return f"timed out after {timeout_s:g} s waiting for {described}; {seen}"


async def eventually(
    probe: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    what: str | Callable[[], str],
    timeout_s: float = 10,
    interval_s: float = INTERVAL_S,
    detail: Callable[[], str] | None = None,
    ignoring: tuple[type[Exception], ...] = (),
    until: Callable[[T], bool] = bool,
) -> T:
    """`probe`'s first truthy value; `Timeout` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            last, error = value, None
            if until(value):
                return value
        except ignoring as raised:
            error = raised
        if time.monotonic() >= deadline:
            message = _message(what, timeout_s, last, error)
            raise Timeout(f"{message}\n{detail()}" if detail else message) from error
        await asyncio.sleep(interval_s)


def eventually_sync(
    probe: Callable[[], T],
    *,
    what: str | Callable[[], str],
    timeout_s: float = 10,
    interval_s: float = INTERVAL_S,
    detail: Callable[[], str] | None = None,
    ignoring: tuple[type[Exception], ...] = (),
    until: Callable[[T], bool] = bool,
) -> T:
    """`eventually` for blocking code outside an event loop."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = probe()
            last, error = value, None
            if until(value):
                return value
        except ignoring as raised:
            error = raised
        if time.monotonic() >= deadline:
            message = _message(what, timeout_s, last, error)
            raise Timeout(f"{message}\n{detail()}" if detail else message) from error
        time.sleep(interval_s)
