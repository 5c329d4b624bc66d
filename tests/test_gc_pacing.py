"""Full garbage collections come due during a poll cycle but run after it, and everything is put back."""

import asyncio
import gc

from prometheus_client import CollectorRegistry, Histogram

from app.live.gc_pacing import CollectionPacer
from app.tasks import running


def collections(histogram: Histogram) -> float:
    return next(sample.value for sample in histogram.collect()[0].samples if sample.name.endswith("_count"))


async def wait_for_collections(histogram: Histogram, count: int) -> None:
    async with asyncio.timeout(10):
        while collections(histogram) < count:  # noqa: ASYNC110 - the pacer's task runs in this loop
            await asyncio.sleep(0.01)


async def test_during_a_cycle_no_full_collection_starts_and_the_due_one_runs_after_it() -> None:
    seconds = Histogram("gc_test_seconds", "test", registry=CollectorRegistry())
    before = gc.get_threshold()
    async with CollectionPacer(seconds, settle_s=0.0, max_gap_s=3600) as pacer:
        assert gc.get_freeze_count() > 0
        async with running(pacer.run(), "pacer"):
            assert gc.get_threshold() == before  # between cycles, CPython collects as usual
            pacer.rates_moving()
            assert gc.get_threshold()[2] > 10_000 and gc.get_threshold()[:2] == before[:2]
            # Enough younger collections that CPython would have been due a full one: none starts.
            for _ in range(before[2] + 1):
                gc.collect(1)
            assert gc.get_count()[2] > before[2]
            assert collections(seconds) == 0
            pacer.cycle_ended()
            await wait_for_collections(seconds, 1)
            assert gc.get_count()[2] == 0
            assert gc.get_threshold() == before
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_a_cycle_that_never_ends_is_given_up_on() -> None:
    seconds = Histogram("gc_test_seconds", "test", registry=CollectorRegistry())
    before = gc.get_threshold()
    async with CollectionPacer(seconds, max_gap_s=0.05) as pacer, running(pacer.run(), "pacer"):
        pacer.rates_moving()
        for _ in range(before[2] + 1):
            gc.collect(1)
        await wait_for_collections(seconds, 1)
        assert gc.get_threshold() == before
