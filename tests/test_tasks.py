"""The task set: a crash logged, every task stopped even when it loses a cancellation (as redis-py's commands can
on Python 3.11), and a close that waits for work handed over."""

import asyncio
import logging

import pytest

from app.kit.tasks import TaskSet, cancel_and_wait, running


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


async def test_a_crash_is_logged_and_an_expected_failure_is_not(caplog: pytest.LogCaptureFixture) -> None:
    async def fail(error: Exception) -> None:
        raise error

    tasks = TaskSet()
    with caplog.at_level(logging.ERROR, logger="app.kit.tasks"):
        crashed = tasks.spawn(fail(RuntimeError("boom")), "crasher")
        expected = tasks.spawn(fail(LookupError("answered for")), "quiet", quiet=(LookupError,))
        await asyncio.wait({crashed, expected})
        await asyncio.sleep(0)  # the done-callbacks run on the loop's next turn
    assert [record.getMessage() for record in caplog.records] == ["background task crasher stopped"]
    assert len(tasks) == 0, "an ended task is still held"


async def test_close_stops_every_task_however_often_it_swallows() -> None:
    renewals: list[int] = []
    tasks = TaskSet()
    spawned = [tasks.spawn(renews_forever(renewals, swallow=2), f"renewer {n}") for n in range(3)]
    await asyncio.sleep(0.01)
    async with asyncio.timeout(10):
        await tasks.aclose()
    assert all(task.cancelled() for task in spawned)
    stopped_at = len(renewals)
    await asyncio.sleep(0.02)
    assert len(renewals) == stopped_at


async def test_wait_lets_work_finish_including_work_it_hands_on() -> None:
    finished: list[str] = []
    tasks = TaskSet()

    async def second() -> None:
        await asyncio.sleep(0.01)
        finished.append("second")

    async def first() -> None:
        await asyncio.sleep(0.01)
        tasks.spawn(second(), "second")
        finished.append("first")

    tasks.spawn(first(), "first")
    async with asyncio.timeout(10):
        await tasks.wait()
    assert finished == ["first", "second"]
