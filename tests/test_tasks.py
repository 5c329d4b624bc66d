"""Stopping a background task even when it loses a cancellation, as redis-py's commands can on Python 3.11."""

import asyncio

import pytest

from app.kit.tasks import cancel_and_wait, running


async def renews_forever(renewals: list[int], swallow: int) -> None:
    """Like the poller's lease renewal: loops until cancelled, but its first `swallow` cancellations are lost,
    as `asyncio.wait_for` loses one that arrives just as the awaited call completes (CPython gh-86296)."""
    while True:
        try:
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            if swallow == 0:
                raise
            swallow -= 1
            current = asyncio.current_task()
            assert current is not None
            current.uncancel()
        renewals.append(1)


async def test_a_task_that_loses_its_cancellation_is_cancelled_again_until_it_ends() -> None:
    renewals: list[int] = []
    task = asyncio.create_task(renews_forever(renewals, swallow=3))
    await asyncio.sleep(0.01)
    async with asyncio.timeout(10):
        await cancel_and_wait(task, every_s=0.01)
    assert task.cancelled()
    stopped_at = len(renewals)
    await asyncio.sleep(0.02)
    assert len(renewals) == stopped_at


async def test_a_plain_cancel_leaves_such_a_task_running() -> None:
    # The failure cancel_and_wait exists for: one cancel, and the loop carries on.
    renewals: list[int] = []
    task = asyncio.create_task(renews_forever(renewals, swallow=1))
    await asyncio.sleep(0.01)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.05)
    assert not done
    await cancel_and_wait(task)


async def test_running_stops_its_task_however_often_it_swallows() -> None:
    renewals: list[int] = []
    async with asyncio.timeout(10):
        async with running(renews_forever(renewals, swallow=2), "renewer"):
            await asyncio.sleep(0.01)
    stopped_at = len(renewals)
    await asyncio.sleep(0.02)
    assert len(renewals) == stopped_at


async def test_a_task_that_crashed_is_awaited_without_raising() -> None:
    async def crash() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(crash())
    await asyncio.wait({task})
    await cancel_and_wait(task)
    with pytest.raises(RuntimeError):
        task.result()
